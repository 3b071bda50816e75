"""A dead llama-server is noticed, restarted with backoff, and given up on after --engine-restarts.

The real engine on CPU (the untrained tiny fixture as an F16 GGUF: random tokens, long generations),
killed with SIGKILL while requests stream. The transformers backend has no child engine: nothing
to restart (its `supervise` returns at once), so these tests are llama.cpp only.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

import serve_support as sup

MODEL = "random"


@pytest.fixture(scope="module")
def random_gguf(tiny_model, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("random-gguf") / "tiny-random-f16.gguf"
    sup.convert_to_gguf(tiny_model, path)
    return path


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        comm_end = text.rindex(")")
        if int(text[comm_end + 2:].split()[1]) == pid and text[text.index("(") + 1:comm_end] == "llama-server":
            out.append(int(stat.parent.name))
    return out


def _poll(predicate, what: str, timeout: float = 60.0, server=None):
    """Poll until ``predicate()`` is truthy (a deadline, not a sleep as synchronisation)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}" + (f"; server log:\n{server.log()}" if server else ""))
        time.sleep(0.05)


def _engine_pid(server) -> int:
    pids = _children(server.proc.pid)
    return pids[0] if len(pids) == 1 else 0


def _gauge(url: str, name: str) -> float:
    for line in httpx.get(url + "/metrics", timeout=30).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{name} missing from /metrics")


def _health(url: str) -> httpx.Response | None:
    try:
        return httpx.get(url + "/health", timeout=5)
    except httpx.HTTPError:
        return None


class _Stream:
    """A streaming chat completion on its own thread; remembers every event."""

    def __init__(self, url: str, body: dict):
        self.events: list[str] = []
        self.status: int | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(url, body), daemon=True)
        self.thread.start()

    def _run(self, url: str, body: dict) -> None:
        try:
            with httpx.stream("POST", url + "/v1/chat/completions", json={**body, "stream": True}, timeout=120) as resp:
                self.status = resp.status_code
                for line in resp.iter_lines():
                    if line.startswith("data: "):
                        self.events.append(line[6:])
        except BaseException as e:  # noqa: BLE001 - reported by the test
            self.error = e

    def join(self, timeout: float) -> None:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the stream hung after the engine died"
        assert self.error is None, repr(self.error)


def _serve(gguf: Path, tmp_path: Path, *flags: str) -> sup.LiveServer:
    return sup.LiveServer("--backend", "llamacpp", "--model", str(gguf), "--ctx", "8192", "--parallel", "3", "--queue", "4",
                          "--model-name", MODEL, *flags, log_path=tmp_path / "serve.log", timeout=120)


def test_killed_engine_fails_in_flight_requests_with_503_and_comes_back(random_gguf, tmp_path):
    server = _serve(random_gguf, tmp_path, "--engine-backoff", "1")
    url = server.url
    long = {"model": MODEL, "messages": [{"role": "user", "content": "Go on forever."}], "max_tokens": 8000}
    try:
        before = httpx.post(url + "/v1/chat/completions", json={**long, "max_tokens": 3}, timeout=60)
        assert before.status_code == 200
        old_pid = _poll(lambda: _engine_pid(server), "the llama-server child")

        # Three requests generating (two streams, one plain), two more admitted and waiting for a slot.
        pool = concurrent.futures.ThreadPoolExecutor(1)
        plain = pool.submit(httpx.post, url + "/v1/chat/completions", json=long, timeout=120)
        running = [_Stream(url, long), _Stream(url, long)]
        _poll(lambda: _gauge(url, "gptoss_requests_running") == 3, "three requests generating", server=server)
        waiting = [_Stream(url, long), _Stream(url, long)]
        _poll(lambda: _gauge(url, "gptoss_queue_waiting") == 2, "two requests waiting", server=server)
        # First tokens seen for the three running ones (the request above was the first).
        _poll(lambda: _gauge(url, "gptoss_time_to_first_token_seconds_count") == 4, "the three to be mid-generation", server=server)

        os.kill(old_pid, signal.SIGKILL)
        killed = time.monotonic()
        down = _poll(lambda: (r := _health(url)) is not None and r.status_code == 503 and r, "/health to say 503", timeout=10)
        assert down.json()["code"] == "engine_down" and down.headers["Retry-After"]
        # a new request while it restarts (1 s backoff + the reload): 503 at once, not a wait
        during = httpx.post(url + "/v1/chat/completions", json={**long, "max_tokens": 3}, timeout=30)
        assert during.status_code == 503 and during.headers["Retry-After"], during.text
        assert during.json()["error"]["code"] == "engine_down" and "restart" in during.json()["error"]["message"]

        # Every request in flight fails cleanly, none hangs, none is a 500.
        failed = 0
        response = plain.result(timeout=60)
        assert response.status_code == 503, response.text
        assert response.headers["Retry-After"] and response.json()["error"]["code"] == "engine_down"
        assert response.json()["error"]["type"] == "server_error"
        failed += 1
        for stream in running + waiting:
            stream.join(60)
            assert stream.status == 200 and stream.events[-1] == "[DONE]"
            error = json.loads(stream.events[-2]).get("error")
            assert error and error["code"] == "engine_down", stream.events[-3:]
            assert not any(json.loads(e)["choices"][0]["finish_reason"] for e in stream.events[:-2] if json.loads(e).get("choices"))
            failed += 1
        assert failed == 5  # exactly the in-flight ones; the request before the kill got its 200

        # A new engine, /health 200 again, and completions work.
        _poll(lambda: (r := _health(url)) is not None and r.status_code == 200, "/health to say 200 again", server=server)
        print(f"SIGKILL -> /health 200 again in {time.monotonic() - killed:.1f}s (backoff 1 s + reload)")
        new_pid = _poll(lambda: _engine_pid(server), "the restarted llama-server")
        assert new_pid != old_pid
        after = httpx.post(url + "/v1/chat/completions", json={**long, "max_tokens": 3}, timeout=60)
        assert after.status_code == 200 and after.json()["usage"]["completion_tokens"] == 3
        assert server.proc.poll() is None
        assert re.search(rf"llama-server \(pid {old_pid}\) exited with -9", server.log_path.read_text())
        assert "restarting llama-server in 1s (restart 1 of at most 3 in a row)" in server.log_path.read_text()
        pool.shutdown()
    finally:
        server.close()


def test_engine_that_keeps_dying_makes_the_server_exit_nonzero(random_gguf, tmp_path):
    """The model file goes bad under a running server (a new inode: the engine keeps its mapping);
    once the engine is killed every restart fails, and after --engine-restarts the server exits."""
    gguf = tmp_path / "model.gguf"
    shutil.copy(random_gguf, gguf)
    server = _serve(gguf, tmp_path, "--engine-restarts", "2", "--engine-backoff", "0.2")
    try:
        pid = _poll(lambda: _engine_pid(server), "the llama-server child")
        broken = tmp_path / "broken.gguf"
        broken.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\x00" * 64)
        os.replace(broken, gguf)
        os.kill(pid, signal.SIGKILL)
        code = server.proc.wait(120)
        log = server.log_path.read_text(errors="replace")
        assert code != 0, log
        assert log.count("restarting llama-server in") == 2, log
        assert "restarting llama-server in 0.2s (restart 1 of at most 2 in a row)" in log
        assert "restarting llama-server in 0.4s (restart 2 of at most 2 in a row)" in log
        assert "llama-server failed 3 time(s) in a row, more than --engine-restarts 2" in log
        assert re.search(rf"llama-server exited with -?\d+ while loading {re.escape(str(gguf))}", log), log
        assert not _children(server.proc.pid)
    finally:
        server.close()


def test_engine_that_cannot_start_exits_nonzero_after_the_restarts(tmp_path):
    from gptoss import llamacpp

    llamacpp.tool("llama-server")
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\x00" * 64)  # a GGUF header with nothing behind it
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.run([sys.executable, "-m", "gptoss", "serve", "--backend", "llamacpp", "--model", str(bad), "--port", str(port),
                           "--parallel", "1", "--ctx", "256", "--engine-restarts", "1", "--engine-backoff", "0"],
                          capture_output=True, text=True, timeout=300, cwd=root, env=dict(os.environ, PYTHONPATH=str(root)))
    err = proc.stderr
    assert proc.returncode != 0, err[-3000:]
    assert len(re.findall(r"INFO gptoss.serve.llamacpp: starting \S+llama-server ", err)) == 2, err[-3000:]  # two tries
    assert re.search(rf"llama-server exited with -?\d+ while loading {re.escape(str(bad))}", err), err[-3000:]
    assert "restarting llama-server in 0s (restart 1 of at most 1 in a row)" in err
    assert "llama-server failed 2 time(s) in a row, more than --engine-restarts 1" in err
    assert "Check that the file is a GGUF written by `gptoss export`" in err


@pytest.mark.parametrize("flag,value", [("--engine-restarts", "-1"), ("--engine-backoff", "-2")])
def test_restart_flags_are_checked(flag, value, tmp_path):
    from gptoss.serving.backends import ServeError
    from gptoss.serving.server import serve

    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    with pytest.raises(ServeError, match=re.escape(flag)):
        serve(backend="llamacpp", model=str(gguf), **{flag.removeprefix("--").replace("-", "_"): int(value)})
