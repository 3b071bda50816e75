"""Aggregate tok/s of `gptoss serve --backend transformers` (continuous batching) at 1/4/8/16 streams.

Starts the server on a checkpoint dir (a fixture: `gptoss fixture tiny --out DIR`, or
`gptoss fixture geometry-20b --layers N --out DIR`), reads /info (which batching path serves:
"continuous" or the thread-per-request fallback, and the engine's batch sizes), then measures with
`gptoss bench`'s own measurement (gptoss.evaluation.bench.measure: streamed chat completions,
usage token counts, one warm-up request). Sampling at temperature 1 with a seed per stream, so an
untrained fixture runs to --max-tokens. Prints one JSON object; writes it to $OUT/transformers_gpu.json
when $OUT is set, else to --out.

Needs: torch (with CUDA for --device cuda:N), transformers with continuous batching
(ContinuousBatchingConfig; written against 5.24, the GPU image has 5.17: carry a 5.24 wheel), and
gptoss's serving packages (fastapi, uvicorn, httpx, prometheus-client, openai-harmony, fire, pydantic).
The GPU machine (python 3.12, torch 2.11+cu130, transformers 5.17) has no network: carry py3.12 wheels
of transformers==5.24.0 fastapi starlette uvicorn opentelemetry-api openai-harmony fire termcolor
pydantic pydantic-core annotated-types annotated-doc typing-inspection (pip download --no-deps
--only-binary=:all: --python-version 3.12 ... -d .whl), install them with
`pip install --no-index --no-deps --target /tmp/site .whl/*.whl`, and run with
PYTHONPATH=/tmp/site:$PWD GPTOSS_O200K_GZ=<o200k_base.tiktoken.gz> HF_HUB_OFFLINE=1.
Checked first, with what is missing said plainly (exit 2).

  python bench/transformers_gpu.py --model /tmp/tiny --device cpu --streams 1,2 --max-tokens 16   # CPU smoke
  python bench/transformers_gpu.py --model .cache/geometry-20b-8 --device cuda:0                  # the H200 figure
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import importlib
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SERVING_PACKAGES = ("fastapi", "uvicorn", "httpx", "prometheus_client", "openai_harmony", "fire", "pydantic")


def preflight(device: str) -> dict:
    """What this needs, checked before anything starts; exits 2 naming what is missing."""
    problems, versions = [], {}
    for name in ("torch", "transformers", *SERVING_PACKAGES):
        try:
            versions[name] = getattr(importlib.import_module(name), "__version__", "?")
        except ImportError as e:
            problems.append(f"python package {name} is missing ({e})")
    if "torch" in versions:
        import torch

        versions["cuda"] = torch.version.cuda
        if device.startswith("cuda") and not torch.cuda.is_available():
            problems.append(f"--device {device}: this torch ({versions['torch']}) sees no CUDA GPU")
        if device.startswith("cuda") and torch.cuda.is_available():
            versions["gpu"] = torch.cuda.get_device_name(int(device.split(":", 1)[1]) if ":" in device else 0)
    if "transformers" in versions:
        try:
            from transformers.generation.configuration_utils import ContinuousBatchingConfig  # noqa: F401
        except ImportError:
            problems.append(f"transformers {versions['transformers']} has no ContinuousBatchingConfig: the server would "
                            "fall back to one thread per request; carry transformers==5.24.0")
    if problems:
        print("bench/transformers_gpu.py needs: torch (CUDA build for a GPU), transformers>=5.24 (continuous batching), "
              + ", ".join(SERVING_PACKAGES) + "\n  missing here:\n  - " + "\n  - ".join(problems), file=sys.stderr)
        sys.exit(2)
    return versions


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="checkpoint dir (config.json + safetensors), e.g. a fixture")
    ap.add_argument("--device", default="cuda:0", help="cpu or cuda:N")
    ap.add_argument("--streams", default="1,4,8,16", help="concurrent streams per level, comma-separated")
    ap.add_argument("--max-tokens", type=int, default=128, help="tokens each stream generates")
    ap.add_argument("--ctx", type=int, default=2048, help="context per request of the server")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads of the server (CPU runs)")
    ap.add_argument("--repeat", type=int, default=1, help="run the levels this many times, report the median")
    ap.add_argument("--out", default="transformers_gpu.json", help="JSON result when $OUT is not set")
    ap.add_argument("--start-timeout", type=float, default=900)
    args = ap.parse_args()
    streams = [int(s) for s in str(args.streams).split(",") if s.strip()]
    if not Path(args.model, "config.json").is_file():
        sys.exit(f"--model {args.model}: no config.json; make one with `gptoss fixture tiny --out DIR`")
    versions = preflight(args.device)

    import httpx

    from gptoss.evaluation import bench

    out_path = Path(os.environ["OUT"]) / "transformers_gpu.json" if os.environ.get("OUT") else Path(args.out).absolute()
    log_path = out_path.with_suffix(".serve.log")
    parallel = max(streams)
    started = datetime.datetime.now(datetime.timezone.utc)
    with bench.served(backend="transformers", model=args.model, device=args.device, parallel=parallel, ctx=args.ctx,
                      threads=args.threads, start_timeout=args.start_timeout, log_path=log_path) as (url, load_s):
        base = url.removesuffix("/v1")
        info_before = httpx.get(base + "/info", timeout=30).json()
        model = bench.check_reachable(url, None)
        measured = asyncio.run(bench.measure(url, model, concurrency=streams, prompt_lengths=[], max_tokens=args.max_tokens,
                                             sweep_max_tokens=1, repeat=args.repeat, api_key=None, progress=False))
        info_after = httpx.get(base + "/info", timeout=30).json()
    levels = {str(x["concurrency"]): {"streams": x["concurrency"], "aggregate_tok_s": x["aggregate_tok_s"],
                                      "vs_1_stream": x.get("vs_concurrency_1"), "per_stream_tok_s": x["per_stream_tok_s"],
                                      "ttft_s_p50": x["ttft_s_p50"], "completion_tokens": x["completion_tokens"],
                                      "errors": x["errors"]} for x in measured["concurrency"]}
    result = {"schema_version": 1, "date": started.isoformat(timespec="seconds"), "machine": bench.machine(),
              "command": " ".join([Path(sys.executable).name, *sys.argv]), "versions": versions,
              "served": {"backend": "transformers", "model": str(args.model), "device": args.device, "parallel": parallel,
                         "ctx": args.ctx, "engine": info_before.get("engine"), "load_s": round(load_s, 3)},
              "batching": info_after.get("batching"), "batching_at_start": info_before.get("batching"),
              "max_tokens": args.max_tokens, "temperature": 1.0, "levels": levels, "warmup": measured["warmup"]}
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print(f"\nbatching: {(result['batching'] or {}).get('mode')}; aggregate tok/s "
          + ", ".join(f"{k} streams {v['aggregate_tok_s']} (x{v['vs_1_stream']})" for k, v in levels.items())
          + f"\nwritten: {out_path} (server log: {log_path})", file=sys.stderr)


if __name__ == "__main__":
    main()
