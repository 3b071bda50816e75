"""The records stages leave beside their output, one typed dataclass per file.

Each record knows its file name, the command that writes it and its schema version; ``write()``
goes through the one atomic JSON writer and ``load()`` checks every field against the dataclass,
reporting all problems at once with the file, the field and the command to run again. No other
code opens these files. ``python -m gptoss.records`` prints the field reference (docs/RECORDS.md,
which a test keeps equal to it).
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import types
import typing
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from gptoss.errors import ToolchainError

R = TypeVar("R", bound="Record")


class RecordError(ToolchainError):
    """A record file that is missing, unreadable or does not match its dataclass."""


def write_json_atomic(path: str | os.PathLike, data: Any) -> Path:
    """Write JSON to a temporary name in the same folder, fsync, rename: readers see all or nothing."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.partial-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2, ensure_ascii=False, default=str)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's 0600 would hide the record from other users and containers
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def field(doc: str, default: Any = dataclasses.MISSING, *, factory: Any = dataclasses.MISSING) -> Any:
    """A dataclass field with its documentation (shown in docs/RECORDS.md)."""
    return dataclasses.field(default=default, default_factory=factory, metadata={"doc": doc})


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "null"
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return tp.__name__
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list[{_type_name(typing.get_args(tp)[0])}]" if typing.get_args(tp) else "list"
    if origin is dict or tp is dict:
        return "object"
    if tp is Any:
        return "any"
    return {str: "string", int: "integer", float: "number", bool: "boolean"}.get(tp, getattr(tp, "__name__", str(tp)))


def _convert(value: Any, tp: Any, where: str, problems: list[str]) -> Any:
    """``value`` as ``tp`` (nested dataclasses built), or a problem naming ``where``."""
    if tp is Any:
        return value
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        others = [a for a in args if a is not type(None)]
        if len(others) == 1:
            return _convert(value, others[0], where, problems)
        for arg in args:
            if arg is not type(None):
                trial: list[str] = []
                out = _convert(value, arg, where, trial)
                if not trial:
                    return out
        problems.append(f"field '{where}' should be {_type_name(tp)}, found {_short(value)}")
        return None
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            problems.append(f"field '{where}' should be an object ({tp.__name__}), found {_short(value)}")
            return None
        return _build(tp, value, where + ".", problems)
    if origin is list or tp is list:
        if not isinstance(value, list):
            problems.append(f"field '{where}' should be a list, found {_short(value)}")
            return None
        (item,) = typing.get_args(tp) or (Any,)
        return [_convert(v, item, f"{where}[{i}]", problems) for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            problems.append(f"field '{where}' should be an object, found {_short(value)}")
            return None
        return value
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: isinstance(value, str),
    }.get(tp)
    if ok is None:
        raise TypeError(f"records: unsupported field type {tp!r} at {where}")
    if not ok:
        problems.append(f"field '{where}' should be {_type_name(tp)}, found {_short(value)}")
        return None
    return value


def _short(value: Any) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


def _build(cls: type, data: dict, prefix: str, problems: list[str]):
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        if f.name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                problems.append(f"field '{prefix}{f.name}' is missing")
            continue
        kwargs[f.name] = _convert(data[f.name], hints[f.name], prefix + f.name, problems)
    try:
        return cls(**kwargs)
    except TypeError:  # a required field was missing: already reported
        return None


@dataclasses.dataclass
class Record:
    """Base of every record: file name, writer command, schema version, write() and load()."""

    FILE: ClassVar[str]
    COMMAND: ClassVar[str]  # the command that writes the record (named in every error)
    SCHEMA_VERSION: ClassVar[int] = 1

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def write(self, where: str | os.PathLike) -> Path:
        """Write atomically to ``where`` (a folder gets the record's file name)."""
        return write_json_atomic(self.file_in(where), self.to_dict())

    @classmethod
    def file_in(cls, where: str | os.PathLike) -> Path:
        """The record's file: ``where`` itself when it names a .json file, else ``where/FILE``."""
        p = Path(where)
        return p if p.name == cls.FILE or p.suffix == ".json" else p / cls.FILE

    @classmethod
    def exists(cls, where: str | os.PathLike) -> bool:
        return cls.file_in(where).is_file()

    @classmethod
    def from_dict(cls: type[R], data: dict, *, source: str = "record") -> R:
        problems: list[str] = []
        version = data.get("schema_version", data.get("format", 1))  # `format`: the name before schema_version
        if isinstance(version, int) and version > cls.SCHEMA_VERSION:
            raise RecordError(f"{source}: schema_version {version} is newer than this gptoss reads "
                              f"({cls.SCHEMA_VERSION}); upgrade gptoss-toolchain or re-run `{cls.COMMAND}`")
        data = {**data, "schema_version": cls.SCHEMA_VERSION}
        data.pop("format", None) if "format" not in {f.name for f in dataclasses.fields(cls)} else None
        record = _build(cls, data, "", problems)
        if problems or record is None:
            raise RecordError(f"{source}: {'; '.join(problems)}; it is written by `{cls.COMMAND}`, run it again")
        return record

    @classmethod
    def load(cls: type[R], where: str | os.PathLike) -> R:
        """The record in ``where`` (its folder or the file), checked against the dataclass."""
        path = cls.file_in(where)
        if not path.is_file():
            raise RecordError(f"{path} is missing; `{cls.COMMAND}` writes it")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise RecordError(f"{path} is not readable JSON ({e}); re-run `{cls.COMMAND}`") from e
        if not isinstance(data, dict):
            raise RecordError(f"{path} should hold a JSON object; re-run `{cls.COMMAND}`")
        return cls.from_dict(data, source=str(path))

    @classmethod
    def try_load(cls: type[R], where: str | os.PathLike, problems: list[str]) -> R | None:
        """``load``, with the error appended to ``problems`` (for readers that report all problems at once)."""
        try:
            return cls.load(where)
        except RecordError as e:
            problems.append(str(e))
            return None


# ---------------------------------------------------------------------------------------------
# Training: models/<run>/


@dataclasses.dataclass
class DataInfo(Record):
    """What a run trained on, as read (also the ``dataset`` of training_info.json)."""

    FILE: ClassVar[str] = "data.json"
    COMMAND: ClassVar[str] = "gptoss train"

    content_sha256: str = field("sha256 of the rows as read (resume refuses a changed dataset)")
    id: str | None = field("Hub dataset id (null for a local file)", None)
    path: str | None = field("local .jsonl/.parquet file (null for a Hub dataset)", None)
    format: str | None = field("source kind: hub, jsonl or parquet", None)
    split: str | None = field("split of a Hub dataset", None)
    revision: str | None = field("Hub commit of the dataset", None)
    file_sha256: str | None = field("sha256 of the local file's bytes", None)
    rows: dict = field("row counts: read, used, dropped, ...", factory=dict)
    train_examples: int | None = field("rows used for training", None)
    eval_examples: int | None = field("rows held out for the eval loss", None)
    train_tokens: int | None = field("tokens in the training rows", None)
    train_supervised_tokens: int | None = field("of those, tokens with a loss", None)
    schema_version: int = field("schema of this record", 1)


@dataclasses.dataclass
class RankMemory:
    """Peak memory of one training process."""

    rank: int = field("the process's rank (0 writes the run)")
    cpu_rss_bytes: int | None = field("peak resident memory of the process", None)
    cuda_allocated_bytes: int | None = field("peak memory torch allocated on its GPU (null on CPU)", None)
    cuda_reserved_bytes: int | None = field("peak memory torch's allocator reserved on its GPU (null on CPU)", None)
    cuda_device: str | None = field("its GPU's name (null on CPU)", None)


@dataclasses.dataclass
class DataParallel:
    """How many processes trained the run and how big an optimizer step was."""

    world_size: int = field("training processes, one per GPU (1: no torch.distributed)")
    per_device_batch_size: int = field("rows per micro-batch in each process (--batch-size)")
    grad_accum: int = field("micro-batches per optimizer step in each process (--grad-accum)")
    effective_batch_size: int = field("rows per optimizer step: per_device_batch_size x grad_accum x world_size")
    launcher: str = field("plain (one process) or torchrun", "plain")
    process_group_backend: str | None = field("nccl (GPUs) or gloo (CPU); null for one process", None)
    peak_memory_per_rank: list[RankMemory] = field("peak memory of each process, by rank", factory=list)


@dataclasses.dataclass
class TrainingInfo(Record):
    """``models/<run>/training_info.json``: a finished run; written last, before the rename."""

    FILE: ClassVar[str] = "training_info.json"
    COMMAND: ClassVar[str] = "gptoss train"

    base_model: str = field("the base trained on: a Hub id or a local folder")
    schema_version: int = field("schema of this record", 1)
    run: str | None = field("run name (the folder's name)", None)
    base_model_revision: str | None = field("Hub commit of the base trained on (null for a local folder)", None)
    base_layout: str | None = field("checkpoint layout of the base: fused or split (gptoss/layouts.py)", None)
    base_quantization: str | None = field("quantization of the base: none, mxfp4 or bnb-4bit", None)
    merge_base: str | None = field("the 16-bit original a 4-bit base merges into (null: merges into itself)", None)
    backend: str | None = field("training backend: transformers or unsloth", None)
    device: str | None = field("cpu or cuda", None)
    profile: str | None = field("training profile (training/profiles/<profile>.toml)", None)
    adapter: str = field("adapter folder, relative to the run", "adapter")
    started_at: str | None = field("start time, ISO 8601 UTC", None)
    finished_at: str | None = field("end time, ISO 8601 UTC", None)
    steps: int | None = field("optimizer steps done", None)
    max_steps: int | None = field("optimizer steps asked for", None)
    resumed_from_step: int | None = field("checkpoint step a --resume continued from", None)
    tokens: int | None = field("tokens seen", None)
    supervised_tokens: int | None = field("tokens with a loss", None)
    train_seconds: float | None = field("seconds in the training loop", None)
    seconds_per_step: float | None = field("train_seconds / steps", None)
    tokens_per_second: float | None = field("tokens / train_seconds", None)
    steady_state: dict = field("median step time and throughput after the first step", factory=dict)
    model_load_seconds: float | None = field("seconds to load the base and add LoRA", None)
    loss: dict = field("loss summary: first, min, final, verdict, note, eval", factory=dict)
    peak_memory: dict = field("cpu_rss_bytes, cuda_allocated_bytes, cuda_reserved_bytes, cuda_device (rank 0's)",
                              factory=dict)
    data_parallel: DataParallel | None = field("processes, effective batch and per-process peak memory "
                                               "(null: written before gptoss had --gpus)", None)
    lora: dict = field("LoRA settings and trainable parameters by group", factory=dict)
    dataset: DataInfo | None = field("the data record (as data.json)", None)
    versions: dict = field("package versions (null: not installed)", factory=dict)
    config: dict = field("the resolved configuration (as train_config.json)", factory=dict)
    note: str | None = field("free text (fixture runs say they are not trained)", None)


# ---------------------------------------------------------------------------------------------
# Merge: exports/<run>/merged/


@dataclasses.dataclass
class MergeInfo(Record):
    """``<merged folder>/merge_info.json``: what the merged checkpoint was made from."""

    FILE: ClassVar[str] = "merge_info.json"
    COMMAND: ClassVar[str] = "gptoss merge"

    inputs: dict = field("what was merged: base (id, path, revision, quantization, layout, files), merge_into, "
                         "trained_on (id, revision, layout, quantization), adapter (path, files), dtype, max_shard_bytes; "
                         "a re-run with equal inputs (mtimes and paths aside) skips the merge")
    identity: str = field("sha256 of the inputs' content: names the merge in the export manifest")
    schema_version: int = field("schema of this record", 1)
    run: str | None = field("run name", None)
    merge_into: str | None = field("base (a 16-bit base), original (of a 4-bit base) or dequantized", None)
    adapter_base_model: str | None = field("base_model_name_or_path of the adapter's config", None)
    lora: dict = field("r, lora_alpha, target_modules, target_parameters, deltas_by_kind, replaced_tensors",
                       factory=dict)
    merged_tensors: int | None = field("tensors changed by the adapter", None)
    output: dict = field("files, total_bytes, side_files (tokenizer, chat template)", factory=dict)
    elapsed_s: float | None = field("seconds the merge took", None)
    peak_rss_bytes: int | None = field("peak resident memory of the merge", None)
    versions: dict = field("package versions", factory=dict)
    command: str | None = field("the gptoss command line, when run from the CLI", None)


# ---------------------------------------------------------------------------------------------
# Export: exports/<run>/manifest.json


@dataclasses.dataclass
class MergedFolder:
    """The merged checkpoint an export was made from."""

    path: str = field("the merged folder, relative to the manifest when inside the export")
    identity: dict = field("merge_identity (a merge done here) or the folder's own file digests", factory=dict)
    files: list[dict] = field("its files: path, size, sha256", factory=list)
    merge: dict | None = field("the merge step of this export: skipped, elapsed_s, peak_rss_bytes", None)


@dataclasses.dataclass
class GGUFArtifact:
    """One GGUF file of an export and its Modelfile."""

    path: str = field("the .gguf, relative to the manifest")
    quant: str = field("quant name, e.g. q4_k_m (serve --quant picks by it)")
    label: str = field("llama.cpp's name, e.g. Q4_K_M (the Hub's tag)")
    sha256: str = field("sha256 of the file")
    size: int = field("bytes")
    kind: str = field("always gguf", "gguf")
    nominal_type: str | None = field("the quant's main tensor type", None)
    tensor_count: int | None = field("tensors in the file", None)
    tensor_types: dict = field("tensor type -> count", factory=dict)
    tensor_type_bytes: dict = field("tensor type -> bytes", factory=dict)
    fallbacks: int = field("tensors llama.cpp could not quantize as asked", 0)
    fallback_tensors: list = field("their names and types", factory=list)
    quantizable_weights: int | None = field("weights the converter wrote in 16 bits", None)
    off_nominal_weights: int | None = field("of those, weights not of nominal_type", None)
    off_nominal_weight_types: dict = field("their names -> types", factory=dict)
    chat_template: bool = field("the file carries a chat template", False)
    fidelity: dict | None = field("logits against the reference: reference, nmse, mean_kl, top1_agreement, "
                                  "thresholds, passed, prompts_sha256 (or skipped)", None)
    tool: str | None = field("what wrote it: convert_hf_to_gguf, llama-quantize or bindings", None)
    elapsed_s: float | None = field("seconds to write it", None)
    peak_rss_bytes: int | None = field("peak resident memory while writing it", None)
    skipped: bool = field("unchanged since the last export (not rewritten)", False)
    modelfile: str | None = field("its Ollama Modelfile, relative to the manifest", None)
    modelfile_sha256: str | None = field("sha256 of the Modelfile", None)
    modelfile_size: int | None = field("bytes of the Modelfile", None)


@dataclasses.dataclass
class Manifest(Record):
    """``exports/<run>/manifest.json``: a finished export; written last."""

    FILE: ClassVar[str] = "manifest.json"
    COMMAND: ClassVar[str] = "gptoss export"

    run: str = field("the export's name (names the folder and the GGUF files)")
    merged: MergedFolder = field("the merged checkpoint the GGUFs were converted from")
    schema_version: int = field("schema of this record", 1)
    created: str | None = field("time written, ISO 8601 UTC", None)
    inputs: dict = field("what was exported: run (training run folder), training_info (its digest) and the "
                         "merge's inputs (base, merge_into, trained_on, adapter, dtype, max_shard_bytes); "
                         "or merged (a folder given with --merged)", factory=dict)
    tools: dict = field("llama_cpp_commit, llama_cpp_python, converter and package versions", factory=dict)
    commands: dict = field("export (the command line) and steps (each tool's command)", factory=dict)
    fidelity_prompts: dict | None = field("count and sha256 of the fidelity prompts (null: fidelity off)", None)
    artifacts: list[GGUFArtifact] = field("the GGUF files", factory=list)

    def gguf(self, quant: str) -> list[GGUFArtifact]:
        q = quant.lower()
        return [a for a in self.artifacts if a.quant.lower() == q or a.label.lower() == q]


# ---------------------------------------------------------------------------------------------
# Publish: published.json beside the record it published from


@dataclasses.dataclass
class PublishedRepo:
    """One `gptoss publish --what ...` commit."""

    repo_id: str = field("the Hub repo, ORG/NAME")
    commit: str = field("the commit's id")
    revision: str = field("the branch committed to", "main")
    commit_url: str | None = field("the commit's URL", None)
    endpoint: str | None = field("the Hub endpoint (entries for another endpoint are ignored)", None)
    private: bool = field("the repo was created private", False)
    run: str | None = field("the run published", None)
    files: dict = field("path in repo -> sha256", factory=dict)


@dataclasses.dataclass
class Published(Record):
    """``published.json`` (in models/<run> for the adapter, exports/<run> otherwise): the last commit per kind."""

    FILE: ClassVar[str] = "published.json"
    COMMAND: ClassVar[str] = "gptoss publish"

    schema_version: int = field("schema of this record", 1)
    adapter: PublishedRepo | None = field("the adapter repo", None)
    merged: PublishedRepo | None = field("the merged model repo", None)
    gguf: PublishedRepo | None = field("the GGUF repo", None)


# ---------------------------------------------------------------------------------------------
# Eval: eval.json beside the run's record (models/<run>/, or exports/<run>/ for an export alone)


@dataclasses.dataclass
class ArtifactLoss:
    """One artifact's loss on the evaluation rows (assistant tokens of the last turn, as training masks them)."""

    name: str = field("base, adapter (base + adapter), merged, or the GGUF's label (F16, Q4_K_M, ...)")
    kind: str = field("hf (transformers, float32 on CPU) or gguf (llama.cpp bindings, F32 KV cache)")
    path: str = field("what was scored: the checkpoint folder, the adapter folder or the .gguf")
    mean_loss: float = field("mean next-token cross-entropy over the supervised tokens, nats")
    perplexity: float = field("exp(mean_loss)")
    tokens: int = field("supervised tokens scored")
    examples: int = field("rows scored")
    delta_vs_base: float | None = field("mean_loss minus the base's (negative: better than the base)", None)
    delta_vs_merged: float | None = field("for a GGUF: mean_loss minus the merged model's (what the quant cost)", None)
    seconds: float | None = field("seconds to load and score it", None)


@dataclasses.dataclass
class EvalRecord(Record):
    """``eval.json``: held-out loss per artifact, generation checks and harness results of `gptoss eval`."""

    FILE: ClassVar[str] = "eval.json"
    COMMAND: ClassVar[str] = "gptoss eval"

    run: str = field("the run (or export) evaluated")
    schema_version: int = field("schema of this record", 1)
    created: str | None = field("time written, ISO 8601 UTC", None)
    data: dict = field("the rows: source (held-out or dataset), path, content_sha256, rows, examples, tokens, "
                       "loss_on, reasoning_effort, max_seq_length, eval_fraction, seed", factory=dict)
    reference: str | None = field("how the HF rows were computed (dtype, device, RoPE note)", None)
    artifacts: list[ArtifactLoss] = field("loss per artifact, base first", factory=list)
    generation: dict | None = field("generation checks through the serving API (base vs fine-tuned), "
                                    "null when not run", None)
    harness: dict | None = field("lm-evaluation-harness results (task, model args, metrics), null when not run", None)
    chart: str | None = field("the PNG chart, relative to this record", None)
    versions: dict = field("package versions", factory=dict)
    command: str | None = field("the gptoss command line, when run from the CLI", None)

    def artifact(self, name: str) -> ArtifactLoss | None:
        return next((a for a in self.artifacts if a.name.lower() == name.lower()), None)


RECORDS: tuple[type[Record], ...] = (TrainingInfo, DataInfo, MergeInfo, Manifest, Published, EvalRecord)


def markdown() -> str:
    """The field reference of every record, from the dataclasses (docs/RECORDS.md)."""
    lines = ["# Records", "", "Generated by `python -m gptoss.records > docs/RECORDS.md` from gptoss/records.py;",
             "tests/test_records.py checks that this file matches. Fields without a default are required.", ""]

    def table(cls: type, title: str) -> None:
        lines.extend([title, "", (cls.__doc__ or "").strip(), "", "| field | type | default | meaning |",
                      "|---|---|---|---|"])
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.default is not dataclasses.MISSING:
                default = f"`{json.dumps(f.default)}`"
            elif f.default_factory is not dataclasses.MISSING:
                default = f"`{json.dumps(f.default_factory())}`"
            else:
                default = "required"
            lines.append(f"| `{f.name}` | {_type_name(hints[f.name]).replace(' | ', ' or ')} | {default} | {f.metadata['doc']} |")
        lines.append("")

    nested: list[type] = []

    def tables_of_fields(cls: type) -> None:
        for tp in typing.get_type_hints(cls).values():
            for arg in (tp, *typing.get_args(tp), *(a for t in typing.get_args(tp) for a in typing.get_args(t))):
                if isinstance(arg, type) and dataclasses.is_dataclass(arg) and not issubclass(arg, Record) \
                        and arg not in nested:
                    nested.append(arg)
                    table(arg, f"### {arg.__name__}")
                    tables_of_fields(arg)

    for cls in RECORDS:
        table(cls, f"## {cls.FILE} (written by `{cls.COMMAND}`, schema {cls.SCHEMA_VERSION})")
        tables_of_fields(cls)
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown(), end="")
