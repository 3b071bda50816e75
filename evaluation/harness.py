"""`gptoss eval --harness TASK`: lm-evaluation-harness (lm-eval) against the serving API.

lm-eval's ``local-chat-completions`` model sends each request to ``<url>/chat/completions`` (chat
template applied by the server, so ``apply_chat_template`` is on and nothing is tokenized here).
TASK is a task lm-eval knows, or a task YAML file (its folder is added to lm-eval's task search
path), e.g. a ``generate_until`` task on a local JSONL file. ``--harness-args`` passes
``simple_evaluate`` options as ``key=value`` pairs (limit, num_fewshot, gen_kwargs, ...).
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

from gptoss.errors import ToolchainError

ARGS = {"limit": float, "num_fewshot": int, "gen_kwargs": str, "random_seed": int, "system_instruction": str,
        "bootstrap_iters": int, "num_concurrent": int, "max_gen_toks": int}


class HarnessError(ToolchainError):
    """A harness task or option that cannot run."""


def parse_args(text: str | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if not text:
        return out
    items = text if isinstance(text, (list, tuple)) else [p for p in str(text).replace(" ", ",").split(",") if p]
    for item in items:
        key, eq, value = str(item).lstrip("-").partition("=")
        key = key.replace("-", "_")
        if not eq or key not in ARGS:
            raise HarnessError(f"--harness-args {item}: give key=value with key one of {', '.join(ARGS)}")
        try:
            out[key] = ARGS[key](value)
        except ValueError as e:
            raise HarnessError(f"--harness-args {item}: {key} must be a {ARGS[key].__name__}") from e
    if "limit" in out and out["limit"] >= 1:
        out["limit"] = int(out["limit"])
    return out


@contextlib.contextmanager
def _env(name: str, value: str | None):
    old = os.environ.get(name)
    if value is not None:
        os.environ[name] = value
    try:
        yield
    finally:
        if value is not None:
            if old is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = old


def _task(task: str) -> tuple[str, str | None]:
    """(task name, folder to include) for a name or a YAML file."""
    path = Path(task).expanduser()
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise HarnessError(f"--harness {task}: no such task file")
        import yaml

        try:
            spec = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as e:
            raise HarnessError(f"--harness {task}: not valid YAML ({e})") from e
        if not isinstance(spec, dict) or not spec.get("task"):
            raise HarnessError(f"--harness {task}: the YAML has no `task:` name")
        return str(spec["task"]), str(path.resolve().parent)
    return task, None


def run(task: str, *, url: str, api_key: str | None, extra: str | None, out_dir: Path, tokenizer_dir: str | None = None) -> dict:
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError as e:
        raise HarnessError("--harness needs lm-eval: pip install 'gptoss-toolchain[eval]'") from e
    from gptoss.evaluation.bench import api_base, check_reachable
    from gptoss.machine import package_version

    options = parse_args(extra)
    name, include = _task(task)
    manager = TaskManager(include_path=include) if include else TaskManager()
    if name not in manager.all_tasks:
        raise HarnessError(f"--harness {task}: lm-eval knows no task {name!r}"
                           + (f" (in {include} or its own tasks)" if include else "; pass a task YAML file for your own"))
    model = check_reachable(url, api_key)
    model_args = {"model": model, "base_url": api_base(url) + "/chat/completions", "tokenized_requests": False,
                  "num_concurrent": options.pop("num_concurrent", 1), "max_retries": 1}
    if "max_gen_toks" in options:
        model_args["max_gen_toks"] = options.pop("max_gen_toks")
    with _env("OPENAI_API_KEY", api_key or "none"):
        try:
            results = lm_eval.simple_evaluate(model="local-chat-completions", model_args=model_args, tasks=[name],
                                              apply_chat_template=True, task_manager=manager, log_samples=True,
                                              **options)
        except ModuleNotFoundError as e:  # lm-eval without its [api] extra (tenacity, aiohttp)
            raise HarnessError(f"--harness: lm-eval's API models need more packages ({e}); "
                               "pip install 'gptoss-toolchain[eval]'") from e
    if results is None:
        raise HarnessError(f"--harness {task}: lm-eval returned no results")
    metrics = {k: v for k, v in (results.get("results", {}).get(name) or {}).items()
               if isinstance(v, (int, float)) and k != "alias"}
    samples = (results.get("samples") or {}).get(name) or []
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{name}.json").write_text(json.dumps(results, indent=2, default=str) + "\n", encoding="utf-8")
    return {"task": name, "task_file": str(Path(task).resolve()) if include else None, "url": api_base(url),
            "model": model, "lm_eval": package_version("lm_eval") or package_version("lm-eval"),
            "model_args": {k: v for k, v in model_args.items()}, "options": options, "metrics": metrics,
            "samples": len(samples), "results_file": str(out_dir / f"{name}.json")}


def table(h: dict):
    from rich.table import Table

    t = Table(title=f"lm-evaluation-harness: {h['task']} ({h['samples']} samples, {h['url']})")
    t.add_column("metric")
    t.add_column("value", justify="right")
    for k, v in h["metrics"].items():
        t.add_row(k, f"{v:.4g}" if isinstance(v, float) else str(v))
    return t
