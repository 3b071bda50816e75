"""Talking to an OpenAI-compatible chat server over HTTP, for both chat clients (terminal and web).

Only HTTP: the official `openai` client for chat completions and models, plain httpx for
``/health`` (gptoss serve's readiness; a server without it counts as ready). What a user needs to
know goes into ChatError subclasses with one-line messages: unreachable, refused key, still loading
(waited for), busy (429: retried after Retry-After), context full. A reply is streamed into a
Reply, which also keeps the timings that /stats and the page's statistics show.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable, Iterator
from typing import Any, Literal

from gptoss.errors import ToolchainError

DEFAULT_URL = "http://127.0.0.1:8000/v1"
REASONING_EFFORTS = ("low", "medium", "high")
RETRY_LIMIT_S = 300  # how long a busy server (429) is retried before giving up
POLL_S = 0.5  # how often a loading server's /health is asked


class ChatError(ToolchainError):
    """A chat could not go on; the message says why and what to do."""


class Unreachable(ChatError):
    pass


class ContextFull(ChatError):
    pass


class Cancelled(ChatError):
    pass


@dataclasses.dataclass
class Settings:
    """What every request carries besides the messages (one set per chat, changed by /settings or the page)."""

    reasoning: Literal["low", "medium", "high"] = "medium"
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = None  # sent only when set (gptoss serve has no top_k; other servers do)
    max_tokens: int | None = None
    system: str | None = None

    def __post_init__(self) -> None:
        problems = self.problems()
        if problems:
            raise ChatError("; ".join(problems))

    def problems(self) -> list[str]:
        out = []
        if self.reasoning not in REASONING_EFFORTS:
            out.append(f"reasoning must be one of {', '.join(REASONING_EFFORTS)}, got {self.reasoning!r}")
        if not _number(self.temperature) or not 0 <= self.temperature <= 2:
            out.append(f"temperature must be a number from 0 to 2, got {self.temperature!r}")
        if not _number(self.top_p) or not 0 < self.top_p <= 1:
            out.append(f"top_p must be a number above 0 and at most 1, got {self.top_p!r}")
        for name in ("top_k", "max_tokens"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                out.append(f"{name} must be a positive integer (or none), got {value!r}")
        if self.system is not None and not isinstance(self.system, str):
            out.append(f"system must be text, got {self.system!r}")
        return out

    def replace(self, **changes: Any) -> "Settings":
        return dataclasses.replace(self, **changes)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclasses.dataclass
class Reply:
    """One streamed assistant turn: its parts as they arrived, and when they arrived."""

    content: str = ""
    reasoning: str = ""
    tool_calls: list[dict] = dataclasses.field(default_factory=list)
    finish_reason: str | None = None
    completion_tokens: int | None = None  # from the server's usage; None when it sent none
    prompt_tokens: int | None = None
    deltas: int = 0  # streamed pieces that carried text or a call (an estimate of tokens without usage)
    server_prompt: str | None = None  # gptoss serve --debug: the prompt text the engine received
    sent: float = 0.0  # time.monotonic() of the request that answered (after any retries)
    first: float | None = None  # first generated piece
    last: float | None = None  # last generated piece

    @property
    def tokens(self) -> int:
        return self.completion_tokens if self.completion_tokens is not None else self.deltas

    @property
    def ttft(self) -> float | None:
        """Seconds from sending the request to the first generated piece (prompt processing included)."""
        return None if self.first is None else self.first - self.sent

    @property
    def rate(self) -> float | None:
        """Tokens per second of generation alone: from the first piece to the last, loading and prompt excluded."""
        if self.first is None or self.last is None or self.last <= self.first or self.tokens < 2:
            return None
        return (self.tokens - 1) / (self.last - self.first)

    def message(self) -> dict:
        """The assistant message as OpenAI's API has it (what /save writes and the next request sends back)."""
        msg: dict[str, Any] = {"role": "assistant", "content": self.content if self.content or not self.tool_calls else None}
        if self.reasoning:
            msg["reasoning_content"] = self.reasoning
        if self.tool_calls:
            msg["tool_calls"] = self.tool_calls
        return msg

    def stats_line(self) -> str:
        parts = [f"{self.tokens} tokens" + ("" if self.completion_tokens is not None else " (counted by pieces)")]
        if self.rate is not None:
            parts.append(f"{self.rate:.1f} tokens/s generation")
        if self.ttft is not None:
            parts.append(f"time to first token {self.ttft:.2f} s")
        if self.first is not None and self.last is not None:
            parts.append(f"generation {self.last - self.first:.2f} s")
        return " · ".join(parts)


# What a stream yields besides text: the caller shows it (a status line, a toast).
Notice = Callable[[str], None]


class Connection:
    """One OpenAI-compatible server: ``url`` ends in /v1 (its /health is beside /v1)."""

    def __init__(self, url: str | None = None, *, api_key: str | None = None, timeout: float = 600.0):
        url = (url or os.environ.get("GPTOSS_URL") or DEFAULT_URL).rstrip("/")
        if not url.startswith(("http://", "https://")):
            raise ChatError(f"--url {url!r}: give an http(s) address such as {DEFAULT_URL}")
        self.url = url
        self.root = url[: -len("/v1")] if url.endswith("/v1") else url
        # $GPTOSS_API_KEY may hold the server's several keys, comma-separated: a client sends the first.
        self._api_key = api_key or (os.environ.get("GPTOSS_API_KEY") or "").split(",")[0].strip() or "unused"
        self.timeout = timeout
        self._client = None
        self._model: str | None = None
        self.health: dict | None = None  # gptoss serve's GET /info once /health said ready (backend, ctx, ...)

    @property
    def client(self):
        if self._client is None:
            import openai

            # Retries are ours (429 and 503 after Retry-After, shown to the user), not the client's.
            self._client = openai.OpenAI(base_url=self.url, api_key=self._api_key, max_retries=0, timeout=self.timeout)
        return self._client

    # ---- readiness -------------------------------------------------------------------------

    def check_health(self) -> tuple[bool, str]:
        """(ready, why not). A server without /health (not gptoss serve) counts as ready."""
        import httpx

        headers = {"Authorization": f"Bearer {self._api_key}"}
        try:
            r = httpx.get(self.root + "/health", timeout=10, headers=headers)
        except httpx.HTTPError as e:
            raise Unreachable(self._unreachable(e)) from e
        if r.status_code == 404:
            return True, ""
        try:
            body = r.json()
        except ValueError:
            body = {}
        if r.status_code == 200:
            self.health = self._info(headers)
            return True, ""
        if r.status_code == 503:
            return False, str(body.get("reason") or "loading") if isinstance(body, dict) else "loading"
        if r.status_code in (401, 403):
            raise ChatError(self._refused(r.status_code))
        return True, ""  # anything else: let the chat request say what is wrong

    def _info(self, headers: dict) -> dict | None:
        """gptoss serve's GET /info (its /health shows only the status); None from another server."""
        import httpx

        try:
            r = httpx.get(self.root + "/info", timeout=10, headers=headers)
            body = r.json() if r.status_code == 200 else None
        except (httpx.HTTPError, ValueError):
            return None
        return body if isinstance(body, dict) else None

    def wait_ready(self, *, timeout: float, notice: Notice | None = None, still_running: Callable[[], None] | None = None) -> None:
        """Wait (showing so) until /health says the model is loaded; ``still_running`` raises if a local server died."""
        start = time.monotonic()
        told = False
        while True:
            if still_running:
                still_running()
            ready, why = self.check_health()
            if ready:
                return
            waited = time.monotonic() - start
            if waited > timeout:
                raise ChatError(f"the server at {self.url} was still not ready after {timeout:.0f} s ({why}); "
                                f"raise --wait or look at the server's log")
            if notice and (not told or int(waited) != int(waited - POLL_S)):
                notice(f"the server at {self.root} is loading the model ({why}), {waited:.0f} s")
                told = True
            time.sleep(POLL_S)  # polling a remote server's readiness, at the pace a person watches

    def model_id(self) -> str:
        """The served model (the first of /v1/models), asked once."""
        if self._model is None:
            try:
                models = self.client.models.list().data
            except Exception as e:
                raise self._error(e) from e
            if not models:
                raise ChatError(f"the server at {self.url} lists no models (GET /v1/models is empty)")
            self._model = models[0].id
        return self._model

    # ---- one turn --------------------------------------------------------------------------

    def stream(self, messages: list[dict], settings: Settings, *, tools: list[dict] | None = None,
               notice: Notice | None = None, retry_for: float = RETRY_LIMIT_S) -> Iterator[tuple[str, Any]]:
        """Send one chat request and yield ("reasoning" | "content", text), ("tool_call", calls so far) as the
        answer streams, then ("done", Reply). 429 and 503 are retried after the server's Retry-After
        (``notice`` says so) for up to ``retry_for`` seconds."""
        body: dict[str, Any] = {
            "model": self.model_id(),
            "messages": ([{"role": "system", "content": settings.system}] if settings.system else []) + messages,
            "stream": True, "stream_options": {"include_usage": True},
            "reasoning_effort": settings.reasoning, "temperature": settings.temperature, "top_p": settings.top_p,
        }
        if settings.max_tokens:
            body["max_tokens"] = settings.max_tokens
        if tools:
            body["tools"] = tools
        extra = {"top_k": settings.top_k} if settings.top_k else None
        deadline = time.monotonic() + retry_for
        while True:
            reply = Reply(sent=time.monotonic())
            try:
                stream = self.client.chat.completions.create(**body, extra_body=extra)
            except Exception as e:
                error = self._error(e)
                wait = self._retry_after(e)
                if wait is None or time.monotonic() + wait > deadline:
                    raise error from e
                if notice:
                    notice(f"{error} - retrying in {wait:.0f} s")
                time.sleep(wait)  # the server asked for this pause (Retry-After)
                continue
            break
        try:
            for chunk in stream:
                extra_fields = chunk.model_extra or {}
                if extra_fields.get("gptoss_debug"):
                    reply.server_prompt = extra_fields["gptoss_debug"].get("prompt")
                if chunk.usage:
                    reply.completion_tokens = chunk.usage.completion_tokens
                    reply.prompt_tokens = chunk.usage.prompt_tokens
                for choice in chunk.choices:
                    delta = choice.delta
                    now = time.monotonic()
                    pieces = []
                    reasoning = getattr(delta, "reasoning_content", None) or (delta.model_extra or {}).get("reasoning")
                    if reasoning:
                        reply.reasoning += reasoning
                        pieces.append(("reasoning", reasoning))
                    if delta.content:
                        reply.content += delta.content
                        pieces.append(("content", delta.content))
                    for call in delta.tool_calls or []:
                        _merge_call(reply.tool_calls, call)
                    if delta.tool_calls:  # the calls so far (copies), for a view to show
                        pieces.append(("tool_call", [dict(c, function=dict(c["function"])) for c in reply.tool_calls]))
                    if pieces:
                        reply.deltas += 1
                        reply.first = reply.first if reply.first is not None else now
                        reply.last = now
                    yield from pieces
                    if choice.finish_reason:
                        reply.finish_reason = choice.finish_reason
        except GeneratorExit:
            stream.close()  # the caller stopped reading (Ctrl-C, Stop): the server cancels the generation
            raise
        except Exception as e:
            stream.close()
            raise self._error(e) from e
        yield "done", reply

    # ---- errors ----------------------------------------------------------------------------

    def _unreachable(self, e: Exception) -> str:
        cause = e
        while cause.__cause__ is not None or cause.__context__ is not None:  # down to the socket's error
            cause = cause.__cause__ or cause.__context__
        why = getattr(cause, "strerror", None) or str(cause) or type(cause).__name__
        return (f"cannot reach the server at {self.url} ({why}); start one (gptoss serve), "
                f"pass --url, or --model PATH to start one for this chat")

    def _refused(self, status: int) -> str:
        return f"the server at {self.url} refused the request ({status}): pass its key with --api-key or GPTOSS_API_KEY"

    def _retry_after(self, e: Exception) -> float | None:
        status = getattr(e, "status_code", None)
        if status not in (429, 503):
            return None
        try:
            return max(0.0, float(e.response.headers.get("retry-after", 1)))
        except (AttributeError, ValueError):
            return 1.0

    def _error(self, e: Exception) -> ChatError:
        """The one line a user sees for a failed request."""
        import openai

        if isinstance(e, ChatError):
            return e
        if isinstance(e, openai.APITimeoutError):
            return ChatError(f"the server at {self.url} did not answer within {self.timeout:.0f} s")
        if isinstance(e, openai.APIConnectionError):
            return Unreachable(self._unreachable(e))
        if isinstance(e, openai.APIStatusError):
            status = e.status_code
            body = e.body if isinstance(e.body, dict) else {}
            error = body.get("error", body) if isinstance(body.get("error", body), dict) else {}
            message = error.get("message") or e.message
            code = error.get("code")
            if status in (401, 403):
                return ChatError(self._refused(status))
            if code == "context_length_exceeded" or (status == 400 and "context" in str(message).lower()):
                return ContextFull(f"the conversation no longer fits the server's context: {message}")
            if status == 429:
                return ChatError(f"the server is busy: {message}")
            if status == 503:
                return ChatError(f"the server is not ready: {message}")
            return ChatError(f"the server answered {status}: {message}")
        if isinstance(e, openai.APIError):  # an error event inside the stream
            return ChatError(f"the server stopped the answer: {e.message}")
        return ChatError(f"the request to {self.url} failed: {type(e).__name__}: {e}")


def _merge_call(calls: list[dict], delta) -> int:
    """Add a streamed tool-call piece to ``calls`` (OpenAI's shape); returns the call's index."""
    index = delta.index if delta.index is not None else len(calls) - 1
    while len(calls) <= index:
        calls.append({"id": "", "type": "function", "function": {"name": "", "arguments": ""}})
    call = calls[index]
    if delta.id:
        call["id"] = delta.id
    if delta.function:
        if delta.function.name:
            call["function"]["name"] += delta.function.name
        if delta.function.arguments:
            call["function"]["arguments"] += delta.function.arguments
    return index


def describe_call(call: dict) -> str:
    """``name({"city": "Paris"})`` for a person to read."""
    args = call["function"].get("arguments") or ""
    try:
        args = json.dumps(json.loads(args), ensure_ascii=False)
    except ValueError:
        pass
    return f"{call['function'].get('name')}({args})"
