"""compose.yaml: valid, one profile per service, GPUs pinned from .env, secrets only from the environment."""

import json
import shutil
import subprocess

import pytest

from conftest import REPO

pytestmark = pytest.mark.docker


def _config(env: dict | None = None) -> dict:
    if shutil.which("docker") is None or subprocess.run(["docker", "compose", "version"], capture_output=True).returncode:
        pytest.skip("docker compose is not installed (tests/run.sh installs it)")
    proc = subprocess.run(["docker", "compose", "--profile", "*", "config", "--format", "json"], cwd=REPO,
                          capture_output=True, text=True, env={"PATH": "/usr/local/bin:/usr/bin:/bin", **(env or {})})
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_compose_config_is_valid_and_complete():
    cfg = _config()
    services = cfg["services"]
    assert set(services) == {"train", "export", "publish", "serve-llamacpp", "serve-unsloth", "serve-cpu"}
    assert services["train"]["profiles"] == ["train"]
    assert services["train"]["ipc"] == "host" and services["train"]["ulimits"]["memlock"] == -1
    for name in ("serve-llamacpp", "serve-cpu"):
        assert services[name]["depends_on"]["export"]["condition"] == "service_completed_successfully"
        assert "healthcheck" in services[name]
    for name in ("train", "export", "serve-cpu", "serve-llamacpp", "serve-unsloth"):
        targets = {v["target"] for v in services[name]["volumes"]}
        assert {"/work/models", "/work/exports", "/work/hf-cache"} <= targets


def test_gpus_come_from_env_and_secrets_from_the_environment():
    cfg = _config({"TRAIN_GPU": "3", "SERVE_LLAMACPP_GPU": "2", "SERVE_UNSLOTH_GPU": "5", "HF_TOKEN": "hf_from_env"})
    dev = lambda s: cfg["services"][s]["deploy"]["resources"]["reservations"]["devices"][0]  # noqa: E731
    assert dev("train")["device_ids"] == ["3"] and dev("serve-llamacpp")["device_ids"] == ["2"]
    assert dev("serve-unsloth")["device_ids"] == ["5"]
    assert "deploy" not in cfg["services"]["serve-cpu"]
    assert cfg["services"]["publish"]["environment"]["HF_TOKEN"] == "hf_from_env"
    text = (REPO / "compose.yaml").read_text()
    assert "hf_" not in text.replace("hf-cache", "")
