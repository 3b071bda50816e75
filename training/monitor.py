"""What a run shows while it trains: progress bar, log lines, TensorBoard, W&B, the loss verdict."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

log = logging.getLogger("gptoss.train")


class Monitor:
    """Progress bar (tqdm) with loss, lr and tokens/s; TensorBoard under ``logs/``; W&B only when
    WANDB_API_KEY is set."""

    def __init__(self, cfg, run_dir: Path, *, start_step: int, run_name: str, enabled: bool = True):
        from tqdm.auto import tqdm

        self.cfg = cfg
        self.enabled = enabled  # False: a data-parallel process other than rank 0 (shows and writes nothing)
        self.bar = tqdm(total=cfg.max_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True,
                        disable=None if enabled else True)
        self.tb = None
        self.wandb = None
        if not enabled:
            return
        if cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=str(run_dir / "logs"), purge_step=start_step + 1 if start_step else None)
        if os.environ.get("WANDB_API_KEY"):
            try:
                import wandb

                self.wandb = wandb.init(
                    project=cfg.wandb_project, name=run_name, config=cfg.to_dict(), dir=str(run_dir), resume="allow"
                )
            except ImportError:
                log.warning("WANDB_API_KEY is set but wandb is not installed (pip install wandb); logging to TensorBoard only")
            except Exception as e:  # a bad key or no network must not stop training
                log.warning("W&B disabled: %s", e)

    def step(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        self.bar.update(1)
        self.bar.set_postfix(
            loss=f"{metrics['loss']:.4f}", lr=f"{metrics['lr']:.2e}", tok_s=f"{metrics['tokens_per_second']:.0f}"
        )
        if step % self.cfg.logging_steps == 0 or step == self.cfg.max_steps:
            self.bar.write(
                f"step {step}/{self.cfg.max_steps} loss {metrics['loss']:.4f} lr {metrics['lr']:.2e} "
                f"grad_norm {metrics['grad_norm']:.3f} tokens/s {metrics['tokens_per_second']:.0f}"
            )
            log.debug("step %d %s", step, metrics)
        self._scalars("train", step, metrics)

    def eval(self, step: int, loss: float) -> None:
        if not self.enabled:
            return
        self.bar.write(f"step {step}/{self.cfg.max_steps} eval_loss {loss:.4f}")
        log.debug("eval step %d loss %.4f", step, loss)
        self._scalars("eval", step, {"loss": loss})

    def _scalars(self, prefix: str, step: int, metrics: dict[str, float]) -> None:
        if self.tb is not None:
            for k, v in metrics.items():
                self.tb.add_scalar(f"{prefix}/{k}", v, step)
        if self.wandb is not None:
            self.wandb.log({f"{prefix}/{k}": v for k, v in metrics.items()}, step=step)

    def close(self) -> None:
        self.bar.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def loss_summary(history: list[tuple[int, float]], eval_history: list[tuple[int, float]], cfg) -> dict[str, Any]:
    """First/min/final loss and the verdict against the loss monitor's thresholds.

    The final loss is the mean of the last 10% of steps (at least one), so one lucky batch does
    not decide the verdict.
    """
    if not history:
        return {"steps_logged": 0}
    losses = [loss for _, loss in history]
    tail = max(1, len(losses) // 10)
    final = sum(losses[-tail:]) / tail
    if final < cfg.overfit_below:
        verdict, note = "overfitting?", f"final loss {final:.3f} is below {cfg.overfit_below}: the adapter may be memorising the data; consider fewer steps or more data"
    elif final > cfg.underfit_above:
        verdict, note = "underfitting", f"final loss {final:.3f} is above {cfg.underfit_above}: consider more steps or a higher learning rate"
    else:
        verdict, note = "ok", f"final loss {final:.3f} is near the target {cfg.loss_target}"
    out: dict[str, Any] = {
        "first": losses[0],
        "min": min(losses),
        "final": final,
        "final_window_steps": tail,
        "target": cfg.loss_target,
        "verdict": verdict,
        "note": note,
        # every step's loss, thinned to at most 200 points for the record
        "history": [[s, round(v, 5)] for s, v in history[:: max(1, len(history) // 200)]],
    }
    if eval_history:
        evals = [v for _, v in eval_history]
        out["eval"] = {"final": evals[-1], "min": min(evals), "history": [[s, round(v, 5)] for s, v in eval_history]}
        if len(evals) > 1 and evals[-1] > min(evals) * 1.1:
            out["eval"]["note"] = "eval loss rose above its minimum by more than 10%: overfitting"
    return out
