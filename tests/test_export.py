"""`gptoss export` on the tiny fixture: train 5 steps -> merge -> F16, Q4_K_M, Q5_K_M, MXFP4_MOE GGUFs."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

import export_support as sup
from conftest import REPO
from gptoss.exporters import gguf as gg
from gptoss.exporters import records
from gptoss.exporters.errors import DiskSpaceError, ExportStageError, UnknownQuantError
from gptoss.exporters.export import MANIFEST, RECORDS_DIR, export_run
from gptoss.exporters.quants import QUANTS, get_quant

KINDS = {"f16": "F16", "q4_k_m": "Q4_K", "q5_k_m": "Q5_K", "mxfp4_moe": "MXFP4"}


@pytest.fixture(scope="session")
def exported(request, tmp_path_factory) -> dict:
    return sup.tiny_export(request, tmp_path_factory)


def _artifact(manifest: dict, quant: str) -> dict:
    (a,) = [a for a in manifest["artifacts"] if a["quant"] == quant]
    return a


def test_manifest_lists_every_artifact_honestly(exported):
    from gptoss import llamacpp

    root, m = exported["root"], exported["manifest"]
    assert [a["quant"] for a in m["artifacts"]] == list(KINDS)
    assert m["tools"]["llama_cpp_commit"] == llamacpp.commit() and len(m["tools"]["llama_cpp_commit"]) == 40
    assert m["inputs"]["adapter"]["files"]["adapter_model.safetensors"]["sha256"] == records.sha256_file(
        exported["run"] / "adapter/adapter_model.safetensors")
    for a in m["artifacts"]:
        path = root / a["path"]
        assert path.is_file() and a["path"] == f"gguf/tiny-run-{get_quant(a['quant']).label}.gguf"
        assert a["size"] == path.stat().st_size and a["sha256"] == records.sha256_file(path)
        info = gg.inspect(path)
        assert a["tensor_types"] == info.type_histogram
        assert a["nominal_type"] == KINDS[a["quant"]] and info.type_histogram.get(a["nominal_type"], 0) > 0
        # tiny's widths are multiples of 256: nothing falls back; the mixture rules still use other types
        assert a["fallbacks"] == 0 and a["fallback_tensors"] == []
        assert a["off_nominal_weights"] == sum(1 for t in a["off_nominal_weight_types"].values())
        assert a["chat_template"], "the Harmony chat template must travel in the GGUF"
        assert a["kind"] == "gguf" and a["modelfile"] == a["path"].replace(".gguf", ".Modelfile")
        modelfile = root / a["modelfile"]
        assert (a["modelfile_size"], a["modelfile_sha256"]) == (modelfile.stat().st_size, records.sha256_file(modelfile))
    assert _artifact(m, "f16")["off_nominal_weights"] == 0
    assert _artifact(m, "q4_k_m")["off_nominal_weight_types"].get("output.weight") == "Q6_K"
    mx = _artifact(m, "mxfp4_moe")["off_nominal_weight_types"]
    assert all("exps" not in n for n in mx) and mx.get("blk.0.attn_q.weight") == "Q8_0"
    assert not list(root.rglob("*.partial*"))


def test_f16_reference_computes_rope_as_llama_cpp(exported):
    """gpt-oss's config has YaRN `truncate: false`, which llama.cpp cannot reproduce; the F16 gate
    compares against transformers with truncation on, and the manifest says so."""
    from gptoss.exporters import fidelity as fid

    merged = exported["root"] / "merged"
    config, note = fid.reference_config(merged)
    assert note and config.rope_parameters["truncate"] is True
    assert '"truncate": false' in (merged / "config.json").read_text()  # the exported config is left as trained
    assert note in _artifact(exported["manifest"], "f16")["fidelity"]["reference"]


def test_top1_gate_ignores_near_ties_of_the_reference():
    """A swap of two tokens the reference scores within TIE_MARGIN is not a disagreement the gate
    counts; a swap at a clear lead is. Both still lower the all-positions figure."""
    from gptoss.exporters import fidelity as fid

    ref = [np.array([[2.0, 1.995, 0.0], [3.0, 1.0, 0.0], [1.0, 2.5, 0.0]])]
    tie_swapped = [np.array([[1.995, 2.0, 0.0], [3.0, 1.0, 0.0], [1.0, 2.5, 0.0]])]
    f = fid.compare(ref, tie_swapped)
    assert (f.top1_agreement, f.decisive_positions, f.top1_agreement_decisive) == (2 / 3, 2, 1.0)
    assert f.passes(1.0, 1.0, 1.0)
    clear_swapped = [np.array([[2.0, 1.995, 0.0], [1.0, 3.0, 0.0], [1.0, 2.5, 0.0]])]
    g = fid.compare(ref, clear_swapped)
    assert g.top1_agreement_decisive == 0.5 and not g.passes(1.0, 1.0, 1.0)


def test_header_reader_matches_gguf_reader(exported):
    """exporters.gguf.inspect (fast, header only) agrees with the vendored gguf-py's GGUFReader."""
    gguf = gg.gguf_module()
    path = exported["root"] / _artifact(exported["manifest"], "q4_k_m")["path"]
    ours = gg.inspect(path)
    reader = gguf.GGUFReader(str(path))
    assert {t.name: (t.tensor_type.name, [int(x) for x in t.shape], int(t.data_offset), int(t.n_bytes))
            for t in reader.tensors} == {t.name: (t.type, t.shape, t.offset, t.n_bytes) for t in ours.tensors.values()}
    assert ours.metadata[gg.GGUF_CHAT_TEMPLATE] == reader.get_field(gg.GGUF_CHAT_TEMPLATE).contents()
    assert ours.metadata["general.file_type"] == reader.get_field("general.file_type").contents() == 15


def test_fidelity_printed_and_within_gates(exported):
    m = exported["manifest"]
    print()
    for a in m["artifacts"]:
        f = a["fidelity"]
        print(f"{a['label']:>10}: vs {f['reference']}: NMSE {f['nmse']:.2e}  mean KL {f['mean_kl']:.2e}  "
              f"top-1 {f['top1_agreement']:.1%}  ({f['positions']} positions, {a['size'] / 1e6:.1f} MB)")
        assert f["passed"], a
    f16 = _artifact(m, "f16")["fidelity"]
    assert f16["reference"].startswith("merged HF model")
    assert f16["nmse"] < 1e-5 and f16["top1_agreement"] == 1.0
    for q in ("q4_k_m", "q5_k_m", "mxfp4_moe"):
        f = _artifact(m, q)["fidelity"]
        assert f["reference"] == "tiny-run-F16.gguf" and 0 < f["nmse"] < get_quant(q).max_nmse


def test_ggufs_load_and_generate(exported):
    from gptoss import harmony, llamacpp

    llama_cpp = llamacpp.bindings()

    ids = sup.prompt_ids()
    stops = set(harmony.stop_token_ids())
    for a in exported["manifest"]["artifacts"]:
        llm = llama_cpp.Llama(model_path=str(exported["root"] / a["path"]), n_ctx=256, verbose=False, seed=0,
                              n_threads=min(4, os.cpu_count() or 1))
        try:
            out = []
            for tok in llm.generate(ids, temp=0.0):
                out.append(tok)
                if tok in stops or len(out) == 8:
                    break
        finally:
            llm.close()
        assert len(out) == 8 or out[-1] in stops, a["path"]
        assert all(0 <= t < 201088 for t in out)


def test_expert_lora_survives_into_gguf(request, tmp_path_factory, exported, tmp_path):
    """The merged F16 GGUF differs from the base's in expert tensors, by exactly the merged HF weights."""
    import torch
    from safetensors import safe_open

    base = sup.tiny_base(request, tmp_path_factory)
    base_gguf = gg.convert(base, tmp_path / "base-F16.gguf", progress=False).path
    merged_gguf = exported["root"] / _artifact(exported["manifest"], "f16")["path"]
    with safe_open(str(exported["root"] / "merged/model.safetensors"), framework="pt") as f:
        hf = {k: f.get_tensor(k).to(torch.float32) for k in ("model.layers.0.mlp.experts.gate_up_proj",
                                                              "model.layers.0.mlp.experts.down_proj")}
    # HF (E, in, out) -> GGUF (E, out, in); gate/up are the interleaved halves of gate_up
    want = {
        "blk.0.ffn_gate_exps.weight": hf["model.layers.0.mlp.experts.gate_up_proj"].transpose(1, 2)[:, ::2],
        "blk.0.ffn_up_exps.weight": hf["model.layers.0.mlp.experts.gate_up_proj"].transpose(1, 2)[:, 1::2],
        "blk.0.ffn_down_exps.weight": hf["model.layers.0.mlp.experts.down_proj"].transpose(1, 2),
    }
    for name, w in want.items():
        got = gg.read_tensor(merged_gguf, name)
        before = gg.read_tensor(base_gguf, name)
        assert got.shape == tuple(w.shape)
        np.testing.assert_allclose(got, w.numpy(), rtol=1e-3, atol=1e-6)
        change = np.abs(got - before).max()
        assert change > 1e-3, f"{name}: the expert LoRA did not reach the GGUF (max change {change})"
    from gptoss.exporters import fidelity as fid

    toks = fid.prompt_tokens()[:1]
    f = fid.compare(fid.gguf_logits(base_gguf, toks), fid.gguf_logits(merged_gguf, toks))
    assert f.nmse > 1e-2, "the merged GGUF behaves like the base"


def test_rerun_skips_unchanged_artifacts(exported):
    root = exported["root"]
    before = {p.name: p.stat().st_mtime_ns for p in (root / "gguf").iterdir()}
    res = export_run(str(exported["run"]), quants="q4_k_m,q5_k_m", also="mxfp4_moe",
                     exports_dir=str(root.parent), progress=False)
    assert all(a["skipped"] for a in res.manifest["artifacts"]) and res.manifest["merged"]["merge"]["skipped"]
    assert {p.name: p.stat().st_mtime_ns for p in (root / "gguf").iterdir()} == before
    assert [a["sha256"] for a in res.manifest["artifacts"]] == [a["sha256"] for a in exported["manifest"]["artifacts"]]


def _copy_f16(exported, root: Path) -> None:
    """Start an export folder with the shared F16 file and its record (same inputs: it is reused)."""
    (root / "gguf").mkdir(parents=True)
    (root / RECORDS_DIR).mkdir()
    name = "tiny-run-F16.gguf"
    shutil.copy2(exported["root"] / "gguf" / name, root / "gguf" / name)
    shutil.copy2(exported["root"] / RECORDS_DIR / f"{name}.json", root / RECORDS_DIR / f"{name}.json")


def test_interrupted_export_leaves_nothing_that_looks_complete(exported, tmp_path, monkeypatch):
    exports = tmp_path / "exports"
    root = exports / "tiny-run"
    (exports / "older").mkdir(parents=True)
    os.symlink("older", exports / "latest")  # an earlier finished export
    merged = exported["root"] / "merged"
    _copy_f16(exported, root)
    real = gg.run_measured

    def interrupted(cmd, env, on_line):
        def on_line_then_stop(line):
            on_line(line)
            if "converting to" in line:  # llama-quantize is writing tensors
                raise KeyboardInterrupt

        return real(cmd, env, on_line_then_stop)

    monkeypatch.setattr(gg, "run_measured", interrupted)
    with pytest.raises(KeyboardInterrupt):
        export_run(merged=str(merged), name="tiny-run", exports_dir=str(exports), quants="q8_0", backend="tool",
                   fidelity=False, progress=False)
    assert not (root / MANIFEST).exists()
    assert not (root / "gguf/tiny-run-Q8_0.gguf").exists() and not list(root.rglob("*.partial*"))
    assert os.readlink(exports / "latest") == "older"
    monkeypatch.undo()
    res = export_run(merged=str(merged), name="tiny-run", exports_dir=str(exports), quants="q8_0", fidelity=False,
                     progress=False)
    assert [(a["quant"], a["skipped"]) for a in res.manifest["artifacts"]] == [("f16", True), ("q8_0", False)]
    assert (root / MANIFEST).is_file()
    assert os.readlink(exports / "latest") == "tiny-run"  # switched only now, when the manifest is there
    assert (exports / "latest" / MANIFEST).is_file()


def test_latest_is_not_an_export_name(exported, tmp_path):
    with pytest.raises(ExportStageError, match="reserved"):
        export_run(merged=str(exported["root"] / "merged"), name="latest", exports_dir=str(tmp_path), fidelity=False)
    assert not list(tmp_path.iterdir())


def test_in_process_quantizer_matches_llama_quantize(exported, tmp_path):
    f16 = exported["root"] / "gguf/tiny-run-F16.gguf"
    tool = gg.quantize(f16, tmp_path / "tool.gguf", label="Q8_0", backend="tool", progress=False)
    py = gg.quantize(f16, tmp_path / "py.gguf", label="Q8_0", backend="python", progress=False)
    assert tool.backend == "llama-quantize" and py.backend == "llama_cpp.llama_model_quantize"
    assert gg.inspect(tool.path).types == gg.inspect(py.path).types
    assert records.sha256_file(tool.path) == records.sha256_file(py.path)
    assert any(_ for _ in py.log if "[" in _ and "/" in _), "progress lines come through the log callback"


def test_registered_quants_exist_in_llama_cpp():
    from gptoss import llamacpp

    llama_cpp = llamacpp.bindings()

    for q in QUANTS.values():
        assert q.from_converter or hasattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{q.label}"), q.label


def test_unknown_quant_lists_supported(exported, tmp_path, capsys):
    from gptoss.cli import main

    with pytest.raises(UnknownQuantError, match="supported: f16, q8_0, q5_k_m, q4_k_m, mxfp4_moe"):
        export_run(merged=str(exported["root"] / "merged"), out=str(tmp_path / "x"), quants="q4_k_m,q3_bogus")
    capsys.readouterr()
    rc = main(["export", "--merged", str(exported["root"] / "merged"), "--out", str(tmp_path / "x"),
               "--quants", "q4_k_m,iq1_s"])
    err = capsys.readouterr().err
    assert rc == 2 and "unknown quant 'iq1_s'" in err and err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []


def test_not_enough_disk_is_refused_up_front(exported, tmp_path, monkeypatch):
    """Free space is simulated (monkeypatched records.free_bytes): the check runs before any file is written."""
    monkeypatch.setattr(records, "free_bytes", lambda path: 300 << 20)
    with pytest.raises(DiskSpaceError, match=r"tiny-run-F16.gguf ~.*tiny-run-Q4_K_M.gguf ~"):
        export_run(merged=str(exported["root"] / "merged"), name="tiny-run", out=str(tmp_path / "x"),
                   quants="q4_k_m", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_fallbacks_counted_when_widths_are_not_multiples_of_256(tmp_path):
    """Like gpt-oss-20b (2880), a width of 160 cannot hold 256-blocks: llama.cpp falls back and we count it."""
    import torch
    from transformers import GptOssConfig, GptOssForCausalLM

    from gptoss.fixtures import tiny_config

    model_dir = tmp_path / "w160"
    cfg = tiny_config()
    cfg.update(hidden_size=160, intermediate_size=160)
    torch.manual_seed(0)
    GptOssForCausalLM(GptOssConfig(**cfg, architectures=["GptOssForCausalLM"])).to(torch.bfloat16).save_pretrained(
        str(model_dir))
    from gptoss.tokenizer import build_tokenizer

    build_tokenizer().save_pretrained(str(model_dir))
    f16 = gg.convert(model_dir, tmp_path / "w160-F16.gguf", progress=False).path
    q = gg.quantize(f16, tmp_path / "w160-Q4_K_M.gguf", label="Q4_K_M", progress=False)
    info = gg.inspect(q.path)
    fell = {f["tensor"]: f for f in q.fallbacks}
    assert fell, "no fallback reported"
    for name, f in fell.items():
        assert f["ncols"] == 160 and f["wanted"] in ("Q4_K", "Q5_K", "Q6_K")
        assert info.types[name] == f["got"] and f["got"] in ("Q5_0", "Q5_1", "Q8_0")
    assert "blk.0.attn_q.weight" in fell and "blk.0.ffn_gate_exps.weight" in fell
    # every 16-bit weight with ne0 = 160 fell back, except output.weight: llama.cpp's mixture rule picks
    # Q8_0 for an output whose width does not fit (not logged as a fallback; off-nominal counts it)
    f16 = gg.inspect(f16)
    wide = {n for n, s in f16.shapes.items() if s[0] == 160 and f16.types[n] == "F16"}
    assert set(fell) == wide - {"output.weight"} and info.types["output.weight"] == "Q8_0"


def test_tools_and_bindings_come_from_one_build(tmp_path):
    """llama-quantize, llama-server and the bindings' libllama are one build's; the binaries find
    their libraries beside them, so a copied bin folder works (the images copy it)."""
    import subprocess

    from gptoss import llamacpp

    llama_cpp = llamacpp.bindings()
    package = llamacpp.source_dir() / llamacpp.BINDINGS_DIR
    assert Path(llama_cpp.__file__).resolve().is_relative_to(package.resolve()) and llama_cpp.__version__ == "0.3.36"
    lib = Path(llama_cpp.llama_cpp._lib._name)
    assert lib.parent == llamacpp.tool("llama-server").parent == llamacpp.library_dir()
    dynamic = subprocess.run(["readelf", "-d", str(llamacpp.tool("llama-server"))], capture_output=True, text=True).stdout
    assert "[$ORIGIN]" in dynamic and "Shared library: [libllama" in dynamic
    llamacpp.install(tmp_path / "opt", tools=("llama-quantize",), with_source=False)
    copied = subprocess.run([str(tmp_path / "opt/bin/llama-quantize"), "--help"], capture_output=True, text=True,
                            env={"PATH": "/usr/bin:/bin"})
    assert "usage:" in copied.stdout + copied.stderr, copied.stderr[-2000:]


LLAMA_CPP_LOG_LINES = ("INFO:hf-to-gguf", "llama_model_loader", "llama_model_quantize", "load_tensors", "llama_context")


def _export_cli(exported, out: Path) -> list[str]:
    import sys

    return [sys.executable, "-m", "gptoss", "export", "--run", str(exported["run"]), "--out", str(out), "--quants", "q8_0",
            "--compare-hf", "off", "--threads", "2"]


def test_export_without_a_terminal_prints_one_line_per_stage_and_no_llama_cpp_logs(exported, tmp_path):
    import subprocess

    out = tmp_path / "x"
    proc = subprocess.run(_export_cli(exported, out), capture_output=True, text=True, cwd=REPO, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stderr.splitlines()
    stages = [line for line in lines if " ... " in line]
    assert [s.split(" ... ")[0] for s in stages] == [
        "merge", "convert tiny-run-F16.gguf", "quantize tiny-run-Q8_0.gguf", "logits of tiny-run-F16.gguf",
        "logits of tiny-run-Q8_0.gguf"]
    assert re.search(r"^merge \.\.\. [\d.]+ MB in [\d.]+ s$", stages[0]), stages[0]
    assert re.search(r" \.\.\. \d+ tensors in [\d.]+ s$", stages[1]) and re.search(r" \.\.\. 4 prompts in [\d.]+ s$", stages[3])
    assert f"export tiny-run: llama.cpp's own output goes to {out / 'export.log'}" in lines
    assert not [line for line in lines if any(k in line for k in LLAMA_CPP_LOG_LINES)]
    assert "\r" not in proc.stderr
    log = (out / "export.log").read_text()
    assert all(k in log for k in LLAMA_CPP_LOG_LINES), "llama.cpp's lines belong in the log file"


def test_export_in_a_terminal_shows_progress_bars(exported, tmp_path):
    from pty_support import run_in_terminal

    text = run_in_terminal(_export_cli(exported, tmp_path / "x"), env=dict(os.environ), cwd=REPO)
    for bar in ("merge: 100%|", "convert tiny-run-F16.gguf: 100%|", "quantize tiny-run-Q8_0.gguf: 100%|",
                "logits of tiny-run-Q8_0.gguf: 100%|"):
        assert bar in text, text[-3000:]
    assert not [k for k in LLAMA_CPP_LOG_LINES if k in text]
