"""Training configuration: profiles are files bound to `gptoss train`, every field is a flag,
all problems are reported at once, and bad input stops before anything is written."""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import os
import subprocess
import typing
from pathlib import Path

import pytest
from _train_support import TRAIN_JSONL, cli

from gptoss.training import config as C
from gptoss.training.run import train

# What the issue asks of each preset.
EXPECTED_PROFILES = {
    "quick_test": {"max_steps": 30},
    "standard": {"max_steps": 200},
    "full": {"max_steps": 500},
    "max_quality": {"rank": 16, "lora_alpha": 32, "use_rslora": True},
    "conservative": {"rank": 8, "max_steps": 100},
    "memory_efficient": {"batch_size": 1, "max_seq_length": 512},
}


def test_every_profile_file_is_headed_by_its_command_and_binds_to_train():
    assert C.profile_names() == sorted(EXPECTED_PROFILES)
    signature = inspect.signature(train)
    for name in C.profile_names():
        path = C.profile_path(name)
        assert path.read_text().splitlines()[0] == f"# gptoss train --profile {name}"
        preset, problems = C.load_profile(name)
        assert problems == []
        signature.bind(profile=name, **preset)  # every key is a flag of `gptoss train`
        cfg = C.build_config({"profile": name})
        for key, value in EXPECTED_PROFILES[name].items():
            assert getattr(cfg, key) == value, (name, key)


def test_train_flags_are_the_config_fields_and_documented():
    params = inspect.signature(train).parameters
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in params.values())
    assert list(params) == C.field_names() + ["resume"]
    doc = inspect.getdoc(train)
    for name in params:
        assert f"\n    {name}: " in doc, f"{name} is not documented in train()'s Args"


# A valid non-default value for every field: a new field must be added here (and so be overridable).
OVERRIDES = {
    "profile": "full", "model": "some/model", "revision": "abc123", "backend": "transformers", "device": "cpu",
    "gpus": "2", "load_in_4bit": False, "dtype": "bfloat16", "dataset": "x.jsonl", "dataset_split": "test",
    "dataset_revision": "v1", "max_rows": 10, "max_seq_length": 256, "too_long": "truncate", "loss_on": "final",
    "reasoning_effort": "high", "eval_fraction": 0.1, "eval_steps": 7, "skip_bad_rows": True, "rank": 4,
    "lora_alpha": 8, "lora_dropout": 0.05, "use_rslora": True, "lora_targets": "attention", "max_steps": 3,
    "batch_size": 3, "grad_accum": 2, "learning_rate": 1e-3, "lr_scheduler": "cosine", "warmup_steps": 1,
    "weight_decay": 0.0, "max_grad_norm": 0.5, "optim": "adamw_torch", "gradient_checkpointing": "off",
    "seed": 1, "output_dir": "elsewhere", "run_name": "mine", "save_steps": 2, "keep_checkpoints": 1,
    "logging_steps": 5, "tensorboard": False, "wandb_project": "p", "loss_target": 0.6, "overfit_below": 0.2,
    "underfit_above": 2.0,
}


def test_every_field_can_be_overridden():
    assert sorted(OVERRIDES) == sorted(C.field_names())
    cfg = C.build_config(OVERRIDES)
    defaults = C.TrainConfig()
    for name, value in OVERRIDES.items():
        assert getattr(cfg, name) == value
        assert getattr(defaults, name) != value, f"{name}: pick a non-default value"


def test_cli_strings_are_coerced_to_field_types():
    cfg = C.build_config({"max_steps": "5", "use_rslora": "false", "learning_rate": "3e-4", "model": 123, "warmup_steps": 2.0})
    assert (cfg.max_steps, cfg.use_rslora, cfg.learning_rate, cfg.model, cfg.warmup_steps) == (5, False, 3e-4, "123", 2)


def test_all_problems_reported_at_once():
    with pytest.raises(C.ConfigError) as e:
        C.build_config({"max_steps": 0, "rank": "big", "lora_dropout": 0.1, "loss_on": "everything", "eval_fraction": 0.9})
    text = str(e.value)
    assert "(5 problems)" in text
    for fragment in ("--max-steps: must be at least 1", "--rank: expected an integer", "--lora-dropout: must be 0 when the experts",
                     "--loss-on 'everything': not one of assistant, final", "--eval-fraction: must be in [0, 0.5)"):
        assert fragment in text


def test_config_and_environment_problems_together(tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("")
    rc = cli("train", "--profile", "quick_test", "--max-steps", "0", "--device", "cuda",
             "--dataset", tmp_path / "missing.jsonl", "--output-dir", afile / "models", "--model", tmp_path / "nope")
    err = capsys.readouterr().err
    assert rc == 2
    assert err.count("gptoss: error:") == 1
    for fragment in ("--max-steps: must be at least 1", "--device cuda: CUDA was requested but is not available",
                     "missing.jsonl: no such file", "is not a directory", "--model", "no such checkpoint directory"):
        assert fragment in err, fragment


# ---------------------------------------------------------------------------------------------
# Bad input through the CLI: one clear error, exit 2, models/latest untouched, nothing written.


@pytest.fixture()
def models_dir(tmp_path):
    out = tmp_path / "models"
    (out / "previous-run").mkdir(parents=True)
    os.symlink("previous-run", out / "latest")
    return out


def _assert_untouched(models: Path):
    assert os.readlink(models / "latest") == "previous-run"
    assert sorted(p.name for p in models.iterdir()) == ["latest", "previous-run"]


BAD_SCHEMA = '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n{"prompt": "x"}\n'


@pytest.mark.parametrize(
    "case, flags, expected",
    [
        ("missing dataset", ["--dataset", "{tmp}/nope.jsonl"], "--dataset {tmp}/nope.jsonl: no such file"),
        ("wrong schema", ["--dataset", "{tmp}/bad.jsonl"], "{tmp}/bad.jsonl row 2: field 'messages': missing (fields present: prompt)"),
        ("zero steps", ["--max-steps", "0"], "--max-steps: must be at least 1, got 0"),
        ("unknown profile", ["--profile", "fastest"], "--profile: unknown profile 'fastest'; known profiles: conservative, full"),
        ("cuda absent", ["--device", "cuda"], "--device cuda: CUDA was requested but is not available"),
        ("unsloth on cpu", ["--backend", "unsloth"], "--backend unsloth runs on CUDA only"),
        ("4-bit on cpu", ["--load-in-4bit"], "--load-in-4bit: bitsandbytes 4-bit needs CUDA"),
    ],
)
def test_bad_input_one_error_and_latest_untouched(tmp_path, models_dir, tiny_model, capsys, case, flags, expected):
    (tmp_path / "bad.jsonl").write_text(BAD_SCHEMA)
    flags = [f.replace("{tmp}", str(tmp_path)) for f in flags]
    base = ["train", "--profile", "quick_test", "--model", tiny_model, "--dataset", TRAIN_JSONL, "--output-dir", models_dir, "--max-steps", "5"]
    rc = cli(*base, *flags)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.count("gptoss: error:") == 1, err
    assert expected.replace("{tmp}", str(tmp_path)) in err
    _assert_untouched(models_dir)


def test_output_dir_not_writable(tmp_path, tiny_model, capsys):
    afile = tmp_path / "afile"
    afile.write_text("")
    rc = cli("train", "--profile", "quick_test", "--model", tiny_model, "--dataset", TRAIN_JSONL,
             "--output-dir", afile / "models", "--max-steps", "5")
    err = capsys.readouterr().err
    assert rc == 2 and err.count("gptoss: error:") == 1
    assert f"--output-dir {afile / 'models'}: cannot be created, {afile} is not a directory" in err
    assert afile.read_text() == ""


@contextlib.contextmanager
def _unwritable(path: Path):
    """No new files in ``path``: mode 0555, or for root (CI), which writes through modes, the
    immutable attribute (chattr +i)."""
    if os.geteuid() != 0:
        path.chmod(0o555)
        try:
            yield
        finally:
            path.chmod(0o755)
        return
    subprocess.run(["chattr", "+i", str(path)], check=True, capture_output=True)
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(path)], check=True, capture_output=True)


def test_output_dir_read_only(tmp_path, tiny_model, models_dir, capsys):
    with _unwritable(models_dir):
        rc = cli("train", "--profile", "quick_test", "--model", tiny_model, "--dataset", TRAIN_JSONL,
                 "--output-dir", models_dir, "--max-steps", "5")
    err = capsys.readouterr().err
    assert rc == 2 and err.count("gptoss: error:") == 1, err
    assert f"--output-dir {models_dir}: {models_dir} is not writable" in err
    _assert_untouched(models_dir)


def test_latest_must_be_a_link(tmp_path, tiny_model, capsys):
    (tmp_path / "models" / "latest").mkdir(parents=True)
    rc = cli("train", "--model", tiny_model, "--dataset", TRAIN_JSONL, "--output-dir", tmp_path / "models")
    assert rc == 2 and "latest exists and is not a symlink" in capsys.readouterr().err


def test_model_that_cannot_load_leaves_nothing(tmp_path, tiny_model, models_dir, capsys):
    """Checked after the data (the tokenizer loads): the weights are missing, so the model load
    fails before the run directory is created."""
    import shutil

    broken = tmp_path / "no-weights"
    shutil.copytree(tiny_model, broken, ignore=shutil.ignore_patterns("*.safetensors"))
    rc = cli("train", "--profile", "quick_test", "--model", broken, "--dataset", TRAIN_JSONL, "--output-dir", models_dir)
    err = capsys.readouterr().err
    assert rc == 2 and err.count("gptoss: error:") == 1
    assert f"--model {broken}: cannot load the checkpoint" in err
    _assert_untouched(models_dir)
