"""What this machine and process have (package versions, memory, free disk), and stopping a child process."""

from __future__ import annotations

import os
import platform
import shutil
from importlib import metadata
from pathlib import Path


def package_versions(names: tuple[str, ...] | list[str]) -> dict[str, str | None]:
    """``{"python": ..., name: version or None (not installed)}``, for the records."""
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def package_version(name: str) -> str | None:
    return package_versions([name])[name]


def mem_available_bytes() -> int | None:
    """MemAvailable of /proc/meminfo (None where there is no /proc, e.g. macOS)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024  # the kernel writes kB (KiB)
    except (OSError, ValueError, IndexError):
        pass
    return None


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (Linux ru_maxrss is in KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def free_bytes(path: str | os.PathLike) -> int:
    """Free bytes on the filesystem that holds ``path`` (its nearest existing parent)."""
    p = Path(path).absolute()
    while not p.exists():
        p = p.parent
    return shutil.disk_usage(p).free


def stop_process(proc, grace: float = 30) -> bool:
    """Terminate a child process and wait for it; kill it after ``grace`` seconds. True when it had to be killed."""
    import subprocess

    if proc.poll() is not None:
        return False
    proc.terminate()
    try:
        proc.wait(grace)
        return False
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return True
