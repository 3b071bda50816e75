"""Serving stage: `gptoss serve`, one OpenAI-compatible API over the llama.cpp and transformers backends."""

from gptoss.serving.server import serve

__all__ = ["serve"]
