"""Live `gptoss serve` servers on CPU, driven by the official `openai` client.

llama.cpp backend: the tiny fixture + a LoRA taught Harmony answers (tests/serve_support.py),
merged and converted to an F16 GGUF with the pinned llama.cpp converter, served by llama-server.
transformers backend: the tiny fixture + that LoRA adapter (PEFT). Both are real engines; the
training makes greedy output deterministic enough to assert on structure.
"""

from __future__ import annotations

import json
import re
import socket
import time
from pathlib import Path

import httpx
import openai
import pytest

from gptoss import harmony

import serve_support as sup


def _wait_for(predicate, timeout: float = 60.0, what: str = "condition", server=None):
    """Poll a server-side condition (metrics, slots) until it holds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}" + (f"; logs:\n{server.log()}\n{_engine_log(server)}" if server else ""))
        time.sleep(0.1)


# ------------------------------------------------------------------------------------------------
# Models and servers (built once per session; `tiny_model` comes from tests/conftest.py)


@pytest.fixture(scope="session")
def random_gguf(tiny_model, tmp_path_factory) -> Path:
    """The untrained tiny fixture as GGUF: random tokens, never a stop token in practice (long generations)."""
    path = tmp_path_factory.mktemp("random-gguf") / "tiny-random-f16.gguf"
    sup.convert_to_gguf(tiny_model, path)
    return path


@pytest.fixture(scope="module")
def llamacpp_server(harmony_models, tmp_path_factory):
    server = sup.LiveServer("--backend", "llamacpp", "--model", str(harmony_models["gguf"]), "--ctx", "1024",
                            "--parallel", "4", "--queue", "16", "--debug", "--model-name", "tiny-harmony",
                            log_path=tmp_path_factory.mktemp("logs") / "llamacpp.log")
    yield server
    server.close()


@pytest.fixture(scope="module")
def transformers_server(tiny_model, harmony_models, tmp_path_factory):
    server = sup.LiveServer("--backend", "transformers", "--model", str(tiny_model), "--adapter", str(harmony_models["adapter"]),
                            "--ctx", "1024", "--parallel", "2", "--debug", "--model-name", "tiny-harmony",
                            log_path=tmp_path_factory.mktemp("logs") / "transformers.log")
    yield server
    server.close()


@pytest.fixture(params=["llamacpp", "transformers"])
def server(request):
    return request.getfixturevalue(f"{request.param}_server")


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


MODEL = "tiny-harmony"


def _tool_messages():
    return sup.WEATHER_QUESTION, [sup.WEATHER_TOOL]


# ------------------------------------------------------------------------------------------------
# The API on both backends


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert httpx.get(server.url + "/health", timeout=30).json() == {"status": "ok"}  # open to probes: nothing more
    info = httpx.get(server.url + "/info", timeout=30).json()
    assert info["status"] == "ok" and info["ctx"] == 1024 and info["model"] == MODEL


def test_non_stream_separates_reasoning_from_content(server, client):
    resp = client.chat.completions.create(model=MODEL, messages=sup.GREETING, temperature=0)
    choice = resp.choices[0]
    assert choice.message.content == sup.GREETING_ANSWER
    assert choice.message.reasoning_content == sup.GREETING_REASONING
    assert not choice.message.tool_calls
    assert choice.finish_reason == "stop"
    prompt = harmony.render_prompt(sup.GREETING)
    assert resp.usage.prompt_tokens == len(prompt)
    # analysis header + reasoning + <|end|> + final header + answer + <|return|>, as the model produced them
    expected = harmony.render_training(sup.GREETING + [sup.conversations()[0][1]])[len(prompt):]
    assert resp.usage.completion_tokens == len(expected)
    assert resp.usage.total_tokens == len(prompt) + len(expected)
    for token in harmony.CONTROL_TOKENS:
        assert token not in choice.message.content and token not in choice.message.reasoning_content


def test_stream_deltas(server, client):
    stream = client.chat.completions.create(model=MODEL, messages=sup.GREETING, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    content, reasoning, finish, usage, n_content = [], [], None, None, 0
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for choice in chunk.choices:
            delta = choice.delta
            if delta.content:
                content.append(delta.content)
                n_content += 1
            if getattr(delta, "reasoning_content", None):
                reasoning.append(delta.reasoning_content)
            finish = choice.finish_reason or finish
    assert "".join(content) == sup.GREETING_ANSWER
    assert "".join(reasoning) == sup.GREETING_REASONING
    assert n_content > 1 and len(reasoning) > 1  # streamed token by token, not in one piece
    assert finish == "stop"
    assert usage.prompt_tokens == len(harmony.render_prompt(sup.GREETING))


@pytest.mark.parametrize("effort", ["low", "high"])
def test_reasoning_effort_reaches_the_engine(server, client, effort):
    resp = client.chat.completions.create(model=MODEL, messages=sup.GREETING, temperature=0, reasoning_effort=effort, max_tokens=4)
    seen = resp.gptoss_debug["prompt"]  # what the engine received (llama-server reports its own detokenization)
    assert f"Reasoning: {effort}" in seen
    assert seen == harmony.render_prompt_text(sup.GREETING, options=harmony.SystemOptions(reasoning_effort=effort))


def test_tool_call_round_trip(server, client):
    messages, tools = _tool_messages()
    resp = client.chat.completions.create(model=MODEL, messages=messages, tools=tools, temperature=0)
    choice = resp.choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    assert call.id.startswith("call_")
    assert choice.message.reasoning_content == sup.WEATHER_REASONING
    assert not choice.message.content

    # Send the assistant turn back as the client got it, plus the tool's result.
    assistant = choice.message.model_dump(exclude_none=True)
    follow_up = messages + [assistant, {"role": "tool", "tool_call_id": call.id, "content": sup.WEATHER_RESULT}]
    resp2 = client.chat.completions.create(model=MODEL, messages=follow_up, tools=tools, temperature=0)
    assert resp2.choices[0].message.content == sup.WEATHER_ANSWER
    assert resp2.choices[0].finish_reason == "stop"
    # The tool result reached the prompt as a Harmony tool message.
    assert "<|start|>functions.get_weather to=assistant<|channel|>commentary<|message|>" + sup.WEATHER_RESULT in resp2.gptoss_debug["prompt"]


def test_stream_tool_call(server, client):
    messages, tools = _tool_messages()
    stream = client.chat.completions.create(model=MODEL, messages=messages, tools=tools, temperature=0, stream=True)
    calls: dict[int, dict] = {}
    finish = None
    for chunk in stream:
        for choice in chunk.choices:
            for tc in choice.delta.tool_calls or []:
                entry = calls.setdefault(tc.index, {"id": None, "name": None, "arguments": ""})
                entry["id"] = tc.id or entry["id"]
                if tc.function and tc.function.name:
                    entry["name"] = tc.function.name
                if tc.function and tc.function.arguments:
                    entry["arguments"] += tc.function.arguments
            finish = choice.finish_reason or finish
    assert list(calls) == [0]
    assert calls[0]["name"] == "get_weather" and calls[0]["id"]
    assert json.loads(calls[0]["arguments"]) == {"city": "Paris"}
    assert finish == "tool_calls"


def test_stop_string_and_max_tokens(server, client):
    resp = client.chat.completions.create(model=MODEL, messages=sup.GREETING, temperature=0, stop=["help"])
    assert resp.choices[0].message.content == sup.GREETING_ANSWER.split("help")[0]
    assert resp.choices[0].finish_reason == "stop"
    resp = client.chat.completions.create(model=MODEL, messages=sup.GREETING, temperature=0, max_tokens=5)
    assert resp.choices[0].finish_reason == "length"
    assert resp.usage.completion_tokens == 5
    assert not resp.choices[0].message.content  # still in the analysis message


def test_errors_are_openai_shaped(server, client):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="no-such-model", messages=sup.GREETING)
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=sup.GREETING, temperature=3)
    assert e.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=[{"role": "wizard", "content": "hi"}])
    assert "messages[0].role" in e.value.body["message"]
    long = [{"role": "user", "content": "hello " * 3000}]
    n_prompt = len(harmony.render_prompt(long))
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=long)
    assert e.value.body["code"] == "context_length_exceeded"
    assert f"{n_prompt} tokens" in e.value.body["message"] and "1024 tokens" in e.value.body["message"]
    r = httpx.post(server.url + "/v1/chat/completions", content=b"{not json", headers={"Content-Type": "application/json"}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    r = httpx.post(server.url + "/v1/chat/completions", json={"model": MODEL}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"


def test_metrics(server, client):
    client.chat.completions.create(model=MODEL, messages=sup.GREETING, temperature=0, max_tokens=3)
    text = httpx.get(server.url + "/metrics", timeout=30).text
    ok = [line for line in text.splitlines() if line.startswith('gptoss_requests_total{path="/v1/chat/completions",status="200"}')]
    assert ok and float(ok[0].split()[-1]) >= 1
    for name in ("gptoss_completion_tokens_total", "gptoss_prompt_tokens_total", "gptoss_request_latency_seconds_count",
                 "gptoss_queue_waiting", "gptoss_requests_running"):
        assert name in text


def test_sample_on_device_gives_the_same_answers(harmony_models, tmp_path):
    """llama.cpp's backend sampling (on the CPU backend here): same structure, stream and not."""
    server = sup.LiveServer("--backend", "llamacpp", "--model", str(harmony_models["gguf"]), "--ctx", "1024", "--parallel", "2",
                            "--sample-on-device", "--model-name", MODEL, log_path=tmp_path / "device-sampling.log")
    try:
        assert httpx.get(server.url + "/info", timeout=30).json()["sample_on_device"] is True
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        resp = client.chat.completions.create(model=MODEL, messages=sup.GREETING, temperature=0)
        assert resp.choices[0].message.content == sup.GREETING_ANSWER
        assert resp.choices[0].message.reasoning_content == sup.GREETING_REASONING
        stream = client.chat.completions.create(model=MODEL, messages=sup.WEATHER_QUESTION, tools=[sup.WEATHER_TOOL],
                                                temperature=0, stream=True)
        args, finish = "", None
        for chunk in stream:
            for choice in chunk.choices:
                for tc in choice.delta.tool_calls or []:
                    args += tc.function.arguments or ""
                finish = choice.finish_reason or finish
        assert json.loads(args) == {"city": "Paris"} and finish == "tool_calls"
        # sampled (temperature 1) requests run too, and count their tokens
        resp = client.chat.completions.create(model=MODEL, messages=sup.GREETING, temperature=1.0, seed=1, max_tokens=8)
        assert 1 <= resp.usage.completion_tokens <= 8
    finally:
        server.close()


# ------------------------------------------------------------------------------------------------
# Slots: disconnects and overload (long random generations on the untrained GGUF)


@pytest.fixture(scope="module", params=["llamacpp", "transformers"])
def one_slot_server(request, tiny_model, tmp_path_factory):
    """One slot, no queue, an untrained model that generates until max_tokens."""
    if request.param == "llamacpp":
        model = str(request.getfixturevalue("random_gguf"))
    else:
        model = str(tiny_model)
    server = sup.LiveServer("--backend", request.param, "--model", model, "--ctx", "4096", "--parallel", "1",
                            "--queue", "0", "--model-name", "random", log_path=tmp_path_factory.mktemp("logs") / "one-slot.log")
    server.backend = request.param
    yield server
    server.close()


def _gauge(url: str, name: str) -> float:
    for line in httpx.get(url + "/metrics", timeout=30).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{name} missing from /metrics")


def _engine_log(server) -> str:
    try:
        path = httpx.get(server.url + "/info", timeout=30).json().get("engine_log")
        return Path(path).read_text(errors="replace")[-6000:] if path else ""
    except (httpx.HTTPError, OSError) as e:
        return f"(no engine log: {e})"


def _engine_busy(server) -> bool:
    engine = httpx.get(server.url + "/info", timeout=30).json()["engine_url"]
    return any(slot["is_processing"] for slot in httpx.get(engine + "/slots", timeout=30).json())


def _raw_post(url: str, body: dict) -> socket.socket:
    """A request on a bare socket, so the test can drop the connection whenever it likes."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)))
    data = json.dumps(body).encode()
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(data), data))
    return sock


@pytest.mark.parametrize("stream", [True, False])
def test_disconnect_cancels_generation_and_frees_the_slot(one_slot_server, stream):
    url = one_slot_server.url
    body = {"model": "random", "messages": [{"role": "user", "content": "Go on forever."}], "max_tokens": 3000, "stream": stream}
    cancelled_before = _gauge(url, "gptoss_cancelled_total")
    sock = _raw_post(url, body)
    try:
        _wait_for(lambda: _gauge(url, "gptoss_requests_running") == 1, what="the request to start generating")
        if one_slot_server.backend == "llamacpp":
            assert _engine_busy(one_slot_server)
        # The only slot is taken and there is no queue: overload answers 429 + Retry-After.
        busy = httpx.post(url + "/v1/chat/completions", json={**body, "stream": False}, timeout=30)
        assert busy.status_code == 429 and busy.headers["Retry-After"] == "1"
        assert busy.json()["error"]["code"] == "overloaded"
    finally:
        sock.close()  # the client goes away mid-generation
    _wait_for(lambda: _gauge(url, "gptoss_requests_running") == 0, what="our slot to be released", server=one_slot_server)
    if one_slot_server.backend == "llamacpp":
        _wait_for(lambda: not _engine_busy(one_slot_server), what="llama-server's slot to stop", server=one_slot_server)
    assert _gauge(url, "gptoss_cancelled_total") == cancelled_before + 1
    ok = httpx.post(url + "/v1/chat/completions", json={**body, "stream": False, "max_tokens": 3}, timeout=60)
    assert ok.status_code == 200 and ok.json()["choices"][0]["finish_reason"] == "length"
    assert ok.json()["usage"]["completion_tokens"] == 3


@pytest.mark.slow
def test_load_300_requests_no_5xx(llamacpp_server):
    import importlib.util

    spec = importlib.util.spec_from_file_location("serve_load", Path(__file__).resolve().parent.parent / "bench" / "serve_load.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    import argparse
    import asyncio

    args = argparse.Namespace(requests=300, concurrency=16, malformed=0.1, max_tokens=16, max_retries=0)
    result = asyncio.run(bench.load(args, llamacpp_server.url))
    assert result["server_errors"] == 0, result
    assert sum(result["statuses"].values()) == 300
    malformed = sum(n for kind, by in result["by_kind"].items() if not kind.startswith("ok") for n in by.values())
    assert malformed > 0 and all(s.startswith("4") for k, by in result["by_kind"].items() if not k.startswith("ok") for s in by)
    assert result["statuses"].get("200", 0) == 300 - malformed
    assert result["health_after"] == 200


@pytest.mark.gpu
def test_transformers_backend_on_cuda(tiny_model, harmony_models, tmp_path):
    """The CUDA path of the transformers backend (Unsloth when installed, plain transformers otherwise)."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs an NVIDIA GPU")
    server = sup.LiveServer("--backend", "transformers", "--model", str(tiny_model), "--adapter", str(harmony_models["adapter"]),
                            "--device", "cuda:0", "--ctx", "1024", "--parallel", "2", "--model-name", MODEL,
                            log_path=tmp_path / "transformers-cuda.log")
    try:
        health = httpx.get(server.url + "/info", timeout=30).json()
        assert health["device"] == "cuda:0" and health["engine"] in ("unsloth", "transformers")
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        resp = client.chat.completions.create(model=MODEL, messages=sup.GREETING, temperature=0)
        assert resp.choices[0].message.content == sup.GREETING_ANSWER
        assert resp.choices[0].message.reasoning_content == sup.GREETING_REASONING
    finally:
        server.close()


def test_an_engine_that_cannot_load_says_what_it_was_doing(tmp_path):
    """llama-server is found (built) before the API listens; when it then fails to load the model,
    the error says what was happening, where its log is, and what to check."""
    import os
    import subprocess
    import sys

    from gptoss import llamacpp

    llamacpp.tool("llama-server")  # built before the clock below: this test times only serve
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\x00" * 64)  # a GGUF header with nothing behind it
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.run([sys.executable, "-m", "gptoss", "serve", "--backend", "llamacpp", "--model", str(bad),
                           "--port", str(port), "--parallel", "1", "--ctx", "256"], capture_output=True, text=True,
                          timeout=300, cwd=root, env=dict(os.environ, PYTHONPATH=str(root)))
    assert proc.returncode != 0
    err = proc.stderr
    assert f"waiting for llama-server to load {bad}" in err
    assert re.search(rf"llama-server exited with -?\d+ while loading {re.escape(str(bad))}", err), err[-3000:]
    log = re.search(r"its log (\S+) ends:", err)
    assert log and Path(log[1]).is_file() and "gguf" in Path(log[1]).read_text(errors="replace").lower()
    assert "Check that the file is a GGUF written by `gptoss export`" in err
