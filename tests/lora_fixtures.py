"""Inputs for testing and benchmarking merge/export without a training run.

- ``make_run``: a seeded random LoRA adapter (attention q/k/v/o + fused experts through PEFT's
  ``target_parameters``) saved with PEFT, as a run folder ``<run>/adapter`` + ``training_info.json``.
  B matrices are random (PEFT initialises them to zero), so merging changes the model.
- ``write_mxfp4_copy``: the same checkpoint with experts stored as OpenAI's MXFP4 release does.
- ``write_bnb4_copy``: the same checkpoint saved by transformers with bitsandbytes 4-bit (needs bitsandbytes).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from gptoss.records import TrainingInfo

ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def lora_config(r: int = 4, alpha: int = 8, *, experts: bool = True):
    from peft import LoraConfig

    return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=list(ATTENTION),
                      target_parameters=list(EXPERTS) if experts else None)


def make_run(base_dir: str | Path, run_dir: str | Path, *, r: int = 4, alpha: int = 8, seed: int = 0,
             b_std: float = 0.05, experts: bool = True, base_model: str | None = None) -> Path:
    """Write ``run_dir/adapter`` (PEFT save + tokenizer) and ``run_dir/training_info.json``."""
    import torch
    from transformers import AutoModelForCausalLM

    run_dir = Path(run_dir)
    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.bfloat16)
    save_random_adapter(model, lora_config(r, alpha, experts=experts), base_dir, run_dir, seed=seed, b_std=b_std)
    TrainingInfo(
        run=run_dir.name,
        base_model=base_model or str(Path(base_dir).absolute()),
        base_model_revision=None,
        backend="fixture",
        note="seeded random LoRA from tests/lora_fixtures.py make_run (not trained)",
        lora={"r": r, "lora_alpha": alpha, "target_modules": ATTENTION, "target_parameters": EXPERTS if experts else []},
    ).write(run_dir)
    return run_dir


def save_random_adapter(model, config, base_dir: str | Path, run_dir: Path, *, seed: int, b_std: float) -> None:
    """``model`` wrapped with PEFT ``config``, its B matrices random (PEFT starts them at zero), saved with the
    base's tokenizer as ``run_dir/adapter``."""
    import torch
    from peft import get_peft_model
    from transformers import AutoTokenizer

    torch.manual_seed(seed)
    peft_model = get_peft_model(model, config)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=gen) * b_std)
    adapter_dir = Path(run_dir) / "adapter"
    peft_model.save_pretrained(str(adapter_dir))
    AutoTokenizer.from_pretrained(str(base_dir)).save_pretrained(str(adapter_dir))


def _copy_side_files(src: Path, dst: Path) -> None:
    for p in src.iterdir():
        if p.is_file() and not p.name.endswith(".safetensors") and p.name != "model.safetensors.index.json":
            shutil.copyfile(p, dst / p.name)


def write_mxfp4_copy(src: str | Path, dst: str | Path) -> Path:
    """Copy of a bf16 gpt-oss checkpoint with expert weights as MXFP4 ``_blocks``/``_scales`` (one shard)."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    from gptoss import mxfp4

    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for shard in sorted(src.glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as f:
            for key in f.keys():
                t = f.get_tensor(key)
                if key.endswith(("mlp.experts.gate_up_proj", "mlp.experts.down_proj")):
                    blocks, scales = mxfp4.quantize(t)
                    tensors[key + "_blocks"], tensors[key + "_scales"] = blocks, scales
                else:
                    tensors[key] = t
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    _copy_side_files(src, dst)
    config = json.loads((dst / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "mxfp4",
        "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"],
    }
    (dst / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    del torch
    return dst


def write_bnb4_copy(src: str | Path, dst: str | Path) -> Path:
    """The checkpoint loaded and saved by transformers with bitsandbytes NF4 (double quant), as QLoRA bases are."""
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(str(src), quantization_config=q, device_map="cpu")
    model.save_pretrained(str(dst))
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (Path(src) / name).is_file():
            shutil.copyfile(Path(src) / name, Path(dst) / name)
    return Path(dst)
