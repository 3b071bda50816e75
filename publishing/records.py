"""What publish reads: the training run and the export, through gptoss.records, located with gptoss.folders."""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path
from typing import Any

from gptoss.errors import ToolchainError
from gptoss.folders import Folders
from gptoss.progress import human_bytes
from gptoss.records import Manifest, Published, TrainingInfo


WHATS = ("adapter", "merged", "gguf")

# Records written by earlier stages (see ARCHITECTURE.md) and by this one.
TRAINING_INFO = TrainingInfo.FILE
TRAIN_CONFIG = "train_config.json"
MANIFEST = Manifest.FILE
PUBLISHED = Published.FILE
ADAPTER_DIR = "adapter"
ADAPTER_REQUIRED = ("adapter_config.json", "adapter_model.safetensors")
MERGED_REQUIRED = ("config.json",)
# merge's own record (inputs with local paths, timings): provenance stays local, the card summarises it.
MERGE_RECORD = "merge_info.json"

# Files the Hub's Ollama integration reads from a GGUF repo (hub-docs: docs/hub/ollama.md).
OLLAMA_TEMPLATE_FILE = "template"
OLLAMA_PARAMS_FILE = "params"
OLLAMA_SYSTEM_FILE = "system"
# Tag the Hub serves when none is given (hub-docs: "By default, the Q4_K_M quantization scheme is used").
DEFAULT_TAG = "Q4_K_M"

# The Hub picks the quant tag of a GGUF from its file name with @huggingface/gguf's
# parseGGUFQuantLabel: the last match of these names (GGMLFileQuantizationType, in enum order,
# which is also the regex alternation order) with an optional "_[A-Z]+" suffix.
_GGUF_FILE_QUANT_TYPES = (
    "F32 F16 Q4_0 Q4_1 Q4_1_SOME_F16 Q4_2 Q4_3 Q8_0 Q5_0 Q5_1 Q2_K Q3_K_S Q3_K_M Q3_K_L Q4_K_S "
    "Q4_K_M Q5_K_S Q5_K_M Q6_K IQ2_XXS IQ2_XS Q2_K_S IQ3_XS IQ3_XXS IQ1_S IQ4_NL IQ3_S IQ3_M IQ2_S "
    "IQ2_M IQ4_XS IQ1_M BF16 Q4_0_4_4 Q4_0_4_8 Q4_0_8_8 TQ1_0 TQ2_0 MXFP4_MOE NVFP4 Q1_0 "
    "Q2_K_XL Q3_K_XL Q4_K_XL Q5_K_XL Q6_K_XL Q8_K_XL"
).split()
_GGUF_QUANT_RE = re.compile(
    "(?:UD-)?(?:" + "|".join(_GGUF_FILE_QUANT_TYPES) + ")(?:_[A-Z]+)?"
)


_HASH_CHUNK = 8 << 20


class PublishError(ToolchainError):
    """Bad publish request, run folder or Hub state; or an upload that did not complete."""


def _human_size(n: int) -> str:
    return human_bytes(n, digits=2)


def gguf_quant_tag(filename: str) -> str | None:
    """The tag under which the Hub serves a GGUF file (``hf.co/ORG/NAME:<tag>``), or None."""
    matches = _GGUF_QUANT_RE.findall(Path(filename).name.upper())
    return matches[-1] if matches else None


# --------------------------------------------------------------------------------------------
# Records: what this stage reads, as the card needs it. The records themselves are gptoss/records.py's
# (written by training/run.py and exporters/export.py); tests/test_integration_publish.py feeds this
# reader what those writers wrote.


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _dig(data: Any, *keys: str) -> Any:
    for key in keys:
        data = data.get(key) if isinstance(data, dict) else None
    return data


@dataclasses.dataclass(frozen=True)
class TrainingRecord:
    """``models/<run>/training_info.json`` (+ ``train_config.json``), as publish reads it."""

    run_dir: Path
    base_model: str  # `base_model`: Hub id or local path, as trained
    base_revision: str | None  # `base_model_revision`: the Hub commit trained on
    dataset_id: str  # `dataset.id` (a Hub dataset) or `dataset.path` (a local file)
    dataset_hash: str  # `dataset.content_sha256`: sha256 of the rows as read
    dataset_revision: str | None
    backend: str | None
    steps: int | None
    loss: dict  # scalars of `loss` (first, min, final, verdict, ...) and of `loss.eval`
    versions: dict  # `versions`, packages that were not installed left out
    config: dict  # train_config.json: the resolved configuration
    metrics: dict  # display name -> value: device, throughput, peak memory

    @property
    def name(self) -> str:
        return self.run_dir.name

    @classmethod
    def load(cls, run_dir: Path, problems: list[str]) -> "TrainingRecord | None":
        path = run_dir / TRAINING_INFO
        info = TrainingInfo.try_load(run_dir, problems)
        if info is None:
            return None
        dataset = info.dataset
        dataset_id = (dataset.id or dataset.path) if dataset else None
        if dataset_id is None:
            problems.append(f"{path}: missing dataset.id/path; re-run `gptoss train` to write a complete record")
            return None
        config_path = run_dir / TRAIN_CONFIG
        config = _read_json(config_path, problems) if config_path.is_file() else info.config
        memory = info.peak_memory
        loss = {k: v for k, v in info.loss.items() if isinstance(v, (str, int, float))}
        loss.update({f"eval {k}": v for k, v in _as_dict(info.loss.get("eval")).items() if isinstance(v, (int, float))})
        layout = ", ".join(x for x in (info.base_layout, info.base_quantization) if x)
        metrics = {
            "Base checkpoint layout": {"split, bnb-4bit": "Unsloth's split bnb-4bit (per-expert NF4 Linears)"}.get(layout, layout or None),
            "Device": _str(memory.get("cuda_device")) or info.device,
            "Profile": info.profile,
            "Train time (s)": info.train_seconds,
            "Tokens per second": info.tokens_per_second,
            "Peak GPU memory (allocated)": _human_size(memory["cuda_allocated_bytes"]) if _int(memory.get("cuda_allocated_bytes")) else None,
            "Peak GPU memory (reserved)": _human_size(memory["cuda_reserved_bytes"]) if _int(memory.get("cuda_reserved_bytes")) else None,
            "Peak RSS": _human_size(memory["cpu_rss_bytes"]) if _int(memory.get("cpu_rss_bytes")) else None,
        }
        return cls(
            run_dir=run_dir,
            base_model=info.base_model,
            base_revision=info.base_model_revision,
            dataset_id=dataset_id,
            dataset_hash=dataset.content_sha256,
            dataset_revision=dataset.revision,
            backend=info.backend,
            steps=info.steps,
            loss=loss,
            versions={k: v for k, v in info.versions.items() if v is not None},
            config=_as_dict(config),
            metrics={k: v for k, v in metrics.items() if v is not None},
        )


@dataclasses.dataclass(frozen=True)
class Artifact:
    """A file (or the merged folder) named by ``manifest.json``; ``path`` is resolved against the manifest."""

    path: Path
    rel: str
    kind: str  # gguf | modelfile | merged
    quant: str | None = None  # a GGUF's `label` (llama.cpp's name, e.g. Q4_K_M), the tag the Hub serves it under
    sha256: str | None = None
    size: int | None = None
    tensor_types: dict | None = None
    fallbacks: Any = None
    fidelity: dict | None = None  # {reference, nmse, kl, top1, passed, skipped} or None when not measured
    gguf: str | None = None  # for a Modelfile: the GGUF it belongs to, relative to the manifest
    files: tuple = ()  # for the merged folder: ((rel path, sha256, size), ...)


def _fidelity(raw: Any) -> dict | None:
    """An artifact's `fidelity` in export's words (mean_kl, top1_agreement) -> the card's columns."""
    if not isinstance(raw, dict):
        return None
    return {"reference": raw.get("reference"), "nmse": raw.get("nmse"), "kl": raw.get("mean_kl"),
            "top1": raw.get("top1_agreement"), "passed": raw.get("passed"), "skipped": raw.get("skipped")}


@dataclasses.dataclass(frozen=True)
class ExportManifest:
    """``exports/<run>/manifest.json``, as publish reads it.

    Export lists each GGUF in ``artifacts`` (``kind: gguf``, with its Modelfile as ``modelfile`` /
    ``modelfile_sha256`` / ``modelfile_size``) and the merged folder under ``merged`` (``path``,
    ``files``); here both become Artifacts of kind gguf, modelfile and merged.
    """

    export_dir: Path
    run: str | None  # `run`: the export's name
    training_run: str | None  # `inputs.run`: the training run folder it was made from
    base_model: str | None  # `inputs.base.id`
    base_revision: str | None
    adapter_sha256: str | None
    merge_identity: str | None
    versions: dict  # `tools` without the llama.cpp commit and converter
    llama_cpp_commit: str | None
    fidelity_prompts: int | None
    artifacts: tuple[Artifact, ...]
    merge_into: str | None = None  # `inputs.merge_into`: base | original (of a 4-bit base) | dequantized
    trained_on: str | None = None  # `inputs.trained_on.id`: the base the adapter was trained on

    def of_kind(self, kind: str) -> list[Artifact]:
        return [a for a in self.artifacts if a.kind == kind]

    @classmethod
    def load(cls, export_dir: Path, problems: list[str]) -> "ExportManifest | None":
        manifest = Manifest.try_load(export_dir, problems)
        if manifest is None:
            return None
        artifacts = []
        for entry in manifest.artifacts:
            artifacts.append(Artifact(
                path=export_dir / entry.path, rel=entry.path, kind="gguf", quant=entry.label.upper(),
                sha256=entry.sha256, size=entry.size, tensor_types=entry.tensor_types,
                fallbacks=entry.fallbacks, fidelity=_fidelity(entry.fidelity),
            ))
            if entry.modelfile:
                artifacts.append(Artifact(
                    path=export_dir / entry.modelfile, rel=entry.modelfile, kind="modelfile", gguf=entry.path,
                    sha256=entry.modelfile_sha256, size=entry.modelfile_size,
                ))
        merged = manifest.merged
        files = tuple((f["path"], _str(f.get("sha256")), _int(f.get("size"))) for f in merged.files
                      if isinstance(f, dict) and _str(f.get("path")))
        artifacts.append(Artifact(path=export_dir / merged.path, rel=merged.path, kind="merged", files=files))
        tools, inputs = manifest.tools, manifest.inputs
        return cls(
            export_dir=export_dir,
            run=manifest.run,
            training_run=_str(inputs.get("run")),
            base_model=_str(_dig(inputs, "base", "id")),
            base_revision=_str(_dig(inputs, "base", "revision")),
            adapter_sha256=_str(_dig(inputs, "adapter", "files", "adapter_model.safetensors", "sha256")),
            merge_identity=_str(merged.identity.get("merge_identity")),
            versions={k: v for k, v in tools.items() if k not in ("llama_cpp_commit", "converter") and isinstance(v, str)},
            llama_cpp_commit=_str(tools.get("llama_cpp_commit")),
            fidelity_prompts=_int((manifest.fidelity_prompts or {}).get("count")),
            artifacts=tuple(artifacts),
            merge_into=_str(inputs.get("merge_into")),
            trained_on=_str(_dig(inputs, "trained_on", "id")),
        )


def _read_json(path: Path, problems: list[str]) -> dict | None:
    if not path.is_file():
        problems.append(f"{path} is missing")
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        problems.append(f"{path} is not valid JSON ({e})")
        return None
    if not isinstance(data, dict):
        problems.append(f"{path} should hold a JSON object")
        return None
    return data


def _as_dict(value: Any) -> dict:
    return value if isinstance(value, dict) else {}


def _locate(run: Path, problems: list[str], *, models_dir: str | os.PathLike | None = None,
            exports_dir: str | os.PathLike | None = None) -> tuple[Path | None, Path | None]:
    """(training run folder, export folder) for ``--run``: either ``models/<run>`` or ``exports/<run>``;
    the other is found through the folder layout (gptoss/folders.py; ``--models-dir`` / ``--exports-dir``)."""
    if not run.is_dir():
        problems.append(f"--run {run}: no such directory (give models/<run> or exports/<run>)")
        return None, None
    run = run.resolve()
    if (run / TRAINING_INFO).is_file():
        export_dir = Folders.of(models_dir=models_dir or run.parent, exports_dir=exports_dir).export_dir(run.name)
        return run, export_dir if (export_dir / MANIFEST).is_file() else None
    if (run / MANIFEST).is_file():
        training_dir = None
        manifest = Manifest.try_load(run, [])  # an unreadable manifest is reported when the plan loads it
        recorded = manifest.inputs.get("run") if manifest else None
        candidates = []
        if isinstance(recorded, str) and recorded:
            p = Path(recorded)
            candidates += [p] if p.is_absolute() else [run / p, Path.cwd() / p]
        candidates.append(Folders.of(models_dir=models_dir, exports_dir=exports_dir or run.parent).run_dir(run.name))
        for c in candidates:
            if (c / TRAINING_INFO).is_file():
                training_dir = c.resolve()
                break
        return training_dir, run
    problems.append(
        f"--run {run}: neither {TRAINING_INFO} (a training run, models/<run>) nor {MANIFEST} "
        "(an export, exports/<run>) is there; run `gptoss train` / `gptoss export` first"
    )
    return None, None


