"""The `latest` link of a stage's output tree (models/latest, exports/latest): switched atomically,
and only once the folder it names is complete."""

from __future__ import annotations

import os
from pathlib import Path

LATEST = "latest"


def switch_latest(folder: Path) -> Path:
    """Point ``folder.parent/latest`` at ``folder`` (a relative link, replaced in one rename)."""
    link = folder.parent / LATEST
    tmp = folder.parent / f".{LATEST}.{os.getpid()}.tmp"
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    os.symlink(folder.name, tmp)
    os.replace(tmp, link)
    return link
