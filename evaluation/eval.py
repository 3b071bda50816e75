"""`gptoss eval`: is the fine-tune better than its base on held-out data, and what did each quant cost?

The rows are those training held out (``--eval-fraction``, split again by training/data.py's
``prepare`` with the run's recorded configuration and checked against the recorded data hash) or
``--dataset FILE``; they are rendered and masked by the same ``prepare`` (assistant tokens of the
last turn). Each artifact scores them: the base, base + adapter and the merged model in
transformers (float32, CPU, RoPE as llama.cpp computes it: exporters/fidelity.reference_config),
every GGUF of the export in llama.cpp (the pinned bindings, F32 KV cache). The figures go to
``eval.json`` (gptoss.records.EvalRecord) beside the run's training_info.json, a table and a PNG.
"""

from __future__ import annotations

import datetime as dt
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

from gptoss.errors import ToolchainError
from gptoss.folders import ADAPTER_DIR, Folders
from gptoss.machine import package_versions
from gptoss.records import ArtifactLoss, EvalRecord, Manifest, RecordError, TrainingInfo

VERSIONED = ("gptoss-toolchain", "torch", "transformers", "peft", "numpy", "lm-eval", "openai")
CHART = "eval.png"
REFERENCE = "hf rows: transformers float32 on CPU, RoPE (YaRN truncation) as llama.cpp computes it; " \
            "gguf rows: llama.cpp bindings, F32 KV cache"


class EvalError(ToolchainError):
    """A run, export or dataset `gptoss eval` cannot use."""


# ---------------------------------------------------------------------------------------------
# What is evaluated


class Target:
    """The run and/or export being evaluated, and where eval.json goes."""

    def __init__(self, run: str, *, models_dir: str | None = None, exports_dir: str | None = None):
        path = Path(run).expanduser()
        if not path.exists() and not path.is_absolute():
            for candidate in (Folders.of(models_dir=models_dir, exports_dir=exports_dir).run_dir(run),
                              Folders.of(models_dir=models_dir, exports_dir=exports_dir).export_dir(run)):
                if candidate.is_dir():
                    path = candidate
                    break
        if not path.is_dir():
            raise EvalError(f"--run {run}: no such folder; give a training run (models/<run>/ with "
                            f"{TrainingInfo.FILE}) or an export (exports/<run>/ with {Manifest.FILE})")
        path = path.resolve()
        self.run_dir: Path | None = None
        self.export_dir: Path | None = None
        self.info: TrainingInfo | None = None
        self.manifest: Manifest | None = None
        try:
            if TrainingInfo.exists(path):
                self.run_dir, self.info = path, TrainingInfo.load(path)
            elif Manifest.exists(path):
                self.export_dir, self.manifest = path, Manifest.load(path)
                recorded = (self.manifest.inputs or {}).get("run")
                if recorded and TrainingInfo.exists(recorded):
                    self.run_dir, self.info = Path(recorded), TrainingInfo.load(recorded)
            else:
                raise EvalError(f"--run {run}: {path} holds neither {TrainingInfo.FILE} (`gptoss train` writes it) "
                                f"nor {Manifest.FILE} (`gptoss export` writes it)")
            if self.export_dir is None:
                folders = Folders.of(models_dir=models_dir or self.run_dir.parent, exports_dir=exports_dir)
                candidate = folders.export_dir(self.run_dir.name)
                if Manifest.exists(candidate):
                    self.export_dir, self.manifest = candidate, Manifest.load(candidate)
        except RecordError as e:
            raise EvalError(str(e)) from e
        self.name = (self.run_dir or self.export_dir).name

    @property
    def record_dir(self) -> Path:
        """eval.json's folder: beside training_info.json, or beside manifest.json for an export alone."""
        return self.run_dir or self.export_dir

    @property
    def adapter_dir(self) -> Path | None:
        return self.run_dir / (self.info.adapter or ADAPTER_DIR) if self.run_dir else None

    @property
    def base(self) -> str | None:
        if self.info is None:
            return None
        base = self.info.base_model
        if not Path(base).is_absolute() and (self.run_dir / base).is_dir():
            base = str((self.run_dir / base).resolve())
        return base

    @property
    def merged_dir(self) -> Path | None:
        if self.manifest is None:
            return None
        p = Path(self.manifest.merged.path)
        return p if p.is_absolute() else self.export_dir / p


# ---------------------------------------------------------------------------------------------
# The rows


def _tokenizer(target: Target):
    from transformers import AutoTokenizer

    where = target.adapter_dir if target.adapter_dir and (target.adapter_dir / "tokenizer_config.json").is_file() \
        else target.merged_dir or target.base
    return AutoTokenizer.from_pretrained(str(where))


def examples(target: Target, tokenizer, *, dataset: str | None, max_rows: int | None) -> tuple[list, dict]:
    """(training/data.py Examples, the data description for eval.json): the run's held-out rows or ``dataset``."""
    from gptoss.training import data as data_mod

    cfg = dict(target.info.config) if target.info else {}
    render = {"max_seq_length": cfg.get("max_seq_length", 1024), "too_long": cfg.get("too_long", "drop"),
              "loss_on": cfg.get("loss_on", "assistant"), "reasoning_effort": cfg.get("reasoning_effort", "medium")}
    if dataset is not None:
        source = data_mod.resolve_source(dataset)
        prepared = data_mod.prepare(source, tokenizer, **render, max_rows=max_rows)
        rows, kind = prepared.train, "dataset"
    else:
        if target.info is None:
            raise EvalError(f"{target.record_dir}: no training record to find the held-out rows in; "
                            f"pass --dataset FILE (rows of {{messages}} like the training data)")
        fraction = cfg.get("eval_fraction") or 0.0
        if fraction <= 0:
            raise EvalError(f"--run {target.run_dir}: training held out no rows (--eval-fraction 0); train with "
                            f"--eval-fraction 0.1 or pass --dataset FILE")
        source = data_mod.resolve_source(cfg["dataset"], split=cfg.get("dataset_split", "train"),
                                         revision=(target.info.dataset.revision if target.info.dataset else None)
                                         or cfg.get("dataset_revision"))
        prepared = data_mod.prepare(source, tokenizer, **render, eval_fraction=fraction,
                                    skip_bad_rows=cfg.get("skip_bad_rows", False), max_rows=cfg.get("max_rows"),
                                    seed=cfg.get("seed", 0))
        recorded = target.info.dataset.content_sha256 if target.info.dataset else None
        if recorded and recorded != prepared.content_sha256:
            raise EvalError(f"--run {target.run_dir}: {cfg['dataset']} changed since training (sha256 {recorded[:12]} "
                            f"then, {prepared.content_sha256[:12]} now), so its held-out rows are not known; "
                            f"pass --dataset FILE")
        rows, kind = prepared.eval, "held-out"
        if max_rows is not None:
            rows = rows[:max_rows]
    desc = {"source": kind, "path": source.name, "content_sha256": prepared.content_sha256,
            "rows": [e.row for e in rows], "examples": len(rows), "tokens": sum(e.n_supervised for e in rows),
            **render, "eval_fraction": cfg.get("eval_fraction") if kind == "held-out" else None,
            "seed": cfg.get("seed") if kind == "held-out" else None}
    return rows, desc


# ---------------------------------------------------------------------------------------------
# Scoring


def _nll_of_logits(logits, ids: list[int], labels: list[int]) -> tuple[float, int]:
    """(summed negative log-likelihood, tokens) of the supervised tokens; ``logits[t]`` predicts ``ids[t + 1]``."""
    import numpy as np

    from gptoss.training.data import IGNORE_INDEX

    positions = [t - 1 for t in range(1, len(ids)) if labels[t] != IGNORE_INDEX]
    if not positions:
        return 0.0, 0
    rows = np.asarray(logits, dtype=np.float64)[positions]
    top = rows.max(axis=-1, keepdims=True)
    lse = (top[:, 0] + np.log(np.exp(rows - top).sum(axis=-1)))
    targets = rows[np.arange(len(positions)), [ids[t + 1] for t in positions]]
    return float((lse - targets).sum()), len(positions)


def score_hf(model_dir: str, rows: list, *, adapter: str | None = None, progress: bool = True,
             desc: str = "") -> tuple[float, int]:
    import torch
    from transformers import AutoModelForCausalLM

    from gptoss.exporters.fidelity import reference_config
    from gptoss.progress import Stage

    config, _ = reference_config(model_dir)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), config=config, dtype=torch.float32)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter))
    model.eval()
    nll, tokens = 0.0, 0
    with torch.no_grad(), Stage(f"loss of {desc}", total=len(rows), unit="rows", enabled=progress) as bar:
        for e in rows:
            logits = model(torch.tensor([e.input_ids])).logits[0].numpy()
            n, t = _nll_of_logits(logits, e.input_ids, e.labels)
            nll, tokens = nll + n, tokens + t
            bar.update(1)
    del model
    return nll, tokens


def score_gguf(path: Path, rows: list, *, threads: int | None = None, progress: bool = True,
               log: Path | None = None) -> tuple[float, int]:
    from gptoss import llamacpp
    from gptoss.exporters.gguf import tool_log
    from gptoss.progress import Stage

    llama_cpp = llamacpp.bindings()
    n_ctx = max(len(e.input_ids) for e in rows) + 8
    f32 = 0  # GGML_TYPE_F32: the file is measured, not the runtime's F16 cache (as exporters/fidelity.py)
    nll, tokens = 0.0, 0
    with tool_log(log, f"eval: llama_cpp.Llama({path}, logits_all=True)") as write, \
            llamacpp.log_lines_to(llama_cpp, write), \
            Stage(f"loss of {path.name}", total=len(rows), unit="rows", enabled=progress) as bar:
        llm = llama_cpp.Llama(model_path=str(path), logits_all=True, n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx,
                              n_threads=threads or os.cpu_count(), verbose=False, seed=0, type_k=f32, type_v=f32)
        try:
            for e in rows:
                llm.reset()
                llm.eval(e.input_ids)
                n, t = _nll_of_logits(llm.scores[: len(e.input_ids)], e.input_ids, e.labels)
                nll, tokens = nll + n, tokens + t
                bar.update(1)
        finally:
            llm.close()
    return nll, tokens


def _row(name: str, kind: str, path: str, nll: float, tokens: int, examples: int, seconds: float) -> ArtifactLoss:
    mean = nll / tokens if tokens else float("nan")
    return ArtifactLoss(name=name, kind=kind, path=path, mean_loss=round(mean, 6),
                        perplexity=round(math.exp(min(mean, 700)), 4), tokens=tokens, examples=examples,
                        seconds=round(seconds, 2))


def _deltas(rows: list[ArtifactLoss]) -> None:
    base = next((r for r in rows if r.name == "base"), None)
    merged = next((r for r in rows if r.name == "merged"), None)
    for r in rows:
        if base is not None and r is not base:
            r.delta_vs_base = round(r.mean_loss - base.mean_loss, 6)
        if merged is not None and r.kind == "gguf":
            r.delta_vs_merged = round(r.mean_loss - merged.mean_loss, 6)


def losses(target: Target, rows: list, *, gguf: bool = True, quants: list[str] | None = None,
           threads: int | None = None, progress: bool = True) -> list[ArtifactLoss]:
    """Loss per artifact: base, adapter, merged, every GGUF (or those of ``quants``)."""
    out: list[ArtifactLoss] = []

    def timed(name, kind, path, fn):
        t0 = time.perf_counter()
        nll, tokens = fn()
        out.append(_row(name, kind, str(path), nll, tokens, len(rows), time.perf_counter() - t0))

    base = target.base
    if base is not None:
        timed("base", "hf", base, lambda: score_hf(base, rows, progress=progress, desc="the base"))
        timed("adapter", "hf", target.adapter_dir,
              lambda: score_hf(base, rows, adapter=str(target.adapter_dir), progress=progress, desc="base + adapter"))
    if target.merged_dir is not None:
        if target.merged_dir.is_dir():
            timed("merged", "hf", target.merged_dir,
                  lambda: score_hf(str(target.merged_dir), rows, progress=progress, desc="the merged model"))
        else:
            print(f"gptoss eval: {target.merged_dir} is gone (the export recorded it): no merged row", file=sys.stderr)
    if gguf and target.manifest is not None:
        wanted = {q.strip().lower() for q in quants} if quants else None
        log = target.export_dir / "logs" / "eval.log"
        for a in target.manifest.artifacts:
            if wanted is not None and a.quant.lower() not in wanted and a.label.lower() not in wanted:
                continue
            path = Path(a.path) if Path(a.path).is_absolute() else target.export_dir / a.path
            if not path.is_file():
                raise EvalError(f"{target.export_dir / Manifest.FILE} lists {a.path}, which is missing; "
                                f"re-run `gptoss export` or pass --no-gguf")
            timed(a.label, "gguf", path, lambda: score_gguf(path, rows, threads=threads, progress=progress, log=log))
        if wanted:
            known = {a.quant for a in target.manifest.artifacts} | {a.label.lower() for a in target.manifest.artifacts}
            if unknown := sorted(wanted - known):
                raise EvalError(f"--quants {','.join(unknown)}: not in {target.export_dir / Manifest.FILE} "
                                f"(it has {', '.join(a.label for a in target.manifest.artifacts)})")
    _deltas(out)
    return out


# ---------------------------------------------------------------------------------------------
# Table, chart


def table(record: EvalRecord):
    from rich.table import Table

    t = Table(title=f"held-out loss: {record.run} ({record.data.get('source')}, {record.data.get('examples')} rows, "
                    f"{record.data.get('tokens')} tokens)")
    for col in ("artifact", "kind", "mean loss", "perplexity", "tokens", "Δ vs base", "Δ vs merged (quant cost)"):
        t.add_column(col, justify="left" if col in ("artifact", "kind") else "right")

    def signed(x):
        return "" if x is None else f"{x:+.4f}"

    for a in record.artifacts:
        t.add_row(a.name, a.kind, f"{a.mean_loss:.4f}", f"{a.perplexity:.4g}", str(a.tokens), signed(a.delta_vs_base),
                  signed(a.delta_vs_merged))
    return t


def print_tables(record: EvalRecord, *, file=None) -> None:
    from rich.console import Console

    console = Console(file=file or sys.stdout, width=120)
    if record.artifacts:
        console.print(table(record))
    if record.generation:
        from gptoss.evaluation import generation

        console.print(generation.table(record.generation))
    if record.harness:
        from gptoss.evaluation import harness

        console.print(harness.table(record.harness))


def chart(record: EvalRecord, path: Path) -> Path | None:
    """Loss per artifact (and base vs fine-tuned generation checks when run) as a PNG; None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("gptoss eval: no chart (matplotlib is missing: pip install 'gptoss-toolchain[eval]')", file=sys.stderr)
        return None
    panels = [p for p in ("loss", "generation") if (p == "loss" and record.artifacts) or
              (p == "generation" and record.generation)]
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.2), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        if panel == "loss":
            names = [a.name for a in record.artifacts]
            values = [a.mean_loss for a in record.artifacts]
            colors = ["#888888" if a.name == "base" else "#d9822b" if a.kind == "gguf" else "#2b6cd9"
                      for a in record.artifacts]
            bars = ax.bar(names, values, color=colors)
            ax.bar_label(bars, fmt="%.3f", fontsize=8)
            ax.set_ylabel("mean loss on the eval rows (nats)")
            ax.set_title(f"loss per artifact ({record.data.get('source')}, {record.data.get('tokens')} tokens)")
            ax.tick_params(axis="x", rotation=30)
        else:
            from gptoss.evaluation import generation

            generation.plot(ax, record.generation)
    fig.suptitle(f"gptoss eval: {record.run}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------
# The command


def evaluate(run: str = "latest", *, dataset: str | None = None, max_rows: int | None = None, loss: bool = True,
             gguf: bool = True, quants: str | None = None, generate: bool = False, url: str | None = None,
             api_key: str | None = None, base_url: str | None = None, max_tokens: int = 256, seed: int = 0,
             harness: str | None = None, harness_args: str | None = None, threads: int | None = None,
             models_dir: str | None = None, exports_dir: str | None = None, progress: bool = True) -> str:
    """Held-out loss of the base, base + adapter, merged model and every GGUF; writes eval.json, a table, a PNG.

    Args:
        run: the training run (models/<run>, a name under --models-dir, latest) or an export (exports/<run>).
        dataset: score these rows (.jsonl/.parquet of {messages}) instead of the rows training held out.
        max_rows: score at most this many rows.
        loss: compute the loss per artifact (--no-loss keeps only the generation checks and harness).
        gguf: score the export's GGUFs with llama.cpp (--no-gguf skips them).
        quants: only these GGUFs, comma-separated (e.g. f16,q4_k_m); default every GGUF of the export.
        generate: generation checks through the serving API: base (--base-url) vs fine-tuned (--url) answers.
        url: the fine-tuned model's OpenAI-compatible API, e.g. http://127.0.0.1:8000/v1 (generation, harness).
        api_key: the API key the server wants (default: $GPTOSS_API_KEY).
        base_url: the base model's API, for --generate's comparison.
        max_tokens: most tokens per generated answer.
        seed: sampling seed of the generation checks (temperature 0 as well).
        harness: an lm-evaluation-harness task (name, or a task YAML file) run against --url.
        harness_args: lm-eval options as key=value pairs, comma-separated, e.g. limit=10,num_fewshot=0.
        threads: CPU threads for llama.cpp (default: all cores).
        models_dir: where runs live (default ./models).
        exports_dir: where exports live (default beside models_dir).
        progress: progress bars.
    """
    problems = []
    if max_rows is not None and (not isinstance(max_rows, int) or max_rows < 1):
        problems.append(f"--max-rows {max_rows}: must be a whole number of at least 1")
    if (generate or harness) and not url:
        problems.append(f"--{'generate' if generate else 'harness'} needs --url (the served fine-tuned model's "
                        "OpenAI-compatible API, e.g. `gptoss serve` at http://127.0.0.1:8000/v1)")
    if not (loss or generate or harness):
        problems.append("nothing to do: --no-loss without --generate or --harness")
    if problems:
        raise EvalError("; ".join(problems))
    quant_list = [q for q in str(quants).split(",") if q.strip()] if quants else None
    api_key = api_key or os.environ.get("GPTOSS_API_KEY")
    target = Target(str(run), models_dir=models_dir, exports_dir=exports_dir)
    previous = EvalRecord.load(target.record_dir) if EvalRecord.exists(target.record_dir) else None

    tokenizer = _tokenizer(target)
    rows, data_desc = examples(target, tokenizer, dataset=dataset, max_rows=max_rows)
    record = EvalRecord(run=target.name, data=data_desc, reference=REFERENCE,
                        versions=package_versions(VERSIONED),
                        command=" ".join(["gptoss", "eval", *sys.argv[2:]]) if sys.argv[1:2] == ["eval"] else None)
    if previous is not None and previous.data.get("content_sha256") == data_desc["content_sha256"] \
            and previous.data.get("rows") == data_desc["rows"]:
        # Sections not re-run this time stay (same rows).
        record.artifacts, record.generation, record.harness = previous.artifacts, previous.generation, previous.harness
    if loss:
        record.artifacts = losses(target, rows, gguf=gguf, quants=quant_list, threads=threads, progress=progress)
    if generate:
        from gptoss.evaluation import generation

        record.generation = generation.run_checks(target, rows, tokenizer, url=url, base_url=base_url,
                                                  api_key=api_key, max_tokens=max_tokens, seed=seed,
                                                  data=data_desc, progress=progress)
    if harness:
        from gptoss.evaluation import harness as harness_mod

        record.harness = harness_mod.run(harness, url=url, api_key=api_key, extra=harness_args,
                                         tokenizer_dir=str(target.adapter_dir or target.merged_dir),
                                         out_dir=target.record_dir / "harness")
    record.created = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    png = chart(record, target.record_dir / CHART)
    record.chart = png.name if png else None
    path = record.write(target.record_dir)
    print_tables(record)
    return str(path)
