"""`gptoss bench` against a `gptoss serve` it starts (the tiny fixture taught Harmony, as a GGUF on llama.cpp).

Speed figures here are not asserted (2 shared CPU cores); what is: every concurrency level is
reported with its streams, the load time stands apart from every rate, the prompt sweep and
llama-bench's figures are there, and an unreachable URL fails clearly.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import serve_support as sup
from conftest import REPO
from gptoss.evaluation.bench import free_port


def _gptoss(*args, cwd: Path = REPO) -> subprocess.CompletedProcess:
    # The fixture was taught without a `Current date:` line (tests/serve_support.py): the server started adds none.
    return subprocess.run([sys.executable, "-m", "gptoss", *map(str, args)], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, "GPTOSS_CURRENT_DATE": "none"})


def test_bench_reports_every_concurrency_level_with_load_time_apart(harmony_models, tmp_path):
    out = tmp_path / "bench.json"
    # The fixture streams text (a reasoning and an answer) only for what it was taught, greedily: its greeting.
    proc = _gptoss("bench", "--model", harmony_models["gguf"], "--prompt", sup.GREETING[0]["content"], "--temperature", "0",
                   "--concurrency", "1,2,4,8,16", "--prompt-lengths",
                   "16,128", "--max-tokens", "12", "--sweep-max-tokens", "4", "--ctx", "1024", "--threads", "2",
                   "--out", out, "--no-progress")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == str(out)
    result = json.loads(out.read_text())
    levels = result["concurrency"]
    assert [x["concurrency"] for x in levels] == [1, 2, 4, 8, 16]
    for x in levels:
        assert x["streams_ok"] == x["concurrency"], x
        assert x["completion_tokens"] > 0 and x["aggregate_tok_s"] > 0 and x["ttft_s_mean"] > 0
        # aggregate = tokens over the level's own wall time: the load is in none of them
        assert x["aggregate_tok_s"] == pytest.approx(x["completion_tokens"] / x["wall_s"], rel=1e-2)
    assert result["load_s"] > 0 and result["warmup"]["seconds"] > 0  # on their own, in no level's rate
    sweep = result["prompt_sweep"]
    assert [x["prompt_words"] for x in sweep] == [16, 128]
    assert sweep[1]["prompt_tokens"] > sweep[0]["prompt_tokens"]
    # untaught prompts stream no text: the prefill figure comes from the 1-token request
    assert all(x["one_token_s"] > 0 and x["prefill_tok_s"] > 0 for x in sweep), sweep
    lb = result["llama_bench"]
    assert lb["pp"]["tokens"] == 128 and lb["tg"]["tokens"] == 12 and lb["tg"]["tok_s"] > 0, lb
    assert result["vs_llama_bench"]["tg"] > 0 and result["gguf"] == str(Path(harmony_models["gguf"]).resolve())
    assert (tmp_path / result["chart"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "load time" in proc.stdout and "not in any rate" in proc.stdout  # the table says so


def test_bench_of_an_unreachable_url_fails_naming_it(tmp_path):
    url = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there
    proc = _gptoss("bench", "--url", url, "--out", tmp_path / "b.json", "--no-progress")
    assert proc.returncode == 2
    assert f"--url {url}: cannot reach it" in proc.stderr and "gptoss serve" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "b.json").exists()


def test_bench_flags_are_checked_before_anything_runs(tmp_path):
    proc = _gptoss("bench", "--url", "http://127.0.0.1:9/v1", "--concurrency", "1,x", "--max-tokens", "0")
    assert proc.returncode == 2
    assert "--concurrency 1,x: comma-separated whole numbers" in proc.stderr and "--max-tokens 0" in proc.stderr
