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
from test_serve import harmony_models  # noqa: F401  (the session fixture: the models built once, cached)

MODEL = "tiny-harmony"
KEYS = ("sk-test-first-key", "sk-test-second-key")
CHAT = "/v1/chat/completions"


def _key(key: str = KEYS[0]) -> dict:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
def keyed_llamacpp(harmony_models, tmp_path_factory):  # noqa: F811
    """Keys from --api-key (comma-separated); /metrics behind them."""
    server = sup.LiveServer("--backend", "llamacpp", "--model", str(harmony_models["gguf"]), "--ctx", "1024",
                            "--parallel", "2", "--model-name", MODEL, "--api-key", ",".join(KEYS),
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
