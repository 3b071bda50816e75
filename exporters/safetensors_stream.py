"""Write safetensors shards one tensor at a time.

The header (names, dtypes, shapes, offsets) is known before any data is computed, so it is written
first and each tensor's bytes are appended as soon as it is ready: peak memory is one tensor, not
one shard. The format is the documented one (8-byte little-endian header size, JSON header padded
with spaces to 8 bytes, then the raw little-endian data); files load with safetensors' own reader.
"""

from __future__ import annotations

import dataclasses
import json
import struct
from pathlib import Path
from typing import BinaryIO

DTYPE_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
_TORCH_NAMES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
                "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}


def torch_dtype(st_dtype: str):
    import torch

    return getattr(torch, _TORCH_NAMES[st_dtype])


def st_dtype(torch_dtype_) -> str:
    name = str(torch_dtype_).removeprefix("torch.")
    for k, v in _TORCH_NAMES.items():
        if v == name:
            return k
    raise ValueError(f"no safetensors dtype for {torch_dtype_}")


@dataclasses.dataclass(frozen=True)
class Entry:
    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = DTYPE_SIZES[self.dtype]
        for d in self.shape:
            n *= d
        return n


def plan_shards(entries: list[Entry], max_shard_bytes: int) -> list[list[Entry]]:
    """Greedy split in the given order; a tensor larger than the limit gets a shard of its own."""
    shards: list[list[Entry]] = [[]]
    size = 0
    for e in entries:
        if shards[-1] and size + e.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += e.nbytes
    return [s for s in shards if s]


class ShardWriter:
    """Append-only writer for one shard whose tensor list is fixed up front."""

    def __init__(self, path: Path, entries: list[Entry], metadata: dict[str, str] | None = None):
        self.path = Path(path)
        self.entries = {e.name: e for e in entries}
        self.order = [e.name for e in entries]
        header: dict = {}
        offset = 0
        for e in entries:
            header[e.name] = {"dtype": e.dtype, "shape": list(e.shape), "data_offsets": [offset, offset + e.nbytes]}
            offset += e.nbytes
        if metadata:
            header["__metadata__"] = metadata
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self._f: BinaryIO = open(self.path, "wb")
        self._f.write(struct.pack("<Q", len(raw)))
        self._f.write(raw)
        self._next = 0

    def write(self, name: str, tensor) -> None:
        """Append ``tensor`` (must be the next one in order, with the planned dtype and shape)."""
        expected = self.order[self._next] if self._next < len(self.order) else None
        if name != expected:
            raise RuntimeError(f"{self.path.name}: wrote {name!r}, expected {expected!r}")
        e = self.entries[name]
        if st_dtype(tensor.dtype) != e.dtype or tuple(tensor.shape) != e.shape:
            raise RuntimeError(f"{name}: got {tensor.dtype} {tuple(tensor.shape)}, planned {e.dtype} {e.shape}")
        import torch

        if tensor.numel():
            # raw bytes through a uint8 view (numpy has no bfloat16); torch is little-endian here
            self._f.write(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)
        self._next += 1

    def close(self) -> None:
        if self._next != len(self.order):
            self._f.close()
            raise RuntimeError(f"{self.path.name}: {len(self.order) - self._next} tensors were not written")
        self._f.flush()
        self._f.close()

    def abort(self) -> None:
        self._f.close()
