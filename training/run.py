"""`gptoss train`: one run from flags to ``models/<run>/`` and the ``models/latest`` link.

Order of work, so that bad input costs nothing: resolve and check the configuration and the
machine (all problems at once), load the tokenizer and check/render every data row, and only then
create the run directory and load the model.

A run lives in ``<output_dir>/<name>.partial/`` until it has finished: adapter, tokenizer,
``train_config.json`` and ``training_info.json`` are written, the directory is renamed to
``<output_dir>/<name>/`` and ``<output_dir>/latest`` is switched to it. A killed run is never
mistaken for a finished one and ``--resume`` continues it from its newest checkpoint.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import importlib.util
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from gptoss.errors import ToolchainError
from gptoss.hubid import is_hub_id
from gptoss.latest import LATEST, switch_latest
from gptoss.machine import package_versions, peak_rss_bytes
from gptoss.records import DataInfo, DataParallel, RankMemory, TrainingInfo, write_json_atomic
from gptoss.training import backends as backends_mod
from gptoss.training import config as config_mod
from gptoss.training import data as data_mod
from gptoss.training import distributed
from gptoss.training.config import ConfigError, TrainConfig, flag

log = logging.getLogger("gptoss.train")

PARTIAL_SUFFIX = ".partial"
CONFIG_FILE = "train_config.json"
INFO_FILE = TrainingInfo.FILE
DATA_FILE = DataInfo.FILE  # the data record, written when the run starts (resume checks it)
ADAPTER_DIR = "adapter"
RUN_PREFIX = "gpt-oss-20b"
VERSIONED_PACKAGES = (
    "gptoss-toolchain", "torch", "transformers", "peft", "accelerate", "datasets", "tokenizers",
    "safetensors", "bitsandbytes", "unsloth", "unsloth_zoo", "trl", "openai-harmony",
)


# ---------------------------------------------------------------------------------------------
# Resolution and checks


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _visible_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _looks_local(name: str) -> bool:
    return not is_hub_id(name)


def environment_problems(values: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Resolve the "auto" settings for this machine and list what it cannot do."""
    problems: list[str] = []
    resolved: dict[str, Any] = {}
    cuda = _cuda_available()
    device = values.get("device", "auto")
    if device == "cuda" and not cuda:
        import torch

        why = "torch was built without CUDA" if torch.version.cuda is None else "no CUDA device is visible"
        problems.append(f"--device cuda: CUDA was requested but is not available ({why}, torch {torch.__version__}); use --device cpu or run on a GPU machine")
    if device == "auto":
        device = "cuda" if cuda else "cpu"
    resolved["device"] = device

    gpu_plan, problem = distributed.plan(values.get("gpus", "1"), device=device, visible_gpus=_visible_gpus() if cuda else 0)
    if problem:
        problems.append(problem)
    else:
        resolved["gpus"] = str(gpu_plan.processes)
        started = int(os.environ.get(distributed.WORLD_ENV, "0"))
        if started and started != gpu_plan.processes:
            problems.append(f"--gpus {values.get('gpus')}: asks for {gpu_plan.processes} process(es) but torchrun started "
                            f"{started}; pass --gpus {started} or leave --gpus out under torchrun")

    backend = values.get("backend", "auto")
    if backend == "auto":
        unsloth_ok = device == "cuda" and importlib.util.find_spec("unsloth") is not None
        backend = "unsloth" if unsloth_ok else "transformers"
    if backend in backends_mod.BACKENDS:
        problem = backends_mod.get_backend(backend).problem(device)
        if problem:
            problems.append(problem)
    resolved["backend"] = backend

    model = values.get("model") or (backends_mod.BACKENDS[backend].default_model if backend in backends_mod.BACKENDS else None)
    resolved["model"] = model
    if isinstance(model, str) and _looks_local(model):
        path = Path(model).expanduser()
        if not path.is_dir():
            problems.append(f"--model {model}: no such checkpoint directory; pass a local directory or a Hub id like openai/gpt-oss-20b")
        elif not (path / "config.json").is_file():
            problems.append(f"--model {model}: has no config.json; is it a transformers checkpoint? (gptoss fixture tiny --out DIR writes one)")
        else:
            resolved["model"] = str(path.absolute())
            problem = _layout_problem(str(path.absolute()), backend)
            if problem:
                problems.append(problem)

    load_in_4bit = values.get("load_in_4bit")
    if load_in_4bit is None:
        load_in_4bit = device == "cuda"
    if load_in_4bit and device != "cuda":
        problems.append("--load-in-4bit: bitsandbytes 4-bit needs CUDA; drop the flag on this machine")
    if load_in_4bit and device == "cuda" and importlib.util.find_spec("bitsandbytes") is None:
        problems.append("--load-in-4bit: bitsandbytes is not installed (pip install bitsandbytes)")
    resolved["load_in_4bit"] = bool(load_in_4bit)

    optim = values.get("optim", "auto")
    if optim == "auto":
        optim = "adamw_8bit" if device == "cuda" and importlib.util.find_spec("bitsandbytes") is not None else "adamw_torch"
    if optim == "adamw_8bit" and (device != "cuda" or importlib.util.find_spec("bitsandbytes") is None):
        problems.append("--optim adamw_8bit: needs CUDA and bitsandbytes; use --optim adamw_torch")
    resolved["optim"] = optim

    if values.get("dtype") == "float16" and device == "cpu":
        problems.append("--dtype float16: not supported for training on CPU; use float32 or bfloat16")

    dataset = values.get("dataset")
    if isinstance(dataset, str) and dataset:
        problem = data_mod.dataset_problem(dataset)
        if problem:
            problems.append(problem)
    output_dir = values.get("output_dir", "models")
    if isinstance(output_dir, str):
        problem = config_mod.output_dir_problem(output_dir)
        if problem:
            problems.append(problem)
    if values.get("tensorboard", True) and importlib.util.find_spec("tensorboard") is None:
        problems.append("--tensorboard: the tensorboard package is not installed (pip install tensorboard) or pass --tensorboard false")
    return resolved, problems


def _layout_problem(model_dir: str, backend: str) -> str | None:
    """Unsloth's split bnb-4bit layout loads only through Unsloth (CUDA); say what to train on instead."""
    from gptoss import layouts

    if backend == "unsloth" or layouts.describe(model_dir)["layout"] != layouts.SPLIT:
        return None
    original = layouts.sixteen_bit_original(model_dir)
    return (f"--model {model_dir}: Unsloth's split bnb-4bit layout (per-expert Linears) loads only with --backend unsloth "
            f"on CUDA; with --backend {backend} train on its 16-bit original"
            + (f" (--model {original})" if original else " (e.g. unsloth/gpt-oss-20b-BF16)"))


def _resume_dir(resume: Any, output_dir: str) -> tuple[Path | None, list[str]]:
    if resume is True:
        root = Path(output_dir).expanduser()
        partial = sorted(root.glob("*" + PARTIAL_SUFFIX), key=lambda p: p.stat().st_mtime) if root.is_dir() else []
        if not partial:
            return None, [f"--resume: no unfinished run ({'*' + PARTIAL_SUFFIX}) under {root}; pass the run directory"]
        return partial[-1], []
    if not isinstance(resume, str) or not resume:
        return None, [f"--resume: expected a run directory (or a bare --resume for the newest unfinished run), got {resume!r}"]
    path = Path(resume).expanduser()
    if path.name.startswith("step-") and path.parent.name == "checkpoints":
        path = path.parent.parent
    if not (path / CONFIG_FILE).is_file():
        return None, [f"--resume {resume}: not a training run (no {CONFIG_FILE}); pass a directory that gptoss train created"]
    if TrainingInfo.exists(path) and not path.name.endswith(PARTIAL_SUFFIX):
        return None, [f"--resume {resume}: this run has already finished; start a new run instead"]
    return path, []


def resolve(overrides: dict[str, Any], resume: Any = None) -> tuple[TrainConfig, Path | None]:
    """The concrete configuration for this machine, or ConfigError listing every problem."""
    base = None
    resume_dir = None
    problems: list[str] = []
    if resume not in (None, False):
        resume_dir, problems = _resume_dir(resume, overrides.get("output_dir") or "models")
        if resume_dir is not None:
            base = json.loads((resume_dir / CONFIG_FILE).read_text())
            changed = [
                k for k, v in overrides.items()
                if v is not None and k in base and k not in config_mod.RESUMABLE_OVERRIDES
                and config_mod.coerce(k, v)[0] != base[k] and k not in ("output_dir", "gpus")
            ]
            problems += [
                f"{flag(k)}: cannot change when resuming ({base[k]!r} in {resume_dir / CONFIG_FILE}); "
                f"only {', '.join(map(flag, config_mod.RESUMABLE_OVERRIDES))} can" for k in changed
            ]
    values, type_problems = config_mod.merge_values(overrides, base=base)
    problems += type_problems
    resolved, env_problems = environment_problems(values)
    cfg, problems = config_mod.config_problems(values, problems)
    problems += env_problems
    if base is not None and "gpus" in resolved and resolved["gpus"] != str(base.get("gpus", "1")):
        was = str(base.get("gpus", "1"))
        problems.append(f"--gpus: {resume_dir} trained on {was} process(es), this would resume on {resolved['gpus']}; "
                        f"resume with --gpus {was} (the data order and the effective batch depend on it)")
    if problems or cfg is None:
        raise ConfigError(problems)
    if values.get("backend", "auto") == "auto" and resolved["device"] == "cuda" and resolved["backend"] != "unsloth":
        log.warning("unsloth is not installed: using the transformers backend on CUDA (slower, more memory)")
    cfg = dataclasses.replace(cfg, **resolved)
    return cfg, resume_dir


# ---------------------------------------------------------------------------------------------
# The run


def _hub_commit(model: str, revision: str | None) -> str | None:
    """The commit a Hub id was loaded at, read from the local HF cache (works offline); None for a
    local folder. Falls back to the revision asked for."""
    if Path(model).expanduser().is_dir():
        return None
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(model, "config.json", revision=revision)
    commit = Path(cached).parent.name if isinstance(cached, str) else None
    return commit if commit and len(commit) == 40 else revision


def base_fields(model: str, revision: str | None) -> dict[str, Any]:
    """What the run trained on, for training_info.json: the base, its revision, layout and
    quantization (gptoss/layouts.py), and the 16-bit original a merge folds the adapter into
    (``merge_base``; None when the base is itself 16-bit or MXFP4, which merges into itself)."""
    from gptoss import layouts

    local = Path(model).expanduser()
    if not local.is_dir():
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(model, "config.json", revision=revision)
        local = Path(cached).parent if isinstance(cached, str) else None
    described = layouts.describe(local) if local is not None else {"layout": "unknown", "quantization": "unknown"}
    four_bit = described["quantization"] == "bnb-4bit" or model in layouts.SIXTEEN_BIT_ORIGINALS
    return {
        "base_model": model,
        "base_model_revision": revision,
        "base_layout": described["layout"],
        "base_quantization": described["quantization"],
        "merge_base": layouts.sixteen_bit_original(model, local) if four_bit else None,
    }


def _new_run_dir(cfg: TrainConfig) -> Path:
    root = Path(cfg.output_dir).expanduser().absolute()
    root.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    name = cfg.run_name or f"{RUN_PREFIX}_{cfg.profile}_r{cfg.rank}_{stamp}"
    for i in range(1, 1000):
        candidate = name if i == 1 else f"{name}-{i}"
        if not (root / candidate).exists() and not (root / (candidate + PARTIAL_SUFFIX)).exists():
            path = root / (candidate + PARTIAL_SUFFIX)
            path.mkdir()
            return path
    raise ToolchainError(f"{root}: too many runs named {name}; pass --run-name")


def _peak_memory(device: str) -> dict[str, int | None]:
    out: dict[str, int | None] = {"cpu_rss_bytes": peak_rss_bytes()}
    if device == "cuda":
        import torch

        out["cuda_allocated_bytes"] = torch.cuda.max_memory_allocated()
        out["cuda_reserved_bytes"] = torch.cuda.max_memory_reserved()
        out["cuda_device"] = torch.cuda.get_device_name(torch.cuda.current_device())
    else:
        out["cuda_allocated_bytes"] = None
    return out


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is now (not the one at set-up time)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value):
        pass


def _steady_state(history: list) -> dict[str, Any]:
    """Median step time and throughput over the steps after the first (warm-up) one."""
    rows = history[1:] or history
    if not rows:
        return {}
    times = sorted(r[1] for r in rows)
    rates = sorted(r[2] / r[1] for r in rows if r[1] > 0)
    return {
        "steps": len(rows),
        "median_step_seconds": times[len(times) // 2],
        "median_tokens_per_second": round(rates[len(rates) // 2], 2) if rates else 0.0,
    }


def _setup_logging() -> None:
    if not log.handlers:
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("gptoss train: %(message)s"))
        log.addHandler(handler)
        log.propagate = False
    log.setLevel(logging.INFO)


def _load_tokenizer(cfg: TrainConfig):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(cfg.model, revision=cfg.revision)
    except Exception as e:  # offline, unknown id, gated repo
        raise ToolchainError(
            f"--model {cfg.model}: cannot load its tokenizer ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
            f"check the id/path, your network and HF_TOKEN"
        ) from e


def run(overrides: dict[str, Any], *, resume: Any = None) -> Path:
    """One process: train here. Several (``--gpus``): validate here, then run the workers under
    torchrun and return what rank 0 finished. A torchrun worker joins the group and trains its share."""
    _setup_logging()
    worker = distributed.in_worker()
    if worker and overrides.get("gpus") is None and resume in (None, False):
        overrides = {**overrides, "gpus": os.environ[distributed.WORLD_ENV]}  # `torchrun -m gptoss train` by hand
    cfg, resume_dir = resolve(overrides, resume)
    if not worker:
        gpu_plan, _ = distributed.plan(overrides.get("gpus") or cfg.gpus, device=cfg.device,
                                       visible_gpus=_visible_gpus() if cfg.device == "cuda" else 0)
        if gpu_plan.processes > 1:
            flags = {k: v for k, v in overrides.items() if v is not None}
            flags["gpus"] = cfg.gpus
            if resume_dir is not None:
                flags["resume"] = str(resume_dir)
            log.info("data-parallel on %d processes (%s) under torchrun", gpu_plan.processes,
                     f"CUDA_VISIBLE_DEVICES={gpu_plan.visible_devices}" if gpu_plan.visible_devices else cfg.device)
            return distributed.launch(gpu_plan, flags)
        return _run(cfg, resume_dir, distributed.World())
    world = distributed.join(cfg.device)
    if not world.is_main:
        log.setLevel(logging.WARNING)  # rank 0 speaks for the run
    try:
        final = _run(cfg, resume_dir, world)
        if world.is_main:
            distributed.write_result(final)
        return final
    finally:
        world.close()


def _run(cfg: TrainConfig, resume_dir: Path | None, world: distributed.World) -> Path:
    backend = backends_mod.get_backend(cfg.backend)
    backend.prepare()
    log.info("backend %s on %s, model %s, profile %s", cfg.backend, cfg.device, cfg.model, cfg.profile)

    tokenizer = _load_tokenizer(cfg)
    source = data_mod.resolve_source(cfg.dataset, split=cfg.dataset_split, revision=cfg.dataset_revision)
    data = data_mod.prepare(
        source, tokenizer, max_seq_length=cfg.max_seq_length, too_long=cfg.too_long, loss_on=cfg.loss_on,
        reasoning_effort=cfg.reasoning_effort, eval_fraction=cfg.eval_fraction, skip_bad_rows=cfg.skip_bad_rows,
        max_rows=cfg.max_rows, seed=cfg.seed,
    )
    data_record = data.record()

    from gptoss.training import loop

    resume_from = None
    if resume_dir is not None:
        saved = DataInfo.load(resume_dir).content_sha256 if DataInfo.exists(resume_dir) else None
        if saved not in (None, data.content_sha256):
            raise ToolchainError(
                f"--resume {resume_dir}: the dataset changed since the run started "
                f"(sha256 {saved[:12]} then, {data.content_sha256[:12]} now); start a new run"
            )
        found = loop.checkpoints(resume_dir)
        resume_from = found[-1] if found else None
        if resume_from is None:
            log.warning("%s has no complete checkpoint yet: starting it again from step 0", resume_dir)

    # The model is loaded and checked before the run directory exists: a failure here leaves nothing behind.
    model, groups_start, load_seconds = _load_model(cfg, backend)
    world.broadcast_parameters([p for p in model.parameters() if p.requires_grad])

    if not world.is_main:  # only rank 0 writes; the others learn the folder's name from it
        run_dir = Path(world.broadcast(None))
        return _train_and_finish(cfg, backend, tokenizer, data, data_record, run_dir, resume_from, None,
                                 model=model, groups_start=groups_start, load_seconds=load_seconds, world=world)
    run_dir = resume_dir if resume_dir is not None else _new_run_dir(cfg)
    world.broadcast(str(run_dir))
    write_json_atomic(run_dir / CONFIG_FILE, cfg.to_dict())
    DataInfo(**data_record).write(run_dir)
    file_log = logging.FileHandler(run_dir / "train.log", encoding="utf-8")
    file_log.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    file_log.setLevel(logging.DEBUG)
    log.addHandler(file_log)
    started = dt.datetime.now(dt.timezone.utc)
    log.info("run directory %s", run_dir)
    backends_mod.log_groups(groups_start, "LoRA")
    try:
        return _train_and_finish(cfg, backend, tokenizer, data, data_record, run_dir, resume_from, started,
                                 model=model, groups_start=groups_start, load_seconds=load_seconds, world=world)
    finally:
        log.removeHandler(file_log)
        file_log.close()


def _load_model(cfg: TrainConfig, backend):
    """Base model with LoRA, its trainable parameters by group (experts checked), load time."""
    import torch

    torch.manual_seed(cfg.seed)
    t_load = time.perf_counter()
    try:
        model = backend.load(cfg)
    except OSError as e:  # missing/corrupt files, unknown Hub id, no network
        raise ToolchainError(
            f"--model {cfg.model}: cannot load the checkpoint ({str(e).splitlines()[0] if str(e) else type(e).__name__}); "
            f"check the id/path, your network and HF_TOKEN"
        ) from e
    model = backend.wrap(model, cfg)
    load_seconds = time.perf_counter() - t_load
    groups = backends_mod.lora_groups(model)
    backends_mod.check_expert_lora(groups, cfg)  # its error lists the counts
    return model, groups, load_seconds


def _train_and_finish(cfg, backend, tokenizer, data, data_record, run_dir: Path, resume_from, started, *,
                      model, groups_start, load_seconds, world: distributed.World) -> Path:
    from gptoss.training import loop
    from gptoss.training.monitor import Monitor, loss_summary

    name = run_dir.name[: -len(PARTIAL_SUFFIX)] if run_dir.name.endswith(PARTIAL_SUFFIX) else run_dir.name
    start_step = json.loads((resume_from / loop.STATE_FILE).read_text())["step"] if resume_from else 0
    monitor = Monitor(cfg, run_dir, start_step=start_step, run_name=name, enabled=world.is_main)
    try:
        state = loop.train_loop(
            model, backend, data, cfg, run_dir, monitor, pad_id=tokenizer.pad_token_id, resume_from=resume_from,
            world=world if world.size > 1 else None,
        )
    finally:
        monitor.close()
    memory = world.gather({"rank": world.rank, **_peak_memory(cfg.device)})
    if not world.is_main:
        world.barrier()  # rank 0 writes the adapter, the record and the link
        return run_dir.with_name(name)

    groups_end = backends_mod.lora_groups(model)
    expert_b = {k: v["lora_B_norm"] for k, v in groups_end.items() if k.startswith("experts.")}
    experts_trained = bool(expert_b) and all(v > 0 for v in expert_b.values())
    if cfg.lora_targets != "attention" and not experts_trained:
        log.warning("expert LoRA B matrices are still zero after training (%s): the experts did not learn", expert_b)
    summary = loss_summary([tuple(x) for x in state.loss_history], [tuple(x) for x in state.eval_history], cfg)
    if "verdict" in summary and summary["verdict"] != "ok":
        log.warning("loss monitor: %s", summary["note"])
    elif "note" in summary:
        log.info("loss monitor: %s", summary["note"])

    adapter_dir = run_dir / ADAPTER_DIR
    model.save_pretrained(adapter_dir)
    tokenizer.save_pretrained(adapter_dir)
    modules, parameters = backend.targets
    base_revision = getattr(model.get_base_model().config, "_commit_hash", None) or _hub_commit(cfg.model, cfg.revision)
    info = {
        "run": name,
        **base_fields(cfg.model, base_revision),
        "backend": cfg.backend,
        "device": cfg.device,
        "profile": cfg.profile,
        "adapter": ADAPTER_DIR,
        "started_at": started.isoformat(timespec="seconds"),
        "finished_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "steps": state.step,
        "max_steps": cfg.max_steps,
        "resumed_from_step": int(resume_from.name.split("-")[-1]) if resume_from else None,
        "tokens": state.tokens,
        "supervised_tokens": state.supervised_tokens,
        "train_seconds": round(state.train_seconds, 3),
        "seconds_per_step": round(state.train_seconds / max(state.step, 1), 4),
        "tokens_per_second": round(state.tokens_per_second, 2),
        "steady_state": _steady_state(state.step_history),
        "model_load_seconds": round(load_seconds, 2),
        "loss": summary,
        "peak_memory": {k: v for k, v in memory[0].items() if k != "rank"},
        "data_parallel": DataParallel(
            world_size=world.size, per_device_batch_size=cfg.batch_size, grad_accum=cfg.grad_accum,
            effective_batch_size=cfg.batch_size * cfg.grad_accum * world.size, launcher=world.launcher,
            process_group_backend=world.backend, peak_memory_per_rank=[RankMemory(**m) for m in memory],
        ),
        "lora": {
            "rank": cfg.rank,
            "alpha": cfg.lora_alpha,
            "dropout": cfg.lora_dropout,
            "rslora": cfg.use_rslora,
            "targets": cfg.lora_targets,
            "target_modules": modules,
            "target_parameters": parameters,
            "trainable_at_start": groups_start,
            "trainable_at_end": groups_end,
            "experts_trained": experts_trained,
        },
        "dataset": DataInfo(**data_record),
        "versions": package_versions(VERSIONED_PACKAGES),
        "config": cfg.to_dict(),
    }
    TrainingInfo(**info).write(run_dir)
    final = run_dir.with_name(name)
    if run_dir != final:
        os.replace(run_dir, final)
    switch_latest(final)
    log.info("finished: %s (adapter in %s); %s now points to it", final, final / ADAPTER_DIR, final.parent / LATEST)
    world.barrier()
    return final


# ---------------------------------------------------------------------------------------------
# The command


def train(**flags: Any) -> str:
    """Fine-tune gpt-oss with LoRA on attention and the MoE experts; writes models/<run>/.

    Every flag left out comes from the profile (training/profiles/<profile>.toml), then from the
    defaults (the Unsloth gpt-oss-20b recipe). The whole configuration is checked before any
    model loads and every problem is reported at once.
    """
    resume = flags.pop("resume", None)
    if unknown := sorted(set(flags) - set(config_mod.field_names())):
        raise ConfigError([f"{flag(k)}: not a flag of `gptoss train` (see gptoss train --help)" for k in unknown])
    return str(run(flags, resume=resume))


# The flags, their types, choices and help come from TrainConfig's fields (training/config.py), plus --resume.
config_mod.derive_command(train, extra={"resume": (
    str | bool | None, "continue an unfinished run from its newest checkpoint: its directory, or bare --resume "
    "for the newest under output_dir.")}, returns="The finished run's directory.")
