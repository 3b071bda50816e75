"""`gptoss publish`: push a run's adapter, merged model or GGUFs to the Hugging Face Hub.

What is published, and from which record:

* ``adapter``: ``models/<run>/adapter/`` (PEFT files + tokenizer) described by
  ``models/<run>/training_info.json`` and ``train_config.json``.
* ``merged``: the folder named by ``merged`` in ``exports/<run>/manifest.json`` (bf16 safetensors,
  config, tokenizer; not merge's own ``merge_info.json``).
* ``gguf``: every ``gguf`` artifact of the manifest plus its Modelfile, laid out at the repo root
  so that the Hub serves each quant by tag (``hf.co/ORG/NAME:Q4_K_M``), with ``template`` and
  ``params`` files taken from the Modelfile so ``ollama run hf.co/...`` speaks Harmony.

Every file is checked against the records (size, sha256) before anything touches the network,
and the model card (``README.md``, built with huggingface_hub's ModelCard) reports what the
records say. Upload is one ``HfApi.create_commit``: LFS/Xet uploads first (retried on transient
errors by huggingface_hub), then one commit naming the run. An interrupted upload is resumed by
re-running the same command: files whose content is already on the Hub are not sent again.

The token comes only from ``HF_TOKEN`` or the stored login (``hf auth login``); it is never
printed, written, or uploaded: every file is scanned for it before upload.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import sys
from pathlib import Path
from typing import Any, Literal

from gptoss.errors import ToolchainError
from gptoss.folders import Folders
from gptoss.hubid import is_hub_id as _is_hub_id
from gptoss.machine import package_version
from gptoss.progress import human_bytes
from modelfiles import gguf_header
from gptoss.records import Manifest, Published, PublishedRepo, TrainingInfo

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

# Ollama Modelfile directives this module reads.
_MODELFILE_DIRECTIVES = ("FROM", "TEMPLATE", "PARAMETER", "SYSTEM", "ADAPTER", "LICENSE", "MESSAGE", "REQUIRES")

_HASH_CHUNK = 8 << 20


class PublishError(ToolchainError):
    """Bad publish request, run folder or Hub state; or an upload that did not complete."""


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


# --------------------------------------------------------------------------------------------
# Modelfiles (written by `gptoss modelfile`): FROM, TEMPLATE, PARAMETER, SYSTEM.


@dataclasses.dataclass(frozen=True)
class Modelfile:
    path: Path
    from_: str | None
    template: str | None
    system: str | None
    parameters: tuple[tuple[str, str], ...]

    def params_json(self) -> dict:
        """PARAMETER lines as the JSON object Ollama keeps in a model's params layer."""
        out: dict[str, Any] = {}
        for name, raw in self.parameters:
            value: Any = raw
            if re.fullmatch(r"[-+]?\d+", raw):
                value = int(raw)
            elif re.fullmatch(r"[-+]?(\d+\.\d*|\.\d+|\d+)([eE][-+]?\d+)?", raw):
                value = float(raw)
            elif raw.lower() in ("true", "false"):
                value = raw.lower() == "true"
            if name == "stop":
                out.setdefault("stop", []).append(raw)
            else:
                out[name] = value
        return out


def read_modelfile(path: Path) -> Modelfile:
    """Parse the directives of an Ollama Modelfile (triple-quoted and quoted values included)."""
    text = path.read_text(encoding="utf-8")
    values: dict[str, str] = {}
    params: list[tuple[str, str]] = []
    i = 0
    lines = text.splitlines(keepends=True)
    while i < len(lines):
        line = lines[i]
        i += 1
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        word, _, rest = stripped.partition(" ")
        directive = word.upper()
        if directive not in _MODELFILE_DIRECTIVES:
            raise ValueError(f"{path}: unknown directive {word!r} on line {i}")
        rest = line.lstrip()[len(word):].lstrip(" \t")
        if rest.startswith('"""'):
            body = rest[3:]
            while '"""' not in body and i < len(lines):
                body += lines[i]
                i += 1
            if '"""' not in body:
                raise ValueError(f"{path}: unterminated \"\"\" in {directive}")
            value = body[: body.index('"""')]
        else:
            value = rest.rstrip("\r\n").strip()
        if directive == "PARAMETER":
            name, _, raw = value.partition(" ")
            raw = raw.strip()
            if len(raw) >= 2 and raw[0] == raw[-1] == '"':
                raw = raw[1:-1]
            params.append((name.strip(), raw))
        else:
            if len(value) >= 2 and value[0] == value[-1] == '"' and "\n" not in value:
                value = value[1:-1]
            values[directive] = value
    return Modelfile(
        path=path,
        from_=values.get("FROM"),
        template=values.get("TEMPLATE"),
        system=values.get("SYSTEM"),
        parameters=tuple(params),
    )


# --------------------------------------------------------------------------------------------
# The plan: every file that goes into the repo, checked locally.


@dataclasses.dataclass
class RepoFile:
    path_in_repo: str
    local: Path | None = None  # a file on disk, or
    data: bytes | None = None  # generated content (card, template, params)
    expected_sha256: str | None = None  # from the records, when they have it
    expected_size: int | None = None
    sha256: str | None = None
    size: int | None = None

    def __post_init__(self):
        if self.data is not None:
            self.sha256 = hashlib.sha256(self.data).hexdigest()
            self.size = len(self.data)


@dataclasses.dataclass
class GgufEntry:
    artifact: Artifact
    tag: str
    file: RepoFile
    modelfile: RepoFile


@dataclasses.dataclass
class PublishPlan:
    """Everything a publish will do, decided before the network is touched."""

    what: str
    repo_id: str
    revision: str
    private: bool
    run_name: str
    training: TrainingRecord | None
    manifest: ExportManifest | None
    record_dir: Path
    files: list[RepoFile]
    ggufs: list[GgufEntry] = dataclasses.field(default_factory=list)
    adapter_config: dict = dataclasses.field(default_factory=dict)
    merged_repo: str | None = None  # our published merged repo, for the GGUF card's lineage
    card: Any = None  # huggingface_hub.ModelCard

    @property
    def commit_message(self) -> str:
        return f"gptoss publish {self.what} from run {self.run_name}"

    @property
    def commit_description(self) -> str:
        total = sum(f.size or 0 for f in self.files)
        return (
            f"{len(self.files)} files, {_human_size(total)}, published by gptoss-toolchain "
            f"{_toolchain_version()} from run {self.run_name}."
        )

    def describe(self) -> str:
        total = sum(f.size or 0 for f in self.files)
        lines = [
            "gptoss publish --dry-run: nothing was sent to the Hub.",
            f"repo: {self.repo_id} (model, {'private' if self.private else 'public if created'}), "
            f"revision {self.revision}",
            f"commit message: {self.commit_message}",
            f"files ({len(self.files)}, {_human_size(total)}):",
        ]
        width = max(len(f.path_in_repo) for f in self.files)
        for f in self.files:
            source = str(f.local) if f.local is not None else "(generated)"
            lines.append(f"  {f.path_in_repo:<{width}}  {_human_size(f.size or 0):>10}  {f.sha256}  {source}")
        if self.ggufs:
            lines.append("quant tags: " + ", ".join(f"hf.co/{self.repo_id}:{g.tag}" for g in self.ggufs))
        lines += ["", "README.md (model card):", "", str(self.card)]
        return "\n".join(lines)


def _files_under(folder: Path, *, skip_names: tuple[str, ...] = ("README.md",)) -> list[Path]:
    """Regular files of a folder (recursive), without hidden files, checkpoints or temp names."""
    out = []
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder)
        if any(part.startswith(".") or part.startswith("checkpoint-") for part in rel.parts):
            continue
        if p.is_file() and not (len(rel.parts) == 1 and rel.name in skip_names):
            out.append(p)
    return out


def _plan_adapter(training_dir: Path | None, problems: list[str]) -> tuple[TrainingRecord | None, list[RepoFile], dict]:
    if training_dir is None:
        problems.append(f"--what adapter needs the training run folder (models/<run> with {TRAINING_INFO})")
        return None, [], {}
    training = TrainingRecord.load(training_dir, problems)
    adapter_dir = training_dir / ADAPTER_DIR
    missing = [n for n in ADAPTER_REQUIRED if not (adapter_dir / n).is_file()]
    if missing:
        problems.append(
            f"{adapter_dir}: missing {', '.join(missing)}; the run did not finish, re-run `gptoss train`"
        )
        return training, [], {}
    config = _read_json(adapter_dir / "adapter_config.json", problems) or {}
    files = [RepoFile(str(p.relative_to(adapter_dir).as_posix()), local=p) for p in _files_under(adapter_dir)]
    return training, files, config


def _plan_merged(manifest: ExportManifest, problems: list[str]) -> list[RepoFile]:
    where = manifest.export_dir / MANIFEST
    merged = manifest.of_kind("merged")
    if not merged:
        problems.append(f"{where}: no 'merged' folder recorded; re-run `gptoss export`")
        return []
    merged_dir = merged[0].path
    if not merged_dir.is_dir():
        problems.append(f"{merged_dir}: the merged folder named in {MANIFEST} is missing; re-run `gptoss export` (it merges again)")
        return []
    expected = {manifest.export_dir / rel: (sha, size) for rel, sha, size in merged[0].files}
    if not expected:
        problems.append(f"{where}: 'merged' lists no files; re-run `gptoss export`")
    for p in expected:
        if not p.is_file():
            problems.append(f"{p}: listed in {MANIFEST} but missing; re-run `gptoss export`")
    for name in MERGED_REQUIRED:
        if not (merged_dir / name).is_file():
            problems.append(f"{merged_dir / name} is missing; re-run `gptoss export`")
    local = _files_under(merged_dir, skip_names=("README.md", MERGE_RECORD))
    if not any(p.suffix == ".safetensors" for p in local):
        problems.append(f"{merged_dir}: no .safetensors weights; re-run `gptoss export`")
    index = merged_dir / "model.safetensors.index.json"
    if index.is_file():
        data = _read_json(index, problems) or {}
        for shard in sorted(set(_as_dict(data.get("weight_map")).values())):
            if not (merged_dir / shard).is_file():
                problems.append(f"{merged_dir / shard}: shard named in {index.name} is missing; re-run `gptoss export`")
    files = []
    for p in local:
        if expected and p not in expected:
            problems.append(f"{p}: not among the merged files of {MANIFEST} (added after export?); remove it or re-run `gptoss export`")
            continue
        sha, size = expected.get(p, (None, None))
        files.append(RepoFile(p.relative_to(merged_dir).as_posix(), local=p, expected_sha256=sha, expected_size=size))
    return files


def _plan_gguf(manifest: ExportManifest, problems: list[str]) -> tuple[list[RepoFile], list[GgufEntry]]:
    ggufs = manifest.of_kind("gguf")
    where = manifest.export_dir / MANIFEST
    if not ggufs:
        problems.append(f"{where}: no 'gguf' artifacts; run `gptoss export --run ...` first")
        return [], []
    modelfiles = list(manifest.of_kind("modelfile"))
    # A Modelfile written later by hand (`gptoss modelfile --gguf X`) sits next to its GGUF, unlisted.
    listed = {m.path.resolve() for m in modelfiles}
    for folder in sorted({a.path.parent for a in ggufs if a.path.parent.is_dir()}):
        for candidate in sorted(folder.iterdir()):
            if "Modelfile" in candidate.name and candidate.is_file() and candidate.resolve() not in listed:
                modelfiles.append(Artifact(path=candidate, rel=str(candidate.relative_to(manifest.export_dir)), kind="modelfile"))
    by_target: dict[Path, Artifact] = {}
    parsed: dict[Path, Modelfile] = {}
    for m in modelfiles:
        if not m.path.is_file():
            problems.append(f"{m.path}: Modelfile listed in {MANIFEST} is missing; run `gptoss modelfile --gguf ...`")
            continue
        try:
            mf = read_modelfile(m.path)
        except (OSError, UnicodeDecodeError, ValueError) as e:
            problems.append(f"{m.path}: unreadable Modelfile ({e})")
            continue
        parsed[m.path] = mf
        target = None
        if mf.from_ and not Path(mf.from_).is_absolute():
            target = (m.path.parent / mf.from_).resolve()
        elif mf.from_:
            problems.append(
                f"{m.path}: FROM {mf.from_} is an absolute path and will not resolve after download; "
                "regenerate it with `gptoss modelfile`"
            )
        elif m.gguf:
            target = (manifest.export_dir / m.gguf).resolve()
        if target is not None:
            by_target[target] = m
    files: list[RepoFile] = []
    entries: list[GgufEntry] = []
    tags: dict[str, str] = {}
    for a in ggufs:
        name = a.path.name
        if not a.path.is_file():
            problems.append(f"{a.path}: GGUF listed in {MANIFEST} is missing; re-run `gptoss export`")
            continue
        if not gguf_header.is_gguf(a.path):
            problems.append(f"{a.path}: not a GGUF file (bad magic); re-run `gptoss export`")
            continue
        if not a.quant:
            problems.append(f"{where}: artifact {a.rel} has no 'quant'")
            continue
        tag = gguf_quant_tag(name)
        if tag != a.quant:
            problems.append(
                f"{a.path}: the Hub would serve this file as tag {tag or '(none)'}, not {a.quant}; "
                f"name it <model>-{a.quant}.gguf"
            )
            continue
        if tag in tags:
            problems.append(f"{a.path} and {tags[tag]} both map to tag {tag}; publish one GGUF per quant")
            continue
        tags[tag] = str(a.path)
        m = by_target.get(a.path.resolve())
        if m is None:
            problems.append(
                f"{a.path}: no Modelfile (listed in {MANIFEST} or next to it) points at it; run `gptoss modelfile --gguf {a.path}`"
            )
            continue
        if m.path.parent.resolve() != a.path.parent.resolve():
            problems.append(
                f"{m.path}: must sit next to {name} so its relative FROM still resolves in the repo"
            )
            continue
        gfile = RepoFile(name, local=a.path, expected_sha256=a.sha256, expected_size=a.size)
        mfile = RepoFile(m.path.name, local=m.path, expected_sha256=m.sha256, expected_size=m.size)
        files += [gfile, mfile]
        entries.append(GgufEntry(artifact=a, tag=tag, file=gfile, modelfile=mfile))
    names = [f.path_in_repo for f in files]
    for dup in sorted({n for n in names if names.count(n) > 1}):
        problems.append(f"two files would both be uploaded as {dup}")
    # Ollama pulls from hf.co read `template`/`params`/`system` files, not the Modelfile.
    chosen = [parsed[e.modelfile.local] for e in entries if e.modelfile.local in parsed]
    if chosen:
        first = chosen[0]
        for other in chosen[1:]:
            if (other.template, other.system, other.parameters) != (first.template, first.system, first.parameters):
                problems.append(
                    f"{other.path} and {first.path} differ beyond FROM; one template serves every tag, "
                    "regenerate them with `gptoss modelfile`"
                )
                break
        if not first.template:
            problems.append(f"{first.path}: no TEMPLATE; Ollama would not speak Harmony. Regenerate it with `gptoss modelfile`")
        else:
            files.append(RepoFile(OLLAMA_TEMPLATE_FILE, data=first.template.encode()))
            files.append(RepoFile(OLLAMA_PARAMS_FILE, data=(json.dumps(first.params_json(), indent=2) + "\n").encode()))
            if first.system:
                files.append(RepoFile(OLLAMA_SYSTEM_FILE, data=first.system.encode()))
    return files, entries


def _check_args(repo_id: Any, what: Any, revision: Any, private: Any, problems: list[str]) -> str:
    if what not in WHATS:
        problems.append(f"--what {what!r}: choose one of {', '.join(WHATS)}")
    if not isinstance(repo_id, str) or repo_id.count("/") != 1:
        problems.append(f"--repo-id {repo_id!r}: give ORG/NAME (your user or organisation, a slash, the repo name)")
    else:
        from huggingface_hub.utils import HFValidationError, validate_repo_id

        try:
            validate_repo_id(repo_id)
        except HFValidationError as e:
            problems.append(f"--repo-id {repo_id!r} is not a valid Hub repo id: {e}")
    revision = str(revision) if isinstance(revision, (int, float)) and not isinstance(revision, bool) else revision
    if not isinstance(revision, str) or not revision or revision.startswith(("/", "refs/")) or ".." in revision:
        problems.append(f"--revision {revision!r}: give a branch name, e.g. main")
    if not isinstance(private, bool):
        problems.append(f"--private takes no value (got {private!r})")
    return revision


def _raise(problems: list[str], token: str | None = None) -> None:
    if not problems:
        return
    text = problems[0] if len(problems) == 1 else f"{len(problems)} problems: " + "; ".join(
        f"({i}) {p}" for i, p in enumerate(problems, 1)
    )
    raise PublishError(_scrub(text, token))


def _scrub(text: str, token: str | None) -> str:
    return text.replace(token, "***") if token else text


def _import_hub():
    try:
        import huggingface_hub
    except ImportError as e:  # the publish extra is not installed
        raise PublishError(
            "publishing needs huggingface_hub: pip install 'gptoss-toolchain[publish]'"
        ) from e
    return huggingface_hub


def _find_token() -> str | None:
    """HF_TOKEN, else the stored login (`hf auth login` writes it to HF_HOME/token); nothing else.

    Not huggingface_hub.get_token(): that may also exchange an OIDC token over the network,
    which a dry run must not do.
    """
    from huggingface_hub import constants

    token = (os.environ.get("HF_TOKEN") or "").strip()
    if not token:
        try:
            token = Path(constants.HF_TOKEN_PATH).read_text(encoding="utf-8").strip()
        except (FileNotFoundError, NotADirectoryError):
            token = ""
        except OSError as e:
            raise PublishError(f"cannot read the stored Hugging Face login {constants.HF_TOKEN_PATH} ({e.strerror})") from None
    return token or None


def _hash_and_scan(files: list[RepoFile], token: str | None, problems: list[str]) -> None:
    """sha256 of every local file, checked against the records; and no file may contain the token."""
    from tqdm.auto import tqdm

    needle = token.encode() if token else None
    total = sum(f.local.stat().st_size for f in files if f.local is not None)
    with tqdm(total=total, unit="B", unit_scale=True, desc="sha256", file=sys.stderr, disable=None) as bar:
        for f in files:
            if f.local is None:
                if needle and needle in f.data:
                    problems.append(f"{f.path_in_repo} would contain your Hugging Face token; refusing to upload it")
                continue
            h = hashlib.sha256()
            size = 0
            tail = b""
            leaked = False
            with open(f.local, "rb") as fh:
                while chunk := fh.read(_HASH_CHUNK):
                    h.update(chunk)
                    size += len(chunk)
                    if needle and not leaked:
                        leaked = needle in tail + chunk
                        tail = chunk[-(len(needle) - 1):] if len(needle) > 1 else b""
                    bar.update(len(chunk))
            f.sha256, f.size = h.hexdigest(), size
            if leaked:
                problems.append(f"{f.local} contains your Hugging Face token; remove it before publishing")
            if f.expected_size is not None and f.expected_size != size:
                problems.append(
                    f"{f.local}: {size} bytes, but the record says {f.expected_size}; "
                    "the file changed after export, re-run the stage that wrote it"
                )
            elif f.expected_sha256 and f.expected_sha256.removeprefix("sha256:") != f.sha256:
                problems.append(
                    f"{f.local}: sha256 {f.sha256} differs from the record ({f.expected_sha256}); "
                    "the file changed after export, re-run the stage that wrote it"
                )


NO_TOKEN = "no Hugging Face token: set HF_TOKEN or run `hf auth login` (a write token)"


def plan_publish(
    *, run: str | os.PathLike, repo_id: str, what: str, revision: str = "main", private: bool = False,
    token: str | None = None, need_token: bool = False, models_dir: str | os.PathLike | None = None,
    exports_dir: str | os.PathLike | None = None,
) -> PublishPlan:
    """Read the records, check every file, build the card; touches no network.

    ``token`` (when known) is only used to make sure no uploaded file contains it; with
    ``need_token`` its absence is reported together with every other problem.
    """
    _import_hub()
    problems: list[str] = []
    if need_token and not token:
        problems.append(NO_TOKEN)
    revision = _check_args(repo_id, what, revision, private, problems)
    if isinstance(run, (str, os.PathLike)) and str(run):
        training_dir, export_dir = _locate(Path(run).expanduser(), problems, models_dir=models_dir,
                                           exports_dir=exports_dir)
    else:
        problems.append(f"--run {run!r}: give the run folder (models/<run> or exports/<run>)")
        training_dir = export_dir = None

    training = manifest = None
    files: list[RepoFile] = []
    ggufs: list[GgufEntry] = []
    adapter_config: dict = {}
    record_dir = training_dir if what == "adapter" else export_dir
    if what == "adapter" and (training_dir or export_dir):
        training, files, adapter_config = _plan_adapter(training_dir, problems)
    elif what in WHATS and (training_dir or export_dir):
        if export_dir is None:
            problems.append(
                f"--what {what} needs the export folder (exports/<run> with {MANIFEST}); run `gptoss export` first"
            )
        else:
            manifest = ExportManifest.load(export_dir, problems)
        if training_dir is not None:
            training = TrainingRecord.load(training_dir, problems)
            adapter_cfg_path = training_dir / ADAPTER_DIR / "adapter_config.json"
            if adapter_cfg_path.is_file():
                adapter_config = _read_json(adapter_cfg_path, problems) or {}
        if manifest is not None and what == "merged":
            files = _plan_merged(manifest, problems)
        elif manifest is not None:
            files, ggufs = _plan_gguf(manifest, problems)
    _raise(problems, token)

    _hash_and_scan(files, token, problems)
    _raise(problems, token)

    run_name = (training.name if training else None) or (manifest.run and Path(manifest.run).name) or record_dir.name
    plan = PublishPlan(
        what=what, repo_id=repo_id, revision=revision, private=private, run_name=run_name,
        training=training, manifest=manifest, record_dir=record_dir, files=files, ggufs=ggufs,
        adapter_config=adapter_config,
    )
    if what == "gguf":
        plan.merged_repo = _published(export_dir).get("merged", {}).get("repo_id")
    from huggingface_hub import ModelCard

    plan.card = ModelCard(build_card_text(plan))
    card_file = RepoFile("README.md", data=str(plan.card).encode())
    _hash_and_scan([card_file], token, problems)
    _raise(problems, token)
    plan.files.append(card_file)
    return plan


# --------------------------------------------------------------------------------------------
# The model card.


def _public(value: Any) -> Any:
    """Local absolute paths reduced to their last component: cards must not leak home folders."""
    if isinstance(value, dict):
        return {k: _public(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_public(v) for v in value]
    if isinstance(value, str) and (value.startswith(("/", "~")) or re.match(r"^[A-Za-z]:\\", value)):
        return f"<local>/{Path(value).name}"
    return value


def _human_size(n: int) -> str:
    return human_bytes(n, digits=2)


def _fmt(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _toolchain_version() -> str:
    return package_version("gptoss-toolchain") or "unknown"


def _published(folder: Path | None) -> dict:
    if folder is None or not Published.exists(folder):
        return {}
    record = Published.try_load(folder, [])  # unreadable: the card links nothing published
    if record is None:
        return {}
    from huggingface_hub import constants

    return {k: dataclasses.asdict(v) for k in WHATS if (v := getattr(record, k)) is not None
            and v.endpoint == constants.ENDPOINT}


def card_metadata(plan: PublishPlan) -> dict:
    """The YAML header: what the Hub indexes (base model lineage, library, license, data, tags)."""
    training = plan.training
    base = training.base_model if training else plan.manifest.base_model if plan.manifest else None
    base = base if isinstance(base, str) else None
    relation = {"adapter": "adapter", "merged": "finetune", "gguf": "quantized"}[plan.what]
    base_model = base if _is_hub_id(base) else None
    if plan.what == "gguf" and plan.merged_repo:
        base_model = plan.merged_repo  # quantized from our merged fine-tune, which points at the base
    tags = ["gpt-oss", "harmony", "gptoss-toolchain"]
    tags += {"adapter": ["lora", "peft"], "merged": ["safetensors"], "gguf": ["gguf", "llama.cpp", "ollama"]}[plan.what]
    if training and (training.backend == "unsloth" or (base or "").lower().startswith("unsloth/")):
        tags.append("unsloth")
    meta: dict[str, Any] = {
        "base_model": base_model,
        "library_name": {"adapter": "peft", "merged": "transformers", "gguf": "gguf"}[plan.what],
        "pipeline_tag": "text-generation",
        "license": "apache-2.0",
        "tags": tags,
    }
    if base_model:
        meta["base_model_relation"] = relation
    if training and _is_hub_id(training.dataset_id):
        meta["datasets"] = [training.dataset_id]
    return meta


def build_card_text(plan: PublishPlan) -> str:
    from huggingface_hub import ModelCardData

    meta = card_metadata(plan)
    data = ModelCardData(**{k: v for k, v in meta.items() if v is not None})
    body = _card_body(plan)
    return f"---\n{data.to_yaml()}\n---\n\n{body}"


def _card_body(plan: PublishPlan) -> str:
    t = plan.training
    repo = plan.repo_id
    base = t.base_model if t else (plan.manifest.base_model if plan.manifest else None)
    base_shown = base if _is_hub_id(base) else _public(base) or "(not recorded)"
    dataset_shown = (t.dataset_id if _is_hub_id(t.dataset_id) else _public(t.dataset_id)) if t else None
    kind_line = {
        "adapter": f"A LoRA adapter for `{base_shown}`",
        "merged": f"`{base_shown}` with a LoRA fine-tune merged into bf16 weights",
        "gguf": f"GGUF quantizations of a fine-tune of `{base_shown}`"
        + (f" (converted from [`{plan.merged_repo}`](https://huggingface.co/{plan.merged_repo}))" if plan.merged_repo else ""),
    }[plan.what]
    out = [f"# {repo.split('/')[1]}", ""]
    data_part = f", trained on `{dataset_shown}`" if dataset_shown else ""
    out += [
        f"{kind_line}{data_part}, made with gptoss-toolchain from run `{plan.run_name}`.",
        "",
        "gpt-oss speaks the [Harmony](https://github.com/openai/harmony) chat format: use the chat template "
        "shipped here (or the Modelfile / `template` for Ollama) and stop on `<|return|>` / `<|call|>`, "
        "not `<|end|>`. Reasoning goes to the `analysis` channel, the answer to `final`.",
        "",
    ]
    if plan.what == "gguf":
        out += _quant_section(plan)
    out += _usage_section(plan, base_shown)
    out += _training_section(plan)
    out += _provenance_section(plan)
    out += [
        "## License",
        "",
        "Apache-2.0, as the gpt-oss-20b base model. Check the license of the training data before reuse.",
        "",
    ]
    return "\n".join(out)


def _quant_section(plan: PublishPlan) -> list[str]:
    m = plan.manifest
    prompts = f"{m.fidelity_prompts} fixed Harmony prompts" if m and m.fidelity_prompts else "a fixed Harmony prompt set"
    out = [
        "## Quantizations",
        "",
        "Figures from the export record (`manifest.json`): size, tensor types, how many tensors fell back "
        f"to another type, and fidelity of the logits on {prompts} against the reference below "
        "(NMSE, mean KL divergence, top-1 agreement).",
        "",
        "| Tag | File | Size | Tensor types | Fallbacks | NMSE | KL | Top-1 | sha256 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    any_fallback = False
    references: dict[str, list[str]] = {}
    failed = []
    for e in plan.ggufs:
        a = e.artifact
        fid = a.fidelity or {}
        types = ", ".join(f"{k}×{v}" for k, v in sorted((a.tensor_types or {}).items(), key=lambda kv: -kv[1])) or "n/a"
        fallbacks = a.fallbacks
        if isinstance(fallbacks, list):
            fallbacks = len(fallbacks)
        any_fallback |= bool(fallbacks)
        if isinstance(fid.get("nmse"), (int, float)):
            top1 = fid.get("top1")
            top1 = f"{top1 * 100:.1f}%" if isinstance(top1, (int, float)) else _fmt(top1)
            nmse, kl = _fmt(fid.get("nmse")), _fmt(fid.get("kl"))
            references.setdefault(str(fid.get("reference") or "not recorded"), []).append(e.tag)
            if fid.get("passed") is False:
                failed.append(e.tag)
        elif a.quant in ("F16", "BF16", "F32"):
            nmse = kl = top1 = "ref."  # not measured itself; the reference the other quants are measured against
        else:
            nmse = kl = top1 = "n/a"
        out.append(
            f"| `{e.tag}` | `{e.file.path_in_repo}` | {_human_size(e.file.size or 0)} | {types} | {_fmt(fallbacks)} "
            f"| {nmse} | {kl} | {top1} | `{e.file.sha256[:12]}` |"
        )
    out.append("")
    if references:
        out += ["Fidelity references: " + "; ".join(
            f"{', '.join(f'`{t}`' for t in tags)} against {f'`{ref}`' if ref.endswith('.gguf') else ref}"
            for ref, tags in references.items()) + ".", ""]
    if failed:
        out += [f"{', '.join(f'`{t}`' for t in failed)} did not meet the export's fidelity thresholds "
                "(recorded in `manifest.json`); prefer another quant.", ""]
    if any_fallback:
        out += [
            "Fallbacks are tensors that the quant type could not hold: K-quants need rows that are multiples "
            "of 256 and gpt-oss-20b's width 2880 is not, so llama.cpp stores those tensors in another type "
            "(for example Q5_0/Q5_1). The counts above say how many.",
            "",
        ]
    return out


def _usage_section(plan: PublishPlan, base_shown: str) -> list[str]:
    repo = plan.repo_id
    out = ["## Usage", ""]
    tokenizer_call = (
        'inputs = tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=True,\n'
        '                                 return_tensors="pt", reasoning_effort="medium").to(model.device)\n'
        "out = model.generate(**inputs, max_new_tokens=512)\n"
        'print(tok.decode(out[0, inputs["input_ids"].shape[1]:]))'
    )
    messages = 'messages = [{"role": "user", "content": "Explain MoE routing in two sentences."}]'
    serve_request = (
        "curl -s localhost:8000/v1/chat/completions -H 'Content-Type: application/json' \\\n"
        "  -d '{\"model\": \"gpt-oss\", \"messages\": [{\"role\": \"user\", \"content\": \"Hello\"}], "
        "\"reasoning_effort\": \"low\"}'\n"
        "# message.content is the final answer, message.reasoning_content the analysis, tool calls in tool_calls"
    )
    if plan.what == "adapter":
        out += [
            "### transformers + PEFT", "", "```python",
            "from peft import PeftModel",
            "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
            f'base = AutoModelForCausalLM.from_pretrained("{base_shown}", torch_dtype="auto", device_map="auto")',
            f'model = PeftModel.from_pretrained(base, "{repo}")',
            f'tok = AutoTokenizer.from_pretrained("{repo}")',
            messages, tokenizer_call, "```", "",
            "### llama.cpp and Ollama", "",
            "Use the GGUF repo published from the same run, if there is one, or merge into bf16 weights "
            "(never into 4-bit) and convert with llama.cpp:", "", "```bash",
            f"hf download {repo} --local-dir adapter",
            f"gptoss merge --base {base_shown} --adapter adapter --out merged",
            *_convert_lines(), "```", "",
            "### gptoss serve (OpenAI-compatible API)", "", "```bash",
            f"hf download {repo} --local-dir adapter",
            f"gptoss serve --backend transformers --model {base_shown} --adapter adapter --port 8000",
            serve_request, "```", "",
        ]
    elif plan.what == "merged":
        out += [
            "### transformers", "", "```python",
            "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
            f'model = AutoModelForCausalLM.from_pretrained("{repo}", torch_dtype="auto", device_map="auto")',
            f'tok = AutoTokenizer.from_pretrained("{repo}")',
            messages, tokenizer_call, "```", "",
            "### llama.cpp and Ollama", "",
            "Use the GGUF repo published from the same run, if there is one, or convert with llama.cpp:", "",
            "```bash", f"hf download {repo} --local-dir merged", *_convert_lines(), "```", "",
            "### gptoss serve (OpenAI-compatible API)", "", "```bash",
            f"hf download {repo} --local-dir merged",
            "gptoss serve --backend transformers --model merged --port 8000",
            serve_request, "```", "",
        ]
    else:
        tags = [e.tag for e in plan.ggufs]
        tag = DEFAULT_TAG if DEFAULT_TAG in tags else tags[0]
        entry = next(e for e in plan.ggufs if e.tag == tag)
        gguf_name, modelfile_name = entry.file.path_in_repo, entry.modelfile.path_in_repo
        transformers_hint = (
            f"Load the merged safetensors from [`{plan.merged_repo}`](https://huggingface.co/{plan.merged_repo})."
            if plan.merged_repo else
            "Use the merged safetensors published from the same run (`gptoss publish --what merged`)."
        )
        out += [
            "Every quant is served by tag: " + ", ".join(f"`hf.co/{repo}:{t}`" for t in tags)
            + (f" (`{DEFAULT_TAG}` is the default)." if DEFAULT_TAG in tags else "."), "",
            "### llama.cpp", "", "```bash",
            f"llama-server -hf {repo}:{tag} --jinja",
            f"llama-cli -hf {repo}:{tag} --jinja", "```", "",
            "### Ollama", "",
            "Straight from the Hub (the repo's `template` and `params` files carry the Harmony template and "
            "the gpt-oss sampling defaults):", "", "```bash",
            f"ollama run hf.co/{repo}:{tag}", "```", "",
            "or with the Modelfile shipped next to each GGUF:", "", "```bash",
            f"hf download {repo} {gguf_name} {modelfile_name} --local-dir .",
            f"ollama create {repo.split('/')[1].lower()} -f {modelfile_name}",
            f"ollama run {repo.split('/')[1].lower()} --think high", "```", "",
            "### transformers", "", transformers_hint, "",
            "### gptoss serve (OpenAI-compatible API)", "", "```bash",
            f"hf download {repo} {gguf_name} --local-dir .",
            f"gptoss serve --backend llamacpp --model {gguf_name} --port 8000",
            serve_request, "```", "",
        ]
    return out


def _convert_lines() -> list[str]:
    return [
        "python convert_hf_to_gguf.py merged --outtype f16 --outfile model-F16.gguf   # llama.cpp's converter",
        "llama-quantize model-F16.gguf model-Q4_K_M.gguf Q4_K_M",
        "# then a Modelfile that speaks Harmony: gptoss modelfile --gguf model-Q4_K_M.gguf",
    ]


def _training_section(plan: PublishPlan) -> list[str]:
    t = plan.training
    out = ["## Training", ""]
    if t is None:
        return out + ["No gptoss training record was found for this export, so the training is not described here.", ""]
    rows = [
        ("Run", f"`{t.name}`"),
        ("Base model", f"`{t.base_model if _is_hub_id(t.base_model) else _public(t.base_model)}`"
         + (f" @ `{t.base_revision}`" if t.base_revision else " (revision not recorded)")),
        ("Dataset", f"`{t.dataset_id if _is_hub_id(t.dataset_id) else _public(t.dataset_id)}`"
         + (f" @ `{t.dataset_revision}`" if t.dataset_revision else "")),
        ("Dataset content sha256", f"`{t.dataset_hash}`"),
        ("Backend", _fmt(t.backend)),
        ("Steps", _fmt(t.steps)),
    ]
    ac = plan.adapter_config
    if ac:
        targets = ac.get("target_modules")
        targets = sorted(targets) if isinstance(targets, list) else targets
        rows += [
            ("LoRA rank / alpha", f"{_fmt(ac.get('r'))} / {_fmt(ac.get('lora_alpha'))}"
             + (" (rsLoRA)" if ac.get("use_rslora") else "")),
            ("LoRA target modules", f"`{targets}`"),
            ("LoRA target parameters (experts)", f"`{ac.get('target_parameters') or 'none'}`"),
        ]
    m = plan.manifest
    if m is not None and m.merge_into in ("original", "dequantized"):
        shown = m.base_model if _is_hub_id(m.base_model or "") else _public(m.base_model or "")
        rows.append(("Merged into", f"the 16-bit original `{shown}` of the 4-bit base trained on" if m.merge_into == "original"
                     else "the 4-bit base trained on, dequantized (`--merge-into dequantized`)"))
    rows += [(k, _fmt(v)) for k, v in t.metrics.items()]
    out += ["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows] + [""]
    if t.loss:
        out += ["Loss summary:", "", "| | |", "|---|---|"] + [f"| {k} | {_fmt(v)} |" for k, v in t.loss.items()] + [""]
    else:
        out += ["Loss summary: not recorded.", ""]
    if t.config:
        out += [
            "<details><summary>Resolved training configuration</summary>", "", "```json",
            json.dumps(_public(t.config), indent=2, sort_keys=True), "```", "", "</details>", "",
        ]
    return out


def _provenance_section(plan: PublishPlan) -> list[str]:
    out = ["## Provenance", "", f"Published by gptoss-toolchain {_toolchain_version()} from run `{plan.run_name}`.", ""]
    m = plan.manifest
    if m is not None:
        out += [f"- llama.cpp commit: `{m.llama_cpp_commit or 'not recorded'}`"]
        if m.base_model:
            shown = m.base_model if _is_hub_id(m.base_model) else _public(m.base_model)
            out.append(f"- base model merged into: `{shown}`" + (f" @ `{m.base_revision}`" if m.base_revision else ""))
        if m.adapter_sha256:
            out.append(f"- adapter weights (`adapter_model.safetensors`) sha256: `{m.adapter_sha256}`")
        if m.merge_identity:
            out.append(f"- merge identity (hash of the merge inputs and settings): `{m.merge_identity}`")
        out.append("")
    versions: dict[str, dict] = {}
    if plan.training:
        versions["training"] = plan.training.versions
    if m is not None:
        versions["export"] = m.versions
    for stage, table in versions.items():
        if table:
            out += [f"Package versions ({stage}):", "", "| package | version |", "|---|---|"]
            out += [f"| {k} | {_fmt(v)} |" for k, v in sorted(table.items())] + [""]
    out += ["Files (sha256):", "", "| file | size | sha256 |", "|---|---|---|"]
    out += [f"| `{f.path_in_repo}` | {f.size} | `{f.sha256}` |" for f in plan.files] + [""]
    return out


# --------------------------------------------------------------------------------------------
# The Hub.


def _existing_kind(paths: list[str]) -> str | None:
    names = {Path(p).name for p in paths}
    if any(p.endswith(".gguf") for p in paths):
        return "gguf"
    if "adapter_config.json" in names:
        return "adapter"
    if "config.json" in names or any(p.endswith(".safetensors") for p in paths):
        return "merged"
    return None


def _http_errors() -> tuple[type[Exception], ...]:
    """The HTTP client's base error: httpx under huggingface_hub 1.x, httpx2 under 2.x."""
    import importlib

    out = []
    for name in ("httpx", "httpx2"):
        try:
            out.append(importlib.import_module(name).HTTPError)
        except ImportError:
            pass
    return tuple(out)


def _is_artifact_file(path: str) -> bool:
    """Files a publish owns: weights, shard indexes, Modelfiles and the Ollama files of a GGUF repo."""
    name = Path(path).name
    return (
        Path(name).suffix in (".safetensors", ".gguf", ".bin", ".pt", ".pth", ".Modelfile")
        or name.endswith(".index.json")
        or name == "Modelfile"
        or path in (OLLAMA_TEMPLATE_FILE, OLLAMA_PARAMS_FILE, OLLAMA_SYSTEM_FILE)
    )


def _hub_error(e: BaseException, token: str | None, what: str) -> PublishError:
    detail = str(e).strip().splitlines()
    detail = " ".join(line.strip() for line in detail if line.strip())[:500]
    return PublishError(_scrub(f"{what}: {type(e).__name__}: {detail}", token))


def _upload(plan: PublishPlan, token: str) -> str:
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi, constants
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

    api = HfApi(token=token)
    repo_id = plan.repo_id
    endpoint = constants.ENDPOINT
    network_errors = (HfHubHTTPError, OSError, *_http_errors())
    try:
        api.whoami()
    except HfHubHTTPError as e:
        if e.response is not None and e.response.status_code == 401:
            raise PublishError(
                f"the Hub at {endpoint} rejected your token (HF_TOKEN or `hf auth login`); "
                "create a write token at https://huggingface.co/settings/tokens"
            ) from None
        raise _hub_error(e, token, f"cannot check your token at {endpoint}") from None
    except network_errors as e:
        raise _hub_error(e, token, f"cannot reach the Hub at {endpoint}") from None

    try:
        try:
            info = api.model_info(repo_id)
        except RepositoryNotFoundError:
            info = None
        if info is None:
            for other in ("dataset", "space"):
                if api.repo_exists(repo_id, repo_type=other):
                    raise PublishError(
                        f"--repo-id {repo_id} already exists as a {other} repo, not a model repo; "
                        "choose another --repo-id"
                    )
        else:
            if plan.private and info.private is False:
                raise PublishError(
                    f"--private: {repo_id} already exists and is public; make it private on the Hub first "
                    "or publish to another --repo-id"
                )
            try:
                head = api.model_info(repo_id, revision=plan.revision)
            except RevisionNotFoundError:
                head = info
            kind = _existing_kind([s.rfilename for s in head.siblings or []])
            if kind is not None and kind != plan.what:
                held = {"adapter": "an adapter", "merged": "a merged model", "gguf": "GGUF files"}[kind]
                raise PublishError(
                    f"--repo-id {repo_id} already holds {held}; publish the {plan.what} to its own repo "
                    f"(e.g. {repo_id}-{plan.what.upper() if plan.what == 'gguf' else plan.what})"
                )
        if info is None:
            api.create_repo(repo_id, repo_type="model", private=plan.private, exist_ok=True)
            print(f"created {'private ' if plan.private else ''}model repo {repo_id}", file=sys.stderr)
        try:
            remote = api.model_info(repo_id, revision=plan.revision)
        except RevisionNotFoundError:
            api.create_branch(repo_id, branch=plan.revision, exist_ok=True)
            print(f"created branch {plan.revision}", file=sys.stderr)
            remote = api.model_info(repo_id, revision=plan.revision)
    except PublishError:
        raise
    except network_errors as e:
        raise _hub_error(e, token, f"preparing {repo_id} on {endpoint} failed; nothing was uploaded") from None

    operations: list = []
    for f in plan.files:
        op = CommitOperationAdd(f.path_in_repo, str(f.local) if f.local is not None else f.data)
        op.upload_info.sha256 = bytes.fromhex(f.sha256)  # already computed and checked above
        operations.append(op)
    # Weights and Ollama files of an earlier publish that this one does not replace would leave the
    # repo inconsistent (two files for one quant tag, stale shards, a `system` the new Modelfile lacks).
    uploading = {f.path_in_repo for f in plan.files}
    stale = sorted(s.rfilename for s in remote.siblings or [] if _is_artifact_file(s.rfilename) and s.rfilename not in uploading)
    operations += [CommitOperationDelete(path) for path in stale]
    description = plan.commit_description
    if stale:
        description += f" Removed from the previous publish: {', '.join(stale)}."
        print(f"removing {len(stale)} files of the previous publish: {', '.join(stale)}", file=sys.stderr)
    total = sum(f.size or 0 for f in plan.files)
    print(f"uploading {len(plan.files)} files ({_human_size(total)}) to {repo_id}@{plan.revision}", file=sys.stderr)
    # One create_commit: with hf_xet installed (a huggingface_hub 1.x dependency) files go through Xet,
    # which deduplicates chunks already uploaded; without it (or HF_HUB_DISABLE_XET=1) through LFS,
    # where the batch API skips objects the Hub already holds. Transfers are retried by http_backoff
    # (429/5xx/network errors, 5 tries). upload_folder would need a staging folder and splits big
    # uploads into "(part N)" commits; upload_large_folder is deprecated and cannot name the commit.
    try:
        commit = api.create_commit(
            repo_id,
            operations,
            commit_message=plan.commit_message,
            commit_description=description,
            revision=plan.revision,
        )
    except (RuntimeError, ValueError, *network_errors) as e:
        # huggingface_hub wraps a failed LFS upload as RuntimeError("Error while uploading 'x' ...") from the cause.
        reason = e.__cause__ if isinstance(e, RuntimeError) and e.__cause__ is not None else e
        where = f"{e} " if reason is not e else ""
        raise _hub_error(
            reason, token,
            f"upload to {repo_id} did not complete; nothing was committed. Re-run the same command to resume: "
            f"files already on the Hub are not sent again. {where}Reason",
        ) from None
    changed = commit.oid != remote.sha
    _write_record(plan, commit, endpoint, changed)
    print(
        f"{'committed' if changed else 'already up to date, nothing committed'}: {commit.commit_url}",
        file=sys.stderr,
    )
    return commit.commit_url


def _write_record(plan: PublishPlan, commit, endpoint: str, changed: bool) -> None:
    record = (Published.try_load(plan.record_dir, []) if Published.exists(plan.record_dir) else None) or Published()
    setattr(record, plan.what, PublishedRepo(
        repo_id=plan.repo_id,
        revision=plan.revision,
        commit=commit.oid,
        commit_url=commit.commit_url,
        endpoint=endpoint,
        private=plan.private,
        run=plan.run_name,
        files={f.path_in_repo: f.sha256 for f in plan.files},
    ))
    record.write(plan.record_dir)


def publish(
    *,
    run: str,
    repo_id: str,
    what: Literal["adapter", "merged", "gguf"],
    private: bool = False,
    revision: str = "main",
    dry_run: bool = False,
    models_dir: str | None = None,
    exports_dir: str | None = None,
) -> str:
    """Publish a run's adapter, merged model or GGUFs to the Hugging Face Hub, with a model card.

    Args:
        run: the run folder: models/<run> (training) or exports/<run> (export); the other is found beside it.
        repo_id: the model repo, ORG/NAME; created when missing.
        what: adapter (PEFT LoRA), merged (bf16 safetensors) or gguf (every quant + Modelfiles, pullable as hf.co/ORG/NAME:QUANT).
        private: create the repo private (an existing public repo is refused).
        revision: branch to commit to; created from main when missing.
        dry_run: print the file list and the model card; nothing is sent.
        models_dir: where training runs are (default: beside the exports folder, ./models).
        exports_dir: where exports are (default: beside the models folder, ./exports).
    Returns:
        The commit URL (or, with --dry-run, the plan).
    """
    _import_hub()
    token = _find_token()
    plan = plan_publish(
        run=run, repo_id=repo_id, what=what, revision=revision, private=private, token=token,
        need_token=not dry_run, models_dir=models_dir, exports_dir=exports_dir,
    )
    if dry_run:
        return _scrub(plan.describe(), token)
    return _upload(plan, token)
