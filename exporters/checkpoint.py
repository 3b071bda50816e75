"""Lazy, tensor-by-tensor reading of a base checkpoint, dequantized to plain floating point.

A base may be bf16/fp16/fp32 safetensors, OpenAI's MXFP4 release (experts as ``_blocks``/``_scales``)
or a bitsandbytes 4-bit save (``weight`` + ``weight.absmax``/``quant_map``/``quant_state.*``), in
transformers' fused layout or Unsloth's split one (per-expert Linears, ``router.linear``; see
gptoss/layouts.py). Either way the merge sees *logical* tensors of the fused layout: transformers'
parameter names and shapes (split experts stacked and transposed back, the router renamed), read
one at a time with ``safe_open`` so peak memory stays near the largest tensor.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Literal

from gptoss.exporters.errors import ExportStageError, MissingFilesError
from gptoss.hubid import is_hub_id
from gptoss import layouts

CONFIG = "config.json"
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
MXFP4_SUFFIXES = ("_blocks", "_scales")
BNB_COMPANIONS = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")
BNB_STATE_PREFIX = "quant_state.bitsandbytes__"
# Files that travel with the weights (tokenizer, chat template, generation defaults).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "chat_template.json")

QuantKind = Literal["none", "mxfp4", "bnb-4bit"]


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """One logical (dequantized) tensor and where its stored parts live."""

    name: str
    shape: tuple[int, ...]
    dtype: str  # safetensors dtype of the stored tensor ("BF16", ...); "MXFP4" / "BNB4" when quantized
    parts: dict[str, str]  # stored key -> shard file name
    source: str | None = None  # the stored key when it differs from ``name`` (a renamed tensor)
    # split layout: the per-expert tensors stacked (weights transposed) into this fused one
    members: tuple["TensorSpec", ...] = ()

    @property
    def quantized(self) -> bool:
        return self.dtype in ("MXFP4", "BNB4")

    @property
    def shard(self) -> str:
        return next(iter(self.parts.values()))


def resolve_model_dir(id_or_dir: str, *, revision: str | None = None, what: str = "--base") -> tuple[Path, str | None]:
    """A local checkpoint folder, or a Hugging Face id fetched (or found in the cache) via huggingface_hub.

    Returns the folder and the resolved commit (None for a local folder).
    """
    path = Path(id_or_dir).expanduser()
    if path.is_dir():
        return path.absolute(), None
    if not is_hub_id(id_or_dir):
        raise MissingFilesError(f"{what} {id_or_dir}: no such folder (and not a Hugging Face id 'owner/name')")
    try:
        from huggingface_hub import constants, snapshot_download

        # Offline, say so: given a commit, huggingface_hub 1.x still lists the repo tree (and fails)
        # instead of returning the cached snapshot.
        local = snapshot_download(
            id_or_dir, revision=revision, local_files_only=constants.HF_HUB_OFFLINE,
            allow_patterns=["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model"],
        )
    except Exception as e:  # hub errors come in many types; say which id failed and what to do
        raise MissingFilesError(
            f"{what} {id_or_dir}: not a local folder and could not be fetched from the Hugging Face Hub "
            f"({type(e).__name__}: {str(e).splitlines()[0][:200]}); download it first or pass a local folder"
        ) from e
    local_path = Path(local)
    return local_path, (local_path.name if len(local_path.name) == 40 else revision)  # snapshots/<commit>


def _bnb_state(raw: bytes) -> dict:
    return json.loads(raw.decode("utf-8"))


class BaseCheckpoint:
    """The tensors of a safetensors checkpoint folder, as logical float tensors."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        config_path = self.path / CONFIG
        if not config_path.is_file():
            raise MissingFilesError(f"{config_path} is missing: {self.path} is not a Hugging Face checkpoint folder")
        self.config: dict = json.loads(config_path.read_text())
        self.shards = self._shard_files()
        self._handles: dict[str, object] = {}
        self.tensors: dict[str, TensorSpec] = {}
        self._index()
        self.quant: QuantKind = (
            "mxfp4" if any(s.dtype == "MXFP4" for s in self.tensors.values())
            else "bnb-4bit" if any(s.dtype == "BNB4" for s in self.tensors.values())
            else "none"
        )

    # -- discovery ---------------------------------------------------------------------------
    def _shard_files(self) -> list[str]:
        index = self.path / INDEX
        if index.is_file():
            weight_map = json.loads(index.read_text()).get("weight_map", {})
            files = sorted(set(weight_map.values()))
            missing = [f for f in files if not (self.path / f).is_file()]
            if missing:
                raise MissingFilesError(f"{index} lists shards that are missing: {', '.join(missing)}")
            return files
        if (self.path / SINGLE).is_file():
            return [SINGLE]
        found = sorted(p.name for p in self.path.glob("*.safetensors"))
        if found:
            return found
        if list(self.path.glob("*.bin")) or list(self.path.glob("*.pth")):
            raise MissingFilesError(f"{self.path} holds pickled weights (*.bin/*.pth); re-save it with safetensors "
                                    "(model.save_pretrained(..., safe_serialization=True))")
        raise MissingFilesError(f"{self.path} has no *.safetensors weights (expected {SINGLE} or {INDEX})")

    def handle(self, shard: str):
        from safetensors import safe_open

        if shard not in self._handles:
            self._handles[shard] = safe_open(str(self.path / shard), framework="pt")
        return self._handles[shard]

    def release(self, shard: str) -> None:
        self._handles.pop(shard, None)

    def _index(self) -> None:
        raw: dict[str, tuple[str, tuple[int, ...], str]] = {}
        for shard in self.shards:
            h = self.handle(shard)
            for key in h.keys():
                sl = h.get_slice(key)
                raw[key] = (shard, tuple(sl.get_shape()), sl.get_dtype())
            self.release(shard)
        consumed: set[str] = set()
        for key, (shard, shape, dtype) in raw.items():
            if key.endswith("_blocks") and key[: -len("_blocks")] + "_scales" in raw:
                name = key[: -len("_blocks")]
                skey = name + "_scales"
                e, out, groups, nbytes = shape
                self.tensors[name] = TensorSpec(name, (e, groups * nbytes * 2, out), "MXFP4",
                                                {key: shard, skey: raw[skey][0]})
                consumed |= {key, skey}
        for key, (shard, shape, dtype) in raw.items():
            state_keys = [k for k in (f"{key}.{BNB_STATE_PREFIX}nf4", f"{key}.{BNB_STATE_PREFIX}fp4") if k in raw]
            if state_keys:
                state = _bnb_state(self.handle(raw[state_keys[0]][0]).get_tensor(state_keys[0]).numpy().tobytes())
                parts = {key: shard, state_keys[0]: raw[state_keys[0]][0]}
                for c in BNB_COMPANIONS:
                    if f"{key}.{c}" in raw:
                        parts[f"{key}.{c}"] = raw[f"{key}.{c}"][0]
                self.tensors[key] = TensorSpec(key, tuple(state["shape"]), "BNB4", parts)
                consumed |= set(parts)
            elif key.endswith(".SCB") or key.endswith(".weight_format"):
                raise ExportStageError(
                    f"{self.path}: {key} belongs to a bitsandbytes 8-bit checkpoint, which merge does not read; "
                    "use the bf16 (or MXFP4 / 4-bit) base the adapter was trained on"
                )
        for c in list(self._handles):
            self.release(c)
        for key, (shard, shape, dtype) in raw.items():
            if key not in consumed:
                self.tensors[key] = TensorSpec(key, shape, dtype, {key: shard})
        self.layout = layouts.SPLIT if any(layouts.SPLIT_EXPERT_TENSOR.match(n) for n in self.tensors) else layouts.FUSED
        if self.layout == layouts.SPLIT:
            self._fuse_split()

    def _fuse_split(self) -> None:
        """Present Unsloth's per-expert tensors and ``router.linear`` under transformers' fused names."""
        groups: dict[tuple[str, str], dict[int, TensorSpec]] = {}
        for name in list(self.tensors):
            m = layouts.SPLIT_EXPERT_TENSOR.match(name)
            if m:
                fused = f"{m['experts']}.{layouts.SPLIT_LISTS[m['list']]}"
                target = fused if m["leaf"] == "weight" else fused + "_bias"
                groups.setdefault((target, m["leaf"]), {})[int(m["index"])] = self.tensors.pop(name)
            elif r := layouts.ROUTER_LINEAR.match(name):
                spec = self.tensors.pop(name)
                new = f"{r['router']}.{r['leaf']}"
                self.tensors[new] = dataclasses.replace(spec, name=new, source=name)
        experts = self.config.get("num_local_experts")
        for (target, leaf), members in sorted(groups.items()):
            count = experts or max(members) + 1
            missing = [i for i in range(count) if i not in members]
            if missing or max(members) >= count:
                listed = ", ".join(layouts.split_tensor_name(target.removesuffix("_bias"), i, leaf) for i in missing[:4])
                raise MissingFilesError(
                    f"{self.path}: split experts of {target} are incomplete (config num_local_experts={experts}; "
                    f"found {sorted(members)[:8]}...; missing {listed or 'none'}); the checkpoint is damaged or partial"
                )
            first = members[0]
            shapes = {m.shape for m in members.values()}
            if len(shapes) != 1:
                raise ExportStageError(f"{self.path}: experts of {target} differ in shape ({sorted(shapes)})")
            shape = (count, first.shape[1], first.shape[0]) if leaf == "weight" else (count, *first.shape)
            ordered = tuple(members[i] for i in range(count))
            parts = {k: v for m in ordered for k, v in m.parts.items()}
            self.tensors[target] = TensorSpec(target, shape, first.dtype, parts, members=ordered)

    # -- reading -----------------------------------------------------------------------------
    def load(self, name: str):
        """The logical tensor, dequantized (MXFP4/4-bit -> bf16); other tensors as stored."""
        return self._load_spec(self.tensors[name])

    def _load_spec(self, spec: TensorSpec):
        import torch

        name = spec.name
        if spec.members:  # split experts: Linear weights (out, in) -> fused (E, in, out); biases stacked
            return torch.stack([t.T if t.dim() == 2 else t for t in map(self._load_spec, spec.members)])
        if spec.source:
            return self.handle(spec.shard).get_tensor(spec.source)
        if spec.dtype == "MXFP4":
            from gptoss import mxfp4

            blocks = self.handle(spec.parts[name + "_blocks"]).get_tensor(name + "_blocks")
            scales = self.handle(spec.parts[name + "_scales"]).get_tensor(name + "_scales")
            return mxfp4.dequantize(blocks, scales, dtype=torch.bfloat16)
        if spec.dtype == "BNB4":
            return self._dequant_bnb(spec)
        return self.handle(spec.shard).get_tensor(name)

    def _dequant_bnb(self, spec: TensorSpec):
        try:
            import bitsandbytes.functional as bnbf
        except ImportError as e:
            raise ExportStageError(
                f"{self.path} is a bitsandbytes 4-bit checkpoint ({spec.name}); dequantizing it needs "
                "bitsandbytes: pip install bitsandbytes (or merge into the bf16 base the 4-bit one was made from)"
            ) from e
        parts = {k[len(spec.name) + 1:]: self.handle(shard).get_tensor(k)
                 for k, shard in spec.parts.items() if k != spec.name}
        state = bnbf.QuantState.from_dict(parts, device="cpu")
        packed = self.handle(spec.parts[spec.name]).get_tensor(spec.name)
        return bnbf.dequantize_4bit(packed, state)

    def close(self) -> None:
        self._handles.clear()

    def tensors_by_shard(self) -> list[tuple[str, list[TensorSpec]]]:
        """Logical tensors grouped by the shard of their first stored part, shard order kept."""
        groups: dict[str, list[TensorSpec]] = {s: [] for s in self.shards}
        for spec in self.tensors.values():
            groups[spec.shard].append(spec)
        return [(s, sorted(v, key=lambda t: t.name)) for s, v in groups.items() if v]
