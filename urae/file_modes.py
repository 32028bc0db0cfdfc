"""Files the library writes get the permissions the process's umask asks for.

``tempfile.mkstemp`` creates its file with mode 0600 whatever the umask, and an atomic write renames
that file into place: without a chmod every output would be readable by its owner only, which breaks
a storage volume shared by processes of different users.
"""

from __future__ import annotations

import os
from pathlib import Path


def current_umask() -> int:
    """The process's umask, read without changing it (os.umask can only be read by setting it, which
    would give files created meanwhile by other threads the wrong mode)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask(path: str | Path) -> None:
    """Give a file made by mkstemp the mode a plain open() would have given it: 0o666 & ~umask."""
    os.chmod(path, 0o666 & ~current_umask())
