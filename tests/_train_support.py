"""Shared pieces of the training tests (imported by tests/test_train_*.py).

``tiny_model`` is the session fixture of tests/conftest.py.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

DATA = Path(__file__).parent / "data"
TRAIN_JSONL = DATA / "train_tiny.jsonl"
# Imported into several test modules, so pytest sees several fixtures: build once per process.
_BUILT: dict[str, Path] = {}


@pytest.fixture(scope="session")
def memorisable_model(tiny_model) -> Path:
    """The tiny fixture with its final RMSNorm weight scaled by 8.

    Why: the fixture's lm_head rows have norm ~0.02*sqrt(256) and the final norm pins hidden
    states to norm 16, so no hidden state can give any token a logit above ~5 against 201k
    near-zero others: with the head frozen (as LoRA keeps it) the loss cannot go below ~7 nats
    from ~12. Scaling the final norm (a frozen base weight) lifts that ceiling; LoRA still has to
    learn everything that lowers the loss.
    """
    if "memorisable" not in _BUILT:
        from safetensors.torch import load_file, save_file

        out = tiny_model.parent / "tiny-memorisable"
        shutil.copytree(tiny_model, out, ignore=shutil.ignore_patterns("model.safetensors"))
        weights = load_file(str(tiny_model / "model.safetensors"))
        weights["model.norm.weight"] = weights["model.norm.weight"] * 8
        save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
        _BUILT["memorisable"] = out
    return _BUILT["memorisable"]


@pytest.fixture(scope="session")
def tokenizer():
    from gptoss.tokenizer import build_tokenizer

    return build_tokenizer()


# Flags that keep CPU runs short: one micro-batch per step, no checkpointed recompute.
FAST = ["--batch-size", "2", "--grad-accum", "1", "--gradient-checkpointing", "off"]


def cli(*args: str) -> int:
    from gptoss.cli import main

    return main([str(a) for a in args])


def env_without_cuda() -> dict[str, str]:
    return {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
