"""`gptoss bench`: how fast does an OpenAI-compatible server serve, model load time kept apart?

Against ``--url`` (any OpenAI-compatible server) or a `gptoss serve` it starts itself (``--model``;
then the load time, process start to a healthy /health, is measured and reported on its own line,
never mixed into a rate). After one warm-up request: streamed chat completions at each concurrency
level (time to first token, per-stream decode tokens/s from the first to the last streamed delta,
aggregate completion tokens/s over the level's wall time), then a prompt-length sweep at
concurrency 1 (time to first token, prefill tokens/s). Token counts are the server's ``usage``.
For a GGUF, llama.cpp's own ``llama-bench`` on the same file gives tg/pp figures beside ours as a
ratio. Writes one JSON file, prints tables and draws a PNG.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Literal

from gptoss.errors import ToolchainError
from gptoss.machine import package_versions

PROMPT_WORD = "benchmark "  # one o200k token each (with its space), so N words are about N prompt tokens


class BenchError(ToolchainError):
    """A server `gptoss bench` cannot reach or use, or bad flags."""


# ---------------------------------------------------------------------------------------------
# The server


def api_base(url: str) -> str:
    """``http://host:port/v1`` from a URL given with or without ``/v1``."""
    url = url.rstrip("/")
    return url if url.endswith("/v1") else url + "/v1"


def headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_reachable(url: str, api_key: str | None) -> str:
    """The first model id the server lists; a clear BenchError when it cannot be reached or refuses the key."""
    import httpx

    try:
        r = httpx.get(api_base(url) + "/models", headers=headers(api_key), timeout=10)
    except httpx.HTTPError as e:
        raise BenchError(f"--url {url}: cannot reach it ({type(e).__name__}: {e}); is the server running? "
                         f"Start one with `gptoss serve`, or pass --model to let `gptoss bench` serve it") from e
    if r.status_code == 401:
        raise BenchError(f"--url {url}: the server wants an API key (401); pass --api-key KEY or set GPTOSS_API_KEY")
    if r.status_code != 200:
        raise BenchError(f"--url {url}: GET /v1/models answered {r.status_code} ({r.text[:200]}); "
                         f"is it an OpenAI-compatible API?")
    try:
        return r.json()["data"][0]["id"]
    except (ValueError, KeyError, IndexError, TypeError) as e:
        raise BenchError(f"--url {url}: GET /v1/models lists no model ({r.text[:200]})") from e


@contextlib.contextmanager
def served(*, backend: str, model: str, quant: str | None = None, device: str = "cpu", parallel: int = 16,
           ctx: int = 4096, threads: int | None = None, extra: list[str] | None = None, start_timeout: float = 600,
           log_path: Path | None = None):
    """Start `gptoss serve` on a free port; yields (base URL, load seconds: process start to a healthy /health)."""
    import httpx

    port = free_port()
    cmd = [sys.executable, "-m", "gptoss", "serve", "--backend", backend, "--model", str(model), "--port", str(port),
           "--parallel", str(parallel), "--ctx", str(ctx), "--device", device, "--log-level", "warning"]
    cmd += ["--quant", quant] if quant else []
    cmd += ["--threads", str(threads)] if threads else []
    cmd += list(extra or [])
    env = {k: v for k, v in os.environ.items() if k != "GPTOSS_API_KEY"}  # our own server: no key
    if log_path:
        Path(log_path).parent.mkdir(parents=True, exist_ok=True)
    log = open(log_path, "ab") if log_path else subprocess.DEVNULL  # noqa: SIM115 (closed below)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + start_timeout
        while True:
            if proc.poll() is not None:
                tail = Path(log_path).read_text(errors="replace")[-2000:] if log_path else ""
                raise BenchError(f"`{' '.join(cmd[2:])}` exited with {proc.returncode} before it was healthy"
                                 + (f"; its log ({log_path}):\n{tail}" if tail else ""))
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise BenchError(f"`gptoss serve` was not healthy after {start_timeout:.0f} s (--start-timeout)"
                                 + (f"; see {log_path}" if log_path else ""))
            time.sleep(0.2)
        yield url + "/v1", time.perf_counter() - t0
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if log_path:
            log.close()


# ---------------------------------------------------------------------------------------------
# Measurements


async def one_stream(client, model: str, *, prompt: str, max_tokens: int, seed: int, temperature: float = 1.0) -> dict:
    """One streamed chat completion: completion/prompt tokens (usage), time to first token, decode rate."""
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": temperature, "seed": seed, "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    first = last = None
    usage = None
    deltas = 0
    async with client.stream("POST", "/chat/completions", json=body) as resp:
        if resp.status_code != 200:
            text = (await resp.aread()).decode(errors="replace")
            return {"error": f"{resp.status_code}: {text[:300]}"}
        async for line in resp.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            now = time.perf_counter()
            if chunk.get("usage"):
                usage = chunk["usage"]
            for choice in chunk.get("choices") or []:
                delta = choice.get("delta") or {}
                if any(delta.get(k) for k in ("content", "reasoning_content", "reasoning", "tool_calls")):
                    first = first or now
                    last = now
                    deltas += 1
    n = (usage or {}).get("completion_tokens") or 0
    return {"completion_tokens": n, "prompt_tokens": (usage or {}).get("prompt_tokens"), "deltas": deltas,
            "ttft_s": (first - t0) if first else None, "total_s": time.perf_counter() - t0,
            "decode_tok_s": (n - 1) / (last - first) if first and last and last > first and n > 1 else None,
            # needs no parseable text (random weights stream none): tokens over the whole request, TTFT included
            "wall_tok_s": n / (time.perf_counter() - t0) if n else None}


def _mean(xs: list) -> float | None:
    xs = [x for x in xs if x is not None]
    return round(statistics.fmean(xs), 4) if xs else None


def _median(xs: list) -> float | None:
    xs = [x for x in xs if x is not None]
    return round(statistics.median(xs), 4) if xs else None


async def _level(client, model: str, n: int, *, prompt: str, max_tokens: int, seed: int, temperature: float) -> dict:
    t0 = time.perf_counter()
    results = await asyncio.gather(*(one_stream(client, model, prompt=prompt, max_tokens=max_tokens, seed=seed + i,
                                                temperature=temperature) for i in range(n)))
    wall = time.perf_counter() - t0
    ok = [r for r in results if "error" not in r]
    tokens = sum(r["completion_tokens"] for r in ok)
    return {"concurrency": n, "streams_ok": len(ok), "errors": [r["error"] for r in results if "error" in r][:3],
            "completion_tokens": tokens, "wall_s": round(wall, 4),
            "aggregate_tok_s": round(tokens / wall, 3) if wall > 0 else None,
            "per_stream_tok_s": _mean([r["decode_tok_s"] for r in ok]),
            "per_stream_wall_tok_s": _mean([r["wall_tok_s"] for r in ok]),
            "ttft_s_mean": _mean([r["ttft_s"] for r in ok]), "ttft_s_p50": _median([r["ttft_s"] for r in ok]),
            "ttft_s_max": round(max((r["ttft_s"] for r in ok if r["ttft_s"] is not None), default=0), 4) or None}


DEFAULT_PROMPT = "Write a long story about a lighthouse keeper."


async def measure(url: str, model: str, *, concurrency: list[int], prompt_lengths: list[int], max_tokens: int,
                  sweep_max_tokens: int, repeat: int, api_key: str | None, progress: bool,
                  prompt: str = DEFAULT_PROMPT, temperature: float = 1.0) -> dict:
    import httpx

    from gptoss.progress import Stage

    async with httpx.AsyncClient(base_url=url, timeout=None, headers=headers(api_key),
                                 limits=httpx.Limits(max_connections=max(256, max(concurrency) * 2))) as client:
        t0 = time.perf_counter()
        warm = await one_stream(client, model, prompt=prompt, max_tokens=max_tokens, seed=10_000, temperature=temperature)
        warmup = {"seconds": round(time.perf_counter() - t0, 4), **{k: warm.get(k) for k in ("completion_tokens", "error")}}
        if "error" in warm:
            raise BenchError(f"--url {url}: the warm-up request failed ({warm['error']})")
        levels: dict[int, list[dict]] = {}
        with Stage("concurrency levels", total=len(concurrency) * repeat, unit="levels", enabled=progress) as bar:
            for r in range(repeat):  # levels interleaved per repeat: slow drifts of a shared host hit them all
                for n in concurrency:
                    levels.setdefault(n, []).append(
                        await _level(client, model, n, prompt=prompt, max_tokens=max_tokens, seed=1000 * n + 100 * r,
                                     temperature=temperature))
                    bar.update(1)
        sweep = []
        with Stage("prompt lengths", total=len(prompt_lengths), unit="prompts", enabled=progress) as bar:
            for words in prompt_lengths:
                # Each request opens with its own number, so no server reuses the previous prompt from its cache.
                res = await one_stream(client, model, prompt=f"{2 * words} " + PROMPT_WORD * words,
                                       max_tokens=sweep_max_tokens, seed=7, temperature=temperature)
                # A like prompt for one token: its whole time bounds the prefill from above, text or not.
                one = await one_stream(client, model, prompt=f"{2 * words + 1} " + PROMPT_WORD * words, max_tokens=1, seed=7,
                                       temperature=temperature)
                row = {"prompt_words": words, **{k: res.get(k) for k in ("prompt_tokens", "completion_tokens", "ttft_s",
                                                                         "decode_tok_s", "error")},
                       "one_token_s": round(one["total_s"], 4) if "error" not in one else None}
                first = res.get("ttft_s") or row["one_token_s"]
                if first and res.get("prompt_tokens"):
                    row["prefill_tok_s"] = round(res["prompt_tokens"] / first, 2)
                    row["prefill_from"] = "ttft" if res.get("ttft_s") else "one_token_s"
                sweep.append({k: v for k, v in row.items() if v is not None})
                bar.update(1)
    out = []
    for n, runs in levels.items():  # the median run of each level by aggregate rate
        runs = sorted(runs, key=lambda x: x["aggregate_tok_s"] or 0)
        mid = dict(runs[len(runs) // 2])
        mid["repeats"] = len(runs)
        out.append(mid)
    base = next((x for x in out if x["concurrency"] == 1), None)
    for x in out:
        if base and base["aggregate_tok_s"] and x["aggregate_tok_s"] is not None:
            x["vs_concurrency_1"] = round(x["aggregate_tok_s"] / base["aggregate_tok_s"], 3)
    return {"warmup": warmup, "concurrency": out, "prompt_sweep": sweep}


def llama_bench(gguf: Path, *, prompt: int, gen: int, device: str, threads: int | None) -> dict:
    """llama.cpp's own ``llama-bench`` on the file: pp (prompt tokens/s) and tg (generation tokens/s)."""
    from gptoss import llamacpp

    cuda = device.startswith("cuda")
    exe = llamacpp.tool("llama-bench", cuda=cuda)
    cmd = [str(exe), "-m", str(gguf), "-p", str(prompt), "-n", str(gen), "-r", "3", "-o", "json",
           "-ngl", "99" if cuda else "0"]
    cmd += ["-t", str(threads)] if threads else []
    env = dict(os.environ)
    if cuda and ":" in device:
        env["CUDA_VISIBLE_DEVICES"] = device.split(":", 1)[1]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        return {"command": " ".join(cmd), "error": proc.stderr[-1000:]}
    rows = json.loads(proc.stdout)
    out: dict[str, Any] = {"command": " ".join(cmd)}
    for r in rows:
        key = "pp" if r.get("n_prompt") and not r.get("n_gen") else "tg"
        out[key] = {"tokens": r.get("n_prompt") or r.get("n_gen"), "tok_s": round(r["avg_ts"], 3),
                    "stddev": round(r.get("stddev_ts", 0.0), 3)}
    return out


def _ratios(result: dict) -> dict:
    """Ours / llama-bench's: tg against per-stream decode at concurrency 1, pp against the sweep's prefill."""
    lb = result.get("llama_bench") or {}
    out = {}
    c1 = next((x for x in result["concurrency"] if x["concurrency"] == 1), None)
    ours = c1 and (c1.get("per_stream_tok_s") or c1.get("per_stream_wall_tok_s"))
    if lb.get("tg") and ours:
        out["tg"] = round(ours / lb["tg"]["tok_s"], 3)
        out["tg_from"] = "per_stream_tok_s" if c1.get("per_stream_tok_s") else "per_stream_wall_tok_s"
    pp = [x for x in result["prompt_sweep"] if x.get("prefill_tok_s")]
    if lb.get("pp") and pp:
        closest = min(pp, key=lambda x: abs(x.get("prompt_tokens", 0) - lb["pp"]["tokens"]))
        out["pp"] = round(closest["prefill_tok_s"] / lb["pp"]["tok_s"], 3)
        out["pp_at_prompt_tokens"] = closest.get("prompt_tokens")
    return out


def machine() -> dict:
    info: dict[str, Any] = {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()}
    with contextlib.suppress(Exception):
        gpu = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10).stdout.strip()
        info["gpu"] = gpu or None
    return info


# ---------------------------------------------------------------------------------------------
# Table and chart


def print_tables(result: dict, *, file=None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(file=file or sys.stdout, width=120)
    load = result.get("load_s")
    console.print(f"server: {result['url']} model {result['model']}; load time "
                  + (f"{load:.2f} s (process start to healthy, not in any rate)" if load is not None
                     else "not measured (a running server)")
                  + f"; warm-up request {result['warmup']['seconds']:.2f} s")
    t = Table(title=f"generation, {result['max_tokens']} max tokens per stream")
    for col in ("concurrency", "ok", "TTFT mean s", "TTFT p50 s", "per-stream tok/s", "per-stream incl. TTFT",
                "aggregate tok/s", "× c=1"):
        t.add_column(col, justify="right")
    f = lambda x, d=3: "" if x is None else f"{x:.{d}f}"  # noqa: E731
    for x in result["concurrency"]:
        t.add_row(str(x["concurrency"]), f"{x['streams_ok']}/{x['concurrency']}", f(x["ttft_s_mean"]),
                  f(x["ttft_s_p50"]), f(x["per_stream_tok_s"], 2), f(x.get("per_stream_wall_tok_s"), 2),
                  f(x["aggregate_tok_s"], 2),
                  f(x.get("vs_concurrency_1"), 2))
    console.print(t)
    s = Table(title="prompt length (concurrency 1)")
    for col in ("prompt tokens", "TTFT s", "1-token request s", "prefill tok/s", "decode tok/s", "error"):
        s.add_column(col, justify="right")
    for x in result["prompt_sweep"]:
        s.add_row(str(x.get("prompt_tokens", f"~{x['prompt_words']}")), f(x.get("ttft_s")), f(x.get("one_token_s")),
                  f(x.get("prefill_tok_s"), 1), f(x.get("decode_tok_s"), 2), (x.get("error") or "")[:40])
    console.print(s)
    lb = result.get("llama_bench")
    if lb:
        if lb.get("error"):
            console.print(f"llama-bench failed: {lb['error'][-300:]}")
        else:
            r = result.get("vs_llama_bench", {})
            console.print("llama-bench on the same file: "
                          + ", ".join(f"{k}{lb[k]['tokens']} {lb[k]['tok_s']:.2f} tok/s" for k in ("pp", "tg") if k in lb)
                          + "; ours / llama-bench: "
                          + ", ".join(f"{k} {v:.2f}" for k, v in r.items() if k in ("pp", "tg"))
                          + (" (tg from per-stream rate incl. TTFT: no streamed text)" if r.get("tg_from") ==
                             "per_stream_wall_tok_s" else ""))


def chart(result: dict, path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("gptoss bench: no chart (matplotlib is missing: pip install 'gptoss-toolchain[eval]')", file=sys.stderr)
        return None
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.2))
    levels = result["concurrency"]
    xs = [x["concurrency"] for x in levels]
    a.plot(xs, [x["aggregate_tok_s"] for x in levels], "o-", label="aggregate tok/s")
    if any(x["per_stream_tok_s"] for x in levels):
        a.plot(xs, [x["per_stream_tok_s"] for x in levels], "s--", label="per-stream decode tok/s")
    a.plot(xs, [x.get("per_stream_wall_tok_s") for x in levels], "^:", label="per-stream tok/s incl. TTFT")
    lb = result.get("llama_bench") or {}
    if lb.get("tg"):
        a.axhline(lb["tg"]["tok_s"], color="grey", ls=":", label=f"llama-bench tg{lb['tg']['tokens']}")
    a.set_xscale("log", base=2)
    a.set_xticks(xs, [str(x) for x in xs])
    a.set_xlabel("concurrent streams")
    a.set_ylabel("generation tokens/s")
    a.set_title("generation (load time excluded)")
    a.legend(fontsize=8)
    sweep = [x for x in result["prompt_sweep"] if x.get("prompt_tokens")]
    if any(x.get("ttft_s") for x in sweep):
        b.plot([x["prompt_tokens"] for x in sweep], [x.get("ttft_s") for x in sweep], "o-", label="time to first token")
    b.plot([x["prompt_tokens"] for x in sweep], [x.get("one_token_s") for x in sweep], "s--", label="1-token request")
    b.legend(fontsize=8)
    b.set_xlabel("prompt tokens")
    b.set_ylabel("seconds")
    b.set_title("prompt length (concurrency 1)")
    load = result.get("load_s")
    fig.suptitle(f"gptoss bench: {result['model']}" + (f" (load {load:.1f} s, reported apart)" if load is not None else ""))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------
# The command


def _ints(flag: str, value: Any, problems: list[str]) -> list[int]:
    items = value if isinstance(value, (list, tuple)) else str(value).split(",")  # fire makes "1,2" a tuple
    value = ",".join(map(str, items))
    try:
        out = [int(str(v).strip()) for v in items if str(v).strip()]
    except ValueError:
        problems.append(f"{flag} {value}: comma-separated whole numbers, e.g. 1,2,4,8,16")
        return []
    if not out or any(v < 1 for v in out):
        problems.append(f"{flag} {value}: comma-separated whole numbers of at least 1, e.g. 1,2,4,8,16")
    return out


def bench(url: str | None = None, *, model: str | None = None, backend: Literal["llamacpp", "transformers"] = "llamacpp",
          quant: str | None = None, device: str = "cpu", concurrency: str = "1,2,4,8,16", prompt: str = DEFAULT_PROMPT,
          temperature: float = 1.0,
          prompt_lengths: str = "64,256,1024", max_tokens: int = 128, sweep_max_tokens: int = 16, repeat: int = 1,
          parallel: int | None = None, ctx: int = 4096, threads: int | None = None, gguf: str | None = None,
          llama_bench_tool: bool = True, api_key: str | None = None, out: str = "bench.json",
          start_timeout: float = 600, progress: bool = True) -> str:
    """Serving speed: time to first token, per-stream and aggregate tokens/s by concurrency, prompt-length sweep.

    Args:
        url: an OpenAI-compatible API already running, e.g. http://127.0.0.1:8000/v1 (or give --model).
        model: serve this with `gptoss serve` first (a .gguf, an export folder, a checkpoint); its load time is reported apart.
        backend: the backend for --model: llamacpp or transformers.
        quant: which GGUF of an export folder (--model exports/<run>), e.g. q4_k_m.
        device: cpu or cuda:N (the server started for --model, and llama-bench).
        concurrency: concurrent streams per level, comma-separated.
        prompt: the user message every stream of the concurrency levels sends (each with its own seed).
        temperature: sampling temperature of every request (0: greedy).
        prompt_lengths: prompt lengths (about that many tokens each) of the sweep, comma-separated.
        max_tokens: most tokens each stream generates at the concurrency levels.
        sweep_max_tokens: tokens generated per prompt of the sweep.
        repeat: run the levels this many times (interleaved) and report the median run of each.
        parallel: slots of the server started for --model (default: the largest concurrency level).
        ctx: context per request of the server started for --model.
        threads: CPU threads of the server started for --model and of llama-bench.
        gguf: the GGUF the --url server runs, for llama-bench beside it (with --model it is found).
        llama_bench_tool: run llama.cpp's llama-bench on the GGUF (--no-llama-bench-tool skips it).
        api_key: the API key the server wants (default: $GPTOSS_API_KEY).
        out: the JSON result; the PNG chart goes beside it (same name, .png).
        start_timeout: seconds the server started for --model may take to become healthy.
        progress: progress lines.
    """
    problems: list[str] = []
    levels = _ints("--concurrency", concurrency, problems)
    lengths = _ints("--prompt-lengths", prompt_lengths, problems)
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0 <= temperature <= 2:
        problems.append(f"--temperature {temperature}: a number from 0 to 2")
    for flag, v in (("--max-tokens", max_tokens), ("--sweep-max-tokens", sweep_max_tokens), ("--repeat", repeat)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            problems.append(f"{flag} {v}: a whole number of at least 1")
    if (url is None) == (model is None):
        problems.append("say what to benchmark: --url URL (a running OpenAI-compatible API) or --model PATH "
                        "(served here with `gptoss serve`), not both")
    if problems:
        raise BenchError("; ".join(problems))
    api_key = api_key or os.environ.get("GPTOSS_API_KEY")
    out_path = Path(out).expanduser().absolute()
    gguf_path = Path(gguf).expanduser().absolute() if gguf else None
    if model is not None and backend == "llamacpp":
        from gptoss.serving.records import resolve_gguf

        found = resolve_gguf(Path(model).expanduser(), quant, problems)
        if found is None:
            raise BenchError("; ".join(problems))
        gguf_path = Path(found.model)

    started = dt.datetime.now(dt.timezone.utc)
    result: dict[str, Any] = {"schema_version": 1, "date": started.isoformat(timespec="seconds"), "machine": machine(),
                              "command": " ".join(["gptoss", "bench", *sys.argv[2:]]) if sys.argv[1:2] == ["bench"] else None,
                              "versions": package_versions(("gptoss-toolchain", "httpx")),
                              "max_tokens": max_tokens, "sweep_max_tokens": sweep_max_tokens, "repeat": repeat,
                              "prompt": str(prompt), "temperature": temperature}
    with contextlib.ExitStack() as stack:
        if model is not None:
            base_url, load_s = stack.enter_context(served(
                backend=backend, model=model, quant=quant, device=device, parallel=parallel or max(levels), ctx=ctx,
                threads=threads, start_timeout=start_timeout, log_path=out_path.with_suffix(".serve.log")))
            key = None
            result["served"] = {"backend": backend, "model": str(model), "quant": quant, "device": device,
                                "parallel": parallel or max(levels), "ctx": ctx}
        else:
            base_url, load_s, key = api_base(url), None, api_key
        served_model = check_reachable(base_url, key)
        result.update({"url": base_url, "model": served_model, "load_s": round(load_s, 3) if load_s is not None else None})
        result.update(asyncio.run(measure(base_url, served_model, concurrency=levels, prompt_lengths=lengths,
                                          max_tokens=max_tokens, sweep_max_tokens=sweep_max_tokens, repeat=repeat,
                                          api_key=key, progress=progress, prompt=str(prompt),
                                          temperature=float(temperature))))
    if gguf_path is not None and llama_bench_tool:
        result["gguf"] = str(gguf_path)
        result["llama_bench"] = llama_bench(gguf_path, prompt=max(lengths), gen=max_tokens, device=device,
                                            threads=threads)
        result["vs_llama_bench"] = _ratios(result)
    png = chart(result, out_path.with_suffix(".png"))
    result["chart"] = png.name if png else None
    from gptoss.records import write_json_atomic

    write_json_atomic(out_path, result)
    print_tables(result)
    return str(out_path)
