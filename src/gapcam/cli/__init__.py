"""The ``gapcam`` command line: parse, call the library, print. No logic of its own.

One module per command (``localize``, ``evaluate``, ``serve``, ``train`` with ``synth``,
``info`` with ``models``/``summary``/``classes``); each adds its parser and sets its handler.
``options`` holds the option groups they share and the one translation of flags into library
keywords. Building the parser imports nothing heavy: handlers import what they need.

Exit codes: 0 all inputs done; 1 some inputs failed (the rest were still processed);
2 bad arguments, or a model that cannot be built (unknown, unsupported, weights unavailable);
130 interrupted (Ctrl-C, SIGINT); 143 terminated (SIGTERM: ``kill``, systemd, Docker, batch
schedulers), after the same clean-up as an interruption: no partial output is left behind.

Every failure is one line of at most ``LINE_LIMIT`` characters, whatever file names, paths or
class names it quotes (``options.error_text``).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from collections.abc import Sequence
from types import FrameType
from typing import Any, NoReturn

from gapcam._version import __version__
from gapcam.cli import evaluate, info, localize, options, serve, train
from gapcam.errors import GapcamError

EXIT_OK, EXIT_FAILED_INPUTS, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
EXIT_TERMINATED = 128 + signal.SIGTERM

#: the longest line a failure is reported on
LINE_LIMIT = 299
ERROR_PREFIX = "gapcam: error: "


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where SIGINT raises ``KeyboardInterrupt``: every clean-up that runs on
    Ctrl-C (temporary files removed, a training run saved) runs on ``kill`` too."""


class Parser(argparse.ArgumentParser):
    """argparse, whose error line (which quotes what was typed) is escaped and bounded."""

    def error(self, message: str) -> NoReturn:
        room = LINE_LIMIT - len(f"{self.prog}: error: ")
        super().error(options.error_text(message, (), room))


class TerminateAsInterrupt:
    """While ``armed`` (from ``__enter__``, in the main thread), the first SIGTERM raises
    ``Terminated``; later ones are only noted (``received``), so that the clean-up the first
    one started can finish. ``__exit__`` puts the previous handler back."""

    def __init__(self) -> None:
        self.received = False
        self.armed = False
        self.previous: Any = None

    def __enter__(self) -> TerminateAsInterrupt:
        if threading.current_thread() is threading.main_thread():
            previous = signal.signal(signal.SIGTERM, self._handle)
            self.previous = signal.SIG_DFL if previous is None else previous
            self.armed = True
        return self

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        first = not self.received
        self.received = True
        if first and self.armed:
            raise Terminated

    def __exit__(self, *exc: object) -> None:
        self.armed = False
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)
            self.previous = None


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="gapcam",
        description="Class activation maps and boxes for CNNs that end in global average pooling.",
        epilog="run `gapcam COMMAND --help` for a command's options and examples",
    )
    parser.add_argument("--version", action="version", version=f"gapcam {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in (localize, evaluate, serve, train, info):
        command.add(commands)
    for name, subparser in commands.choices.items():
        # what error messages may name as flags: every option the command has, as spelled
        flags = {
            action.dest: max(action.option_strings, key=len)
            for action in subparser._actions
            if action.option_strings
        }
        subparser.set_defaults(flags=flags, command=name)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with TerminateAsInterrupt() as signals:
        try:
            code = _run(args)
        except KeyboardInterrupt:  # a second one, while the first was being reported
            code = EXIT_INTERRUPTED
        signals.armed = False
    if signals.received:  # also when the command caught it (train saves the run, then returns)
        if code != EXIT_TERMINATED:
            print("gapcam: terminated", file=sys.stderr)
        return EXIT_TERMINATED
    return code


def _run(args: argparse.Namespace) -> int:
    try:
        return int(args.handler(args))
    except GapcamError as exc:
        room = LINE_LIMIT - len(ERROR_PREFIX)
        message = exc.message if isinstance(exc.message, str) and exc.message else str(exc)
        print(ERROR_PREFIX + options.error_text(message, args.flags, room), file=sys.stderr)
        for detail in exc.details:  # the problems it gathered: one line each
            print("  " + options.error_text(detail, args.flags, room - 2), file=sys.stderr)
        return EXIT_USAGE
    except Terminated:
        print("gapcam: terminated", file=sys.stderr)
        return EXIT_TERMINATED
    except KeyboardInterrupt:
        print("gapcam: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # e.g. `gapcam models | head`: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry()
