"""`--model PATH`: a `gptoss serve` of our own for the chat's lifetime, as a child process.

Started as a user would (``python -m gptoss serve ...`` on a free loopback port, its output in a
log file), waited for through /health like any server, stopped on exit (SIGTERM, then SIGKILL).
The log is removed after a clean stop and kept when the server failed (the error names it).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Literal

from gptoss.chat.client import ChatError
from gptoss.machine import stop_process

Backend = Literal["auto", "llamacpp", "transformers"]


def pick_backend(model: Path, backend: Backend) -> str:
    """auto: llama.cpp for a GGUF or an export folder (exports/<run> has manifest.json), transformers otherwise."""
    if backend != "auto":
        return backend
    if (model.is_file() and model.suffix == ".gguf") or (model / "manifest.json").is_file():
        return "llamacpp"
    return "transformers"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    """The server goes when the chat goes, even when the chat is killed (Linux)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class LocalServer:
    """``gptoss serve --model MODEL`` on 127.0.0.1; ``url`` is its /v1."""

    def __init__(self, model: str, *, backend: Backend = "auto", quant: str | None = None, device: str = "cpu",
                 ctx: int | None = None, debug: bool = False):
        path = Path(str(model)).expanduser()
        if not path.exists():
            raise ChatError(f"--model {model} does not exist; give a .gguf file, exports/<run> or models/<run>")
        self.backend = pick_backend(path, backend)
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.command = [sys.executable, "-m", "gptoss", "serve", "--backend", self.backend, "--model", str(path.absolute()),
                        "--host", "127.0.0.1", "--port", str(self.port), "--device", device]
        if quant:
            self.command += ["--quant", quant]
        if ctx:
            self.command += ["--ctx", str(ctx)]
        if debug:
            self.command += ["--debug"]
        fd, log = tempfile.mkstemp(prefix="gptoss-chat-serve-", suffix=".log")
        self.log_path = Path(log)
        self._log = os.fdopen(fd, "wb")
        self.failed = False
        self.proc = subprocess.Popen(self.command, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True,  # Ctrl-C in the chat is the chat's, not the server's
                                     preexec_fn=_die_with_parent if sys.platform == "linux" else None)

    def describe(self) -> str:
        return f"gptoss serve --backend {self.backend} on 127.0.0.1:{self.port} (log: {self.log_path})"

    def check_running(self) -> None:
        """Raises with the end of its log when the server exited."""
        code = self.proc.poll()
        if code is not None:
            self.failed = True
            tail = self.log_path.read_text(errors="replace").strip().splitlines()[-15:]
            raise ChatError(f"the local server exited with {code} before it was ready; its log {self.log_path} ends:\n"
                            + "\n".join(tail) + f"\n(command: {' '.join(self.command)})")

    def stop(self) -> None:
        if stop_process(self.proc):
            self.failed = True
        self._log.close()
        if not self.failed and self.proc.returncode in (0, -signal.SIGTERM):
            self.log_path.unlink(missing_ok=True)

    def __enter__(self) -> "LocalServer":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
