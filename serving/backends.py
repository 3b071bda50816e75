"""Serving backends: the one registry, and what every backend provides.

A backend turns prompt token ids (rendered by gptoss.harmony) into generated token ids; it knows
nothing about Harmony or the OpenAI API. ``serving.api`` sits in front of every backend.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Callable
from typing import Any

from gptoss.errors import ToolchainError


class ServeError(ToolchainError):
    """Bad `gptoss serve` flags or a model that cannot be served; the message says which flag and what to do."""


class BackendError(Exception):
    """The engine failed while generating (not the client's fault)."""


class EngineDown(BackendError):
    """The engine process is gone (and being restarted): the API answers 503 + Retry-After."""


@dataclasses.dataclass(frozen=True)
class BackendConfig:
    """What `gptoss serve` resolved for a backend."""

    model: str
    adapter: str | None = None
    revision: str | None = None  # Hub revision of a base model given by id
    source: str = ""  # how --model was resolved (records), for /health
    device: str = "cpu"  # "cpu" or "cuda:N"
    ctx: int = 4096  # tokens per request (prompt + completion)
    parallel: int = 4  # requests generating at once
    threads: int | None = None  # CPU threads for the engine (None: the engine's default)
    sample_on_device: bool = False  # llamacpp: sample in the compute graph (llama.cpp's backend sampling)
    dtype: str = "auto"
    engine_restarts: int = 3  # llamacpp: failed (re)starts in a row tolerated before the process gives up
    engine_backoff: float = 1.0  # llamacpp: seconds before the first restart, doubled after each failure
    engine_args: tuple[str, ...] = ()  # llamacpp: more llama-server flags, after ours (later flags win)

    @property
    def gpu_index(self) -> int | None:
        return int(self.device.split(":", 1)[1]) if self.device.startswith("cuda:") else None


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0  # gpt-oss recommendation; 0 means greedy
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()


@dataclasses.dataclass
class Generated:
    """One step of a generation: new token ids; the last one has ``done`` and the engine's view."""

    tokens: list[int]
    done: bool = False
    reason: str | None = None  # with done: "stop" (a stop token) or "length" (max_tokens or context)
    prompt_text: str | None = None  # with done: the prompt as the engine saw it (debug)
    n_generated: int | None = None  # with done: tokens the engine generated, when it counts them itself


class Backend:
    """Base class. Subclasses register with ``@register_backend(name)``."""

    name = "?"

    def __init__(self, config: BackendConfig):
        self.config = config
        self.ready = False
        self.n_ctx = config.ctx
        self.parallel = config.parallel
        self.unavailable: str | None = None  # why the engine is down while it restarts (for 503s)

    @property
    def model_id(self) -> str:
        from pathlib import Path

        name = Path(self.config.adapter or self.config.model)
        if name.name == "adapter":  # models/<run>/adapter: the run's name says more
            name = name.parent
        return name.name

    async def start(self) -> None:
        """Load the model (or launch the engine) and set ``ready``; may take minutes."""
        raise NotImplementedError

    async def stop(self) -> None:
        self.ready = False

    def alive(self) -> bool:
        """False once the engine died; /health turns 503."""
        return True

    async def supervise(self) -> None:
        """After ``start``: keep the engine up; raises ServeError when it cannot be (the process then exits).

        Returns at once for a backend without a child engine (nothing to restart)."""

    def generate(self, prompt: list[int], params: SamplingParams) -> AsyncIterator[Generated]:
        """Stream generated tokens. Closing the iterator early (client gone) must cancel the work."""
        raise NotImplementedError

    def info(self) -> dict[str, Any]:
        return {"backend": self.name, "model": self.config.model, "revision": self.config.revision,
                "adapter": self.config.adapter, "source": self.config.source,
                "device": self.config.device, "ctx": self.n_ctx, "parallel": self.parallel}


BACKENDS: dict[str, type[Backend]] = {}


def register_backend(name: str) -> Callable[[type[Backend]], type[Backend]]:
    def wrap(cls: type[Backend]) -> type[Backend]:
        cls.name = name
        BACKENDS[name] = cls
        return cls

    return wrap


def get_backend(name: str) -> type[Backend]:
    if name not in BACKENDS:
        raise ServeError(f"--backend {name!r} is not a serving backend; known: {', '.join(sorted(BACKENDS))}")
    return BACKENDS[name]


# The backends register themselves on import (neither imports torch at module level).
from gptoss.serving import llamacpp_backend as _llamacpp  # noqa: E402,F401
from gptoss.serving import transformers_backend as _transformers  # noqa: E402,F401
