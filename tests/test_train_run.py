"""`gptoss train` end to end on the tiny fixture, on CPU: the run layout, memorising a small set,
LoRA that really reaches (and changes) the MoE experts."""

from __future__ import annotations

import json
import os
import re

import pytest
from _train_support import FAST, TRAIN_JSONL, cli, memorisable_model  # noqa: F401  (fixture)


@pytest.fixture(scope="module")
def quick_run(tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("quick") / "models"
    args = ["train", "--profile", "quick_test", "--model", tiny_model, "--dataset", TRAIN_JSONL, "--max-steps", "5",
            "--output-dir", out, "--save-steps", "2", "--keep-checkpoints", "2", "--eval-fraction", "0.25", *FAST]
    assert cli(*args) == 0
    return out


def test_quick_test_writes_the_run_layout(quick_run, tiny_model):
    out = quick_run
    runs = [p for p in out.iterdir() if p.name != "latest"]
    assert len(runs) == 1 and not runs[0].name.endswith(".partial")
    run = runs[0]
    assert re.fullmatch(r"gpt-oss-20b_quick_test_r8_\d{8}-\d{6}", run.name)
    assert os.readlink(out / "latest") == run.name

    adapter = run / "adapter"
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (adapter / name).is_file(), name
    adapter_config = json.loads((adapter / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(tiny_model)
    assert set(adapter_config["target_parameters"]) == {"mlp.experts.gate_up_proj", "mlp.experts.down_proj"}
    assert set(adapter_config["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj"}
    assert adapter_config["lora_dropout"] == 0.0

    config = json.loads((run / "train_config.json").read_text())
    info = json.loads((run / "training_info.json").read_text())
    assert config == info["config"]
    assert (config["profile"], config["max_steps"], config["backend"], config["device"]) == ("quick_test", 5, "transformers", "cpu")
    assert info["base_model"] == str(tiny_model) and info["adapter"] == "adapter"
    assert info["backend"] == "transformers" and info["steps"] == 5
    assert info["dataset"]["path"] == str(TRAIN_JSONL) and len(info["dataset"]["content_sha256"]) == 64
    assert info["dataset"]["rows"]["kept"] == 8
    assert (info["dataset"]["train_examples"], info["dataset"]["eval_examples"]) == (6, 2)
    assert [s for s, _ in info["loss"]["eval"]["history"]] == [2, 4, 5]  # every checkpoint and the end
    assert all(loss > 0 for _, loss in info["loss"]["eval"]["history"])
    assert info["tokens_per_second"] > 0 and info["seconds_per_step"] > 0
    assert info["peak_memory"]["cpu_rss_bytes"] > 0 and info["peak_memory"]["cuda_allocated_bytes"] is None
    assert [s for s, _ in info["loss"]["history"]] == [1, 2, 3, 4, 5]
    assert info["loss"]["verdict"] in ("ok", "underfitting", "overfitting?")
    for pkg in ("torch", "transformers", "peft", "python"):
        assert info["versions"][pkg]
    groups = info["lora"]["trainable_at_start"]
    assert groups["experts.gate_up_proj"]["parameters"] > 0 and groups["experts.down_proj"]["parameters"] > 0
    assert groups["attention"]["parameters"] > 0 and "other" not in groups

    # checkpoints every 2 steps and at the end, newest 2 kept, none half-written
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000004", "step-000005"]
    for ckpt in (run / "checkpoints").iterdir():
        assert {"adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "trainer_state.json"} <= {p.name for p in ckpt.iterdir()}
    assert any(p.name.startswith("events.out.tfevents") for p in (run / "logs").iterdir())
    assert "LoRA: " in (run / "train.log").read_text()


def test_trainable_counts_logged(tiny_model, tmp_path, capsys):
    """Attention-only runs are allowed (and say so); the counts by group are logged."""
    out = tmp_path / "models"
    assert cli("train", "--profile", "quick_test", "--model", tiny_model, "--dataset", TRAIN_JSONL, "--max-steps", "1",
               "--lora-targets", "attention", "--lora-dropout", "0.1", "--output-dir", out, "--tensorboard", "false", *FAST) == 0
    err = capsys.readouterr().err
    assert re.search(r"LoRA: [\d,]+ trainable parameters: attention [\d,]+ \(16 tensors\)\n", err)
    info = json.loads((out / "latest" / "training_info.json").read_text())
    assert set(info["lora"]["trainable_at_start"]) == {"attention"}


@pytest.fixture(scope="module")
def memorised(memorisable_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("memorise") / "models"
    args = ["train", "--profile", "quick_test", "--model", memorisable_model, "--dataset", TRAIN_JSONL,
            "--max-steps", "15", "--batch-size", "8", "--grad-accum", "1", "--learning-rate", "5e-3",
            "--warmup-steps", "0", "--lr-scheduler", "constant", "--gradient-checkpointing", "off",
            "--save-steps", "100", "--output-dir", out, "--tensorboard", "false"]
    assert cli(*args) == 0
    return out / "latest"


def test_loss_halves_on_a_memorisable_set(memorised):
    info = json.loads((memorised / "training_info.json").read_text())
    losses = [loss for _, loss in info["loss"]["history"]]
    assert len(losses) == 15  # within 60 steps
    assert losses[-1] <= losses[0] / 2, losses
    assert info["loss"]["final"] <= losses[0] / 2


def test_expert_lora_is_nonzero_and_changes_the_merged_experts(memorised, memorisable_model):
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    info = json.loads((memorised / "training_info.json").read_text())
    assert info["lora"]["experts_trained"] is True
    weights = load_file(str(memorised / "adapter" / "adapter_model.safetensors"))
    expert_b = {k: v for k, v in weights.items() if ".mlp.experts." in k and "lora_B" in k}
    assert len(expert_b) == 4  # 2 layers x (gate_up_proj, down_proj)
    assert all(float(v.abs().sum()) > 0 for v in expert_b.values())

    base = AutoModelForCausalLM.from_pretrained(memorisable_model, dtype=torch.float32)
    before = {k: v.clone() for k, v in base.state_dict().items() if ".mlp.experts." in k and k.endswith("_proj")}
    merged = PeftModel.from_pretrained(base, memorised / "adapter").merge_and_unload()
    after = merged.state_dict()
    assert len(before) == 4
    for name, tensor in before.items():
        assert after[name].shape == tensor.shape
        assert not torch.equal(after[name], tensor), f"{name} unchanged by the merge"
