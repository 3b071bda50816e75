"""The CPU images for real: build `export` and `serve-cpu` on the local base, export a tiny training
run in the export container, serve the GGUF from serve-cpu, and ask it with the openai client.

Builds use exactly the knobs users get (docker/README.md): PYTHON_IMAGE, TORCH_CPU_INDEX, the `ca`
build secret and docker/wheelhouse.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from conftest import REPO, docker_build

pytestmark = [pytest.mark.docker, pytest.mark.slow]

# testcontainers' reaper image cannot be pulled here; tests/run.sh sets these too.
os.environ.setdefault("TESTCONTAINERS_RYUK_DISABLED", "true")
os.environ.setdefault("TESTCONTAINERS_CONNECTION_MODE", "docker_host")

WHEELHOUSE = REPO / "docker" / "wheelhouse"
SECRET = f"hf_secret_{uuid.uuid4().hex}"


def _docker(*args: str, check: bool = True, timeout: int = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"docker {' '.join(args)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return proc


@pytest.fixture(scope="session")
def wheelhouse() -> Path:
    """The local wheelhouse knob: the CPU torch wheel, llama-cpp-python (wheel + sdist) from this machine."""
    import sys

    from gptoss import llamacpp

    WHEELHOUSE.mkdir(exist_ok=True)
    pip = [sys.executable, "-m", "pip"]
    if not list(WHEELHOUSE.glob("torch-*.whl")):
        subprocess.run([*pip, "download", "--no-deps", "-d", str(WHEELHOUSE), "torch==2.13.0"], check=True, capture_output=True)
    if not list(WHEELHOUSE.glob("llama_cpp_python-*.whl")):
        # Reuses pip's cache of the wheel built by `pip install -e .[dev]`.
        subprocess.run([*pip, "wheel", "--no-deps", "-w", str(WHEELHOUSE), f"llama-cpp-python=={llamacpp.LLAMA_CPP_PYTHON_VERSION}"],
                       check=True, capture_output=True)
    sdist = WHEELHOUSE / llamacpp.SDIST_NAME
    if not sdist.is_file():
        shutil.copy(llamacpp.sdist(), sdist)
    return WHEELHOUSE


@pytest.fixture(scope="session")
def images(base_image, wheelhouse) -> dict[str, str]:
    tags = {}
    for target in ("export", "serve-cpu"):
        tag = f"gptoss-test/{target}:latest"
        docker_build(REPO, tag, *base_image.build_flags("PYTHON_IMAGE"), "--build-arg", "TORCH_CPU_INDEX=",
                     dockerfile=REPO / "docker" / "Dockerfile", target=target)
        tags[target] = tag
    sizes = {t: int(_docker("image", "inspect", "-f", "{{.Size}}", tag).stdout) for t, tag in tags.items()}
    print("image sizes (MB):", {t: round(s / 1e6) for t, s in sizes.items()})
    return tags


@pytest.fixture(scope="session")
def training_run(tiny_model, tmp_path_factory) -> Path:
    """A real tiny training run (3 steps), in a models/ folder the container user can write next to."""
    import training

    models = tmp_path_factory.mktemp("container-work") / "models"
    run = training.train(profile="quick_test", model=str(tiny_model), dataset=str(REPO / "tests" / "data" / "train_tiny.jsonl"),
                         output_dir=str(models), max_steps=3, batch_size=2, grad_accum=1, device="cpu")
    # Written by root here (safetensors files are 0600); the containers read as uid 1000, as the
    # train container's own output would be readable to them in compose.
    subprocess.run(["chmod", "-R", "a+rX", str(models)], check=True)
    return Path(run)


def _world_writable(*dirs: Path) -> None:
    for d in dirs:
        d.mkdir(parents=True, exist_ok=True)
        os.chmod(d, 0o777)


@pytest.fixture(scope="session")
def exported(images, training_run, tiny_model) -> Path:
    """Run the export container on the training run: merge, F16 + Q4_K_M GGUF, Modelfiles, manifest."""
    work = training_run.parent.parent
    exports = work / "exports"
    _world_writable(exports)
    name = f"gptoss-export-{uuid.uuid4().hex[:6]}"
    run = _docker("run", "--name", name, "-e", f"HF_TOKEN={SECRET}", "-e", "HF_HUB_OFFLINE=1",
                  "-v", f"{training_run.parent}:/work/models", "-v", f"{exports}:/work/exports",
                  "-v", f"{tiny_model}:{tiny_model}:ro",  # the base, at the path training_info.json names
                  images["export"], "export", "--run", f"/work/models/{training_run.name}", "--quants", "q4_k_m",
                  "--exports-dir", "/work/exports", check=False, timeout=1200)
    logs = run.stdout + run.stderr
    _docker("rm", "-f", name, check=False)
    assert run.returncode == 0, logs[-4000:]
    manifest = exports / training_run.name / "manifest.json"
    assert manifest.is_file(), logs[-2000:]
    return manifest


def _wait_healthy(container: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = json.loads(_docker("inspect", "-f", "{{json .State}}", container).stdout)
        if state.get("Health", {}).get("Status") == "healthy":
            return
        if not state.get("Running"):
            raise AssertionError("container exited:\n" + _docker("logs", container, check=False).stderr[-3000:])
        time.sleep(1)  # polling the engine's health status
    raise AssertionError("not healthy in time:\n" + _docker("logs", container, check=False).stderr[-3000:])


def test_export_container_writes_a_complete_manifest(exported):
    manifest = json.loads(exported.read_text())
    quants = {a["quant"] for a in manifest["artifacts"]}
    assert {"f16", "q4_k_m"} <= quants
    for a in manifest["artifacts"]:
        assert (exported.parent / a["path"]).is_file()
        assert a.get("modelfile") and (exported.parent / a["modelfile"]).is_file()


def test_serve_cpu_answers_the_openai_client(images, exported):
    from openai import OpenAI
    from testcontainers.core.container import DockerContainer

    exports = exported.parent.parent
    container = (
        DockerContainer(images["serve-cpu"])
        .with_volume_mapping(str(exports), "/work/exports", "ro")
        .with_env("HF_TOKEN", SECRET)
        .with_exposed_ports(8000)
        .with_command(f"serve --backend llamacpp --model /work/exports/{exported.parent.name} --quant q4_k_m "
                      "--device cpu --host 0.0.0.0 --port 8000 --parallel 2")
    )
    with container:
        cid = container.get_wrapped_container().id
        _wait_healthy(cid)
        client = OpenAI(base_url=f"http://localhost:{container.get_exposed_port(8000)}/v1", api_key="unused")
        served = client.models.list().data[0].id
        resp = client.chat.completions.create(model=served, messages=[{"role": "user", "content": "Hi"}], max_tokens=8)
        choice = resp.choices[0]
        assert choice.finish_reason in ("stop", "length", "tool_calls")
        assert "<|channel|>" not in (choice.message.content or "") and "<|start|>" not in (choice.message.content or "")
        assert resp.usage.completion_tokens >= 1
        uid = _docker("exec", cid, "id", "-u").stdout.strip()
        assert uid != "0", "serve-cpu must not run as root"
    for tag in images.values():
        assert _docker("image", "inspect", "-f", "{{.Config.User}}", tag).stdout.strip() == "gptoss"
        history = _docker("history", "--no-trunc", tag).stdout
        inspect = _docker("image", "inspect", tag).stdout
        assert SECRET not in history and SECRET not in inspect
        assert "BEGIN CERTIFICATE" not in history


def test_serve_cpu_has_no_torch(images):
    run = _docker("run", "--rm", "--entrypoint", "python3", images["serve-cpu"], "-c",
                  "import importlib.util as u; print(u.find_spec('torch') is None)")
    assert run.stdout.strip() == "True"


def test_serve_cpu_without_artifacts_exits_with_one_clear_message(images, tmp_path):
    _world_writable(tmp_path / "empty")
    run = _docker("run", "--rm", "-v", f"{tmp_path / 'empty'}:/work/exports", images["serve-cpu"], "serve",
                  "--backend", "llamacpp", "--model", "/work/exports/latest", "--device", "cpu", check=False, timeout=120)
    assert run.returncode != 0
    errors = [line for line in run.stderr.splitlines() if line.startswith("gptoss: error:")]
    assert len(errors) == 1 and "/work/exports/latest" in errors[0], run.stderr[-2000:]


def test_gpu_id_that_does_not_exist_exits_with_one_clear_message(images, exported):
    run = _docker("run", "--rm", "-v", f"{exported.parent.parent}:/work/exports:ro", images["serve-cpu"], "serve",
                  "--backend", "llamacpp", "--model", f"/work/exports/{exported.parent.name}", "--quant", "q4_k_m",
                  "--device", "cuda:3", check=False, timeout=120)
    assert run.returncode != 0
    errors = [line for line in run.stderr.splitlines() if line.startswith("gptoss: error:")]
    assert len(errors) == 1 and "cuda:3" in errors[0], run.stderr[-2000:]


def test_publish_without_token_exits_with_one_clear_message(images, exported):
    run = _docker("run", "--rm", "-e", "HF_HUB_OFFLINE=1", "-v", f"{exported.parent.parent}:/work/exports:ro", images["export"],
                  "publish", "--run", f"/work/exports/{exported.parent.name}", "--repo-id", "someone/tiny", "--what", "gguf",
                  check=False, timeout=120)
    assert run.returncode != 0
    errors = [line for line in run.stderr.splitlines() if line.startswith("gptoss: error:")]
    assert len(errors) == 1 and "HF_TOKEN" in errors[0], run.stderr[-2000:]


def test_cuda_images_build_as_far_as_this_machine_allows(base_image):
    """The CUDA images' stages that need neither nvcc nor a CUDA torch download, on the local base in
    place of nvidia/cuda: the CUDA builder + serving venv (serve-llamacpp's Python side) and the
    runtime stage train / serve-unsloth / serve-llamacpp share. llama.cpp's CUDA build (nvcc) and the
    ~3 GB CUDA torch are left to the GPU run in docker/README.md; the train lock's consistency with
    that torch is tests/test_locks.py."""
    flags = [*base_image.build_flags("CUDA_DEVEL_IMAGE"), "--build-arg", f"CUDA_RUNTIME_IMAGE={base_image.name}"]
    tags = {}
    for target in ("cuda-serve-venv", "cuda-runtime"):
        tags[target] = f"gptoss-test/{target}:latest"
        docker_build(REPO, tags[target], *flags, dockerfile=REPO / "docker" / "Dockerfile", target=target)
    venv = _docker("run", "--rm", "--entrypoint", "/opt/venv/bin/python3", tags["cuda-serve-venv"], "-c",
                   "import importlib.util, serving, gptoss.cli; print(importlib.util.find_spec('torch') is None)")
    assert venv.stdout.strip() == "True"  # the llama.cpp serving image carries no torch
    user = _docker("run", "--rm", "--user", "gptoss", "--entrypoint", "id", tags["cuda-runtime"])
    assert "uid=1000(gptoss)" in user.stdout
    workdir = _docker("run", "--rm", "--user", "gptoss", "--entrypoint", "sh", tags["cuda-runtime"], "-c",
                      "touch /work/models/x /work/exports/x && echo writable")
    assert workdir.stdout.strip() == "writable"


def test_train_image_builds_with_the_cuda_torch(base_image):
    """The whole train image (serve-unsloth shares its venv) on the local base in place of nvidia/cuda:
    the CUDA torch and the Unsloth stack from PyPI (~3 GB), torch/CUDA asserted and `pip check` at
    build, the training stack importable without a GPU. Building it here first found torchao 0.18
    breaking `import peft` on torch 2.8 (docker/locks/cuda-constraints.txt)."""
    tag = "gptoss-test/train:latest"
    docker_build(REPO, tag, *base_image.build_flags("CUDA_DEVEL_IMAGE"), "--build-arg", f"CUDA_RUNTIME_IMAGE={base_image.name}",
                 "--build-arg", "TORCH_CUDA_INDEX=", dockerfile=REPO / "docker" / "Dockerfile", target="train")
    try:
        stack = _docker("run", "--rm", "--entrypoint", "python3", tag, "-c",
                        "import torch, peft, trl, transformers, bitsandbytes, xformers, training; "
                        "print(torch.__version__, torch.version.cuda, torch.cuda.is_available())")
        assert stack.stdout.split()[-3:] == ["2.8.0+cu128", "12.8", "False"], stack.stdout + stack.stderr
        assert _docker("run", "--rm", "--entrypoint", "id", tag, "-un").stdout.strip() == "gptoss"
        # No GPU here: the train command stops before loading anything, with one line that says why.
        run = _docker("run", "--rm", "-e", "HF_HUB_OFFLINE=1", tag, "train", "--profile", "quick_test", "--device", "cuda",
                      check=False)
        assert run.returncode != 0
        assert "gptoss: error:" in run.stderr and "CUDA was requested but is not available" in run.stderr, run.stderr[-2000:]
    finally:
        _docker("image", "rm", tag, check=False)  # ~8.6 GB; BuildKit's cache keeps the layers for the next build
