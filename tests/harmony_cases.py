"""The conformance table: OpenAI-style conversations and the openai-harmony messages they mean.

Each case has `messages` (+ `tools`, `options`) as users, datasets and API clients write them, and
`reference`: a function building the same conversation with openai-harmony's own API (the
reference). The Harmony core, the fixture's chat template and the Modelfile template must all
render each case exactly as openai-harmony renders `reference`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Gets the current weather for a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "location": {"type": "string", "description": "City name, e.g. Paris"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"], "default": "celsius"},
            },
            "required": ["location"],
        },
    },
}
RICH_TOOL = {
    "type": "function",
    "function": {
        "name": "search_flights",
        "description": "Search flights.\nReturns at most `limit` results.",
        "parameters": {
            "type": "object",
            "properties": {
                "origin": {"type": "string"},
                "passengers": {"type": "integer", "default": 1},
                "max_price": {"type": "number", "description": "In EUR"},
                "direct": {"type": "boolean"},
                "cabins": {"type": "array", "items": {"type": "string", "enum": ["economy", "business"]}},
                "dates": {
                    "type": "object",
                    "description": "Travel window",
                    "properties": {"from": {"type": "string"}, "to": {"type": "string"}},
                    "required": ["from"],
                },
                "notes": {"description": "Anything else (no type given)"},
                "tags": {"type": "array"},
                "maybe": {"type": ["string", "null"]},
            },
            "required": ["origin"],
        },
    },
}
NO_ARGS_TOOL = {"type": "function", "function": {"name": "get_time", "description": "Current UTC time."}}

LONG_UNICODE = "Grüße aus Köln — 日本語のテキスト、한국어, العربية, हिन्दी, emoji 🎉👩‍💻, math ∑∫√, tabs\tand\nnewlines."


@dataclasses.dataclass
class Case:
    name: str
    messages: list[dict[str, Any]]
    # openai_harmony module -> every message after the system message, earlier analysis included;
    # openai-harmony's own auto-drop decides what to leave out.
    reference: Callable[[Any], list]
    tools: list[dict] | None = None
    options: dict = dataclasses.field(default_factory=dict)
    # Where our history rule differs from openai-harmony 0.0.8's auto-drop (its PR #96): every
    # analysis text our rule drops, and why. The test checks that openai-harmony keeps some of them.
    we_drop: tuple[str, ...] = ()
    why: str = ""


def _sys(oh, options: dict, tools: list | None):
    sc = oh.SystemContent.new().with_reasoning_effort(oh.ReasoningEffort(options.get("reasoning_effort", "medium").capitalize()))
    if options.get("current_date"):
        sc = sc.with_conversation_start_date(options["current_date"])
    return oh.Message.from_role_and_content(oh.Role.SYSTEM, sc)


def _dev(oh, instructions: str | None = None, tools: list | None = None):
    dev = oh.DeveloperContent.new()
    if instructions is not None:
        dev = dev.with_instructions(instructions)
    if tools:
        dev = dev.with_function_tools(
            [oh.ToolDescription.new(t["function"]["name"], t["function"].get("description", ""), parameters=t["function"].get("parameters")) for t in tools]
        )
    return oh.Message.from_role_and_content(oh.Role.DEVELOPER, dev)


def _u(oh, text):
    return oh.Message.from_role_and_content(oh.Role.USER, text)


def _a(oh, text, channel):
    return oh.Message.from_role_and_content(oh.Role.ASSISTANT, text).with_channel(channel)


def _call(oh, name, args):
    return (
        oh.Message.from_role_and_content(oh.Role.ASSISTANT, args)
        .with_channel("commentary").with_recipient(f"functions.{name}").with_content_type("json")
    )


def _result(oh, name, text):
    return (
        oh.Message.from_author_and_content(oh.Author.new(oh.Role.TOOL, f"functions.{name}"), text)
        .with_channel("commentary").with_recipient("assistant")
    )


def _call_msg(call_id, name, args):
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": args}}


CASES: list[Case] = [
    Case("single_user_medium", [{"role": "user", "content": "Hi!"}], lambda oh: [_u(oh, "Hi!")]),
    Case("reasoning_low", [{"role": "user", "content": "2+2?"}], lambda oh: [_u(oh, "2+2?")], options={"reasoning_effort": "low"}),
    Case("reasoning_high_with_date", [{"role": "user", "content": "Plan a trip."}], lambda oh: [_u(oh, "Plan a trip.")],
         options={"reasoning_effort": "high", "current_date": "2026-11-21"}),
    Case("system_prompt_becomes_instructions",
         [{"role": "system", "content": "You are a pirate."}, {"role": "user", "content": "Hello"}],
         lambda oh: [_dev(oh, "You are a pirate."), _u(oh, "Hello")]),
    Case("developer_instructions",
         [{"role": "developer", "content": "Answer in French."}, {"role": "user", "content": "Hello"}],
         lambda oh: [_dev(oh, "Answer in French."), _u(oh, "Hello")]),
    Case("system_and_developer_joined",
         [{"role": "system", "content": "Be brief."}, {"role": "developer", "content": "Use metric units."},
          {"role": "user", "content": "How tall is Everest?"}],
         lambda oh: [_dev(oh, "Be brief.\n\nUse metric units."), _u(oh, "How tall is Everest?")]),
    Case("multi_turn_drops_earlier_analysis",
         [{"role": "user", "content": "Capital of France?"},
          {"role": "assistant", "reasoning_content": "Easy: Paris.", "content": "Paris."},
          {"role": "user", "content": "And Spain?"}],
         lambda oh: [_u(oh, "Capital of France?"), _a(oh, "Easy: Paris.", "analysis"), _a(oh, "Paris.", "final"), _u(oh, "And Spain?")]),
    Case("multi_turn_thinking_field",
         [{"role": "user", "content": "a"}, {"role": "assistant", "thinking": "t", "content": "b"}, {"role": "user", "content": "c"}],
         lambda oh: [_u(oh, "a"), _a(oh, "t", "analysis"), _a(oh, "b", "final"), _u(oh, "c")]),
    Case("three_turns_drops_all_earlier_analysis",
         [{"role": "user", "content": "q1"}, {"role": "assistant", "reasoning_content": "t1", "content": "a1"},
          {"role": "user", "content": "q2"}, {"role": "assistant", "reasoning_content": "t2", "content": "a2"},
          {"role": "user", "content": "q3"}],
         lambda oh: [_u(oh, "q1"), _a(oh, "t1", "analysis"), _a(oh, "a1", "final"), _u(oh, "q2"), _a(oh, "t2", "analysis"),
                     _a(oh, "a2", "final"), _u(oh, "q3")],
         we_drop=("t1", "t2"), why="openai-harmony 0.0.8 drops analysis only before the first final answer (its PR #96)"),
    Case("tool_call_pending_result",
         [{"role": "user", "content": "Weather in Paris?"},
          {"role": "assistant", "reasoning_content": "Need the weather tool.",
           "tool_calls": [_call_msg("c1", "get_weather", '{"location":"Paris"}')]},
          {"role": "tool", "tool_call_id": "c1", "content": '{"temp_c": 21}'}],
         lambda oh: [_dev(oh, tools=[WEATHER_TOOL]), _u(oh, "Weather in Paris?"), _a(oh, "Need the weather tool.", "analysis"),
                     _call(oh, "get_weather", '{"location":"Paris"}'), _result(oh, "get_weather", '{"temp_c": 21}')],
         tools=[WEATHER_TOOL]),
    Case("tool_round_trip_then_next_question",
         [{"role": "user", "content": "Weather in Paris?"},
          {"role": "assistant", "reasoning_content": "Use the tool.", "tool_calls": [_call_msg("c1", "get_weather", '{"location":"Paris"}')]},
          {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
          {"role": "assistant", "reasoning_content": "Report it.", "content": "It is sunny."},
          {"role": "user", "content": "Thanks! And Rome?"}],
         lambda oh: [_dev(oh, tools=[WEATHER_TOOL]), _u(oh, "Weather in Paris?"), _a(oh, "Use the tool.", "analysis"),
                     _call(oh, "get_weather", '{"location":"Paris"}'), _result(oh, "get_weather", "sunny"),
                     _a(oh, "Report it.", "analysis"), _a(oh, "It is sunny.", "final"), _u(oh, "Thanks! And Rome?")],
         tools=[WEATHER_TOOL]),
    Case("tool_call_with_content_is_the_analysis_before_it",
         [{"role": "user", "content": "Weather in Paris?"},
          {"role": "assistant", "content": "I will ask the weather tool.",
           "tool_calls": [_call_msg("c1", "get_weather", '{"location":"Paris"}')]},
          {"role": "tool", "tool_call_id": "c1", "content": "sunny"}],
         lambda oh: [_dev(oh, tools=[WEATHER_TOOL]), _u(oh, "Weather in Paris?"), _a(oh, "I will ask the weather tool.", "analysis"),
                     _call(oh, "get_weather", '{"location":"Paris"}'), _result(oh, "get_weather", "sunny")],
         tools=[WEATHER_TOOL]),
    Case("tool_result_by_name_field",
         [{"role": "user", "content": "time?"},
          {"role": "assistant", "tool_calls": [{"type": "function", "function": {"name": "get_time", "arguments": "{}"}}]},
          {"role": "tool", "name": "get_time", "content": "12:00Z"}],
         lambda oh: [_dev(oh, tools=[NO_ARGS_TOOL]), _u(oh, "time?"), _call(oh, "get_time", "{}"), _result(oh, "get_time", "12:00Z")],
         tools=[NO_ARGS_TOOL]),
    Case("two_parallel_tool_calls",
         [{"role": "user", "content": "Paris and Rome?"},
          {"role": "assistant", "tool_calls": [_call_msg("a", "get_weather", '{"location":"Paris"}'), _call_msg("b", "get_weather", '{"location":"Rome"}')]},
          {"role": "tool", "tool_call_id": "a", "content": "sunny"},
          {"role": "tool", "tool_call_id": "b", "content": "rain"}],
         lambda oh: [_dev(oh, tools=[WEATHER_TOOL]), _u(oh, "Paris and Rome?"), _call(oh, "get_weather", '{"location":"Paris"}'),
                     _call(oh, "get_weather", '{"location":"Rome"}'), _result(oh, "get_weather", "sunny"), _result(oh, "get_weather", "rain")],
         tools=[WEATHER_TOOL]),
    Case("tools_with_instructions",
         [{"role": "system", "content": "Only use tools when needed."}, {"role": "user", "content": "Hi"}],
         lambda oh: [_dev(oh, "Only use tools when needed.", tools=[WEATHER_TOOL, NO_ARGS_TOOL]), _u(oh, "Hi")],
         tools=[WEATHER_TOOL, NO_ARGS_TOOL]),
    Case("rich_tool_schema_nested_enum_array_untyped",
         [{"role": "user", "content": "Find flights"}],
         lambda oh: [_dev(oh, tools=[RICH_TOOL]), _u(oh, "Find flights")], tools=[RICH_TOOL], options={"reasoning_effort": "high"}),
    Case("unicode_everywhere",
         [{"role": "system", "content": "Réponds en français. 🙂"}, {"role": "user", "content": LONG_UNICODE},
          {"role": "assistant", "content": "D'accord — ça marche ✓"}, {"role": "user", "content": "Merci! 日本"}],
         lambda oh: [_dev(oh, "Réponds en français. 🙂"), _u(oh, LONG_UNICODE), _a(oh, "D'accord — ça marche ✓", "final"), _u(oh, "Merci! 日本")]),
    Case("empty_user_content", [{"role": "user", "content": ""}], lambda oh: [_u(oh, "")]),
    Case("empty_assistant_content",
         [{"role": "user", "content": "x"}, {"role": "assistant", "content": ""}, {"role": "user", "content": "y"}],
         lambda oh: [_u(oh, "x"), _a(oh, "", "final"), _u(oh, "y")]),
    Case("content_parts_list",
         [{"role": "user", "content": [{"type": "text", "text": "part one, "}, {"type": "text", "text": "part two"}]}],
         lambda oh: [_u(oh, "part one, part two")]),
    Case("whitespace_and_markup_in_text",
         [{"role": "user", "content": "  leading spaces\n\n```python\nprint('hi')\n```\n<tag> & </tag>  "}],
         lambda oh: [_u(oh, "  leading spaces\n\n```python\nprint('hi')\n```\n<tag> & </tag>  ")]),
    Case("long_multi_turn_low",
         [{"role": "user", "content": f"turn {i}"} if i % 2 == 0 else {"role": "assistant", "content": f"answer {i}"} for i in range(9)],
         lambda oh: [_u(oh, f"turn {i}") if i % 2 == 0 else _a(oh, f"answer {i}", "final") for i in range(9)],
         options={"reasoning_effort": "low", "current_date": "2025-01-01"}),
    Case("analysis_in_current_turn_after_tool_kept_with_history",
         [{"role": "user", "content": "q1"}, {"role": "assistant", "reasoning_content": "old thought", "content": "a1"},
          {"role": "user", "content": "weather?"},
          {"role": "assistant", "reasoning_content": "call it", "tool_calls": [_call_msg("c", "get_weather", '{"location":"Oslo"}')]},
          {"role": "tool", "tool_call_id": "c", "content": "snow"}],
         lambda oh: [_dev(oh, tools=[WEATHER_TOOL]), _u(oh, "q1"), _a(oh, "old thought", "analysis"), _a(oh, "a1", "final"),
                     _u(oh, "weather?"), _a(oh, "call it", "analysis"),
                     _call(oh, "get_weather", '{"location":"Oslo"}'), _result(oh, "get_weather", "snow")],
         tools=[WEATHER_TOOL],
         we_drop=("old thought",),
         why="openai-harmony 0.0.8 drops nothing while the last assistant message is a tool call"),
]
