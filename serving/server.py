"""`gptoss serve`: flags -> a backend -> the API on uvicorn."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from collections.abc import Callable
from typing import Literal

from gptoss.choices import choice_problem, signature_problems
from gptoss.serving import records
from gptoss.serving.backends import BACKENDS, BackendConfig, ServeError, get_backend

DEVICE = re.compile(r"^(cpu|cuda:\d+)$")
API_KEY_ENV = "GPTOSS_API_KEY"
API_KEY = re.compile(r"^[\x21-\x7e]+$")  # printable ASCII, no space: it travels in a header


def api_keys(flag, environ=None) -> tuple[str, ...]:
    """--api-key (comma-separated; fire hands a list or tuple for "a,b") or else $GPTOSS_API_KEY (comma-separated)."""
    import os

    environ = os.environ if environ is None else environ
    source, value = ("--api-key", flag) if flag is not None else (f"${API_KEY_ENV}", environ.get(API_KEY_ENV))
    if value is None or value == "":
        return ()
    items = list(value) if isinstance(value, (list, tuple)) else [value]
    keys: list[str] = []
    for item in items:
        if not isinstance(item, str):  # fire turned 123 or 1e5 into a number: its text may differ from what was typed
            raise ServeError(f"{source}: {item!r} was read as a {type(item).__name__}; give keys that are not numbers "
                             f"(e.g. sk-...) or pass them in ${API_KEY_ENV}")
        keys += [k.strip() for k in item.split(",") if k.strip()]
    bad = [k for k in keys if not API_KEY.match(k)]
    if bad or not keys:
        raise ServeError(f"{source}: keys are printable ASCII without spaces or commas, separated by commas; got {value!r}")
    return tuple(dict.fromkeys(keys))


CURRENT_DATE_ENV = "GPTOSS_CURRENT_DATE"
ISO_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")


def date_policy(current_date, no_date, environ=None) -> Callable[[], str | None] | None:
    """The ``Current date:`` of every prompt: None (the API's default, the server's clock per request),
    a pinned date (--current-date), or no line (--no-date). Neither flag: $GPTOSS_CURRENT_DATE (a date, or "none")."""
    import datetime
    import os

    environ = os.environ if environ is None else environ
    if isinstance(no_date, str) and no_date.lower() in ("true", "false"):
        no_date = no_date.lower() == "true"  # fire leaves lower-case words as text (compose, .env)
    if not isinstance(no_date, bool):
        raise ServeError(f"--no-date is a switch (true/false), got {no_date!r}")
    if no_date and current_date is not None:
        raise ServeError("--current-date and --no-date contradict each other; give one")
    if no_date:
        return lambda: None
    source, value = ("--current-date", current_date) if current_date is not None else (f"${CURRENT_DATE_ENV}", environ.get(CURRENT_DATE_ENV))
    if value is None or value == "":
        return None
    if source != "--current-date" and str(value).lower() == "none":
        return lambda: None
    try:
        if not isinstance(value, str) or not ISO_DATE.match(value):
            raise ValueError
        datetime.date.fromisoformat(value)
    except ValueError:
        raise ServeError(f"{source} must be a date YYYY-MM-DD (e.g. 2025-08-05), got {value!r}"
                         + ('; "none" leaves the date out' if source != "--current-date" else "; --no-date leaves it out")) from None
    return lambda: value


def timed_protocol(header_timeout: float):
    """uvicorn's h11 protocol, closing a connection whose request headers are not all in ``header_timeout``
    seconds after it opened or after its last response: uvicorn arms its keep-alive timer only after a
    response, and any byte cancels it, so a connection that sends nothing, or headers a byte at a time, stays."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class TimedH11(H11Protocol):
        _header_timer = None

        def _arm(self) -> None:
            self._disarm()
            self._header_timer = self.loop.call_later(header_timeout, self._expire)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _expire(self) -> None:
            if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
                self.logger.debug("closing a connection that sent no complete request headers in %s s", header_timeout)
                self.transport.close()

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.conn.their_state is not h11.IDLE:  # the headers are in
                self._disarm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
                self._arm()

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

    return TimedH11


def gpu_problem(device: str) -> str | None:
    """Why ``cuda:N`` cannot be used here (no NVIDIA GPU visible, or fewer than N+1), else None."""
    import shutil
    import subprocess

    index = int(device.split(":", 1)[1])
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return f"--device {device}: no NVIDIA GPU is visible here (nvidia-smi not found); use --device cpu or give the container a GPU"
    listed = subprocess.run([smi, "-L"], capture_output=True, text=True)
    count = sum(1 for line in listed.stdout.splitlines() if line.startswith("GPU "))
    if index >= count:
        return f"--device {device}: GPU {index} does not exist here ({count} visible); pick one of cuda:0..cuda:{max(count - 1, 0)}"
    return None


def resolve_config(*, backend: str, model: str, adapter: str | None, quant: str | None, device: str, ctx: int,
                   parallel: int, threads: int | None, dtype: str, sample_on_device: bool = False,
                   engine_restarts: int = 3, engine_backoff: float = 1.0, engine_args: str | None = None) -> BackendConfig:
    """Check every flag and report all problems at once; find the model through the stage records."""
    problems: list[str] = []
    if wrong := choice_problem("--backend", backend, sorted(BACKENDS)):
        problems.append(wrong)
    if not isinstance(device, str) or not DEVICE.match(device):
        problems.append(f"--device must be 'cpu' or 'cuda:N', got {device!r}")
    elif device.startswith("cuda:") and (why := gpu_problem(device)):
        problems.append(why)
    for flag, value, low in (("--ctx", ctx, 16), ("--parallel", parallel, 1)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            problems.append(f"{flag} must be an integer >= {low}, got {value!r}")
    if threads is not None and (not isinstance(threads, int) or isinstance(threads, bool) or threads < 1):
        problems.append(f"--threads must be a positive integer, got {threads!r}")
    if not isinstance(engine_restarts, int) or isinstance(engine_restarts, bool) or engine_restarts < 0:
        problems.append(f"--engine-restarts must be an integer >= 0, got {engine_restarts!r}")
    if not isinstance(engine_backoff, (int, float)) or isinstance(engine_backoff, bool) or not 0 <= engine_backoff <= 3600:
        problems.append(f"--engine-backoff must be seconds between 0 and 3600, got {engine_backoff!r}")
    if isinstance(sample_on_device, str) and sample_on_device.lower() in ("true", "false"):
        sample_on_device = sample_on_device.lower() == "true"  # fire leaves lower-case words as text (compose, .env)
    if not isinstance(sample_on_device, bool):
        problems.append(f"--sample-on-device is a switch (true/false), got {sample_on_device!r}")
    elif sample_on_device and backend != "llamacpp":
        problems.append("--sample-on-device is for the llamacpp backend")
    extra_args = engine_args_problems(backend, engine_args, problems)
    problems += signature_problems(serve, {"dtype": dtype})
    if adapter is not None and not (Path(str(adapter)).expanduser() / "adapter_config.json").is_file():
        problems.append(f"--adapter {adapter}: no adapter_config.json there; pass the adapter folder of a training run")
    adapter = str(Path(str(adapter)).expanduser().absolute()) if adapter else None
    resolved = None
    if backend == "llamacpp":
        if adapter:
            problems.append("--adapter is for the transformers backend; merge and export a GGUF for llamacpp (gptoss merge, gptoss export)")
        model_path = Path(str(model)).expanduser().absolute()
        if not model_path.exists():
            problems.append(f"--model {model} does not exist (give a .gguf file or an export folder)")
        else:
            resolved = records.resolve_gguf(model_path, quant, problems)
    elif backend == "transformers":
        if quant:
            problems.append("--quant picks a GGUF for the llamacpp backend; the transformers backend serves 16-bit checkpoints")
        resolved = records.resolve_checkpoint(str(model), adapter, problems)
    if problems:
        raise ServeError("; ".join(problems))
    return BackendConfig(model=resolved.model, adapter=resolved.adapter, revision=resolved.revision, source=resolved.source,
                         device=device, ctx=ctx, parallel=parallel, threads=threads, dtype=dtype,
                         sample_on_device=sample_on_device, engine_restarts=engine_restarts, engine_backoff=float(engine_backoff),
                         engine_args=extra_args)


# Flags the llamacpp backend sets itself: where it listens and what it loads are not the user's to move.
OWN_ENGINE_FLAGS = ("--model", "-m", "--host", "--port", "--parallel", "-np", "--ctx-size", "-c", "--n-gpu-layers", "-ngl")


def engine_args_problems(backend: str, engine_args: str | None, problems: list[str]) -> tuple[str, ...]:
    """--engine-args split like a shell line; a problem for each flag the backend owns."""
    import shlex

    if engine_args is None or engine_args == "":
        return ()
    if backend != "llamacpp":
        problems.append("--engine-args passes flags to llama-server: it is for the llamacpp backend")
        return ()
    try:
        args = tuple(shlex.split(str(engine_args)))
    except ValueError as e:
        problems.append(f"--engine-args {engine_args!r}: {e} (quote it as one shell word list)")
        return ()
    owned = [a for a in args if a.split("=", 1)[0] in OWN_ENGINE_FLAGS]
    if owned:
        problems.append(f"--engine-args {' '.join(owned)}: set by gptoss serve itself; use --model, --ctx, --parallel, --device "
                        f"(--host/--port are the API's)")
    return args


def serve(
    *,
    backend: Literal["llamacpp", "transformers"] = "llamacpp",
    model: str,
    adapter: str | None = None,
    quant: str | None = None,
    device: str = "cpu",
    host: str = "127.0.0.1",
    port: int = 8000,
    ctx: int = 4096,
    parallel: int = 4,
    queue: int | None = None,
    threads: int | None = None,
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto",
    sample_on_device: bool = False,
    engine_restarts: int = 3,
    engine_backoff: float = 1.0,
    engine_args: str | None = None,
    model_name: str | None = None,
    api_key: str | None = None,
    metrics_public: bool = False,
    max_body_bytes: int = 4 * 1024 * 1024,
    timeout_keep_alive: int = 5,
    timeout_headers: float = 10.0,
    current_date: str | None = None,
    no_date: bool = False,
    debug: bool = False,
    log_level: str = "info",
) -> None:
    """Serve a model behind an OpenAI-compatible API (/v1/chat/completions, /v1/responses, /v1/models, /health).

    Args:
        backend: "llamacpp" (a GGUF on llama.cpp's llama-server) or "transformers" (a merged checkpoint, or base + --adapter).
        model: llamacpp: a .gguf file or an export folder (exports/<run>, with --quant); transformers: a checkpoint folder, exports/<run> (its merged model), models/<run> (base + adapter) or a Hub id.
        adapter: a PEFT LoRA adapter directory applied on top of --model (transformers only).
        quant: which GGUF of an export folder's manifest.json to serve, e.g. q4_k_m (llamacpp only).
        device: "cpu" or "cuda:N"; with cuda all layers go to GPU N.
        host: address to listen on (0.0.0.0 in containers).
        port: port to listen on.
        ctx: context per request in tokens (prompt + completion); longer prompts get a 400.
        parallel: requests generating at once (llama.cpp slots; transformers: one continuous batch, threads where it cannot run).
        queue: admitted requests that may wait for a slot (default 2 x parallel); beyond that 429 + Retry-After.
        threads: CPU threads for the engine (default: the engine's choice).
        dtype: transformers weights dtype: auto (bfloat16 on CUDA, float32 on CPU), bfloat16, float16, float32.
        sample_on_device: llamacpp: sample inside the compute graph on the GPU (llama.cpp's experimental backend sampling) instead of on the server's CPU thread, slot by slot.
        engine_restarts: llamacpp: how many times in a row llama-server may fail (exit while loading, or die within a minute of starting) and be restarted before the server exits non-zero, leaving it to a restart policy.
        engine_backoff: llamacpp: seconds before restarting a dead llama-server, doubled after each failure in a row (at most 60).
        engine_args: llamacpp: more llama-server flags, appended to the ones gptoss serve sets (later ones win), e.g. --engine-args="--flash-attn on --ubatch-size 1024" (with "=": the value starts with --).
        model_name: the model id clients pass (default: the model file or folder name).
        api_key: keys clients must send as `Authorization: Bearer KEY`, comma-separated (default: $GPTOSS_API_KEY, comma-separated; neither: no authentication). /health stays open.
        metrics_public: serve /metrics without a key (for a Prometheus scraper on a trusted network).
        max_body_bytes: request bodies larger than this get a 413 (default 4 MiB; a full 128k-token context is about 0.5 MB of text).
        timeout_keep_alive: seconds an idle keep-alive connection stays open after a response (uvicorn's).
        timeout_headers: seconds a connection gets to send a request's headers, from its start or its last response; then it is closed.
        current_date: pin the system message's `Current date: YYYY-MM-DD` (default: the server's date at each request, as OpenAI's template, vLLM and Ollama; or $GPTOSS_CURRENT_DATE: a date, or none).
        no_date: leave `Current date:` out of the prompt (reproducible prompts, e.g. for a model fine-tuned without it).
        debug: add gptoss_debug.prompt (the prompt text the engine received) to responses.
        log_level: uvicorn log level.
    """
    import uvicorn

    from gptoss.serving.api import create_app

    config = resolve_config(backend=backend, model=model, adapter=adapter, quant=quant, device=device, ctx=ctx,
                            parallel=parallel, threads=threads, dtype=dtype, sample_on_device=sample_on_device,
                            engine_restarts=engine_restarts, engine_backoff=engine_backoff, engine_args=engine_args)
    if queue is not None and (not isinstance(queue, int) or isinstance(queue, bool) or queue < 0):
        raise ServeError(f"--queue must be a non-negative integer, got {queue!r}")
    if not isinstance(port, int) or not 0 <= port <= 65535:
        raise ServeError(f"--port must be 0..65535, got {port!r}")
    keys = api_keys(api_key)
    if not isinstance(max_body_bytes, int) or isinstance(max_body_bytes, bool) or max_body_bytes < 1024:
        raise ServeError(f"--max-body-bytes must be an integer >= 1024, got {max_body_bytes!r}")
    if not isinstance(timeout_keep_alive, int) or isinstance(timeout_keep_alive, bool) or timeout_keep_alive < 1:
        raise ServeError(f"--timeout-keep-alive must be whole seconds >= 1, got {timeout_keep_alive!r}")
    if not isinstance(timeout_headers, (int, float)) or isinstance(timeout_headers, bool) or not 0 < timeout_headers <= 3600:
        raise ServeError(f"--timeout-headers must be seconds in (0, 3600], got {timeout_headers!r}")
    dates = date_policy(current_date, no_date)
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per engine request is noise
    engine = get_backend(backend)(config)
    failure: list[BaseException] = []
    server: uvicorn.Server | None = None

    def on_fatal(e: BaseException) -> None:
        failure.append(e)
        if server is not None:
            server.should_exit = True

    app = create_app(engine, model_id=model_name, queue=queue, debug=debug, on_fatal=on_fatal, api_keys=keys,
                     metrics_public=bool(metrics_public), current_date=dates, max_body_bytes=max_body_bytes)
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5,
                                           timeout_keep_alive=timeout_keep_alive, http=timed_protocol(float(timeout_headers))))
    server.run()
    if failure:
        e = failure[0]
        raise e if isinstance(e, ServeError) else ServeError(f"the {backend} backend failed to start: {e}")
