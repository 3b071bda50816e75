"""`gptoss pipeline`: every stage once, in order, the way `docker compose` runs them one by one.

fixture (or a base model) -> train -> merge + GGUF F16 / Q4_K_M / Q5_K_M + Modelfiles (export)
-> one chat request on each serving backend -> a summary table. `--demo` uses the embedded tiny
model and the bundled demo dataset and runs on a CPU.
"""

from __future__ import annotations

import dataclasses
import json
import socket
import subprocess
import sys
import time
from importlib import resources
from pathlib import Path

from gptoss.errors import ToolchainError

DEMO_DATASET = "demo_harmony.jsonl"
DEMO_PROMPT = [{"role": "user", "content": "What is the capital of France?"}]


class PipelineError(ToolchainError):
    """A stage of the pipeline failed; the message names the stage and its log."""


@dataclasses.dataclass
class ServeResult:
    backend: str
    model: str
    seconds: float
    completion_tokens: int
    content: str
    reasoning: str
    finish_reason: str

    @property
    def tokens_per_second(self) -> float:
        return self.completion_tokens / self.seconds if self.seconds > 0 else 0.0


def demo_dataset() -> Path:
    return Path(str(resources.files("gptoss").joinpath("data", DEMO_DATASET)))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_once(backend: str, model: str, *, log_path: Path, quant: str | None = None, timeout: float = 600.0,
               max_tokens: int = 32) -> ServeResult:
    """Start `gptoss serve` on a free port, wait until /health says ready, send one chat request, stop."""
    import httpx

    port = _free_port()
    cmd = [sys.executable, "-m", "gptoss", "serve", "--backend", backend, "--model", model, "--device", "cpu",
           "--port", str(port), "--parallel", "1"]
    if quant:
        cmd += ["--quant", quant]
    with log_path.open("w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        try:
            url = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + timeout
            while True:
                if proc.poll() is not None:
                    raise PipelineError(f"serve ({backend}) exited with {proc.returncode}; see {log_path}")
                try:
                    if httpx.get(url + "/health", timeout=5).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise PipelineError(f"serve ({backend}) not ready after {timeout:.0f}s; see {log_path}")
                time.sleep(0.5)  # polling the child's health endpoint
            served_name = httpx.get(url + "/v1/models", timeout=30).json()["data"][0]["id"]
            start = time.perf_counter()
            resp = httpx.post(url + "/v1/chat/completions", timeout=timeout, json={
                "model": served_name, "messages": DEMO_PROMPT, "max_tokens": max_tokens, "temperature": 0.0, "seed": 0,
                "reasoning_effort": "low"})
            seconds = time.perf_counter() - start
            if resp.status_code != 200:
                raise PipelineError(f"serve ({backend}) answered {resp.status_code}: {resp.text[:300]}; see {log_path}")
            body = resp.json()
            msg = body["choices"][0]["message"]
            return ServeResult(backend, model, seconds, int(body["usage"]["completion_tokens"]), msg.get("content") or "",
                               msg.get("reasoning_content") or "", body["choices"][0]["finish_reason"])
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _human(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def summary_table(manifest: dict, served: list[ServeResult]):
    from rich.table import Table

    art = Table(title="Artifacts (exports/<run>/manifest.json)")
    for col in ("artifact", "quant", "size", "fallbacks", "NMSE vs F16", "KL", "top-1"):
        art.add_column(col)
    for a in manifest.get("artifacts", []):
        fid = a.get("fidelity") or {}
        fallbacks = a.get("fallbacks")
        art.add_row(Path(a.get("path", "?")).name, str(a.get("label") or a.get("quant") or ""), _human(int(a.get("size", 0))),
                    str(fallbacks.get("count", fallbacks) if isinstance(fallbacks, dict) else (fallbacks if fallbacks is not None else "")),
                    _fmt(fid.get("nmse")), _fmt(fid.get("mean_kl")), _fmt(fid.get("top1_agreement")))
    srv = Table(title="Serving: one request per backend (CPU)")
    for col in ("backend", "model", "tokens", "seconds", "tok/s", "finish", "content"):
        srv.add_column(col)
    for r in served:
        srv.add_row(r.backend, Path(r.model).name, str(r.completion_tokens), f"{r.seconds:.2f}", f"{r.tokens_per_second:.1f}",
                    r.finish_reason, (r.content[:40] + "…") if len(r.content) > 40 else r.content)
    return art, srv


def _fmt(x) -> str:
    if x is None:
        return ""
    if isinstance(x, float):
        return f"{x:.3g}"
    return str(x)


def pipeline(*, demo: bool = False, model: str | None = None, dataset: str | None = None, work: str = ".",
             profile: str = "quick_test", max_steps: int | None = None, quants: str = "q4_k_m,q5_k_m",
             serve: bool = True) -> str:
    """Run every stage once: fixture/base -> train -> merge -> GGUF F16/Q4_K_M/Q5_K_M -> Modelfiles -> serve -> summary.

    Args:
        demo: use the embedded tiny gpt-oss (written with `gptoss fixture tiny`) and the bundled demo dataset, on CPU.
        model: base model (Hub id or folder); required unless --demo.
        dataset: training data (Hub id, JSONL or Parquet); default with --demo: the bundled demo set.
        work: folder that receives models/ and exports/ (default: the current folder).
        profile: training profile (default quick_test).
        max_steps: override the profile's step count.
        quants: GGUF kinds besides F16.
        serve: finish with one request on each serving backend (llamacpp on the Q4_K_M GGUF, transformers on base + adapter).
    Returns:
        The path of the export manifest.
    """
    from rich.console import Console

    console = Console(stderr=True)
    root = Path(work).expanduser().absolute()
    models_dir, exports_dir, logs_dir = root / "models", root / "exports", root / "logs"
    for d in (models_dir, exports_dir, logs_dir):
        d.mkdir(parents=True, exist_ok=True)
    if demo:
        from gptoss.fixtures import fixture

        base = models_dir / "base-tiny"
        if not (base / "fixture.json").is_file():
            console.rule("fixture: tiny gpt-oss (real tokenizer, random weights)")
            fixture("tiny", out=str(base), force=base.exists())
        model = str(base)
        dataset = dataset or str(demo_dataset())
    if not model or not dataset:
        raise PipelineError("pass --demo, or both --model and --dataset")

    import training
    from exporters.export import export_run

    console.rule(f"train: profile {profile}")
    # The demo keeps the profile's step count but CPU-sized batches: 2 rows a step, no checkpointing.
    cpu_sized = {"batch_size": 2, "grad_accum": 1, "gradient_checkpointing": "off", "device": "cpu"} if demo else {}
    run_dir = training.train(profile=profile, model=model, dataset=dataset, output_dir=str(models_dir),
                             max_steps=max_steps, **cpu_sized)
    console.rule("export: merge, GGUF F16 + quants, Modelfiles, fidelity")
    result = export_run(str(run_dir), quants=quants, exports_dir=str(exports_dir))
    manifest_path = Path(result.manifest_path)
    manifest = result.manifest
    export_dir = manifest_path.parent
    served: list[ServeResult] = []
    if serve:
        console.rule("serve: one request on each backend")
        first_quant = quants.split(",")[0].strip()
        served.append(serve_once("llamacpp", str(export_dir), quant=first_quant, log_path=logs_dir / "serve-llamacpp.log"))
        served.append(serve_once("transformers", str(run_dir), log_path=logs_dir / "serve-transformers.log"))
    for table in summary_table(manifest, served):
        Console().print(table)
    (root / "pipeline_summary.json").write_text(json.dumps({
        "run": str(run_dir), "manifest": str(manifest_path),
        "served": [dataclasses.asdict(r) | {"tokens_per_second": r.tokens_per_second} for r in served],
    }, indent=2) + "\n")
    return str(manifest_path)

