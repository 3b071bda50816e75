"""`gptoss cache`: the real checkpoints and datasets in the Hugging Face cache, offline (check, import)."""

from gptoss.hfcache.command import cache

__all__ = ["cache"]
