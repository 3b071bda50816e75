"""`gptoss chat`: a one-shot question from the shell, or an interactive chat in the terminal.

Interactive: prompt_toolkit reads lines (editing, history in ~/.local/state/gptoss/chat_history,
completion of /commands); rich shows the answer as it streams (the analysis dim, above) and then
prints it once more as Markdown. Everything goes to the server through chat.client.
"""

from __future__ import annotations

import contextlib
import difflib
import json as jsonlib
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

from gptoss.chat import conversation
from gptoss.chat.client import (REASONING_EFFORTS, Cancelled, ChatError, Connection, ContextFull, Reply, Settings, Unreachable,
                         describe_call)
from gptoss.chat.local import Backend, LocalServer

HELP = [
    ("/help", "this list"),
    ("/clear", "start a new conversation (settings stay)"),
    ("/save [FILE]", "write the conversation as OpenAI messages JSON (default chat-DATE-TIME.json)"),
    ("/load FILE", "continue a saved conversation (a /save file or the web page's export)"),
    ("/stats", "tokens, tokens/s of generation alone and time to first token of the last answer"),
    ("/reasoning low|medium|high", "how much the model thinks before answering"),
    ("/think on|off", "show or hide the analysis (the model thinks either way)"),
    ("/settings [NAME VALUE]", "show or set temperature, top_p, max_tokens, system (none clears)"),
    ("/prompt", "the prompt the server rendered for the last answer (gptoss serve --debug)"),
    ("/exit", "leave (Ctrl-D works too); Ctrl-C stops an answer"),
]
COMMAND_NAMES = [h[0].split()[0] for h in HELP] + ["/quit"]
FRAME_S = 1 / 50  # the streamed view is redrawn at most this often (a fast GPU makes hundreds of tokens/s)


def load_tools(path: str) -> list[dict]:
    """--tools FILE: a JSON list of OpenAI tool definitions."""
    p = Path(str(path)).expanduser()
    if not p.is_file():
        raise ChatError(f"--tools {path} does not exist; give a JSON list of tools as OpenAI's API takes them")
    try:
        tools = jsonlib.loads(p.read_text(encoding="utf-8"))
    except jsonlib.JSONDecodeError as e:
        raise ChatError(f"--tools {path} is not JSON: {e}")
    if isinstance(tools, dict) and isinstance(tools.get("tools"), list):
        tools = tools["tools"]
    bad = [i for i, t in enumerate(tools if isinstance(tools, list) else [None])
           if not (isinstance(t, dict) and t.get("type") == "function" and isinstance(t.get("function"), dict)
                   and t["function"].get("name"))]
    if not isinstance(tools, list) or bad:
        raise ChatError(f"--tools {path}: expected a list of {{\"type\": \"function\", \"function\": {{\"name\": ...}}}}"
                        + (f"; entry {bad[0]} is not one" if isinstance(tools, list) else ""))
    return tools


def history_file() -> Path | None:
    base = Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state") / "gptoss"
    try:
        base.mkdir(parents=True, exist_ok=True)
        path = base / "chat_history"
        path.touch()
        return path
    except OSError:
        return None


@contextlib.contextmanager
def waiting(console) -> Iterator[Callable[[str], None]]:
    """A notice function: a spinner line on a terminal, the first notice once elsewhere."""
    status = None
    said: list[str] = []

    def notice(text: str) -> None:
        nonlocal status
        if console.is_terminal:
            if status is None:
                status = console.status(text)
                status.start()
            else:
                status.update(text)
        elif not said or not text.startswith(said[-1][:30]):
            console.print(text, markup=False, highlight=False, soft_wrap=True)
        said.append(text)

    try:
        yield notice
    finally:
        if status is not None:
            status.stop()


class StreamView:
    """What is on screen while an answer streams: the analysis (dim), the answer, calls; the last screenful."""

    def __init__(self, show_thinking: bool):
        self.show_thinking = show_thinking
        self.started = time.monotonic()
        self.reasoning = ""
        self.content = ""
        self.calls: list[dict] = []

    def __rich_console__(self, console, options):
        from rich.text import Text

        text = Text()
        if not (self.reasoning or self.content or self.calls):
            text.append(f"waiting for the answer... {time.monotonic() - self.started:.0f} s (Ctrl-C stops it)", style="dim")
        if self.reasoning and self.show_thinking:
            text.append(self.reasoning, style="dim")
        elif self.reasoning and not self.content:
            text.append(f"thinking... ({len(self.reasoning)} characters)", style="dim")
        for call in self.calls:
            text.append(("\n" if text else "") + "tool call " + describe_call(call), style="cyan")
        if self.content:
            text.append(("\n\n" if text else "") + self.content)
        lines = console.render_lines(text, options.update(height=None), pad=False, new_lines=True)
        for line in lines[-max(1, console.size.height - 2):]:
            yield from line


class Session:
    """An interactive chat: the conversation, the settings and the commands."""

    def __init__(self, conn: Connection, settings: Settings, *, tools: list[dict] | None, console, show_thinking: bool = True):
        self.conn, self.settings, self.tools, self.console = conn, settings, tools, console
        self.show_thinking = show_thinking
        self.messages: list[dict] = []  # the conversation without the system prompt (that is settings.system)
        self.pending: list[dict] = []  # tool calls of the last answer still waiting for their results
        self.replies: list[Reply] = []

    # ---- turns -----------------------------------------------------------------------------

    def say(self, line: str) -> None:
        """A line typed at the prompt: a question, or the result of the tool call being waited for."""
        saved = (len(self.messages), list(self.pending))
        if self.pending:
            call = self.pending.pop(0)
            self.messages.append({"role": "tool", "tool_call_id": call["id"], "content": line})
            if self.pending:
                return
        else:
            self.messages.append({"role": "user", "content": line})
        try:
            self.ask()
        except Cancelled as e:
            self._restore(saved)
            self.notice(str(e))
        except ContextFull as e:
            self._restore(saved)
            self.error(f"{e}. /clear starts a new conversation (/save FILE first to keep this one).")
        except ChatError as e:
            self._restore(saved)
            self.error(str(e))

    def _restore(self, saved: tuple[int, list[dict]]) -> None:
        del self.messages[saved[0]:]
        self.pending = saved[1]

    def ask(self) -> None:
        from rich.live import Live

        view = StreamView(self.show_thinking)
        reply = None
        events = self.conn.stream(self.messages, self.settings, tools=self.tools, notice=self.notice)
        shown = 0.0
        try:
            # Auto-refresh keeps the waiting line ticking; each piece is also drawn as it comes (below).
            with Live(view, console=self.console, transient=True, refresh_per_second=2) as live:
                for kind, value in events:
                    if kind == "done":
                        reply = value
                        break
                    if kind == "reasoning":
                        view.reasoning += value
                    elif kind == "content":
                        view.content += value
                    elif kind == "tool_call":
                        view.calls = value
                    if time.monotonic() - shown >= FRAME_S:  # each piece as it comes, at most FRAME_S apart
                        live.refresh()
                        shown = time.monotonic()
        except KeyboardInterrupt:
            events.close()
            raise Cancelled("stopped; the answer was dropped") from None
        finally:
            events.close()
        self.replies.append(reply)
        self.messages.append(reply.message())
        self.pending = list(reply.tool_calls)
        self.show(reply)

    def show(self, reply: Reply) -> None:
        from rich.markdown import Markdown
        from rich.panel import Panel
        from rich.text import Text

        if reply.reasoning and self.show_thinking:
            self.console.print(Panel(Text(reply.reasoning, style="dim"), title="thinking", title_align="left",
                                     border_style="dim"))
        for call in reply.tool_calls:
            self.console.print(Panel(Text(describe_call(call)), title="tool call", title_align="left", border_style="cyan"))
        if reply.content:
            self.console.print(Markdown(reply.content))
        if reply.finish_reason == "length":
            self.console.print("[yellow](cut off: the answer reached max_tokens or the context's end)[/]")
        if self.pending:
            self.console.print(f"type the result of {describe_call(self.pending[0])} (JSON or text)", style="dim",
                               markup=False, highlight=False)

    def notice(self, text: str) -> None:
        self.console.print(text, style="dim", highlight=False, markup=False)

    def error(self, text: str) -> None:
        from rich.text import Text

        self.console.print(Text.assemble(("error:", "red"), " ", text), highlight=False)

    # ---- commands --------------------------------------------------------------------------

    def command(self, line: str) -> bool:
        """Run a /command; False means leave."""
        name, _, arg = line.strip().partition(" ")
        arg = arg.strip()
        handler = getattr(self, "cmd_" + name[1:].lower(), None) if name[1:].isidentifier() else None
        if name in ("/exit", "/quit"):
            return False
        if handler is None:
            close = difflib.get_close_matches(name, COMMAND_NAMES, n=1)
            self.error(f"unknown command {name}" + (f" (did you mean {close[0]}?)" if close else "") + "; /help lists them")
            return True
        try:
            handler(arg)
        except ChatError as e:
            self.error(str(e))
        return True

    def cmd_help(self, arg: str) -> None:
        from rich.table import Table

        table = Table(show_header=False, box=None, pad_edge=False)
        for term, text in HELP:
            table.add_row(f"[bold]{term}[/]", text)
        self.console.print(table)

    def cmd_clear(self, arg: str) -> None:
        self.messages, self.pending = [], []
        self.console.print("[dim]new conversation[/]")

    def cmd_save(self, arg: str) -> None:
        path = Path(arg or time.strftime("chat-%Y%m%d-%H%M%S.json"))
        messages = conversation.with_system(self.settings.system, self.messages)
        conversation.save(path, messages)
        self.console.print(f"saved {len(messages)} messages to {path}", highlight=False, markup=False)

    def cmd_load(self, arg: str) -> None:
        if not arg:
            raise ChatError("/load needs a file: /load chat.json")
        system, messages = conversation.split_system(conversation.load(arg))
        self.settings = self.settings.replace(system=system)
        self.messages = messages
        last = messages[-1] if messages else {}
        answered = {m.get("tool_call_id") for m in messages if m.get("role") == "tool"}
        self.pending = [c for c in last.get("tool_calls") or [] if c.get("id") not in answered] if last.get("role") == "assistant" else []
        from rich.text import Text

        self.console.print(f"loaded {len(messages) + bool(system)} messages from {arg}", highlight=False, markup=False)
        for m in conversation.with_system(system, messages):
            text = m.get("content") if isinstance(m.get("content"), str) else ""
            if m.get("tool_calls"):
                text = (text + " " if text else "") + ", ".join("tool call " + describe_call(c) for c in m["tool_calls"])
            first = (text or "").strip().splitlines()[0] if (text or "").strip() else ""
            self.console.print(Text.assemble((f"{m['role']}:", "dim"), " ", first[:100]), highlight=False)

    def cmd_stats(self, arg: str) -> None:
        if not self.replies:
            self.console.print("no answer yet")
            return
        last = self.replies[-1]
        self.console.print(f"last answer: {last.stats_line()}", highlight=False)
        rates = [r.rate for r in self.replies if r.rate]
        total = sum(r.tokens for r in self.replies)
        mean = f", {sum(rates) / len(rates):.1f} tokens/s on average" if rates else ""
        n = len(self.replies)
        self.console.print(f"this chat: {n} answer{'' if n == 1 else 's'}, {total} tokens{mean}", highlight=False)

    def cmd_reasoning(self, arg: str) -> None:
        if not arg:
            self.console.print(f"reasoning {self.settings.reasoning}")
            return
        if arg not in REASONING_EFFORTS:
            raise ChatError(f"/reasoning {arg}: say low, medium or high")
        self.settings = self.settings.replace(reasoning=arg)
        self.console.print(f"reasoning {arg}")

    def cmd_think(self, arg: str) -> None:
        if arg not in ("", "on", "off"):
            raise ChatError(f"/think {arg}: say on or off")
        self.show_thinking = (not self.show_thinking) if not arg else arg == "on"
        self.console.print(f"thinking {'shown' if self.show_thinking else 'hidden'}")

    def cmd_settings(self, arg: str) -> None:
        if arg:
            name, _, value = arg.partition(" ")
            self.settings = self.settings.replace(**{name: _setting_value(name, value.strip())})
        s = self.settings
        for key, value in (("reasoning", s.reasoning), ("thinking", "shown" if self.show_thinking else "hidden"),
                           ("temperature", s.temperature), ("top_p", s.top_p), ("max_tokens", s.max_tokens or "the server's limit"),
                           ("system", s.system or "none")):
            self.console.print(f"{key:12} {value}", highlight=False, markup=False)

    def cmd_prompt(self, arg: str) -> None:
        last = self.replies[-1] if self.replies else None
        if last is None:
            self.console.print("no answer yet")
        elif last.server_prompt is None:
            self.console.print("the server did not return its prompt (start gptoss serve with --debug)")
        else:
            from rich.text import Text

            self.console.print(Text(last.server_prompt, style="dim"))


def _setting_value(name: str, value: str) -> Any:
    if name not in ("temperature", "top_p", "max_tokens", "system"):
        raise ChatError(f"/settings {name}: the settings are temperature, top_p, max_tokens, system")
    if not value:
        raise ChatError(f"/settings {name} needs a value, e.g. /settings {name} "
                        + {"temperature": "0.7", "top_p": "0.9", "max_tokens": "512", "system": "You are terse."}[name])
    if value.lower() == "none" and name in ("max_tokens", "system"):
        return None
    if name == "system":
        return value
    try:
        return int(value) if name == "max_tokens" else float(value)
    except ValueError:
        raise ChatError(f"/settings {name} {value}: not a number") from None


def repl(session: Session) -> None:
    from prompt_toolkit import PromptSession
    from prompt_toolkit.completion import WordCompleter
    from prompt_toolkit.history import FileHistory, InMemoryHistory
    from rich.markup import escape

    path = history_file()
    prompt = PromptSession(history=FileHistory(str(path)) if path else InMemoryHistory(),
                           completer=WordCompleter(COMMAND_NAMES + ["low", "medium", "high", "on", "off"], sentence=True))
    c = session.console
    c.print(f"[bold]gptoss chat[/] · {escape(session.conn.model_id())} at {escape(session.conn.url)} · reasoning "
            f"{session.settings.reasoning} · /help lists the commands, Ctrl-D leaves", highlight=False)
    while True:
        label = f"result of {session.pending[0]['function']['name']}> " if session.pending else "> "
        try:
            line = prompt.prompt(label)
        except KeyboardInterrupt:
            continue
        except EOFError:
            return
        line = line.strip()
        if not line:
            continue
        # A /command, except where a tool result is expected and the line is no known command.
        if line.startswith("/") and (not session.pending or line.split()[0] in COMMAND_NAMES):
            if not session.command(line):
                return
            continue
        session.say(line)


def one_shot(conn: Connection, settings: Settings, question: str, *, tools: list[dict] | None, show_thinking: bool,
             as_json: bool, err_console) -> None:
    """Print the answer (stdout) as it streams; the analysis goes to stderr when asked for."""
    out = sys.stdout
    thinking_started = False
    reply: Reply | None = None
    def notice(text: str) -> None:
        err_console.print(text, markup=False, highlight=False, soft_wrap=True)

    for kind, value in conn.stream([{"role": "user", "content": question}], settings, tools=tools, notice=notice):
        if kind == "done":
            reply = value
        elif as_json:
            continue
        elif kind == "reasoning" and show_thinking:
            err_console.print(value, style="dim", end="", highlight=False, markup=False, soft_wrap=True)
            thinking_started = True
        elif kind == "content":
            if thinking_started:
                err_console.print()
                thinking_started = False
            out.write(value)
            out.flush()
    if as_json:
        out.write(jsonlib.dumps(reply.message(), ensure_ascii=False, indent=2) + "\n")
        return
    if thinking_started:
        err_console.print()
    for call in reply.tool_calls:
        out.write(f"{'' if not reply.content or reply.content.endswith(chr(10)) else chr(10)}tool call {describe_call(call)}\n")
    if reply.content and not reply.content.endswith("\n") and not reply.tool_calls:
        out.write("\n")
    out.flush()


def connect(*, url: str | None, api_key: str | None, local: LocalServer | None, wait: int, console) -> Connection:
    """A Connection whose model is loaded (waiting for it, showing so)."""
    conn = Connection(local.url if local else url, api_key=api_key)
    start = time.monotonic()
    with waiting(console) as notice:
        if local:
            notice(f"starting {local.describe()}")
            while True:  # its port opens only once it has started
                local.check_running()
                try:
                    conn.wait_ready(timeout=max(1.0, wait - (time.monotonic() - start)), notice=notice,
                                    still_running=local.check_running)
                    break
                except Unreachable:
                    if time.monotonic() - start > wait:
                        raise ChatError(f"the local server did not start within {wait} s; see {local.log_path}")
                    time.sleep(0.2)  # its port is not open yet
        else:
            conn.wait_ready(timeout=wait, notice=notice)
        conn.model_id()
    return conn


def chat(
    question: str | None = None,
    *,
    url: str | None = None,
    api_key: str | None = None,
    model: str | None = None,
    backend: Backend = "auto",
    quant: str | None = None,
    device: str = "cpu",
    reasoning: Literal["low", "medium", "high"] = "medium",
    show_thinking: bool = False,
    json: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    max_tokens: int | None = None,
    system: str | None = None,
    tools: str | None = None,
    wait: int = 900,
) -> None:
    """Chat with a model served by gptoss serve (or any OpenAI-compatible server) in the terminal.

    With QUESTION: prints the final answer and exits (pipe-friendly; a question can also come on stdin).
    Without: an interactive chat with streamed answers, the analysis shown dim, and /commands (/help).

    Args:
        question: ask this once and print the answer; without it the chat is interactive.
        url: the server's OpenAI API (default $GPTOSS_URL or http://127.0.0.1:8000/v1).
        api_key: the server's key when it asks for one (default $GPTOSS_API_KEY).
        model: instead of --url, start gptoss serve on this GGUF, exports/<run> or models/<run> for the chat's lifetime.
        backend: with --model: auto (llamacpp for a GGUF or an export folder, transformers otherwise), llamacpp or transformers.
        quant: with --model exports/<run>: which GGUF of its manifest, e.g. q4_k_m.
        device: with --model: cpu or cuda:N.
        reasoning: the model's reasoning effort (/reasoning changes it).
        show_thinking: one-shot: also print the analysis, on stderr (the interactive chat shows it unless /think off).
        json: one-shot: print the whole assistant message as JSON (content, reasoning_content, tool_calls).
        temperature: sampling temperature, 0 to 2 (0 is greedy).
        top_p: nucleus sampling, above 0 up to 1.
        max_tokens: most tokens per answer (default: what the context leaves).
        system: a system prompt.
        tools: a JSON file with a list of OpenAI tool definitions; calls are shown and their results typed in.
        wait: seconds to wait for a server that is still loading its model.
    """
    from rich.console import Console

    problems = []
    if url and model:
        problems.append("give --url (a running server) or --model (start one), not both")
    if not isinstance(wait, int) or isinstance(wait, bool) or wait < 1:
        problems.append(f"--wait must be a positive number of seconds, got {wait!r}")
    try:
        settings = Settings(reasoning=reasoning, temperature=temperature, top_p=top_p, max_tokens=max_tokens, system=system)
    except ChatError as e:
        problems.append(str(e))
        settings = None
    if problems:
        raise ChatError("; ".join(problems))
    tool_list = load_tools(tools) if tools else None
    if question is None and not sys.stdin.isatty():
        question = sys.stdin.read().strip() or None
        if question is None:
            raise ChatError("no question: stdin was empty; pass QUESTION or run `gptoss chat` in a terminal")
    interactive = question is None
    console = Console(highlight=False) if interactive else Console(stderr=True, highlight=False)
    local = LocalServer(model, backend=backend, quant=quant, device=device) if model else None
    try:
        conn = connect(url=url, api_key=api_key, local=local, wait=wait, console=console)
        if interactive:
            repl(Session(conn, settings, tools=tool_list, console=console, show_thinking=True))
        else:
            one_shot(conn, settings, str(question), tools=tool_list, show_thinking=show_thinking, as_json=json,
                     err_console=console)
    except KeyboardInterrupt:
        raise SystemExit(130) from None
    finally:
        if local:
            local.stop()
