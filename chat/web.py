"""`gptoss ui`: a chat page (Gradio) in front of an OpenAI-compatible server.

The page streams answers, shows each answer's analysis in a collapsible "Thinking" block (Gradio's
ChatMessage metadata), has the sampling controls, exports and imports the conversation as the same
JSON as `gptoss chat`'s /save (chat.conversation), and shows live statistics. The conversation and
the settings live in the browser's session; the server's address and key stay in this process:
the page never receives the key.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from gptoss.chat import conversation
from gptoss.chat.client import REASONING_EFFORTS, ChatError, Connection, ContextFull, Reply, Settings, describe_call
from gptoss.chat.local import Backend, LocalServer

THINKING = "Thinking"
CSS = """
#stats { min-height: 3em; font-variant-numeric: tabular-nums; }
footer { display: none !important; }
"""


def to_chatbot(messages: list[dict], *, live: Reply | None = None, thinking_done: bool = True) -> list[dict]:
    """OpenAI messages -> Gradio chatbot messages: the analysis as a collapsible block before its answer."""
    out: list[dict] = []

    def assistant(reasoning: str, content: str, calls: list[dict], done: bool, duration: float | None = None) -> None:
        if reasoning:
            meta: dict[str, Any] = {"title": THINKING, "status": "done" if done else "pending"}
            if duration is not None:
                meta["duration"] = round(duration, 2)
            out.append({"role": "assistant", "content": reasoning, "metadata": meta})
        for call in calls:
            out.append({"role": "assistant", "content": describe_call(call), "metadata": {"title": "Tool call"}})
        if content:
            out.append({"role": "assistant", "content": content})

    for m in messages:
        role, content = m.get("role"), m.get("content")
        text = content if isinstance(content, str) else "" if content is None else str(content)
        if role == "user":
            out.append({"role": "user", "content": text})
        elif role == "assistant":
            assistant(m.get("reasoning_content") or "", text, m.get("tool_calls") or [], True)
        elif role == "tool":
            out.append({"role": "assistant", "content": text, "metadata": {"title": "Tool result"}})
    if live is not None:
        done = bool(live.content or live.tool_calls) or thinking_done
        assistant(live.reasoning, live.content, live.tool_calls, done)
    return out


def stats_markdown(reply: Reply | None, *, generating: bool = False) -> str:
    if reply is None:
        return ""
    if generating:
        now = time.monotonic()
        if reply.first is None:
            return f"waiting for the first token… {now - reply.sent:.1f} s"
        rate = (reply.deltas - 1) / (now - reply.first) if reply.deltas > 1 and now > reply.first else None
        return (f"**generating** · {reply.deltas} pieces" + (f" · {rate:.1f} /s" if rate else "")
                + f" · time to first token {reply.ttft:.2f} s")
    return reply.stats_line()


def build(conn: Connection, *, defaults: Settings, title: str = "gptoss chat"):
    """The gr.Blocks app (not launched)."""
    import gradio as gr

    exports = Path(tempfile.mkdtemp(prefix="gptoss-ui-"))
    gptoss_serve = isinstance(conn.health, dict) and "backend" in conn.health  # its API has no top_k
    where = urlsplit(conn.url)
    shown_url = f"{where.scheme}://{where.hostname}{':' + str(where.port) if where.port else ''}{where.path}"

    def export_file(system: str | None, messages: list[dict]) -> str | None:
        """The conversation as a file for the Export button (one folder per content: rewriting it is a no-op)."""
        if not messages:
            return None
        messages = conversation.with_system(system or None, messages)
        folder = exports / hashlib.sha256(conversation.dumps(messages).encode()).hexdigest()[:16]
        if folder.is_dir():
            return str(next(folder.glob("*.json")))
        folder.mkdir()
        return str(conversation.save(folder / time.strftime("chat-%Y%m%d-%H%M%S.json"), messages))

    def settings_from(reasoning, temperature, top_p, top_k, max_tokens, system) -> Settings:
        try:
            return Settings(reasoning=reasoning, temperature=float(temperature), top_p=float(top_p),
                            top_k=int(top_k) if top_k else None, max_tokens=int(max_tokens) if max_tokens else None,
                            system=system or None)
        except (ChatError, ValueError, TypeError) as e:
            raise gr.Error(str(e))

    def respond(text, history, reasoning, temperature, top_p, top_k, max_tokens, system):
        """One turn, streamed: (message box, chatbot, history, stats, export, prompt accordion, prompt)."""
        text = (text or "").strip()
        no_change = gr.update()
        if not text:
            yield no_change, no_change, no_change, no_change, no_change, no_change, no_change
            return
        settings = settings_from(reasoning, temperature, top_p, top_k, max_tokens, system)
        asked = history + [{"role": "user", "content": text}]
        live = Reply(sent=time.monotonic())
        yield "", to_chatbot(asked), history, stats_markdown(live, generating=True), no_change, no_change, no_change
        try:
            for kind, value in conn.stream(asked, settings, notice=lambda s: gr.Info(s)):
                if kind == "done":
                    live = value
                    break
                if kind == "reasoning":
                    live.reasoning += value
                elif kind == "content":
                    live.content += value
                elif kind == "tool_call":
                    live.tool_calls = value
                live.deltas += 1
                live.first = live.first or time.monotonic()
                yield (no_change, to_chatbot(asked, live=live, thinking_done=False), no_change,
                       stats_markdown(live, generating=True), no_change, no_change, no_change)
        except ContextFull as e:
            gr.Warning(f"{e}. Start a new chat (Export first to keep this one).")
            yield text, to_chatbot(history), history, "", no_change, no_change, no_change
            return
        except ChatError as e:
            gr.Warning(str(e))
            yield text, to_chatbot(history), history, "", no_change, no_change, no_change
            return
        history = asked + [live.message()]
        prompt_shown = gr.update(visible=live.server_prompt is not None)
        yield (no_change, to_chatbot(history), history, stats_markdown(live), export_file(system, history),
               prompt_shown, live.server_prompt or "")

    def clear():
        return [], [], "", None, gr.update(visible=False), ""

    def load(path, system):
        try:
            loaded = conversation.parse(Path(path).read_text(encoding="utf-8"), source=Path(path).name)
        except (ChatError, UnicodeDecodeError) as e:
            raise gr.Error(str(e))
        file_system, messages = conversation.split_system(loaded)
        gr.Info(f"imported {len(loaded)} messages")
        return to_chatbot(messages), messages, file_system or "", export_file(file_system, messages)

    with gr.Blocks(title=title, analytics_enabled=False, fill_height=True) as app:
        history = gr.State([])
        with gr.Row(equal_height=False):
            with gr.Column(scale=3):
                gr.Markdown(f"### {title} · `{conn.model_id()}` at {shown_url}")
                chatbot = gr.Chatbot(elem_id="conversation", label="conversation", show_label=False, height=560,
                                     buttons=["copy"], layout="bubble", feedback_options=None,
                                     placeholder="Ask something; the model's analysis appears in a Thinking block.")
                box = gr.Textbox(elem_id="message", placeholder="Message (Enter sends, Shift+Enter is a new line)",
                                 show_label=False, lines=1, max_lines=8, submit_btn="Send", stop_btn="Stop", autofocus=True)
                with gr.Accordion("Prompt the server rendered for the last answer (gptoss serve --debug)", open=False,
                                  visible=False, elem_id="server-prompt") as prompt_box:
                    prompt = gr.Textbox(show_label=False, lines=8, max_lines=30, interactive=False, elem_id="server-prompt-text")
            with gr.Column(scale=1, min_width=280):
                reasoning = gr.Radio(list(REASONING_EFFORTS), value=defaults.reasoning, label="Reasoning effort",
                                     elem_id="reasoning")
                temperature = gr.Slider(0, 2, value=defaults.temperature, step=0.05, label="Temperature", elem_id="temperature")
                top_p = gr.Slider(0.05, 1, value=defaults.top_p, step=0.05, label="top_p", elem_id="top-p")
                top_k = gr.Number(value=defaults.top_k or 0, precision=0, minimum=0, label="top_k (0: off)",
                                  elem_id="top-k", visible=not gptoss_serve)
                max_tokens = gr.Number(value=defaults.max_tokens or 0, precision=0, minimum=0,
                                       label="Max tokens (0: what the context leaves)", elem_id="max-tokens")
                system = gr.Textbox(value=defaults.system or "", label="System prompt", lines=3, elem_id="system")
                stats = gr.Markdown(elem_id="stats")
                with gr.Row():
                    export = gr.DownloadButton("Export", elem_id="export", size="sm", min_width=60)
                    upload = gr.UploadButton("Import", file_types=[".json"], elem_id="import", size="sm", min_width=60)
                    new = gr.Button("New chat", elem_id="new-chat", size="sm", min_width=60)

        inputs = [box, history, reasoning, temperature, top_p, top_k, max_tokens, system]
        outputs = [box, chatbot, history, stats, export, prompt_box, prompt]
        turn = box.submit(respond, inputs, outputs)
        box.stop(None, None, None, cancels=[turn])
        new.click(clear, None, [chatbot, history, stats, export, prompt_box, prompt])
        upload.upload(load, [upload, system], [chatbot, history, system, export])
        system.change(export_file, [system, history], [export])  # Export has the system prompt as it is now
    return app


def ui(
    *,
    url: str | None = None,
    api_key: str | None = None,
    model: str | None = None,
    backend: Backend = "auto",
    quant: str | None = None,
    device: str = "cpu",
    host: str = "127.0.0.1",
    port: int = 7860,
    reasoning: Literal["low", "medium", "high"] = "medium",
    wait: int = 900,
) -> None:
    """Serve a chat web page for a model served by gptoss serve (or any OpenAI-compatible server).

    Streaming answers with a collapsible thinking block, reasoning effort, temperature, top_p, max tokens,
    system prompt, export and import of the conversation (the JSON of gptoss chat's /save), live statistics.

    Args:
        url: the server's OpenAI API (default $GPTOSS_URL or http://127.0.0.1:8000/v1).
        api_key: the server's key when it asks for one (default $GPTOSS_API_KEY); kept here, never sent to the page.
        model: instead of --url, start gptoss serve on this GGUF, exports/<run> or models/<run> while the page runs.
        backend: with --model: auto (llamacpp for a GGUF or an export folder, transformers otherwise), llamacpp or transformers.
        quant: with --model exports/<run>: which GGUF of its manifest, e.g. q4_k_m.
        device: with --model: cpu or cuda:N.
        host: address the page listens on (0.0.0.0 in a container).
        port: port the page listens on.
        reasoning: the reasoning effort the page starts with.
        wait: seconds to wait for a server that is still loading its model.
    """
    from rich.console import Console

    from gptoss.chat.terminal import connect

    problems = []
    if url and model:
        problems.append("give --url (a running server) or --model (start one), not both")
    if not isinstance(port, int) or isinstance(port, bool) or not 0 <= port <= 65535:
        problems.append(f"--port must be 0..65535, got {port!r}")
    if not isinstance(wait, int) or isinstance(wait, bool) or wait < 1:
        problems.append(f"--wait must be a positive number of seconds, got {wait!r}")
    try:
        defaults = Settings(reasoning=reasoning)
    except ChatError as e:
        problems.append(str(e))
    if problems:
        raise ChatError("; ".join(problems))
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home (and none possible offline)
    console = Console(stderr=True, highlight=False)
    local = LocalServer(model, backend=backend, quant=quant, device=device) if model else None
    try:
        conn = connect(url=url, api_key=api_key, local=local, wait=wait, console=console)
        import gradio as gr

        app = build(conn, defaults=defaults)
        theme = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],  # no web fonts: works offline
                                  font_mono=["ui-monospace", "monospace"])
        app.queue(default_concurrency_limit=8).launch(server_name=host, server_port=port, theme=theme, css=CSS,
                                                      footer_links=[], ssr_mode=False, show_error=True, quiet=False)
    except KeyboardInterrupt:
        raise SystemExit(130) from None
    finally:
        if local:
            local.stop()
