"""`gptoss publish` against a local Hub endpoint (tests/fakehub.py) and realistic run folders.

The real Hub cannot be reached from CI; fakehub implements the API calls huggingface_hub makes
(LFS path: HF_HUB_DISABLE_XET=1, since the Xet storage protocol is not faked).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from huggingface_hub import constants

from gptoss import publishing as pub
from gptoss.modelfiles.reader import read_modelfile
from fakehub import FakeHub
from publish_runs import BASE, DATASET, DATASET_HASH, LLAMA_CPP_COMMIT, QUANTS, RUN, TEMPLATE, build_runs

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "hf_fake_write_token_0123456789"


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def card_meta(readme: bytes) -> dict:
    m = re.match(r"^---\n(.*?)\n---\n", readme.decode(), re.S)
    assert m, "README.md has no YAML header"
    return yaml.safe_load(m.group(1))


@pytest.fixture
def hub():
    fake = FakeHub(multipart_threshold=512 * 1024, part_size=256 * 1024)
    fake.start()
    yield fake
    fake.stop()


@pytest.fixture
def hub_env(hub, monkeypatch, tmp_path):
    """In-process huggingface_hub pointed at the fake Hub, with HF_TOKEN set and no stored login."""
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setattr(constants, "ENDPOINT", hub.url)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "hf_home" / "token"))
    return hub


@pytest.fixture
def runs(tmp_path):
    return build_runs(tmp_path / "work")


def do_publish(runs, what, repo_id="acme/gpt-oss-ft", **kw):
    run = runs.training_dir if what == "adapter" else runs.export_dir
    return pub.publish(run=str(run), repo_id=repo_id, what=what, **kw)


def lfs_events(hub, oid):
    return [event for o, event in hub.lfs_events if o == oid]


# ------------------------------------------------------------------------------------- naming


def test_quant_tag_follows_the_hub_parser():
    # Examples from hub-docs (docs/hub/ollama.md, bartowski / MaziyarPanahi repos) and ours.
    assert pub.gguf_quant_tag("Llama-3.2-3B-Instruct-IQ3_M.gguf") == "IQ3_M"
    assert pub.gguf_quant_tag("Qwen2-7B-Instruct-v0.4.Q4_K_M.gguf") == "Q4_K_M"
    assert pub.gguf_quant_tag("model-q5_k_m.gguf") == "Q5_K_M"  # case-insensitive
    assert pub.gguf_quant_tag("gpt-oss-20b-F16.gguf") == "F16"
    assert pub.gguf_quant_tag(f"{RUN}-MXFP4_MOE.gguf") == "MXFP4_MOE"
    assert pub.gguf_quant_tag("gpt-oss-20b-UD-Q4_K_XL.gguf") == "UD-Q4_K_XL"
    assert pub.gguf_quant_tag("Q8_0-model-F16.gguf") == "F16"  # the last match wins
    assert pub.gguf_quant_tag("model.gguf") is None
    for quant in QUANTS:
        assert pub.gguf_quant_tag(f"{RUN}-{quant}.gguf") == quant


def test_read_modelfile(tmp_path):
    path = tmp_path / "Modelfile"
    path.write_text(
        '# comment\nFROM ./m-Q4_K_M.gguf\nTEMPLATE """line one\n{{ .Prompt }}\n"""\n'
        'SYSTEM "be brief"\nPARAMETER temperature 1.0\nPARAMETER num_ctx 8192\n'
        'PARAMETER stop "<|return|>"\nPARAMETER stop "<|call|>"\n'
    )
    mf = read_modelfile(path)
    assert mf.from_ == "./m-Q4_K_M.gguf"
    assert mf.template == "line one\n{{ .Prompt }}\n"
    assert mf.system == "be brief"
    assert mf.params_json() == {"temperature": 1.0, "num_ctx": 8192, "stop": ["<|return|>", "<|call|>"]}
    path.write_text('FROM x.gguf\nTEMPLATE """never closed\n')
    with pytest.raises(ValueError, match="unterminated"):
        read_modelfile(path)


# ------------------------------------------------------------------------------------- dry run


def test_dry_run_prints_files_and_card_and_opens_no_socket(runs, hub_env, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError(f"dry run opened a connection: {args}")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    for what, relation in (("adapter", "adapter"), ("merged", "finetune"), ("gguf", "quantized")):
        text = do_publish(runs, what, dry_run=True)
        assert text.startswith("gptoss publish --dry-run: nothing was sent")
        assert f"base_model_relation: {relation}" in text
        assert f"commit message: gptoss publish {what} from run {RUN}" in text
        plan = pub.plan_publish(run=runs.training_dir if what == "adapter" else runs.export_dir,
                                repo_id="acme/gpt-oss-ft", what=what)
        for f in plan.files:
            assert f"  {f.path_in_repo} " in text
    assert hub_env.requests == []


def test_dry_run_cli_needs_no_token_and_no_endpoint(runs, tmp_path):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": f"{ROOT}", "HF_ENDPOINT": f"http://127.0.0.1:{closed}",
           "HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_DISABLE_XET": "1"}
    env.pop("HF_TOKEN", None)
    proc = subprocess.run(
        [sys.executable, "-m", "gptoss", "publish", "--run", str(runs.export_dir), "--repo-id", "acme/x-GGUF",
         "--what", "gguf", "--dry-run"],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert f"{RUN}-Q4_K_M.gguf" in proc.stdout and "hf.co/acme/x-GGUF:Q4_K_M" in proc.stdout
    assert "base_model_relation: quantized" in proc.stdout


def test_card_for_a_local_base_and_dataset_names_no_hub_ids(runs, tmp_path):
    info_path = runs.training_dir / "training_info.json"
    info = json.loads(info_path.read_text())
    info.update(backend="transformers", base_model=str(tmp_path / "models" / "tiny"), base_model_revision=None,
                dataset={**info["dataset"], "id": None, "path": str(tmp_path / "data" / "train.jsonl"), "format": "jsonl"})
    info_path.write_text(json.dumps(info))
    plan = pub.plan_publish(run=runs.training_dir, repo_id="acme/tiny-lora", what="adapter")
    meta = plan.card.data.to_dict()
    assert "base_model" not in meta and "base_model_relation" not in meta and "datasets" not in meta
    assert "unsloth" not in meta["tags"]
    text = str(plan.card)
    assert str(tmp_path) not in text and "`<local>/tiny`" in text and "`<local>/train.jsonl`" in text


def test_exports_dir_is_honoured_not_guessed(runs, tmp_path):
    """The export of models/<run> is found through the folder layout: beside models/ by default,
    wherever --exports-dir says otherwise."""
    import shutil

    moved = tmp_path / "elsewhere" / "exports"
    moved.parent.mkdir()
    shutil.move(runs.export_dir.parent, moved)
    with pytest.raises(pub.PublishError, match="--what gguf needs the export folder"):
        pub.plan_publish(run=runs.training_dir, repo_id="acme/x-GGUF", what="gguf")
    plan = pub.plan_publish(run=runs.training_dir, repo_id="acme/x-GGUF", what="gguf", exports_dir=moved)
    assert plan.manifest.export_dir == moved / RUN and plan.training.run_dir == runs.training_dir
    assert {f.path_in_repo for f in plan.files} >= {f"{RUN}-Q4_K_M.gguf", "README.md"}


def test_gguf_card_without_a_training_record(runs):
    import shutil

    shutil.rmtree(runs.training_dir)
    plan = pub.plan_publish(run=runs.export_dir, repo_id="acme/x-GGUF", what="gguf")
    meta = plan.card.data.to_dict()
    assert meta["base_model"] == BASE and meta["base_model_relation"] == "quantized"  # from the manifest inputs
    assert "No gptoss training record was found" in str(plan.card)


def test_unlisted_modelfile_next_to_its_gguf_is_used(runs):
    manifest_path = runs.export_dir / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    for a in manifest["artifacts"]:  # as export writes it when it made no Modelfile
        a.update(modelfile=None, modelfile_sha256=None, modelfile_size=None)
    manifest_path.write_text(json.dumps(manifest))
    plan = pub.plan_publish(run=runs.export_dir, repo_id="acme/x-GGUF", what="gguf")
    assert sorted(e.modelfile.path_in_repo for e in plan.ggufs) == sorted(f"{RUN}-{q}.Modelfile" for q in QUANTS)
    (runs.export_dir / "gguf" / f"{RUN}-Q5_K_M.Modelfile").unlink()
    with pytest.raises(pub.PublishError, match=r"Q5_K_M\.gguf: no Modelfile .* points at it"):
        pub.plan_publish(run=runs.export_dir, repo_id="acme/x-GGUF", what="gguf")


def test_quant_table_says_what_was_measured_and_what_failed(runs):
    manifest_path = runs.export_dir / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    by_label = {a["label"]: a for a in manifest["artifacts"]}
    by_label["F16"]["fidelity"] = {"reference": None, "skipped": "--compare-hf off", "prompts_sha256": "x"}
    by_label["MXFP4_MOE"]["fidelity"] = None  # export --fidelity false
    by_label["Q5_K_M"]["fidelity"]["passed"] = False
    manifest_path.write_text(json.dumps(manifest))
    body = str(pub.plan_publish(run=runs.export_dir, repo_id="acme/x-GGUF", what="gguf").card)
    rows = {line.split("|")[1].strip(" `"): [c.strip() for c in line.strip("|").split("|")]
            for line in body.splitlines() if line.startswith("| `")}
    assert rows["F16"][5:8] == ["ref."] * 3 and rows["MXFP4_MOE"][5:8] == ["n/a"] * 3
    assert rows["Q5_K_M"][5:8] == ["0.00094", "0.0041", "98.4%"]
    assert f"`Q4_K_M`, `Q5_K_M` against `{RUN}-F16.gguf`." in body
    assert "`Q5_K_M` did not meet the export's fidelity thresholds" in body


# ------------------------------------------------------------------------------------- uploads


def test_publish_adapter(runs, hub_env):
    url = do_publish(runs, "adapter", repo_id="acme/gpt-oss-ft-lora", private=True)
    hub = hub_env
    repo = hub.repo("acme/gpt-oss-ft-lora")
    assert repo is not None and repo.private
    files = hub.files("acme/gpt-oss-ft-lora")
    local = {p.name: p.read_bytes() for p in runs.adapter_dir.iterdir() if p.is_file() and p.name != "README.md"}
    assert set(files) == set(local) | {"README.md", ".gitattributes"}
    for name, data in local.items():
        assert sha(files[name]) == sha(data), name
    entries = hub.entries("acme/gpt-oss-ft-lora")
    assert entries["adapter_model.safetensors"].lfs and not entries["adapter_config.json"].lfs
    readme = files["README.md"]
    assert b"PEFT's template" not in readme  # our card, not the one PEFT left in adapter/
    meta = card_meta(readme)
    assert meta["base_model"] == BASE and meta["base_model_relation"] == "adapter"
    assert meta["library_name"] == "peft" and meta["license"] == "apache-2.0"
    assert meta["pipeline_tag"] == "text-generation" and meta["datasets"] == [DATASET]
    assert {"gpt-oss", "harmony", "unsloth", "lora"} <= set(meta["tags"]) and "gguf" not in meta["tags"]
    body = readme.decode()
    assert DATASET_HASH in body and "0.612" in body  # dataset hash, final loss
    assert "mlp.experts.gate_up_proj" in body  # expert LoRA visible in the card
    assert "/home/alice" not in body and "<local>/" in body  # local paths are not published
    assert sha(local["adapter_model.safetensors"]) in body
    commit = hub.commits("acme/gpt-oss-ft-lora")[0]
    assert commit.summary == f"gptoss publish adapter from run {RUN}"
    assert url.endswith(commit.sha)
    record = json.loads((runs.training_dir / pub.PUBLISHED).read_text())["adapter"]
    assert record["repo_id"] == "acme/gpt-oss-ft-lora" and record["commit"] == commit.sha
    assert record["files"]["adapter_model.safetensors"] == sha(local["adapter_model.safetensors"])


def test_publish_merged_uses_multipart_for_large_files(runs, hub_env):
    do_publish(runs, "merged", repo_id="acme/gpt-oss-ft")
    hub = hub_env
    files = hub.files("acme/gpt-oss-ft")
    merged = runs.export_dir / "merged"
    for p in merged.iterdir():
        if p.name == "merge_info.json":  # merge's record (local paths) stays local
            assert p.name not in files
            continue
        assert sha(files[p.name]) == sha(p.read_bytes()), p.name
    big = sha((merged / "model-00001-of-00002.safetensors").read_bytes())  # 524 kB > 512 kB threshold
    assert lfs_events(hub, big) == ["part", "part", "part", "stored"]
    meta = card_meta(files["README.md"])
    assert meta["base_model_relation"] == "finetune" and meta["library_name"] == "transformers"
    body = files["README.md"].decode()
    assert "AutoModelForCausalLM.from_pretrained(\"acme/gpt-oss-ft\"" in body
    assert LLAMA_CPP_COMMIT in body and '"learning_rate": 0.0002' in body


def test_publish_gguf_layout_serves_each_quant_by_tag(runs, hub_env):
    hub = hub_env
    do_publish(runs, "merged", repo_id="acme/gpt-oss-ft")
    do_publish(runs, "gguf", repo_id="acme/gpt-oss-ft-GGUF")
    files = hub.files("acme/gpt-oss-ft-GGUF")
    manifest = json.loads((runs.export_dir / "manifest.json").read_text())
    ggufs = [a for a in manifest["artifacts"] if a["kind"] == "gguf"]
    served = {pub.gguf_quant_tag(p): p for p in files if p.endswith(".gguf")}
    assert served == {a["label"]: Path(a["path"]).name for a in ggufs}  # one file per tag, at the root
    for a in ggufs:
        assert sha(files[Path(a["path"]).name]) == a["sha256"]
        assert sha(files[Path(a["modelfile"]).name]) == a["modelfile_sha256"]
    for quant in QUANTS:  # every Modelfile ships next to its GGUF and its FROM resolves in the repo
        modelfile = files[f"{RUN}-{quant}.Modelfile"]
        target = re.search(rb"^FROM (.+)$", modelfile, re.M).group(1).decode()
        assert Path(target).name in files and pub.gguf_quant_tag(target) == quant
    assert files["template"].decode() == TEMPLATE  # what `ollama run hf.co/...` uses
    assert json.loads(files["params"]) == {"temperature": 1.0, "top_p": 1.0, "num_ctx": 8192}
    meta = card_meta(files["README.md"])
    assert meta["base_model_relation"] == "quantized" and meta["library_name"] == "gguf"
    assert meta["base_model"] == "acme/gpt-oss-ft"  # our merged repo, recorded by the merged publish
    assert {"gguf", "gpt-oss", "harmony"} <= set(meta["tags"])
    body = files["README.md"].decode()
    row = next(line for line in body.splitlines() if line.startswith("| `Q4_K_M`"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1] == f"`{RUN}-Q4_K_M.gguf`" and cells[2] == "700.02 kB"
    assert cells[4:8] == ["4", "0.0031", "0.0112", "96.9%"]  # fallbacks, NMSE, KL, top-1
    assert "Q5_0×4" in cells[3]
    assert "ollama run hf.co/acme/gpt-oss-ft-GGUF:Q4_K_M" in body
    assert "llama-server -hf acme/gpt-oss-ft-GGUF:Q4_K_M" in body
    assert "gptoss serve --backend llamacpp" in body and LLAMA_CPP_COMMIT in body
    attrs = files[".gitattributes"].decode()
    assert f"{RUN}-Q4_K_M.gguf filter=lfs" in attrs  # the Hub tracks each GGUF with LFS


def test_interrupted_upload_resumes_without_resending_finished_files(runs, hub_env):
    hub = hub_env
    failing = runs.gguf("Q5_K_M")
    oid = sha(failing.read_bytes())
    hub.fail_lfs_upload(oid, status=400)  # the storage refuses it, as S3 does for an expired URL
    with pytest.raises(pub.PublishError, match=r"did not complete; nothing was committed\. Re-run"):
        do_publish(runs, "gguf", repo_id="acme/gpt-oss-ft-GGUF")
    assert [c.summary for c in hub.commits("acme/gpt-oss-ft-GGUF")] == ["initial commit"]
    first = dict(hub.lfs_events)
    others = {sha(runs.gguf(q).read_bytes()) for q in QUANTS if q != "Q5_K_M"}
    assert all(first.get(o) == "stored" for o in others)  # finished before the failure stopped the run

    do_publish(runs, "gguf", repo_id="acme/gpt-oss-ft-GGUF")
    assert lfs_events(hub, oid) == ["rejected", "stored"]
    for o in others:  # not sent a second time
        assert lfs_events(hub, o).count("stored") == 1 and "rejected" not in lfs_events(hub, o)
    assert len(hub.commits("acme/gpt-oss-ft-GGUF")) == 2
    assert sha(hub.files("acme/gpt-oss-ft-GGUF")[failing.name]) == oid


def test_dropped_connection_is_retried_within_the_run(runs, hub_env):
    hub = hub_env
    oid = sha((runs.adapter_dir / "adapter_model.safetensors").read_bytes())
    hub.fail_lfs_upload(oid, drop=True)
    do_publish(runs, "adapter")
    assert lfs_events(hub, oid) == ["dropped", "stored"]
    assert len(hub.commits("acme/gpt-oss-ft")) == 2


def test_rerun_after_success_changes_nothing(runs, hub_env):
    hub = hub_env
    first = do_publish(runs, "gguf", repo_id="acme/gpt-oss-ft-GGUF")
    events = len(hub.lfs_events)
    second = do_publish(runs, "gguf", repo_id="acme/gpt-oss-ft-GGUF")
    assert second == first and len(hub.lfs_events) == events
    assert len(hub.commits("acme/gpt-oss-ft-GGUF")) == 2


def test_publishing_a_newer_run_replaces_the_previous_files(runs, hub_env):
    hub = hub_env
    do_publish(runs, "gguf", repo_id="acme/gpt-oss-ft-GGUF")
    newer = build_runs(runs.root, name="gpt-oss-20b_standard_r8_20250202-080000")
    (newer.export_dir / "gguf" / f"{newer.export_dir.name}-MXFP4_MOE.gguf").unlink()
    manifest = json.loads((newer.export_dir / "manifest.json").read_text())
    manifest["artifacts"] = [a for a in manifest["artifacts"] if "MXFP4_MOE" not in a["path"]]
    (newer.export_dir / "manifest.json").write_text(json.dumps(manifest))
    do_publish(newer, "gguf", repo_id="acme/gpt-oss-ft-GGUF")
    files = hub.files("acme/gpt-oss-ft-GGUF")
    ggufs = sorted(p for p in files if p.endswith(".gguf"))
    assert ggufs == sorted(f"{newer.export_dir.name}-{q}.gguf" for q in QUANTS if q != "MXFP4_MOE")
    assert not any(RUN in p for p in files)  # no second file per tag, no stale Modelfile
    commit = hub.commits("acme/gpt-oss-ft-GGUF")[0]
    assert commit.summary == f"gptoss publish gguf from run {newer.export_dir.name}"
    assert f"{RUN}-MXFP4_MOE.gguf" in commit.description


def test_revision_creates_the_branch_and_leaves_main_alone(runs, hub_env):
    hub = hub_env
    do_publish(runs, "adapter", revision="experiment-1")
    assert set(hub.files("acme/gpt-oss-ft")) == {".gitattributes"}
    assert "adapter_model.safetensors" in hub.files("acme/gpt-oss-ft", "experiment-1")


def test_token_from_stored_login(runs, hub_env, monkeypatch):
    monkeypatch.delenv("HF_TOKEN")
    token_file = Path(constants.HF_TOKEN_PATH)
    token_file.parent.mkdir(parents=True)
    token_file.write_text(TOKEN + "\n")
    do_publish(runs, "adapter")
    assert "README.md" in hub_env.files("acme/gpt-oss-ft")


# ------------------------------------------------------------------------------------- the token never leaks


def test_token_never_appears_in_output_files_or_repo(runs, hub, tmp_path):
    env = {**os.environ, "PYTHONPATH": f"{ROOT}", "HF_ENDPOINT": hub.url, "HF_TOKEN": TOKEN,
           "HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_DISABLE_XET": "1"}

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "gptoss", "publish", *args], capture_output=True, text=True,
                              env=env, cwd=ROOT, timeout=300)

    runs_ = [
        cli("--run", str(runs.export_dir), "--repo-id", "acme/x-GGUF", "--what", "gguf", "--dry-run"),
        cli("--run", str(runs.training_dir), "--repo-id", "acme/x-lora", "--what", "adapter"),
        cli("--run", str(runs.export_dir), "--repo-id", "not a repo", "--what", "merged"),
    ]
    hub.fail_lfs_upload(sha(runs.gguf("F16").read_bytes()), status=403)
    runs_.append(cli("--run", str(runs.export_dir), "--repo-id", "acme/x-GGUF", "--what", "gguf"))
    env["HF_TOKEN"] = TOKEN + "-revoked"  # rejected by the Hub: the error must not echo it either
    runs_.append(cli("--run", str(runs.export_dir), "--repo-id", "acme/x", "--what", "merged"))
    assert [p.returncode for p in runs_] == [0, 0, 2, 2, 2], [p.stderr[-500:] for p in runs_]
    assert "gptoss: error:" in runs_[2].stderr and "rejected your token" in runs_[4].stderr
    assert "Re-run the same command" in runs_[3].stderr
    outputs = "".join(p.stdout + p.stderr for p in runs_)
    assert TOKEN not in outputs
    written = [p for p in runs.root.rglob("*") if p.is_file()]
    assert any(p.name == pub.PUBLISHED for p in written)
    for p in written:
        assert TOKEN.encode() not in p.read_bytes(), p
    assert hub.files("acme/x-lora")  # the token did reach the Hub, as a header, and nowhere else
    for (_, repo_id), repo in hub.repos.items():
        for commit in repo.commits.values():
            assert TOKEN not in commit.summary + commit.description
            for entry in commit.tree.values():
                assert TOKEN.encode() not in (entry.content or b"")
    for blob in hub.lfs.values():
        assert TOKEN.encode() not in blob


def test_file_containing_the_token_is_not_uploaded(runs, hub_env):
    cfg = runs.adapter_dir / "tokenizer_config.json"
    cfg.write_text(json.dumps({"eos_token": "<|return|>", "hub_token": TOKEN}))
    with pytest.raises(pub.PublishError, match="tokenizer_config.json contains your Hugging Face token") as e:
        do_publish(runs, "adapter")
    assert TOKEN not in str(e.value)
    assert hub_env.requests == []


# ------------------------------------------------------------------------------------- bad input


def test_repo_that_exists_as_a_dataset(runs, hub_env):
    hub_env.add_repo("acme/gpt-oss-ft", repo_type="dataset")
    with pytest.raises(pub.PublishError, match="already exists as a dataset repo, not a model repo"):
        do_publish(runs, "adapter")
    assert hub_env.writes() == [] and hub_env.repo("acme/gpt-oss-ft") is None


def test_repo_that_holds_another_kind(runs, hub_env):
    do_publish(runs, "adapter")
    before = len(hub_env.writes())
    with pytest.raises(pub.PublishError, match="already holds an adapter; publish the gguf to its own repo"):
        do_publish(runs, "gguf")
    assert len(hub_env.writes()) == before


def test_private_into_an_existing_public_repo(runs, hub_env):
    hub_env.add_repo("acme/gpt-oss-ft", private=False)
    with pytest.raises(pub.PublishError, match="already exists and is public"):
        do_publish(runs, "adapter", private=True)
    assert hub_env.writes() == []


@pytest.mark.parametrize("what,breakage,message", [
    ("gguf", lambda r: r.gguf("Q5_K_M").unlink(), r"Q5_K_M\.gguf: GGUF listed in manifest\.json is missing"),
    ("gguf", lambda r: (r.export_dir / "gguf" / f"{RUN}-F16.Modelfile").unlink(), r"F16\.Modelfile: Modelfile listed"),
    ("gguf", lambda r: r.gguf("Q4_K_M").write_bytes(r.gguf("Q4_K_M").read_bytes()[:-1] + b"x"), r"sha256 .* differs from the record"),
    ("merged", lambda r: (r.export_dir / "merged" / "model-00002-of-00002.safetensors").unlink(), r"model-00002-of-00002\.safetensors"),
    ("merged", lambda r: (r.export_dir / "manifest.json").unlink(), r"neither training_info\.json .* nor manifest\.json"),
    ("merged", lambda r: (r.export_dir / "merged" / "extra.safetensors").write_bytes(b"x"),
     r"extra\.safetensors: not among the merged files of manifest\.json"),
    ("adapter", lambda r: (r.adapter_dir / "adapter_model.safetensors").unlink(), r"missing adapter_model\.safetensors"),
    ("adapter", lambda r: (r.training_dir / "training_info.json").write_text("{}"), r"training_info\.json: field 'base_model' is missing; it is written by `gptoss train`"),
])
def test_run_folder_with_missing_or_changed_artifacts(runs, hub_env, what, breakage, message):
    breakage(runs)
    with pytest.raises(pub.PublishError, match=message):
        do_publish(runs, what)
    assert hub_env.requests == []


def test_no_token(runs, hub_env, monkeypatch):
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(pub.PublishError, match=r"no Hugging Face token: set HF_TOKEN or run `hf auth login`"):
        do_publish(runs, "merged")
    assert hub_env.requests == []


def test_rejected_token(runs, hub_env, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_not_a_valid_token_42")
    with pytest.raises(pub.PublishError, match="rejected your token") as e:
        do_publish(runs, "merged")
    assert "hf_not_a_valid_token_42" not in str(e.value)
    assert hub_env.writes() == []


def test_unreachable_hub(runs, hub_env, monkeypatch):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{closed}")
    with pytest.raises(pub.PublishError, match=f"cannot reach the Hub at http://127.0.0.1:{closed}"):
        do_publish(runs, "adapter")


@pytest.mark.parametrize("repo_id", ["gpt-oss-ft", "acme/team/gpt-oss-ft", "acme/gpt oss", "acme/gpt--oss", "acme/.."])
def test_invalid_repo_id(runs, hub_env, repo_id):
    with pytest.raises(pub.PublishError, match="--repo-id"):
        do_publish(runs, "adapter", repo_id=repo_id)
    assert hub_env.requests == []


def test_all_problems_reported_at_once(runs, hub_env, monkeypatch):
    monkeypatch.delenv("HF_TOKEN")
    runs.gguf("F16").unlink()
    with pytest.raises(pub.PublishError) as e:
        pub.publish(run=str(runs.export_dir), repo_id="no-slash", what="gguf", revision="refs/x")
    text = str(e.value)
    assert text.startswith("4 problems:") and "no Hugging Face token" in text and "--repo-id" in text
    assert "--revision" in text and "F16.gguf" in text
    with pytest.raises(pub.PublishError, match=r"--what 'lora': not one of adapter, merged, gguf"):
        pub.publish(run=str(runs.export_dir), repo_id="acme/x", what="lora", dry_run=True)
    assert hub_env.requests == []


def test_cli_wires_publish():
    from gptoss.cli import resolve

    assert resolve("publish") is pub.publish
