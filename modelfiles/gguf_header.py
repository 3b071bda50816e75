"""Read the key/value metadata at the head of a GGUF file, without reading its tensors.

A GGUF file starts with the magic ``GGUF``, a version (2 or 3), the tensor and key/value counts,
the key/value pairs, then the tensor table. Only that head is read, so a 13 GB GGUF costs a few
kilobytes. The one GGUF header reader: the Modelfiles stage, export's inspection and publish use it. The
names below mirror gguf-py's ``constants.py`` (tests/test_modelfile.py checks they agree).
"""

from __future__ import annotations

import dataclasses
import struct
from collections.abc import Iterable
from pathlib import Path
from typing import Any, BinaryIO

from gptoss.errors import ToolchainError

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32  # gguf-py GGUF_DEFAULT_ALIGNMENT


class Keys:
    """GGUF metadata keys (gguf-py ``Keys``)."""

    ARCHITECTURE = "general.architecture"
    ALIGNMENT = "general.alignment"
    NAME = "general.name"
    CONTEXT_LENGTH = "{arch}.context_length"


# GGUF_ARCH of gpt-oss as llama.cpp's converter writes it (gguf-py MODEL_ARCH_NAMES[GPT_OSS]).
GPT_OSS_ARCH = "gpt-oss"

# GGUFValueType -> struct format of scalar values.
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
_MAX_STRING = 1 << 24  # a metadata string longer than 16 MiB means a corrupt length


class GGUFHeaderError(ToolchainError):
    """The file is missing, not a GGUF, or its header cannot be read."""


class _Truncated(Exception):
    pass


def _read(f: BinaryIO, n: int) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise _Truncated
    return data


def _unpack(f: BinaryIO, fmt: str):
    return struct.unpack(fmt, _read(f, struct.calcsize(fmt)))[0]


def _string(f: BinaryIO) -> str:
    n = _unpack(f, "<Q")
    if n > _MAX_STRING:
        raise ValueError(f"a metadata string claims {n} bytes")
    return _read(f, n).decode("utf-8", errors="replace")


def _value(f: BinaryIO, vtype: int, keep: bool) -> Any:
    if vtype in _SCALARS:
        return _unpack(f, _SCALARS[vtype])
    if vtype == _STRING:
        return _string(f)
    if vtype == _ARRAY:
        itype, count = _unpack(f, "<I"), _unpack(f, "<Q")
        if itype in _SCALARS and not keep:  # skip fixed-size arrays without decoding them
            f.seek(struct.calcsize(_SCALARS[itype]) * count, 1)
            return None
        items = [_value(f, itype, keep) for _ in range(count)]
        return items if keep else None
    raise ValueError(f"unknown metadata value type {vtype}")


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    name: str
    dims: list[int]  # GGUF order: ne0 (contiguous) first
    type_id: int  # GGMLQuantizationType value
    offset: int  # byte offset of the data from data_start


@dataclasses.dataclass(frozen=True)
class Header:
    version: int
    metadata: dict[str, Any]  # the keys asked for (all when none were named)
    tensors: list[TensorInfo]
    data_start: int  # absolute offset of the tensor data (after alignment)


def is_gguf(path: str | Path) -> bool:
    """The file starts with the GGUF magic."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == GGUF_MAGIC
    except OSError:
        return False


def read_metadata(path: str | Path, keys: Iterable[str] | None = None) -> dict[str, Any]:
    """Metadata of the GGUF at ``path``: the given keys (stops once all are found), or all of them.

    Raises GGUFHeaderError naming the file when it is missing, unreadable or not a GGUF.
    """
    return _parse(path, keys, tensors=False).metadata


def read_header(path: str | Path, keys: Iterable[str] | None = None) -> Header:
    """The whole head of a GGUF: the metadata ``keys`` (all when None), the tensor table and where the
    data starts. Only the head is read."""
    return _parse(path, keys, tensors=True)


def _parse(path: str | Path, keys: Iterable[str] | None, *, tensors: bool) -> Header:
    path = Path(path)
    wanted = set(keys) if keys is not None else None
    hint = "pass the path of a .gguf file written by `gptoss export` or llama.cpp's convert_hf_to_gguf.py"
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        raise GGUFHeaderError(f"{path}: no such file; {hint}") from None
    except IsADirectoryError:
        raise GGUFHeaderError(f"{path} is a directory; {hint}") from None
    except OSError as e:
        raise GGUFHeaderError(f"{path}: cannot open ({e.strerror}); check the path and its permissions") from None
    with f:
        try:
            magic = f.read(4)
            if magic != GGUF_MAGIC:
                raise GGUFHeaderError(f"{path} is not a GGUF file (starts with {magic!r}, not b'GGUF'); {hint}")
            version = _unpack(f, "<I")
            if version not in SUPPORTED_VERSIONS:
                raise GGUFHeaderError(
                    f"{path}: GGUF version {version} is not supported (only {' and '.join(map(str, SUPPORTED_VERSIONS))},"
                    " little-endian); re-convert it with a current llama.cpp"
                )
            tensor_count, kv_count = _unpack(f, "<Q"), _unpack(f, "<Q")
            out: dict[str, Any] = {}
            alignment = DEFAULT_ALIGNMENT
            for _ in range(kv_count):
                key = _string(f)
                vtype = _unpack(f, "<I")
                keep = wanted is None or key in wanted or (tensors and key == Keys.ALIGNMENT)
                value = _value(f, vtype, keep)
                if key == Keys.ALIGNMENT and isinstance(value, int):
                    alignment = value
                if keep and (wanted is None or key in wanted):
                    out[key] = value
                    if not tensors and wanted is not None and wanted <= out.keys():
                        break
            infos: list[TensorInfo] = []
            if tensors:
                for _ in range(tensor_count):
                    name = _string(f)
                    n_dims = _unpack(f, "<I")
                    dims = [_unpack(f, "<Q") for _ in range(n_dims)]
                    infos.append(TensorInfo(name, dims, _unpack(f, "<I"), _unpack(f, "<Q")))
            here = f.tell()
            return Header(version, out, infos, here + (-here % alignment))
        except _Truncated:
            raise GGUFHeaderError(f"{path}: the GGUF header is truncated; the file is incomplete, copy or export it again") from None
        except (ValueError, UnicodeDecodeError, OverflowError, OSError) as e:
            raise GGUFHeaderError(f"{path}: the GGUF header is corrupt ({e}); copy or export it again") from None


def architecture(path: str | Path) -> tuple[str | None, int | None]:
    """(general.architecture, its context length) of a GGUF; either may be None when absent."""
    meta = read_metadata(path, [Keys.ARCHITECTURE])
    arch = meta.get(Keys.ARCHITECTURE)
    if not isinstance(arch, str):
        return None, None
    ctx_key = Keys.CONTEXT_LENGTH.format(arch=arch)
    ctx = read_metadata(path, [ctx_key]).get(ctx_key)
    return arch, ctx if isinstance(ctx, int) else None
