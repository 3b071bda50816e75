"""llama.cpp backend: llama.cpp's own llama-server (parallel slots, continuous batching) behind our API.

llama-server, built from the pinned vendored source (gptoss.llamacpp), runs as a child process on
127.0.0.1 and a free port. We send it prompt token ids (rendering stays in gptoss.harmony) on its
native ``/completion`` endpoint and read streamed token ids back; closing our stream closes the
HTTP connection, which makes llama-server cancel the task and free the slot.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import subprocess
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import anyio

from gptoss import harmony
from gptoss.serving.backends import Backend, BackendConfig, BackendError, Generated, SamplingParams, ServeError, register_backend

log = logging.getLogger("gptoss.serve.llamacpp")

HEALTH_POLL_S = 0.25
WAIT_REPORT_S = 30.0  # how often a long model load says it is still waiting


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
    return cmd


@register_backend("llamacpp")
class LlamaCppBackend(Backend):
    """A GGUF served by llama-server; all layers on the assigned GPU (``--device cuda:N``) or the CPU."""

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
        self.proc: subprocess.Popen | None = None
        self.port: int | None = None
        self.base_url = ""
        self._client = None
        self._log_file = None
        self._keep_log = False

    async def start(self) -> None:
        import time

        import httpx

        binary = self.binary
        self.port = _free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        env = dict(os.environ)
        if self.config.gpu_index is not None:
            env["CUDA_VISIBLE_DEVICES"] = str(self.config.gpu_index)
        self._log_file = tempfile.NamedTemporaryFile(prefix="llama-server-", suffix=".log", delete=False)
        cmd = server_command(self.config, binary, self.port)
        log.info("starting %s (log: %s)", " ".join(cmd), self._log_file.name)
        self.proc = subprocess.Popen(cmd, env=env, stdout=self._log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     preexec_fn=_die_with_parent)
        # No keep-alive: a pooled connection that llama-server closes as we reuse it fails the request
        # ("Server disconnected without sending a response"); a fresh localhost connection costs ~0.1 ms.
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=0)
        self._client = httpx.AsyncClient(base_url=self.base_url, timeout=httpx.Timeout(None, connect=10.0), limits=limits)
        log.info("waiting for llama-server to load %s (its log: %s)", self.config.model, self._log_file.name)
        started = time.monotonic()
        said = started
        while True:
            if self.proc.poll() is not None:
                self._keep_log = True
                raise ServeError(
                    f"llama-server exited with {self.proc.returncode} while loading {self.config.model} "
                    f"({time.monotonic() - started:.0f}s after it started); its log {self._log_file.name} ends:\n"
                    f"{self._log_tail()}\nCheck that the file is a GGUF written by `gptoss export` and that it fits in "
                    f"memory; the engine's command line was: {' '.join(cmd)}")
            with contextlib.suppress(httpx.HTTPError):
                if (await self._client.get("/health")).status_code == 200:
                    break
            if time.monotonic() - said >= WAIT_REPORT_S:
                said = time.monotonic()
                log.info("still waiting for llama-server to load %s (%.0fs; its log: %s)", self.config.model,
                         said - started, self._log_file.name)
            await asyncio.sleep(HEALTH_POLL_S)  # polling a child process, not synchronising tests
        props = (await self._client.get("/props")).json()
        self.n_ctx = int(props.get("default_generation_settings", {}).get("n_ctx") or self.config.ctx)
        self.parallel = int(props.get("total_slots") or self.config.parallel)
        self.ready = True
        log.info("llama-server ready on %s: %d slots of %d tokens", self.base_url, self.parallel, self.n_ctx)

    def _log_tail(self, n: int = 2000) -> str:
        try:
            return Path(self._log_file.name).read_text(errors="replace")[-n:].strip()
        except (OSError, AttributeError):
            return ""

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    async def stop(self) -> None:
        self.ready = False
        if self._client is not None:
            await self._client.aclose()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                await asyncio.to_thread(self.proc.wait, 10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        if self._log_file is not None:
            self._log_file.close()
            if not self._keep_log:  # kept when the engine failed: the error names it
                with contextlib.suppress(OSError):
                    os.unlink(self._log_file.name)

    def info(self) -> dict:
        return {**super().info(), "engine": "llama-server", "engine_url": self.base_url, "sample_on_device": self.config.sample_on_device,
                "engine_log": self._log_file.name if self._log_file else None}

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
        try:
            resp = await self._client.send(self._client.build_request("POST", "/completion", json=body), stream=True)
        except httpx.HTTPError as e:
            raise BackendError(f"llama-server connection failed: {e!r}") from e
        try:
            if resp.status_code != 200:
                text = (await resp.aread()).decode(errors="replace")
                raise BackendError(f"llama-server answered {resp.status_code}: {text[:500]}")
            async for line in sse_lines(resp.aiter_bytes()):
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
                if chunk.get("stop"):
                    stop_type = chunk.get("stop_type")
                    yield Generated(
                        tokens=tokens, done=True,
                        reason="length" if stop_type == "limit" or chunk.get("truncated") else "stop",
                        prompt_text=chunk.get("prompt"), n_generated=chunk.get("tokens_predicted"),
                    )
                    return
                if tokens:
                    yield Generated(tokens=tokens)
        except httpx.HTTPError as e:
            raise BackendError(f"llama-server connection failed: {e!r}") from e
        finally:
            # Closing an unfinished response drops the connection: llama-server cancels the task, frees the slot.
            with anyio.CancelScope(shield=True):
                await resp.aclose()
        raise BackendError("llama-server closed the stream before its final chunk")


async def sse_lines(chunks: AsyncIterator[bytes]) -> AsyncIterator[str]:
    """Lines of an event stream, split at b"\\n" only.

    httpx's aiter_lines splits like str.splitlines, also at U+2028, U+0085 and friends, which
    llama-server writes raw inside JSON strings (generated text): that tore events in half.
    """
    buf = b""
    async for chunk in chunks:
        buf += chunk
        *lines, buf = buf.split(b"\n")
        for line in lines:
            yield line.rstrip(b"\r").decode("utf-8", errors="replace")
    if buf:
        yield buf.rstrip(b"\r").decode("utf-8", errors="replace")


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
