"""Test support for the chat clients: a program on a real pseudo-terminal, read as a screen.

pexpect runs the command on a pty; every byte it writes goes through pyte (a VT100 emulator), so
tests wait for and assert on what a person would see on screen, not on escape sequences. The raw
bytes are kept too (``frames``: how many times the streaming view was redrawn).
"""

from __future__ import annotations

import os
import re
import sys
import time
from pathlib import Path

import pexpect
import pyte

REPO = Path(__file__).resolve().parent.parent
ANSI = re.compile(rb"\x1b\[[0-?]*[ -/]*[@-~]|\x1b[@-Z\\-_]|\x1b\][^\x07]*\x07|[\x00-\x08\x0b-\x1f]")


def chat_env(home: Path, **extra: str) -> dict:
    """A user's shell: the chat's history under ``home`` (the llama.cpp build cache stays where it is), the repo
    importable, an xterm."""
    env = {k: v for k, v in os.environ.items() if k not in ("GPTOSS_URL", "GPTOSS_API_KEY")}
    env.update(XDG_STATE_HOME=str(home / ".local" / "state"), TERM="xterm-256color",
               PYTHONPATH=os.pathsep.join([str(REPO)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])),
               # pexpect does not answer the terminal's cursor-position query; a real terminal does.
               PROMPT_TOOLKIT_NO_CPR="1",
               GPTOSS_CURRENT_DATE="none",  # servers it starts (--model): the fixture was trained without a date
               **extra)
    return env


class Terminal:
    """``python -m gptoss ARGS`` on a ROWS x COLS pseudo-terminal."""

    def __init__(self, *args: str, env: dict, cwd: Path, rows: int = 60, cols: int = 150):
        self.screen = pyte.HistoryScreen(cols, rows, history=5000)
        self.stream = pyte.ByteStream(self.screen)
        self.raw = bytearray()
        self.child = pexpect.spawn(sys.executable, ["-m", "gptoss", *args], env=env, cwd=str(cwd),
                                   dimensions=(rows, cols), echo=False)
        self.mark = 0  # text() offset before which wait_for does not look

    # ---- reading -------------------------------------------------------------------------

    def _pump(self, timeout: float) -> bool:
        try:
            data = self.child.read_nonblocking(65536, timeout=timeout)
        except pexpect.TIMEOUT:
            return True
        except pexpect.EOF:
            return False
        self.raw += data
        self.stream.feed(data)
        return True

    def lines(self) -> list[str]:
        cols = self.screen.columns
        history = ["".join(line[x].data for x in range(cols)).rstrip() for line in self.screen.history.top]
        return history + [line.rstrip() for line in self.screen.display]

    def text(self) -> str:
        return "\n".join(self.lines())

    def plain_output(self) -> str:
        """Everything written, escape sequences removed (the streamed frames included)."""
        return ANSI.sub(b"", bytes(self.raw)).decode(errors="replace")

    def wait_for(self, pattern: str, timeout: float = 120.0, *, transient: bool = False) -> re.Match:
        """Wait until ``pattern`` (a regex) is on screen after the mark; the mark moves past it, unless it is in
        a ``transient`` view (redrawn, then erased: later text may take its place)."""
        regex = re.compile(pattern, re.M)
        deadline = time.monotonic() + timeout
        while True:
            text = self.text()
            m = regex.search(text, self.mark)
            if m:
                self.mark = self.mark if transient else m.end()
                return m
            if time.monotonic() > deadline or not self._pump(min(1.0, max(0.05, deadline - time.monotonic()))):
                if m is None and not self.child.isalive():
                    raise AssertionError(f"exited before {pattern!r} appeared; the screen:\n{self.text()[-4000:]}")
                if time.monotonic() > deadline:
                    raise AssertionError(f"{pattern!r} not on screen after {timeout}s; the screen:\n{self.text()[-4000:]}")

    def at_prompt(self, label: str = "> ", timeout: float = 120.0) -> None:
        """Wait until the cursor sits on an empty prompt ``label``: the chat waits for input."""
        deadline = time.monotonic() + timeout
        while True:
            row = self.screen.display[self.screen.cursor.y]
            if row.rstrip() == label.rstrip() and self.screen.cursor.x == len(label):
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"no empty {label!r} prompt after {timeout}s; the screen:\n{self.text()[-4000:]}")
            if not self._pump(0.2) and not self.child.isalive():
                raise AssertionError(f"exited while waiting for the prompt; the screen:\n{self.text()[-4000:]}")

    # ---- typing --------------------------------------------------------------------------

    def type_line(self, line: str, label: str = "> ", timeout: float = 60.0) -> None:
        """At an empty prompt, type ``line`` and Enter; returns once the chat has taken the line."""
        self.at_prompt(label, timeout)
        self.child.send(line + "\r")
        self.wait_for(re.escape(label.rstrip()) + r" " + re.escape(line[:60]), timeout)

    def exit_code(self, timeout: float = 60.0) -> int:
        deadline = time.monotonic() + timeout
        while self._pump(0.5):
            if time.monotonic() > deadline:
                raise AssertionError(f"still running after {timeout}s; the screen:\n{self.text()[-4000:]}")
        self.child.close()
        return self.child.exitstatus if self.child.exitstatus is not None else -self.child.signalstatus

    def close(self) -> None:
        if self.child.isalive():
            self.child.terminate(force=True)
