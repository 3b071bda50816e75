"""GPU evidence for `gptoss serve --backend llamacpp` (run by bench/serve_gpu.sh on an H100).

Stages (each skips what is already done, so a 10-minute command limit can be met one at a time):
  models  gptoss fixture geometry-20b --layers N -> F16 GGUF (pinned converter) -> Q4_K_M (llama-quantize)
  bench   for each GGUF: llama-bench (the engine's own tg/pp); llama-server alone at 1 and 8 streams with
          CPU sampling, device (backend) sampling and greedy; our API at 1/4/8/16 streams, served with
          CPU sampling and with --sample-on-device; a load run (300 requests, concurrency 16, 10% malformed)
  sweep   llama-server started directly with each flag set of SWEEP (flash attention, unified KV, ubatch,
          slots, per-slot context): /completion non-streamed and streamed at 1/8/16 streams, backend sampling,
          and the share of a CPU core llama-server's process used at 16 streams; the winner by 16-stream rate
  api     `gptoss serve --sample-on-device --engine-args=<flags>` at 1/4/8/16 streams, side by side with
          llama-server direct (non-streamed and streamed) on the same engine, in one run; CPU seconds per
          token of each process (our API, llama-server, the client); py-spy profile of our API at 8 and 16
Prints one JSON object and writes it to $OUT/serve_gpu.json (sweep: sweep.json, api: api.json) when $OUT is set.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import importlib.util
import json
import os
import shutil
import signal
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
                 drop_fixture: bool = False, fixture_format: str = "bf16", quantize: bool = True) -> dict[str, Path]:
    """Fixture -> converted GGUF (F16, or Q8_0 where F16 + safetensors would not fit the disk) -> Q4_K_M.

    fixture_format mxfp4: OpenAI's release layout written directly (experts MXFP4, minutes even at 24
    layers); converted with q8_0 its experts stay MXFP4 and the rest is Q8_0 (the roofline's layout)."""
    name = f"{fixture}-{layers}l" + ("-mxfp4" if fixture_format == "mxfp4" else "")
    fixture_dir = work / name
    first_type = convert_type.upper()
    converted = work / f"{name}-{first_type}.gguf"
    q4 = work / f"{name}-Q4_K_M.gguf"
    if not converted.is_file() and not (fixture_dir / "config.json").is_file():
        sh([sys.executable, "-m", "gptoss", "fixture", fixture, "--layers", layers, "--format", fixture_format, "--out", fixture_dir,
            "--force"], cwd=ROOT)
    if not converted.is_file():
        script, env = llamacpp.converter()
        tmp = converted.with_suffix(".partial")
        sh([sys.executable, script, fixture_dir, "--outfile", tmp, "--outtype", convert_type], env=env)
        os.replace(tmp, converted)
    if drop_fixture and fixture_dir.is_dir():
        shutil.rmtree(fixture_dir)
    if not quantize:
        return {first_type: converted}
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


def batched_bench(gguf: Path, n_gen: int, cuda: bool, streams=(1, 4, 8, 16), flags: list[str] | None = None) -> dict:
    """llama-batched-bench: the engine's own multi-sequence decode (no sampling, no server)."""
    out = sh([llamacpp.tool("llama-batched-bench", cuda=cuda, build=False), "-m", gguf, "-ngl", "999" if cuda else "0",
              "-c", str(max(streams) * (128 + n_gen)), "-b", "2048", "-ub", "512", "-npp", "128", "-ntg", str(n_gen),
              "-npl", ",".join(map(str, streams)), "--output-format", "jsonl", *(flags or [])], capture_output=True, text=True).stdout
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    return with_ratios({str(row["pl"]): round(row["speed_tg"], 2) for row in rows})


def with_ratios(by_streams: dict) -> dict:
    """{"1": a, "8": b} -> also {"x8": b / a}: aggregate throughput against one stream."""
    if "1" in by_streams:
        for n in [k for k in by_streams if k != "1"]:
            by_streams[f"x{n}"] = round(by_streams[n] / by_streams["1"], 2)
    return by_streams


async def engine_direct(engine_url: str, n_gen: int, streams=(1, 8), repeats: int = 2,
                        only: tuple[str, ...] = ("cpu", "device", "greedy")) -> dict:
    """llama-server's /completion without our API, n concurrent requests: aggregate tok/s by sampling
    mode. "cpu": the server's sampler chain on its CPU thread, slot by slot (our default); "device":
    llama.cpp's backend sampling (--sample-on-device); "greedy": temperature 0 (argmax only)."""
    import httpx

    prompt = harmony.render_prompt([{"role": "user", "content": "Write a long story number 1."}])
    modes = {"cpu": {"temperature": 1.0}, "device": {"temperature": 1.0, "backend_sampling": True}, "greedy": {"temperature": 0.0}}
    modes = {k: v for k, v in modes.items() if k in only}
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


# llama-server flag sets tried against each other; parallel/ctx are per-slot settings of gptoss serve.
UNIFIED = ["--kv-unified", "--kv-unified-per-slot", "{ctx}"]  # one KV pool; each request still capped at --ctx
SWEEP = {
    "ours-2026-12-01": {"flags": []},
    "fa": {"flags": ["--flash-attn", "on"]},
    "unified": {"flags": UNIFIED},
    "fa+unified": {"flags": ["--flash-attn", "on", *UNIFIED]},
    "fa+unified+ub1024": {"flags": ["--flash-attn", "on", *UNIFIED, "--batch-size", "4096", "--ubatch-size", "1024"]},
    "fa+unified+8slots": {"flags": ["--flash-attn", "on", *UNIFIED], "parallel": 8},
}


async def direct_stream_level(engine_url: str, n: int, n_gen: int, extra: dict, seed0: int = 0) -> float:
    """n streamed /completion requests read as our backend reads them (events split per read, JSON per
    event): the engine's streamed rate without our API. Aggregate tok/s."""
    import httpx

    from gptoss.serving.llamacpp_backend import sse_line_batches

    prompt = harmony.render_prompt([{"role": "user", "content": "Write a long story number 1."}])
    async with httpx.AsyncClient(base_url=engine_url, timeout=None, limits=httpx.Limits(max_keepalive_connections=0)) as client:
        async def one(seed: int) -> int:
            body = {"prompt": prompt, "n_predict": n_gen, "samplers": ["temperature", "top_p"], "top_p": 1.0, "seed": seed,
                    "cache_prompt": False, "ignore_eos": True, "stream": True, "return_tokens": True, **extra}
            got = 0
            async with client.stream("POST", "/completion", json=body) as resp:
                async for lines in sse_line_batches(resp.aiter_bytes()):
                    for line in lines:
                        if line.startswith("data: "):
                            got += len(json.loads(line[6:]).get("tokens") or [])
            return got

        t0 = time.perf_counter()
        tokens = sum(await asyncio.gather(*(one(seed0 + i) for i in range(n))))
        return round(tokens / (time.perf_counter() - t0), 2)


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process (all its threads)."""
    import psutil

    t = psutil.Process(pid).cpu_times()
    return t.user + t.system


@contextlib.contextmanager
def llama_server(gguf: Path, cfg: dict, log_path: Path, device: str = "cuda:0"):
    """llama-server as gptoss serve starts it (server_command), plus cfg's flags; yields (url, pid)."""
    import httpx

    from gptoss.serving import llamacpp_backend as lb
    from gptoss.serving.backends import BackendConfig

    ctx = cfg.get("ctx", 2048)
    flags = [str(ctx) if f == "{ctx}" else f for f in cfg["flags"]]
    config = BackendConfig(model=str(gguf), device=device, parallel=cfg.get("parallel", 16), ctx=ctx, engine_args=tuple(flags))
    port = lb._free_port()
    cmd = lb.server_command(config, llamacpp.tool("llama-server", cuda=device != "cpu", build=False), port)
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"llama-server exited {proc.returncode}: {log_path.read_text(errors='replace')[-1500:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError("llama-server not healthy after 300 s")
            time.sleep(0.2)
        yield url, proc.pid
    finally:
        proc.terminate()
        proc.wait(30)


def sweep_one(gguf: Path, name: str, cfg: dict, n_gen: int, device: str, streams=(1, 8, 16)) -> dict:
    out: dict = {"flags": [str(cfg.get("ctx", 2048)) if f == "{ctx}" else f for f in cfg["flags"]], "parallel": cfg.get("parallel", 16), "ctx_per_slot": cfg.get("ctx", 2048)}
    log_path = Path(os.environ.get("OUT") or ".", f"sweep-{name}.log")
    on_device = {"temperature": 1.0, "backend_sampling": True}
    with llama_server(gguf, cfg, log_path, device) as (url, pid):
        asyncio.run(engine_direct(url, 16, streams=(1,), repeats=1, only=("device",)))  # warm-up
        modes = ("device", "cpu") if not cfg["flags"] else ("device",)  # CPU sampling: for today's flags only
        out["nonstream"] = asyncio.run(engine_direct(url, n_gen, streams=tuple(s for s in streams if s <= out["parallel"]),
                                                     repeats=2, only=modes))
        out["stream_device"] = {}
        for n in streams:
            if n > out["parallel"]:
                continue
            c0, t0 = cpu_s(pid), time.perf_counter()
            rates = [asyncio.run(direct_stream_level(url, n, n_gen, on_device, 100 * r)) for r in range(2)]
            out["stream_device"][str(n)] = sorted(rates)[-1]
            if n == max(streams):
                out["llama_server_cpu_cores_at_16"] = round((cpu_s(pid) - c0) / (time.perf_counter() - t0), 2)
        with_ratios(out["stream_device"])
    return out


def run_sweep(gguf: Path, args) -> dict:
    report: dict = {"file": gguf.name, "configs": {}}
    partial = Path(os.environ.get("OUT") or args.work, f"sweep-{gguf.stem}.partial.json")
    if partial.is_file():  # a sweep cut short by the command limit: keep what it measured
        report["configs"] = {k: v for k, v in json.loads(partial.read_text())["configs"].items() if "error" not in v}
    for name, cfg in SWEEP.items():
        if name in report["configs"]:
            continue
        try:
            report["configs"][name] = sweep_one(gguf, name, cfg, args.max_tokens, args.device)
        except Exception as e:  # keep the others
            report["configs"][name] = {"error": f"{type(e).__name__}: {e}"[:2000]}
        on_progress(report, f"sweep-{gguf.stem}.partial.json")
    ok = {k: v for k, v in report["configs"].items() if "stream_device" in v and v.get("parallel") == 16}
    if ok:
        report["winner"] = max(ok, key=lambda k: ok[k]["stream_device"].get("16", 0))
    try:
        report["batched_bench_fa"] = batched_bench(gguf, args.max_tokens, args.device != "cpu", (1, 4, 8, 16), ["-fa", "on"])
    except Exception as e:
        report["batched_bench_fa"] = {"error": f"{type(e).__name__}: {e}"[:500]}
    return report


def run_api(gguf: Path, args) -> dict:
    """Our API and llama-server direct on the same engine, one run; CPU per token of each process."""
    import httpx
    import psutil

    flags = args.engine_args
    log_path = Path(os.environ.get("OUT") or args.work, f"api-{gguf.stem}.log")
    srv_args = argparse.Namespace(url=None, backend="llamacpp", model=str(gguf), device=args.device, parallel=16, queue=32, threads=None,
                                  ctx=args.ctx, start_timeout=600, sample_on_device=True, log_path=log_path)
    report: dict = {"file": gguf.name, "engine_args": flags, "levels": {}}
    extra = [f"--engine-args={flags}"] if flags else []
    on_device = {"temperature": 1.0, "backend_sampling": True}
    with bench_served(srv_args, extra) as url:
        info = httpx.get(url + "/info").json()
        engine_url = info["engine_url"]
        serve_pid = next(p.pid for p in psutil.process_iter(["cmdline"]) if "serve" in (p.info["cmdline"] or [])
                         and str(gguf) in (p.info["cmdline"] or []) and "gptoss" in " ".join(p.info["cmdline"]))
        engine_pid = next(p.pid for p in psutil.Process(serve_pid).children(recursive=True) if "llama-server" in p.name())
        from gptoss.evaluation import bench

        model_id = bench.check_reachable(url, None)
        asyncio.run(serve_load.throughput(argparse.Namespace(streams=[1, 16], max_tokens=32, repeat=1), url))  # warm-up
        me = psutil.Process()
        for n in args.streams:
            row: dict = {}
            for rep in range(2):  # interleaved: api, direct streamed, direct non-streamed
                spy = raw = None
                if args.py_spy and rep == 0 and n >= 8:
                    raw = Path(os.environ.get("OUT") or args.work, f"pyspy-api-{n}.txt")
                    spy = subprocess.Popen(["py-spy", "record", "--pid", str(serve_pid), "--format", "raw", "--output", str(raw),
                                            "--rate", "200", "--nonblocking"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
                c = (cpu_s(serve_pid) + sum(cpu_s(ch.pid) for ch in psutil.Process(serve_pid).children() if ch.pid != engine_pid),
                     cpu_s(engine_pid), me.cpu_times().user + me.cpu_times().system)
                t0 = time.perf_counter()
                api = asyncio.run(bench.measure(bench.api_base(url), model_id, concurrency=[n], prompt_lengths=[], max_tokens=args.max_tokens,
                                                sweep_max_tokens=1, repeat=1, api_key=None, progress=False))
                wall = time.perf_counter() - t0
                run = api["concurrency"][0]
                tokens = run["completion_tokens"] + (api["warmup"].get("completion_tokens") or 0)  # measure warms up first
                c2 = (cpu_s(serve_pid) + sum(cpu_s(ch.pid) for ch in psutil.Process(serve_pid).children() if ch.pid != engine_pid),
                      cpu_s(engine_pid), me.cpu_times().user + me.cpu_times().system)
                if spy:
                    spy.send_signal(signal.SIGINT)
                    _, err = spy.communicate(timeout=120)
                    row[f"profile_top_rep{rep}"] = top_functions(raw) if raw.is_file() else err.decode()[-500:]
                row.setdefault("api", []).append(run["aggregate_tok_s"])
                row.setdefault("api_cpu_us_per_token", []).append(round((c2[0] - c[0]) / tokens * 1e6, 1))
                row.setdefault("engine_cpu_cores", []).append(round((c2[1] - c[1]) / wall, 2))
                row.setdefault("client_cpu_us_per_token", []).append(round((c2[2] - c[2]) / tokens * 1e6, 1))
                row.setdefault("direct_stream", []).append(asyncio.run(direct_stream_level(engine_url, n, args.max_tokens, on_device, 500 * rep)))
            report["levels"][str(n)] = row
            on_progress(report, f"api-{gguf.stem}.partial.json")
        report["direct_nonstream"] = asyncio.run(engine_direct(engine_url, args.max_tokens, streams=tuple(args.streams), repeats=2,
                                                               only=("device",)))["device"]
    best = {n: max(r["api"]) for n, r in report["levels"].items()}
    report["api_best"] = with_ratios(dict(best))
    report["direct_stream_best"] = with_ratios({n: max(r["direct_stream"]) for n, r in report["levels"].items()})
    report["api_vs_direct_stream"] = {n: round(best[n] / report["direct_stream_best"][n], 3) for n in best}
    report["api_vs_direct_nonstream"] = {n: round(best[n] / report["direct_nonstream"][n], 3) for n in best if n in report["direct_nonstream"]}
    return report


@contextlib.contextmanager
def bench_served(srv_args, extra: list[str]):
    from gptoss.evaluation import bench

    with bench.served(backend="llamacpp", model=srv_args.model, device=srv_args.device, parallel=srv_args.parallel, ctx=srv_args.ctx,
                      extra=["--queue", str(srv_args.queue), "--sample-on-device", *extra], start_timeout=600,
                      log_path=srv_args.log_path) as (url, _):
        yield url.removesuffix("/v1")


def top_functions(raw: Path, n: int = 30) -> list[dict]:
    """py-spy's collapsed stacks -> the functions with the most own (leaf) samples; idle waits included."""
    import collections

    own: collections.Counter = collections.Counter()
    incl: collections.Counter = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        total += int(count)
        frames = stack.split(";")
        own[frames[-1]] += int(count)
        for f in set(frames):
            incl[f] += int(count)
    return [{"function": f, "own_pct": round(100 * c / total, 1), "inclusive_pct": round(100 * incl[f] / total, 1)}
            for f, c in own.most_common(n)]


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


def on_progress(partial: dict, name: str = "serve_gpu.partial.json") -> None:
    """Figures so far to $OUT, so a run cut short by the command limit still reports them."""
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], name).write_text(json.dumps(partial, indent=2) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stage", choices=["models", "bench", "sweep", "api"])
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
    p.add_argument("--no-q4", action="store_true", help="stop at the converted GGUF (no Q4_K_M step)")
    p.add_argument("--fixture-format", default="bf16", choices=["bf16", "mxfp4"],
                   help="mxfp4: write the release layout directly (fast at depth); use with --convert-type q8_0")
    p.add_argument("--ctx", type=int, default=2048)
    p.add_argument("--engine-args", default="", help="api: llama-server flags for gptoss serve --engine-args (the sweep's winner)")
    p.add_argument("--py-spy", action="store_true", help="api: profile our serving process at 8 and 16 streams")
    args = p.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    models = build_models(work, args.fixture, args.layers, args.device != "cpu", args.convert_type, args.drop_fixture,
                          args.fixture_format, not args.no_q4)
    if args.stage == "models":
        print(json.dumps({k: str(v) for k, v in models.items()}))
        return
    if args.stage in ("sweep", "api"):
        head = {"command": "python " + " ".join(sys.argv), "machine": serve_load.machine(), "llama_cpp_commit": llamacpp.commit(),
                "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "fixture": f"{args.fixture} --layers {args.layers}", "max_tokens": args.max_tokens}
        for quant in args.quants.split(","):
            body = run_sweep(models[quant], args) if args.stage == "sweep" else run_api(models[quant], args)
            text = json.dumps({**head, **body}, indent=2)
            print(text)
            if os.environ.get("OUT"):
                Path(os.environ["OUT"], f"{args.stage}-{args.layers}l-{quant}.json").write_text(text + "\n")
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
