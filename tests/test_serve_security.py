"""`gptoss serve` facing the network (issue 13): API keys, bounded work per request, no 5xx from client
input, honest metrics and connection timeouts. Live servers on CPU on the tiny fixture taught Harmony
answers (tests/serve_support.py), both backends, reached over real sockets.
"""

from __future__ import annotations

import socket

import httpx
import openai
import pytest

import serve_support as sup

MODEL = "tiny-harmony"
KEYS = ("sk-test-first-key", "sk-test-second-key")
CHAT = "/v1/chat/completions"
HEADER_TIMEOUT, KEEP_ALIVE = 2, 1  # the llamacpp server's --timeout-headers and --timeout-keep-alive


def _key(key: str = KEYS[0]) -> dict:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
def keyed_llamacpp(harmony_models, tmp_path_factory):  # noqa: F811
    """Keys from --api-key (comma-separated); /metrics behind them."""
    server = sup.LiveServer("--backend", "llamacpp", "--model", str(harmony_models["gguf"]), "--ctx", "1024",
                            "--parallel", "2", "--model-name", MODEL, "--api-key", ",".join(KEYS),
                            "--timeout-headers", str(HEADER_TIMEOUT), "--timeout-keep-alive", str(KEEP_ALIVE),
                            log_path=tmp_path_factory.mktemp("logs") / "keyed-llamacpp.log")
    server.backend = "llamacpp"
    yield server
    server.close()


@pytest.fixture(scope="module")
def keyed_transformers(tiny_model, harmony_models, tmp_path_factory):  # noqa: F811
    """Keys from $GPTOSS_API_KEY (comma-separated); --metrics-public."""
    with pytest.MonkeyPatch.context() as env:
        env.setenv("GPTOSS_API_KEY", ",".join(KEYS))
        server = sup.LiveServer("--backend", "transformers", "--model", str(tiny_model), "--adapter", str(harmony_models["adapter"]),
                                "--ctx", "1024", "--parallel", "2", "--model-name", MODEL, "--metrics-public",
                                log_path=tmp_path_factory.mktemp("logs") / "keyed-transformers.log")
    server.backend = "transformers"
    yield server
    server.close()


@pytest.fixture(params=["llamacpp", "transformers"])
def keyed(request):
    return request.getfixturevalue(f"keyed_{request.param}")


def _openai_error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    return error


# ------------------------------------------------------------------------------------------------
# 1. Authentication


def test_every_route_but_health_needs_a_key(keyed):
    url = keyed.url
    health = httpx.get(url + "/health", timeout=30)
    assert health.status_code == 200 and health.json() == {"status": "ok"}  # no path, no engine URL, no log
    body = {"model": MODEL, "messages": sup.GREETING, "max_tokens": 2}
    for method, path in (("GET", "/v1/models"), ("GET", f"/v1/models/{MODEL}"), ("POST", CHAT), ("GET", "/info"),
                         ("GET", "/openapi.json"), ("GET", "/docs"), ("GET", "/no/such/route"), ("POST", "/v1/responses")):
        for headers in ({}, _key("sk-wrong"), {"Authorization": f"Basic {KEYS[0]}"}, {"Authorization": KEYS[0]}):
            r = httpx.request(method, url + path, json=body if method == "POST" else None, headers=headers, timeout=30)
            error = _openai_error(r, 401)
            assert error["code"] == "invalid_api_key" and r.headers["WWW-Authenticate"] == "Bearer", (path, headers)
            assert "Authorization: Bearer" in error["message"]
    for key in KEYS:  # every key works
        assert httpx.get(url + "/v1/models", headers=_key(key), timeout=30).json()["data"][0]["id"] == MODEL
    info = httpx.get(url + "/info", headers=_key(), timeout=30).json()
    assert info["model"] == MODEL and info["backend"] == keyed.backend and info["status"] == "ok"  # the served name, not the path


def test_the_openai_client_with_and_without_the_key(keyed):
    good = openai.OpenAI(base_url=keyed.url + "/v1", api_key=KEYS[1], max_retries=0, timeout=120)
    resp = good.chat.completions.create(model=MODEL, messages=sup.GREETING, temperature=0)
    assert resp.choices[0].message.content == sup.GREETING_ANSWER
    bad = openai.OpenAI(base_url=keyed.url + "/v1", api_key="sk-nope", max_retries=0, timeout=120)
    with pytest.raises(openai.AuthenticationError) as e:
        bad.chat.completions.create(model=MODEL, messages=sup.GREETING)
    assert e.value.body["code"] == "invalid_api_key"


def test_metrics_need_the_key_unless_public(keyed_llamacpp, keyed_transformers):
    assert _openai_error(httpx.get(keyed_llamacpp.url + "/metrics", timeout=30), 401)["code"] == "invalid_api_key"
    text = httpx.get(keyed_llamacpp.url + "/metrics", headers=_key(), timeout=30).text
    assert 'gptoss_requests_total{path="other",status="401"}' in text  # the refusals are counted
    public = httpx.get(keyed_transformers.url + "/metrics", timeout=30)  # --metrics-public
    assert public.status_code == 200 and "gptoss_requests_running" in public.text
    assert httpx.get(keyed_transformers.url + "/v1/models", timeout=30).status_code == 401  # the API still is not


def test_chat_client_sends_the_first_key_from_the_environment(keyed_llamacpp, monkeypatch):
    """`gptoss chat`/`gptoss ui` talk through chat.client.Connection: with $GPTOSS_API_KEY holding the
    server's comma-separated keys they send the first; a wrong key is a clear error, not a traceback."""
    from gptoss.chat.client import ChatError, Connection, Settings

    monkeypatch.setenv("GPTOSS_API_KEY", ",".join(KEYS))
    conn = Connection(keyed_llamacpp.url + "/v1")
    conn.wait_ready(timeout=30)
    assert conn.health and conn.health["backend"] == "llamacpp"  # /info, with the key
    events = list(conn.stream(sup.GREETING, Settings(temperature=0.0)))
    assert "".join(text for kind, text in events if kind == "content") == sup.GREETING_ANSWER
    wrong = Connection(keyed_llamacpp.url + "/v1", api_key="sk-wrong")
    wrong.wait_ready(timeout=30)  # /health is open
    with pytest.raises(ChatError, match="refused the request \\(401\\): pass its key with --api-key or GPTOSS_API_KEY"):
        wrong.model_id()


def test_api_key_flag_and_environment_parsing():
    from gptoss.serving.backends import ServeError
    from gptoss.serving.server import api_keys

    assert api_keys(None, {}) == ()
    assert api_keys("sk-a,sk-b", {}) == ("sk-a", "sk-b")
    assert api_keys(("sk-a", "sk-b"), {}) == ("sk-a", "sk-b")  # fire's reading of --api-key sk-a,sk-b
    assert api_keys(None, {"GPTOSS_API_KEY": "sk-a, sk-b,sk-a"}) == ("sk-a", "sk-b")
    assert api_keys("sk-flag", {"GPTOSS_API_KEY": "sk-env"}) == ("sk-flag",)
    with pytest.raises(ServeError, match="was read as a int"):
        api_keys((123, 456), {})
    with pytest.raises(ServeError, match="printable ASCII without spaces"):
        api_keys("sk a", {})
    with pytest.raises(ServeError, match=r"\$GPTOSS_API_KEY"):
        api_keys(None, {"GPTOSS_API_KEY": ","})


# ------------------------------------------------------------------------------------------------
# 2. Bounded work per request

LIMIT = 4 * 1024 * 1024  # --max-body-bytes's default, which the keyed servers run with


def _raw(url: str, head: bytes, body_chunks=()) -> bytes:
    """One request on a bare socket (headers as given, then ``body_chunks``); the server's whole answer."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=60) as sock:
        try:
            sock.sendall(head)
            for chunk in body_chunks:
                sock.sendall(chunk)
        except (BrokenPipeError, ConnectionResetError):  # the server answered and closed before the rest
            pass
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return data


def _status_and_json(answer: bytes) -> tuple[int, dict]:
    import json

    head, _, body = answer.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    if b"transfer-encoding: chunked" in head.lower():  # one chunk is all an error answer needs
        body = body.split(b"\r\n", 1)[1].rsplit(b"\r\n0\r\n", 1)[0]
    return status, json.loads(body)


def test_a_body_over_the_limit_is_413_by_its_length_or_while_it_streams(keyed_llamacpp):
    auth = f"Authorization: Bearer {KEYS[0]}\r\n".encode()
    # Content-Length over the limit: refused before any of the body is read
    head = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n" + auth
            + b"Content-Length: %d\r\n\r\n" % (LIMIT + 1))
    status, body = _status_and_json(_raw(keyed_llamacpp.url, head))
    assert status == 413 and body["error"]["code"] == "request_too_large" and str(LIMIT) in body["error"]["message"]
    # chunked (no length): stopped once it passes the limit
    head = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n" + auth
            + b"Transfer-Encoding: chunked\r\n\r\n")
    piece = b"x" * 65536
    chunks = [b"%x\r\n%s\r\n" % (len(piece), piece)] * (LIMIT // len(piece) + 2) + [b"0\r\n\r\n"]
    status, body = _status_and_json(_raw(keyed_llamacpp.url, head, chunks))
    assert status == 413 and body["error"]["code"] == "request_too_large"
    # under the limit the same path answers normally
    ok = httpx.post(keyed_llamacpp.url + CHAT, headers=_key(), timeout=60,
                    json={"model": MODEL, "messages": sup.GREETING, "max_tokens": 2})
    assert ok.status_code == 200


def test_message_and_tool_counts_are_bounded(keyed_llamacpp):
    many = [{"role": "user", "content": "hi"}] * 2049
    r = httpx.post(keyed_llamacpp.url + CHAT, headers=_key(), json={"model": MODEL, "messages": many}, timeout=60)
    assert _openai_error(r, 400)["param"] == "messages"
    tools = [sup.WEATHER_TOOL] * 129
    r = httpx.post(keyed_llamacpp.url + CHAT, headers=_key(), json={"model": MODEL, "messages": sup.GREETING, "tools": tools}, timeout=60)
    assert _openai_error(r, 400)["param"] == "tools"


def test_health_answers_while_the_heaviest_accepted_request_renders(keyed_llamacpp):
    """A body just under the limit with the most messages allowed: rendering it takes seconds (openai-harmony
    holds the GIL), /health polled beside it must keep answering within 1 s (compose's probe allows 3)."""
    import concurrent.futures
    import json
    import time

    per = (LIMIT - 4096) // 2048 - len('{"role": "assistant", "content": ""}, ')
    messages = [{"role": "user" if i % 2 == 0 else "assistant", "content": ("hello world " * per)[:per]} for i in range(2048)]
    body = json.dumps({"model": MODEL, "messages": messages}).encode()
    assert LIMIT - 16384 < len(body) <= LIMIT
    latencies: list[float] = []
    with httpx.Client(base_url=keyed_llamacpp.url, timeout=30) as probe, concurrent.futures.ThreadPoolExecutor(1) as pool:
        started = time.monotonic()
        big = pool.submit(httpx.post, keyed_llamacpp.url + CHAT, content=body, timeout=300,
                          headers={**_key(), "Content-Type": "application/json"})
        while not big.done():
            t = time.monotonic()
            assert probe.get("/health").status_code == 200
            latencies.append(time.monotonic() - t)
        elapsed = time.monotonic() - started
    r = big.result()
    error = _openai_error(r, 400)  # rendered and counted: far over the 1024-token context
    assert error["code"] == "context_length_exceeded" and "1024 tokens" in error["message"]
    assert len(latencies) >= 5, (len(latencies), elapsed)
    assert max(latencies) < 1.0, f"/health took {max(latencies):.2f} s while the big request ran {elapsed:.2f} s"


# ------------------------------------------------------------------------------------------------
# 3. No 500 from client input


def _deep(levels: int):
    value: object = "x"
    for _ in range(levels):
        value = {"a": [value]}
    return value


def _post(server, body, raw: bytes | None = None) -> httpx.Response:
    headers = {**_key(), "Content-Type": "application/json"}
    import json

    return httpx.post(server.url + CHAT, content=raw if raw is not None else json.dumps(body).encode(), headers=headers, timeout=120)


def test_each_malformed_input_class_is_a_400(keyed):
    """The classes issue 13 found giving 500s, each with the field it names."""
    user = sup.GREETING
    cases = {
        "very deep JSON": (None, b'{"model": "tiny-harmony", "x": ' + b"[" * 100000 + b"]" * 100000 + b"}", None),
        "deep tool schema": ({"model": MODEL, "messages": user, "tools": [{"type": "function", "function": {
            "name": "f", "parameters": {"type": "object", "properties": _deep(20)}}}]}, None, "tools[0].function.parameters"),
        "tool_calls of the wrong type": ({"model": MODEL, "messages": user + [{"role": "assistant", "tool_calls": "get_weather"}]},
                                         None, "messages[1].tool_calls"),
        "a tool call id of the wrong type": ({"model": MODEL, "messages": user + [
            {"role": "assistant", "tool_calls": [{"id": {"x": 1}, "type": "function", "function": {"name": "f", "arguments": "{}"}}]}]},
            None, "messages[1].tool_calls[0].id"),
        "tool_call_id of the wrong type": ({"model": MODEL, "messages": user + [{"role": "tool", "tool_call_id": 7, "content": "x"}]},
                                           None, "messages[1].tool_call_id"),
        "a lone surrogate in content": (None, b'{"model": "tiny-harmony", "messages": [{"role": "user", "content": "a\\ud800b"}]}',
                                        "messages[0].content"),
        "a lone surrogate in a tool name": (None, b'{"model": "tiny-harmony", "messages": [{"role": "user", "content": "hi"}], '
                                            b'"tools": [{"type": "function", "function": {"name": "\\udc00"}}]}', "tools[0].function.name"),
        "a seed below 0": ({"model": MODEL, "messages": user, "seed": -1}, None, "seed"),
        "a seed over uint32": ({"model": MODEL, "messages": user, "seed": 2**40}, None, "seed"),
        "temperature NaN": (None, b'{"model": "tiny-harmony", "messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', None),
        "temperature Infinity": (None, b'{"model": "tiny-harmony", "messages": [{"role": "user", "content": "hi"}], "top_p": Infinity}', None),
        "an image part": ({"model": MODEL, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
                          None, "messages[0].content"),
        "a tool without a name": ({"model": MODEL, "messages": user, "tools": [{"type": "function", "function": {"name": ""}}]},
                                  None, "tools[0].function.name"),
        "a role that does not exist": ({"model": MODEL, "messages": [{"role": "wizard", "content": "hi"}]}, None, "messages[0].role"),
    }
    for what, (body, raw, param) in cases.items():
        error = _openai_error(_post(keyed, body, raw), 400)
        assert error["param"] == param, (what, error)
    # temperatures and top_p the sampler can use: tiny ones sample greedily instead of overflowing into inf/nan
    for extra in ({"temperature": 1e-300}, {"temperature": 2.0, "top_p": 1e-300, "seed": 2**32 - 2}):
        r = _post(keyed, {"model": MODEL, "messages": user, "max_tokens": 3, **extra})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1, (extra, r.text)


def test_405_says_allow_and_openapi_describes_the_body(keyed_llamacpp):
    r = httpx.get(keyed_llamacpp.url + CHAT, headers=_key(), timeout=30)
    assert _openai_error(r, 405)["code"] == "method_not_allowed" and r.headers["Allow"] == "POST"
    spec = httpx.get(keyed_llamacpp.url + "/openapi.json", headers=_key(), timeout=30).json()
    body = spec["paths"][CHAT]["post"]["requestBody"]["content"]["application/json"]["schema"]
    schemas = spec["components"]["schemas"]
    chat = schemas[body["$ref"].rsplit("/", 1)[1]]
    assert {"model", "messages"} <= set(chat["required"])
    assert chat["properties"]["messages"]["maxItems"] == 2048
    roles = chat["properties"]["messages"]["items"]["discriminator"]["mapping"]
    assert sorted(roles) == ["assistant", "developer", "system", "tool", "user"]
    assert schemas["ToolCall"]["properties"]["id"]["anyOf"] == [{"type": "string"}, {"type": "null"}]
    assert chat["properties"]["seed"]["anyOf"][0]["maximum"] == 2**32 - 2


def _json_values():
    from hypothesis import strategies as st

    scalars = st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=8)
    return st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
                        max_leaves=8)


def _requests():
    """Chat requests near the real shape, each field either a plausible value or any JSON value."""
    from hypothesis import strategies as st

    junk = _json_values()
    text = st.text(max_size=20)
    call = st.fixed_dictionaries({"id": text | junk, "type": st.just("function") | junk,
                                  "function": st.fixed_dictionaries({"name": text | junk, "arguments": text | junk}) | junk})
    message = st.fixed_dictionaries(
        {"role": st.sampled_from(["system", "developer", "user", "assistant", "tool"]) | junk},
        optional={"content": text | st.lists(st.fixed_dictionaries({"type": st.just("text") | junk, "text": text | junk}), max_size=2) | junk,
                  "tool_calls": st.lists(call, max_size=2) | junk, "tool_call_id": text | junk, "name": text | junk,
                  "reasoning_content": text | junk})
    tool = st.fixed_dictionaries({"type": st.just("function") | junk,
                                  "function": st.fixed_dictionaries({"name": text | junk}, optional={"parameters": junk, "description": junk}) | junk})
    small = st.integers(-1, 3)  # a valid request generates at most a few tokens
    return st.fixed_dictionaries(
        {"model": st.just(MODEL) | junk, "messages": st.lists(message, max_size=3) | junk, "max_tokens": small},
        optional={"tools": st.lists(tool, max_size=2) | junk, "tool_choice": st.sampled_from(["auto", "none", "required"]) | junk,
                  "temperature": st.floats(-1, 3) | junk, "top_p": st.floats(-1, 2) | junk, "seed": st.integers(-2**64, 2**64) | junk,
                  "stop": text | st.lists(text, max_size=5) | junk, "stream": st.booleans() | junk, "reasoning_effort": junk,
                  "stream_options": junk, "n": junk})


def test_no_request_body_gives_a_5xx(keyed):
    """Property: whatever JSON a client sends, the answer is below 500 (a 200 stream carries no error event)."""
    from hypothesis import HealthCheck, given, settings

    with httpx.Client(base_url=keyed.url, headers=_key(), timeout=120) as client:
        @settings(max_examples=150, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        @given(_requests())
        def check(body):
            r = client.post(CHAT, json=body)
            assert r.status_code < 500, (body, r.status_code, r.text[:500])
            if r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream"):
                assert '"error"' not in r.text, (body, r.text[-500:])

        check()
    assert httpx.get(keyed.url + "/health", timeout=30).status_code == 200


# ------------------------------------------------------------------------------------------------
# 5. Honest metrics and timeouts


def _counter(server, name: str) -> float:
    for line in httpx.get(server.url + "/metrics", headers=_key(), timeout=30).text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.split()[-1])
    return 0.0


def test_completed_streams_are_not_counted_as_cancelled(keyed_llamacpp):
    """gptoss_cancelled_total counted every completed stream (the disconnect after the last event looked like
    the client going away); a real disconnect still counts: test_serve.py's test_disconnect_cancels_generation."""
    client = openai.OpenAI(base_url=keyed_llamacpp.url + "/v1", api_key=KEYS[0], max_retries=0, timeout=120)
    before = _counter(keyed_llamacpp, "gptoss_cancelled_total")
    for _ in range(3):
        chunks = list(client.chat.completions.create(model=MODEL, messages=sup.GREETING, temperature=0, stream=True))
        assert chunks[-1].choices[0].finish_reason == "stop"
    client.chat.completions.create(model=MODEL, messages=sup.GREETING, temperature=0, max_tokens=2)
    assert _counter(keyed_llamacpp, "gptoss_cancelled_total") == before


def _closed_after(url: str, data: bytes) -> tuple[float, bytes]:
    """(seconds until the server closes a connection that sent ``data``, what it answered); blocks on the socket."""
    import time

    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        start = time.monotonic()
        if data:
            sock.sendall(data)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
        return time.monotonic() - start, received


def test_idle_and_partial_header_connections_time_out(keyed_llamacpp):
    url = keyed_llamacpp.url
    for data in (b"", b"GET /health HTTP/1.1\r\nHost: t\r\nX-Slow: "):  # nothing at all; headers never finished
        elapsed, received = _closed_after(url, data)
        assert received == b"" and HEADER_TIMEOUT * 0.8 <= elapsed < HEADER_TIMEOUT + 5, (data, elapsed)
    # after a complete response, an idle keep-alive connection goes after --timeout-keep-alive
    elapsed, received = _closed_after(url, b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n")
    assert received.startswith(b"HTTP/1.1 200") and b'{"status":"ok"}' in received
    assert KEEP_ALIVE * 0.8 <= elapsed < HEADER_TIMEOUT + 5, elapsed


def test_an_unhandled_error_is_counted_as_500_not_499(tmp_path):
    """A backend that raises what no handler expects (a bug, not a client going away). No real engine fails
    on demand, so this backend is a stand-in, served by uvicorn on a real socket."""
    import threading

    import uvicorn

    from gptoss.serving.api import create_app
    from gptoss.serving.backends import Backend, BackendConfig

    class Broken(Backend):
        name = "broken"

        async def start(self) -> None:
            self.ready = True

        async def generate(self, prompt, params):
            raise RuntimeError("a bug")
            yield  # an async generator

    app = create_app(Broken(BackendConfig(model=str(tmp_path))), model_id="m")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="critical"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{port}"
        while not server.started:
            if not thread.is_alive():
                raise AssertionError("uvicorn did not start")
            thread.join(0.05)  # waiting for the server thread's start, not for a result
        r = httpx.post(url + CHAT, json={"model": "m", "messages": sup.GREETING}, timeout=60)
        assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
        metrics = httpx.get(url + "/metrics", timeout=30).text
        assert 'gptoss_requests_total{path="/v1/chat/completions",status="500"} 1.0' in metrics
        assert 'status="499"' not in metrics
    finally:
        server.should_exit = True
        thread.join(30)
