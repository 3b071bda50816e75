"""Export stage: `gptoss merge` (LoRA -> 16-bit safetensors), `gptoss export` (GGUF files + manifest) and `gptoss publish` (Hub)."""
