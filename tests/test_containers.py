"""The CPU images for real: build `export` and `serve-cpu` on the local base, export a tiny training
run in the export container, serve the GGUF from serve-cpu, and ask it with the openai client. The
containers run the commands of compose.yaml's services as `docker compose config` resolves them.

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

from conftest import REPO, compose_config, docker_build, hub_cache_holding

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
    """The local wheelhouse knob: the CPU torch wheel and the llama-cpp-python sdist (llama.cpp's
    source; the images build it) from this machine."""
    import sys

    from gptoss import llamacpp

    WHEELHOUSE.mkdir(exist_ok=True)
    pip = [sys.executable, "-m", "pip"]
    if not list(WHEELHOUSE.glob("torch-*.whl")):
        subprocess.run([*pip, "download", "--no-deps", "-d", str(WHEELHOUSE), "torch==2.13.0"], check=True, capture_output=True)
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


HUB_ID = "gptoss-fixtures/tiny"  # the tiny fixture, found only in a Hugging Face cache folder


@pytest.fixture(scope="session")
def training_run(tiny_model, tmp_path_factory) -> Path:
    """A real tiny training run (3 steps) through the CLI, offline, on a base that is a Hub id found
    in an HF cache, in a models/ folder the container user can write next to."""
    import sys

    work = tmp_path_factory.mktemp("container-work")
    commit = uuid.uuid5(uuid.NAMESPACE_URL, HUB_ID).hex + "00000000"  # 40 hex digits, like a git sha
    hub_cache_holding(tiny_model, HUB_ID, work / "hf-cache" / "hub", commit)
    env = {**os.environ, "HF_HOME": str(work / "hf-cache"), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "gptoss", "train", "--profile", "quick_test", "--model", HUB_ID,
                           "--dataset", str(REPO / "tests" / "data" / "train_tiny.jsonl"), "--output-dir", str(work / "models"),
                           "--max-steps", "3", "--batch-size", "2", "--grad-accum", "1", "--device", "cpu"],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = (work / "models" / "latest").resolve()
    info = json.loads((run / "training_info.json").read_text())
    assert (info["base_model"], info["base_model_revision"]) == (HUB_ID, commit)
    # Written by root here (safetensors files are 0600); the containers read as uid 1000, as the
    # train container's own output would be readable to them in compose.
    subprocess.run(["chmod", "-R", "a+rX", str(work)], check=True)
    return run


def compose_command(service: str, **env: str) -> list[str]:
    """The command compose.yaml gives ``service``, with ``env`` in place of .env."""
    return compose_config(env)["services"][service]["command"]


def _world_writable(*dirs: Path) -> None:
    for d in dirs:
        d.mkdir(parents=True, exist_ok=True)
        os.chmod(d, 0o777)


@pytest.fixture(scope="session")
def exported(images, training_run) -> Path:
    """compose's export service on the training run (models/latest), with no network: the base comes
    from the mounted HF cache (HF_HUB_OFFLINE=1). Merge, F16 + Q4_K_M GGUF, Modelfiles, manifest,
    exports/latest."""
    work = training_run.parent.parent
    exports = work / "exports"
    _world_writable(exports)
    name = f"gptoss-export-{uuid.uuid4().hex[:6]}"
    run = _docker("run", "--name", name, "--network", "none", "-e", f"HF_TOKEN={SECRET}", "-e", "HF_HUB_OFFLINE=1",
                  "-v", f"{training_run.parent}:/work/models", "-v", f"{exports}:/work/exports",
                  "-v", f"{work / 'hf-cache'}:/work/hf-cache:ro",
                  images["export"], *compose_command("export", EXPORT_QUANTS="q4_k_m"), check=False, timeout=1200)
    logs = run.stdout + run.stderr
    _docker("rm", "-f", name, check=False)
    assert run.returncode == 0, logs[-4000:]
    manifest = exports / training_run.name / "manifest.json"
    assert manifest.is_file(), logs[-2000:]
    assert os.readlink(exports / "latest") == training_run.name  # relative: valid inside and outside
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
        .with_command(compose_command("serve-cpu", SERVE_QUANT="q4_k_m", SERVE_PARALLEL="2"))
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
                  "--backend", "llamacpp", "--model", "/work/exports/latest", "--quant", "q4_k_m",
                  "--device", "cuda:3", check=False, timeout=120)
    assert run.returncode != 0
    errors = [line for line in run.stderr.splitlines() if line.startswith("gptoss: error:")]
    assert len(errors) == 1 and "cuda:3" in errors[0], run.stderr[-2000:]


def test_export_image_publishes_with_its_own_hub_client(images, exported):
    """compose's publish command in the export image, whose huggingface_hub (2.x) is not the one the
    publish tests run with, against tests/fakehub.py on the host's loopback (--network host; the
    real Hub cannot be reached from CI). Every GGUF and Modelfile arrives with its manifest sha256."""
    from fakehub import FakeHub

    hub = FakeHub()
    hub.start()
    token = next(iter(hub.users))
    try:
        run = _docker("run", "--rm", "--network", "host", "-e", f"HF_TOKEN={token}", "-e", f"HF_ENDPOINT={hub.url}",
                      "-e", "HF_HUB_DISABLE_XET=1", "-v", f"{exported.parent.parent}:/work/exports",
                      "-v", f"{exported.parent.parent.parent / 'models'}:/work/models:ro", images["export"],
                      *compose_command("publish", HF_REPO_ID="acme/tiny-GGUF"), check=False, timeout=600)
        assert run.returncode == 0, run.stderr[-3000:]
        assert token not in run.stdout + run.stderr
        files = hub.files("acme/tiny-GGUF")
    finally:
        hub.stop()
    import hashlib

    manifest = json.loads(exported.read_text())
    for a in manifest["artifacts"]:
        for key, digest in (("path", "sha256"), ("modelfile", "modelfile_sha256")):
            data = files[Path(a[key]).name]
            assert hashlib.sha256(data).hexdigest() == a[digest], a[key]
    assert "README.md" in files and b"base_model_relation: quantized" in files["README.md"]
    (exported.parent / "published.json").unlink(missing_ok=True)  # leave the export as the other tests expect it


def test_publish_without_token_exits_with_one_clear_message(images, exported):
    run = _docker("run", "--rm", "-e", "HF_HUB_OFFLINE=1", "-v", f"{exported.parent.parent}:/work/exports:ro", images["export"],
                  *compose_command("publish", HF_REPO_ID="someone/tiny"), check=False, timeout=120)
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
                   "import importlib.util, gptoss.serving, gptoss.cli; print(importlib.util.find_spec('torch') is None)")
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
                        "import torch, peft, trl, transformers, bitsandbytes, xformers, gptoss.training; "
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
