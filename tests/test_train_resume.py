"""A run killed after a checkpoint resumes at that step with the same optimizer state, and ends
where an uninterrupted run ends."""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from _train_support import FAST, TRAIN_JSONL, cli

from gptoss.training import loop

# Constant lr without warmup: the schedule does not depend on --max-steps, so a run started for
# 1000 steps and resumed for N is comparable with an uninterrupted N-step run.
FLAGS = ["--profile", "quick_test", "--dataset", str(TRAIN_JSONL), "--save-steps", "2", "--keep-checkpoints", "10",
         "--learning-rate", "1e-3", "--lr-scheduler", "constant", "--warmup-steps", "0", "--tensorboard", "false", *FAST]


def _wait_for(predicate, proc, timeout=300.0):
    """Poll a condition on the files the process writes (not a fixed sleep)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = predicate()
        if found:
            return found
        if proc.poll() is not None:
            raise AssertionError(f"training exited early with {proc.returncode}: {proc.stderr.read().decode()[-2000:]}")
        time.sleep(0.05)
    raise AssertionError("timed out waiting for the first checkpoint")


def _adapter(run: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(run / "adapter" / "adapter_model.safetensors"))


def test_killed_run_resumes_with_same_optimizer_state(tiny_model, tmp_path, monkeypatch):
    import torch

    out = tmp_path / "models"
    cmd = [sys.executable, "-m", "gptoss", "train", "--model", str(tiny_model), "--output-dir", str(out),
           "--max-steps", "1000", *FLAGS]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    try:
        run = _wait_for(lambda: next((p for p in out.glob("*.partial") if loop.checkpoints(p)), None), proc)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()

    # Killed: still partial, no record, no latest link.
    assert run.is_dir() and not (run / "training_info.json").exists()
    assert not (out / "latest").exists()
    newest = loop.checkpoints(run)[-1]
    step = int(newest.name.split("-")[1])
    assert step >= 2 and step % 2 == 0
    saved_optimizer = torch.load(newest / "optimizer.pt", weights_only=False)

    # Resume (in-process), spying on the optimizer right after the checkpoint is loaded.
    seen = {}
    real_load = loop.load_checkpoint

    def spy(ckpt, model, optimizer, scheduler):
        state = real_load(ckpt, model, optimizer, scheduler)
        seen["checkpoint"], seen["step"] = ckpt, state.step
        seen["optimizer"] = copy.deepcopy(optimizer.state_dict())  # the loop goes on mutating it
        seen["lr"] = scheduler.get_last_lr()
        return state

    monkeypatch.setattr(loop, "load_checkpoint", spy)
    assert cli("train", "--resume", run, "--max-steps", step + 2) == 0
    assert seen["checkpoint"] == newest and seen["step"] == step
    state, saved_state = seen["optimizer"]["state"], saved_optimizer["state"]
    assert state.keys() == saved_state.keys() and len(state) > 0
    for key in state:
        assert int(state[key]["step"]) == step
        for name in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(state[key][name], saved_state[key][name])

    finished = out / run.name[: -len(".partial")]
    assert not run.exists() and os.readlink(out / "latest") == finished.name
    info = json.loads((finished / "training_info.json").read_text())
    assert info["resumed_from_step"] == step and info["steps"] == step + 2
    assert [s for s, _ in info["loss"]["history"]] == list(range(1, step + 3))

    # The same run without the interruption ends with the same adapter.
    reference = tmp_path / "reference"
    assert cli("train", "--model", tiny_model, "--output-dir", reference, "--max-steps", step + 2, *FLAGS) == 0
    resumed, uninterrupted = _adapter(finished), _adapter(reference / "latest")
    assert resumed.keys() == uninterrupted.keys()
    for k in resumed:
        torch.testing.assert_close(resumed[k], uninterrupted[k], rtol=0, atol=1e-6)


def test_resume_refuses_changed_settings_and_finished_runs(tiny_model, tmp_path, capsys):
    out = tmp_path / "models"
    assert cli("train", "--model", tiny_model, "--output-dir", out, "--max-steps", "2", *FLAGS) == 0
    finished = (out / "latest").resolve()
    capsys.readouterr()
    assert cli("train", "--resume", finished) == 2
    assert "has already finished" in capsys.readouterr().err

    partial = finished.with_name(finished.name + "-2.partial")
    partial.mkdir()
    (partial / "train_config.json").write_text((finished / "train_config.json").read_text())
    assert cli("train", "--resume", partial, "--rank", "16", "--learning-rate", "1") == 2
    err = capsys.readouterr().err
    assert "--rank: cannot change when resuming" in err and "--learning-rate: cannot change when resuming" in err
    assert os.readlink(out / "latest") == finished.name


def test_bare_resume_needs_an_unfinished_run(tmp_path, capsys):
    out = tmp_path / "models"
    out.mkdir()
    assert cli("train", "--resume", "--output-dir", out) == 2
    assert "no unfinished run (*.partial)" in capsys.readouterr().err
