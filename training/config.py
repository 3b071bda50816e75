"""Training configuration: one typed dataclass, presets as files, every field overridable.

Resolution order: dataclass defaults (the seeds' recipe) < profile file < CLI flags. The result
is checked in ``__post_init__`` and every problem is reported at once (``ConfigError``);
``environment_problems`` adds what the machine cannot do (no CUDA, missing files) before any
model loads.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import typing
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from gptoss.errors import ToolchainError

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


@dataclasses.dataclass
class TrainConfig:
    """Everything a training run depends on. Defaults are the seeds' Unsloth recipe."""

    profile: str = DEFAULT_PROFILE
    # Model and backend
    model: str | None = None  # None: the backend's default checkpoint
    revision: str | None = None
    backend: Literal["auto", "unsloth", "transformers"] = "auto"
    device: Literal["auto", "cuda", "cpu"] = "auto"
    load_in_4bit: bool | None = None  # None: on CUDA
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    # Data
    dataset: str = DEFAULT_DATASET
    dataset_split: str = "train"
    dataset_revision: str | None = None
    max_rows: int | None = None
    max_seq_length: int = 1024
    too_long: Literal["drop", "truncate"] = "drop"
    loss_on: Literal["assistant", "final"] = "assistant"
    reasoning_effort: Literal["low", "medium", "high"] = "medium"
    eval_fraction: float = 0.0
    eval_steps: int | None = None  # None: at every checkpoint and at the end
    skip_bad_rows: bool = False
    # LoRA
    rank: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    use_rslora: bool = False
    lora_targets: Literal["all", "attention", "experts"] = "all"
    # Optimisation
    max_steps: int = 200
    batch_size: int = 2
    grad_accum: int = 8
    learning_rate: float = 2e-4
    lr_scheduler: Literal["linear", "cosine", "constant"] = "linear"
    warmup_steps: int = 5
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    optim: Literal["auto", "adamw_8bit", "adamw_torch"] = "auto"
    gradient_checkpointing: Literal["unsloth", "on", "off"] = "unsloth"
    seed: int = 3407
    # Outputs and monitoring
    output_dir: str = "models"
    run_name: str | None = None
    save_steps: int = 50
    keep_checkpoints: int = 3
    logging_steps: int = 1
    tensorboard: bool = True
    wandb_project: str = "gptoss-train"
    loss_target: float = 0.5
    overfit_below: float = 0.3
    underfit_above: float = 1.0

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
            choices = _literal_choices(tp)
            value = getattr(self, name)
            if choices and value not in choices:
                out.append(f"{flag(name)}: must be one of {', '.join(choices)}, got {value!r}")
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
        if not self.dataset:
            out.append("--dataset: must name a Hub dataset id or a local .jsonl/.parquet file")
        if self.model == "":
            out.append("--model: must name a Hub model id or a local checkpoint directory")
        if self.run_name is not None and (not self.run_name or "/" in self.run_name or self.run_name.startswith(".")):
            out.append(f"--run-name: must be a plain directory name, got {self.run_name!r}")
        return out

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def field_names() -> list[str]:
    return [f.name for f in dataclasses.fields(TrainConfig)]


def _literal_choices(tp) -> tuple | None:
    return typing.get_args(tp) if typing.get_origin(tp) is Literal else None


def _hints() -> dict[str, Any]:
    return typing.get_type_hints(TrainConfig)


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
        return value, f"{flag(name)}: expected text, got {value!r}"
    return value, None


# ---------------------------------------------------------------------------------------------
# Profiles: one TOML file per profile, headed by the command that runs it.


def profiles_dir() -> Path:
    return Path(str(resources.files("training").joinpath("profiles")))


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
