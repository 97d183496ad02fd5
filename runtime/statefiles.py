"""Private state files: SQLite databases readable by the server's user only.

The state directory is created 0700 and each database 0600 before SQLite opens it; SQLite gives the
``-wal`` / ``-shm`` files it creates the database file's permissions. Files left with wider permissions
by an older version are narrowed when they are opened.
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path
from typing import Any

DIR_MODE = 0o700
FILE_MODE = 0o600
SIDE_FILES = ("-wal", "-shm", "-journal")


def private_dir(path: Path) -> Path:
    """Create ``path`` (and missing parents) with mode 0700; an existing directory is left as it is."""
    path = Path(path)
    if not path.is_dir():
        path.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
        os.chmod(path, DIR_MODE)  # mkdir's mode is reduced by the umask; 0700 is what we mean
    return path


def connect_private(path: Path, **kwargs: Any) -> sqlite3.Connection:
    """``sqlite3.connect(path)`` on a database file created (or narrowed to) 0600, with its side files."""
    path = Path(path)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, FILE_MODE)
    try:
        os.fchmod(fd, FILE_MODE)
    finally:
        os.close(fd)
    for suffix in SIDE_FILES:
        side = path.with_name(path.name + suffix)
        if side.exists():
            os.chmod(side, FILE_MODE)
    return sqlite3.connect(path, **kwargs)
