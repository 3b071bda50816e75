"""Data-parallel training on the GPUs of one host: which launcher, and the process group.

``gptoss train --gpus N`` (a count, device ids such as ``0,1``, or ``all``) with one process runs
exactly as before, in this process. With more, the command validates its flags here and then runs
itself under torchrun (``python -m torch.distributed.run --standalone``), one process per GPU, each
loading its own copy of the (4-bit) model on its own GPU; ``torchrun -m gptoss train ...`` started
by hand works the same way. Unsloth documents this shape for multi-GPU: one process per GPU under
accelerate/torchrun, the model on the process's own device.

Each optimizer step takes ``grad_accum x world_size`` micro-batches in the seeded order of
``loop.micro_batches``; process ``r`` takes every ``world_size``-th one from ``r``. The LoRA
gradients are summed over processes once per step (bucketed all-reduce) and the loss is normalised
by the step's supervised tokens over all processes, so N processes with ``--grad-accum k`` compute
the same update as one process with ``--grad-accum N*k``. No DistributedDataParallel wrapper: the LoRA
of MoE experts that a micro-batch does not route to gets no gradient, which DDP reports as an error
unless find_unused_parameters is on; the reduce here counts it as zero. One reduce per optimizer
step is what DDP's no_sync() during accumulation would give.

Only rank 0 writes: the run folder, checkpoints, TensorBoard, the record and ``models/latest``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

from gptoss.errors import ToolchainError

# torchrun's variables: a process that finds WORLD_SIZE in its environment was started by it.
WORLD_ENV = "WORLD_SIZE"
# The launcher tells rank 0 where to write the finished run's folder (the parent returns it).
RESULT_ENV = "GPTOSS_TRAIN_RESULT"
BUCKET_ELEMENTS = 1 << 24  # all-reduce the gradients in pieces of at most 16M elements


@dataclasses.dataclass(frozen=True)
class GpuPlan:
    """How many processes ``--gpus`` asks for, and the CUDA_VISIBLE_DEVICES to give them (or None)."""

    processes: int
    visible_devices: str | None = None

    @property
    def launcher(self) -> str:
        return "torchrun" if self.processes > 1 else "plain"


def gpu_problem(value: Any) -> str | None:
    """Why ``--gpus`` is malformed (before the machine is looked at), or None."""
    text = str(value).strip()
    if text == "all":
        return None
    parts = [p.strip() for p in text.split(",")]
    if all(p.isdigit() for p in parts) and (len(parts) > 1 or int(parts[0]) >= 1):
        if len(set(parts)) != len(parts):
            return f"--gpus: device ids must differ, got {text!r}"
        return None
    return f"--gpus: a count (2), device ids (0,1) or all, got {value!r}"


def plan(value: Any, *, device: str, visible_gpus: int) -> tuple[GpuPlan | None, str | None]:
    """``--gpus`` for this machine: (the plan, None) or (None, the problem). ``visible_gpus`` is
    torch.cuda.device_count(); on ``--device cpu`` a count means CPU processes (gloo), for tests."""
    if (problem := gpu_problem(value)) is not None:
        return None, problem
    text = str(value).strip()
    if text == "all":
        return GpuPlan(max(visible_gpus, 1) if device == "cuda" else 1), None
    if "," in text:
        ids = [p.strip() for p in text.split(",")]
        if device != "cuda":
            return None, f"--gpus {text}: device ids need --device cuda; on CPU pass a count of processes"
        return GpuPlan(len(ids), ",".join(ids)), None
    count = int(text)
    if device == "cuda" and count > visible_gpus:
        return None, (f"--gpus {count}: only {visible_gpus} CUDA device(s) visible here; pass at most "
                      f"{visible_gpus} (in compose, list the ids in TRAIN_GPUS)")
    return GpuPlan(count), None


def launch_command(plan: GpuPlan, flags: dict[str, Any]) -> list[str]:
    """torchrun on this host, ``plan.processes`` workers, each running ``flags`` (as JSON)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={plan.processes}",
            "-m", "gptoss.training.worker", json.dumps(flags)]


def launch(plan: GpuPlan, flags: dict[str, Any]) -> Path:
    """Run the workers and wait; the finished run's folder (rank 0 writes its path)."""
    import subprocess
    import tempfile

    fd, result = tempfile.mkstemp(prefix="gptoss-train-result-")
    os.close(fd)
    env = {**os.environ, RESULT_ENV: result}
    if plan.visible_devices is not None:
        env["CUDA_VISIBLE_DEVICES"] = plan.visible_devices
    try:
        # torchrun starts its workers in sessions of their own: tie it to this process (SIGTERM when this one
        # dies, which torchrun passes on to its workers), and each worker to torchrun (worker.py).
        code = subprocess.run(launch_command(plan, flags), env=env,
                              preexec_fn=lambda: die_with_parent(signal.SIGTERM)).returncode
        text = Path(result).read_text(encoding="utf-8").strip()
    finally:
        os.unlink(result)
    if code != 0 or not text:
        raise ToolchainError(f"training on {plan.processes} processes failed (torchrun exit status {code}); the "
                             f"workers' errors are above. An unfinished run resumes with --resume")
    return Path(text)


# ---------------------------------------------------------------------------------------------
# The process group


@dataclasses.dataclass
class World:
    """This process's place among the training processes; one process needs no torch.distributed."""

    rank: int = 0
    local_rank: int = 0
    size: int = 1
    backend: str | None = None  # nccl or gloo; None for one process
    launcher: str = "plain"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def sum(self, values: list[float]) -> list[float]:
        """``values`` summed over processes (float64)."""
        if self.size == 1:
            return list(values)
        import torch
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64, device=self._device())
        dist.all_reduce(t)
        return t.tolist()

    def reduce_gradients(self, params: list) -> None:
        """Sum every parameter's gradient over processes (a missing gradient counts as zero)."""
        if self.size == 1:
            return
        import torch
        import torch.distributed as dist

        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        bucket: list = []
        size = 0
        for p in params + [None]:
            if p is not None and (not bucket or (p.grad.dtype == bucket[0].grad.dtype
                                                 and p.grad.device == bucket[0].grad.device
                                                 and size + p.numel() <= BUCKET_ELEMENTS)):
                bucket.append(p)
                size += p.numel()
                continue
            flat = torch.cat([q.grad.reshape(-1) for q in bucket])
            dist.all_reduce(flat)
            offset = 0
            for q in bucket:
                q.grad.copy_(flat[offset: offset + q.numel()].view_as(q.grad))
                offset += q.numel()
            bucket, size = ([p], p.numel()) if p is not None else ([], 0)

    def broadcast_parameters(self, params: list) -> None:
        """Rank 0's values of ``params`` on every process (the same LoRA start everywhere)."""
        if self.size == 1:
            return
        import torch
        import torch.distributed as dist

        with torch.no_grad():
            for p in params:
                dist.broadcast(p.data, src=0)

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every process."""
        if self.size == 1:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj: Any) -> list[Any]:
        """Every process's ``obj``, by rank."""
        if self.size == 1:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.size
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.size > 1:
            import torch.distributed as dist

            dist.barrier()

    def close(self) -> None:
        if self.size > 1:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()

    def _device(self):
        return f"cuda:{self.local_rank}" if self.backend == "nccl" else "cpu"


def in_worker() -> bool:
    """Started by torchrun (by ``launch`` or by hand)."""
    return WORLD_ENV in os.environ


def join(device: str) -> World:
    """Join torchrun's process group: NCCL on CUDA (one GPU per local rank), gloo on CPU."""
    size = int(os.environ.get(WORLD_ENV, "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if size == 1:
        return World(launcher="torchrun")
    import torch
    import torch.distributed as dist

    backend = "nccl" if device == "cuda" else "gloo"
    if device == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise ToolchainError(f"torchrun local rank {local_rank} has no GPU ({torch.cuda.device_count()} visible); "
                                 f"start at most that many processes per node")
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend=backend)
    return World(rank=rank, local_rank=local_rank, size=size, backend=backend, launcher="torchrun")


def die_with_parent(sig: int) -> None:
    """Have the kernel send ``sig`` to this process when its parent exits (Linux; elsewhere nothing),
    so a killed launcher leaves no worker training on in the run folder."""
    if sys.platform != "linux":
        return
    import ctypes

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)


def write_result(path: Path) -> None:
    """Rank 0 tells ``launch`` where the finished run is."""
    target = os.environ.get(RESULT_ENV)
    if target:
        Path(target).write_text(str(path) + "\n", encoding="utf-8")
