"""Unsloth's split gpt-oss module tree in plain torch, and adapters trained on it, for CPU tests.

Unsloth (CUDA only) replaces each layer's fused experts with ``GptOssExpertsBnb4bit``: one
``nn.Linear`` (out, in) per expert in ``gate_up_projs`` / ``down_projs``, gate/up interleaved in the
output rows as in the fused tensor, and the router with ``GptOssTopKRouter`` holding ``.linear``
(unsloth_zoo 2026.10.7, temporary_patches/gpt_oss.py). Unsloth cannot run here, so this tree stands
in for it: the same module names (so PEFT saves the same adapter keys) and the forward of
transformers' GptOssExperts / GptOssTopKRouter, computed per expert Linear.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
# PEFT target_modules as a regex: attention and every per-expert Linear (what Unsloth's
# get_peft_model resolves gate_proj/up_proj/down_proj to on this layout).
SPLIT_TARGETS = r".*\.(self_attn\.(q_proj|k_proj|v_proj|o_proj)|mlp\.experts\.(gate_up_projs|down_projs)\.\d+)"


class SplitExperts(nn.Module):
    def __init__(self, fused):
        super().__init__()
        experts, hidden, two_i = fused.gate_up_proj.shape
        self.alpha, self.limit, self.num_experts = fused.alpha, fused.limit, experts
        self.gate_up_projs = nn.ModuleList(nn.Linear(hidden, two_i) for _ in range(experts))
        self.down_projs = nn.ModuleList(nn.Linear(two_i // 2, hidden) for _ in range(experts))
        with torch.no_grad():
            for i in range(experts):
                self.gate_up_projs[i].weight.copy_(fused.gate_up_proj[i].T)
                self.gate_up_projs[i].bias.copy_(fused.gate_up_proj_bias[i])
                self.down_projs[i].weight.copy_(fused.down_proj[i].T)
                self.down_projs[i].bias.copy_(fused.down_proj_bias[i])

    def forward(self, hidden_states, router_indices=None, routing_weights=None):
        out = torch.zeros_like(hidden_states)
        for e in range(self.num_experts):
            token_idx, top_k_pos = torch.where(router_indices == e)
            if token_idx.numel() == 0:
                continue
            gate_up = self.gate_up_projs[e](hidden_states[token_idx])
            gate, up = gate_up[..., ::2], gate_up[..., 1::2]
            gate = gate.clamp(max=self.limit)
            up = up.clamp(min=-self.limit, max=self.limit)
            y = self.down_projs[e]((up + 1) * (gate * torch.sigmoid(gate * self.alpha)))
            out.index_add_(0, token_idx, y * routing_weights[token_idx, top_k_pos, None])
        return out


class SplitRouter(nn.Module):
    def __init__(self, fused):
        super().__init__()
        self.top_k = fused.top_k
        self.linear = nn.Linear(fused.weight.shape[1], fused.weight.shape[0])
        with torch.no_grad():
            self.linear.weight.copy_(fused.weight)
            self.linear.bias.copy_(fused.bias)

    def forward(self, hidden_states):
        logits = self.linear(hidden_states)
        top, idx = torch.topk(logits, self.top_k, dim=-1)
        return logits, F.softmax(top, dim=1, dtype=top.dtype), idx


def split_model(base_dir: str | Path, dtype=torch.float32):
    """The fused checkpoint loaded by transformers, its MoE blocks rebuilt in Unsloth's split tree."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=dtype)
    for layer in model.model.layers:
        layer.mlp.experts = SplitExperts(layer.mlp.experts)
        layer.mlp.router = SplitRouter(layer.mlp.router)
    return model.eval()


def make_split_run(base_dir: str | Path, run_dir: str | Path, *, trained_on: str | Path, r: int = 4,
                   alpha: int = 8, seed: int = 0, b_std: float = 0.05) -> Path:
    """``run_dir/adapter``: PEFT LoRA on the split tree (attention + every expert Linear), random B,
    saved as PEFT saves it, and training_info.json with the base fields `gptoss train` records."""
    from lora_fixtures import save_random_adapter
    from peft import LoraConfig

    from gptoss.records import DataInfo, TrainingInfo
    from gptoss.training.run import base_fields

    run_dir = Path(run_dir)
    save_random_adapter(split_model(base_dir), LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=SPLIT_TARGETS),
                        base_dir, run_dir, seed=seed, b_std=b_std)
    data = Path(__file__).resolve().parent / "data" / "train_tiny.jsonl"
    TrainingInfo(run=run_dir.name, backend="unsloth-stand-in (tests/unsloth_split.py)",
                 note="seeded random LoRA on the split tree (not trained)", **base_fields(str(trained_on), None),
                 dataset=DataInfo(path=str(data), content_sha256=hashlib.sha256(data.read_bytes()).hexdigest())).write(run_dir)
    return run_dir


def split_logits(base_dir: str | Path, ids: list[int], adapter: str | Path | None = None):
    """float32 logits of the split tree (+ the adapter through PEFT's own forward)."""
    model = split_model(base_dir)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter)).eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]
