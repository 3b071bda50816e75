"""What our API costs per streamed token, apart from any engine (issue 16).

A stand-in llama-server (`fake-server`, this file) plays a batched engine: every --step-ms it writes one
event to each open /completion stream, in llama-server's own streamed event format (the fields of
tools/server/server-task.cpp's partial and final results), tokens of a structured Harmony answer
(analysis, then final) so the parser takes its normal path. `gptoss serve` is pointed at it through
GPTOSS_LLAMA_CPP_BIN and the same kind of client reads (a) the stand-in directly and (b) our API
(`gptoss bench`'s streaming client), at 1/4/8/16 streams, one level after the other. Reported: aggregate
tok/s of both, and the CPU time of the serving process per token (its own cost, whatever the engine).
With --py-spy, the serving process is profiled during the highest level (needs py-spy from PyPI);
the top functions by own time are printed.

  python bench/api_overhead.py run --step-ms 4 --streams 1,4,8,16 --max-tokens 256 [--py-spy]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import datetime
import json
import os
import signal
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


# ---------------------------------------------------------------------------------------------
# The stand-in engine


def answer_tokens(n: int) -> list[int]:
    """Completion tokens of a structured answer (analysis, then final), at least n of them."""
    from gptoss import harmony

    words = " ".join(f"word{i % 97}" for i in range(n))
    question = [{"role": "user", "content": "Say many words."}]
    answer = {"role": "assistant", "reasoning_content": words[: len(words) // 4], "content": words}
    return harmony.render_training(question + [answer])[len(harmony.render_prompt(question)):]


class FakeEngine:
    def __init__(self, step_s: float, slots: int, ctx: int):
        from gptoss import harmony

        self.step_s, self.slots, self.ctx = step_s, slots, ctx
        self.enc = harmony.encoding()
        self.streams: set[asyncio.Queue] = set()
        self.wake = asyncio.Event()
        self.tokens = answer_tokens(4096)
        self.texts = [self.enc.decode([t]) if t < harmony.FIRST_SPECIAL_ID else "" for t in self.tokens]

    async def clock(self) -> None:
        """One engine step: every open stream gets its next token (a batched decode)."""
        while True:
            if not self.streams:
                self.wake.clear()
                await self.wake.wait()
            for q in list(self.streams):
                q.put_nowait(None)
            await asyncio.sleep(self.step_s)

    def event(self, i: int, n_prompt: int, final: bool, n_predict: int) -> bytes:
        tok = self.tokens[i % len(self.tokens)]
        body = {"index": 0, "content": self.texts[i % len(self.tokens)], "tokens": [tok], "stop": final, "id_slot": 0,
                "tokens_predicted": i + 1, "tokens_evaluated": n_prompt}
        if final:
            body.update({"model": "fake", "generation_settings": {"n_predict": n_predict}, "prompt": "<prompt text>",
                         "has_new_line": False, "truncated": False, "stop_type": "limit", "stopping_word": "",
                         "tokens_cached": n_prompt + i + 1, "timings": {}})
        data = b"data: " + json.dumps(body, ensure_ascii=False).encode() + b"\n\n"
        return b"%x\r\n%s\r\n" % (len(data), data)  # one HTTP chunk per event, as cpp-httplib writes them

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            line, *headers = head.decode().split("\r\n")
            method, path, _ = line.split(" ", 2)
            length = next((int(h.split(":", 1)[1]) for h in headers if h.lower().startswith("content-length:")), 0)
            body = json.loads(await reader.readexactly(length)) if length else {}
            if path == "/completion" and method == "POST":
                await self.complete(body, writer)
            else:
                payload = {"/health": {"status": "ok"},
                           "/props": {"default_generation_settings": {"n_ctx": self.ctx}, "total_slots": self.slots}}.get(path)
                data = json.dumps(payload or {"error": "not found"}).encode()
                status = b"200 OK" if payload else b"404 Not Found"
                writer.write(b"HTTP/1.1 %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s"
                             % (status, len(data), data))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def complete(self, body: dict, writer: asyncio.StreamWriter) -> None:
        n_predict = int(body.get("n_predict") or 16)
        n_prompt = len(body.get("prompt") or [])
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n"
                     b"Connection: close\r\n\r\n")
        q: asyncio.Queue = asyncio.Queue()
        self.streams.add(q)
        self.wake.set()
        try:
            for i in range(n_predict):
                await q.get()
                writer.write(self.event(i, n_prompt, i == n_predict - 1, n_predict))
                await writer.drain()
            writer.write(b"0\r\n\r\n")
            await writer.drain()
        finally:
            self.streams.discard(q)


async def fake_server(port: int, step_s: float, slots: int, ctx: int) -> None:
    engine = FakeEngine(step_s, slots, ctx)
    server = await asyncio.start_server(engine.handle, "127.0.0.1", port)
    asyncio.get_running_loop().create_task(engine.clock())
    async with server:
        await server.serve_forever()


def fake_bin_dir(step_s: float) -> Path:
    """A folder whose `llama-server` is this stand-in (GPTOSS_LLAMA_CPP_BIN), taking llama-server's flags."""
    d = Path(tempfile.mkdtemp(prefix="fake-llama-bin-"))
    exe = d / "llama-server"
    exe.write_text(f"#!/bin/sh\nexec {sys.executable} {Path(__file__).resolve()} fake-server --step-ms {step_s * 1000} \"$@\"\n")
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    return d


# ---------------------------------------------------------------------------------------------
# Measurements


async def direct_level(url: str, n: int, max_tokens: int) -> dict:
    """n concurrent streamed /completion requests read straight from the engine (no API)."""
    import httpx

    from gptoss import harmony

    prompt = harmony.render_prompt([{"role": "user", "content": "Say many words."}])
    async with httpx.AsyncClient(base_url=url, timeout=None, limits=httpx.Limits(max_keepalive_connections=0)) as client:
        async def one() -> int:
            got = 0
            body = {"prompt": prompt, "n_predict": max_tokens, "stream": True, "return_tokens": True}
            async with client.stream("POST", "/completion", json=body) as resp:
                async for line in resp.aiter_lines():
                    if line.startswith("data: "):
                        got += len(json.loads(line[6:])["tokens"])
            return got

        t0 = time.perf_counter()
        tokens = sum(await asyncio.gather(*(one() for _ in range(n))))
        return {"aggregate_tok_s": round(tokens / (time.perf_counter() - t0), 1), "tokens": tokens}


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process and its children (the render workers), not the engine."""
    import psutil

    total = 0.0
    proc = psutil.Process(pid)
    for p in [proc, *proc.children(recursive=True)]:
        try:
            if "fake-server" in " ".join(p.cmdline()):
                continue
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


def top_functions(raw: Path, n: int = 25) -> list[dict]:
    """py-spy's collapsed stacks -> functions by own (leaf) samples and by inclusive samples."""
    own: collections.Counter = collections.Counter()
    incl: collections.Counter = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        c = int(count)
        total += c
        frames = stack.split(";")
        own[frames[-1]] += c
        for f in set(frames):
            incl[f] += c
    return [{"function": f, "own_pct": round(100 * c / total, 1), "inclusive_pct": round(100 * incl[f] / total, 1)}
            for f, c in own.most_common(n)]


def run(args) -> dict:
    import httpx

    from gptoss.evaluation import bench

    step_s = args.step_ms / 1000
    os.environ["GPTOSS_LLAMA_CPP_BIN"] = str(fake_bin_dir(step_s))
    model = Path(tempfile.mkdtemp()) / "stand-in.gguf"
    model.write_bytes(b"GGUF")  # the llamacpp backend checks the file exists; the stand-in never reads it
    report: dict = {"command": "python " + " ".join(sys.argv), "machine": bench.machine(),
                    "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                    "step_ms": args.step_ms, "offered_tok_s_per_stream": round(1 / step_s, 1) if step_s else None,
                    "max_tokens": args.max_tokens, "levels": []}
    log_path = Path(args.log or tempfile.mktemp(suffix=".log"))
    with bench.served(backend="llamacpp", model=str(model), parallel=max(args.streams), ctx=4096, log_path=log_path,
                      extra=["--queue", str(max(args.streams))]) as (url, _):
        base = url.removesuffix("/v1")
        info = httpx.get(base + "/info").json()
        engine_url = info["engine_url"]
        serve_pid = next(p.pid for p in __import__("psutil").process_iter(["cmdline"])
                         if "serve" in (p.info["cmdline"] or []) and str(model) in (p.info["cmdline"] or []))
        model_id = bench.check_reachable(url, None)
        asyncio.run(direct_level(engine_url, 1, 32))  # warm-up
        for n in args.streams:
            row = {"streams": n, "direct": asyncio.run(direct_level(engine_url, n, args.max_tokens))}
            spy = None
            if args.py_spy and n == max(args.streams):
                raw = Path(tempfile.mktemp(suffix=".txt"))
                spy = subprocess.Popen(["py-spy", "record", "--pid", str(serve_pid), "--format", "raw", "--output", str(raw),
                                        "--rate", "250", "--nonblocking"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            c0 = cpu_seconds(serve_pid)
            api = asyncio.run(bench.measure(url, model_id, concurrency=[n], prompt_lengths=[], max_tokens=args.max_tokens,
                                            sweep_max_tokens=1, repeat=1, api_key=None, progress=False))
            cpu = cpu_seconds(serve_pid) - c0
            level = api["concurrency"][0]
            tokens = level["completion_tokens"] + (api["warmup"].get("completion_tokens") or 0)
            row["api"] = {"aggregate_tok_s": level["aggregate_tok_s"], "tokens": level["completion_tokens"],
                          "streams_ok": level["streams_ok"], "errors": level["errors"]}
            row["api_vs_direct"] = round(level["aggregate_tok_s"] / row["direct"]["aggregate_tok_s"], 3)
            row["serve_cpu_us_per_token"] = round(cpu / tokens * 1e6, 1)
            if spy:
                spy.send_signal(signal.SIGINT)
                _, err = spy.communicate(timeout=60)
                row["profile_top"] = top_functions(raw) if raw.is_file() else {"error": err.decode()[-500:]}
            report["levels"].append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "profile_top"}), file=sys.stderr, flush=True)
    return report


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="stage", required=True)
    f = sub.add_parser("fake-server", help="the stand-in llama-server (takes llama-server's flags; reads --port)")
    f.add_argument("--step-ms", type=float, default=4.0)
    f.add_argument("--port", type=int, required=True)
    f.add_argument("--parallel", type=int, default=16)
    f.add_argument("--ctx-size", type=int, default=65536)
    r = sub.add_parser("run")
    r.add_argument("--step-ms", type=float, default=4.0, help="engine step: each open stream gets a token per step")
    r.add_argument("--streams", default="1,4,8,16", type=lambda s: [int(x) for x in s.split(",")])
    r.add_argument("--max-tokens", type=int, default=256)
    r.add_argument("--py-spy", action="store_true")
    r.add_argument("--log", default=None, help="the serving process's log")
    args, rest = p.parse_known_args()  # the stand-in ignores the llama-server flags it does not use
    if args.stage == "fake-server":
        asyncio.run(fake_server(args.port, args.step_ms / 1000, args.parallel, args.ctx_size // max(args.parallel, 1)))
        return
    report = run(args)
    text = json.dumps(report, indent=2)
    print(text)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "api_overhead.json").write_text(text + "\n")


if __name__ == "__main__":
    main()
