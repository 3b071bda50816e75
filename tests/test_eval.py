"""`gptoss eval` on the tiny fixture: held-out loss per artifact (base, adapter, merged, every GGUF).

The runs are real `gptoss train` runs and the export a real `gptoss export` (tests/export_support.py
builds it once per session, shared with tests/test_export.py and tests/test_records.py).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import export_support as sup
from conftest import REPO
from gptoss.records import EvalRecord, TrainingInfo

DATA = Path(__file__).resolve().parent / "data"
# F16 keeps the merged bf16 weights exactly; what differs is llama.cpp's arithmetic (and F16 rounding of
# activations): measured 1.4e-5 nats on a 10-step run's held-out rows (Q4_K_M: 4e-3). Ten times that.
F16_TOLERANCE = 2e-4


def _gptoss(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gptoss", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd or REPO)


@pytest.fixture(scope="module")
def heldout_run(request, tmp_path_factory) -> Path:
    """A 6-step run with a quarter of train_tiny.jsonl held out (2 of 8 rows)."""
    base = sup.tiny_base(request, tmp_path_factory)

    def build(p: Path) -> None:
        from gptoss import training

        training.train(profile="quick_test", model=str(base), dataset=str(DATA / "train_tiny.jsonl"),
                       output_dir=str(p / "models"), run_name="heldout", max_steps=6, batch_size=2, grad_accum=1,
                       learning_rate=1e-2, eval_fraction=0.25, device="cpu", tensorboard=False)

    return sup.cached(tmp_path_factory, "heldout-run", build) / "models" / "heldout"


def test_eval_ranks_the_trained_run_above_its_base_on_the_rows_training_held_out(heldout_run):
    proc = _gptoss("eval", "--run", heldout_run, "--no-progress")
    assert proc.returncode == 0, proc.stderr[-3000:]
    path = Path(proc.stdout.strip().splitlines()[-1])
    assert path == heldout_run / EvalRecord.FILE
    record = EvalRecord.load(path)
    info = TrainingInfo.load(heldout_run)
    assert record.data["source"] == "held-out" and record.data["examples"] == info.dataset.eval_examples == 2
    assert [a.name for a in record.artifacts] == ["base", "adapter"]  # no export yet
    base, adapter = record.artifacts
    assert adapter.tokens == base.tokens == record.data["tokens"] > 0
    assert adapter.mean_loss < base.mean_loss - 0.2, record.artifacts  # the fine-tune helped on unseen rows
    assert adapter.delta_vs_base == pytest.approx(adapter.mean_loss - base.mean_loss, abs=1e-5)
    # The same rows, rendered and masked as training did: training's own eval loss at its last step agrees.
    assert adapter.mean_loss == pytest.approx(info.loss["eval"]["final"], abs=1e-3)
    assert "held-out loss" in proc.stdout and "adapter" in proc.stdout  # the table
    assert (heldout_run / record.chart).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_eval_scores_every_gguf_and_f16_matches_the_merged_model(request, tmp_path_factory, tmp_path):
    exported = sup.tiny_export(request, tmp_path_factory)
    run = tmp_path / "models" / "tiny-run"  # a copy: eval.json must not change the shared run others test
    shutil.copytree(exported["run"], run)
    proc = _gptoss("eval", "--run", run, "--exports-dir", exported["root"].parent, "--dataset",
                   DATA / "eval_tiny.jsonl", "--no-progress")
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = EvalRecord.load(run)
    labels = [a["label"] for a in exported["manifest"]["artifacts"]]
    assert [a.name for a in record.artifacts] == ["base", "adapter", "merged", *labels]
    assert {"F16", "Q4_K_M", "Q5_K_M", "MXFP4_MOE"} <= set(labels)
    assert record.data["source"] == "dataset" and record.data["examples"] == 4
    by = {a.name: a for a in record.artifacts}
    assert all(a.tokens == record.data["tokens"] for a in record.artifacts)
    assert by["merged"].mean_loss == pytest.approx(by["adapter"].mean_loss, abs=F16_TOLERANCE)
    assert abs(by["F16"].delta_vs_merged) <= F16_TOLERANCE, by["F16"]
    assert by["F16"].kind == "gguf" and by["merged"].delta_vs_merged is None
    # every quant's row says what it cost against the merged model
    assert all(by[q].delta_vs_merged == pytest.approx(by[q].mean_loss - by["merged"].mean_loss, abs=1e-5)
               for q in labels)

    # publish puts the table in the model card (dry run: nothing leaves the machine)
    from gptoss.publishing.plan import plan_publish

    plan = plan_publish(run=run, repo_id="org/tiny-adapter", what="adapter")
    card = str(plan.card)
    assert "## Evaluation" in card
    assert f"| Q4_K_M | {by['Q4_K_M'].mean_loss:.4f} |" in card and f"| base | {by['base'].mean_loss:.4f} |" in card


def test_eval_of_a_run_without_held_out_rows_says_what_to_pass(request, tmp_path_factory):
    run = sup.tiny_trained_run(request, tmp_path_factory)  # trained with --eval-fraction 0
    proc = _gptoss("eval", "--run", run, "--no-progress")
    assert proc.returncode == 2
    assert "training held out no rows (--eval-fraction 0)" in proc.stderr and "--dataset FILE" in proc.stderr
    assert not EvalRecord.exists(run)


def test_eval_of_a_missing_run_names_it(tmp_path):
    proc = _gptoss("eval", "--run", tmp_path / "nope", cwd=tmp_path)
    assert proc.returncode == 2 and f"--run {tmp_path / 'nope'}: no such folder" in proc.stderr


# ---------------------------------------------------------------------------------------------
# Through the serving API: the tiny fixture taught Harmony (tests/serve_support.py) is the
# fine-tuned model, the untaught tiny fixture the base; both served by `gptoss serve` on llama.cpp.


@pytest.fixture(scope="module")
def servers(tiny_model, request, tmp_path_factory):
    import hashlib

    import serve_support as ssup

    key = ssup.source_key() + "-" + hashlib.sha256((Path(tiny_model) / "fixture.json").read_bytes()).hexdigest()[:8]
    cache = getattr(request.config, "cache", None)
    root = Path(cache.mkdir("gptoss-serve-models")) if cache is not None else tmp_path_factory.mktemp("serve-models")
    models = ssup.build_harmony_models(tiny_model, root / key)  # the same cache entry as tests/test_serve.py
    base_gguf = tmp_path_factory.mktemp("base-gguf") / "tiny-base-f16.gguf"
    ssup.convert_to_gguf(tiny_model, base_gguf)
    logs = tmp_path_factory.mktemp("eval-logs")
    tuned = ssup.LiveServer("--backend", "llamacpp", "--model", str(models["gguf"]), "--ctx", "1024", "--parallel", "1",
                            "--api-key", "eval-key", log_path=logs / "tuned.log")
    try:
        base = ssup.LiveServer("--backend", "llamacpp", "--model", str(base_gguf), "--ctx", "1024", "--parallel", "1",
                               "--api-key", "eval-key", log_path=logs / "base.log")
    except BaseException:
        tuned.close()
        raise
    yield {"tuned": tuned.url + "/v1", "base": base.url + "/v1"}
    tuned.close()
    base.close()


def _greeting_rows(path: Path) -> Path:
    import json

    import serve_support as ssup

    row = {"messages": [*ssup.GREETING, {"role": "assistant", "thinking": ssup.GREETING_REASONING,
                                         "content": ssup.GREETING_ANSWER}]}
    path.write_text("".join(json.dumps({**row, "reasoning_effort": e}) + "\n" for e in ("low", "high")))
    return path


def test_generation_checks_compare_base_and_fine_tuned_answers(heldout_run, servers, tmp_path):
    import os

    run = tmp_path / "heldout"
    shutil.copytree(heldout_run, run)
    env = {**os.environ, "GPTOSS_API_KEY": "eval-key"}  # the servers want it; eval passes it on
    proc = subprocess.run([sys.executable, "-m", "gptoss", "eval", "--run", str(run), "--dataset",
                           str(_greeting_rows(tmp_path / "greeting.jsonl")), "--no-loss", "--generate", "--url",
                           servers["tuned"], "--base-url", servers["base"], "--max-tokens", "48", "--no-progress"],
                          capture_output=True, text=True, cwd=REPO, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    gen = EvalRecord.load(run).generation
    tuned, base = gen["models"]["fine-tuned"], gen["models"]["base"]
    assert gen["prompts"] == 2 and tuned["errors"] == base["errors"] == 0
    assert tuned["well_formed"] == 1.0 and tuned["exact"] == 1.0 and tuned["token_f1"] == 1.0, gen["samples"]
    assert base["exact"] == 0.0 and base["token_f1"] < 0.5  # random weights do not greet
    assert set(gen["reasoning_by_effort"]["fine-tuned"]) == {"low", "medium", "high"}
    assert gen["reasoning_by_effort"]["fine-tuned"]["low"]["reasoning_chars"] > 0
    assert "generation checks" in proc.stdout


def test_generation_without_the_api_key_says_how_to_pass_it(heldout_run, servers, tmp_path):
    run = tmp_path / "heldout"
    shutil.copytree(heldout_run, run)
    proc = _gptoss("eval", "--run", run, "--dataset", _greeting_rows(tmp_path / "g.jsonl"), "--no-loss", "--generate",
                   "--url", servers["tuned"], "--no-progress")
    assert proc.returncode == 2
    assert f"--url {servers['tuned']}: the server wants an API key (401); pass --api-key KEY" in proc.stderr


def test_harness_runs_a_local_generate_until_task_end_to_end(heldout_run, servers, tmp_path):
    import json

    import serve_support as ssup

    pytest.importorskip("lm_eval", reason="lm-eval is in the eval extra: pip install -e '.[dev]'")
    docs = tmp_path / "greet.jsonl"
    docs.write_text(json.dumps({"question": ssup.GREETING[0]["content"], "answer": ssup.GREETING_ANSWER}) + "\n")
    task = tmp_path / "greet.yaml"
    task.write_text(f"""task: gptoss_greet
dataset_path: json
dataset_kwargs:
  data_files:
    test: {docs}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["<|return|>"]
  max_gen_toks: 48
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
    ignore_case: true
    ignore_punctuation: true
""")
    run = tmp_path / "heldout"
    shutil.copytree(heldout_run, run)
    proc = _gptoss("eval", "--run", run, "--dataset", _greeting_rows(tmp_path / "g.jsonl"), "--no-loss", "--harness",
                   task, "--url", servers["tuned"], "--api-key", "eval-key", "--no-progress")
    assert proc.returncode == 0, proc.stderr[-3000:]
    h = EvalRecord.load(run).harness
    assert h["task"] == "gptoss_greet" and h["samples"] == 1
    assert h["metrics"]["exact_match,none"] == 1.0, h
    assert Path(h["results_file"]).is_file()
