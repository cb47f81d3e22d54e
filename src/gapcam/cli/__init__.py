"""The ``gapcam`` command line: parse, call the library, print. No logic of its own.

One module per command (``localize``, ``evaluate``, ``serve``, ``train`` with ``synth``,
``info`` with ``models``/``summary``/``classes``); each adds its parser and sets its handler.
``options`` holds the option groups they share and the one translation of flags into library
keywords. Building the parser imports nothing heavy: handlers import what they need.

Exit codes: 0 all inputs done; 1 some inputs failed (the rest were still processed);
2 bad arguments, or a model that cannot be built (unknown, unsupported, weights unavailable);
130 interrupted.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from gapcam._version import __version__
from gapcam.cli import evaluate, info, localize, options, serve, train
from gapcam.errors import GapcamError

EXIT_OK, EXIT_FAILED_INPUTS, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gapcam",
        description="Class activation maps and boxes for CNNs that end in global average pooling.",
        epilog="run `gapcam COMMAND --help` for a command's options and examples",
    )
    parser.add_argument("--version", action="version", version=f"gapcam {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in (localize, evaluate, serve, train, info):
        command.add(commands)
    for name, subparser in commands.choices.items():
        # what error messages may name as flags: every option the command has
        dests = {action.dest for action in subparser._actions if action.option_strings}
        subparser.set_defaults(flags=frozenset(dests), command=name)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args))
    except GapcamError as exc:
        print(f"gapcam: error: {options.flag_message(str(exc), args.flags)}", file=sys.stderr)
        return EXIT_USAGE
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
