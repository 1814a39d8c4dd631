"""What a path on disk is, before surgeon opens it: opening a FIFO blocks until something writes
to it, and a device never ends, so neither is read as a data file, a heads file or a config.

    special_kind(path)                 # "a FIFO", "a character device", … or None
    check_file(path, "data file")      # DataError naming what it is instead
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from surgeon.errors import DataError

_KINDS = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def special_kind(path: str | Path) -> str | None:
    """``"a FIFO"``, ``"a character device"``, ``"a block device"`` or ``"a socket"`` when ``path``
    (links followed) is one of those; None for files, folders and paths that do not exist."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None
    return next((name for test, name in _KINDS if test(mode)), None)


def check_file(path: str | Path, what: str = "data file") -> None:
    """DataError when ``path`` is a FIFO, a device or a socket rather than a ``what``."""
    kind = special_kind(path)
    if kind:
        raise DataError(str(path), f"is {kind}, not a {what}", f"give a regular {what}")
