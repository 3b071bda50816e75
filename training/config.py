"""Training configuration: one typed dataclass, presets as files, every field overridable.

Resolution order: dataclass defaults (the seeds' recipe) < profile file < CLI flags. The result
is checked in ``__post_init__`` and every problem is reported at once (``ConfigError``);
``environment_problems`` adds what the machine cannot do (no CUDA, missing files) before any
model loads.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import sys
import typing
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from gptoss.choices import choice_problem, flag, literal_choices
from gptoss.errors import ToolchainError
from gptoss.training.distributed import gpu_problem

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

DEFAULT_DATASET = "HuggingFaceH4/Multilingual-Thinking"
DEFAULT_MODEL = {"unsloth": "unsloth/gpt-oss-20b-unsloth-bnb-4bit", "transformers": "openai/gpt-oss-20b"}
DEFAULT_PROFILE = "standard"
PROFILE_SUFFIX = ".toml"
# Fields a resumed run may change; everything else must match the run's train_config.json.
RESUMABLE_OVERRIDES = ("max_steps", "save_steps", "keep_checkpoints", "logging_steps", "eval_steps", "tensorboard")


class ConfigError(ToolchainError):
    """Bad flags, profile or environment; ``problems`` lists every one of them."""

    def __init__(self, problems: list[str], heading: str = "invalid training configuration"):
        self.problems = list(problems)
        n = len(self.problems)
        lines = "\n  ".join(self.problems)
        super().__init__(f"{heading} ({n} problem{'s' if n != 1 else ''}):\n  {lines}")


def _f(default: Any, help: str) -> Any:
    """A field with its help: `gptoss train --help` and train()'s signature are derived from these."""
    return dataclasses.field(default=default, metadata={"help": help})


@dataclasses.dataclass
class TrainConfig:
    """Everything a training run depends on. Defaults are the seeds' Unsloth recipe."""

    profile: str = _f(DEFAULT_PROFILE, "preset: quick_test, standard, full, max_quality, conservative, memory_efficient.")
    # Model and backend
    model: str | None = _f(None, "base model, a Hub id or a local checkpoint directory (default: the backend's gpt-oss-20b).")
    revision: str | None = _f(None, "Hub revision (branch, tag or commit) of the base model.")
    backend: Literal["auto", "unsloth", "transformers"] = _f("auto", "auto (unsloth on CUDA when installed, else transformers), unsloth or transformers.")
    device: Literal["auto", "cuda", "cpu"] = _f("auto", "auto, cuda or cpu.")
    gpus: str = _f("1", "data-parallel processes, one per GPU, each with its own copy of the model: a count (2), "
                   "device ids (0,1) or all (every visible GPU); more than one runs under torchrun. "
                   "On --device cpu a count of CPU processes (gloo), for tests (default 1).")
    load_in_4bit: bool | None = _f(None, "load the base model in 4-bit (bitsandbytes; default: on CUDA).")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = _f("auto", "compute/weight dtype: auto (bfloat16 on CUDA, float32 on CPU), bfloat16, float16, float32.")
    # Data
    dataset: str = _f(DEFAULT_DATASET, "Hub dataset id or a local .jsonl/.parquet file of {\"messages\": [...]} rows.")
    dataset_split: str = _f("train", "split of a Hub dataset.")
    dataset_revision: str | None = _f(None, "Hub revision of the dataset.")
    max_rows: int | None = _f(None, "use only the first N rows.")
    max_seq_length: int = _f(1024, "longest row in tokens.")
    too_long: Literal["drop", "truncate"] = _f("drop", "what to do with longer rows: drop or truncate.")
    loss_on: Literal["assistant", "final"] = _f("assistant", "assistant (analysis and final of the last assistant turn) or final (final answer only).")
    reasoning_effort: Literal["low", "medium", "high"] = _f("medium", "reasoning effort in the system message for rows without their own reasoning_effort: low, medium, high.")
    eval_fraction: float = _f(0.0, "fraction of rows held out for the eval loss (0 = none).")
    eval_steps: int | None = _f(None, "evaluate every N steps (default: at every checkpoint and at the end).")
    skip_bad_rows: bool = _f(False, "skip malformed rows (the count is reported) instead of stopping at the first.")
    # LoRA
    rank: int = _f(8, "LoRA rank r.")
    lora_alpha: int = _f(16, "LoRA alpha.")
    lora_dropout: float = _f(0.0, "LoRA dropout; must be 0 when the experts are targeted.")
    use_rslora: bool = _f(False, "rank-stabilised LoRA scaling alpha/sqrt(r).")
    lora_targets: Literal["all", "attention", "experts"] = _f("all", "all (attention and experts), attention, or experts.")
    # Optimisation
    max_steps: int = _f(200, "optimizer steps.")
    batch_size: int = _f(2, "rows per micro-batch.")
    grad_accum: int = _f(8, "micro-batches per optimizer step.")
    learning_rate: float = _f(2e-4, "peak learning rate.")
    lr_scheduler: Literal["linear", "cosine", "constant"] = _f("linear", "linear, cosine or constant, after warmup.")
    warmup_steps: int = _f(5, "linear warmup steps.")
    weight_decay: float = _f(0.01, "AdamW weight decay.")
    max_grad_norm: float = _f(1.0, "gradient clipping norm.")
    optim: Literal["auto", "adamw_8bit", "adamw_torch"] = _f("auto", "auto (adamw_8bit on CUDA, adamw_torch on CPU), adamw_8bit or adamw_torch.")
    gradient_checkpointing: Literal["unsloth", "on", "off"] = _f("unsloth", "unsloth (plain checkpointing on the transformers backend), on, off.")
    seed: int = _f(3407, "random seed for LoRA init and data order.")
    # Outputs and monitoring
    output_dir: str = _f("models", "where runs go; <output_dir>/latest links to the newest finished run.")
    run_name: str | None = _f(None, "directory name of the run (default gpt-oss-20b_<profile>_r<rank>_<timestamp>).")
    save_steps: int = _f(50, "write a checkpoint every N steps.")
    keep_checkpoints: int = _f(3, "keep the newest K checkpoints.")
    logging_steps: int = _f(1, "print a log line every N steps.")
    tensorboard: bool = _f(True, "write TensorBoard logs under <run>/logs.")
    wandb_project: str = _f("gptoss-train", "W&B project, used only when WANDB_API_KEY is set.")
    loss_target: float = _f(0.5, "loss monitor target.")
    overfit_below: float = _f(0.3, "final loss below this warns of overfitting.")
    underfit_above: float = _f(1.0, "final loss above this warns of underfitting.")

    def __post_init__(self):
        problems = self.problems()
        if problems:
            raise ConfigError(problems)

    def problems(self) -> list[str]:
        out: list[str] = []

        def need(ok: bool, name: str, what: str):
            if not ok:
                out.append(f"{flag(name)}: {what}, got {getattr(self, name)!r}")

        for name, tp in _hints().items():
            choices = literal_choices(tp)
            if choices and (wrong := choice_problem(flag(name), getattr(self, name), choices)):
                out.append(wrong)
        for name in ("max_steps", "batch_size", "grad_accum", "rank", "lora_alpha", "save_steps", "keep_checkpoints", "logging_steps"):
            need(getattr(self, name) >= 1, name, "must be at least 1")
        need(self.max_seq_length >= 32, "max_seq_length", "must be at least 32 tokens")
        need(self.warmup_steps >= 0, "warmup_steps", "must be 0 or more")
        need(self.learning_rate > 0, "learning_rate", "must be positive")
        need(self.weight_decay >= 0, "weight_decay", "must be 0 or more")
        need(self.max_grad_norm > 0, "max_grad_norm", "must be positive")
        need(0.0 <= self.lora_dropout < 1.0, "lora_dropout", "must be in [0, 1)")
        need(0.0 <= self.eval_fraction < 0.5, "eval_fraction", "must be in [0, 0.5)")
        if self.eval_steps is not None:
            need(self.eval_steps >= 1, "eval_steps", "must be at least 1")
        if self.max_rows is not None:
            need(self.max_rows >= 1, "max_rows", "must be at least 1")
        need(0 <= self.overfit_below <= self.loss_target <= self.underfit_above, "loss_target",
             f"needs overfit_below <= loss_target <= underfit_above ({self.overfit_below}, {self.loss_target}, {self.underfit_above})")
        if self.lora_targets in ("all", "experts") and self.lora_dropout != 0:
            out.append(
                f"--lora-dropout: must be 0 when the experts are targeted (PEFT target_parameters and the "
                f"fused expert path have no dropout), got {self.lora_dropout!r}; use --lora-dropout 0 or --lora-targets attention"
            )
        if (gpus := gpu_problem(self.gpus)) is not None:
            out.append(gpus)
        if not self.dataset:
            out.append("--dataset: must name a Hub dataset id or a local .jsonl/.parquet file")
        if self.model == "":
            out.append("--model: must name a Hub model id or a local checkpoint directory")
        if self.run_name is not None and (not self.run_name or "/" in self.run_name or self.run_name.startswith(".")):
            out.append(f"--run-name: must be a plain directory name, got {self.run_name!r}")
        return out

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def field_names() -> list[str]:
    return [f.name for f in dataclasses.fields(TrainConfig)]


def _hints() -> dict[str, Any]:
    return typing.get_type_hints(TrainConfig)


def flag_help(name: str) -> str:
    """A field's help, with the value used when the flag is left out (the default profile's, else the field's)."""
    field = {f.name: f for f in dataclasses.fields(TrainConfig)}[name]
    preset, _ = load_profile(DEFAULT_PROFILE) if name != "profile" else ({}, [])
    default = preset.get(name, field.default)
    text = field.metadata["help"]
    if default is None or "default" in text:
        return text
    shown = str(default).lower() if isinstance(default, bool) else default
    return f"{text.rstrip('.')} (default {shown})."


def derive_command(fn, *, extra: dict[str, tuple[Any, str]], returns: str) -> None:
    """Give ``fn(**flags)`` the signature, annotations and Args docs of TrainConfig's fields (+ ``extra``), so the CLI
    (gptoss/cli.py: flags, choices, help) and Python callers see one keyword-only parameter per field."""
    hints = _hints()
    params, annotations, docs = [], {}, []
    for name in field_names():
        annotations[name] = typing.Optional[hints[name]]
        docs.append(f"    {name}: {flag_help(name)}")
    for name, (hint, text) in extra.items():
        annotations[name] = hint
        docs.append(f"    {name}: {text}")
    for name in annotations:
        params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=annotations[name]))
    fn.__signature__ = inspect.Signature(params, return_annotation=str)
    fn.__annotations__ = {**annotations, "return": str}
    fn.__doc__ = inspect.cleandoc(fn.__doc__ or "") + "\n\nArgs:\n" + "\n".join(docs) + f"\nReturns:\n    {returns}\n"


# ---------------------------------------------------------------------------------------------
# Coercion: fire parses flags loosely ("--resume" is True, "--model 123" an int, "false" a string).

_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


def coerce(name: str, value: Any) -> tuple[Any, str | None]:
    """Value converted to the field's type, or the problem with it."""
    tp = _hints()[name]
    args = typing.get_args(tp)
    optional = type(None) in args
    if value is None:
        return (None, None) if optional else (value, f"{flag(name)}: needs a value")
    base = next((a for a in args if a is not type(None)), tp) if optional else tp
    if typing.get_origin(base) is Literal:
        return (str(value), None)  # the choice itself is checked by TrainConfig
    if base is bool:
        if isinstance(value, bool):
            return value, None
        if isinstance(value, (str, int)) and str(value).lower() in _TRUE | _FALSE:
            return str(value).lower() in _TRUE, None
        return value, f"{flag(name)}: expected true or false, got {value!r}"
    if base is int:
        if isinstance(value, bool):
            return value, f"{flag(name)}: expected an integer, got {value!r}"
        if isinstance(value, int):
            return value, None
        if isinstance(value, float) and value.is_integer():
            return int(value), None
        if isinstance(value, str):
            try:
                return int(value), None
            except ValueError:
                pass
        return value, f"{flag(name)}: expected an integer, got {value!r}"
    if base is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value), None
        if isinstance(value, str):
            try:
                return float(value), None
            except ValueError:
                pass
        return value, f"{flag(name)}: expected a number, got {value!r}"
    if base is str:
        if isinstance(value, bool):
            return value, f"{flag(name)}: expected a value, got a bare flag"
        if isinstance(value, (int, float)):
            return str(value), None
        if isinstance(value, str):
            return value, None
        if isinstance(value, (tuple, list)) and all(isinstance(v, (str, int)) and not isinstance(v, bool) for v in value):
            return ",".join(map(str, value)), None  # fire reads "0,1" as a tuple
        return value, f"{flag(name)}: expected text, got {value!r}"
    return value, None


# ---------------------------------------------------------------------------------------------
# Profiles: one TOML file per profile, headed by the command that runs it.


def profiles_dir() -> Path:
    return Path(str(resources.files("gptoss.training").joinpath("profiles")))


def profile_names() -> list[str]:
    return sorted(p.stem for p in profiles_dir().glob("*" + PROFILE_SUFFIX))


def profile_path(name: str) -> Path:
    return profiles_dir() / f"{name}{PROFILE_SUFFIX}"


def load_profile(name: str) -> tuple[dict[str, Any], list[str]]:
    """The profile's values, and problems with it (unknown profile, unknown keys)."""
    if not isinstance(name, str) or name not in profile_names():
        return {}, [f"--profile: unknown profile {name!r}; known profiles: {', '.join(profile_names())}"]
    path = profile_path(name)
    try:
        values = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        return {}, [f"{path}: not valid TOML: {e}"]
    known = set(field_names()) - {"profile"}
    problems = [f"{path}: unknown key {k!r}; known keys: {', '.join(sorted(known))}" for k in values if k not in known]
    return {k: v for k, v in values.items() if k in known}, problems


def merge_values(overrides: dict[str, Any], *, base: dict[str, Any] | None = None) -> tuple[dict[str, Any], list[str]]:
    """Defaults < profile (or ``base``, a saved train_config.json) < overrides, coerced to the
    fields' types; returns the values and the problems met (unknown profile, bad types)."""
    problems: list[str] = []
    values: dict[str, Any] = {}
    if base is None:
        profile = overrides.get("profile") or DEFAULT_PROFILE
        preset, problems = load_profile(profile)
        values.update(preset)
        values["profile"] = profile
    else:
        values.update({k: v for k, v in base.items() if k in field_names()})
    for k, v in overrides.items():
        if v is not None and k in field_names():
            values[k] = v
    for k in list(values):
        values[k], problem = coerce(k, values[k])
        if problem:
            problems.append(problem)
    return values, problems


def config_problems(values: dict[str, Any], problems: list[str]) -> tuple[TrainConfig | None, list[str]]:
    """The config, or None and every problem: type problems plus the range checks of the fields that parsed."""
    bad = {p.split(":", 1)[0] for p in problems}
    fine = {k: v for k, v in values.items() if flag(k) not in bad}
    try:
        cfg = TrainConfig(**fine)
    except ConfigError as e:
        return None, problems + [p for p in e.problems if p not in problems]
    return (cfg, []) if not problems else (None, problems)


def build_config(overrides: dict[str, Any], *, base: dict[str, Any] | None = None) -> TrainConfig:
    values, problems = merge_values(overrides, base=base)
    cfg, problems = config_problems(values, problems)
    if problems:
        raise ConfigError(problems)
    return cfg


def nearest_existing(path: Path) -> Path:
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return probe


def output_dir_problem(output_dir: str) -> str | None:
    """Why runs cannot be written under ``output_dir`` (probed by creating a file), or None."""
    out = Path(output_dir).expanduser().absolute()
    if out.exists() and not out.is_dir():
        return f"--output-dir {out}: exists and is not a directory; choose another path"
    probe = nearest_existing(out)
    if not probe.is_dir():
        return f"--output-dir {out}: cannot be created, {probe} is not a directory; choose another path"
    try:
        import tempfile

        fd, name = tempfile.mkstemp(prefix=".gptoss-write-probe-", dir=probe)
        os.close(fd)
        os.unlink(name)
    except OSError as e:
        return f"--output-dir {out}: {probe} is not writable ({e.strerror}); choose a writable path"
    latest = out / "latest"
    if latest.exists() and not latest.is_symlink():
        return f"--output-dir {out}: {latest} exists and is not a symlink; move it away (gptoss keeps a link to the newest finished run there)"
    return None
