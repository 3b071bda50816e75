"""`gptoss pipeline --demo`: the README's first command, end to end on CPU, showing what training did."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from gptoss import harmony
from gptoss.pipeline import run as pipeline  # the stage's functions (its package exports three names)
from gptoss.records import Manifest, RecordError

REPO = Path(__file__).resolve().parent.parent
DIFFERENCE = re.compile(r"^(reasoning|content) differs at token \d+$")


def _demo_rows() -> list[dict]:
    """The demo set read as plain JSON (not through the pipeline's reader)."""
    return [json.loads(line) for line in pipeline.demo_dataset().read_text().splitlines() if line.strip()]


def _run_demo(work: Path, *extra: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gptoss", "pipeline", "--demo", "--work", str(work), *extra],
                          capture_output=True, text=True, timeout=3600, cwd=REPO, env=env)


def _check_summary(work: Path, proc: subprocess.CompletedProcess) -> pipeline.PipelineSummary:
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-5000:])
    out = proc.stdout
    summary = pipeline.PipelineSummary.load(work / pipeline.SUMMARY_FILE)
    first = _demo_rows()[0]["messages"]
    trained = first[-1]
    assert summary.question.messages == [{"role": m["role"], "content": m["content"]} for m in first[:-1]]
    assert (summary.question.reasoning, summary.question.content) == (trained["thinking"], trained["content"])

    manifest = Manifest.load(summary.manifest)
    assert {"f16", "q4_k_m", "q5_k_m"} <= {a.quant for a in manifest.artifacts}
    assert all(a.modelfile for a in manifest.artifacts)

    answers = {a.label: a for a in summary.answers}
    assert list(answers) == ["base model", "adapter", "merged model", "F16 GGUF", "Q4_K_M GGUF"]
    assert [a.backend for a in summary.answers] == ["transformers"] * 3 + ["llamacpp"] * 2
    # The base model (random weights) does not know the answer; the fine-tune does, on both
    # transformers forms, token for token.
    assert answers["base model"].vs_trained is not None and DIFFERENCE.match(answers["base model"].vs_trained)
    for label in ("adapter", "merged model"):
        a = answers[label]
        assert (a.reasoning, a.content) == (trained["thinking"], trained["content"]), a
        assert a.vs_trained is None and a.finish_reason == "stop"
    # The GGUFs: the same answer, or the difference named (against the trained answer, and the quant against F16).
    for label in ("F16 GGUF", "Q4_K_M GGUF"):
        a = answers[label]
        same = (a.reasoning, a.content) == (trained["thinking"], trained["content"])
        assert (a.vs_trained is None) == same and (same or DIFFERENCE.match(a.vs_trained)), a
    q4, f16 = answers["Q4_K_M GGUF"], answers["F16 GGUF"]
    assert (q4.vs_f16 is None) == ((q4.reasoning, q4.content) == (f16.reasoning, f16.content)), q4
    for a in summary.answers:
        assert a.ready_seconds > 0 and a.completion_tokens >= 1
        assert "<|channel|>" not in a.content + a.reasoning

    # What the terminal shows: the answers with their comparisons, and fidelity under headers that
    # say what each figure is measured against (F16 against the merged model, quants against F16).
    assert "Answers to 'What is the capital of France?'" in out
    assert "vs trained answer" in out and "measured against" in out and "NMSE vs F16" not in out
    assert re.search(r"│ F16 +│[^│\n]+│[^│\n]+│ merged model \(transformers\) +│", out), out
    assert re.search(r"│ Q4_K_M +│[^│\n]+│[^│\n]+│ F16 GGUF +│", out), out
    fidelity = {a.quant: a.fidelity for a in manifest.artifacts}
    assert fidelity["f16"]["reference"].startswith("merged HF model")
    assert fidelity["q4_k_m"]["reference"].endswith("-F16.gguf")
    assert "the trained answer comes back from adapter, merged model" in " ".join(out.split())
    assert (work / "models" / "latest").exists()
    return summary


@pytest.mark.slow
def test_pipeline_demo_trains_until_it_answers_and_every_form_is_compared(tmp_path):
    work = tmp_path / "demo"
    _check_summary(work, _run_demo(work))


def _sdist() -> Path | None:
    """The llama-cpp-python sdist this machine already has (so the cold build needs no network)."""
    from gptoss import llamacpp

    if os.environ.get("GPTOSS_LLAMA_CPP_SDIST"):
        return Path(os.environ["GPTOSS_LLAMA_CPP_SDIST"])
    path = llamacpp.cache_root() / llamacpp.SDIST_NAME
    return path if path.is_file() else None


@pytest.mark.slow
def test_pipeline_demo_first_run_with_a_slow_build_keeps_it_outside_every_readiness_clock(tmp_path):
    """No llama.cpp built yet (an empty cache): the build takes minutes (about 15 CPU-minutes; one job
    per core here, GPTOSS_BUILD_JOBS=1 makes it slower still), the servers get 60 s each to load their
    model, and the demo still passes."""
    cache = tmp_path / "cache"
    cache.mkdir()
    env = dict(os.environ, GPTOSS_CACHE=str(cache))
    env.pop("GPTOSS_LLAMA_CPP_BIN", None)
    sdist = _sdist()
    if sdist is not None:
        env["GPTOSS_LLAMA_CPP_SDIST"] = str(sdist)
    work = tmp_path / "demo"
    serve_timeout = 60
    proc = _run_demo(work, "--serve-timeout", str(serve_timeout), env=env)
    _check_summary(work, proc)
    built = re.search(r"llama\.cpp built in (?:(\d+) min (\d+) s|([\d.]+) s)", proc.stderr)
    assert built, proc.stderr[-3000:]
    build_seconds = int(built[1]) * 60 + int(built[2]) if built[1] else float(built[3])
    assert build_seconds > serve_timeout, f"the build took {build_seconds} s: not slower than the readiness clock"


# ---------------------------------------------------------------------------------------------
# The pieces (fast)


def test_question_is_the_first_row_with_its_trained_answer():
    q = pipeline.question_from(str(pipeline.demo_dataset()), reasoning_effort="low")
    first = _demo_rows()[0]["messages"]
    assert q.messages == [{"role": m["role"], "content": m["content"]} for m in first[:-1]]
    assert (q.reasoning, q.content, q.reasoning_effort) == (first[-1]["thinking"], first[-1]["content"], "low")
    assert q.source.endswith("demo_harmony.jsonl row 1")


def test_every_demo_row_renders_as_harmony_with_reasoning_and_a_short_answer():
    rows = _demo_rows()
    assert 2 <= len(rows) <= 8
    for row in rows:
        answer = row["messages"][-1]
        assert answer["role"] == "assistant" and answer["thinking"] and 0 < len(answer["content"]) <= 20
        ids = harmony.render_training(row["messages"])
        assert ids[-1] == harmony.token_id(harmony.RETURN)
    assert len({r["messages"][-1]["content"] for r in rows}) == len(rows)  # distinct answers


def test_question_row_with_a_tool_call_answer_is_refused_naming_the_row(tmp_path):
    rows = tmp_path / "calls.jsonl"
    call = {"role": "assistant", "tool_calls": [{"id": "c1", "type": "function",
                                                 "function": {"name": "get_weather", "arguments": "{}"}}]}
    rows.write_text(json.dumps({"messages": [{"role": "user", "content": "Weather?"}, call]}) + "\n")
    with pytest.raises(pipeline.PipelineError, match=rf"{rows} row 1: the question row's answer is a tool call"):
        pipeline.question_from(str(rows), reasoning_effort="low")


def test_difference_names_the_part_and_the_first_differing_token():
    tok = harmony.encoding().encode
    ref = "France's capital is Paris."
    got = "France's capital is Lyon."
    first_diff = next(i for i, (a, b) in enumerate(zip(tok(got), tok(ref))) if a != b)
    assert pipeline.difference(ref, "Paris.", reasoning_ref=ref, content_ref="Paris.") is None
    assert pipeline.difference(got, "Paris.", reasoning_ref=ref, content_ref="Paris.") == f"reasoning differs at token {first_diff}"
    assert pipeline.difference(ref, "", reasoning_ref=ref, content_ref="Paris.") == "content differs at token 0"
    # A prefix: the difference is where the shorter one ends.
    assert pipeline.difference(ref, "Paris. Yes.", reasoning_ref=ref, content_ref="Paris.") == \
        f"content differs at token {len(tok('Paris.'))}"


def test_summary_round_trips_and_a_bad_one_is_refused_naming_the_field(tmp_path):
    q = pipeline.question_from(str(pipeline.demo_dataset()), reasoning_effort="low")
    a = pipeline.Answer("adapter", "transformers", "models/x", None, q.reasoning, q.content, "stop", 12, 3.5, 0.4)
    s = pipeline.PipelineSummary(run="models/x", manifest="exports/x/manifest.json", train_command="gptoss train",
                                 question=q, answers=[a], stages={"train": 1.0}, cpu_seconds={"train": 1.5})
    path = tmp_path / pipeline.SUMMARY_FILE
    s.write(path)
    assert pipeline.PipelineSummary.load(path) == s
    raw = json.loads(path.read_text())
    path.write_text(json.dumps({**raw, "schema_version": 3}))
    with pytest.raises(RecordError, match=r"pipeline_summary\.json: schema_version 3 is newer .*`gptoss pipeline`"):
        pipeline.PipelineSummary.load(path)
    del raw["answers"][0]["vs_trained"]
    path.write_text(json.dumps(raw))
    assert pipeline.PipelineSummary.load(path).answers[0].vs_trained is None  # a field with a default may be absent
    del raw["question"]
    path.write_text(json.dumps(raw))
    with pytest.raises(RecordError, match=r"field 'question' is missing; it is written by `gptoss pipeline`"):
        pipeline.PipelineSummary.load(tmp_path)  # the folder: the record's own file name in it


def test_verdict_names_what_differs():
    def ans(label, quant, vs_trained, vs_f16=None):
        return pipeline.Answer(label, "x", "m", quant, "", "", "stop", 1, 1.0, 1.0, vs_trained, vs_f16)

    text = pipeline.verdict([ans("base model", None, "reasoning differs at token 0"), ans("adapter", None, None),
                             ans("merged model", None, None), ans("F16 GGUF", "f16", None),
                             ans("Q4_K_M GGUF", "q4_k_m", "content differs at token 1", "content differs at token 1")])
    assert text == ("the base model does not give the trained answer (reasoning differs at token 0); the trained answer "
                    "comes back from adapter, merged model, F16 GGUF; it differs on Q4_K_M GGUF: content differs at "
                    "token 1, vs F16 GGUF content differs at token 1.")


def test_a_server_that_fails_to_start_is_reported_with_its_log_and_the_command(tmp_path):
    """A real `gptoss serve` child that exits at once (no model there): the error says what was
    happening, shows the end of its log and the command to run."""
    q = pipeline.question_from(str(pipeline.demo_dataset()), reasoning_effort="low")
    missing = tmp_path / "no-such-model"
    log = tmp_path / "serve.log"
    with pytest.raises(pipeline.PipelineError) as e:
        pipeline.serve_once("transformers", str(missing), question=q, log_path=log, label="adapter", ready_timeout=120)
    msg = str(e.value)
    assert msg.startswith("serve (adapter): `gptoss serve` exited with 2 before it was ready")
    assert f"Last lines of {log}:" in msg and str(missing) in log.read_text()
    assert log.read_text().strip().splitlines()[-1].strip() in msg
    assert msg.rstrip().endswith(f"To see it yourself, run: gptoss serve --backend transformers --model {missing} "
                                 "--device cpu --parallel 1 --no-date")


def test_serve_timeout_must_be_positive():
    with pytest.raises(pipeline.PipelineError, match=r"--serve-timeout must be a positive number of seconds, got 0"):
        pipeline.pipeline(demo=True, serve_timeout=0)
