"""What gapcam shows on a terminal: text that came from outside made safe, and one progress bar.

``safe_text`` is the one door through which an untrusted string (a file name, a path from an
annotation file, a class name from a checkpoint, an exception message that quotes any of them)
reaches a terminal, a log line, an overlay caption or an error message.
"""

from __future__ import annotations

import re
import sys
from typing import Any

#: the longest piece of untrusted text shown in one place (longer ones are cut, and say so)
SAFE_TEXT_LIMIT = 200

#: control characters (C0, DEL, C1), the Unicode controls that reorder or hide text, and lone
#: surrogates (file names that are not UTF-8 arrive as them; a strict stdout cannot print them)
_UNSAFE = re.compile(
    "[\x00-\x1f\x7f-\x9f\u200b-\u200f\u2028-\u202e\u2066-\u2069\ufeff\ud800-\udfff]"
)
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(char: str) -> str:
    if char in _NAMED:
        return _NAMED[char]
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def safe_text(text: object, limit: int = SAFE_TEXT_LIMIT) -> str:
    """``text`` on one line, printable: control characters escaped as Python writes them
    (``\\n``, ``\\x1b``, ``\\u202e``), and at most ``limit`` characters of the result (an
    escape is never split), a cut one ending with how much of ``text`` was left out."""
    value = str(text)
    shown: list[str] = []
    length = 0
    for index, char in enumerate(value[: limit + 1]):  # each shows as one character or more
        piece = _escape(char) if _UNSAFE.match(char) else char
        if length + len(piece) > limit:
            return "".join(shown) + f"... ({len(value) - index} more characters)"
        shown.append(piece)
        length += len(piece)
    return "".join(shown)


def progress_bar(
    total: int | None,
    label: str | None = None,
    *,
    quiet: bool = False,
    after: int = 0,
    unit: str = "img",
) -> Any:
    """A tqdm bar on standard error for ``total`` items (None: a count without a total, such as
    the frames of a video whose container does not say; its ``update``/``close`` always work).

    It stays hidden with ``quiet``, for ``after`` items or fewer, and whenever standard error
    is not a terminal: in a log or a pipe its carriage-return updates would glue onto the
    one-line error messages.
    """
    from tqdm import tqdm

    disable = True if quiet or (total is not None and total <= after) else None  # None: a tty
    return tqdm(total=total, desc=label, unit=unit, file=sys.stderr, leave=False, disable=disable)
