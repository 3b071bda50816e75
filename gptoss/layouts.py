"""The checkpoint layouts gpt-oss comes in, by name: one place for their tensor names.

- ``fused``: transformers' ``GptOssForCausalLM``. Each layer's experts are 3-D parameters
  ``mlp.experts.gate_up_proj`` (E, H, 2I; gate/up interleaved ``::2`` / ``1::2``) and
  ``mlp.experts.down_proj`` (E, I, H), biases ``*_bias`` (E, out); router ``mlp.router.weight/bias``.
  Stored in bf16 (the 16-bit originals) or, experts only, as MXFP4 ``_blocks``/``_scales`` (OpenAI's release).
- ``split``: Unsloth's bnb-4bit checkpoint (``unsloth/gpt-oss-20b-unsloth-bnb-4bit``). One ``nn.Linear``
  per expert, ``mlp.experts.gate_up_projs.<i>`` (weight (2I, H), the transpose of ``gate_up_proj[i]``,
  gate/up still interleaved in its rows) and ``mlp.experts.down_projs.<i>`` (weight (H, I)), each with
  ``.bias``; the router is ``mlp.router.linear.{weight,bias}``. Linear weights are bitsandbytes NF4 saves
  (unsloth_zoo 2026.10.7 ``temporary_patches/gpt_oss.py``: ``GptOssExpertsBnb4bit``, ``GptOssTopKRouter``).
  PEFT adapters trained on it hold one 2-D LoRA pair per expert module.

Importing this module needs neither torch nor safetensors.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

FUSED, SPLIT = "fused", "split"
EXPERT_PARAMETERS = ("gate_up_proj", "down_proj")
# split module list name -> fused parameter name
SPLIT_LISTS = {"gate_up_projs": "gate_up_proj", "down_projs": "down_proj"}
SPLIT_EXPERT_MODULE = re.compile(r"^(?P<experts>.*\.experts)\.(?P<list>gate_up_projs|down_projs)\.(?P<index>\d+)$")
SPLIT_EXPERT_TENSOR = re.compile(
    r"^(?P<experts>.*\.experts)\.(?P<list>gate_up_projs|down_projs)\.(?P<index>\d+)\.(?P<leaf>weight|bias)$"
)
ROUTER_LINEAR = re.compile(r"^(?P<router>.*\.mlp\.router)\.linear\.(?P<leaf>weight|bias)$")

# Layouts `gptoss fixture --layouts` writes beside the bf16 original; the folder suffix is the name.
FIXTURE_LAYOUTS = ("mxfp4", "unsloth-bnb-4bit")

# 4-bit checkpoints a LoRA is trained on -> the 16-bit original a merge should fold it into.
# unsloth/gpt-oss-20b-BF16 is Unsloth's bf16 upload of openai/gpt-oss-20b (same tensors, fused layout).
SIXTEEN_BIT_ORIGINALS = {
    "unsloth/gpt-oss-20b-unsloth-bnb-4bit": "unsloth/gpt-oss-20b-BF16",
    "unsloth/gpt-oss-20b-bnb-4bit": "unsloth/gpt-oss-20b-BF16",
    "unsloth/gpt-oss-120b-unsloth-bnb-4bit": "unsloth/gpt-oss-120b-BF16",
}


def fused_name(split_module: str) -> tuple[str, int] | None:
    """``...experts.gate_up_projs.3`` -> (``...experts.gate_up_proj``, 3); None for other modules."""
    m = SPLIT_EXPERT_MODULE.match(split_module)
    if not m:
        return None
    return f"{m['experts']}.{SPLIT_LISTS[m['list']]}", int(m["index"])


def split_tensor_name(fused_param: str, index: int, leaf: str) -> str:
    """(``...experts.gate_up_proj``, 3, "weight") -> ``...experts.gate_up_projs.3.weight``."""
    experts, _, param = fused_param.rpartition(".")
    lists = {v: k for k, v in SPLIT_LISTS.items()}
    return f"{experts}.{lists[param]}.{index}.{leaf}"


def _stored_keys(path: Path) -> list[str]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        return list(json.loads(index.read_text()).get("weight_map", {}))
    keys: list[str] = []
    for shard in sorted(path.glob("*.safetensors")):
        with open(shard, "rb") as f:  # the safetensors header: 8-byte length, then JSON
            size = int.from_bytes(f.read(8), "little")
            keys += [k for k in json.loads(f.read(size)) if k != "__metadata__"]
    return keys


def describe(path: str | Path) -> dict:
    """Layout and quantization of a local checkpoint folder, from config.json and tensor names alone.

    Returns {"layout": "fused"|"split"|"unknown", "quantization": "none"|"mxfp4"|"bnb-4bit"|...}.
    """
    path = Path(path)
    config = json.loads((path / "config.json").read_text()) if (path / "config.json").is_file() else {}
    keys = _stored_keys(path)
    if any(SPLIT_EXPERT_TENSOR.match(k) for k in keys):
        layout = SPLIT
    elif any(k.rsplit(".", 1)[-1].startswith(EXPERT_PARAMETERS) and ".mlp.experts." in k for k in keys):
        layout = FUSED
    else:
        layout = "unknown"
    qc = config.get("quantization_config") or {}
    method = qc.get("quant_method")
    if method == "bitsandbytes":
        quant = "bnb-4bit" if qc.get("load_in_4bit") or qc.get("_load_in_4bit") else "bnb-8bit"
    elif method:
        quant = str(method)
    else:
        quant = "mxfp4" if any(k.endswith("_blocks") for k in keys) else "none"
    return {"layout": layout, "quantization": quant}


def sixteen_bit_original(base: str, base_dir: str | Path | None = None) -> str | None:
    """The 16-bit original of a 4-bit base: a known Hub id, or what a fixture's record names."""
    if base in SIXTEEN_BIT_ORIGINALS:
        return SIXTEEN_BIT_ORIGINALS[base]
    record = Path(base_dir or base) / "fixture.json"
    if record.is_file():
        original = json.loads(record.read_text()).get("original")
        if original:
            return str((record.parent / original).resolve())
    return None
