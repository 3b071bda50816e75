"""`gptoss pipeline --demo`: the README's first command, end to end on CPU."""

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def test_pipeline_demo_runs_every_stage_and_prints_the_summary(tmp_path):
    work = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "-m", "gptoss", "pipeline", "--demo", "--work", str(work)],
                          capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-5000:])
    out = proc.stdout
    assert "Artifacts" in out and "Serving" in out
    for label in ("F16", "Q4_K_M", "Q5_K_M"):
        assert label in out
    summary = json.loads((work / "pipeline_summary.json").read_text())
    manifest = json.loads(open(summary["manifest"]).read())
    quants = {a["quant"] for a in manifest["artifacts"]}
    assert {"f16", "q4_k_m", "q5_k_m"} <= quants
    assert all(a.get("modelfile") for a in manifest["artifacts"])
    assert [s["backend"] for s in summary["served"]] == ["llamacpp", "transformers"]
    for s in summary["served"]:
        assert s["completion_tokens"] >= 1 and s["finish_reason"] in ("stop", "length", "tool_calls")
        assert "<|channel|>" not in s["content"]
    assert (work / "models" / "latest").exists()
