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

#: control characters (C0, DEL, C1) and the Unicode controls that reorder or hide text
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u200b-\u200f\u2028-\u202e\u2066-\u2069\ufeff]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(match: re.Match[str]) -> str:
    char = match.group(0)
    if char in _NAMED:
        return _NAMED[char]
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def safe_text(text: object, limit: int = SAFE_TEXT_LIMIT) -> str:
    """``text`` on one line, printable: control characters escaped as Python writes them
    (``\\n``, ``\\x1b``, ``\\u202e``), and at most ``limit`` characters of it, a cut one ending
    with how much was left out. Idempotent on its own output (backslashes are left alone)."""
    value = str(text)
    cut = ""
    if len(value) > limit:
        cut = f"... ({len(value) - limit} more characters)"
        value = value[:limit]
    return _UNSAFE.sub(_escape, value) + cut


def progress_bar(
    total: int, label: str | None = None, *, quiet: bool = False, after: int = 0
) -> Any:
    """A tqdm bar on standard error for ``total`` items (its ``update``/``close`` always work).

    It stays hidden with ``quiet``, for ``after`` items or fewer, and whenever standard error
    is not a terminal: in a log or a pipe its carriage-return updates would glue onto the
    one-line error messages.
    """
    from tqdm import tqdm

    disable = True if quiet or total <= after else None  # None: only on a terminal
    return tqdm(total=total, desc=label, unit="img", file=sys.stderr, leave=False, disable=disable)
