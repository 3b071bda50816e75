"""Loss monitor verdicts and the W&B gate."""

from __future__ import annotations

import logging
import sys
from types import SimpleNamespace

import pytest

from gptoss.training.config import TrainConfig
from gptoss.training.monitor import Monitor, loss_summary


@pytest.mark.parametrize(
    "final, verdict",
    [(0.2, "overfitting?"), (0.5, "ok"), (0.9, "ok"), (1.4, "underfitting")],
)
def test_loss_verdicts(final, verdict):
    history = [(i, 3.0 - i * 0.1) for i in range(1, 21)] + [(21 + i, final) for i in range(3)]
    summary = loss_summary(history, [], TrainConfig())
    assert summary["final"] == pytest.approx(final)  # mean of the last 10% of steps (2 of 23)
    assert summary["verdict"] == verdict
    assert summary["first"] == pytest.approx(2.9) and summary["min"] == pytest.approx(min(1.0, final))


def test_eval_loss_rising_is_flagged():
    summary = loss_summary([(1, 1.0), (2, 0.5)], [(1, 0.8), (2, 1.2)], TrainConfig())
    assert "overfitting" in summary["eval"]["note"]


def _cfg():
    return SimpleNamespace(max_steps=3, tensorboard=False, wandb_project="p", logging_steps=1, to_dict=dict)


def test_wandb_only_with_a_key(tmp_path, monkeypatch, caplog):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setitem(sys.modules, "wandb", None)  # importing it would fail: it must not be tried
    m = Monitor(_cfg(), tmp_path, start_step=0, run_name="r")
    assert m.wandb is None
    m.close()

    monkeypatch.setenv("WANDB_API_KEY", "k")
    monkeypatch.setattr(logging.getLogger("gptoss.train"), "propagate", True)  # let caplog see it
    with caplog.at_level(logging.WARNING, logger="gptoss.train"):
        m = Monitor(_cfg(), tmp_path, start_step=0, run_name="r")
        m.close()
    assert m.wandb is None
    assert "WANDB_API_KEY is set but wandb is not installed" in caplog.text
