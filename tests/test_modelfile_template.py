"""Conformance of the Modelfile's TEMPLATE: Go's text/template, fed what Ollama feeds it, must give
the prompt gptoss.harmony (over openai-harmony) renders for the same conversation.

tests/gotemplate (Go, standard library only) parses the written Modelfile as Ollama's parser does,
builds the data /api/chat hands a template (the Modelfile's SYSTEM, collated messages, tools as
templates see them, think) and executes TEMPLATE with the template functions Ollama provides.
Each case below is a request as /api/chat takes it; ``reference`` turns it into OpenAI-style
messages for ``harmony.render_prompt_text``.

Where Ollama's variables force a difference, the reference is adjusted, and only in the ways
listed in FORCED (each adjustment in ``reference`` names its key). White space needs none:
Ollama's Modelfile parser trims only outside the triple quotes of a value (SYSTEM_PROMPT keeps
its spaces and tab) and messages reach the template untrimmed (case "whitespace-kept").
"""

from __future__ import annotations

import copy
import datetime
import json
import shutil

import pytest

from gptoss import harmony
from gptoss.modelfiles import template as template_module
from gptoss.modelfiles import write
from conftest import missing_tool
from modelfile_support import build_gotemplate, run_gotemplate, write_gguf

FORCED = {
    "date": "currentDate is the Ollama server's clock (YYYY-MM-DD); the harness pins it to the case's "
    "date and the reference gets the same date (test_current_date_is_today checks the unpinned clock)",
    "think-false": "think=false renders no Reasoning line; openai-harmony always writes one, so the "
    "reference is rendered at medium and that line removed",
    "system": "a Modelfile SYSTEM becomes a leading system message when a request does not start with one",
    "collate": "Ollama merges consecutive messages of one role (not tool results), joining contents "
    "with a blank line; the later messages' thinking and tool calls are lost",
    "arguments": "tool-call arguments reach templates as a decoded map; the template's `json` re-encodes "
    "them with Go's encoding/json: keys sorted, no spaces, <, > and & as \\u003c, \\u003e, \\u0026",
    "property-order": "templates get tool properties as Go maps, which text/template ranges over in "
    "key order, so the reference's properties are sorted (also inside items)",
    "schema-keywords": "of a property Ollama keeps only type, description, enum, items and nested "
    "properties (title, default, examples, nullable, oneOf, nested required, ... are dropped; an empty "
    "description is no description; a one-element type list is its element); of the parameters only "
    "type, required, properties and items; inside items the JSON is kept whole",
    "no-parameters": "Ollama cannot tell `parameters: {}` from no parameters: both render `() => any`",
    "content-and-thinking-beside-calls": "text beside a tool call is the analysis before it; given both "
    "content and thinking the Harmony core refuses the message (as OpenAI's template does), a template "
    "cannot refuse: it keeps the thinking and drops the content, and so does the reference",
}

DATE = "2025-08-05"

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "description": "City name, e.g. Paris"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"], "default": "celsius"},
            },
            "required": ["city"],
        },
    },
}

SEARCH = {
    "type": "function",
    "function": {
        "name": "search_docs",
        "description": "Search the documentation.\nReturns at most `limit` hits.\n\nUse sparingly.",
        "parameters": {
            "type": "object",
            "properties": {
                "query": {"type": "string", "title": "Query", "examples": ["gguf"], "description": "What to look for"},
                "limit": {"type": "integer", "nullable": True, "default": 5},
                "filters": {
                    "type": "object",
                    "description": "Optional filters",
                    "properties": {
                        "section": {"type": "string", "enum": ["api", "guide", 7]},
                        "since": {"type": ["string", "null"], "description": "ISO date"},
                        "tags": {"type": "array", "items": {"type": "string"}},
                        "owner": {
                            "type": "object",
                            "properties": {"team": {"type": "string"}, "id": {"type": "integer"}},
                            "required": ["team"],
                        },
                    },
                    "required": ["section"],
                },
                "sort": {"description": "anything goes"},
                "anyof": {"anyOf": [{"type": "string"}, {"type": "number"}], "description": "union"},
                "weights": {"type": "array", "items": {"type": "number"}},
                "pairs": {"type": "array", "items": {"type": "array", "items": {"type": "boolean"}}},
                "rows": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "description": "A row",
                        "properties": {
                            "name": {"type": "string", "title": "Name", "examples": ["a", "b"]},
                            "score": {"type": "number", "nullable": True, "default": 0},
                            "kind": {"type": "string", "enum": ["x", "y"], "default": "x"},
                            "note": {"type": "string", "default": "none"},
                            "extra": {"type": ["string", "integer"]},
                            "anything": {},
                        },
                        "required": ["name"],
                    },
                },
                "raw": {"type": "array"},
                "mixed": {"type": ["number", "string", "null"]},
                "flag": {"type": "boolean", "description": ""},
            },
            "required": ["query", "rows"],
        },
    },
}

NO_PARAMS = {"type": "function", "function": {"name": "now", "description": "The current time."}}
EMPTY_OBJECT = {"type": "function", "function": {"name": "ping", "parameters": {"type": "object", "properties": {}}}}
EMPTY_PARAMS = {"type": "function", "function": {"name": "noop", "description": "", "parameters": {}}}


def user(text):
    return {"role": "user", "content": text}


def assistant(content="", thinking=None, calls=None):
    msg = {"role": "assistant", "content": content}
    if thinking is not None:
        msg["thinking"] = thinking
    if calls:
        msg["tool_calls"] = calls
    return msg


def call(name, arguments, id=None):
    out = {"function": {"name": name, "arguments": arguments}}
    if id is not None:
        out["id"] = id
    return out


def tool(content, name=None, call_id=None):
    msg = {"role": "tool", "content": content}
    if name is not None:
        msg["tool_name"] = name
    if call_id is not None:
        msg["tool_call_id"] = call_id
    return msg


CASES = [
    {"name": "think-unset", "messages": [user("What is 2+2?")]},
    {"name": "think-true", "think": True, "messages": [user("What is 2+2?")]},
    {"name": "think-low", "think": "low", "messages": [user("What is 2+2?")]},
    {"name": "think-medium", "think": "medium", "messages": [user("What is 2+2?")]},
    {"name": "think-high", "think": "high", "messages": [user("Prove it.")]},
    {"name": "think-false", "think": False, "messages": [user("Just answer.")]},
    {
        "name": "system-message",
        "messages": [{"role": "system", "content": "You are terse.\nNever use lists."}, user("Hello")],
    },
    {
        "name": "system-and-developer",
        "think": "low",
        "messages": [
            {"role": "system", "content": "Be kind."},
            {"role": "developer", "content": "Answer in French."},
            user("Hi"),
        ],
    },
    {
        "name": "multi-turn-drops-earlier-analysis",
        "messages": [
            user("Capital of France?"),
            assistant("Paris.", thinking="The user asks about France. Paris."),
            user("And of Italy?"),
            assistant("Rome.", thinking="Italy: Rome."),
            user("Spain?"),
        ],
    },
    {
        "name": "current-turn-analysis-kept",
        "think": "high",
        "messages": [user("Think first."), assistant("Done.", thinking="Let me think about it.")],
    },
    {
        "name": "tool-call-and-result",
        "think": True,
        "tools": [WEATHER],
        "messages": [
            user("Weather in Paris?"),
            assistant(thinking="I should call get_weather.", calls=[call("get_weather", {"city": "Paris"})]),
            tool('{"temp_c": 21, "sky": "clear"}', name="get_weather"),
        ],
    },
    {
        "name": "tool-result-by-call-id",
        "tools": [WEATHER, NO_PARAMS],
        "messages": [
            user("Time and weather?"),
            assistant(
                thinking="Two calls.",
                calls=[call("now", {}, id="call_1"), call("get_weather", {"city": "Oslo", "unit": "celsius"}, id="call_2")],
            ),
            tool("12:00", call_id="call_1"),
            tool("-3 C", call_id="call_2"),
        ],
    },
    {
        "name": "tool-result-unnamed-uses-last-call",
        "tools": [WEATHER],
        "messages": [
            user("Weather?"),
            assistant(calls=[call("get_weather", {"city": "Rome"})]),
            tool("sunny"),
        ],
    },
    {
        "name": "tool-turn-then-new-question",
        "tools": [WEATHER],
        "messages": [
            user("Weather in Paris?"),
            assistant(thinking="Call the tool.", calls=[call("get_weather", {"city": "Paris"})]),
            tool("rain", name="get_weather"),
            assistant("It is raining in Paris.", thinking="Rain, say so."),
            user("Should I take an umbrella?"),
        ],
    },
    {
        "name": "content-and-thinking-beside-a-tool-call",
        "tools": [WEATHER],
        "messages": [
            user("Weather in Lima?"),
            assistant("Let me check.", thinking="Check it.", calls=[call("get_weather", {"city": "Lima"})]),
            tool("fog", name="get_weather"),
        ],
    },
    {
        "name": "content-beside-a-tool-call-is-its-analysis",
        "tools": [WEATHER],
        "messages": [
            user("Weather in Lima?"),
            assistant("Let me check.", calls=[call("get_weather", {"city": "Lima"})]),
            tool("fog", name="get_weather"),
        ],
    },
    {
        "name": "unicode",
        "tools": [WEATHER],
        "messages": [
            {"role": "system", "content": "Réponds en français 🇫🇷 — «toujours»."},
            user("東京の天気は？ مرحبا ẞ e\u0301 🌧️"),
            assistant(thinking="Nutzer fragt: Tōkyō 天気.", calls=[call("get_weather", {"city": "東京", "note": "çà ✓"})]),
            tool("晴れ ☀️ 25°C", name="get_weather"),
        ],
    },
    {
        "name": "empty-contents",
        "messages": [
            {"role": "system", "content": ""},
            user(""),
            assistant(""),
            user("Still there?"),
            assistant("", thinking=""),
            user(""),
        ],
    },
    {
        "name": "tools-nested-enum-array-untyped",
        "think": "high",
        "tools": [SEARCH, WEATHER],
        "messages": [{"role": "system", "content": "Use tools when needed."}, user("Find the GGUF guide.")],
    },
    {
        "name": "tools-without-parameters",
        "tools": [NO_PARAMS, EMPTY_OBJECT, EMPTY_PARAMS],
        "messages": [user("ping")],
    },
    {"name": "consecutive-users-collated", "messages": [user("First part."), user("Second part."), user("Third.")]},
    {
        "name": "arguments-go-json",
        "tools": [SEARCH],
        "messages": [
            user("search"),
            assistant(
                calls=[
                    call(
                        "search_docs",
                        {"query": "a<b & c>d", "limit": 3, "rows": [{"name": "n", "score": 1.5}], "filters": {"tags": ["x", "y"], "since": None}, "flag": True},
                    )
                ]
            ),
            tool("[]", name="search_docs"),
            assistant("Nothing found."),
            user("ok"),
        ],
    },
    {
        "name": "tool-results-in-a-row-not-collated",
        "tools": [WEATHER],
        "messages": [
            user("Two cities."),
            assistant(calls=[call("get_weather", {"city": "A"}), call("get_weather", {"city": "B"})]),
            tool("a: sun", name="get_weather"),
            tool("b: snow", name="get_weather"),
            assistant("A is sunny, B snowy."),
        ],
    },
    {
        "name": "whitespace-kept",
        "messages": [
            {"role": "system", "content": "  leading and trailing  \n"},
            user("\n\tindented\n\n"),
            assistant(" spaced answer ", thinking=" spaced thought "),
            user("  "),
        ],
    },
]

SYSTEM_PROMPT = '  You are "Tiny", a helpful assistant.\n\tKeep it short.  '

SYSTEM_CASES = [
    {"name": "modelfile-system-prepended", "messages": [user("Who are you?")]},
    {"name": "modelfile-system-with-tools", "think": "low", "tools": [WEATHER], "messages": [user("Weather?")]},
    {
        "name": "modelfile-system-replaced-by-request-system",
        "messages": [{"role": "system", "content": "Request system wins."}, user("Who are you?")],
    },
    {"name": "modelfile-system-developer-first", "messages": [{"role": "developer", "content": "Dev rule."}, user("Hi")]},
]


# ---------------------------------------------------------------------------------------------
# The reference: the same request as OpenAI-style messages, through gptoss.harmony


def go_json(value) -> str:
    """encoding/json.Marshal of a decoded JSON value (FORCED["arguments"])."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    for ch, esc in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"), ("\u2028", "\\u2028"), ("\u2029", "\\u2029")):
        text = text.replace(ch, esc)
    return text


def sorted_properties(schema):
    """FORCED["property-order"]: every "properties" map in key order."""
    if isinstance(schema, dict):
        out = {k: sorted_properties(v) for k, v in schema.items()}
        if isinstance(out.get("properties"), dict):
            out["properties"] = {k: out["properties"][k] for k in sorted(out["properties"])}
        return out
    if isinstance(schema, list):
        return [sorted_properties(v) for v in schema]
    return schema


def kept_property(prop: dict) -> dict:
    """FORCED["schema-keywords"]: what Ollama's ToolProperty keeps of a property."""
    out = {}
    t = prop.get("type")
    if t is not None:
        out["type"] = t[0] if isinstance(t, list) and len(t) == 1 else t
    if prop.get("description"):
        out["description"] = prop["description"]
    if "enum" in prop:
        out["enum"] = prop["enum"]
    if "items" in prop:
        out["items"] = sorted_properties(prop["items"])
    if isinstance(prop.get("properties"), dict):
        out["properties"] = {k: kept_property(prop["properties"][k]) for k in sorted(prop["properties"])}
    return out


def kept_tool(t: dict) -> dict:
    fn = t["function"]
    params = fn.get("parameters")
    if not params or (not params.get("type") and not params.get("properties")):
        kept = None  # FORCED["no-parameters"]
    else:
        kept = {k: params[k] for k in ("type", "required") if k in params}
        if "items" in params:
            kept["items"] = sorted_properties(params["items"])
        props = params.get("properties") or {}
        kept["properties"] = {k: kept_property(props[k]) for k in sorted(props)}
    return {"type": "function", "function": {"name": fn["name"], "description": fn.get("description") or "", "parameters": kept}}


def ollama_messages(messages: list[dict], system: str | None) -> list[dict]:
    msgs = copy.deepcopy(messages)
    if system and msgs and msgs[0]["role"] != "system":  # FORCED["system"]
        msgs.insert(0, {"role": "system", "content": system})
    out: list[dict] = []
    for m in msgs:  # FORCED["collate"]
        if out and out[-1]["role"] == m["role"] and m["role"] != "tool":
            out[-1]["content"] = out[-1].get("content", "") + "\n\n" + m.get("content", "")
        else:
            out.append(m)
    return out


def reference(case: dict, *, system: str | None = None) -> str:
    messages = []
    for m in ollama_messages(case["messages"], system):
        if m["role"] == "assistant":
            msg = {"role": "assistant", "content": m.get("content", "")}
            if m.get("thinking"):
                msg["thinking"] = m["thinking"]
                if m.get("tool_calls"):  # FORCED["content-and-thinking-beside-calls"]
                    msg["content"] = ""
            if m.get("tool_calls"):
                msg["tool_calls"] = [
                    {"id": c.get("id"), "function": {"name": c["function"]["name"], "arguments": go_json(c["function"].get("arguments") or {})}}
                    for c in m["tool_calls"]
                ]
        elif m["role"] == "tool":
            msg = {"role": "tool", "content": m.get("content", ""), "name": m.get("tool_name"), "tool_call_id": m.get("tool_call_id")}
        else:
            msg = {"role": m["role"], "content": m.get("content", "")}
        messages.append(msg)
    tools = [kept_tool(t) for t in case.get("tools") or []] or None
    think = case.get("think")
    effort = think if think in harmony.REASONING_EFFORTS else "medium"
    options = harmony.SystemOptions(reasoning_effort=effort, current_date=case["date"])  # FORCED["date"]
    text = harmony.render_prompt_text(messages, tools=tools, options=options)
    if think is False:  # FORCED["think-false"]
        line = "\n\nReasoning: medium"
        assert text.count(line) == 1
        text = text.replace(line, "")
    return text


# ---------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="session")
def go_scratch(tmp_path_factory):
    return tmp_path_factory.mktemp("go")


@pytest.fixture(scope="session")
def gotemplate(go_scratch):
    if shutil.which("go") is None:
        missing_tool("Go is not installed (apt-get install golang-go; tests/run.sh installs it)")
    return build_gotemplate(go_scratch)


@pytest.fixture(scope="session")
def gguf_file(tmp_path_factory):
    return write_gguf(tmp_path_factory.mktemp("gguf") / "tiny-gpt-oss.gguf")


@pytest.fixture(scope="session")
def modelfile(gguf_file, tmp_path_factory):
    return write(str(gguf_file), out=str(tmp_path_factory.mktemp("mf") / "Modelfile"))


@pytest.fixture(scope="session")
def modelfile_with_system(gguf_file, tmp_path_factory):
    return write(str(gguf_file), system=SYSTEM_PROMPT, out=str(tmp_path_factory.mktemp("mfs") / "Modelfile"))


def dated(cases):
    return [dict(c, date=DATE) for c in cases]


@pytest.fixture(scope="session")
def rendered(gotemplate, modelfile, go_scratch):
    return run_gotemplate(gotemplate, modelfile, dated(CASES), go_scratch)


# ---------------------------------------------------------------------------------------------
# Tests


def test_table_size_and_names():
    names = [c["name"] for c in CASES + SYSTEM_CASES]
    assert len(CASES) >= 20 and len(names) == len(set(names))


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_template_matches_harmony(case, rendered):
    result = {r["name"]: r for r in rendered["results"]}[case["name"]]
    assert result.get("error") is None, result["error"]
    assert result["prompt"] == reference(dict(case, date=DATE))


@pytest.mark.parametrize("case", SYSTEM_CASES, ids=[c["name"] for c in SYSTEM_CASES])
def test_modelfile_system_matches_harmony(case, gotemplate, modelfile_with_system, go_scratch):
    out = run_gotemplate(gotemplate, modelfile_with_system, dated([case]), go_scratch)
    (result,) = out["results"]
    assert result.get("error") is None, result["error"]
    assert result["prompt"] == reference(dict(case, date=DATE), system=SYSTEM_PROMPT)
    if case["messages"][0]["role"] == "system":
        assert "Tiny" not in result["prompt"]
    else:
        assert "# Instructions\n\n" + SYSTEM_PROMPT in result["prompt"]


def test_nested_properties_as_plain_maps(gotemplate, modelfile, go_scratch, rendered):
    """Ollama 0.13.5 handed nested properties over as a plain map, later as an ordered map: same prompt."""
    tool_cases = [c for c in dated(CASES) if c.get("tools")]
    plain = run_gotemplate(gotemplate, modelfile, tool_cases, go_scratch, nested="plain")
    ordered = {r["name"]: r["prompt"] for r in rendered["results"]}
    assert plain["results"] and all(r["prompt"] == ordered[r["name"]] for r in plain["results"])


def test_modelfile_survives_ollama_parser(rendered, modelfile_with_system, gotemplate, go_scratch):
    names = [c["name"] for c in rendered["commands"]]
    assert names == ["model", "template", "temperature", "top_p", "num_ctx"]
    args = {c["name"]: c["args"] for c in rendered["commands"]}
    assert args["template"] == template_module.harmony_template()
    assert {"messages", "tools", "think", "thinklevel", "isthinkset"} <= set(rendered["vars"])
    out = run_gotemplate(gotemplate, modelfile_with_system, [], go_scratch)
    assert {c["name"]: c["args"] for c in out["commands"]}["system"] == SYSTEM_PROMPT


def test_current_date_is_today(gotemplate, modelfile, go_scratch):
    before = datetime.date.today().isoformat()
    out = run_gotemplate(gotemplate, modelfile, [{"name": "today", "messages": [user("hi")]}], go_scratch)
    after = datetime.date.today().isoformat()
    (result,) = out["results"]
    assert f"\nCurrent date: {before}\n" in result["prompt"] or f"\nCurrent date: {after}\n" in result["prompt"]


def test_long_multiline_tool_description(gotemplate, modelfile, go_scratch):
    """Tool descriptions are split into // lines byte by byte; a long one still renders."""
    lines = [f"line {i}: " + "ü" * 50 for i in range(100)]
    big = {"type": "function", "function": {"name": "big", "description": "\n".join(lines) + "\n", "parameters": {"type": "object", "properties": {}}}}
    case = {"name": "big", "date": DATE, "tools": [big], "messages": [user("x")]}
    (result,) = run_gotemplate(gotemplate, modelfile, [case], go_scratch)["results"]
    assert result["prompt"] == reference(case)
    assert "".join(f"// {line}\n" for line in lines) in result["prompt"]


def test_objects_beyond_max_depth_render_as_any(gotemplate, modelfile, go_scratch):
    """Known limit of the template (Go templates cannot pass an indent): deeper objects are `any`."""
    levels = template_module.MAX_SCHEMA_DEPTH

    def tool_with(nested_objects: int) -> dict:
        schema = {"type": "object", "properties": {"x": {"type": "string"}}}
        for _ in range(nested_objects - 1):
            schema = {"type": "object", "properties": {"d": schema}}
        params = {"type": "object", "properties": {"d": schema}}  # the parameters object is a level too
        return {"type": "function", "function": {"name": "deep", "parameters": params}}

    fits = {"name": "fits", "date": DATE, "tools": [tool_with(levels - 1)], "messages": [user("x")]}
    too_deep = {"name": "too-deep", "date": DATE, "tools": [tool_with(levels)], "messages": [user("x")]}
    results = {r["name"]: r for r in run_gotemplate(gotemplate, modelfile, [fits, too_deep], go_scratch)["results"]}
    assert results["fits"]["prompt"] == reference(fits)
    prompt = results["too-deep"]["prompt"]
    assert results["too-deep"].get("error") is None and prompt != reference(too_deep)
    assert prompt.count("d?: {") == levels - 1 and prompt.count("d?: any,") == 1 and "x?: string" not in prompt


def test_ollama_parser_changes_what_write_refuses(gotemplate, gguf_file, tmp_path, go_scratch):
    """Why `write` refuses some system prompts: Ollama's parser would silently change them."""
    mf = tmp_path / "Modelfile"
    mf.write_text(f'FROM {gguf_file}\nSYSTEM """a\u00a0b\u200bc\tkept"""\n', encoding="utf-8")
    out = run_gotemplate(gotemplate, mf, [], go_scratch)
    assert {c["name"]: c["args"] for c in out["commands"]}["system"] == "abc\tkept"
    mf.write_text(f'FROM {gguf_file}\nSYSTEM """say """\ntwice"""\n', encoding="utf-8")
    with pytest.raises(AssertionError, match="command must be one of"):
        run_gotemplate(gotemplate, mf, [], go_scratch)
