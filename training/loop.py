"""The training loop: token-exact gradient accumulation, checkpoints that resume exactly.

A step takes ``grad_accum`` micro-batches of ``batch_size`` rows and averages the loss over all
their supervised tokens (not over micro-batches), clips, and steps AdamW. The row order is a
seeded shuffle per epoch, so the position in the data follows from the step number alone.

A checkpoint ``checkpoints/step-NNNNNN/`` holds the adapter, the optimizer and scheduler state,
the RNG states and ``trainer_state.json``; it is written under a temporary name and renamed when
complete, and only the newest ``keep_checkpoints`` are kept.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import random
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from gptoss.errors import ToolchainError
from gptoss.training.data import IGNORE_INDEX, Example

log = logging.getLogger("gptoss.train")

CHECKPOINT_PREFIX = "step-"
STATE_FILE = "trainer_state.json"


class TrainingError(ToolchainError):
    """Training stopped: NaN loss, unusable checkpoint."""


@dataclasses.dataclass
class TrainState:
    step: int = 0
    tokens: int = 0  # input tokens (padding excluded) seen
    supervised_tokens: int = 0
    train_seconds: float = 0.0
    loss_history: list = dataclasses.field(default_factory=list)  # [step, loss]
    eval_history: list = dataclasses.field(default_factory=list)
    step_history: list = dataclasses.field(default_factory=list)  # [step, seconds, input tokens]

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.train_seconds if self.train_seconds else 0.0


def micro_batches(n: int, batch_size: int, seed: int, start: int = 0) -> Iterator[list[int]]:
    """Row indices of micro-batch ``start``, ``start + 1``, ...: a seeded shuffle per epoch."""
    per_epoch = math.ceil(n / batch_size)
    k = start
    epoch, order = -1, []
    while True:
        e, off = divmod(k, per_epoch)
        if e != epoch:
            epoch, order = e, list(range(n))
            random.Random(seed + e).shuffle(order)
        yield order[off * batch_size : (off + 1) * batch_size]
        k += 1


def collate(examples: list[Example], pad_id: int, device):
    import torch

    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        mask[i, :n] = 1
        labels[i, :n] = torch.tensor(e.labels)
    return ids.to(device), mask.to(device), labels.to(device)


def make_optimizer(model, cfg):
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optim == "adamw_8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)


def make_scheduler(optimizer, cfg):
    from transformers import get_scheduler

    return get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.warmup_steps, num_training_steps=cfg.max_steps)


def checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.name.startswith(CHECKPOINT_PREFIX) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX) :]))


def save_checkpoint(run_dir: Path, model, optimizer, scheduler, state: TrainState, keep: int) -> Path:
    import torch

    root = run_dir / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{CHECKPOINT_PREFIX}{state.step:06d}"
    tmp = root / f".{final.name}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    rng = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    torch.save(rng, tmp / "rng.pt")
    (tmp / STATE_FILE).write_text(json.dumps(dataclasses.asdict(state), indent=1) + "\n")
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(ckpt: Path, model, optimizer, scheduler) -> TrainState:
    import torch
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    weights = ckpt / "adapter_model.safetensors"
    if not weights.is_file():
        raise TrainingError(f"{ckpt}: no adapter_model.safetensors; the checkpoint is incomplete, delete it to resume from the one before")
    result = set_peft_model_state_dict(model, load_file(str(weights)))
    unexpected = getattr(result, "unexpected_keys", None)
    if unexpected:
        raise TrainingError(f"{ckpt}: adapter weights do not fit this model ({len(unexpected)} unexpected, e.g. {unexpected[0]})")
    device = next(p.device for p in model.parameters() if p.requires_grad)
    optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", map_location=device, weights_only=False))
    scheduler.load_state_dict(torch.load(ckpt / "scheduler.pt", weights_only=False))
    rng = torch.load(ckpt / "rng.pt", weights_only=False)
    random.setstate(rng["python"])
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return TrainState(**json.loads((ckpt / STATE_FILE).read_text()))


def _autocast(cfg):
    import contextlib

    import torch

    if cfg.device == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def evaluate(model, backend, examples: list[Example], cfg, pad_id: int, device, world=None) -> float:
    """Mean loss over the supervised tokens of ``examples``; with several processes each scores every
    world_size-th batch and the sums are added up."""
    import torch

    rank, size = (world.rank, world.size) if world is not None else (0, 1)
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for j, i in enumerate(range(0, len(examples), cfg.batch_size)):
            if j % size != rank:
                continue
            ids, mask, labels = collate(examples[i : i + cfg.batch_size], pad_id, device)
            with _autocast(cfg):
                loss_sum, n = backend.loss(model, ids, mask, labels)
            total += float(loss_sum)
            count += n
    model.train()
    if world is not None:
        total, count = world.sum([total, count])
    return total / max(count, 1)


def train_loop(model, backend, data, cfg, run_dir: Path, monitor, *, pad_id: int, resume_from: Path | None = None,
               state: TrainState | None = None, world=None) -> TrainState:
    """``world`` (training/distributed.py) with several processes: this one takes every
    world_size-th micro-batch of the step's ``grad_accum x world_size``, the gradients and token
    counts are summed over processes, and only rank 0 writes checkpoints. None: one process."""
    import torch

    rank, size = (world.rank, world.size) if world is not None else (0, 1)
    device = next(p.device for p in model.parameters() if p.requires_grad)
    optimizer = make_optimizer(model, cfg)
    scheduler = make_scheduler(optimizer, cfg)
    state = state or TrainState()
    if resume_from is not None:
        state = load_checkpoint(resume_from, model, optimizer, scheduler)
        log.info("resumed from %s at step %d", resume_from, state.step)
    params = [p for p in model.parameters() if p.requires_grad]
    per_step = cfg.grad_accum * size
    batches = micro_batches(len(data.train), cfg.batch_size, cfg.seed, start=state.step * per_step)
    eval_every = cfg.eval_steps or cfg.save_steps
    model.train()
    while state.step < cfg.max_steps:
        t0 = time.perf_counter()
        step_rows = [next(batches) for _ in range(per_step)][rank::size]
        micro = [collate([data.train[i] for i in rows], pad_id, device) for rows in step_rows]
        n_sup = sum(int((labels[:, 1:] != IGNORE_INDEX).sum()) for _, _, labels in micro)
        n_tok = sum(int(mask.sum()) for _, mask, _ in micro)
        if world is not None:
            n_sup, n_tok = (int(v) for v in world.sum([n_sup, n_tok]))
        loss_total = 0.0
        for ids, mask, labels in micro:
            with _autocast(cfg):
                loss_sum, _ = backend.loss(model, ids, mask, labels)
            (loss_sum / n_sup).backward()
            loss_total += float(loss_sum.detach())
        if world is not None:
            world.reduce_gradients(params)
            (loss_total,) = world.sum([loss_total])
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm))
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        loss = loss_total / n_sup
        if not math.isfinite(loss):
            raise TrainingError(
                f"the loss became {loss} at step {state.step + 1}; lower --learning-rate (now {cfg.learning_rate}) "
                f"or check the data. The run stays unfinished; resume from its last checkpoint with --resume"
            )
        dt = time.perf_counter() - t0
        state.step += 1
        state.tokens += n_tok
        state.supervised_tokens += n_sup
        state.train_seconds += dt
        state.loss_history.append([state.step, loss])
        state.step_history.append([state.step, round(dt, 4), n_tok])
        monitor.step(state.step, {"loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens_per_second": n_tok / dt})
        if data.eval and (state.step % eval_every == 0 or state.step == cfg.max_steps):
            eval_loss = evaluate(model, backend, data.eval, cfg, pad_id, device, world)
            state.eval_history.append([state.step, eval_loss])
            monitor.eval(state.step, eval_loss)
        if rank == 0 and (state.step % cfg.save_steps == 0 or state.step == cfg.max_steps):
            path = save_checkpoint(run_dir, model, optimizer, scheduler, state, cfg.keep_checkpoints)
            log.debug("checkpoint %s", path)
    return state
