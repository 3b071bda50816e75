"""Records beside the artifacts: file digests and content identities. The helpers re-exported here
live in gptoss (records: the atomic JSON writer; machine: versions, memory, disk; progress: sizes)."""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

from gptoss.machine import free_bytes, package_versions, peak_rss_bytes  # noqa: F401 (used as records.*)
from gptoss.progress import human_bytes as human  # noqa: F401
from gptoss.records import write_json_atomic  # noqa: F401

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


def read_json(path: str | os.PathLike) -> dict | None:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return None


EXPORT_PACKAGES = ("gptoss-toolchain", "torch", "transformers", "safetensors", "peft", "llama_cpp_python",
                   "bitsandbytes", "numpy")


def versions() -> dict[str, str]:
    """Versions of what shapes the artifacts (packages not installed left out)."""
    return {k: v for k, v in package_versions(EXPORT_PACKAGES).items() if v is not None}


def identity(record: dict) -> str:
    """sha256 of a record's content (mtimes and paths left out): names what an artifact was made from."""
    return hashlib.sha256(json.dumps(_content(record), sort_keys=True).encode()).hexdigest()
