"""Merge and export stage: `gptoss merge` (LoRA -> 16-bit safetensors) and `gptoss export` (GGUF files + manifest)."""
