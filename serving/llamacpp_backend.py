"""llama.cpp backend: llama.cpp's own llama-server (parallel slots, continuous batching) behind our API.

llama-server, built from the pinned vendored source (gptoss.llamacpp), runs as a child process on
127.0.0.1 and a free port. We send it prompt token ids (rendering stays in gptoss.harmony) on its
native ``/completion`` endpoint and read streamed token ids back; closing our stream closes the
HTTP connection, which makes llama-server cancel the task and free the slot.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio

from gptoss import harmony
from gptoss.serving.backends import (Backend, BackendConfig, BackendError, EngineDown, Generated, SamplingParams, ServeError,
                                     register_backend)

log = logging.getLogger("gptoss.serve.llamacpp")

HEALTH_POLL_S = 0.25
WAIT_REPORT_S = 30.0  # how often a long model load says it is still waiting
STABLE_S = 60.0  # an engine that served this long before it died starts a new count of failures in a row
MAX_BACKOFF_S = 60.0
EXIT_GRACE_S = 2.0  # a dropped engine connection: how long to wait for the process to be seen exiting


def _watch(engine: "_Engine") -> None:
    """Set ``engine.exited`` the moment the process ends: a daemon thread blocked in waitpid (no polling,
    and not one of the event loop's executor threads for the engine's whole life)."""
    loop = asyncio.get_running_loop()

    def wait() -> None:
        engine.proc.wait()
        with contextlib.suppress(RuntimeError):  # the loop is already closed: nobody is waiting
            loop.call_soon_threadsafe(engine.exited.set)

    threading.Thread(target=wait, name=f"watch-llama-server-{engine.proc.pid}", daemon=True).start()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    """Linux: SIGTERM llama-server when our process dies, even by SIGKILL (no orphaned engines)."""
    with contextlib.suppress(Exception):
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def server_command(config: BackendConfig, binary: Path, port: int) -> list[str]:
    """The llama-server command line: every slot gets ``ctx`` tokens of its own KV cache."""
    cmd = [
        str(binary), "--model", config.model, "--host", "127.0.0.1", "--port", str(port),
        "--parallel", str(config.parallel), "--ctx-size", str(config.ctx * config.parallel), "--no-kv-unified",
        "--cont-batching", "--no-webui", "--n-gpu-layers", "999" if config.gpu_index is not None else "0",
    ]
    if config.threads:
        cmd += ["--threads", str(config.threads)]
    return cmd + list(config.engine_args)


@dataclasses.dataclass
class _Engine:
    """One llama-server launch: its process, HTTP client and log; ``exited`` is set when the process ends."""

    proc: subprocess.Popen
    base_url: str
    client: Any  # httpx.AsyncClient
    log_path: str
    exited: asyncio.Event
    ready_at: float | None = None  # monotonic time it answered /health
    keep_log: bool = False  # kept when it failed: an error message names it

    def log_tail(self, n: int = 2000) -> str:
        try:
            return Path(self.log_path).read_text(errors="replace")[-n:].strip()
        except OSError:
            return ""


class _StartFailed(Exception):
    pass


@register_backend("llamacpp")
class LlamaCppBackend(Backend):
    """A GGUF served by llama-server; all layers on the assigned GPU (``--device cuda:N``) or the CPU.

    The process is watched: when it exits, in-flight requests fail with EngineDown (503), /health
    says 503 and it is restarted with exponential backoff (``engine_backoff`` doubled per failure);
    more than ``engine_restarts`` failures in a row (failed starts, or deaths within STABLE_S of a
    start) make ``supervise`` raise, and the serving process exits non-zero.
    """

    def __init__(self, config: BackendConfig):
        super().__init__(config)
        if config.adapter:
            raise ServeError("--adapter is for the transformers backend; merge and export a GGUF for llamacpp (gptoss merge, gptoss export)")
        if not Path(config.model).is_file():
            raise ServeError(f"--model {config.model}: the llamacpp backend serves a .gguf file; export one with `gptoss export`")
        from gptoss import llamacpp

        # Found (or built, once per machine, announced with progress) here, before the API listens:
        # nothing that waits for /health ever waits for a compiler.
        self.binary = llamacpp.tool("llama-server", cuda=config.gpu_index is not None)
        self._engine: _Engine | None = None
        self.base_url = ""
        self.failures = 0  # failures in a row (reset by a death after STABLE_S of serving)
        self.restarts = 0  # restarts since the process started
        self._stopping = False

    async def start(self) -> None:
        await self._start_until_ready()

    async def supervise(self) -> None:
        while True:
            engine = self._engine
            await engine.exited.wait()
            if self._stopping:
                return
            self.ready = False
            engine.keep_log = True
            up = time.monotonic() - (engine.ready_at or time.monotonic())
            if up >= STABLE_S:
                self.failures = 0
            code = engine.proc.returncode
            self.unavailable = f"the inference engine exited (code {code}); it is being restarted"
            log.error("llama-server (pid %d) exited with %s after %.0fs of serving; its log %s ends:\n%s", engine.proc.pid,
                      code, up, engine.log_path, engine.log_tail(1000))
            await self._back_off(f"llama-server exited with {code} after {up:.0f}s of serving (its log: {engine.log_path})")
            await self._start_until_ready()

    async def _start_until_ready(self) -> None:
        while True:
            try:
                await self._launch()
                return
            except _StartFailed as e:
                await self._back_off(str(e))

    async def _back_off(self, failure: str) -> None:
        """Count a failure; wait before the next start, or raise ServeError after too many in a row."""
        self.failures += 1
        allowed = self.config.engine_restarts
        if self.failures > allowed:
            raise ServeError(f"llama-server failed {self.failures} time(s) in a row, more than --engine-restarts {allowed}; "
                             f"the server exits so that a restart policy (Docker's `restart: unless-stopped`) or you can "
                             f"take over. Last failure: {failure}")
        delay = min(self.config.engine_backoff * 2 ** (self.failures - 1), MAX_BACKOFF_S)
        self.restarts += 1
        self.unavailable = (f"the inference engine failed ({self.failures} failure(s) in a row, {allowed} tolerated); "
                            f"restarting it in {delay:g}s")
        log.warning("%s\nrestarting llama-server in %gs (restart %d of at most %d in a row)", failure, delay, self.failures, allowed)
        await asyncio.sleep(delay)  # the backoff itself

    async def _launch(self) -> None:
        """Start llama-server and wait until it answers /health; _StartFailed if it exits first."""
        import httpx

        port = _free_port()
        env = dict(os.environ)
        if self.config.gpu_index is not None:
            env["CUDA_VISIBLE_DEVICES"] = str(self.config.gpu_index)
        log_file = tempfile.NamedTemporaryFile(prefix="llama-server-", suffix=".log", delete=False)
        cmd = server_command(self.config, self.binary, port)
        log.info("starting %s (log: %s)", " ".join(cmd), log_file.name)
        with log_file:  # the child writes through its own descriptor
            proc = subprocess.Popen(cmd, env=env, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    preexec_fn=_die_with_parent)
        # No keep-alive: a pooled connection that llama-server closes as we reuse it fails the request
        # ("Server disconnected without sending a response"); a fresh localhost connection costs ~0.1 ms.
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=0)
        base_url = f"http://127.0.0.1:{port}"
        client = httpx.AsyncClient(base_url=base_url, timeout=httpx.Timeout(None, connect=10.0), limits=limits)
        engine = self._engine = _Engine(proc=proc, base_url=base_url, client=client, log_path=log_file.name, exited=asyncio.Event())
        self.base_url = base_url
        _watch(engine)
        log.info("waiting for llama-server to load %s (its log: %s)", self.config.model, engine.log_path)
        started = time.monotonic()
        said = started
        while True:
            if engine.exited.is_set():
                engine.keep_log = True
                raise _StartFailed(
                    f"llama-server exited with {proc.returncode} while loading {self.config.model} "
                    f"({time.monotonic() - started:.0f}s after it started); its log {engine.log_path} ends:\n"
                    f"{engine.log_tail()}\nCheck that the file is a GGUF written by `gptoss export` and that it fits in "
                    f"memory; the engine's command line was: {' '.join(cmd)}")
            with contextlib.suppress(httpx.HTTPError):
                if (await client.get("/health")).status_code == 200:
                    break
            if time.monotonic() - said >= WAIT_REPORT_S:
                said = time.monotonic()
                log.info("still waiting for llama-server to load %s (%.0fs; its log: %s)", self.config.model,
                         said - started, engine.log_path)
            with contextlib.suppress(asyncio.TimeoutError):  # the next health poll, or at once when it exits
                await asyncio.wait_for(engine.exited.wait(), HEALTH_POLL_S)
        try:
            props = (await client.get("/props")).json()
        except httpx.HTTPError as e:  # it died between the two calls; the next round sees it exited
            raise _StartFailed(f"llama-server stopped answering right after it loaded: {e!r}; its log: {engine.log_path}") from e
        self.n_ctx = int(props.get("default_generation_settings", {}).get("n_ctx") or self.config.ctx)
        self.parallel = int(props.get("total_slots") or self.config.parallel)
        engine.ready_at = time.monotonic()
        self.unavailable = None
        self.ready = True
        log.info("llama-server (pid %d) ready on %s: %d slots of %d tokens", proc.pid, base_url, self.parallel, self.n_ctx)

    def alive(self) -> bool:
        return self._engine is not None and not self._engine.exited.is_set()

    async def stop(self) -> None:
        self._stopping = True
        self.ready = False
        engine = self._engine
        if engine is None:
            return
        await engine.client.aclose()
        if not engine.exited.is_set():
            engine.proc.terminate()
            try:
                await asyncio.wait_for(asyncio.shield(engine.exited.wait()), 10)
            except asyncio.TimeoutError:
                engine.proc.kill()
                await engine.exited.wait()
        if not engine.keep_log:
            with contextlib.suppress(OSError):
                os.unlink(engine.log_path)

    def info(self) -> dict:
        return {**super().info(), "engine": "llama-server", "engine_url": self.base_url, "sample_on_device": self.config.sample_on_device,
                "engine_args": list(self.config.engine_args),
                "engine_log": self._engine.log_path if self._engine else None, "engine_restarts": self.restarts}

    async def _failed(self, engine: _Engine, message: str) -> BackendError:
        """EngineDown when the engine process exited (give it EXIT_GRACE_S to be reaped), else BackendError."""
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.shield(engine.exited.wait()), EXIT_GRACE_S)
        if engine.exited.is_set():
            return EngineDown(f"the inference engine exited (code {engine.proc.returncode}) during this request; "
                              f"it is being restarted, retry shortly")
        return BackendError(message)

    async def generate(self, prompt: list[int], params: SamplingParams) -> AsyncIterator[Generated]:
        import httpx

        body = {
            "prompt": prompt,
            "n_predict": params.max_tokens,
            "stream": True,
            "return_tokens": True,
            "cache_prompt": True,
            # gpt-oss sampling: temperature then top-p, nothing else (llama.cpp adds top-k/min-p by default).
            "samplers": ["temperature", "top_p"],
            "temperature": params.temperature,
            "top_p": params.top_p,
            "seed": -1 if params.seed is None else params.seed,
        }
        if self.config.sample_on_device:
            # llama.cpp's (experimental) backend sampling: the sampler chain runs in the graph on the
            # GPU, instead of one pass over the 201,088 logits per slot on the server's CPU thread.
            body["backend_sampling"] = True
        # llama.cpp's vocabulary marks <|return|> and <|call|> end-of-generation for gpt-oss GGUFs;
        # anything else the caller wants to stop at is left to the caller (it closes the stream).
        # Always streamed, also for non-streaming API requests: closing a stream is what reliably makes
        # llama-server drop the task (a cancelled non-streaming request was seen to keep its slot busy).
        seen = 0
        engine = self._engine
        if not self.ready or engine is None or engine.exited.is_set():
            raise EngineDown(self.unavailable or "the inference engine is not running; retry shortly")
        try:
            resp = await engine.client.send(engine.client.build_request("POST", "/completion", json=body), stream=True)
        except httpx.HTTPError as e:
            raise await self._failed(engine, f"llama-server connection failed: {e!r}") from e
        try:
            if resp.status_code != 200:
                text = (await resp.aread()).decode(errors="replace")
                raise BackendError(f"llama-server answered {resp.status_code}: {text[:500]}")
            # Every event that arrived in one read goes up as one step: when the engine outpaces us, the
            # API parses, encodes and sends them together instead of paying its per-event cost each time.
            async for lines in sse_line_batches(resp.aiter_bytes()):
                step: list[int] = []
                for line in lines:
                    if not line.startswith("data: "):
                        if line.startswith("error:"):
                            raise BackendError(f"llama-server: {line[6:].strip()[:500]}")
                        continue
                    try:
                        chunk = json.loads(line[6:])
                    except json.JSONDecodeError as e:
                        raise BackendError(f"llama-server sent an unreadable event ({e}): {line[:200]!r}") from e
                    if "error" in chunk:
                        raise BackendError(f"llama-server: {chunk['error']}")
                    tokens = [int(t) for t in chunk.get("tokens") or []]
                    n_pred = chunk.get("tokens_predicted")
                    if tokens and isinstance(n_pred, int) and n_pred > seen + len(tokens):
                        tokens = _recover_skipped(chunk.get("content") or "", tokens)
                    seen = n_pred if isinstance(n_pred, int) else seen + len(tokens)
                    step += tokens
                    if chunk.get("stop"):
                        stop_type = chunk.get("stop_type")
                        yield Generated(
                            tokens=step, done=True,
                            reason="length" if stop_type == "limit" or chunk.get("truncated") else "stop",
                            prompt_text=chunk.get("prompt"), n_generated=chunk.get("tokens_predicted"),
                        )
                        return
                if step:
                    yield Generated(tokens=step)
        except httpx.HTTPError as e:
            raise await self._failed(engine, f"llama-server connection failed: {e!r}") from e
        finally:
            # Closing an unfinished response drops the connection: llama-server cancels the task, frees the slot.
            with anyio.CancelScope(shield=True):
                await resp.aclose()
        raise await self._failed(engine, "llama-server closed the stream before its final chunk")


async def sse_line_batches(chunks: AsyncIterator[bytes]) -> AsyncIterator[list[str]]:
    """The complete lines of an event stream that each read brought, split at b"\\n" only.

    httpx's aiter_lines splits like str.splitlines, also at U+2028, U+0085 and friends, which
    llama-server writes raw inside JSON strings (generated text): that tore events in half.
    """
    buf = b""
    async for chunk in chunks:
        buf += chunk
        *lines, buf = buf.split(b"\n")
        if lines:
            yield [line.rstrip(b"\r").decode("utf-8", errors="replace") for line in lines]
    if buf:
        yield [buf.rstrip(b"\r").decode("utf-8", errors="replace")]


async def sse_lines(chunks: AsyncIterator[bytes]) -> AsyncIterator[str]:
    """sse_line_batches, one line at a time."""
    async for lines in sse_line_batches(chunks):
        for line in lines:
            yield line


def _recover_skipped(content: str, tokens: list[int]) -> list[int]:
    """llama-server does not stream the ids of tokens that end inside a UTF-8 character; their text
    arrives with the next chunk. Re-encode that text so the Harmony parser sees the same characters."""
    enc = harmony.encoding()
    last = tokens[-1]
    if last >= harmony.FIRST_SPECIAL_ID:
        special = harmony.special_tokens().get(last, "")
        text = content[: -len(special)] if special and content.endswith(special) else content
        return enc.encode(text, disallowed_special=()) + [last]
    return enc.encode(content, disallowed_special=())
