"""POST /v1/responses and the `reasoning` field, with the official `openai` client on both backends
(the trained tiny Harmony fixture of tests/serve_support.py, servers from tests/test_serve.py), and
the input-item / output-item mapping through the Harmony core without a server."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
from fastapi.testclient import TestClient
from openai.types.responses import (Response, ResponseFunctionToolCall, ResponseOutputMessage, ResponseReasoningItem,
                                    ResponseStreamEvent)
from pydantic import TypeAdapter

from gptoss import harmony
from gptoss.serving import responses
from gptoss.serving.api import APIError, create_app
from gptoss.serving.backends import Backend, BackendConfig
from gptoss.serving.chat import ChatOutput

import serve_support as sup
from test_serve import MODEL, client, llamacpp_server, server, transformers_server  # noqa: F401  (fixtures)

TOOL = {"type": "function", **sup.WEATHER_TOOL["function"]}  # the Responses API's flat function tool
EVENTS = TypeAdapter(ResponseStreamEvent)


def completion_tokens(messages, answer, tools=None) -> list[int]:
    full = harmony.render_training(messages + [answer], tools=tools)
    return full[len(harmony.render_prompt(messages, tools=tools)):]


def no_control_text(text: str) -> bool:
    return not any(token in text for token in harmony.CONTROL_TOKENS)


# ------------------------------------------------------------------------------------------------
# Without a server: input items -> the Harmony prompt, generated tokens -> output items


def test_input_items_render_as_the_chat_conversation():
    items = [
        {"role": "user", "content": "Weather in Paris and Rome?"},
        {"type": "reasoning", "id": "rs_1", "summary": [], "content": [{"type": "reasoning_text", "text": "Two cities."}]},
        {"type": "function_call", "call_id": "a", "name": "get_weather", "arguments": '{"city": "Paris"}'},
        {"type": "function_call", "call_id": "b", "name": "get_weather", "arguments": '{"city": "Rome"}'},
        {"type": "function_call_output", "call_id": "a", "output": "sunny"},
        {"type": "function_call_output", "call_id": "b", "output": [{"type": "input_text", "text": "rain"}]},
    ]
    chat = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris and Rome?"},
        {"role": "assistant", "reasoning_content": "Two cities.", "tool_calls": [
            {"id": "a", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
            {"id": "b", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}}]},
        {"role": "tool", "tool_call_id": "a", "content": "sunny"},
        {"role": "tool", "tool_call_id": "b", "content": "rain"},
    ]
    tools = responses.chat_tools([TOOL])
    ours = harmony.render_prompt(responses.chat_messages(items, "Be brief."), tools=tools)
    assert ours == harmony.render_prompt(chat, tools=[sup.WEATHER_TOOL])
    text = harmony.encoding().decode_utf8(ours)
    assert "<|channel|>analysis<|message|>Two cities.<|end|>" in text  # the current turn's reasoning is kept
    assert "functions.get_weather to=assistant<|channel|>commentary<|message|>rain" in text
    assert responses.chat_messages("Hi", None) == [{"role": "user", "content": "Hi"}]


@pytest.mark.parametrize("items, match", [
    ([{"type": "item_reference", "id": "msg_1"}], r"input\[0\]: item_reference needs stored responses"),
    ([{"type": "function_call_output", "call_id": "x", "output": "1"}], r"input\[0\]: function_call_output call_id 'x' answers no function_call"),
    ([{"role": "user", "content": [{"type": "input_image", "image_url": "http://x"}]}], r"input\[0\]\.content\[0\]: only text parts"),
    ([{"type": "web_search_call", "id": "ws"}], r"input\[0\]\.type 'web_search_call' is not supported"),
    ([{"role": "tool", "content": "x"}], r"input\[0\]\.role must be one of user, system, developer, assistant"),
    ([], r"input is empty"),
])
def test_unsupported_input_items_are_named(items, match):
    with pytest.raises(APIError, match=match) as e:
        responses.chat_messages(items, None)
    assert e.value.status == 400


def _items_from(tokens) -> tuple[responses.OutputItems, list[dict]]:
    out, items, events = ChatOutput(), responses.OutputItems(), []
    for t in tokens:
        for delta in out.feed(t):
            events += items.feed(delta)
    events += items.finish("completed")
    return items, events


def test_analysis_and_answer_become_a_reasoning_item_and_a_message():
    answer = {"role": "assistant", "reasoning_content": "Think.", "content": "Bonjour 🙂"}
    items, events = _items_from(completion_tokens(sup.GREETING, answer))
    reasoning, message = items.items
    assert ResponseReasoningItem.model_validate(reasoning).content[0].text == "Think."
    assert ResponseOutputMessage.model_validate(message).content[0].text == "Bonjour 🙂"
    types = [e["type"] for e in events]
    assert types[:2] == ["response.output_item.added", "response.content_part.added"]
    assert types[-3:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done"]
    for e in events:  # every event is one the openai client knows, with every field it requires
        assert type(EVENTS.validate_python({**e, "sequence_number": 0})).__name__ != "dict"
    assert "".join(e["delta"] for e in events if e["type"] == "response.reasoning_text.delta") == "Think."
    assert "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta") == "Bonjour 🙂"
    assert types.count("response.output_item.done") == 2 and types[-1] == "response.output_item.done"


def test_two_calls_become_two_function_call_items():
    answer = {"role": "assistant", "reasoning_content": "Two.", "tool_calls": [
        {"id": "a", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
        {"id": "b", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}}]}
    items, events = _items_from(completion_tokens(sup.WEATHER_QUESTION, answer, [sup.WEATHER_TOOL]))
    kinds = [i["type"] for i in items.items]
    assert kinds == ["reasoning", "function_call", "function_call"]
    calls = [ResponseFunctionToolCall.model_validate(i) for i in items.items[1:]]
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("get_weather", {"city": "Paris"}), ("get_weather", {"city": "Rome"})]
    assert len({c.call_id for c in calls}) == 2 and all(c.status == "completed" for c in calls)
    done = [e["arguments"] for e in events if e["type"] == "response.function_call_arguments.done"]
    assert done == [c.arguments for c in calls]


def test_the_routes_sit_behind_the_apps_key():
    """/v1/responses is on the same app as /v1/chat/completions: the API key applies to it."""
    app = create_app(Backend(BackendConfig(model="never-loaded.gguf")), api_keys=("sk-test",))
    web = TestClient(app)  # no lifespan: the backend never starts, so an admitted request gets 503
    body = {"model": "never-loaded.gguf", "input": "Hi"}
    assert web.post("/v1/responses", json=body).status_code == 401
    assert web.post("/v1/responses", json=body, headers={"Authorization": "Bearer sk-test"}).status_code == 503


# ------------------------------------------------------------------------------------------------
# Live servers, both backends


def test_non_stream_reasoning_and_message(server, client):  # noqa: F811
    resp = client.responses.create(model=MODEL, input=sup.GREETING[0]["content"], temperature=0, reasoning={"effort": "medium"})
    raw = httpx.post(server.url + "/v1/responses", json={"model": MODEL, "input": sup.GREETING[0]["content"], "temperature": 0},
                     timeout=120).json()
    Response.model_validate({k: v for k, v in raw.items() if k != "gptoss_debug"})  # every required field, typed
    assert resp.status == "completed" and resp.object == "response" and resp.model == MODEL
    assert [item.type for item in resp.output] == ["reasoning", "message"]
    reasoning, message = resp.output
    assert reasoning.content[0].type == "reasoning_text" and reasoning.content[0].text == sup.GREETING_REASONING
    assert message.role == "assistant" and message.content[0].type == "output_text"
    assert resp.output_text == message.content[0].text == sup.GREETING_ANSWER
    assert no_control_text(resp.output_text) and no_control_text(reasoning.content[0].text)
    prompt = harmony.render_prompt(sup.GREETING)
    generated = harmony.render_training(sup.GREETING + [sup.conversations()[0][1]])[len(prompt):]
    u = resp.usage
    assert (u.input_tokens, u.output_tokens, u.total_tokens) == (len(prompt), len(generated), len(prompt) + len(generated))
    assert 0 < u.output_tokens_details.reasoning_tokens < u.output_tokens


def test_stream_events(server, client):  # noqa: F811
    events = list(client.responses.create(model=MODEL, input=sup.GREETING[0]["content"], temperature=0, stream=True))
    types = [e.type for e in events]
    assert types[:2] == ["response.created", "response.in_progress"] and types[-1] == "response.completed"
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert events[0].response.status == "in_progress" and events[0].response.output == []
    final = events[-1].response
    reasoning = "".join(e.delta for e in events if e.type == "response.reasoning_text.delta")
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert types.count("response.output_text.delta") > 1  # token by token, not in one piece
    assert reasoning == final.output[0].content[0].text == sup.GREETING_REASONING
    assert text == final.output_text == sup.GREETING_ANSWER
    added = [e.item.type for e in events if e.type == "response.output_item.added"]
    done = [e.item for e in events if e.type == "response.output_item.done"]
    assert added == [i.type for i in done] == [i.type for i in final.output] == ["reasoning", "message"]
    assert [e.output_index for e in events if e.type == "response.output_item.done"] == [0, 1]
    assert final.usage.total_tokens == final.usage.input_tokens + final.usage.output_tokens


def test_function_call_round_trip_with_reasoning_sent_back(server, client):  # noqa: F811
    question = sup.WEATHER_QUESTION[0]["content"]
    first = client.responses.create(model=MODEL, input=question, tools=[TOOL], temperature=0)
    assert [i.type for i in first.output] == ["reasoning", "function_call"]
    call = first.output[1]
    assert call.name == "get_weather" and json.loads(call.arguments) == json.loads(sup.WEATHER_ARGUMENTS)
    assert call.call_id.startswith("call_") and first.output[0].content[0].text == sup.WEATHER_REASONING
    assert first.output_text == ""
    # A stateless client sends everything back: its question, the reasoning and call items as returned, the result.
    back = [{"role": "user", "content": question}] + [i.model_dump(exclude_none=True) for i in first.output]
    back.append({"type": "function_call_output", "call_id": call.call_id, "output": sup.WEATHER_RESULT})
    second = client.responses.create(model=MODEL, input=back, tools=[TOOL], temperature=0)
    assert [i.type for i in second.output] == ["message"] and second.output_text == sup.WEATHER_ANSWER
    # ... the same conversation as chat completions renders, token for token
    assert second.usage.input_tokens == len(harmony.render_prompt(
        sup.WEATHER_QUESTION + [sup.weather_call(call.call_id), sup.weather_result(call.call_id)], tools=[sup.WEATHER_TOOL]))
    streamed = list(client.responses.create(model=MODEL, input=question, tools=[TOOL], temperature=0, stream=True))
    args = "".join(e.delta for e in streamed if e.type == "response.function_call_arguments.delta")
    assert args == call.arguments
    assert [e.arguments for e in streamed if e.type == "response.function_call_arguments.done"] == [call.arguments]


def test_max_output_tokens_and_errors(server, client):  # noqa: F811
    cut = client.responses.create(model=MODEL, input=sup.GREETING[0]["content"], temperature=0, max_output_tokens=3)
    assert cut.status == "incomplete" and cut.incomplete_details.reason == "max_output_tokens"
    assert cut.usage.output_tokens == 3
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model="nope", input="Hi")
    with pytest.raises(openai.BadRequestError, match="previous_response_id needs stored responses"):
        client.responses.create(model=MODEL, input="Hi", previous_response_id="resp_1")
    with pytest.raises(openai.BadRequestError, match="only function tools"):
        client.responses.create(model=MODEL, input="Hi", tools=[{"type": "web_search"}])


def test_chat_completions_send_reasoning_beside_reasoning_content(server, client):  # noqa: F811
    resp = client.chat.completions.create(model=MODEL, messages=sup.GREETING, temperature=0)
    message = resp.choices[0].message
    assert message.reasoning == message.reasoning_content == sup.GREETING_REASONING
    stream = client.chat.completions.create(model=MODEL, messages=sup.GREETING, temperature=0, stream=True)
    deltas = [c.choices[0].delta for c in stream if c.choices]
    pieces = [d.reasoning for d in deltas if getattr(d, "reasoning", None)]
    assert "".join(pieces) == sup.GREETING_REASONING
    assert pieces == [d.reasoning_content for d in deltas if getattr(d, "reasoning_content", None)]
    # An assistant turn sent back with `reasoning` renders as one with `reasoning_content`.
    call = sup.weather_call()
    as_reasoning = {k: v for k, v in call.items() if k != "reasoning_content"} | {"reasoning": call["reasoning_content"]}
    seen = []
    for turn in (call, as_reasoning):
        r = client.chat.completions.create(model=MODEL, messages=sup.WEATHER_QUESTION + [turn, sup.weather_result()],
                                           tools=[sup.WEATHER_TOOL], temperature=0, max_tokens=2)
        seen.append(r.gptoss_debug["prompt"])
    assert seen[0] == seen[1] and sup.WEATHER_REASONING in seen[1]


def test_instructions_and_effort_reach_the_engine(server):  # noqa: F811
    body = {"model": MODEL, "input": [{"role": "user", "content": [{"type": "input_text", "text": "Say hello."}]}],
            "instructions": "Be brief.", "reasoning": {"effort": "low", "summary": "auto"}, "max_output_tokens": 2}
    raw = httpx.post(server.url + "/v1/responses", json=body, timeout=120).json()
    expected = harmony.render_prompt_text([{"role": "system", "content": "Be brief."}, *sup.GREETING],
                                          options=harmony.SystemOptions(reasoning_effort="low"))
    assert raw["gptoss_debug"]["prompt"] == expected  # what the engine received (no date: LiveServer's default)
    assert raw["reasoning"]["effort"] == "low" and raw["instructions"] == "Be brief."
    bad = httpx.post(server.url + "/v1/responses", json={**body, "reasoning": {"effort": "minimal"}}, timeout=120)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "reasoning.effort"
