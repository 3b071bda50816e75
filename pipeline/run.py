"""`gptoss pipeline`: every stage once, in order, the way `docker compose` runs them one by one.

fixture (or a base model) -> train -> merge + GGUF F16 / Q4_K_M / Q5_K_M + Modelfiles (export)
-> one question asked of the base model and of the fine-tune in every form it now exists in (the
adapter and the merged model on the transformers backend, the F16 and the first quant GGUF on the
llama.cpp backend) -> a summary: the answers side by side, each compared with the trained answer.

`--demo` uses the embedded tiny model and the bundled demo set (four short Harmony conversations
with reasoning) and trains until it answers them, on a CPU.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import socket
import subprocess
import sys
import time
from importlib import resources
from pathlib import Path
from typing import Any, ClassVar

from gptoss.errors import ToolchainError
from gptoss.folders import Folders
from gptoss.machine import stop_process
from gptoss.records import Manifest, Record, field

DEMO_DATASET = "demo_harmony.jsonl"
# The question asked in the summary is the dataset's first row. A tiny random model memorises the
# few rows it is trained on and cannot generalise, so only a trained prompt shows what training did.
QUESTION_ROW = 0
# What `--demo` passes to `gptoss train` (the flags a user would type; printed as that command).
# Tuned on 2 CPU cores so that the tiny fixture answers every demo row: every row in each step,
# a high learning rate for LoRA (the base weights are random), no warm-up, one checkpoint. LoRA
# does not train the random lm_head, which keeps the loss near 7 (ln of the 201k vocabulary is
# 12.2) even once every answer is the top token; the loss monitor's targets say so.
DEMO_TRAIN_FLAGS: dict[str, Any] = {
    "profile": "quick_test", "max_steps": 60, "batch_size": 4, "grad_accum": 1, "learning_rate": 5e-3,
    "rank": 16, "lora_alpha": 32, "warmup_steps": 0, "save_steps": 60, "gradient_checkpointing": "off",
    "device": "cpu", "seed": 0, "reasoning_effort": "low", "loss_target": 7.5, "underfit_above": 8.0,
}
SUMMARY_FILE = "pipeline_summary.json"
SERVE_LOG_TAIL = 25  # lines of a failed server's log shown in the error


class PipelineError(ToolchainError):
    """A stage of the pipeline failed; the message names the stage, what it was doing and its log."""


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def demo_dataset() -> Path:
    return Path(str(resources.files("gptoss").joinpath("data", DEMO_DATASET)))


# ---------------------------------------------------------------------------------------------
# The question and its trained answer


@dataclasses.dataclass
class Question:
    """A prompt of the training set and the assistant answer it was trained to give."""

    messages: list[dict]  # what the chat request sends (the row without its last assistant turn)
    reasoning_effort: str
    reasoning: str  # the trained analysis
    content: str  # the trained final answer
    source: str  # "<dataset> row N"

    @property
    def user_text(self) -> str:
        return next((m["content"] for m in reversed(self.messages) if m["role"] == "user"), "")


def question_from(dataset: str, *, reasoning_effort: str, split: str = "train", revision: str | None = None,
                  row: int = QUESTION_ROW) -> Question:
    """The ``row``-th usable row of the training data (read by the training stage's own reader)."""
    from gptoss.training import data as D

    source = D.resolve_source(dataset, split=split, revision=revision)
    seen = 0
    for lineno, raw in D.FORMATS[source.kind](source):
        messages, effort, problem = D.check_row(raw)
        if problem:
            continue  # training reports (or skips) it; the question is the first row it trains on
        if seen == row:
            answer = messages[-1]
            if answer.get("tool_calls"):
                raise PipelineError(f"{source.where(lineno)}: the question row's answer is a tool call; "
                                    "put a row with a plain answer first")
            prompt = [{k: v for k, v in m.items() if k != "thinking"} for m in messages[:-1]]
            return Question(prompt, effort or reasoning_effort, answer.get("thinking") or "", answer.get("content") or "",
                            source.where(lineno))
        seen += 1
    raise PipelineError(f"--dataset {dataset}: no usable row {row} to ask (rows must hold {{'messages': [...]}})")


# ---------------------------------------------------------------------------------------------
# Comparing answers


def _tokens(text: str) -> list[int]:
    from gptoss import harmony

    return harmony.encoding().encode(text, disallowed_special=())


def difference(reasoning: str, content: str, *, reasoning_ref: str, content_ref: str) -> str | None:
    """None when both parts are equal, else which part differs and at which token (o200k, 0-based)."""
    for part, got, want in (("reasoning", reasoning, reasoning_ref), ("content", content, content_ref)):
        if got == want:
            continue
        a, b = _tokens(got), _tokens(want)
        at = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        return f"{part} differs at token {at}"
    return None


def _same(diff: str | None) -> str:
    return "same" if diff is None else diff


# ---------------------------------------------------------------------------------------------
# Serving


@dataclasses.dataclass
class Answer:
    """One model's greedy answer to the question through `gptoss serve`."""

    label: str  # "base model", "adapter", "merged model", "F16 GGUF", "Q4_K_M GGUF"
    backend: str
    model: str
    quant: str | None
    reasoning: str
    content: str
    finish_reason: str
    completion_tokens: int
    ready_seconds: float  # from starting `gptoss serve` to /health 200 (the engine existed before)
    seconds: float  # the request
    vs_trained: str | None = None  # None: same as the trained answer; else the difference named
    vs_f16: str | None = None  # quant GGUFs: against the F16 GGUF's answer

    @property
    def tokens_per_second(self) -> float:
        return self.completion_tokens / self.seconds if self.seconds > 0 else 0.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: Path, n: int = SERVE_LOG_TAIL) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join("    " + line for line in lines[-n:]) or "    (empty)"


def serve_command(backend: str, model: str, *, quant: str | None = None) -> list[str]:
    """The `gptoss serve` arguments the pipeline uses (CPU, one slot); the port comes after."""
    # --no-date: the rows were trained without a Current date line, and the answers are compared with them.
    cmd = ["serve", "--backend", backend, "--model", model, "--device", "cpu", "--parallel", "1", "--no-date"]
    return cmd + (["--quant", quant] if quant else [])


def ensure_engine(backend: str, *, label: str) -> None:
    """Build what the backend's engine needs before any readiness clock starts (llama.cpp, once per machine)."""
    if backend == "llamacpp":
        from gptoss import llamacpp

        _say(f"serve ({label}): making sure llama.cpp's llama-server is built (compiled once per machine)")
        llamacpp.tool("llama-server")


class Server:
    """`gptoss serve` as a child process on a free port: start, wait until ready, ask, stop."""

    def __init__(self, backend: str, model: str, *, log_path: Path, label: str | None = None, quant: str | None = None):
        self.backend, self.model, self.quant, self.log_path = backend, model, quant, log_path
        self.label = label or backend
        self.args = serve_command(backend, model, quant=quant)
        self.by_hand = "gptoss " + shlex.join(self.args)
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.ready_seconds = 0.0

    def failed(self, what: str) -> PipelineError:
        return PipelineError(f"serve ({self.label}): {what}.\nLast lines of {self.log_path}:\n{_tail(self.log_path)}\n"
                             f"To see it yourself, run: {self.by_hand}")

    def start(self) -> "Server":
        """Start the child (the engine must already exist: see ensure_engine)."""
        with self.log_path.open("w") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "gptoss", *self.args, "--port", str(self.port)],
                                         stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self.started = time.monotonic()
        _say(f"serve ({self.label}): started `{self.by_hand}` on port {self.port} (log: {self.log_path})")
        return self

    def wait_ready(self, timeout: float) -> float:
        """Seconds from start until /health said 200; the clock started when the child did."""
        _say(f"serve ({self.label}): waiting up to {timeout:.0f} s (from its start) for {self.url}/health to say "
             "the model is loaded")
        while not self.poll_ready(timeout):
            time.sleep(0.5)  # polling the child's health endpoint
        return self.ready_seconds

    def poll_ready(self, timeout: float) -> bool:
        """One look at /health: True once ready; raises if the child died or ``timeout`` passed since its start."""
        import httpx

        assert self.proc is not None
        if self.proc.poll() is not None:
            raise self.failed(f"`gptoss serve` exited with {self.proc.returncode} before it was ready")
        try:
            if httpx.get(self.url + "/health", timeout=5).status_code == 200:
                self.ready_seconds = round(time.monotonic() - self.started, 2)
                return True
        except httpx.HTTPError:
            pass
        if time.monotonic() - self.started > timeout:
            raise self.failed(f"not ready after {timeout:.0f} s of loading the model "
                              "(the engine was already built; a slow machine may need --serve-timeout)")
        return False

    def ask(self, question: Question, *, max_tokens: int, timeout: float) -> Answer:
        """One chat request, greedy (temperature 0, seed 0), at the question's reasoning effort."""
        import httpx

        _say(f"serve ({self.label}): ready in {self.ready_seconds:.1f} s; asking {question.user_text!r} "
             f"(greedy, up to {max_tokens} tokens)")
        try:
            served_name = httpx.get(self.url + "/v1/models", timeout=30).json()["data"][0]["id"]
            t0 = time.perf_counter()
            resp = httpx.post(self.url + "/v1/chat/completions", timeout=timeout, json={
                "model": served_name, "messages": question.messages, "max_tokens": max_tokens, "temperature": 0.0,
                "seed": 0, "reasoning_effort": question.reasoning_effort})
        except httpx.HTTPError as e:
            raise self.failed(f"the chat request failed ({type(e).__name__}: {e})") from None
        seconds = time.perf_counter() - t0
        if resp.status_code != 200:
            raise self.failed(f"the chat request got HTTP {resp.status_code}: {resp.text[:300]}")
        body = resp.json()
        choice = body["choices"][0]
        msg = choice["message"]
        return Answer(self.label, self.backend, self.model, self.quant, msg.get("reasoning_content") or "",
                      msg.get("content") or "", choice["finish_reason"], int(body["usage"]["completion_tokens"]),
                      self.ready_seconds, round(seconds, 3))

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)


def serve_once(backend: str, model: str, *, question: Question, log_path: Path, label: str | None = None,
               quant: str | None = None, ready_timeout: float = 300.0, max_tokens: int = 48) -> Answer:
    """Start `gptoss serve`, wait for /health, ask ``question`` once (greedy, seed 0), stop the server.

    The readiness clock starts only when the engine exists: llama-server is built first (once per
    machine) so that no build runs inside the wait.
    """
    server = Server(backend, model, log_path=log_path, label=label, quant=quant)
    ensure_engine(backend, label=server.label)
    try:
        server.start().wait_ready(ready_timeout)
        return server.ask(question, max_tokens=max_tokens, timeout=ready_timeout)
    finally:
        server.stop()


def ask_all(asks: list[tuple[str, str, str, str | None]], *, question: Question, logs_dir: Path, ready_timeout: float,
            max_tokens: int, at_once: bool = False) -> list[Answer]:
    """serve_once for each (label, backend, model, quant), the engines built first. ``at_once``: every
    server loads at the same time (small models only: each holds its own copy); each is stopped once
    it has answered."""
    for backend in dict.fromkeys(b for _, b, _, _ in asks):
        ensure_engine(backend, label=next(label for label, b, _, _ in asks if b == backend))
    servers = [Server(backend, model, log_path=logs_dir / f"serve-{label.lower().replace(' ', '-')}.log", label=label,
                      quant=quant) for label, backend, model, quant in asks]
    answers = []
    if not at_once:
        for server in servers:
            try:
                server.start().wait_ready(ready_timeout)
                answers.append(server.ask(question, max_tokens=max_tokens, timeout=ready_timeout))
            finally:
                server.stop()
        return answers
    try:
        for server in servers:
            server.start()
        _say(f"serve: waiting up to {ready_timeout:.0f} s (from each start) for all {len(servers)} servers' /health to say "
             "their model is loaded")
        waiting = list(servers)
        while waiting:
            waiting = [server for server in waiting if not server.poll_ready(ready_timeout)]
            if waiting:
                time.sleep(0.5)  # polling the children's health endpoints
        for server in servers:
            answers.append(server.ask(question, max_tokens=max_tokens, timeout=ready_timeout))
            server.stop()
    finally:
        for server in servers:
            server.stop()
    return answers


# ---------------------------------------------------------------------------------------------
# The summary record


@dataclasses.dataclass
class PipelineSummary(Record):
    """``<work>/pipeline_summary.json``: what `gptoss pipeline` ran and what each model answered."""

    FILE: ClassVar[str] = SUMMARY_FILE
    COMMAND: ClassVar[str] = "gptoss pipeline"
    SCHEMA_VERSION: ClassVar[int] = 2

    run: str = field("the training run folder (models/<run>)")
    manifest: str = field("the export's manifest.json")
    train_command: str = field("the `gptoss train` command the pipeline ran")
    question: Question = field("the question asked and its trained answer")
    answers: list[Answer] = field("each model's answer and its comparisons", factory=list)
    stages: dict = field("stage -> wall seconds", factory=dict)
    cpu_seconds: dict = field("stage -> user + system seconds of the pipeline and its children", factory=dict)
    schema_version: int = field("schema of this record", SCHEMA_VERSION)


# ---------------------------------------------------------------------------------------------
# Tables


def _fmt(x) -> str:
    if x is None:
        return ""
    if isinstance(x, float):
        return f"{x:.3g}"
    return str(x)


def _reference_name(reference: str) -> str:
    """The fidelity record's reference, shortened for the table (manifest.json has it in full)."""
    if reference.startswith("merged HF model"):
        return "merged model (transformers)"
    if reference.endswith("-F16.gguf"):
        return "F16 GGUF"
    return reference


def artifacts_table(manifest: Manifest):
    """Each GGUF's size and logits fidelity, against the reference its own row names."""
    from rich.table import Table

    from gptoss.progress import human_bytes

    art = Table(title="GGUFs (exports/<run>/manifest.json): each file's logits against the reference in its row",
                caption="F16 is measured against the merged model, every quant against F16; "
                        "KL(reference‖file) of the next-token distributions; top-1: share of positions with the same top token")
    for col in ("GGUF", "size", "fallbacks", "measured against", "NMSE", "KL", "top-1", "gate"):
        art.add_column(col)
    for a in manifest.artifacts:
        fid = a.fidelity or {}
        reference = _reference_name(fid["reference"]) if fid.get("reference") else (
            f"not measured: {fid['skipped']}" if fid.get("skipped") else "")
        gate = "" if fid.get("passed") is None else ("passed" if fid["passed"] else "FAILED")
        art.add_row(a.label, human_bytes(a.size), str(a.fallbacks), reference, _fmt(fid.get("nmse")),
                    _fmt(fid.get("mean_kl")), _fmt(fid.get("top1_agreement")), gate)
    return art


def answers_table(question: Question, answers: list[Answer]):
    from rich.table import Table

    source = os.path.basename(question.source) if os.path.isabs(question.source) else question.source
    table = Table(title=f"Answers to {question.user_text!r} ({source}; greedy, seed 0, "
                        f"reasoning effort {question.reasoning_effort})",
                  caption=f"trained answer: reasoning {question.reasoning!r}, content {question.content!r}; "
                          "differences counted in o200k tokens from 0; (none): no Harmony message of that kind "
                          "among the tokens generated")
    for col in ("answer from", "engine", "reasoning", "content", "tokens", "vs trained answer", "vs F16 GGUF"):
        table.add_column(col)
    for a in answers:
        table.add_row(a.label, "llama.cpp" if a.backend == "llamacpp" else a.backend, a.reasoning or "(none)",
                      a.content or "(none)", f"{a.completion_tokens} ({a.finish_reason})", _same(a.vs_trained),
                      "" if a.quant in (None, "f16") else _same(a.vs_f16))
    return table


def verdict(answers: list[Answer]) -> str:
    """One sentence: the fine-tune's answer is the same everywhere, or where it differs."""
    tuned = [a for a in answers if a.label != "base model"]
    base = next((a for a in answers if a.label == "base model"), None)
    parts = []
    if base is not None:
        parts.append("the base model gives the trained answer (training showed nothing)" if base.vs_trained is None
                     else f"the base model does not give the trained answer ({base.vs_trained})")
    same = [a.label for a in tuned if a.vs_trained is None]
    diff = [f"{a.label}: {a.vs_trained}" + (f", vs F16 GGUF {_same(a.vs_f16)}" if a.quant not in (None, "f16") else "")
            for a in tuned if a.vs_trained is not None]
    if same:
        parts.append(f"the trained answer comes back from {', '.join(same)}")
    if diff:
        parts.append(f"it differs on {'; '.join(diff)}")
    return "; ".join(parts) + "."


def stages_table(stages: dict[str, float], cpu: dict[str, float]):
    from rich.table import Table

    table = Table(title="Stages", caption="CPU: user + system seconds of the pipeline and the processes it ran")
    for col in ("stage", "wall s", "CPU s"):
        table.add_column(col, justify="left" if col == "stage" else "right")
    for name, seconds in stages.items():
        table.add_row(name, f"{seconds:.1f}", f"{cpu.get(name, 0.0):.1f}")
    table.add_row("total", f"{sum(stages.values()):.1f}", f"{sum(cpu.values()):.1f}")
    return table


# ---------------------------------------------------------------------------------------------
# The pipeline


def _cpu_seconds() -> float:
    """User + system CPU seconds of this process and of its finished children."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def _train_command(flags: dict[str, Any]) -> str:
    from gptoss.training.config import flag

    words = ["gptoss", "train"]
    for name, value in flags.items():
        if value is None:
            continue
        words += [flag(name), str(value).lower() if isinstance(value, bool) else str(value)]
    return shlex.join(words)


def pipeline(*, demo: bool = False, model: str | None = None, dataset: str | None = None, work: str = ".",
             profile: str = "quick_test", max_steps: int | None = None, quants: str = "q4_k_m,q5_k_m",
             serve: bool = True, serve_timeout: float = 300.0) -> str:
    """Run every stage once: fixture/base -> train -> merge -> GGUF F16/Q4_K_M/Q5_K_M -> Modelfiles -> ask -> summary.

    The summary asks the training data's first question of the base model and of the fine-tune as
    adapter, merged model, F16 and quant GGUF, and names any answer that differs from the trained one.

    Args:
        demo: use the embedded tiny gpt-oss (written with `gptoss fixture tiny`) and the bundled demo set, on CPU, trained until it answers.
        model: base model (Hub id or folder); required unless --demo.
        dataset: training data (Hub id, JSONL or Parquet; its first usable row is the question the summary asks); default with --demo: the bundled demo set.
        work: folder that receives models/, exports/, logs/ and pipeline_summary.json (default: the current folder).
        profile: training profile (default quick_test; --demo uses its own tuned flags, printed as a `gptoss train` command).
        max_steps: override the profile's step count.
        quants: GGUF kinds besides F16; the first is the quant asked the question.
        serve: finish by asking the question of the base model, the adapter, the merged model, the F16 and the first quant GGUF.
        serve_timeout: seconds each server may take to load its model (counted after llama.cpp is built).
    Returns:
        The path of the export manifest.
    """
    from rich.console import Console

    if not isinstance(serve_timeout, (int, float)) or isinstance(serve_timeout, bool) or serve_timeout <= 0:
        raise PipelineError(f"--serve-timeout must be a positive number of seconds, got {serve_timeout!r}")
    console = Console(stderr=True)
    root = Path(work).expanduser().absolute()
    folders = Folders.of(models_dir=root / "models", exports_dir=root / "exports")
    models_dir, exports_dir, logs_dir = folders.models_dir, folders.exports_dir, root / "logs"
    for d in (models_dir, exports_dir, logs_dir):
        d.mkdir(parents=True, exist_ok=True)
    stages: dict[str, float] = {}
    cpu: dict[str, float] = {}
    clock, cpu_clock = time.perf_counter(), _cpu_seconds()

    def lap(name: str) -> None:
        nonlocal clock, cpu_clock
        now, cpu_now = time.perf_counter(), _cpu_seconds()
        stages[name], cpu[name] = round(now - clock, 1), round(cpu_now - cpu_clock, 1)
        clock, cpu_clock = now, cpu_now

    if demo:
        from gptoss.fixtures import fixture

        base = models_dir / "base-tiny"
        if not (base / "fixture.json").is_file():
            console.rule("fixture: tiny gpt-oss (real tokenizer, random weights)")
            fixture("tiny", out=str(base), force=base.exists())
        model = str(base)
        dataset = dataset or str(demo_dataset())
        lap("fixture")
    if not model or not dataset:
        raise PipelineError("pass --demo, or both --model and --dataset")

    from gptoss import training
    from gptoss.exporters.export import export_run
    from gptoss.training.config import build_config

    flags: dict[str, Any] = dict(DEMO_TRAIN_FLAGS) if demo else {"profile": profile}
    if max_steps is not None:
        flags["max_steps"] = max_steps
    flags.update(model=model, dataset=dataset, output_dir=str(models_dir))
    cfg = build_config(flags)  # every flag problem now, before any stage runs
    question = question_from(cfg.dataset, reasoning_effort=cfg.reasoning_effort, split=cfg.dataset_split,
                             revision=cfg.dataset_revision) if serve else None
    train_command = _train_command(flags)
    console.rule("train")
    _say(f"train: {train_command}")
    run_dir = training.train(**flags)
    lap("train")
    console.rule("export: merge, GGUF F16 + quants, Modelfiles, fidelity")
    manifest_path = Path(export_run(str(run_dir), quants=quants, exports_dir=str(exports_dir)).manifest_path)
    manifest = Manifest.load(manifest_path)
    export_dir = manifest_path.parent
    lap("export")
    answers: list[Answer] = []
    if serve:
        console.rule(f"serve: asking {question.user_text!r} of the base model and of the fine-tune in each form")
        first_quant = quants.split(",")[0].strip().lower()
        merged_dir = export_dir / manifest.merged.path
        asks = [("base model", "transformers", model, None), ("adapter", "transformers", str(run_dir), None),
                ("merged model", "transformers", str(merged_dir), None), ("F16 GGUF", "llamacpp", str(export_dir), "f16")]
        if first_quant:
            asks.append((f"{first_quant.upper()} GGUF", "llamacpp", str(export_dir), first_quant))
        reference_tokens = len(_tokens(question.reasoning)) + len(_tokens(question.content))
        max_tokens = reference_tokens + 16  # the channel headers between them, and room to go on
        answers = ask_all(asks, question=question, logs_dir=logs_dir, ready_timeout=serve_timeout, max_tokens=max_tokens,
                          at_once=demo)
        lap("serve")
        f16 = next((a for a in answers if a.quant == "f16"), None)
        for a in answers:
            a.vs_trained = difference(a.reasoning, a.content, reasoning_ref=question.reasoning, content_ref=question.content)
            if a.quant not in (None, "f16") and f16 is not None:
                a.vs_f16 = difference(a.reasoning, a.content, reasoning_ref=f16.reasoning, content_ref=f16.content)
    out = Console()
    if not out.is_terminal:
        out.width = max(out.width, 120)  # a log or a pipe: room for the tables
    out.print(artifacts_table(manifest))
    if serve:
        out.print(answers_table(question, answers))
        out.print(verdict(answers))
    out.print(stages_table(stages, cpu))
    if question is None:
        question = Question([], "", "", "", "")
    PipelineSummary(run=str(run_dir), manifest=str(manifest_path), train_command=train_command, question=question,
                    answers=answers, stages=stages, cpu_seconds=cpu).write(root / SUMMARY_FILE)
    return str(manifest_path)
