"""compose.yaml: valid, one profile per service, GPUs pinned from .env, secrets only from the environment."""

import importlib.util
import json
import os
import re
import subprocess
import sys

import pytest

from conftest import REPO, compose_config

from gptoss.folders import Folders

pytestmark = pytest.mark.docker


def test_compose_config_is_valid_and_complete():
    cfg = compose_config()
    services = cfg["services"]
    assert set(services) == {"train", "export", "publish", "serve-llamacpp", "serve-unsloth", "serve-cpu", "serve-lb", "serve-vllm", "ui"}
    assert services["train"]["profiles"] == ["train"]
    assert services["train"]["ipc"] == "host" and services["train"]["ulimits"]["memlock"] == -1
    for name in ("serve-llamacpp", "serve-cpu"):
        assert services[name]["depends_on"]["export"]["condition"] == "service_completed_successfully"
        assert "healthcheck" in services[name]
    for name in ("train", "export", "serve-cpu", "serve-llamacpp", "serve-unsloth"):
        targets = {v["target"] for v in services[name]["volumes"]}
        assert {"/work/models", "/work/exports", "/work/hf-cache"} <= targets


def test_gpus_come_from_env_and_secrets_from_the_environment():
    cfg = compose_config({"TRAIN_GPU": "3", "SERVE_LLAMACPP_GPU": "2", "SERVE_UNSLOTH_GPU": "5", "HF_TOKEN": "hf_from_env"})
    dev = lambda s: cfg["services"][s]["deploy"]["resources"]["reservations"]["devices"][0]  # noqa: E731
    assert dev("train")["device_ids"] == ["3"] and dev("serve-llamacpp")["device_ids"] == ["2"]
    assert dev("serve-unsloth")["device_ids"] == ["5"]
    assert "deploy" not in cfg["services"]["serve-cpu"]
    assert cfg["services"]["publish"]["environment"]["HF_TOKEN"] == "hf_from_env"
    text = (REPO / "compose.yaml").read_text()
    assert "hf_" not in text.replace("hf-cache", "")


def _flag(command: list[str], flag: str) -> str:
    assert command.count(flag) == 1, (flag, command)
    return command[command.index(flag) + 1]


def test_each_stage_reads_where_the_one_before_writes():
    """train writes models/latest; export reads it and switches exports/latest (--exports-dir, not
    --out: --out writes no link); serve-* and publish read exports/latest; serve-unsloth models/latest."""
    services = compose_config()["services"]
    train = services["train"]["command"]
    export = services["export"]["command"]
    # the folder conventions are gptoss.folders' (the same object every stage resolves paths with)
    folders = Folders.of(models_dir=_flag(train, "--output-dir"), exports_dir=_flag(export, "--exports-dir"))
    assert (str(folders.models_dir), str(folders.exports_dir)) == ("/work/models", "/work/exports")
    assert "--out" not in export
    assert _flag(export, "--run") == str(folders.latest_run)
    for name in ("serve-cpu", "serve-llamacpp"):
        assert _flag(services[name]["command"], "--model") == str(folders.latest_export)
    assert _flag(services["publish"]["command"], "--run") == str(folders.latest_export)
    assert _flag(services["serve-unsloth"]["command"], "--model") == str(folders.latest_run)


def test_ui_points_at_a_serve_service_by_name_and_keeps_the_key_in_the_environment():
    """`docker compose up ui` brings export and serve-cpu with it; the page is on loopback; the key comes
    only from the environment (into the ui process, never into the page)."""
    services = compose_config({"GPTOSS_API_KEY": "sk-from-env"})["services"]
    ui = services["ui"]
    assert _flag(ui["command"], "--url") == "http://serve-cpu:8000/v1"
    assert ui["depends_on"]["serve-cpu"]["condition"] == "service_healthy"
    assert "ui" in services["serve-cpu"]["profiles"] and "ui" in services["export"]["profiles"]
    assert [(p["host_ip"], p["target"]) for p in ui["ports"]] == [("127.0.0.1", 7860)]
    assert ui["environment"] == {"GPTOSS_API_KEY": "sk-from-env"}
    assert "healthcheck" in ui and ui["build"]["target"] == "ui"
    other = compose_config({"UI_SERVE_URL": "http://serve-llamacpp:8000/v1"})["services"]["ui"]
    assert _flag(other["command"], "--url") == "http://serve-llamacpp:8000/v1"


def test_servers_are_published_on_loopback_and_take_the_key_from_the_environment():
    """Every serve-* port is on 127.0.0.1 unless SERVE_BIND widens it; GPTOSS_API_KEY reaches each server
    (it reads it as its --api-key) and is never written in compose.yaml."""
    servers = ("serve-cpu", "serve-llamacpp", "serve-unsloth")
    services = compose_config({"GPTOSS_API_KEY": "sk-from-env"})["services"]
    for name in servers:
        assert [p["host_ip"] for p in services[name]["ports"]] == ["127.0.0.1"], name
        assert services[name]["environment"]["GPTOSS_API_KEY"] == "sk-from-env", name
        assert "--api-key" not in services[name]["command"]
    wide = compose_config({"SERVE_BIND": "0.0.0.0"})["services"]
    assert all([p["host_ip"] for p in wide[name]["ports"]] == ["0.0.0.0"] for name in servers)
    assert "SERVE_BIND=127.0.0.1" in (REPO / ".env.example").read_text().splitlines()
    assert "sk-" not in (REPO / "compose.yaml").read_text()


def test_servers_restart_when_they_exit():
    """A server whose engine cannot be kept up exits non-zero (--engine-restarts); Docker starts it again."""
    services = compose_config()["services"]
    assert {name: services[name].get("restart") for name in ("serve-cpu", "serve-llamacpp", "serve-unsloth")} == dict.fromkeys(
        ("serve-cpu", "serve-llamacpp", "serve-unsloth"), "unless-stopped")
    assert "restart" not in services["train"] and "restart" not in services["export"]  # jobs that finish


def _replicas_config(tmp_path, gpus: str, env: dict | None = None) -> dict:
    """compose.yaml plus the override docker/replicas.py writes for SERVE_GPUS=``gpus``, as compose resolves it."""
    override = tmp_path / "compose.replicas.yaml"
    run = subprocess.run([sys.executable, str(REPO / "docker" / "replicas.py"), str(override)], capture_output=True, text=True,
                         env={"PATH": os.environ["PATH"], "SERVE_GPUS": gpus})
    assert run.returncode == 0, run.stderr
    compose_config()  # skips or fails as every compose test does when compose is missing
    proc = subprocess.run(["docker", "compose", "-f", str(REPO / "compose.yaml"), "-f", str(override), "--profile", "*",
                           "config", "--format", "json"], cwd=REPO, capture_output=True, text=True,
                          env={"PATH": "/usr/local/bin:/usr/bin:/bin", **(env or {})})
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)["services"]


def test_serve_replicas_runs_one_llamacpp_replica_per_listed_gpu_behind_haproxy(tmp_path):
    """SERVE_GPUS=0,1 -> serve-replica-0 on GPU 0 and serve-replica-1 on GPU 1, each serve-llamacpp's command,
    health check and restart policy, unpublished; serve-lb (HAProxy) is the one port, on loopback."""
    services = _replicas_config(tmp_path, "0,1", {"GPTOSS_API_KEY": "sk-from-env"})
    llamacpp = services["serve-llamacpp"]
    replicas = sorted(n for n in services if n.startswith("serve-replica-"))
    assert replicas == ["serve-replica-0", "serve-replica-1"]
    for gpu, name in enumerate(replicas):
        r = services[name]
        assert r["profiles"] == ["serve-replicas"] and not r.get("ports"), name
        assert r["deploy"]["resources"]["reservations"]["devices"] == [
            {"driver": "nvidia", "device_ids": [str(gpu)], "capabilities": ["gpu"]}], name
        assert r["command"] == llamacpp["command"] and _flag(r["command"], "--device") == "cuda:0"  # its only GPU
        assert r["healthcheck"] == llamacpp["healthcheck"] and r["restart"] == "unless-stopped"
        assert r["depends_on"]["export"]["condition"] == "service_completed_successfully"
        assert r["environment"]["GPTOSS_API_KEY"] == "sk-from-env" and r["image"] == llamacpp["image"]
    lb = services["serve-lb"]
    assert lb["profiles"] == ["serve-replicas"] and lb["build"]["target"] == "serve-lb"
    assert set(lb["depends_on"]) == set(replicas) and "healthcheck" in lb and lb["restart"] == "unless-stopped"
    assert [(p["host_ip"], p["target"]) for p in lb["ports"]] == [("127.0.0.1", 8000)]
    assert "serve-replicas" in services["export"]["profiles"]
    wide = _replicas_config(tmp_path, "3", {"SERVE_BIND": "0.0.0.0", "SERVE_LB_PORT": "9000"})
    assert [(p["host_ip"], p["published"]) for p in wide["serve-lb"]["ports"]] == [("0.0.0.0", "9000")]
    assert [n for n in wide if n.startswith("serve-replica-")] == ["serve-replica-0"]
    assert wide["serve-replica-0"]["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"] == ["3"]
    # HAProxy balances by least connections, checks /health, and has a server line for every replica name
    cfg = (REPO / "docker" / "haproxy.cfg").read_text()
    assert re.search(r"^\s+balance leastconn$", cfg, re.M) and re.search(r"^\s+option httpchk GET /health$", cfg, re.M)
    spec = importlib.util.spec_from_file_location("replicas", REPO / "docker" / "replicas.py")
    replicas_mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(replicas_mod)
    servers = re.findall(r"^\s+server (serve-replica-\d+) \1:8000$", cfg, re.M)
    assert servers == [replicas_mod.replica_name(k) for k in range(replicas_mod.MAX_REPLICAS)]
    assert "serve-lb" in (REPO / "docker" / "Dockerfile").read_text() and "!docker/haproxy.cfg" in (REPO / ".dockerignore").read_text()


def test_serve_gpus_comes_from_the_environment_then_dotenv_and_bad_lists_are_refused(tmp_path):
    spec = importlib.util.spec_from_file_location("replicas", REPO / "docker" / "replicas.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    dotenv = tmp_path / ".env"
    dotenv.write_text("SERVE_BIND=127.0.0.1\nSERVE_GPUS=2,3  # two cards\n")
    assert mod.gpus_from({}, dotenv) == ("2,3", str(dotenv))
    assert mod.gpus_from({"SERVE_GPUS": "1"}, dotenv) == ("1", "the environment")
    assert mod.gpus_from({}, tmp_path / "none") == ("0,1", "the default")
    assert mod.parse_gpus(" 0, GPU-5f2c3a1b-0000-1111-2222-333344445555 ", "x") == ["0", "GPU-5f2c3a1b-0000-1111-2222-333344445555"]
    assert "SERVE_GPUS=0,1" in (REPO / ".env.example").read_text().splitlines()
    for bad, says in (("0,0", "twice"), ("0;1", "not a GPU index"), ("", "no GPU"), (",".join(map(str, range(9))), "server lines")):
        run = subprocess.run([sys.executable, str(REPO / "docker" / "replicas.py"), str(tmp_path / "out.yaml")],
                             capture_output=True, text=True, env={"PATH": os.environ["PATH"], "SERVE_GPUS": bad})
        assert run.returncode == 2 and not (tmp_path / "out.yaml").exists(), bad
        (line,) = run.stderr.splitlines()
        assert line.startswith("docker/replicas.py: error: SERVE_GPUS=") and says in line and "the environment" in line, line


def test_train_takes_the_gpus_listed_in_train_gpus_and_runs_one_process_per_gpu():
    """TRAIN_GPUS=0,1: one reservation whose device_ids element is "0,1" (the daemon joins device_ids with
    commas into NVIDIA_VISIBLE_DEVICES, so that is both GPUs) and `--gpus all`, so the container starts one
    process per GPU it sees; one GPU keeps the plain path. TRAIN_GPU, the older single-id name, still works."""
    dev = lambda cfg: cfg["services"]["train"]["deploy"]["resources"]["reservations"]["devices"]  # noqa: E731
    two = compose_config({"TRAIN_GPUS": "0,1"})
    assert [(d["driver"], d["device_ids"], d["capabilities"]) for d in dev(two)] == [("nvidia", ["0,1"], ["gpu"])]
    train = two["services"]["train"]
    assert _flag(train["command"], "--gpus") == "all" and train["ipc"] == "host"
    assert dev(compose_config())[0]["device_ids"] == ["0"]
    assert dev(compose_config({"TRAIN_GPU": "1"}))[0]["device_ids"] == ["1"]
    assert dev(compose_config({"TRAIN_GPU": "1", "TRAIN_GPUS": "2,3"}))[0]["device_ids"] == ["2,3"]
    # what the command does with `--gpus all` in a container that sees one or two GPUs
    from gptoss.training import distributed

    assert distributed.plan("all", device="cuda", visible_gpus=1)[0].launcher == "plain"
    assert distributed.plan("all", device="cuda", visible_gpus=2)[0].processes == 2


def test_each_two_gpu_profile_starts_only_its_services(tmp_path):
    """With the override, `--profile serve-replicas` is export + the replicas + serve-lb (serve-llamacpp, whose
    definition they extend, stays out) and `--profile serve-vllm` is export + serve-vllm."""
    override = tmp_path / "compose.replicas.yaml"
    run = subprocess.run([sys.executable, str(REPO / "docker" / "replicas.py"), str(override)], capture_output=True, text=True,
                         env={"PATH": os.environ["PATH"], "SERVE_GPUS": "0,1"})
    assert run.returncode == 0, run.stderr
    compose_config()

    def services(profile: str) -> set[str]:
        proc = subprocess.run(["docker", "compose", "-f", str(REPO / "compose.yaml"), "-f", str(override), "--profile", profile,
                               "config", "--services"], cwd=REPO, capture_output=True, text=True, env={"PATH": "/usr/local/bin:/usr/bin:/bin"})
        assert proc.returncode == 0, proc.stderr
        return set(proc.stdout.split())

    assert services("serve-replicas") == {"export", "serve-replica-0", "serve-replica-1", "serve-lb"}
    assert services("serve-vllm") == {"export", "serve-vllm"}
