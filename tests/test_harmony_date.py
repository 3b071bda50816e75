"""`Current date:` in the system message: the server's clock by default, pinned by --current-date,
left out by --no-date; checked token for token against openai-harmony's SystemContent
with_conversation_start_date (the reference), and training's rendering left as it was."""

from __future__ import annotations

import datetime

import openai
import pytest

from gptoss import harmony
from gptoss.serving.backends import ServeError
from gptoss.serving.server import date_policy

import serve_support as sup
from test_serve import random_gguf  # noqa: F401  (fixture: the untrained tiny GGUF)

QUESTION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What day is it?"}]


def reference_tokens(date: str | None, effort: str = "medium") -> list[int]:
    """openai-harmony alone: system (identity, cutoff, date, reasoning) + developer + user, for completion."""
    import openai_harmony as oh

    system = oh.SystemContent.new().with_reasoning_effort(oh.ReasoningEffort(effort.capitalize()))
    if date:
        system = system.with_conversation_start_date(date)
    conv = oh.Conversation.from_messages([
        oh.Message.from_role_and_content(oh.Role.SYSTEM, system),
        oh.Message.from_role_and_content(oh.Role.DEVELOPER, oh.DeveloperContent.new().with_instructions("Be brief.")),
        oh.Message.from_role_and_content(oh.Role.USER, "What day is it?"),
    ])
    return harmony.encoding().render_conversation_for_completion(conv, oh.Role.ASSISTANT)


def test_a_dated_prompt_is_openai_harmonys_token_for_token():
    ours = harmony.render_prompt(QUESTION, options=harmony.SystemOptions(current_date="2026-12-02", reasoning_effort="high"))
    assert ours == reference_tokens("2026-12-02", "high")
    text = harmony.encoding().decode_utf8(ours)
    assert "\nKnowledge cutoff: 2024-06\nCurrent date: 2026-12-02\n\nReasoning: high\n" in text
    assert "Current date" not in harmony.render_prompt_text(QUESTION)  # the core adds a date only when given one


def test_date_flags_are_checked():
    assert date_policy(None, False, {}) is None  # the API's default: the server's clock
    assert date_policy("2025-08-05", False, {})() == "2025-08-05"
    assert date_policy(None, True, {"GPTOSS_CURRENT_DATE": "2025-08-05"})() is None
    assert date_policy(None, False, {"GPTOSS_CURRENT_DATE": "2025-08-05"})() == "2025-08-05"
    assert date_policy(None, False, {"GPTOSS_CURRENT_DATE": "none"})() is None
    assert date_policy("2025-01-02", False, {"GPTOSS_CURRENT_DATE": "none"})() == "2025-01-02"  # the flag wins
    assert date_policy(None, "true", {})() is None  # as compose/.env spell a switch
    with pytest.raises(ServeError, match=r"--current-date must be a date YYYY-MM-DD .* got '2025-02-30'"):
        date_policy("2025-02-30", False, {})
    with pytest.raises(ServeError, match=r"--current-date must be a date YYYY-MM-DD .* got 20250101"):
        date_policy(20250101, False, {})  # fire read it as a number
    with pytest.raises(ServeError, match=r"--current-date and --no-date contradict each other"):
        date_policy("2025-01-02", True, {})
    with pytest.raises(ServeError, match=r"\$GPTOSS_CURRENT_DATE must be a date YYYY-MM-DD .* got 'today'; \"none\" leaves"):
        date_policy(None, False, {"GPTOSS_CURRENT_DATE": "today"})


@pytest.mark.parametrize("mode", ["clock", "pinned", "none"])
def test_the_server_sends_the_date(mode, random_gguf, tmp_path):  # noqa: F811
    """What llama-server received (--debug) is openai-harmony's rendering with that date."""
    flags = {"clock": [], "pinned": ["--current-date", "2025-08-05"], "none": ["--no-date"]}[mode]
    server = sup.LiveServer("--backend", "llamacpp", "--model", str(random_gguf), "--ctx", "512", "--parallel", "1",
                            "--debug", "--model-name", "random", *flags, env={"GPTOSS_CURRENT_DATE": ""},
                            log_path=tmp_path / "serve.log")
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        before = datetime.date.today().isoformat()
        resp = client.chat.completions.create(model="random", messages=QUESTION, max_tokens=1)
        after = datetime.date.today().isoformat()
    finally:
        server.close()
    seen = resp.gptoss_debug["prompt"]
    if mode == "clock":  # the request may straddle midnight
        candidates = {before, after}
    else:
        candidates = {"2025-08-05"} if mode == "pinned" else {None}
    matches = [d for d in candidates if seen == harmony.encoding().decode_utf8(reference_tokens(d))]
    assert matches, seen
    assert resp.usage.prompt_tokens == len(reference_tokens(matches[0]))
    assert ("Current date:" in seen) == (mode != "none")


def test_training_renders_rows_without_a_date(tiny_model):
    """Training keeps its prompts: no row asks for a date, so none is rendered, by the chat template or the core."""
    from transformers import AutoTokenizer

    from gptoss.training import data

    row = [{"role": "user", "content": "Hi"}, {"role": "assistant", "thinking": "Greet.", "content": "Hello"}]
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model))
    assert tokenizer.chat_template  # the fixture carries gptoss/templates/harmony_chat_template.jinja
    with_template = data.render(row, tokenizer, reasoning_effort="medium")
    tokenizer.chat_template = None
    with_core = data.render(row, tokenizer, reasoning_effort="medium")
    assert with_template == with_core == harmony.render_training(row)
    assert "Current date" not in harmony.encoding().decode_utf8(with_core)
