"""GPU evidence for `gptoss serve --backend llamacpp` (run by bench/serve_gpu.sh on an H100).

Stages (each skips what is already done, so a 10-minute command limit can be met one at a time):
  models  gptoss fixture geometry-20b --layers N -> F16 GGUF (pinned converter) -> Q4_K_M (llama-quantize)
  bench   for each GGUF: llama-bench (the engine's own tg/pp); llama-server alone at 1 and 8 streams with
          CPU sampling, device (backend) sampling and greedy; our API at 1/4/8/16 streams, served with
          CPU sampling and with --sample-on-device; a load run (300 requests, concurrency 16, 10% malformed)
Prints one JSON object and writes it to $OUT/serve_gpu.json when $OUT is set.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gptoss import harmony, llamacpp  # noqa: E402

spec = importlib.util.spec_from_file_location("serve_load", ROOT / "bench" / "serve_load.py")
serve_load = importlib.util.module_from_spec(spec)
spec.loader.exec_module(serve_load)


def sh(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    print("+", " ".join(map(str, cmd)), file=sys.stderr, flush=True)
    return subprocess.run([str(c) for c in cmd], check=True, **kw)


def build_models(work: Path, fixture: str, layers: int, cuda: bool, convert_type: str = "f16",
                 drop_fixture: bool = False) -> dict[str, Path]:
    """Fixture -> converted GGUF (F16, or Q8_0 where F16 + safetensors would not fit the disk) -> Q4_K_M."""
    name = f"{fixture}-{layers}l"
    fixture_dir = work / name
    first_type = convert_type.upper()
    converted = work / f"{name}-{first_type}.gguf"
    q4 = work / f"{name}-Q4_K_M.gguf"
    if not converted.is_file() and not (fixture_dir / "config.json").is_file():
        sh([sys.executable, "-m", "gptoss", "fixture", fixture, "--layers", layers, "--out", fixture_dir, "--force"], cwd=ROOT)
    if not converted.is_file():
        script, env = llamacpp.converter()
        tmp = converted.with_suffix(".partial")
        sh([sys.executable, script, fixture_dir, "--outfile", tmp, "--outtype", convert_type], env=env)
        os.replace(tmp, converted)
    if drop_fixture and fixture_dir.is_dir():
        shutil.rmtree(fixture_dir)
    if not q4.is_file():
        tmp = q4.with_suffix(".partial")
        requant = ["--allow-requantize"] if first_type != "F16" else []
        sh([llamacpp.tool("llama-quantize", cuda=cuda, build=False), *requant, converted, tmp, "Q4_K_M"])
        os.replace(tmp, q4)
    return {first_type: converted, "Q4_K_M": q4}


def llama_bench(gguf: Path, n_gen: int, cuda: bool) -> dict:
    out = sh([llamacpp.tool("llama-bench", cuda=cuda, build=False), "-m", gguf, "-ngl", "999" if cuda else "0", "-p", "512", "-n", n_gen,
              "-r", "3", "-o", "json"], capture_output=True, text=True).stdout
    rows = json.loads(out)
    result = {}
    for row in rows:
        kind = "tg" if row.get("n_gen") else "pp"
        result[f"{kind}_tok_s"] = round(row["avg_ts"], 2)
        result[f"{kind}_tok_s_stdev"] = round(row.get("stddev_ts", 0.0), 2)
    result["build"] = rows[0].get("build_commit") if rows else None
    return result


def batched_bench(gguf: Path, n_gen: int, cuda: bool, streams=(1, 4, 8, 16)) -> dict:
    """llama-batched-bench: the engine's own multi-sequence decode (no sampling, no server)."""
    out = sh([llamacpp.tool("llama-batched-bench", cuda=cuda, build=False), "-m", gguf, "-ngl", "999" if cuda else "0",
              "-c", str(max(streams) * (128 + n_gen)), "-b", "2048", "-ub", "512", "-npp", "128", "-ntg", str(n_gen),
              "-npl", ",".join(map(str, streams)), "--output-format", "jsonl"], capture_output=True, text=True).stdout
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    return with_ratios({str(row["pl"]): round(row["speed_tg"], 2) for row in rows})


def with_ratios(by_streams: dict) -> dict:
    """{"1": a, "8": b} -> also {"x8": b / a}: aggregate throughput against one stream."""
    if "1" in by_streams:
        for n in [k for k in by_streams if k != "1"]:
            by_streams[f"x{n}"] = round(by_streams[n] / by_streams["1"], 2)
    return by_streams


async def engine_direct(engine_url: str, n_gen: int, streams=(1, 8), repeats: int = 2) -> dict:
    """llama-server's /completion without our API, n concurrent requests: aggregate tok/s by sampling
    mode. "cpu": the server's sampler chain on its CPU thread, slot by slot (our default); "device":
    llama.cpp's backend sampling (--sample-on-device); "greedy": temperature 0 (argmax only)."""
    import httpx

    prompt = harmony.render_prompt([{"role": "user", "content": "Write a long story number 1."}])
    modes = {"cpu": {"temperature": 1.0}, "device": {"temperature": 1.0, "backend_sampling": True}, "greedy": {"temperature": 0.0}}
    out: dict = {}
    async with httpx.AsyncClient(base_url=engine_url, timeout=None, limits=httpx.Limits(max_keepalive_connections=0)) as client:
        async def one(seed: int, extra: dict) -> int:
            body = {"prompt": prompt, "n_predict": n_gen, "samplers": ["temperature", "top_p"], "top_p": 1.0, "seed": seed,
                    "cache_prompt": False, "ignore_eos": True, **extra}
            r = (await client.post("/completion", json=body)).json()
            if "error" in r:
                raise RuntimeError(f"llama-server: {r['error']}")
            return r["tokens_predicted"]

        for mode, extra in modes.items():
            await asyncio.gather(*(one(90 + i, extra) for i in range(max(streams))))  # warm-up
            for n in streams:
                rates = []
                for rep in range(repeats):
                    t0 = time.perf_counter()
                    tokens = sum(await asyncio.gather(*(one(1000 * rep + i, extra) for i in range(n))))
                    rates.append(tokens / (time.perf_counter() - t0))
                out.setdefault(mode, {})[str(n)] = round(sorted(rates)[len(rates) // 2], 2)
            with_ratios(out[mode])
    return out


def parser_cost_us(n_tokens: int = 2000) -> float:
    """Our per-token cost on structured output (Harmony parse + OpenAI delta + SSE JSON), in microseconds."""
    from gptoss.serving.api import _sse
    from gptoss.serving.chat import ChatOutput

    text = " ".join(f"word{i % 97}" for i in range(n_tokens))
    question = [{"role": "user", "content": "Say many words."}]
    answer = {"role": "assistant", "reasoning_content": text[: len(text) // 4], "content": text}
    tokens = harmony.render_training(question + [answer])[len(harmony.render_prompt(question)):]
    out = ChatOutput()
    t0 = time.perf_counter()
    for t in tokens:
        for d in out.feed(t):
            _sse({"id": "x", "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": d}]})
    return round((time.perf_counter() - t0) / len(tokens) * 1e6, 1)


def bench_one(gguf: Path, args) -> dict:
    result = {"file": gguf.name, "size_gb": round(gguf.stat().st_size / 1e9, 2)}
    result["llama_bench"] = llama_bench(gguf, args.max_tokens, args.device != "cpu")
    try:
        result["llama_batched_bench_tg"] = batched_bench(gguf, args.max_tokens, args.device != "cpu", tuple(args.streams))
    except (subprocess.CalledProcessError, Exception) as e:  # an older build without the tool: the rest still runs
        result["llama_batched_bench_tg"] = {"error": f"{type(e).__name__}: {e}"}
    on_progress(result)
    for mode in args.modes:
        log_path = Path(os.environ.get("OUT") or args.work, f"serve-{gguf.stem}-{mode}.log")
        srv_args = argparse.Namespace(url=None, backend="llamacpp", model=str(gguf), device=args.device, parallel=16, queue=32,
                                      threads=None, ctx=args.ctx, start_timeout=600, sample_on_device=mode == "device",
                                      log_path=log_path)
        r = result.setdefault(f"sampling_{mode}", {"server_log": log_path.name})
        try:
            bench_mode(args, mode, srv_args, result, r)
        except Exception as e:  # keep the other modes' figures; the server log says what happened
            r["error"] = f"{type(e).__name__}: {e}"
        on_progress(result)
    return result


def bench_mode(args, mode: str, srv_args, result: dict, r: dict) -> None:
    import httpx

    with serve_load.server(srv_args) as (url, _):
        engine_url = httpx.get(url + "/info").json()["engine_url"]
        if mode == args.modes[0]:  # the engine alone, every sampling mode (per request), once
            result["llama_server_direct"] = asyncio.run(engine_direct(engine_url, args.max_tokens))
        single = asyncio.run(serve_load.throughput(argparse.Namespace(streams=[1], max_tokens=args.max_tokens, repeat=3), url))
        r["api_single_stream_tok_s"] = single["1"]["aggregate_tok_s"]
        r["api_vs_llama_bench_tg"] = round(r["api_single_stream_tok_s"] / result["llama_bench"]["tg_tok_s"], 3)
        direct = result.get("llama_server_direct", {}).get(mode, {}).get("1")
        if direct:
            r["api_vs_llama_server_direct"] = round(r["api_single_stream_tok_s"] / direct, 3)
        r["streams"] = asyncio.run(serve_load.throughput(argparse.Namespace(streams=args.streams, max_tokens=args.max_tokens, repeat=2), url))
        if mode == args.modes[0]:
            r["load"] = asyncio.run(serve_load.load(argparse.Namespace(requests=args.load_requests, concurrency=16, malformed=0.1,
                                                                      max_tokens=64, max_retries=30), url))


def on_progress(partial: dict) -> None:
    """Figures so far to $OUT, so a run cut short by the command limit still reports them."""
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "serve_gpu.partial.json").write_text(json.dumps(partial, indent=2) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stage", choices=["models", "bench"])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--fixture", default="geometry-20b", help="tiny: a CPU smoke run of this script")
    p.add_argument("--device", default="cuda:0")
    p.add_argument("--load-requests", type=int, default=300)
    p.add_argument("--modes", default="cpu,device", type=lambda v: v.split(","),
                   help="sampling modes of our server: cpu (default server) and/or device (--sample-on-device)")
    p.add_argument("--work", default=str(ROOT / ".cache" / "serve-gpu"))
    p.add_argument("--quants", default="F16,Q4_K_M")
    p.add_argument("--streams", default="1,4,8,16", type=lambda s: [int(x) for x in s.split(",")])
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--convert-type", default="f16", choices=["f16", "q8_0"],
                   help="q8_0 for deep fixtures: safetensors + F16 GGUF would not fit a 64 GB disk")
    p.add_argument("--drop-fixture", action="store_true", help="delete the fixture checkpoint once converted")
    p.add_argument("--ctx", type=int, default=2048)
    args = p.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    models = build_models(work, args.fixture, args.layers, args.device != "cpu", args.convert_type, args.drop_fixture)
    if args.stage == "models":
        print(json.dumps({k: str(v) for k, v in models.items()}))
        return
    report = {
        "command": "python " + " ".join(sys.argv),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": serve_load.machine(),
        "llama_cpp_commit": llamacpp.commit(),
        "fixture": f"{args.fixture} --layers {args.layers}",
        "parser_cost_us_per_token": parser_cost_us(),
        "note": "random weights: the API parses garbage on the cheap resync path and streams few SSE chunks; "
                "parser_cost_us_per_token is the cost on structured output",
        "results": [bench_one(models[q], args) for q in args.quants.split(",")],
    }
    text = json.dumps(report, indent=2)
    print(text)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "serve_gpu.json").write_text(text + "\n")


if __name__ == "__main__":
    main()
