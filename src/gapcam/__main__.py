"""``python -m gapcam``: the command line."""

from gapcam.cli import entry

entry()
