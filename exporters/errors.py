"""Errors of the merge and export stage; each says what is wrong and what to do."""

from gptoss.errors import ToolchainError


class ExportStageError(ToolchainError):
    """Base of every merge/export error."""


class MissingFilesError(ExportStageError):
    """An input folder lacks files the stage needs."""


class AdapterMismatchError(ExportStageError):
    """The adapter was trained for another base (names, rank, widths or vocabulary differ)."""


class UnsupportedAdapterError(ExportStageError):
    """The adapter uses a PEFT feature the streaming merge does not implement."""


class FourBitMergeError(ExportStageError):
    """Merging into 4-bit weights is refused."""


class UnknownQuantError(ExportStageError):
    """A quant name that is not registered."""


class DiskSpaceError(ExportStageError):
    """Not enough free disk for the artifacts about to be written."""


class ConversionError(ExportStageError):
    """llama.cpp's converter or quantizer failed."""
