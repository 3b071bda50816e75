"""POST /v1/responses: OpenAI's Responses API on the chat completions engine path.

Input (a string, or input items: messages, ``reasoning`` items returned earlier, ``function_call``
and ``function_call_output`` items) becomes chat messages that gptoss.harmony renders; generation
runs through the app's ``start_generation`` (model and readiness checks, the prompt, the context
check, admission, metrics) like /v1/chat/completions; the deltas of serving.chat's Harmony parser
become output items (``reasoning``, ``message`` with ``output_text``, ``function_call``) and, with
``stream``, the Responses API's server-sent events. Nothing is stored: ``previous_response_id`` and
``item_reference`` are refused (send the items back instead, as a stateless client does).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from gptoss.serving.api import (RETRY_AFTER_LOADING_S, APIError, ChatRequest, GenerationResponse, GenerationStream,
                                _validation_message, json_object, log)
from gptoss.serving.backends import BackendError, EngineDown

router = APIRouter()

TEXT_PARTS = ("input_text", "output_text", "text")


class Reasoning(BaseModel):
    model_config = ConfigDict(extra="ignore")

    effort: Literal["low", "medium", "high"] | None = None
    summary: str | None = None  # accepted; the analysis comes back whole as reasoning_text, never summarised


class ResponsesRequest(BaseModel):
    """The fields of OpenAI's ``responses.create`` this server honours; unknown ones are ignored."""

    model_config = ConfigDict(extra="ignore")

    model: str
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    reasoning: Reasoning | None = None
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    parallel_tool_calls: bool | None = None
    previous_response_id: str | None = None
    text: dict[str, Any] | None = None
    metadata: dict[str, str] | None = None
    stream: bool = False


def _bad(message: str, param: str) -> APIError:
    return APIError(400, message, param=param, code="invalid_value")


def _text(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise _bad(f"{where}.content must be a string or a list of input_text parts", f"{where}.content")
    parts = []
    for j, part in enumerate(content):
        if not isinstance(part, dict) or part.get("type") not in TEXT_PARTS or not isinstance(part.get("text"), str):
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise _bad(f"{where}.content[{j}]: only text parts ({', '.join(TEXT_PARTS[:2])}) are supported, got {kind!r}",
                       f"{where}.content")
        parts.append(part["text"])
    return "".join(parts)


def _reasoning_text(item: dict, where: str) -> str:
    """A reasoning item's analysis: its reasoning_text content (what this server returns), else its summary."""
    for key, kind in (("content", "reasoning_text"), ("summary", "summary_text")):
        parts = item.get(key) or []
        if not isinstance(parts, list) or not all(isinstance(p, dict) and isinstance(p.get("text"), str) for p in parts):
            raise _bad(f"{where}.{key} must be a list of {{type: {kind}, text}} parts", f"{where}.{key}")
        if parts:
            return "".join(p["text"] for p in parts)
    return ""  # encrypted_content only: this server cannot read it


def chat_messages(input: str | list[dict[str, Any]], instructions: str | None) -> list[dict[str, Any]]:
    """Responses input -> chat messages for gptoss.harmony: a reasoning item is the analysis of the
    assistant turn that follows it (a message or function calls); function_call items are that turn's
    tool_calls, function_call_output items its tool results."""
    messages: list[dict[str, Any]] = [{"role": "system", "content": instructions}] if instructions else []
    if isinstance(input, str):
        return messages + [{"role": "user", "content": input}]
    pending: list[str] = []  # analysis waiting for the assistant output it belongs to
    calls: set[str] = set()

    def assistant(**fields) -> dict:
        msg = {"role": "assistant", **fields}
        if pending:
            msg["reasoning_content"] = "\n".join(pending)
            pending.clear()
        messages.append(msg)
        return msg

    for i, item in enumerate(input):
        where = f"input[{i}]"
        if not isinstance(item, dict):
            raise _bad(f"{where}: expected an input item object, got {type(item).__name__}", where)
        kind = item.get("type", "message" if "role" in item else None)
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "system", "developer", "assistant"):
                raise _bad(f"{where}.role must be one of user, system, developer, assistant; got {role!r}", f"{where}.role")
            text = _text(item.get("content"), where)
            if role == "assistant":
                assistant(content=text)
                continue
            if pending:
                assistant()
            messages.append({"role": role, "content": text})
        elif kind == "reasoning":
            text = _reasoning_text(item, where)
            if text:
                pending.append(text)
        elif kind == "function_call":
            call_id, name, arguments = item.get("call_id"), item.get("name"), item.get("arguments", "{}")
            if not isinstance(call_id, str) or not call_id or not isinstance(name, str) or not name:
                raise _bad(f"{where}: a function_call needs a string call_id and name", where)
            if not isinstance(arguments, str):
                raise _bad(f"{where}.arguments must be a JSON string, got {type(arguments).__name__}", f"{where}.arguments")
            call = {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}
            last = messages[-1] if messages else None
            if not pending and last is not None and last["role"] == "assistant" and last.get("tool_calls") and not last.get("content"):
                last["tool_calls"].append(call)
            else:
                assistant(tool_calls=[call])
            calls.add(call_id)
        elif kind == "function_call_output":
            call_id = item.get("call_id")
            if call_id not in calls:
                raise _bad(f"{where}: function_call_output call_id {call_id!r} answers no function_call item before it; "
                           "send the function_call item back too", f"{where}.call_id")
            if pending:
                assistant()
            output = item.get("output")
            messages.append({"role": "tool", "tool_call_id": call_id, "content": _text(output, where) if output is not None else ""})
        elif kind == "item_reference":
            raise _bad(f"{where}: item_reference needs stored responses, which this server does not keep; "
                       "send the items themselves", where)
        else:
            raise _bad(f"{where}.type {kind!r} is not supported; use message, reasoning, function_call or function_call_output",
                       f"{where}.type")
    if pending:
        assistant()
    if not messages:
        raise _bad("input is empty; give a string or at least one input item", "input")
    return messages


def chat_tools(tools: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
    out = []
    for i, tool in enumerate(tools or []):
        if not isinstance(tool, dict) or tool.get("type") != "function":
            kind = tool.get("type") if isinstance(tool, dict) else type(tool).__name__
            raise _bad(f"tools[{i}]: only function tools are supported, got {kind!r}", f"tools[{i}].type")
        out.append({"type": "function", "function": {k: tool[k] for k in ("name", "description", "parameters") if k in tool}})
    return out or None


def chat_request(req: ResponsesRequest) -> ChatRequest:
    if req.previous_response_id:
        raise _bad("previous_response_id needs stored responses, which this server does not keep; "
                   "send the earlier output items back in input", "previous_response_id")
    fmt = (req.text or {}).get("format") or {}
    if isinstance(fmt, dict) and fmt.get("type", "text") != "text":
        raise _bad(f"text.format {fmt.get('type')!r} is not supported; only plain text", "text.format")
    if isinstance(req.tool_choice, dict) or req.tool_choice not in (None, "auto", "none"):
        raise _bad("tool_choice: only 'auto' and 'none' are supported; the model decides whether to call a tool", "tool_choice")
    fields = {"model": req.model, "messages": chat_messages(req.input, req.instructions), "tools": chat_tools(req.tools),
              "tool_choice": req.tool_choice, "reasoning_effort": req.reasoning.effort if req.reasoning else None,
              "max_completion_tokens": req.max_output_tokens, "stream": req.stream}
    fields.update({k: v for k, v in (("temperature", req.temperature), ("top_p", req.top_p)) if v is not None})
    try:
        return ChatRequest.model_validate(fields)
    except ValidationError as e:
        message, param = _validation_message(e)
        raise _bad(f"input (as chat messages): {message}", param or "input")


# ---------------------------------------------------------------------------------------------
# Output items, built from serving.chat's deltas in the order the model wrote them


def _new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


class OutputItems:
    """Feed chat deltas; get Responses stream events (without sequence numbers) and, at the end, the items."""

    def __init__(self):
        self.items: list[dict[str, Any]] = []
        self._open: dict[str, Any] | None = None

    def _close(self, status: str = "completed") -> list[dict]:
        item, self._open = self._open, None
        if item is None:
            return []
        item["status"] = status
        at = {"item_id": item["id"], "output_index": self.items.index(item)}
        if item["type"] == "reasoning":
            part = item["content"][0]
            events = [{"type": "response.reasoning_text.done", **at, "content_index": 0, "text": part["text"]},
                      {"type": "response.content_part.done", **at, "content_index": 0, "part": part}]
        elif item["type"] == "message":
            part = item["content"][0]
            events = [{"type": "response.output_text.done", **at, "content_index": 0, "text": part["text"], "logprobs": []},
                      {"type": "response.content_part.done", **at, "content_index": 0, "part": part}]
        else:
            events = [{"type": "response.function_call_arguments.done", **at, "arguments": item["arguments"]}]
        return events + [{"type": "response.output_item.done", "output_index": at["output_index"], "item": item}]

    def _start(self, item: dict[str, Any], part: dict[str, Any] | None) -> list[dict]:
        events = self._close()
        self.items.append(item)
        self._open = item
        index = len(self.items) - 1
        events.append({"type": "response.output_item.added", "output_index": index, "item": {**item, "content": []} if part else dict(item)})
        if part is not None:
            item["content"] = [part]
            events.append({"type": "response.content_part.added", "item_id": item["id"], "output_index": index,
                           "content_index": 0, "part": dict(part)})
        return events

    def feed(self, delta: dict[str, Any]) -> list[dict]:
        events: list[dict] = []
        open_type = self._open["type"] if self._open else None
        if "reasoning_content" in delta:
            if open_type != "reasoning":
                events += self._start({"id": _new_id("rs"), "type": "reasoning", "summary": [], "status": "in_progress"},
                                      {"type": "reasoning_text", "text": ""})
            self._open["content"][0]["text"] += delta["reasoning_content"]
            events.append({"type": "response.reasoning_text.delta", "item_id": self._open["id"], "output_index": len(self.items) - 1,
                           "content_index": 0, "delta": delta["reasoning_content"]})
        elif "content" in delta:
            if not delta["content"]:
                return events
            if open_type != "message":
                events += self._start({"id": _new_id("msg"), "type": "message", "role": "assistant", "status": "in_progress"},
                                      {"type": "output_text", "text": "", "annotations": [], "logprobs": []})
            self._open["content"][0]["text"] += delta["content"]
            events.append({"type": "response.output_text.delta", "item_id": self._open["id"], "output_index": len(self.items) - 1,
                           "content_index": 0, "delta": delta["content"], "logprobs": []})
        elif "tool_calls" in delta:
            for call in delta["tool_calls"]:
                fn = call.get("function") or {}
                if "id" in call:
                    events += self._start({"id": _new_id("fc"), "type": "function_call", "call_id": call["id"],
                                           "name": fn.get("name", ""), "arguments": "", "status": "in_progress"}, None)
                text = fn.get("arguments") or ""
                if text and self._open is not None and self._open["type"] == "function_call":
                    self._open["arguments"] += text
                    events.append({"type": "response.function_call_arguments.delta", "item_id": self._open["id"],
                                   "output_index": len(self.items) - 1, "delta": text})
        return events

    def finish(self, status: str) -> list[dict]:
        return self._close("incomplete" if status == "incomplete" else "completed")


def _usage(n_prompt: int, n_completion: int, n_reasoning: int) -> dict:
    return {"input_tokens": n_prompt, "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
            "output_tokens": n_completion, "output_tokens_details": {"reasoning_tokens": min(n_reasoning, n_completion)},
            "total_tokens": n_prompt + n_completion}


def _sse(event: dict) -> str:
    return f"event: {event['type']}\ndata: {json.dumps(event)}\n\n"


@router.post("/v1/responses")
async def create_response(request: Request):
    payload = await json_object(request)
    try:
        req = ResponsesRequest.model_validate(payload)
    except ValidationError as e:
        message, param = _validation_message(e)
        raise APIError(400, message, param=param, code="invalid_value")
    chat = chat_request(req)
    started = await request.app.state.start_generation(chat)
    run = started.run
    response_id, created_at = _new_id("resp"), int(time.time())
    served_id = chat.model
    effort = chat.reasoning_effort or "medium"

    def response(status: str, output: list, usage: dict | None, *, error: dict | None = None) -> dict:
        return {"id": response_id, "object": "response", "created_at": created_at, "status": status, "model": served_id,
                "output": output, "error": error,
                "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
                "instructions": req.instructions, "max_output_tokens": req.max_output_tokens, "metadata": req.metadata or {},
                "parallel_tool_calls": req.parallel_tool_calls if req.parallel_tool_calls is not None else True,
                "previous_response_id": None, "reasoning": {"effort": effort, "summary": None},
                "temperature": chat.temperature, "top_p": chat.top_p, "tool_choice": req.tool_choice or "auto",
                "tools": [dict(t, strict=t.get("strict", False)) for t in req.tools or []],
                "text": {"format": {"type": "text"}}, "truncation": "disabled", "store": False, "usage": usage,
                **started.debug_field()}

    def final_status() -> str:
        return "incomplete" if run.finish_reason == "length" else "completed"

    def usage() -> dict:
        return _usage(started.n_prompt, run.n_completion, run.output.n_reasoning_tokens)

    if not req.stream:
        async def produce() -> Response:
            items = OutputItems()
            try:
                async for delta in run.deltas():
                    items.feed(delta)
            except EngineDown as e:
                return APIError(503, str(e), type="server_error", code="engine_down", retry_after=RETRY_AFTER_LOADING_S).response()
            except BackendError as e:
                log.error("generation failed: %s", e)
                return APIError(500, f"generation failed: {e}", type="server_error", code="engine_error").response()
            status = final_status()
            items.finish(status)
            return JSONResponse(response(status, items.items, usage()))

        return GenerationResponse(produce, started.ticket, started.on_cancel)

    async def events() -> AsyncIterator[str]:
        seq = 0

        def emit(event: dict) -> str:
            nonlocal seq
            seq += 1
            return _sse({**event, "sequence_number": seq - 1})

        items = OutputItems()
        yield emit({"type": "response.created", "response": response("in_progress", [], None)})
        yield emit({"type": "response.in_progress", "response": response("in_progress", [], None)})
        try:
            async for step in run.steps():  # one write per engine step
                yield "".join(emit(event) for delta in step for event in items.feed(delta))
        except BackendError as e:
            log.error("generation failed mid-stream: %s", e)
            code = "engine_down" if isinstance(e, EngineDown) else "engine_error"
            for event in items.finish("incomplete"):
                yield emit(event)
            yield emit({"type": "response.failed", "response": response("failed", items.items, usage(),
                                                                        error={"code": code, "message": f"generation failed: {e}"})})
            return
        status = final_status()
        for event in items.finish(status):
            yield emit(event)
        yield emit({"type": f"response.{status}", "response": response(status, items.items, usage())})

    return GenerationStream(events, started.ticket, started.on_cancel)

