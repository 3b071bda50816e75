"""Shared, session-cached inputs for tests/test_merge*.py and tests/test_export*.py.

Built once per pytest session under the session's base temp folder (a marker file says a build
finished), so both test modules reuse the same tiny fixture, adapter run and export.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

DONE = ".built"


def cached(tmp_path_factory, name: str, build) -> Path:
    """``build(path)`` once per session; later callers get the finished folder."""
    path = tmp_path_factory.getbasetemp() / "export-stage" / name
    if (path / DONE).is_file():
        return path
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    build(path)
    (path / DONE).write_text("ok\n")
    return path


def tiny_base(request, tmp_path_factory) -> Path:
    """The lead's ``tiny_model`` fixture when conftest provides it, else our own tiny fixture."""
    try:
        return Path(request.getfixturevalue("tiny_model"))
    except pytest.FixtureLookupError:
        from gptoss.fixtures import fixture

        return cached(tmp_path_factory, "tiny", lambda p: fixture("tiny", out=str(p / "model"))) / "model"


def tiny_run(request, tmp_path_factory) -> Path:
    """models/<run>/ with a seeded random adapter (attention + experts) on the tiny base."""
    base = tiny_base(request, tmp_path_factory)

    def build(p: Path) -> None:
        from lora_fixtures import make_run

        make_run(base, p / "tiny-run", seed=0)

    return cached(tmp_path_factory, "run", build) / "tiny-run"


def tiny_trained_run(request, tmp_path_factory) -> Path:
    """models/tiny-run/ from a real 5-step `gptoss train` on the tiny base (lr 1e-2, so the LoRA B
    matrices, zero at the start, move enough to change the model measurably)."""
    base = tiny_base(request, tmp_path_factory)
    data = Path(__file__).resolve().parent / "data" / "train_tiny.jsonl"

    def build(p: Path) -> None:
        from gptoss import training

        training.train(profile="quick_test", model=str(base), dataset=str(data), output_dir=str(p / "models"),
                       run_name="tiny-run", max_steps=5, batch_size=2, grad_accum=1, learning_rate=1e-2,
                       device="cpu", tensorboard=False)

    return cached(tmp_path_factory, "trained-run", build) / "models" / "tiny-run"


def tiny_export(request, tmp_path_factory) -> dict:
    """The export the CI test asks for: train 5 steps, then F16, Q4_K_M, Q5_K_M and MXFP4_MOE."""
    run = tiny_trained_run(request, tmp_path_factory)

    def build(p: Path) -> None:
        from gptoss.exporters.export import export_run

        export_run(str(run), quants="q4_k_m,q5_k_m", also="mxfp4_moe", exports_dir=str(p), progress=False,
                   threads=min(4, os.cpu_count() or 1))

    root = cached(tmp_path_factory, "exports", build) / "tiny-run"
    import json

    return {"root": root, "run": run, "manifest": json.loads((root / "manifest.json").read_text())}


def prompt_ids() -> list[int]:
    from gptoss import harmony

    return harmony.render_prompt([{"role": "user", "content": "What is the capital of France? Answer briefly."}])


def hf_logits(model_dir, ids, *, adapter=None, merge=False):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter))
        if merge:
            model = model.merge_and_unload()
    model.eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


def tiny_q4_export(request, tmp_path_factory) -> Path:
    """exports/ as `gptoss export --exports-dir` writes it (latest -> tiny-run: merged/, gguf/ F16 + Q4_K_M,
    manifest.json) for the seeded-adapter run, no fidelity runs: what the serving containers read."""
    run = tiny_run(request, tmp_path_factory)

    def build(p: Path) -> None:
        from gptoss.exporters.export import export_run

        export_run(str(run), quants="q4_k_m", exports_dir=str(p / "exports"), fidelity=False, compare_hf="off",
                   progress=False, threads=min(2, os.cpu_count() or 1))

    return cached(tmp_path_factory, "q4-exports", build) / "exports"
