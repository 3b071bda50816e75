"""Serving benchmarks against a live `gptoss serve` (started here, or --url).

  throughput: aggregate decode tok/s at 1/4/8/16 concurrent streams (each generates --max-tokens)
  load:       N requests at concurrency C with a share of malformed ones; counts statuses, checks /health

Examples (CPU, the tiny fixture converted to GGUF):
  python bench/serve_load.py throughput --backend llamacpp --model tiny-f16.gguf --streams 1,8 --parallel 8
  python bench/serve_load.py load --backend llamacpp --model tiny-f16.gguf --requests 300 --concurrency 16
Prints one JSON object (with the command, machine and date) for docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import os
import platform
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def server(args):
    """Start `gptoss serve` unless --url was given; yields (base_url, model_id)."""
    if args.url:
        yield args.url.rstrip("/"), None
        return
    port = free_port()
    cmd = [sys.executable, "-m", "gptoss", "serve", "--backend", args.backend, "--model", args.model, "--port", str(port),
           "--parallel", str(args.parallel), "--ctx", str(args.ctx), "--log-level", "warning"]
    if args.device:
        cmd += ["--device", args.device]
    if args.queue is not None:
        cmd += ["--queue", str(args.queue)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if getattr(args, "sample_on_device", False):
        cmd += ["--sample-on-device"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])))
    log_path = getattr(args, "log_path", None)
    log = open(log_path, "ab") if log_path else None  # noqa: SIM115 (closed below)
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT if log else None)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + args.start_timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise SystemExit(f"gptoss serve exited with {proc.returncode}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            time.sleep(0.5)
        else:
            raise SystemExit("gptoss serve did not become healthy in time")
        yield url, None
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        if log:
            log.close()


async def model_id(client: httpx.AsyncClient) -> str:
    return (await client.get("/v1/models")).json()["data"][0]["id"]


async def one_stream(client, model, max_tokens, seed) -> dict:
    """One streamed request; returns completion tokens, time to first token and decode time."""
    body = {"model": model, "messages": [{"role": "user", "content": f"Write a long story number {seed}."}],
            "max_tokens": max_tokens, "temperature": 1.0, "seed": seed, "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    first = last = None
    usage = None
    async with client.stream("POST", "/v1/chat/completions", json=body) as resp:
        resp.raise_for_status()
        async for line in resp.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            now = time.perf_counter()
            if chunk.get("usage"):
                usage = chunk["usage"]
            elif chunk["choices"] and chunk["choices"][0]["delta"] and "role" not in chunk["choices"][0]["delta"]:
                first = first or now
                last = now
    n = usage["completion_tokens"] if usage else 0
    return {"tokens": n, "ttft_s": (first or t0) - t0, "total_s": time.perf_counter() - t0,
            "decode_tok_s": (n - 1) / (last - first) if first and last and last > first and n > 1 else None}


async def throughput(args, url) -> dict:
    """Aggregate tok/s per stream count; with --repeat R the counts are interleaved R times (noisy hosts)
    and each figure is the median over the repeats."""
    import statistics

    runs: dict[str, list[dict]] = {}
    async with httpx.AsyncClient(base_url=url, timeout=None, limits=httpx.Limits(max_connections=256)) as client:
        model = await model_id(client)
        # Warm-up at full width and length: the first generations after start are much slower (seen on CPU).
        await asyncio.gather(*(one_stream(client, model, args.max_tokens, 99_000 + i) for i in range(max(args.streams))))
        for _ in range(getattr(args, "repeat", 1)):
            for n in args.streams:
                t0 = time.perf_counter()
                results = await asyncio.gather(*(one_stream(client, model, args.max_tokens, 1000 * n + i) for i in range(n)))
                wall = time.perf_counter() - t0
                tokens = sum(r["tokens"] for r in results)
                per_stream = [r["decode_tok_s"] for r in results if r["decode_tok_s"]]
                runs.setdefault(str(n), []).append({
                    "tokens": tokens, "wall_s": round(wall, 3), "aggregate_tok_s": round(tokens / wall, 2),
                    # null when the model emits no parseable text (random weights): no deltas to time
                    "mean_stream_decode_tok_s": round(sum(per_stream) / len(per_stream), 2) if per_stream else None,
                    "mean_ttft_s": round(sum(r["ttft_s"] for r in results) / n, 3)})
    out = {}
    for n, rs in runs.items():
        out[n] = {"streams": int(n), "aggregate_tok_s": round(statistics.median(r["aggregate_tok_s"] for r in rs), 2),
                  "runs": rs}
    if "1" in out:
        for v in out.values():
            v["vs_1_stream"] = round(v["aggregate_tok_s"] / out["1"]["aggregate_tok_s"], 2)
    return out


MALFORMED = [
    ("bad_json", lambda m: ("{not json", {"Content-Type": "application/json"})),
    ("bad_schema", lambda m: (json.dumps({"model": m, "messages": "hello"}), None)),
    ("bad_role", lambda m: (json.dumps({"model": m, "messages": [{"role": "wizard", "content": "x"}]}), None)),
    ("bad_temperature", lambda m: (json.dumps({"model": m, "messages": [{"role": "user", "content": "x"}], "temperature": -1}), None)),
    ("unknown_model", lambda m: (json.dumps({"model": "no-such-model", "messages": [{"role": "user", "content": "x"}]}), None)),
    ("too_long", lambda m: (json.dumps({"model": m, "messages": [{"role": "user", "content": "word " * 50000}]}), None)),
]


async def load(args, url) -> dict:
    rng = random.Random(0)
    statuses: dict[str, int] = {}
    kinds: dict[str, dict[str, int]] = {}
    latencies = []
    retried: dict[str, int] = {}
    sem = asyncio.Semaphore(args.concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=None, limits=httpx.Limits(max_connections=256)) as client:
        model = await model_id(client)
        plan = []
        for i in range(args.requests):
            if rng.random() < args.malformed:
                plan.append(rng.choice(MALFORMED))
            else:
                plan.append(("ok_stream" if i % 2 else "ok", None))

        async def send(i, kind, make):
            """One request; 429/503 are retried after Retry-After, as the openai client does."""
            async with sem:
                t0 = time.perf_counter()
                for attempt in range(args.max_retries + 1):
                    if make:
                        content, headers = make(model)
                        r = await client.post("/v1/chat/completions", content=content, headers=headers or {"Content-Type": "application/json"})
                        status, retry_after = r.status_code, r.headers.get("Retry-After")
                    else:
                        body = {"model": model, "messages": [{"role": "user", "content": f"Request {i}"}], "max_tokens": args.max_tokens,
                                "stream": kind == "ok_stream"}
                        async with client.stream("POST", "/v1/chat/completions", json=body) as r:
                            async for _ in r.aiter_bytes():
                                pass
                            status, retry_after = r.status_code, r.headers.get("Retry-After")
                    if status not in (429, 503) or attempt == args.max_retries:
                        break
                    retried[str(status)] = retried.get(str(status), 0) + 1
                    await asyncio.sleep(float(retry_after or 1))
                latencies.append(time.perf_counter() - t0)
                statuses[str(status)] = statuses.get(str(status), 0) + 1
                kinds.setdefault(kind, {}).setdefault(str(status), 0)
                kinds[kind][str(status)] += 1

        t0 = time.perf_counter()
        await asyncio.gather(*(send(i, kind, make) for i, (kind, make) in enumerate(plan)))
        wall = time.perf_counter() - t0
        health = await client.get("/health")
        metrics = (await client.get("/metrics")).text
    latencies.sort()
    return {"requests": args.requests, "concurrency": args.concurrency, "malformed_share": args.malformed,
            "wall_s": round(wall, 2), "statuses": statuses, "by_kind": kinds, "retried_after": retried,
            "server_errors": sum(v for k, v in statuses.items() if k.startswith("5")),
            "p50_s": round(latencies[len(latencies) // 2], 3), "p95_s": round(latencies[int(len(latencies) * 0.95)], 3),
            "health_after": health.status_code,
            "metrics_has_requests": "gptoss_requests_total" in metrics}


def machine() -> dict:
    info = {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()}
    with contextlib.suppress(Exception):
        info["gpu"] = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                                     text=True, timeout=10).stdout.strip() or None
    return info


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=["throughput", "load"])
    p.add_argument("--url", help="an already running server (otherwise one is started)")
    p.add_argument("--backend", default="llamacpp")
    p.add_argument("--model")
    p.add_argument("--device")
    p.add_argument("--parallel", type=int, default=8)
    p.add_argument("--queue", type=int)
    p.add_argument("--threads", type=int)
    p.add_argument("--sample-on-device", action="store_true", help="start the server with --sample-on-device")
    p.add_argument("--ctx", type=int, default=1024)
    p.add_argument("--streams", default="1,4,8,16", type=lambda s: [int(x) for x in s.split(",")])
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--repeat", type=int, default=1, help="throughput: interleave the stream counts this many times")
    p.add_argument("--requests", type=int, default=300)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--malformed", type=float, default=0.1)
    p.add_argument("--max-retries", type=int, default=30, help="load: retries of a 429/503 after its Retry-After")
    p.add_argument("--start-timeout", type=float, default=600)
    args = p.parse_args()
    if not args.url and not args.model:
        p.error("--model (or --url) is required")
    with server(args) as (url, _):
        result = asyncio.run(throughput(args, url) if args.mode == "throughput" else load(args, url))
    print(json.dumps({"command": "python " + " ".join(sys.argv), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                      "machine": machine(), args.mode: result}, indent=2))


if __name__ == "__main__":
    main()
