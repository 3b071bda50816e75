"""The training stage: `gptoss train` (LoRA on attention and MoE experts; Unsloth or transformers+PEFT)."""

from gptoss.training.run import train

__all__ = ["train"]
