"""Ollama Modelfiles for gpt-oss GGUFs that speak Harmony (`gptoss modelfile`)."""

from modelfiles.modelfile import ModelfileError, render, write
from modelfiles.template import harmony_template

__all__ = ["ModelfileError", "harmony_template", "render", "write"]
