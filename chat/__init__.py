"""Chat stage: `gptoss chat` (terminal) and `gptoss ui` (web page), clients of gptoss serve's
OpenAI-compatible API (or any other) over HTTP. Heavy imports (openai, prompt_toolkit, gradio)
happen when a command runs, so `gptoss --help` stays fast and other images need none of them."""

from gptoss.chat.terminal import chat
from gptoss.chat.web import ui

__all__ = ["chat", "ui"]
