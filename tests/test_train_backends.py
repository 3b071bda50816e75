"""Backends: importable without torch or a GPU; expert targeting and the trainable-count groups
for both expert layouts (fused 3-D parameters, Unsloth's per-expert modules)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from gptoss.training import backends as B


def test_cli_and_backends_import_without_torch_or_unsloth():
    code = ("import sys, gptoss.cli, gptoss.training.backends as b; "
            "assert set(b.BACKENDS) == {'transformers', 'unsloth'}; "
            "print(sorted(m for m in ('torch', 'transformers', 'peft', 'unsloth') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).parents[1], env={"PYTHONPATH": str(Path(__file__).parents[1]), "PATH": ""})
    assert out.stdout.strip() == "[]"


def test_unsloth_needs_cuda():
    assert "CUDA only" in B.get_backend("unsloth").problem("cpu")
    with pytest.raises(B.BackendError, match="unknown backend 'jax'; known backends: transformers, unsloth"):
        B.get_backend("jax")


def _split_layout_model(n_experts=3, hidden=16, inter=8):
    """The module layout of Unsloth's 4-bit gpt-oss (per-expert Linear modules), in plain torch."""
    import torch.nn as nn

    class Experts(nn.Module):
        def __init__(self):
            super().__init__()
            self.gate_up_projs = nn.ModuleList(nn.Linear(hidden, 2 * inter) for _ in range(n_experts))
            self.down_projs = nn.ModuleList(nn.Linear(inter, hidden) for _ in range(n_experts))

    class Layer(nn.Module):
        def __init__(self):
            super().__init__()
            self.self_attn = nn.Module()
            for name in B.ATTENTION_MODULES:
                setattr(self.self_attn, name, nn.Linear(hidden, hidden))
            self.mlp = nn.Module()
            self.mlp.experts = Experts()

    model = nn.Module()
    model.layers = nn.ModuleList([Layer(), Layer()])
    return model


def test_split_expert_layout_targets_and_groups():
    from peft import LoraConfig, get_peft_model

    model = _split_layout_model()
    assert B.expert_layout(model) == "split"
    modules, parameters = B.lora_targets(model, SimpleNamespace(lora_targets="all", model="toy"))
    assert parameters == []
    assert modules == list(B.ATTENTION_MODULES) + [f"down_projs.{i}" for i in range(3)] + [f"gate_up_projs.{i}" for i in range(3)]
    wrapped = get_peft_model(model, LoraConfig(r=2, target_modules=modules))
    groups = B.lora_groups(wrapped)
    assert set(groups) == {"attention", "experts.gate_up_proj", "experts.down_proj"}
    assert groups["experts.gate_up_proj"]["parameters"] == 2 * 3 * 2 * (16 + 16)  # layers x experts x r x (in + out)
    assert groups["experts.down_proj"]["parameters"] == 2 * 3 * 2 * (8 + 16)
    assert groups["attention"]["parameters"] == 2 * 4 * 2 * (16 + 16)
    B.check_expert_lora(groups, SimpleNamespace(lora_targets="all"))


def test_wrapping_that_left_the_experts_frozen_is_an_error():
    """The failure Unsloth/Axolotl users hit silently: LoRA on attention only (e.g. gate/up/down names
    that match nothing in gpt-oss's fused experts). Here a wrap of the split layout that missed them."""
    from peft import LoraConfig, get_peft_model

    wrapped = get_peft_model(_split_layout_model(), LoraConfig(r=2, target_modules=list(B.ATTENTION_MODULES)))
    groups = B.lora_groups(wrapped)
    assert groups["attention"]["parameters"] > 0 and "experts.down_proj" not in groups
    with pytest.raises(B.BackendError, match=r"LoRA did not reach the MoE experts \(experts.gate_up_proj, experts.down_proj"):
        B.check_expert_lora(groups, SimpleNamespace(lora_targets="all"))
    B.check_expert_lora(groups, SimpleNamespace(lora_targets="attention"))  # asked for: fine


def test_no_expert_weights_is_an_error_unless_attention_only():
    import torch.nn as nn

    model = nn.Module()
    model.q_proj = nn.Linear(4, 4)
    with pytest.raises(B.BackendError, match="found no MoE expert weights"):
        B.lora_targets(model, SimpleNamespace(lora_targets="all", model="toy"))
    assert B.lora_targets(model, SimpleNamespace(lora_targets="attention", model="toy")) == (list(B.ATTENTION_MODULES), [])
