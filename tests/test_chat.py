"""`gptoss chat` and `gptoss ui` against live `gptoss serve` servers on CPU.

The server is the llama.cpp backend on the tiny fixture taught Harmony answers (tests/serve_support.py:
"Say hello." gets a fixed analysis and answer at temperature 0, the weather question a tool call),
started with --debug so every answer carries the prompt the server rendered. The terminal chat runs
on a real pseudo-terminal and is read as a screen (tests/chat_support.py); the web page runs in a
real headless Chromium driven by Playwright. Nothing is faked.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import expect, sync_playwright

from conftest import missing_tool

import serve_support as sup
from chat_support import REPO, Terminal, chat_env

MODEL = "tiny-harmony"
GREETING = sup.GREETING[0]["content"]
GREETED = {"role": "assistant", "content": sup.GREETING_ANSWER, "reasoning_content": sup.GREETING_REASONING}


@pytest.fixture(scope="module")
def server(harmony_models, tmp_path_factory):
    server = sup.LiveServer("--backend", "llamacpp", "--model", str(harmony_models["gguf"]), "--ctx", "1024",
                            "--parallel", "2", "--debug", "--model-name", MODEL,
                            log_path=tmp_path_factory.mktemp("logs") / "chat-serve.log")
    yield server
    server.close()


@pytest.fixture
def term(server, tmp_path):
    """An interactive `gptoss chat` on a pty, greedy, against the server; cwd is tmp_path."""
    opened = []

    def start(*extra: str) -> Terminal:
        t = Terminal("chat", "--url", server.url + "/v1", "--temperature", "0", *extra,
                     env=chat_env(tmp_path / "home"), cwd=tmp_path)
        opened.append(t)
        t.wait_for(rf"gptoss chat · {MODEL} at {re.escape(server.url)}/v1")
        return t

    (tmp_path / "home").mkdir()
    yield start
    for t in opened:
        t.close()


def after_last(t: Terminal, line: str) -> str:
    """The screen after the last ``line``, its wrapped lines joined (rich wraps at spaces)."""
    text = t.text()
    return " ".join(text[text.rindex(line) + len(line):].split())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _closed_port_url() -> str:
    return f"http://127.0.0.1:{_free_port()}/v1"  # nothing listens there once the probe socket is closed


# ------------------------------------------------------------------------------------------------
# The terminal


def test_a_streamed_answer_with_its_thinking_and_stats(term):
    t = term()
    t.type_line(GREETING)
    t.at_prompt()  # the answer is complete: the streamed view was replaced by the final render
    t.wait_for(re.escape(sup.GREETING_ANSWER))
    screen = t.text()
    # the final render: the analysis in a "thinking" panel above the answer
    assert re.search(r"╭─ thinking ─+╮\n│ " + re.escape(sup.GREETING_REASONING), screen), screen
    assert screen.index(sup.GREETING_REASONING) < screen.index(sup.GREETING_ANSWER)
    # streamed: the view was redrawn while the answer came in, before the final render
    assert t.plain_output().count(sup.GREETING_REASONING[:8]) >= 3, "fewer than two frames while streaming"
    t.type_line("/stats")
    m = t.wait_for(r"last answer: (\d+) tokens · (\d+\.\d) tokens/s generation · time to first token (\d+\.\d\d) s")
    tokens, rate, ttft = int(m[1]), float(m[2]), float(m[3])
    assert tokens == len(sup.harmony.render_training(sup.GREETING + [GREETED])) - len(sup.harmony.render_prompt(sup.GREETING))
    assert rate > 0 and ttft > 0
    t.wait_for(r"this chat: 1 answer, \d+ tokens")
    t.type_line("/think off")
    t.wait_for("thinking hidden")
    t.type_line(GREETING)
    t.at_prompt()  # the answer is complete
    t.wait_for(re.escape(sup.GREETING_ANSWER))
    last_turn = t.text()[t.text().rindex("> " + GREETING):]
    assert sup.GREETING_REASONING not in last_turn and "thinking" not in last_turn
    t.type_line("/exit")
    assert t.exit_code() == 0


def test_reasoning_effort_reaches_the_rendered_prompt(term, tmp_path):
    t = term()
    t.type_line(GREETING)
    t.at_prompt()  # the answer is complete
    t.wait_for(re.escape(sup.GREETING_ANSWER))
    t.type_line("/prompt")
    t.wait_for(r"^Reasoning: medium$")
    t.type_line("/reasoning high")
    t.wait_for("^reasoning high$")
    t.type_line(GREETING)
    t.at_prompt()  # the answer is complete
    t.wait_for(re.escape(sup.GREETING_ANSWER))
    t.type_line("/prompt")
    t.wait_for(r"^<\|start\|>system<\|message\|>")
    t.wait_for(r"^Reasoning: high$")
    t.wait_for(r"<\|start\|>assistant$")
    assert after_last(t, "> /prompt").count("<|start|>user<|message|>Say hello.<|end|>") == 2
    t.type_line("/reasoning extreme")
    t.wait_for(r"error: /reasoning extreme: say low, medium or high")
    # line editing and history: Up brings back the last line, Ctrl-U clears it
    t.at_prompt()
    t.child.send("\x1b[A")
    t.wait_for(r"^> /reasoning extreme$")
    t.child.send("\x15")
    t.child.sendeof()
    assert t.exit_code() == 0
    history = (tmp_path / "home" / ".local" / "state" / "gptoss" / "chat_history").read_text()
    assert [line[1:] for line in history.splitlines() if line.startswith("+")][-2:] == ["/prompt", "/reasoning extreme"]


def test_save_then_load_continues_the_conversation(term, tmp_path):
    t = term()
    t.type_line(GREETING)
    t.at_prompt()  # the answer is complete
    t.wait_for(re.escape(sup.GREETING_ANSWER))
    t.type_line("/settings system You are terse.")  # after the answer: the model was taught without one
    t.type_line("/save saved.json")
    t.wait_for("saved 3 messages to saved.json")
    saved = json.loads((tmp_path / "saved.json").read_text())
    assert saved == [{"role": "system", "content": "You are terse."}, sup.GREETING[0], GREETED]
    t.type_line("/clear")
    t.wait_for("new conversation")
    t.type_line("/settings system none")
    t.wait_for(r"system\s+none")
    t.type_line("/load saved.json")
    t.wait_for("loaded 3 messages from saved.json")
    t.type_line("/settings")
    t.wait_for(r"system\s+You are terse\.")
    t.type_line("Say hello again.")
    t.type_line("/prompt")  # once the answer is in
    t.wait_for(r"<\|start\|>assistant$")  # the prompt's last line
    # the loaded turns and the system prompt reached the server, before the new question
    shown = after_last(t, "> /prompt")
    assert re.search(r"You are terse\..*<\|start\|>user<\|message\|>Say hello\.<\|end\|>"
                     r"<\|start\|>assistant<\|channel\|>final<\|message\|>" + re.escape(sup.GREETING_ANSWER)
                     + r"<\|end\|><\|start\|>user<\|message\|>Say hello again\.<\|end\|>", shown), shown
    (tmp_path / "broken.json").write_text('[{"role": "user", "content": "hi"}, {"role": "robot"}]')
    t.type_line("/load broken.json")
    t.wait_for(r"error: broken\.json: message 1: role 'robot' is not one of")
    t.type_line("/exit")
    assert t.exit_code() == 0


def test_a_full_context_says_so_and_offers_clear(term, tmp_path):
    t = term()
    long_line = "word " * 1200  # over the server's --ctx 1024
    t.type_line(long_line.strip())
    t.at_prompt()
    t.wait_for(r"error: the conversation no longer fits the server's context: the prompt has \d+ tokens but the context is "
               r"1024 tokens")
    t.wait_for(r"/clear starts a new conversation")
    t.type_line("/save after.json")  # the refused question was dropped: nothing to keep but the file
    t.wait_for("saved 0 messages")
    assert json.loads((tmp_path / "after.json").read_text()) == []
    t.type_line(GREETING)  # and the chat goes on
    t.at_prompt()
    t.wait_for(re.escape(sup.GREETING_ANSWER))
    t.type_line("/exit")
    assert t.exit_code() == 0


def test_tool_calls_are_shown_and_their_results_typed_in(term, tmp_path):
    (tmp_path / "tools.json").write_text(json.dumps([sup.WEATHER_TOOL]))
    t = term("--tools", "tools.json")
    t.type_line(sup.WEATHER_QUESTION[0]["content"])
    t.at_prompt("result of get_weather> ")
    t.wait_for(r"╭─ tool call ─+╮\n│ get_weather\(\{\"city\": \"Paris\"\}\)")
    t.wait_for(r"type the result of get_weather")
    t.type_line(sup.WEATHER_RESULT, label="result of get_weather> ")
    t.at_prompt()
    t.wait_for(re.escape(sup.WEATHER_ANSWER))
    t.type_line("/save weather.json")
    t.wait_for("saved 4 messages")
    saved = json.loads((tmp_path / "weather.json").read_text())
    assert [m["role"] for m in saved] == ["user", "assistant", "tool", "assistant"]
    call = saved[1]["tool_calls"][0]
    assert call["function"] == {"name": "get_weather", "arguments": sup.WEATHER_ARGUMENTS}
    assert saved[2] == {"role": "tool", "tool_call_id": call["id"], "content": sup.WEATHER_RESULT}
    assert saved[3]["content"] == sup.WEATHER_ANSWER
    t.type_line("/exit")
    assert t.exit_code() == 0


def test_an_unreachable_server_is_one_line_and_exit_2(tmp_path):
    url = _closed_port_url()
    t = Terminal("chat", "--url", url, env=chat_env(tmp_path), cwd=tmp_path)
    try:
        code = t.exit_code()
    finally:
        t.close()
    written = t.plain_output().strip()
    assert code == 2
    assert "\n" not in written, written  # one line (the terminal may wrap it)
    assert written.startswith(f"gptoss: error: cannot reach the server at {url} (Connection refused); start one"), written


def _run_chat(*args: str, cwd: Path, input: str | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """`gptoss chat` in a pipe (no terminal), as a script would run it."""
    env = chat_env(cwd)
    env.pop("TERM")
    return subprocess.run([sys.executable, "-m", "gptoss", "chat", *args], capture_output=True, text=True, env=env,
                          cwd=cwd, input=input, timeout=timeout)


def test_one_shot_prints_the_answer_only(server, tmp_path):
    url = server.url + "/v1"
    plain = _run_chat(GREETING, "--url", url, "--temperature", "0", cwd=tmp_path)
    assert plain.returncode == 0, plain.stderr
    assert plain.stdout == sup.GREETING_ANSWER + "\n" and plain.stderr == ""
    thinking = _run_chat(GREETING, "--url", url, "--temperature", "0", "--show-thinking", cwd=tmp_path)
    assert thinking.stdout == sup.GREETING_ANSWER + "\n" and thinking.stderr.strip() == sup.GREETING_REASONING
    as_json = _run_chat("--url", url, "--temperature", "0", "--json", cwd=tmp_path, input=GREETING + "\n")  # from stdin
    assert json.loads(as_json.stdout) == GREETED
    bad = _run_chat(GREETING, "--url", url, "--temperature", "3", "--top-p", "0", cwd=tmp_path)
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr.startswith("gptoss: error: temperature must be a number from 0 to 2, got 3; top_p must be")


def test_model_starts_a_local_server_and_stops_it(harmony_models, tmp_path):
    proc = _run_chat(GREETING, "--model", str(harmony_models["gguf"]), "--temperature", "0", cwd=tmp_path)
    out, err = proc.stdout, proc.stderr
    assert proc.returncode == 0, err
    assert out == sup.GREETING_ANSWER + "\n"
    m = re.search(r"starting gptoss serve --backend llamacpp on 127\.0\.0\.1:(\d+) \(log: (\S+)\)", err)
    assert m, err
    with pytest.raises(httpx.ConnectError):  # stopped with the chat
        httpx.get(f"http://127.0.0.1:{m[1]}/health", timeout=5)
    assert not Path(m[2]).exists()  # a clean stop leaves no log behind
    missing = _run_chat(GREETING, "--model", str(tmp_path / "nope.gguf"), cwd=tmp_path)
    assert missing.returncode == 2 and "--model" in missing.stderr and "does not exist" in missing.stderr
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\x00" * 64)  # a GGUF header with nothing behind it
    failed = _run_chat(GREETING, "--model", str(broken), cwd=tmp_path)
    assert failed.returncode == 2 and failed.stdout == ""
    m = re.search(r"gptoss: error: the local server exited with \d+ before it was ready; its log (\S+) ends:", failed.stderr)
    assert m and Path(m[1]).is_file(), failed.stderr  # kept: it says why
    Path(m[1]).unlink()
    assert f"(command: {sys.executable} -m gptoss serve --backend llamacpp --model {broken}" in failed.stderr


@pytest.fixture(scope="module")
def one_slot_server(tiny_model, tmp_path_factory):
    """One slot, no queue: the untrained tiny GGUF, which generates until max_tokens."""
    gguf = tmp_path_factory.mktemp("random-gguf") / "tiny-random-f16.gguf"
    sup.convert_to_gguf(tiny_model, gguf)
    server = sup.LiveServer("--backend", "llamacpp", "--model", str(gguf), "--ctx", "4096", "--parallel", "1",
                            "--queue", "0", "--model-name", "random", log_path=tmp_path_factory.mktemp("logs") / "one-slot.log")
    yield server
    server.close()


def test_a_busy_server_is_retried_after_retry_after(one_slot_server, tmp_path):
    import openai

    url = one_slot_server.url
    blocker = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0).chat.completions.create(
        model="random", messages=[{"role": "user", "content": "Go on."}], max_tokens=3000, stream=True)
    chat = None
    try:
        next(iter(blocker))  # the one slot is generating now, and nothing may wait
        chat = subprocess.Popen([sys.executable, "-m", "gptoss", "chat", "hi", "--url", url + "/v1", "--max-tokens", "3",
                                 "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=chat_env(tmp_path), cwd=tmp_path)
        line = chat.stderr.readline()  # returns when the chat says it waits
        assert re.match(r"the server is busy: .* - retrying in 1 s$", line.strip()), line + chat.communicate(timeout=60)[1]
        blocker.close()  # the server cancels that generation: the slot is free for the retry
        out, err = chat.communicate(timeout=120)
        assert chat.returncode == 0, err
        assert json.loads(out)["role"] == "assistant"
    finally:
        blocker.close()
        if chat is not None and chat.poll() is None:
            chat.kill()
            chat.wait()


# ------------------------------------------------------------------------------------------------
# The web page


CHROMIUM = "/usr/bin/chromium"
SECRET = "sk-test-never-in-the-page-4f9a"


@pytest.fixture(scope="module")
def page_url(server, tmp_path_factory):
    """`gptoss ui` as a user starts it, with a key the page must never see."""
    port = _free_port()
    log_path = tmp_path_factory.mktemp("logs") / "ui.log"
    env = chat_env(tmp_path_factory.mktemp("ui-home"))
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "gptoss", "ui", "--url", server.url + "/v1", "--port", str(port),
                                 "--api-key", SECRET], stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 180
    while True:
        if proc.poll() is not None:
            raise AssertionError(f"gptoss ui exited with {proc.returncode}:\n{log_path.read_text()}")
        try:
            if httpx.get(url, timeout=5).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, f"gptoss ui not up after 180 s:\n{log_path.read_text()}"
        time.sleep(0.2)  # polling a child process's port, not synchronising the test
    yield url
    proc.terminate()
    proc.wait(30)


@pytest.fixture
def browser_page(page_url, tmp_path):
    if not Path(CHROMIUM).exists():
        missing_tool("Debian's chromium is needed for the web page tests (apt-get install chromium; tests/run.sh does)")

    with sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"), executable_path=CHROMIUM, headless=True, accept_downloads=True,
            viewport={"width": 1280, "height": 860},
            args=["--headless", "--no-sandbox", "--disable-background-networking", "--disable-component-update",
                  "--disable-sync", "--no-first-run"])
        page = context.new_page()
        page.set_default_timeout(60_000)
        page.goto(page_url)
        greedy = page.locator("#temperature input[type=number]")
        greedy.fill("0")
        greedy.press("Enter")
        yield page
        context.close()


def _send(page, text: str, answers_before: int) -> None:
    """Type a message, press Enter, wait until the answer is complete (the statistics say so)."""
    box = page.locator("#message textarea")
    box.fill(text)
    box.press("Enter")
    page.wait_for_function(
        "n => document.querySelectorAll('#conversation [data-testid=user]').length === n + 1"
        " && !document.querySelector('#stats').innerText.includes('generating')"
        " && document.querySelector('#stats').innerText.includes('tokens/s')", arg=answers_before)


WATCH_FRAMES = """() => { window.frames_seen = []; const el = document.querySelector('#conversation');
  new MutationObserver(() => { const s = [...el.querySelectorAll('[data-testid=bot]')].map(e => e.innerText).join('|');
    if (window.frames_seen[window.frames_seen.length - 1] !== s) window.frames_seen.push(s); })
  .observe(el, {subtree: true, childList: true, characterData: true}); }"""


def test_the_page_streams_shows_thinking_and_sends_the_effort(browser_page, page_url, tmp_path):
    page = browser_page
    page.evaluate(WATCH_FRAMES)
    _send(page, GREETING, 0)
    bot = page.locator("#conversation [data-testid=bot]")
    assert sup.GREETING_ANSWER in bot.last.inner_text()
    frames = page.evaluate("window.frames_seen")
    # streamed: the reasoning and then the answer grew piece by piece on the page
    growing = [f for f in frames if sup.GREETING_ANSWER not in f and sup.GREETING_REASONING[:8] in f]
    assert len(growing) >= 3, frames
    # a collapsible thinking block: closed once the answer came, the analysis inside when opened
    thinking = page.locator("#conversation .thought-group").last
    expect(thinking).not_to_contain_text(sup.GREETING_REASONING)  # closes once the answer starts
    thinking.get_by_text("Thinking").click()
    expect(thinking).to_contain_text(sup.GREETING_REASONING)
    assert re.search(r"\d+ tokens · \d+\.\d tokens/s generation · time to first token \d\.\d\d s",
                     page.locator("#stats").inner_text())
    # the server's rendered prompt (--debug) shows the effort the page sent
    page.get_by_text("Prompt the server rendered").click()
    prompt = page.locator("#server-prompt-text textarea")
    assert "Reasoning: medium" in prompt.input_value()
    page.locator("#reasoning").get_by_label("high").check()
    _send(page, GREETING, 1)
    assert "Reasoning: high" in prompt.input_value()
    assert prompt.input_value().count("<|start|>user<|message|>Say hello.<|end|>") == 2
    # the key stays in the ui process
    assert SECRET not in page.content()
    assert SECRET not in httpx.get(page_url + "config", timeout=30).text
    expect(thinking).to_contain_text(sup.GREETING_REASONING)  # opened by the user, it stays open
    shot = tmp_path / "chat-ui.png"
    page.mouse.move(0, 0)  # no hover styles in the picture
    page.screenshot(path=str(shot), full_page=True, animations="disabled")
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if os.environ.get("GPTOSS_UPDATE_SCREENSHOTS") == "1":  # refresh the README's picture
        shutil.copy(shot, REPO / "docs" / "chat-ui.png")


def test_the_page_exports_and_imports_a_conversation(browser_page, tmp_path):
    page = browser_page
    _send(page, GREETING, 0)
    page.locator("#system textarea").fill("You are terse.")  # after the answer: the model was taught without one
    page.locator("#system textarea").blur()
    with page.expect_download() as download:
        page.locator("#export").click()
    exported = tmp_path / download.value.suggested_filename
    download.value.save_as(exported)
    assert exported.suffix == ".json"
    assert json.loads(exported.read_text()) == [{"role": "system", "content": "You are terse."}, sup.GREETING[0], GREETED]
    page.locator("#new-chat").click()
    page.wait_for_function("document.querySelectorAll('#conversation [data-testid=user]').length === 0")
    page.locator("#system textarea").fill("")
    with page.expect_file_chooser() as chooser:
        page.locator("#import").click()
    chooser.value.set_files(str(exported))
    page.wait_for_function("document.querySelectorAll('#conversation [data-testid=user]').length === 1")
    assert page.locator("#system textarea").input_value() == "You are terse."
    assert sup.GREETING_ANSWER in page.locator("#conversation [data-testid=bot]").last.inner_text()
    assert page.locator("#conversation .thought-group").count() == 1
    # the imported conversation is what the next request sends
    _send(page, "Say hello again.", 1)
    page.get_by_text("Prompt the server rendered").click()
    prompt = page.locator("#server-prompt-text textarea").input_value()
    assert "You are terse." in prompt and prompt.index("Say hello.") < prompt.index("Say hello again.")


def test_ctrl_c_stops_an_answer_and_frees_the_server(one_slot_server, tmp_path):
    """An answer that would run for minutes: Ctrl-C drops it, the server's only slot is free again, the chat goes on."""
    t = Terminal("chat", "--url", one_slot_server.url + "/v1", "--max-tokens", "3000", env=chat_env(tmp_path), cwd=tmp_path)
    try:
        t.type_line("Go on.")
        t.wait_for(r"waiting for the answer\.\.\. [1-9]\d* s \(Ctrl-C stops it\)", transient=True)
        assert httpx.get(one_slot_server.url + "/info", timeout=30).json()["running"] == 1
        t.child.sendintr()
        t.at_prompt()
        t.wait_for("^stopped; the answer was dropped$")
        deadline = time.monotonic() + 60
        while httpx.get(one_slot_server.url + "/info", timeout=30).json()["running"]:
            assert time.monotonic() < deadline, "the server still generates for the dropped answer"
            time.sleep(0.1)  # polling the server's state
        t.type_line("/stats")
        t.wait_for("no answer yet")
        t.type_line("/exit")
        assert t.exit_code() == 0
    finally:
        t.close()
