"""train -> export -> publish on the tiny fixture: publish reads what the earlier stages really write.

Everything is real except the Hub (tests/fakehub.py; the real one cannot be reached from CI): the
transformers+PEFT trainer on CPU (3 steps), the streaming merge, llama.cpp's converter and
llama-quantize, the Modelfile writer, and fidelity of Q4_K_M against F16 (F16 against the HF model
is left out to save time: `compare_hf="off"`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import socket
from pathlib import Path

import pytest
import yaml
from huggingface_hub import constants

from gptoss import publishing as pub
from fakehub import FakeHub
from publish_runs import build_runs

TRAIN_JSONL = Path(__file__).parent / "data" / "train_tiny.jsonl"
TOKEN = "hf_fake_write_token_0123456789"  # a user fakehub knows
STEPS = 3


@dataclasses.dataclass(frozen=True)
class Chain:
    run_dir: Path  # models/tiny-run
    export_dir: Path  # exports/tiny-run
    info: dict  # training_info.json
    manifest: dict  # manifest.json

    def ggufs(self) -> list[dict]:
        return [a for a in self.manifest["artifacts"] if a["kind"] == "gguf"]


@pytest.fixture(scope="module")
def chain(tiny_model, tmp_path_factory) -> Chain:
    from gptoss import training
    from gptoss.exporters.export import export_run

    work = tmp_path_factory.mktemp("chain")
    run_dir = Path(training.train(
        profile="quick_test", model=str(tiny_model), dataset=str(TRAIN_JSONL), backend="transformers", device="cpu",
        max_steps=STEPS, batch_size=2, grad_accum=1, gradient_checkpointing="off", save_steps=100, tensorboard=False,
        output_dir=str(work / "models"), run_name="tiny-run",
    ))
    result = export_run(str(run_dir), quants="q4_k_m", exports_dir=str(work / "exports"), compare_hf="off",
                        progress=False, threads=min(2, os.cpu_count() or 1))
    return Chain(run_dir=run_dir, export_dir=result.manifest_path.parent,
                 info=json.loads((run_dir / "training_info.json").read_text()), manifest=result.manifest)


@pytest.fixture
def no_login(monkeypatch, tmp_path):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "hf_home" / "token"))


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha_file(path: Path) -> str:
    return sha(path.read_bytes())


# ------------------------------------------------------------------------------------- records


def test_publish_reads_the_real_records(chain, tiny_model):
    from gptoss import llamacpp

    problems: list[str] = []
    training = pub.TrainingRecord.load(chain.run_dir, problems)
    manifest = pub.ExportManifest.load(chain.export_dir, problems)
    assert problems == []
    assert training.base_model == str(tiny_model) and training.dataset_id == str(TRAIN_JSONL)
    assert training.dataset_hash == chain.info["dataset"]["content_sha256"] and training.steps == STEPS
    assert training.loss["final"] == chain.info["loss"]["final"] and training.backend == "transformers"

    assert manifest.llama_cpp_commit == llamacpp.commit() and Path(manifest.training_run) == chain.run_dir
    assert manifest.base_model == str(tiny_model)
    assert manifest.adapter_sha256 == sha_file(chain.run_dir / "adapter" / "adapter_model.safetensors")
    assert [a.quant for a in manifest.of_kind("gguf")] == ["F16", "Q4_K_M"]
    modelfiles = {m.gguf: m for m in manifest.of_kind("modelfile")}
    for a in manifest.of_kind("gguf"):  # every file, Modelfiles included, has its hash and size in the record
        assert (a.sha256, a.size) == (sha_file(a.path), a.path.stat().st_size)
        m = modelfiles[a.rel]
        assert m.path == a.path.with_suffix(".Modelfile") and (m.sha256, m.size) == (sha_file(m.path), m.path.stat().st_size)
    q4 = manifest.of_kind("gguf")[1].fidelity
    assert q4["reference"] == "tiny-run-F16.gguf" and q4["passed"] is True
    assert (q4["nmse"], q4["kl"], q4["top1"]) == tuple(chain.ggufs()[1]["fidelity"][k] for k in ("nmse", "mean_kl", "top1_agreement"))
    (merged,) = manifest.of_kind("merged")
    assert merged.path == chain.export_dir / "merged" and merged.files
    for rel, digest, size in merged.files:
        path = chain.export_dir / rel
        assert (digest, size) == (sha_file(path), path.stat().st_size)


def _same_keys(real: dict, fake: dict, where: str, *, optional: set = frozenset()) -> None:
    missing, extra = set(real) - set(fake), set(fake) - set(real) - optional
    assert not missing and not extra, f"{where}: tests/publish_runs.py lacks {sorted(missing)}, has extra {sorted(extra)}"


def test_publish_fixtures_match_the_real_writers(chain, tmp_path):
    """tests/publish_runs.py (the hand-made runs of test_publish.py) writes the records with the real keys."""
    fake = build_runs(tmp_path)
    info = json.loads((fake.training_dir / "training_info.json").read_text())
    real = chain.info
    _same_keys(real, info, "training_info.json")
    for key in ("dataset", "lora", "steady_state", "config"):
        _same_keys(real[key], info[key], f"training_info.json {key}")
    # eval only with --eval-fraction; CUDA figures only on CUDA
    _same_keys(real["loss"], info["loss"], "training_info.json loss", optional={"eval"})
    _same_keys(real["peak_memory"], info["peak_memory"], "training_info.json peak_memory",
               optional={"cuda_reserved_bytes", "cuda_device"})
    _same_keys(json.loads((chain.run_dir / "train_config.json").read_text()),
               json.loads((fake.training_dir / "train_config.json").read_text()), "train_config.json")

    manifest = json.loads((fake.export_dir / "manifest.json").read_text())
    m = chain.manifest
    _same_keys(m, manifest, "manifest.json")
    for key in ("inputs", "merged", "commands", "fidelity_prompts"):
        _same_keys(m[key], manifest[key], f"manifest.json {key}")
    _same_keys(m["inputs"]["base"], manifest["inputs"]["base"], "manifest.json inputs.base")
    _same_keys(m["merged"]["files"][0], manifest["merged"]["files"][0], "manifest.json merged.files[]")
    assert {"llama_cpp_commit", "llama_cpp_python", "converter"} <= set(manifest["tools"]) & set(m["tools"])
    for real_a in m["artifacts"]:
        for fake_a in manifest["artifacts"]:
            _same_keys(real_a, fake_a, "manifest.json artifacts[]")
    _same_keys(m["artifacts"][1]["fidelity"], manifest["artifacts"][1]["fidelity"], "manifest.json artifacts[].fidelity")
    assert m["artifacts"][1]["label"] == "Q4_K_M" and m["artifacts"][1]["quant"] == "q4_k_m"  # as the fixture spells them
    assert {a["label"] for a in manifest["artifacts"]} >= {"F16", "Q4_K_M"}


def test_export_merges_on_the_base_revision_training_recorded(chain, tmp_path):
    from gptoss.exporters.runs import resolve_run
    from gptoss.records import TrainingInfo

    run = tmp_path / "models" / "hub-run"
    run.mkdir(parents=True)
    (run / "adapter").symlink_to(chain.run_dir / "adapter")
    revision = "6cee5e81ee83917806bbde320786a8fb61efebee"
    trained = TrainingInfo.load(chain.run_dir)  # what the real `gptoss train` wrote, as if from the Hub
    dataclasses.replace(trained, base_model="openai/gpt-oss-20b", base_model_revision=revision).write(run)
    inputs = resolve_run(str(run))
    assert (inputs.base, inputs.base_revision) == ("openai/gpt-oss-20b", revision)


# ------------------------------------------------------------------------------------- dry runs


def _listed_files(text: str) -> dict[str, str]:
    """path in repo -> sha256 from the dry run's file list."""
    return dict(re.findall(r"^  (\S+)\s+[\d.]+ [kMG]?B\s+([0-9a-f]{64})\s", text, re.M))


def test_dry_run_cli_for_adapter_merged_and_gguf(chain, no_login, capsys, monkeypatch):
    from gptoss.cli import main

    def no_network(*args, **kwargs):
        raise AssertionError(f"dry run opened a connection: {args}")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    m = chain.manifest
    adapter_record = m["inputs"]["adapter"]["files"]  # what export merged is what publish sends
    want = {
        "adapter": {name: f["sha256"] for name, f in adapter_record.items()},
        "merged": {Path(f["path"]).name: f["sha256"] for f in m["merged"]["files"] if not f["path"].endswith("merge_info.json")},
        "gguf": {Path(a[key]).name: a[digest] for a in chain.ggufs()
                 for key, digest in (("path", "sha256"), ("modelfile", "modelfile_sha256"))},
    }
    # --run takes either folder of the run: the other one is found beside it
    runs = {"adapter": chain.run_dir, "merged": chain.export_dir, "gguf": chain.run_dir}
    for what, relation in (("adapter", "adapter"), ("merged", "finetune"), ("gguf", "quantized")):
        assert main(["publish", "--run", str(runs[what]), "--repo-id", f"acme/tiny-{what}", "--what", what,
                     "--dry-run"]) == 0
        out = capsys.readouterr().out
        assert out.startswith("gptoss publish --dry-run: nothing was sent")
        listed = _listed_files(out)
        generated = {"README.md"} | ({"template", "params"} if what == "gguf" else set())
        assert set(listed) == set(want[what]) | generated, what
        assert {k: v for k, v in listed.items() if k not in generated} == want[what]
        assert f"commit message: gptoss publish {what} from run tiny-run" in out
        assert "library_name:" in out and "base_model_relation" not in out  # a local base is not a Hub lineage
        assert str(chain.run_dir.parent) not in out.split("README.md (model card):")[1]  # no local paths in the card
    assert "hf.co/acme/tiny-gguf:Q4_K_M" in out and "Q4_K_M" in out


# ------------------------------------------------------------------------------------- upload


@pytest.fixture
def hub(monkeypatch, tmp_path):
    fake = FakeHub()
    fake.start()
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setattr(constants, "ENDPOINT", fake.url)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)  # fakehub speaks LFS, not Xet
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "hf_home" / "token"))
    yield fake
    fake.stop()


def test_publish_gguf_repo_matches_the_manifest(chain, hub):
    from gptoss.modelfiles import harmony_template

    url = pub.publish(run=str(chain.export_dir), repo_id="acme/tiny-GGUF", what="gguf")
    files = hub.files("acme/tiny-GGUF")
    ggufs = chain.ggufs()
    expected = {Path(a["path"]).name for a in ggufs} | {Path(a["modelfile"]).name for a in ggufs}
    assert set(files) == expected | {"template", "params", "README.md", ".gitattributes"}
    for a in ggufs:
        data = files[Path(a["path"]).name]
        assert (sha(data), len(data)) == (a["sha256"], a["size"])
        modelfile = files[Path(a["modelfile"]).name]
        assert (sha(modelfile), len(modelfile)) == (a["modelfile_sha256"], a["modelfile_size"])
        assert re.search(rb"^FROM \./(.+)$", modelfile, re.M).group(1).decode() == Path(a["path"]).name
        assert pub.gguf_quant_tag(Path(a["path"]).name) == a["label"]  # the Hub serves it as hf.co/...:<label>
    assert files["template"].decode() == harmony_template()
    assert json.loads(files["params"]) == {"temperature": 1.0, "top_p": 1.0, "num_ctx": 8192}

    readme = files["README.md"].decode()
    meta = yaml.safe_load(re.match(r"^---\n(.*?)\n---\n", readme, re.S).group(1))
    assert meta["library_name"] == "gguf" and "base_model" not in meta  # the base is a local folder
    rows = {line.split("|")[1].strip(" `"): [c.strip() for c in line.strip("|").split("|")]
            for line in readme.splitlines() if line.startswith("| `")}
    for a in ggufs:
        cells = rows[a["label"]]
        assert cells[1] == f"`{Path(a['path']).name}`" and cells[2] == f"{a['size'] / 1e6:.2f} MB"
        assert cells[4] == str(a["fallbacks"]) and cells[8] == f"`{a['sha256'][:12]}`"
    f = ggufs[1]["fidelity"]
    assert rows["Q4_K_M"][5:8] == [f"{f['nmse']:.4g}", f"{f['mean_kl']:.4g}", f"{f['top1_agreement'] * 100:.1f}%"]
    assert rows["F16"][5:8] == ["ref."] * 3  # not measured itself (compare_hf off): the others' reference
    assert "`Q4_K_M` against `tiny-run-F16.gguf`" in readme
    assert chain.manifest["tools"]["llama_cpp_commit"] in readme and chain.info["dataset"]["content_sha256"] in readme
    # provenance: the package versions each stage recorded, as tables under their stage
    for stage, recorded in (("training", chain.info["versions"]), ("export", chain.manifest["tools"])):
        table = readme.split(f"Package versions ({stage}):", 1)[1].split("\n\n", 2)[1]
        shown = dict(line.strip("|").replace(" ", "").split("|") for line in table.splitlines()[2:])
        assert shown["torch"] == recorded["torch"] and shown["transformers"] == recorded["transformers"], stage
        assert {k: v for k, v in recorded.items() if k in shown} == shown

    commit = hub.commits("acme/tiny-GGUF")[0]
    assert commit.summary == "gptoss publish gguf from run tiny-run" and url.endswith(commit.sha)
    record = json.loads((chain.export_dir / pub.PUBLISHED).read_text())["gguf"]
    assert record["commit"] == commit.sha
    assert {k: v for k, v in record["files"].items() if k in expected} == {
        Path(a[key]).name: a[digest] for a in ggufs for key, digest in (("path", "sha256"), ("modelfile", "modelfile_sha256"))}
    (chain.export_dir / pub.PUBLISHED).unlink()  # leave the export as the other tests expect it


def test_changed_modelfile_is_refused_before_upload(chain, hub, tmp_path):
    export = tmp_path / "exports" / "tiny-run"
    shutil.copytree(chain.export_dir, export, ignore=shutil.ignore_patterns("merged", "*F16.gguf"),
                    copy_function=os.link)
    manifest = json.loads((export / "manifest.json").read_text())
    manifest["artifacts"] = [a for a in manifest["artifacts"] if a["label"] != "F16"]
    (export / "manifest.json").write_text(json.dumps(manifest))
    modelfile = export / manifest["artifacts"][0]["modelfile"]
    modelfile.unlink()  # a hard link: write a new file, not through to the chain's
    modelfile.write_text((chain.export_dir / manifest["artifacts"][0]["modelfile"]).read_text().replace("num_ctx 8192", "num_ctx 4096"))
    with pytest.raises(pub.PublishError, match=r"Q4_K_M\.Modelfile: sha256 .* differs from the record"):
        pub.publish(run=str(export), repo_id="acme/tiny-GGUF", what="gguf")
    assert hub.requests == []
