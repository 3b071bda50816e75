"""Data-parallel `gptoss train --gpus N`: the launcher chosen from the flag, and real 2-process runs
(torchrun, gloo, CPU) on the tiny fixture: one adapter and one record, the same update as one
process with twice the accumulation, and a killed 2-process run resumed from its checkpoint."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from _train_support import TRAIN_JSONL, cli

from gptoss.records import TrainingInfo
from gptoss.training import distributed, loop
from gptoss.training.config import ConfigError, build_config

# Constant lr, one micro-batch of 2 rows per process, no recompute: short CPU runs.
FLAGS = ["--profile", "quick_test", "--dataset", str(TRAIN_JSONL), "--batch-size", "2", "--gradient-checkpointing", "off",
         "--learning-rate", "1e-3", "--lr-scheduler", "constant", "--warmup-steps", "0", "--tensorboard", "false"]


# ---------------------------------------------------------------------------------------------
# Which launcher (no processes started)


def test_one_gpu_is_the_plain_path_and_two_are_torchrun_with_two_processes():
    one, problem = distributed.plan("1", device="cuda", visible_gpus=2)
    assert problem is None and (one.processes, one.launcher, one.visible_devices) == (1, "plain", None)
    # TRAIN_GPUS=0 in compose: the container sees one GPU and runs `--gpus all`
    assert distributed.plan("all", device="cuda", visible_gpus=1)[0].launcher == "plain"
    assert distributed.plan("all", device="cpu", visible_gpus=0)[0].processes == 1

    for value, visible in (("2", 2), ("all", 2), ("0,1", 8), ("2,3", 4)):
        two, problem = distributed.plan(value, device="cuda", visible_gpus=visible)
        assert problem is None and (two.processes, two.launcher) == (2, "torchrun"), value
    assert distributed.plan("2,3", device="cuda", visible_gpus=4)[0].visible_devices == "2,3"

    two = distributed.plan("2", device="cuda", visible_gpus=2)[0]
    cmd = distributed.launch_command(two, {"max_steps": 5, "gpus": "2"})
    assert cmd[:5] == [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    assert cmd[5:7] == ["-m", "gptoss.training.worker"] and '"gpus": "2"' in cmd[7]


def test_bad_gpu_lists_are_refused_with_what_to_pass():
    assert "only 1 CUDA device(s) visible" in distributed.plan("2", device="cuda", visible_gpus=1)[1]
    assert "device ids need --device cuda" in distributed.plan("0,1", device="cpu", visible_gpus=0)[1]
    with pytest.raises(ConfigError) as e:
        build_config({"gpus": "0,0"})
    assert "--gpus: device ids must differ" in str(e.value)
    with pytest.raises(ConfigError) as e:
        build_config({"gpus": "two"})
    assert "--gpus: a count (2), device ids (0,1) or all" in str(e.value)
    # fire reads `--gpus 0,1` as a tuple
    assert build_config({"gpus": (0, 1)}).gpus == "0,1"


# ---------------------------------------------------------------------------------------------
# Real runs: 2 CPU processes under torchrun (gloo)


@pytest.fixture(scope="module")
def two_and_one(tiny_model, tmp_path_factory):
    """The same 3 steps on 2 processes x 1 micro-batch and on 1 process x 2 micro-batches."""
    root = tmp_path_factory.mktemp("dp")
    common = ["train", "--model", tiny_model, "--max-steps", "3", "--save-steps", "2", "--eval-fraction", "0.25", *FLAGS]
    assert cli(*common, "--grad-accum", "1", "--gpus", "2", "--device", "cpu", "--output-dir", root / "two") == 0
    assert cli(*common, "--grad-accum", "2", "--output-dir", root / "one") == 0
    return root / "two", root / "one"


def test_two_processes_write_one_run_with_world_size_and_effective_batch(two_and_one, tiny_model):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out, _ = two_and_one
    runs = sorted(p.name for p in out.iterdir())
    assert len(runs) == 2 and "latest" in runs and not any(r.endswith(".partial") for r in runs)
    run = (out / "latest").resolve()
    info = TrainingInfo.load(run)
    dp = info.data_parallel
    assert (dp.world_size, dp.launcher, dp.process_group_backend) == (2, "torchrun", "gloo")
    assert (dp.per_device_batch_size, dp.grad_accum, dp.effective_batch_size) == (2, 1, 4)
    assert [m.rank for m in dp.peak_memory_per_rank] == [0, 1]
    assert all(m.cpu_rss_bytes > 0 and m.cuda_allocated_bytes is None for m in dp.peak_memory_per_rank)
    assert info.config["gpus"] == "2" and info.steps == 3
    losses = [loss for _, loss in info.loss["history"]]
    assert len(losses) == 3 and all(0 < loss < 100 for loss in losses)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000002", "step-000003"]
    assert not (run / "logs").exists()  # --tensorboard false on every rank

    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, run / "adapter")
    ids = torch.tensor([[1, 2, 3, 4]])
    assert torch.isfinite(model(input_ids=ids).logits).all()


def test_two_processes_make_the_update_of_one_with_twice_the_accumulation(two_and_one):
    """Process r takes every 2nd micro-batch of the step and the gradients are summed: the adapter,
    the losses, the token counts and the (sharded) eval loss match the 1-process run."""
    import torch
    from safetensors.torch import load_file

    two, one = (TrainingInfo.load(p / "latest") for p in two_and_one)
    assert one.data_parallel.world_size == 1 and one.data_parallel.launcher == "plain"
    assert one.data_parallel.effective_batch_size == two.data_parallel.effective_batch_size == 4
    assert (two.tokens, two.supervised_tokens) == (one.tokens, one.supervised_tokens)
    for a, b in ((two.loss["history"], one.loss["history"]), (two.loss["eval"]["history"], one.loss["eval"]["history"])):
        assert [s for s, _ in a] == [s for s, _ in b]
        assert [v for _, v in a] == pytest.approx([v for _, v in b], abs=1e-4)
    wa, wb = (load_file(str(p / "latest" / "adapter" / "adapter_model.safetensors")) for p in two_and_one)
    assert wa.keys() == wb.keys()
    for k in wa:  # float sums in another order; Adam's first steps are ~lr (1e-3) per element
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=1e-4)
    assert any(float(v.abs().max()) > 1e-3 for k, v in wa.items() if "lora_B" in k)  # it did train


def _wait_for(predicate, proc, timeout=300.0):
    """Poll the files the run writes (not a fixed sleep)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if found := predicate():
            return found
        if proc.poll() is not None:
            raise AssertionError(f"training exited early with {proc.returncode}: {proc.stderr.read().decode()[-3000:]}")
        time.sleep(0.05)
    raise AssertionError("timed out waiting for the first checkpoint")


def _workers_of(out: Path) -> list[int]:
    """pids of the torchrun workers writing under ``out`` (their argv holds the flags, output_dir included)."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"gptoss.training.worker" in argv and b"torch.distributed.run" not in argv \
                and any(str(out).encode() in a for a in argv):
            pids.append(int(proc.name))
    return pids


def _wait_until_gone(pids: list[int], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while (alive := [p for p in pids if Path(f"/proc/{p}").exists() and _state(p) != "Z"]) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive, f"workers {alive} outlived their launcher"


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "X"


def test_killed_two_process_run_resumes_from_its_checkpoint(tiny_model, tmp_path):
    import torch
    from safetensors.torch import load_file

    out = tmp_path / "models"
    cmd = [sys.executable, "-m", "gptoss", "train", "--model", str(tiny_model), "--output-dir", str(out),
           "--max-steps", "1000", "--save-steps", "2", "--keep-checkpoints", "10", "--grad-accum", "1",
           "--gpus", "2", "--device", "cpu", *FLAGS]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    # its own session: the launcher, torchrun and both workers are killed together
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, start_new_session=True)
    try:
        run = _wait_for(lambda: next((p for p in out.glob("*.partial") if loop.checkpoints(p)), None), proc)
        workers = _workers_of(out)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher and torchrun; the workers run in sessions of their own
        proc.wait()
    assert len(workers) == 2
    _wait_until_gone(workers)  # they die with torchrun instead of training on in the run folder
    assert [p.name for p in out.iterdir()] == [run.name]  # one folder for both processes, no record, no link
    assert not (run / "training_info.json").exists()
    step = int(loop.checkpoints(run)[-1].name.split("-")[1])
    assert step >= 2 and step % 2 == 0

    # No --gpus: the run's own 2 processes (train_config.json); another count is refused.
    assert cli("train", "--resume", run, "--gpus", "1", "--max-steps", step + 2) == 2
    assert cli("train", "--resume", run, "--max-steps", step + 2) == 0
    finished = out / run.name[: -len(".partial")]
    info = TrainingInfo.load(finished)
    assert info.resumed_from_step == step and info.steps == step + 2
    assert [s for s, _ in info.loss["history"]] == list(range(1, step + 3))
    assert info.data_parallel.world_size == 2 and os.readlink(out / "latest") == finished.name

    # It ends where one process with twice the accumulation ends without the interruption.
    reference = tmp_path / "reference"
    assert cli("train", "--model", tiny_model, "--output-dir", reference, "--max-steps", step + 2,
               "--grad-accum", "2", *FLAGS) == 0
    resumed = load_file(str(finished / "adapter" / "adapter_model.safetensors"))
    uninterrupted = load_file(str(reference / "latest" / "adapter" / "adapter_model.safetensors"))
    for k in resumed:
        torch.testing.assert_close(resumed[k], uninterrupted[k], rtol=0, atol=1e-4)
