"""The transformers backend batches requests continuously (transformers' ContinuousBatchingManager).

On CPU with the tiny fixture (untrained: greedy output runs to max_tokens). The reference for
greedy tokens is plain ``model.generate`` on a second copy of the same checkpoint. Batching is read
from the engine itself (how many requests got a token in one step, /info ``batching``), not from
timing. Prompts of 150 and 300 tokens pass the fixture's 128-token sliding window.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time

import httpx
import pytest

from gptoss import harmony
from gptoss.serving.backends import BackendConfig, SamplingParams
from gptoss.serving.transformers_backend import TransformersBackend

import serve_support as sup

torch = pytest.importorskip("torch")

PROMPTS = [list(range(1000, 1000 + n)) for n in (5, 40, 150, 300)]
STOPS = tuple(harmony.stop_token_ids())


def _wait_for(predicate, *, what: str, timeout: float = 120.0):
    """Poll a condition the engine reports until it holds."""
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)
    return value


@pytest.fixture(scope="module")
def backend(tiny_model):
    backend = TransformersBackend(BackendConfig(model=str(tiny_model), ctx=1024, parallel=8, threads=2))
    asyncio.run(backend.start())
    assert backend.info()["batching"]["mode"] == "continuous", backend.info()["batching"]
    yield backend
    asyncio.run(backend.stop())


@pytest.fixture(scope="module")
def reference(tiny_model):
    """Plain transformers generate (greedy, the same stop ids) on its own copy of the checkpoint."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=torch.float32).eval()

    def greedy(prompt: list[int], max_tokens: int) -> list[int]:
        ids = torch.tensor([prompt])
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens, do_sample=False,
                                 temperature=None, top_p=None, top_k=None, eos_token_id=list(STOPS),
                                 pad_token_id=harmony.token_id(harmony.ENDOFTEXT))
        return out[0, len(prompt):].tolist()

    return greedy


async def _collect(backend, prompt: list[int], params: SamplingParams) -> tuple[list[int], str]:
    tokens, reason = [], None
    async for step in backend.generate(prompt, params):
        tokens += step.tokens
        if step.done:
            reason = step.reason
    return tokens, reason


def _run_together(backend, jobs: list[tuple[list[int], SamplingParams]]) -> list[tuple[list[int], str]]:
    async def main():
        return await asyncio.gather(*(_collect(backend, p, params) for p, params in jobs))

    return asyncio.run(main())


def test_concurrent_requests_share_steps_and_match_plain_generate(backend, reference):
    n = 24
    greedy = SamplingParams(max_tokens=n, temperature=0.0, stop_token_ids=STOPS)
    sampled = SamplingParams(max_tokens=n, temperature=1.0, top_p=0.9, seed=7, stop_token_ids=STOPS)
    before = backend.info()["batching"]["batch_sizes"]
    results = _run_together(backend, [(p, greedy) for p in PROMPTS] + [(PROMPTS[1], sampled)])
    sizes = backend.info()["batching"]["batch_sizes"]
    # All five were running in the same steps: the engine gave five requests a token at once.
    assert sizes.get("5", 0) > before.get("5", 0), sizes
    for prompt, (tokens, _) in zip(PROMPTS, results):
        assert tokens == reference(prompt, n), f"prompt of {len(prompt)} tokens"
    # Per-request seed: the same seed alone reproduces the sampled request of the batch.
    (alone, _), = _run_together(backend, [(PROMPTS[1], sampled)])
    assert alone == results[-1][0] and len(alone) == n
    assert alone != results[1][0]  # sampled at temperature 1, not the greedy tokens of the same prompt


def test_max_tokens_and_stop_ids_are_per_request(backend, reference):
    ref = reference(PROMPTS[2], 20)
    stop = ref[4]
    first = ref.index(stop)
    jobs = [(PROMPTS[0], SamplingParams(max_tokens=3, temperature=0.0, stop_token_ids=STOPS)),
            (PROMPTS[1], SamplingParams(max_tokens=9, temperature=0.0, stop_token_ids=STOPS)),
            (PROMPTS[2], SamplingParams(max_tokens=20, temperature=0.0, stop_token_ids=(stop,)))]
    (a, ra), (b, rb), (c, rc) = _run_together(backend, jobs)
    assert (len(a), ra) == (3, "length") and (len(b), rb) == (9, "length")
    assert c == ref[:first + 1] and rc == "stop"


def test_a_top_p_that_rounds_to_zero_keeps_the_most_likely_token(backend, reference):
    """top_p 1e-300 is 0 in float32: only the head token stays, so sampling at temperature 2 gives greedy tokens."""
    params = SamplingParams(max_tokens=6, temperature=2.0, top_p=1e-300, seed=1, stop_token_ids=STOPS)
    (tokens, _), = _run_together(backend, [(PROMPTS[0], params)])
    assert tokens == reference(PROMPTS[0], 6)
    assert backend.alive()


def test_a_closed_request_leaves_the_engine(backend):
    async def main():
        gen = backend.generate(PROMPTS[1], SamplingParams(max_tokens=1000, temperature=0.0, stop_token_ids=STOPS))
        got = []
        async for step in gen:
            got += step.tokens
            if len(got) >= 2:
                break
        assert backend.info()["batching"]["active"] == 1
        await gen.aclose()  # what the API does when the client goes away
        return got

    assert len(asyncio.run(main())) >= 2
    _wait_for(lambda: backend.info()["batching"]["active"] == 0, what="the cancelled request to leave the engine")
    assert backend.batcher.sampler.requests == {}
    tokens, reason = _run_together(backend, [(PROMPTS[0], SamplingParams(max_tokens=4, temperature=0.0))])[0]
    assert len(tokens) == 4 and reason == "length"


def test_the_thread_path_serves_after_batching_is_given_up(backend, reference):
    """What a failed start probe leads to: the manager stopped, the model's attention given back, one
    generate thread per request. (Runs last on the module's backend: it ends its batching.)"""
    asyncio.run(asyncio.to_thread(backend.batcher.stop))
    backend.batcher = None
    backend._thread_path("given up by the test")
    assert backend.model.config._attn_implementation == "eager"
    assert backend.info()["batching"] == {"mode": "thread", "reason": "given up by the test"}
    (tokens, reason), = _run_together(backend, [(PROMPTS[2], SamplingParams(max_tokens=8, temperature=0.0, stop_token_ids=STOPS))])
    assert tokens == reference(PROMPTS[2], 8) and reason == "length"


# ------------------------------------------------------------------------------------------------
# Through the API: admission, streaming and disconnects with a batching engine


def _raw_stream(url: str, max_tokens: int) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)))
    body = json.dumps({"model": "random", "messages": [{"role": "user", "content": "Go on."}], "max_tokens": max_tokens,
                       "temperature": 0, "stream": True}).encode()
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    return sock


def _gauge(url: str, name: str) -> float:
    for line in httpx.get(url + "/metrics", timeout=30).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{name} missing from /metrics")


def test_streams_batch_and_disconnects_free_their_slots(tiny_model, tmp_path):
    server = sup.LiveServer("--backend", "transformers", "--model", str(tiny_model), "--ctx", "2048", "--parallel", "3",
                            "--queue", "0", "--threads", "2", "--model-name", "random", log_path=tmp_path / "serve.log")
    url = server.url
    batching = lambda: httpx.get(url + "/info", timeout=30).json()["batching"]  # noqa: E731
    socks = []
    try:
        assert batching()["mode"] == "continuous"
        socks = [_raw_stream(url, 1500) for _ in range(3)]
        _wait_for(lambda: batching()["active"] == 3 and _gauge(url, "gptoss_requests_running") == 3,
                  what="three streams generating")
        _wait_for(lambda: batching()["max_batch"] == 3, what="a step with all three streams")
        busy = httpx.post(url + "/v1/chat/completions", json={"model": "random", "messages": [{"role": "user", "content": "x"}],
                                                              "max_tokens": 2}, timeout=30)
        assert busy.status_code == 429 and busy.json()["error"]["code"] == "overloaded"
        for sock in socks:
            sock.close()  # the clients go away mid-stream
        _wait_for(lambda: batching()["active"] == 0 and _gauge(url, "gptoss_requests_running") == 0,
                  what="the engine and the API to free the slots")
        ok = httpx.post(url + "/v1/chat/completions", json={"model": "random", "messages": [{"role": "user", "content": "x"}],
                                                            "max_tokens": 3, "temperature": 0}, timeout=120)
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 3
    except BaseException:
        print(server.log())
        raise
    finally:
        for sock in socks:
            sock.close()
        server.close()
