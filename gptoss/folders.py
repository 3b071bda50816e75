"""The folder layout every stage shares: ``models/<run>``, ``exports/<run>`` and their ``latest`` links.

A training run lives in ``<models_dir>/<run>/`` (adapter/, training_info.json); its export in
``<exports_dir>/<run>/`` (merged/, gguf/<run>-<LABEL>.gguf with <run>-<LABEL>.Modelfile beside it,
manifest.json). ``latest`` in either root names the newest *finished* run or export. By default
both roots sit side by side in one work folder (``./models`` and ``./exports``); ``--models-dir``
and ``--exports-dir`` move them.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from gptoss.latest import LATEST

MODELS_DIR = "models"
EXPORTS_DIR = "exports"
ADAPTER_DIR = "adapter"
MERGED_DIR = "merged"
GGUF_DIR = "gguf"
GGUF_SUFFIX = ".gguf"
MODELFILE_SUFFIX = ".Modelfile"


@dataclasses.dataclass(frozen=True)
class Folders:
    models_dir: Path
    exports_dir: Path

    @classmethod
    def of(cls, *, models_dir: str | os.PathLike | None = None, exports_dir: str | os.PathLike | None = None) -> Folders:
        """The layout for these flags: a root not given sits beside the other one (default ./models and ./exports)."""
        models = Path(models_dir).expanduser().absolute() if models_dir else None
        exports = Path(exports_dir).expanduser().absolute() if exports_dir else None
        if models is None:
            models = (exports.parent if exports else Path.cwd()) / MODELS_DIR
        if exports is None:
            exports = models.parent / EXPORTS_DIR
        return cls(models, exports)

    def run_dir(self, name: str) -> Path:
        return self.models_dir / name

    def export_dir(self, name: str) -> Path:
        return self.exports_dir / name

    def merged_dir(self, name: str) -> Path:
        return self.export_dir(name) / MERGED_DIR

    def gguf_dir(self, name: str) -> Path:
        return self.export_dir(name) / GGUF_DIR

    @property
    def latest_run(self) -> Path:
        return self.models_dir / LATEST

    @property
    def latest_export(self) -> Path:
        return self.exports_dir / LATEST


def gguf_name(stem: str, label: str) -> str:
    """``<run>-<LABEL>.gguf``: the label (llama.cpp's, e.g. Q4_K_M) is the tag the Hub serves it under."""
    return f"{stem}-{label}{GGUF_SUFFIX}"


def modelfile_path(gguf_path: str | os.PathLike) -> Path:
    """The Ollama Modelfile beside a GGUF."""
    gguf_path = Path(gguf_path)
    return gguf_path.with_name(gguf_path.stem + MODELFILE_SUFFIX)
