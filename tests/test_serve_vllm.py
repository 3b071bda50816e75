"""serve-vllm (issue 17, item 3): what can be checked without vLLM. vLLM's CUDA image cannot be pulled or
run here (no registry, no GPU), so these check compose's resolved service: the vLLM flags, the GPUs and
tensor-parallel size, the key, and that the folder it serves is what `gptoss export` really writes.
The entrypoint's shell runs with stand-ins for `nvidia-smi` and `vllm` (neither exists here); said so below.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import export_support as sup
from conftest import REPO, compose_config
from gptoss.folders import Folders

pytestmark = pytest.mark.docker  # docker compose resolves the config


def _flag(command: list[str], flag: str) -> str:
    assert command.count(flag) == 1, (flag, command)
    return command[command.index(flag) + 1]


def test_serve_vllm_runs_vllms_own_server_with_the_gpt_oss_parsers():
    services = compose_config({"GPTOSS_API_KEY": "sk-from-env"})["services"]
    vllm = services["serve-vllm"]
    assert vllm["profiles"] == ["serve-vllm"] and vllm["image"].startswith("vllm/vllm-openai:v")
    assert "build" not in vllm  # vLLM's release image, not one of ours
    command = vllm["command"]
    assert _flag(command, "--reasoning-parser") == "openai_gptoss" and _flag(command, "--tool-call-parser") == "openai"
    assert "--enable-auto-tool-choice" in command and "--tensor-parallel-size" not in command  # the entrypoint adds it
    assert (_flag(command, "--host"), _flag(command, "--port")) == ("0.0.0.0", "8000")
    assert command[0] == str(Folders.of(exports_dir="/work/exports").merged_dir("latest"))
    assert vllm["environment"]["VLLM_API_KEY"] == "sk-from-env" and "--api-key" not in command
    assert [(p["host_ip"], p["target"]) for p in vllm["ports"]] == [("127.0.0.1", 8000)]
    assert vllm["ipc"] == "host" and vllm["restart"] == "unless-stopped" and "healthcheck" in vllm
    assert vllm["depends_on"]["export"]["condition"] == "service_completed_successfully"
    assert "serve-vllm" in services["export"]["profiles"]
    assert vllm["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"] == ["0"]
    assert compose_config({"SERVE_VLLM_GPU": "1"})["services"]["serve-vllm"]["deploy"]["resources"][
        "reservations"]["devices"][0]["device_ids"] == ["1"]


def test_the_override_gives_serve_vllm_every_listed_gpu(tmp_path):
    override = tmp_path / "compose.replicas.yaml"
    run = subprocess.run([sys.executable, str(REPO / "docker" / "replicas.py"), str(override)], capture_output=True, text=True,
                         env={"PATH": os.environ["PATH"], "SERVE_GPUS": "0,1"})
    assert run.returncode == 0, run.stderr
    compose_config()
    proc = subprocess.run(["docker", "compose", "-f", str(REPO / "compose.yaml"), "-f", str(override), "--profile", "*",
                           "config", "--format", "json"], cwd=REPO, capture_output=True, text=True,
                          env={"PATH": "/usr/local/bin:/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr
    vllm = json.loads(proc.stdout)["services"]["serve-vllm"]
    assert vllm["deploy"]["resources"]["reservations"]["devices"] == [
        {"driver": "nvidia", "device_ids": ["0", "1"], "capabilities": ["gpu"]}]


def _stub(folder: Path, name: str, body: str) -> None:
    path = folder / name
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(0o755)


@pytest.mark.parametrize("gpus", [2, 1, 0])
def test_the_tensor_parallel_size_is_the_number_of_gpus_the_container_sees(tmp_path, gpus):
    """The entrypoint compose resolves, run by /bin/sh as the container would, with stand-ins: `nvidia-smi -L`
    listing ``gpus`` GPUs (as the NVIDIA runtime shows the reserved ones) and `vllm` printing its arguments."""
    vllm = compose_config()["services"]["serve-vllm"]
    entrypoint = [part.replace("$$", "$") for part in vllm["entrypoint"]]  # compose un-escapes $$ when it runs it
    lines = "\n".join(f"echo 'GPU {i}: NVIDIA GeForce RTX 3090 (UUID: GPU-{i:08d})'" for i in range(gpus))
    _stub(tmp_path, "nvidia-smi", lines or "exit 0")
    _stub(tmp_path, "vllm", 'for a in "$@"; do echo "$a"; done')
    run = subprocess.run([*entrypoint, *vllm["command"]], capture_output=True, text=True,
                         env={"PATH": f"{tmp_path}:/usr/bin:/bin"})
    if gpus == 0:
        assert run.returncode == 2 and run.stderr.startswith("serve-vllm: error: no GPU visible"), run.stderr
        return
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines() == ["serve", *vllm["command"], "--tensor-parallel-size", str(gpus)]


@pytest.fixture(scope="module")
def exported(request, tmp_path_factory) -> Path:
    return sup.tiny_q4_export(request, tmp_path_factory)


def test_the_folder_serve_vllm_reads_is_the_merged_model_export_writes(exported):
    """compose mounts ./exports at /work/exports; the command's model path, read on the real export, is the
    merged transformers checkpoint vLLM loads: gpt_oss config, safetensors weights, tokenizer."""
    command = compose_config()["services"]["serve-vllm"]["command"]
    inside = Path(command[0]).relative_to("/work/exports")
    merged = (exported / inside).resolve()
    assert merged == (Folders.of(exports_dir=str(exported)).merged_dir("tiny-run")).resolve()
    config = json.loads((merged / "config.json").read_text())
    assert config["model_type"] == "gpt_oss" and config["architectures"] == ["GptOssForCausalLM"]
    assert list(merged.glob("*.safetensors")) and (merged / "tokenizer.json").is_file()
    assert (merged / "tokenizer_config.json").is_file()
