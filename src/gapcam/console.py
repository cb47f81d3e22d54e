"""What gapcam shows on a terminal while it works: one kind of progress bar for every job."""

from __future__ import annotations

import sys
from typing import Any


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
