"""Replicas behind one endpoint (compose profile serve-replicas), on CPU: two serve-cpu replicas behind
serve-lb (HAProxy, docker/haproxy.cfg) on one user network, as compose runs them, each with compose's
serve-cpu command on a real tiny export and an API key. Requests spread over both; one replica killed
mid-load loses only the requests in flight on it; the balancer sends it traffic again once it is back.
Containers are reached only through their ports published on 127.0.0.1.

The GPU replicas (serve-llamacpp per GPU) are the same server with --device cuda:0; their compose
config is checked in tests/test_compose.py, their run is left to a GPU host (README "Two GPUs").
"""

from __future__ import annotations

import functools
import json
import os
import re
import subprocess
import threading
import time
import uuid
from pathlib import Path

import pytest

import export_support as sup
from conftest import REPO, compose_config, docker_build

pytestmark = [pytest.mark.docker, pytest.mark.slow]

os.environ.setdefault("TESTCONTAINERS_RYUK_DISABLED", "true")
os.environ.setdefault("TESTCONTAINERS_CONNECTION_MODE", "docker_host")

KEY = f"sk-replicas-{uuid.uuid4().hex[:8]}"
REPLICA_HEADER = "x-gptoss-replica"
CHAT = "/v1/chat/completions"


def _docker(*args: str, check: bool = True, timeout: int = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"docker {' '.join(args)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return proc


def _poll(what: str, condition, timeout: float, every: float = 0.5):
    """condition() until truthy, else fail naming ``what``; the wait is on a condition, not a time."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(every)  # polling interval
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


@pytest.fixture(scope="session")
def lb_images(base_image) -> dict[str, str]:
    from gptoss import llamacpp
    import shutil

    wheelhouse = REPO / "docker" / "wheelhouse"
    wheelhouse.mkdir(exist_ok=True)
    if not (wheelhouse / llamacpp.SDIST_NAME).is_file():
        shutil.copy(llamacpp.sdist(), wheelhouse / llamacpp.SDIST_NAME)
    tags = {}
    for target in ("serve-cpu", "serve-lb"):
        tags[target] = f"gptoss-test/{target}:latest"
        docker_build(REPO, tags[target], *base_image.build_flags("PYTHON_IMAGE"), "--build-arg", "TORCH_CPU_INDEX=",
                     dockerfile=REPO / "docker" / "Dockerfile", target=target)
    return tags


@pytest.fixture(scope="session")
def replica_export(request, tmp_path_factory) -> Path:
    """A real tiny export (tests/export_support.py: seeded adapter run, F16 + Q4_K_M), readable by uid 1000."""
    exports = sup.tiny_q4_export(request, tmp_path_factory)
    subprocess.run(["chmod", "-R", "a+rX", str(exports)], check=True)
    return exports


class Replica:
    """One serve-cpu container named serve-replica-<k> on the network (the name haproxy.cfg resolves)."""

    def __init__(self, image: str, network: str, k: int, exports: Path, command: list[str]):
        self.alias = f"serve-replica-{k}"
        self.name = f"{network}-{self.alias}"
        _docker("run", "-d", "--name", self.name, "--network", network, "--network-alias", self.alias,
                "-e", f"GPTOSS_API_KEY={KEY}", "-v", f"{exports}:/work/exports:ro", "-p", "127.0.0.1::8000",
                image, *command)

    def url(self) -> str:  # the published port; it may change when the container starts again
        port = _docker("port", self.name, "8000/tcp").stdout.split()[0].rsplit(":", 1)[1]
        return f"http://127.0.0.1:{port}"

    def healthy(self) -> bool:
        state = json.loads(_docker("inspect", "-f", "{{json .State}}", self.name).stdout)
        if not state.get("Running"):
            raise AssertionError(f"{self.name} exited:\n" + _docker("logs", self.name, check=False).stderr[-3000:])
        return state.get("Health", {}).get("Status") == "healthy"

    def metric(self, name: str, **labels: str) -> float:
        import httpx

        text = httpx.get(self.url() + "/metrics", headers={"Authorization": f"Bearer {KEY}"}, timeout=10).raise_for_status().text
        total = 0.0
        for line in text.splitlines():
            m = re.match(rf"^{name}(?:\{{(.*)\}})? (\S+)$", line)
            if m and all(f'{k}="{v}"' in (m.group(1) or "") for k, v in labels.items()):
                total += float(m.group(2))
        return total

    def served(self) -> float:
        return self.metric("gptoss_requests_total", path=CHAT, status="200")


@pytest.fixture
def cluster(lb_images, replica_export):
    network = f"gptoss-lb-{uuid.uuid4().hex[:6]}"
    _docker("network", "create", network)
    services = compose_config({"SERVE_PARALLEL": "2", "SERVE_QUANT": "q4_k_m"})["services"]
    replicas, lb = [], None
    try:
        replicas = [Replica(lb_images["serve-cpu"], network, k, replica_export, services["serve-cpu"]["command"]) for k in (0, 1)]
        lb = f"{network}-serve-lb"
        _docker("run", "-d", "--name", lb, "--network", network, "-p", "127.0.0.1::8000", lb_images["serve-lb"],
                *services["serve-lb"]["command"])
        for r in replicas:
            _poll(f"{r.name} healthy", r.healthy, 300)
        logs = lambda: _docker("logs", lb, check=False)  # noqa: E731
        port = _docker("port", lb, "8000/tcp").stdout.split()[0].rsplit(":", 1)[1]
        url = f"http://127.0.0.1:{port}"
        seen = set()
        _poll("the balancer to route to both replicas", lambda: seen.update([_health_via(url)]) or len(seen - {None}) == 2, 60, 0.2)
        yield {"url": url, "replicas": replicas, "lb": lb, "logs": logs}
    finally:
        for name in [r.name for r in replicas] + ([lb] if lb else []):
            if os.environ.get("GPTOSS_KEEP_CONTAINERS") != "1":
                _docker("rm", "-f", name, check=False)
        _docker("network", "rm", network, check=False)


def _health_via(url: str) -> str | None:
    """GET /health through the balancer (open, no key): the replica that answered it, if one did."""
    import httpx

    try:
        resp = httpx.get(url + "/health", timeout=10)
    except httpx.HTTPError:
        return None
    return resp.headers.get(REPLICA_HEADER) if resp.status_code == 200 else None


@functools.lru_cache
def _served_model(url: str) -> str:
    import httpx

    return httpx.get(url + "/v1/models", headers={"Authorization": f"Bearer {KEY}"}, timeout=30).raise_for_status().json()["data"][0]["id"]


def _chat(url: str, *, max_tokens: int, stream: bool, on_headers=None) -> str:
    """One chat completion through the balancer; returns the replica that answered; raises on any failure."""
    import httpx

    body = {"model": _served_model(url), "messages": [{"role": "user", "content": "Count slowly."}], "max_tokens": max_tokens,
            "temperature": 0, "stream": stream}
    with httpx.stream("POST", url + CHAT, json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=120) as resp:
        replica = resp.headers.get(REPLICA_HEADER)
        if on_headers is not None:
            on_headers(replica)
        resp.raise_for_status()
        text = "".join(resp.iter_text())
    if stream:
        assert text.rstrip().endswith("data: [DONE]"), text[-300:]
    else:
        assert json.loads(text)["choices"][0]["finish_reason"] in ("stop", "length", "tool_calls")
    assert replica in ("serve-replica-0", "serve-replica-1"), replica
    return replica


class Load:
    """Client threads sending streaming requests back to back; every request recorded with its replica
    (the X-Gptoss-Replica header, known once the response starts), start/end times and outcome."""

    def __init__(self, url: str, clients: int, max_tokens: int):
        self.url, self.max_tokens = url, max_tokens
        self.lock, self.stop, self.records = threading.Lock(), threading.Event(), []
        self.threads = [threading.Thread(target=self._client, daemon=True) for _ in range(clients)]
        for t in self.threads:
            t.start()

    def _client(self) -> None:
        while not self.stop.is_set():
            rec = {"start": time.monotonic(), "replica": None, "end": None, "error": None}
            with self.lock:
                self.records.append(rec)
            try:
                _chat(self.url, max_tokens=self.max_tokens, stream=True, on_headers=lambda r: rec.update(replica=r))
            except Exception as e:  # noqa: BLE001 - every failure is counted and asserted on
                rec["error"] = f"{type(e).__name__}: {e}"
            rec["end"] = time.monotonic()

    def snapshot(self) -> list[dict]:
        with self.lock:
            return [dict(r) for r in self.records]

    def in_flight_on(self, replica: str) -> list[dict]:
        return [r for r in self.snapshot() if r["replica"] == replica and r["end"] is None]

    def close(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=180)
        assert not any(t.is_alive() for t in self.threads), "a client thread hung"


def test_two_replicas_share_the_load_lose_only_in_flight_requests_and_recover(cluster):
    url, (r0, r1) = cluster["url"], cluster["replicas"]
    from concurrent.futures import ThreadPoolExecutor

    # 1. Spread: 8 concurrent requests land on both replicas (their own counters say so).
    before = {r.alias: r.served() for r in (r0, r1)}
    with ThreadPoolExecutor(4) as pool:
        answered = list(pool.map(lambda _: _chat(url, max_tokens=8, stream=False), range(8)))
    counted = {r.alias: r.served() - before[r.alias] for r in (r0, r1)}
    assert sum(counted.values()) == 8 and all(n >= 1 for n in counted.values()), counted
    assert counted == {a: answered.count(a) for a in counted}, (counted, answered)

    # 2. Kill serve-replica-1 while it is streaming answers.
    load = Load(url, clients=4, max_tokens=96)
    try:
        _poll("a stream in progress on serve-replica-1", lambda: load.in_flight_on(r1.alias), 120, every=0.05)
        running_before = r1.metric("gptoss_requests_running")
        kill_sent = time.monotonic()
        _docker("kill", r1.name)
        killed_at = time.monotonic()
        _poll("8 requests started after the kill to finish",
              lambda: sum(1 for r in load.snapshot() if r["start"] > killed_at and r["end"] is not None) >= 8, 240)
    finally:
        load.close()
    records = load.snapshot()
    # in flight on the killed replica: its response had started (routing header) and had not ended when the kill was sent
    in_flight = [r for r in records if r["replica"] == r1.alias and r["start"] < killed_at and r["end"] >= kill_sent]
    failed = [r for r in records if r["error"]]
    print(f"kill: {len(in_flight)} streams in flight on {r1.alias} (its running gauge just before: {running_before:g}); "
          f"{len(failed)} of {len(records)} requests failed")
    assert in_flight, "the kill came while serve-replica-1 was streaming"
    # every lost request was one of those; none routed elsewhere or started later was lost
    assert all(any(f is r for r in in_flight) for f in failed), (failed, in_flight)
    after = [r for r in records if r["start"] > killed_at]
    assert after and all(r["error"] is None and r["replica"] == r0.alias for r in after), after

    # 3. Back: started again, HAProxy's checks bring it in, and it answers requests through the balancer.
    _docker("start", r1.name)
    _poll(f"{r1.name} healthy again", r1.healthy, 300)
    _poll("the balancer to send serve-replica-1 a request again",
          lambda: _chat(url, max_tokens=4, stream=False) == r1.alias, 120, every=0.2)
    assert r1.served() >= 1  # a new process: its counter started at 0
    logs = cluster["logs"]()
    assert re.search(rf"replicas/{r1.alias}\b.*DOWN", logs.stdout + logs.stderr), logs.stdout[-3000:]  # taken out
