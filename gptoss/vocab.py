"""The gpt-oss vocabulary, offline: o200k_base from the bpe-openai wheel plus the Harmony specials.

openai-harmony and tiktoken look for ``o200k_base.tiktoken`` in ``TIKTOKEN_ENCODINGS_BASE``; we
decompress the copy shipped in bpe-openai there once, after checking its sha256.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import os
import tempfile
from pathlib import Path

from gptoss.errors import ToolchainError

O200K_SHA256 = "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"
O200K_FILENAME = "o200k_base.tiktoken"
# gpt-oss: 199998 BPE ranks, then 1090 Harmony specials (199998..201087); vocab_size 201088.
N_BPE_TOKENS = 199_998
VOCAB_SIZE = 201_088
# tiktoken's o200k_base split pattern (tiktoken_ext.openai_public.o200k_base).
O200K_PATTERN = "|".join(
    [
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""\p{N}{1,3}""",
        r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
        r"""\s*[\r\n]+""",
        r"""\s+(?!\S)""",
        r"""\s+""",
    ]
)


class VocabularyError(ToolchainError):
    """The o200k_base vocabulary is missing or is not the file gpt-oss was trained with."""


def packaged_vocab_path() -> Path:
    """Where bpe-openai ships the gzipped o200k_base vocabulary (override: GPTOSS_O200K_GZ)."""
    override = os.environ.get("GPTOSS_O200K_GZ")
    if override:
        return Path(override)
    try:
        import bpe_openai
    except ImportError as e:  # pragma: no cover - it is a core dependency
        raise VocabularyError("bpe-openai is not installed: pip install bpe-openai") from e
    return Path(bpe_openai.__file__).parent / "data" / f"{O200K_FILENAME}.gz"


def _cache_dir() -> Path:
    base = os.environ.get("GPTOSS_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "gptoss"
    )
    return Path(base) / "tiktoken"


def _read_checked(gz_path: Path) -> bytes:
    if not gz_path.is_file():
        raise VocabularyError(
            f"o200k_base vocabulary not found at {gz_path}; reinstall bpe-openai "
            "(pip install --force-reinstall bpe-openai) or point GPTOSS_O200K_GZ at a good copy"
        )
    try:
        data = gzip.decompress(gz_path.read_bytes())
    except (OSError, EOFError) as e:
        raise VocabularyError(f"o200k_base vocabulary at {gz_path} is not a readable gzip file: {e}") from e
    got = hashlib.sha256(data).hexdigest()
    if got != O200K_SHA256:
        raise VocabularyError(
            f"o200k_base vocabulary at {gz_path} has sha256 {got} after decompression, "
            f"expected {O200K_SHA256}; reinstall bpe-openai"
        )
    return data


@functools.lru_cache(maxsize=None)
def tiktoken_dir() -> Path:
    """A folder holding the verified ``o200k_base.tiktoken``; also exported as TIKTOKEN_ENCODINGS_BASE."""
    gz_path = packaged_vocab_path()
    out_dir = _cache_dir() / O200K_SHA256[:16]
    target = out_dir / O200K_FILENAME
    data = _read_checked(gz_path)  # always checked: a cached good copy must not hide a bad source
    if not (target.is_file() and target.stat().st_size == len(data)):
        out_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out_dir, delete=False) as tmp:
            tmp.write(data)
        os.replace(tmp.name, target)
    os.environ["TIKTOKEN_ENCODINGS_BASE"] = str(out_dir)
    return out_dir


def o200k_path() -> Path:
    return tiktoken_dir() / O200K_FILENAME
