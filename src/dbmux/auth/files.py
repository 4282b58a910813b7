"""What tells that a file changed, for everything dbmux reads again when its file does
(certificates and keys, token keys, secrets)."""

from __future__ import annotations

from pathlib import Path


def file_stamp(path: Path) -> tuple[int, int, int] | None:
    """(inode, size, modification time in ns), None if it cannot be looked at: a file
    replaced (renamed over), rewritten or touched gets another stamp, even within a second."""
    try:
        info = path.stat()
    except OSError:
        return None
    return (info.st_ino, info.st_size, info.st_mtime_ns)
