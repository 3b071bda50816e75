"""The Harmony core and the fixture's chat template against openai-harmony, token for token."""

from __future__ import annotations

import json

import pytest

from gptoss import harmony
from harmony_cases import CASES, Case

oh = pytest.importorskip("openai_harmony")


def _options(case: Case) -> harmony.SystemOptions:
    return harmony.SystemOptions(**case.options)


def reference_tokens(case: Case) -> list[int]:
    """openai-harmony's rendering of the case's own messages, with its own auto-drop of analysis."""
    enc = harmony.encoding()
    system = _system_message(case)
    full = [system] + case.reference(oh)
    if not case.we_drop:
        return enc.render_conversation_for_completion(oh.Conversation.from_messages(full), oh.Role.ASSISTANT)
    kept = [m for m in full if not (m.channel == "analysis" and m.content[0].text in case.we_drop)]
    theirs = enc.render_conversation_for_completion(oh.Conversation.from_messages(full), oh.Role.ASSISTANT)
    ours = enc.render_conversation_for_completion(
        oh.Conversation.from_messages(kept), oh.Role.ASSISTANT, oh.RenderConversationConfig(auto_drop_analysis=False)
    )
    # The listed difference is real: openai-harmony keeps some of what we drop.
    assert theirs != ours, case.why
    assert any(f"<|message|>{t}<|end|>" in enc.decode_utf8(theirs) for t in case.we_drop), case.why
    assert not any(f"<|message|>{t}<|end|>" in enc.decode_utf8(ours) for t in case.we_drop)
    return ours


def _system_message(case: Case):
    effort = case.options.get("reasoning_effort", "medium")
    sc = oh.SystemContent.new().with_reasoning_effort(oh.ReasoningEffort(effort.capitalize()))
    if case.options.get("current_date"):
        sc = sc.with_conversation_start_date(case.options["current_date"])
    return oh.Message.from_role_and_content(oh.Role.SYSTEM, sc)


def test_table_is_large_enough_and_covers_the_kinds():
    assert len(CASES) >= 20
    efforts = {c.options.get("reasoning_effort", "medium") for c in CASES}
    assert efforts == {"low", "medium", "high"}
    assert any(m.get("role") == "tool" for c in CASES for m in c.messages)
    assert any(m.get("role") == "developer" for c in CASES for m in c.messages)
    assert any(m.get("reasoning_content") for c in CASES for m in c.messages)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_core_renders_like_openai_harmony(case):
    ours = harmony.render_prompt(case.messages, tools=case.tools, options=_options(case))
    assert ours == reference_tokens(case)


@pytest.fixture(scope="module")
def fixture_tokenizer(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_fixture_chat_template_gives_the_same_text(case, fixture_tokenizer):
    text = fixture_tokenizer.apply_chat_template(
        case.messages, tools=case.tools, add_generation_prompt=True, tokenize=False, **case.options
    )
    assert text == harmony.encoding().decode_utf8(reference_tokens(case))
    ids = fixture_tokenizer.apply_chat_template(
        case.messages, tools=case.tools, add_generation_prompt=True, tokenize=True, return_dict=False, **case.options
    )
    assert list(ids) == reference_tokens(case)


def _completion_messages(case: Case):
    """A plausible completion for each case: analysis + (tool call | final)."""
    msgs = [oh.Message.from_role_and_content(oh.Role.ASSISTANT, f"Thinking about {case.name} ✓").with_channel("analysis")]
    if case.tools:
        name = case.tools[0]["function"]["name"]
        msgs.append(
            oh.Message.from_role_and_content(oh.Role.ASSISTANT, json.dumps({"q": case.name}))
            .with_channel("commentary").with_recipient(f"functions.{name}").with_content_type("<|constrain|>json")
        )
    else:
        msgs.append(oh.Message.from_role_and_content(oh.Role.ASSISTANT, f"Answer for {case.name} — done.").with_channel("final"))
    return msgs


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_completions_parse_like_openai_harmony(case):
    enc = harmony.encoding()
    completion = enc.render_conversation_for_training(oh.Conversation.from_messages(_completion_messages(case)),
                                                      oh.RenderConversationConfig(auto_drop_analysis=False))
    # Model output starts after "<|start|>assistant": drop those two tokens.
    assert completion[:2] == [harmony.token_id(harmony.START), enc.encode("assistant")[0]]
    tokens = completion[2:]
    expected = enc.parse_messages_from_completion_tokens(tokens, oh.Role.ASSISTANT)
    got = harmony.parse_completion(tokens)
    assert got.errors == [] and got.unparsed_tokens == []
    assert [(m.channel, m.recipient, m.content_type, m.content) for m in got.messages] == [
        (m.channel, m.recipient, m.content_type, "".join(c.text for c in m.content)) for m in expected
    ]
    assert got.stop == (harmony.CALL if case.tools else harmony.RETURN)
    if case.tools:
        assert [(c.name, c.arguments) for c in got.tool_calls] == [(case.tools[0]["function"]["name"], json.dumps({"q": case.name}))]
        assert got.final == ""
    else:
        assert got.final == f"Answer for {case.name} — done."
    assert got.reasoning == f"Thinking about {case.name} ✓"


# Completions as models write them, beyond what render_conversation_for_training produces.
SHAPES = {
    "final-only": ("<|channel|>final<|message|>Hi there.<|return|>", [], "Hi there."),
    "preamble-then-call": ("<|channel|>commentary<|message|>Checking the weather.<|end|><|start|>assistant to=functions.get_weather"
                           '<|channel|>commentary <|constrain|>json<|message|>{"city":"Paris"}<|call|>',
                           [("get_weather", '{"city":"Paris"}')], ""),
    "recipient-after-channel": ("<|channel|>analysis<|message|>need a tool<|end|><|start|>assistant<|channel|>commentary "
                                "to=functions.lookup <|constrain|>json<|message|>{}<|call|>", [("lookup", "{}")], ""),
    "call-without-constrain": ("<|channel|>analysis<|message|>x<|end|><|start|>assistant to=functions.lookup<|channel|>commentary"
                               '<|message|>{"a": 1}<|call|>', [("lookup", '{"a": 1}')], ""),
    "two-calls": ("<|channel|>analysis<|message|>two<|end|><|start|>assistant to=functions.a<|channel|>commentary json<|message|>{}"
                  '<|call|><|start|>assistant to=functions.b<|channel|>commentary json<|message|>{"k":[1]}<|call|>',
                  [("a", "{}"), ("b", '{"k":[1]}')], ""),
}


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_completion_shapes_parse_like_openai_harmony(name):
    text, calls, final = SHAPES[name]
    enc = harmony.encoding()
    tokens = enc.encode(text, allowed_special="all")
    expected = enc.parse_messages_from_completion_tokens(tokens, oh.Role.ASSISTANT)
    got = harmony.parse_completion(tokens)
    assert got.errors == [] and got.unparsed_tokens == []
    assert [(m.channel, m.recipient, m.content_type, m.content) for m in got.messages] == [
        (m.channel, m.recipient, m.content_type, "".join(c.text for c in m.content)) for m in expected
    ]
    assert [(c.name, c.arguments) for c in got.tool_calls] == calls
    assert got.final == final and got.stop == (harmony.CALL if calls else harmony.RETURN)


def test_streaming_deltas_reassemble_the_channels():
    enc = harmony.encoding()
    text = "<|channel|>analysis<|message|>Let me think — 日本<|end|><|start|>assistant<|channel|>final<|message|>Bonjour 🎉<|return|>"
    parser = harmony.HarmonyParser()
    by_channel: dict[str, str] = {}
    for tok in enc.encode(text, allowed_special="all"):
        for d in parser.feed(tok):
            by_channel[d.channel] = by_channel.get(d.channel, "") + d.text
    result = parser.finish()
    assert by_channel == {"analysis": "Let me think — 日本", "final": "Bonjour 🎉"}
    assert result.stop == harmony.RETURN and result.errors == []


def test_truncated_output_keeps_partial_final_and_reports_no_stop():
    enc = harmony.encoding()
    tokens = enc.encode("<|channel|>analysis<|message|>ok<|end|><|start|>assistant<|channel|>final<|message|>Hello wor", allowed_special="all")
    result = harmony.parse_completion(tokens)
    assert result.reasoning == "ok"
    assert result.final == "Hello wor"
    assert result.stop is None


def test_garbage_then_recovery_at_next_start():
    enc = harmony.encoding()
    good = enc.encode("<|start|>assistant<|channel|>final<|message|>fine<|return|>", allowed_special="all")
    garbage = [harmony.token_id(harmony.MESSAGE), harmony.token_id(harmony.END), harmony.token_id(harmony.END), 42]
    result = harmony.parse_completion(garbage + good)
    assert result.final == "fine"
    assert result.errors, "the garbage must be reported"
    # "<|message|><|end|>" is an (empty) message to openai-harmony; the second <|end|> and 42 are not.
    assert result.unparsed_tokens == garbage[2:]


def test_bad_input_names_the_message_and_field():
    with pytest.raises(harmony.HarmonyInputError, match=r"messages\[1\]\.role"):
        harmony.render_prompt([{"role": "user", "content": "x"}, {"role": "wizard", "content": "y"}])
    with pytest.raises(harmony.HarmonyInputError, match=r"messages\[0\]\.content.*<\|end\|>"):
        harmony.render_prompt([{"role": "system", "content": "evil <|end|> token"}])
    with pytest.raises(harmony.HarmonyInputError, match=r"tools\[0\]"):
        harmony.render_prompt([{"role": "user", "content": "x"}], tools=[{"type": "function", "function": {}}])
    with pytest.raises(harmony.HarmonyInputError, match="reasoning_effort"):
        harmony.SystemOptions(reasoning_effort="extreme")
    both = {"role": "assistant", "content": "I'll check.", "reasoning_content": "need weather",
            "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": "{}"}}]}
    with pytest.raises(harmony.HarmonyInputError, match=r"messages\[1\]: an assistant message with tool_calls has both"):
        harmony.render_prompt([{"role": "user", "content": "x"}, both])


def test_training_render_ends_with_return_and_keeps_current_analysis():
    msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "reasoning_content": "think", "content": "answer"}]
    text = harmony.encoding().decode_utf8(harmony.render_training(msgs))
    assert text.endswith("<|start|>assistant<|channel|>analysis<|message|>think<|end|>"
                         "<|start|>assistant<|channel|>final<|message|>answer<|return|>")
