"""Errors of `gptoss cache`; each says what is wrong and what to run."""

from __future__ import annotations

from gptoss.errors import ToolchainError


class CacheError(ToolchainError):
    """Base of every `gptoss cache` error."""


class ImportRefusedError(CacheError):
    """`gptoss cache import` will not lay this folder into the cache (nothing was written)."""


class ImportVerificationError(CacheError):
    """The imported snapshot does not load offline, or its files differ from the source."""


class MissingFromCacheError(CacheError):
    """Something the configured path needs is not in the cache; ``statuses`` has every row."""

    def __init__(self, message: str, statuses: list):
        super().__init__(message)
        self.statuses = statuses
