"""The records contract (gptoss/records.py): what the real writers wrote feeds every reader.

The writers are the real commands: `gptoss train` on the tiny fixture and `gptoss export` of that
run (tests/export_support.py builds both once per session), and a `gptoss train` on the fixture laid
out in a Hugging Face cache as a Hub id, so the run records a base revision. The readers: serve's
resolver (both backends), export's input check and, through the CLI, a live `gptoss serve`.
publish's planner gets the same real records in tests/test_integration_publish.py.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import openai
import pytest

import export_support as sup
from conftest import REPO, hub_cache_holding
from gptoss import records
from gptoss.records import DataInfo, Manifest, MergeInfo, RecordError, TrainingInfo

HUB_ID = "test-org/gpt-oss-tiny"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
DATA = Path(__file__).resolve().parent / "data" / "train_tiny.jsonl"


@pytest.fixture(scope="module")
def trained(request, tmp_path_factory) -> Path:
    return sup.tiny_trained_run(request, tmp_path_factory)


@pytest.fixture(scope="module")
def exported(request, tmp_path_factory) -> dict:
    return sup.tiny_export(request, tmp_path_factory)


@pytest.fixture(scope="module")
def hub_env(tiny_model, tmp_path_factory) -> dict:
    """The tiny fixture as ``HUB_ID`` at ``COMMIT`` in an offline Hugging Face cache."""
    home = tmp_path_factory.mktemp("hf-home")
    hub_cache_holding(Path(tiny_model), HUB_ID, home / "hub", COMMIT)
    return {"HF_HOME": str(home), "HF_HUB_CACHE": str(home / "hub"), "HF_HUB_OFFLINE": "1"}


@pytest.fixture(scope="module")
def hub_run(hub_env, tmp_path_factory) -> Path:
    """A real `gptoss train` (CLI) on the Hub id: the run records the commit it trained on."""
    out = tmp_path_factory.mktemp("hub-models")
    proc = subprocess.run([sys.executable, "-m", "gptoss", "train", "--profile", "quick_test", "--model", HUB_ID,
                           "--dataset", str(DATA), "--output-dir", str(out), "--run-name", "hub-run", "--max-steps", "2",
                           "--batch-size", "2", "--grad-accum", "1", "--device", "cpu", "--tensorboard", "false"],
                          capture_output=True, text=True, cwd=REPO, env={**os.environ, **hub_env}, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return Path(proc.stdout.strip().splitlines()[-1])


def _keys_match(data: dict, cls: type, where: str) -> None:
    """A written record has exactly the dataclass's fields (nothing written that no reader knows)."""
    names = {f.name for f in dataclasses.fields(cls)}
    assert set(data) == names, f"{where}: extra {sorted(set(data) - names)}, missing {sorted(names - set(data))}"


# ------------------------------------------------------------------------------------- the module


def test_field_reference_is_generated_from_the_dataclasses():
    for cls in records.RECORDS:
        for f in dataclasses.fields(cls):
            assert f.metadata.get("doc"), f"{cls.__name__}.{f.name} has no documentation"
    doc = (REPO / "docs" / "RECORDS.md").read_text()
    assert doc == records.markdown(), "docs/RECORDS.md is stale: python -m gptoss.records > docs/RECORDS.md"


def test_load_errors_name_the_file_the_field_and_the_command(tmp_path):
    with pytest.raises(RecordError, match=r"training_info\.json is missing; `gptoss train` writes it"):
        TrainingInfo.load(tmp_path)
    (tmp_path / "manifest.json").write_text("{oops")
    with pytest.raises(RecordError, match=r"manifest\.json is not readable JSON .*re-run `gptoss export`"):
        Manifest.load(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"run": 3, "merged": {"path": "merged"},
                                                        "artifacts": [{"path": "a.gguf"}]}))
    with pytest.raises(RecordError) as e:
        Manifest.load(tmp_path)
    message = str(e.value)
    for part in (str(tmp_path / "manifest.json"), "field 'run' should be string, found 3",
                 "field 'artifacts[0].sha256' is missing", "written by `gptoss export`"):
        assert part in message
    (tmp_path / "merge_info.json").write_text(json.dumps({"schema_version": 99, "inputs": {}, "identity": "x"}))
    with pytest.raises(RecordError, match=r"schema_version 99 is newer .*`gptoss merge`"):
        MergeInfo.load(tmp_path)


def test_write_is_atomic_and_round_trips(tmp_path):
    info = TrainingInfo(base_model="org/base", base_model_revision="abc", dataset=DataInfo(content_sha256="f" * 64))
    path = info.write(tmp_path)
    assert path == tmp_path / "training_info.json" and [p.name for p in tmp_path.iterdir()] == [path.name]
    assert TrainingInfo.load(tmp_path) == info
    assert json.loads(path.read_text())["schema_version"] == TrainingInfo.SCHEMA_VERSION


# ------------------------------------------------------------------------------------- real writers


def test_real_training_records_load_with_every_field(trained):
    raw = json.loads((trained / TrainingInfo.FILE).read_text())
    _keys_match(raw, TrainingInfo, "training_info.json")
    _keys_match(raw["dataset"], DataInfo, "training_info.json dataset")
    _keys_match(json.loads((trained / DataInfo.FILE).read_text()), DataInfo, "data.json")
    info = TrainingInfo.load(trained)
    assert info.to_dict() == raw
    assert info.dataset == DataInfo.load(trained) and info.steps == 5 and Path(info.base_model).is_dir()
    for field in ("base_layout", "base_quantization", "merge_base"):  # the base fields training records
        assert field in raw


def test_real_export_records_load_with_every_field(exported):
    root = exported["root"]
    raw = json.loads((root / Manifest.FILE).read_text())
    _keys_match(raw, Manifest, "manifest.json")
    _keys_match(raw["merged"], records.MergedFolder, "manifest.json merged")
    for a in raw["artifacts"]:
        _keys_match(a, records.GGUFArtifact, f"manifest.json artifact {a['path']}")
    manifest = Manifest.load(root)
    assert manifest.to_dict() == raw
    assert {"merge_into", "trained_on"} <= set(manifest.inputs)
    merge = MergeInfo.load(root / manifest.merged.path)
    _keys_match(json.loads((root / manifest.merged.path / MergeInfo.FILE).read_text()), MergeInfo, "merge_info.json")
    assert manifest.merged.identity == {"merge_identity": merge.identity}
    assert merge.inputs["merge_into"] == manifest.inputs["merge_into"] and "trained_on" in merge.inputs


def test_serve_resolves_real_records_for_both_backends(trained, exported):
    from gptoss.serving.server import resolve_config

    args = dict(adapter=None, device="cpu", ctx=1024, parallel=1, threads=None, dtype="auto")
    root = exported["root"]
    manifest = Manifest.load(root)
    for a in manifest.artifacts:  # every GGUF by its quant name and by llama.cpp's label
        for quant in (a.quant, a.label):
            config = resolve_config(backend="llamacpp", model=str(root), quant=quant, **args)
            assert config.model == str((root / a.path).resolve())
    config = resolve_config(backend="transformers", model=str(root), quant=None, **args)
    assert config.model == str((root / manifest.merged.path).resolve()) and config.adapter is None
    config = resolve_config(backend="transformers", model=str(trained), quant=None, **args)
    info = TrainingInfo.load(trained)
    assert (config.model, config.adapter, config.revision) == (
        info.base_model, str((trained / info.adapter).absolute()), info.base_model_revision)


def test_export_input_check_reads_the_real_run(hub_run):
    from gptoss.exporters.runs import resolve_run

    inputs = resolve_run(str(hub_run))
    info = TrainingInfo.load(hub_run)
    assert (inputs.base, inputs.base_revision, inputs.name) == (HUB_ID, COMMIT, "hub-run")
    assert info.base_model_revision == COMMIT


# ------------------------------------------------------------------------------------- through the CLI


def _client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def test_serve_transformers_answers_for_an_export_folder(exported, tmp_path):
    """`gptoss serve --backend transformers --model exports/<run>` (it failed: no 'merged' artifact)."""
    import httpx
    import serve_support

    root = exported["root"]
    server = serve_support.LiveServer("--backend", "transformers", "--model", str(root), "--ctx", "256",
                                      "--parallel", "1", "--model-name", "tiny", log_path=tmp_path / "serve.log")
    try:
        info = httpx.get(server.url + "/info", timeout=30).json()
        merged = str((root / Manifest.load(root).merged.path).resolve())
        assert (info["model"], info["model_path"], info["source"]) == ("tiny", merged, "manifest.json merged")
        reply = _client(server).chat.completions.create(model="tiny", max_tokens=4, temperature=0,
                                                        messages=[{"role": "user", "content": "Hi"}])
        assert reply.choices[0].finish_reason in ("stop", "length") and reply.usage.completion_tokens >= 1
    finally:
        server.close()


def test_a_served_run_reports_the_revision_it_was_trained_on(hub_run, hub_env, tmp_path, monkeypatch):
    """`gptoss serve --model models/<run>` loads the base at the trained commit (it read `base_revision`)."""
    import httpx
    import serve_support

    for k, v in hub_env.items():
        monkeypatch.setenv(k, v)
    server = serve_support.LiveServer("--backend", "transformers", "--model", str(hub_run), "--ctx", "256",
                                      "--parallel", "1", log_path=tmp_path / "serve.log")
    try:
        info = httpx.get(server.url + "/info", timeout=30).json()
        assert (info["model_path"], info["revision"], info["adapter"]) == (
            HUB_ID, COMMIT, str((hub_run / "adapter").absolute()))
        client = _client(server)
        reply = client.chat.completions.create(model=client.models.list().data[0].id, max_tokens=2, temperature=0,
                                                        messages=[{"role": "user", "content": "Hi"}])
        assert reply.usage.completion_tokens >= 1
    finally:
        server.close()
