"""Records beside the artifacts: file digests, atomic JSON writes, versions, free disk space."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

_HEX64 = re.compile(r"^[0-9a-f]{64}$")
CHUNK = 8 << 20


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            h.update(block)
    return h.hexdigest()


def file_digest(path: str | os.PathLike, known: dict | None = None) -> dict:
    """{"size", "mtime_ns", "sha256"} of a file.

    The sha256 is reused from ``known`` (an earlier digest of the same path) when size and mtime
    match, and read from the name of a Hugging Face cache blob (``blobs/<sha256>``) when the file
    is a link to one, so re-runs do not re-read tens of gigabytes to find nothing changed.
    """
    p = Path(path)
    st = p.stat()
    digest = {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
    if known and known.get("size") == st.st_size and known.get("mtime_ns") == st.st_mtime_ns and known.get("sha256"):
        digest["sha256"] = known["sha256"]
        return digest
    if p.is_symlink():
        target = Path(os.path.realpath(p))
        if target.parent.name == "blobs" and _HEX64.match(target.name):
            digest["sha256"] = target.name
            return digest
    digest["sha256"] = sha256_file(p)
    return digest


_NOT_CONTENT = ("mtime_ns", "path")  # where and when a file is does not change what it holds


def _content(x):
    if isinstance(x, dict):
        return {k: _content(v) for k, v in sorted(x.items()) if k not in _NOT_CONTENT}
    if isinstance(x, list):
        return [_content(v) for v in x]
    return x


def same_content(a: dict | None, b: dict | None) -> bool:
    """Records equal in what matters (sizes, hashes, settings), not in mtimes or folder paths."""
    return a is not None and b is not None and _content(a) == _content(b)


def write_json_atomic(path: str | os.PathLike, data) -> None:
    """Write JSON to a temporary name in the same folder, fsync, rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.partial-", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2, sort_keys=False)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def read_json(path: str | os.PathLike) -> dict | None:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def free_bytes(path: str | os.PathLike) -> int:
    """Free bytes on the filesystem that holds ``path`` (its nearest existing parent)."""
    p = Path(path).absolute()
    while not p.exists():
        p = p.parent
    return shutil.disk_usage(p).free


def versions() -> dict[str, str]:
    """Versions of what shapes the artifacts."""
    from importlib import metadata

    out = {"python": sys.version.split()[0]}
    for dist in ("gptoss-toolchain", "torch", "transformers", "safetensors", "peft", "llama_cpp_python", "bitsandbytes",
                 "numpy"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (Linux ru_maxrss is in KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n} B"


def identity(record: dict) -> str:
    """sha256 of a record's content (mtimes and paths left out): names what an artifact was made from."""
    return hashlib.sha256(json.dumps(_content(record), sort_keys=True).encode()).hexdigest()
