"""Where merge and export find their inputs and put their outputs.

A training run folder ``models/<run>/`` holds ``adapter/`` (a PEFT save) and ``training_info.json``
(``base_model``: Hugging Face id or local path, ``base_model_revision``; for a 4-bit base also
``merge_base``, its 16-bit original). Outputs go to ``exports/<run>/merged/`` and ``exports/<run>/gguf/``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Literal

from gptoss.choices import choice_problem
from gptoss.exporters.errors import ExportStageError, MissingFilesError
from gptoss.folders import ADAPTER_DIR, GGUF_DIR, MERGED_DIR, Folders  # noqa: F401 (GGUF_DIR, MERGED_DIR: used as runs.*)
from gptoss.records import RecordError, TrainingInfo

TRAINING_INFO = TrainingInfo.FILE
# What a LoRA trained on a 4-bit base is merged into: its 16-bit original (default) or the 4-bit base
# dequantized (the weights the adapter was trained against, rounding included).
MergeInto = Literal["original", "dequantized"]
MERGE_INTO = ("original", "dequantized")


@dataclasses.dataclass(frozen=True)
class MergeInputs:
    name: str  # run name: names the exports folder and the GGUF files
    base: str  # HF id or local folder
    base_revision: str | None
    adapter_dir: Path
    run_dir: Path | None = None
    training_info: TrainingInfo | None = None
    merge_into: str = "original"  # for a 4-bit base: "original" (its 16-bit original) or "dequantized"
    merge_base: str | None = None  # the 16-bit original (--merge-base, or what training recorded)


def resolve_run(run: str, *, merge_into: str = "original", merge_base: str | None = None) -> MergeInputs:
    """``--run DIR`` (or a name under ./models/) -> adapter, base and run name."""
    path = Path(run).expanduser()
    if not path.is_dir() and not path.is_absolute() and Folders.of().run_dir(run).is_dir():
        path = Folders.of().run_dir(run)
    if not path.is_dir():
        raise MissingFilesError(f"--run {run}: no such run folder (expected models/<run>/ with adapter/ and {TRAINING_INFO})")
    real = path.resolve()  # models/latest -> the run it points at
    missing = [n for n in (TRAINING_INFO, ADAPTER_DIR) if not (real / n).exists()]
    if missing:
        raise MissingFilesError(f"--run {run}: {real} lacks {', '.join(missing)}; is the training run finished? "
                                "(gptoss train writes both when it completes)")
    try:
        info = TrainingInfo.load(real)
    except RecordError as e:
        raise MissingFilesError(str(e)) from e
    base = info.base_model
    if not Path(base).is_absolute() and (real / base).is_dir():
        base = str((real / base).resolve())
    recorded = info.merge_base
    if merge_base is None and recorded:
        merge_base = str((real / recorded).resolve()) if not Path(recorded).is_absolute() and (real / recorded).is_dir() else recorded
    # base_model_revision: what `gptoss train` resolved and trained on
    return MergeInputs(name=real.name, base=base, base_revision=info.base_model_revision,
                       adapter_dir=real / ADAPTER_DIR, run_dir=real, training_info=info, merge_into=merge_into,
                       merge_base=merge_base)


def resolve_inputs(run: str | None, base: str | None, adapter: str | None, *, merge_into: str = "original",
                   merge_base: str | None = None) -> MergeInputs:
    if wrong := choice_problem("--merge-into", merge_into, MERGE_INTO):
        raise ExportStageError(f"{wrong}: original is the 16-bit original of a 4-bit base (the default), "
                               "dequantized the 4-bit base itself, dequantized")
    if run is not None and (base is not None or adapter is not None):
        raise ExportStageError("pass either --run DIR or --base ID_OR_DIR --adapter DIR, not both")
    if run is not None:
        return resolve_run(run, merge_into=merge_into, merge_base=merge_base)
    if base is None or adapter is None:
        raise ExportStageError("say what to merge: --run models/<run> or --base ID_OR_DIR --adapter DIR")
    adapter_dir = Path(adapter).expanduser().absolute()
    name = adapter_dir.parent.name if adapter_dir.name == ADAPTER_DIR else adapter_dir.name
    return MergeInputs(name=name, base=base, base_revision=None, adapter_dir=adapter_dir, merge_into=merge_into,
                       merge_base=merge_base)


def export_root(name: str, exports_dir: str | None = None) -> Path:
    return Folders.of(exports_dir=exports_dir).export_dir(name)
