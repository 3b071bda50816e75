"""Load test of a live `gptoss serve` (started here, or --url); speed is `gptoss bench`'s job.

  load:       N requests at concurrency C with a share of malformed ones; counts statuses, checks /health
  throughput: runs `gptoss bench` (time to first token, per-stream and aggregate tok/s by concurrency,
              prompt sweep, load time apart); kept so the old command lines still work

Examples (CPU, the tiny fixture converted to GGUF):
  gptoss bench --model tiny-f16.gguf --concurrency 1,8 --parallel 8      # was: serve_load.py throughput
  python bench/serve_load.py load --backend llamacpp --model tiny-f16.gguf --requests 300 --concurrency 16
Prints one JSON object (with the command, machine and date) for docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import random
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gptoss.evaluation import bench  # noqa: E402

machine = bench.machine


@contextlib.contextmanager
def server(args):
    """Start `gptoss serve` (gptoss.evaluation.bench.served) unless --url was given; yields (base_url, None)."""
    if args.url:
        yield args.url.rstrip("/").removesuffix("/v1"), None
        return
    extra = ["--queue", str(args.queue)] if getattr(args, "queue", None) is not None else []
    extra += ["--sample-on-device"] if getattr(args, "sample_on_device", False) else []
    with bench.served(backend=args.backend, model=args.model, device=args.device or "cpu", parallel=args.parallel,
                      ctx=args.ctx, threads=args.threads, extra=extra, start_timeout=args.start_timeout,
                      log_path=Path(args.log_path) if getattr(args, "log_path", None) else None) as (url, _load_s):
        yield url.removesuffix("/v1"), None


async def model_id(client: httpx.AsyncClient) -> str:
    return (await client.get("/v1/models")).json()["data"][0]["id"]


async def throughput(args, url) -> dict:
    """`gptoss bench`'s concurrency levels, keyed by stream count as the GPU scripts read them."""
    model = bench.check_reachable(url, None)
    result = await bench.measure(bench.api_base(url), model, concurrency=list(args.streams), prompt_lengths=[],
                                 max_tokens=args.max_tokens, sweep_max_tokens=1, repeat=getattr(args, "repeat", 1),
                                 api_key=None, progress=False)
    return {str(x["concurrency"]): {"streams": x["concurrency"], "aggregate_tok_s": x["aggregate_tok_s"],
                                    "vs_1_stream": x.get("vs_concurrency_1"), "runs": [x]}
            for x in result["concurrency"]}


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
    if args.mode == "throughput":  # now `gptoss bench`
        from gptoss.cli import main as gptoss

        cmd = ["bench", "--concurrency", ",".join(map(str, args.streams)), "--max-tokens", str(args.max_tokens),
               "--repeat", str(args.repeat)]
        cmd += ["--url", args.url] if args.url else ["--model", args.model, "--backend", args.backend,
                                                     "--parallel", str(args.parallel), "--ctx", str(args.ctx)]
        cmd += ["--device", args.device] if args.device and not args.url else []
        cmd += ["--threads", str(args.threads)] if args.threads else []
        print("bench/serve_load.py throughput is `gptoss " + " ".join(cmd) + "`", file=sys.stderr)
        sys.exit(gptoss(cmd))
    with server(args) as (url, _):
        result = asyncio.run(load(args, url))
    print(json.dumps({"command": "python " + " ".join(sys.argv), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                      "machine": machine(), args.mode: result}, indent=2))


if __name__ == "__main__":
    main()
