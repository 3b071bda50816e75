"""docker/locks/train.txt (the CUDA images: train, serve-unsloth) against the CUDA torch pinned in
docker/Dockerfile. CI cannot download that torch (~3 GB with its CUDA libraries), so it checks the
lock by resolution instead: re-resolving the lock's own pins plus the pinned torch for the images'
Python (3.12, Ubuntu 24.04) must give back exactly the lock. Needs PyPI (uv fetches metadata only)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

from conftest import REPO, missing_tool

LOCK = REPO / "docker" / "locks" / "train.txt"
CONSTRAINTS = REPO / "docker" / "locks" / "cuda-constraints.txt"


def pins(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        m = re.match(r"^([A-Za-z0-9_.\-]+)==([^\s;]+)", line.strip())
        if m:
            out[m.group(1).lower().replace("_", "-")] = m.group(2)
    return out


def torch_version() -> str:
    m = re.search(r"^ARG TORCH_VERSION=(\S+)", (REPO / "docker" / "Dockerfile").read_text(), re.M)
    assert m, "docker/Dockerfile has no ARG TORCH_VERSION"
    return m.group(1)


def test_constraints_pin_the_dockerfiles_torch():
    assert pins(CONSTRAINTS.read_text())["torch"] == torch_version()


def test_train_lock_has_unsloth_and_its_gpu_stack():
    locked = pins(LOCK.read_text())
    for name in ("unsloth", "unsloth-zoo", "bitsandbytes", "xformers", "triton", "trl", "peft", "transformers", "fastapi"):
        assert name in locked, f"{name} missing from {LOCK.name}: run docker/lock.sh"
    assert "torch" not in locked  # installed from TORCH_CUDA_INDEX at the version docker/Dockerfile pins


def test_train_lock_resolves_with_the_pinned_cuda_torch():
    if shutil.which("uv") is None:
        missing_tool("uv is in the dev extra: pip install -e '.[dev]'")
    proc = subprocess.run(
        ["uv", "pip", "compile", str(LOCK), "--constraint", str(CONSTRAINTS), "--python-version", "3.12",
         "--python-platform", "x86_64-manylinux_2_28", "--no-header", "--no-annotate", "--quiet"],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, (
        f"{LOCK.relative_to(REPO)} does not resolve with torch=={torch_version()} on Python 3.12 "
        f"(re-run docker/lock.sh after changing TORCH_VERSION):\n{proc.stderr[-3000:]}")
    resolved = pins(proc.stdout)
    locked = pins(LOCK.read_text())
    assert resolved.pop("torch") == torch_version()
    assert resolved == locked  # nothing missing, nothing moved: the lock is complete and consistent
    for name, version in pins(CONSTRAINTS.read_text()).items():
        assert name == "torch" or locked.get(name) == version, f"{name}: lock {locked.get(name)}, constraint {version}"
