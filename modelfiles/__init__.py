"""Ollama Modelfiles for gpt-oss GGUFs that speak Harmony (`gptoss modelfile`)."""

from gptoss.modelfiles.modelfile import ModelfileError, render, write
from gptoss.modelfiles.template import harmony_template

__all__ = ["ModelfileError", "harmony_template", "render", "write"]
