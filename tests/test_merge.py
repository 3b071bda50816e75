"""`gptoss merge`: streaming LoRA merge checked against PEFT on the tiny fixture."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

import export_support as sup
from conftest import hub_cache_holding
from gptoss.exporters import records
from gptoss.exporters.errors import AdapterMismatchError, DiskSpaceError, FourBitMergeError, MissingFilesError
from gptoss.exporters.merge import MERGE_RECORD, merge, merge_checkpoint
from gptoss.exporters.runs import resolve_run
from gptoss.records import TrainingInfo


@pytest.fixture(scope="session")
def base(request, tmp_path_factory) -> Path:
    return sup.tiny_base(request, tmp_path_factory)


@pytest.fixture(scope="session")
def run(request, tmp_path_factory) -> Path:
    return sup.tiny_run(request, tmp_path_factory)


@pytest.fixture(scope="session")
def ids():
    return sup.prompt_ids()


@pytest.fixture(scope="session")
def peft_logits(base, run, ids):
    """Reference: base in float32 + the PEFT adapter, unmerged (PEFT's own forward)."""
    return sup.hf_logits(base, ids, adapter=run / "adapter")


@pytest.fixture(scope="session")
def merged_fp32(run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("merge") / "merged-fp32"
    merge(str(run), out=str(out), dtype="float32")
    return out


def _cli(args: list[str], capsys) -> tuple[int, str]:
    from gptoss.cli import main

    capsys.readouterr()
    rc = main(args)
    return rc, capsys.readouterr().err


def test_merged_logits_equal_base_plus_adapter(base, ids, peft_logits, merged_fp32):
    base_logits = sup.hf_logits(base, ids)
    effect = (peft_logits - base_logits).abs().max().item()
    assert effect > 0.1, f"the adapter barely changes the model ({effect}); the check would prove nothing"
    merged = sup.hf_logits(merged_fp32, ids)
    diff = (merged - peft_logits).abs().max().item()
    print(f"\nmerge fp32: max |logits(merged) - logits(base+adapter)| = {diff:.2e} (adapter effect {effect:.2f})")
    assert diff < 1e-4


def test_bf16_merge_is_peft_merge_rounded(run, base, ids, tmp_path):
    """The default bf16 output holds PEFT's float32 merge_and_unload() rounded to bf16."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM
    from peft import PeftModel

    out = Path(merge(str(run), out=str(tmp_path / "merged")))
    ref = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32),
                                    str(run / "adapter")).merge_and_unload().state_dict()
    got = load_file(str(out / "model.safetensors"))
    before = load_file(str(base / "model.safetensors"))
    assert set(got) == set(ref)
    changed = set()
    for name, t in got.items():
        assert t.dtype == torch.bfloat16, name
        r = ref[name].to(torch.bfloat16)
        # the same float32 sum rounded once; allow one bf16 ulp where the float32 sums differ in the last bit
        ulp = torch.finfo(torch.bfloat16).eps * r.float().abs().clamp_min(1e-30)
        assert ((t.float() - r.float()).abs() <= ulp).all(), name
        if not torch.equal(t, before[name]):
            changed.add(name.split("layers.")[-1])
    want = {f"{i}.{m}" for i in range(2) for m in ("self_attn.q_proj.weight", "self_attn.k_proj.weight",
            "self_attn.v_proj.weight", "self_attn.o_proj.weight", "mlp.experts.gate_up_proj", "mlp.experts.down_proj")}
    assert changed == want
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "bfloat16"
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json", MERGE_RECORD):
        assert (out / f).is_file(), f
    record = json.loads((out / MERGE_RECORD).read_text())
    assert record["lora"]["deltas_by_kind"] == {"linear": 8, "experts": 4}


def test_sharded_streaming_output(run, ids, merged_fp32, tmp_path):
    out = Path(merge(str(run), out=str(tmp_path / "sharded"), dtype="float32", max_shard_size="50MB"))
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 3 and all((out / s).is_file() for s in shards)
    assert not (out / "model.safetensors").exists()
    assert torch.equal(sup.hf_logits(out, ids), sup.hf_logits(merged_fp32, ids))


def test_rerun_skips_and_force_redoes(run, tmp_path, capsys):
    from gptoss.exporters.runs import resolve_run

    out = tmp_path / "m"
    first = merge_checkpoint(resolve_run(str(run)), out, progress=False)
    assert not first.skipped
    mtime = (out / "model.safetensors").stat().st_mtime_ns
    again = merge_checkpoint(resolve_run(str(run)), out, progress=False)
    assert again.skipped and (out / "model.safetensors").stat().st_mtime_ns == mtime
    forced = merge_checkpoint(resolve_run(str(run)), out, progress=False, force=True)
    assert not forced.skipped
    assert [p.name for p in tmp_path.iterdir()] == ["m"], "no temporary folders left behind"


# -- quantized bases ------------------------------------------------------------------------------

def test_mxfp4_dequant_matches_transformers(base, tmp_path):
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    from gptoss import mxfp4
    from safetensors import safe_open

    with safe_open(str(base / "model.safetensors"), framework="pt") as f:
        w = f.get_tensor("model.layers.0.mlp.experts.gate_up_proj")
    blocks, scales = mxfp4.quantize(w)
    ours = mxfp4.dequantize(blocks, scales)
    theirs = convert_moe_packed_tensors(blocks, scales, dtype=torch.bfloat16)
    assert ours.shape == w.shape and torch.equal(ours, theirs)
    rel = (ours.float() - w.float()).norm() / w.float().norm()
    assert rel < 0.2, f"MXFP4 round trip error {rel:.3f}"


def test_merge_from_mxfp4_base(base, run, ids, tmp_path):
    """An MXFP4 base (experts as _blocks/_scales) merges like the bf16 base it dequantizes to."""
    from lora_fixtures import write_mxfp4_copy
    from gptoss.exporters.runs import MergeInputs

    mx = write_mxfp4_copy(base, tmp_path / "mxfp4-base")
    merged = merge_checkpoint(MergeInputs("mx", str(mx), None, run / "adapter"), tmp_path / "merged",
                              dtype="float32", progress=False).merged_dir
    rec = json.loads((merged / MERGE_RECORD).read_text())
    assert rec["inputs"]["base"]["quantization"] == "mxfp4"
    assert "quantization_config" not in json.loads((merged / "config.json").read_text())
    # reference: transformers dequantizes the MXFP4 checkpoint on CPU; PEFT applies the adapter
    ref = sup.hf_logits(mx, ids, adapter=run / "adapter")
    diff = (sup.hf_logits(merged, ids) - ref).abs().max().item()
    print(f"\nmerge from MXFP4 base: max |Δ logits| vs transformers-dequantized + PEFT = {diff:.2e}")
    assert diff < 1e-4


def test_merge_from_bnb4_base(base, run, ids, tmp_path):
    """A bitsandbytes NF4 base merges into its dequantized weights when asked (needs bitsandbytes)."""
    bnbf = pytest.importorskip("bitsandbytes.functional")
    from transformers import AutoModelForCausalLM
    from peft import PeftModel

    from lora_fixtures import write_bnb4_copy
    from gptoss.exporters.runs import MergeInputs

    q = write_bnb4_copy(base, tmp_path / "bnb-base")
    merged = merge_checkpoint(MergeInputs("bnb", str(q), None, run / "adapter", merge_into="dequantized"),
                              tmp_path / "merged", dtype="float32", progress=False).merged_dir
    record = json.loads((merged / MERGE_RECORD).read_text())
    assert record["inputs"]["base"]["quantization"] == "bnb-4bit" and record["merge_into"] == "dequantized"
    # reference: bitsandbytes' own dequantization of each 4-bit weight, then PEFT on top, in float32
    qmodel = AutoModelForCausalLM.from_pretrained(str(q), device_map="cpu")
    ref = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    state = ref.state_dict()
    n4 = 0
    for name, module in qmodel.named_modules():
        w = getattr(module, "weight", None)
        if w is not None and getattr(w, "quant_state", None) is not None:
            state[name + ".weight"].copy_(bnbf.dequantize_4bit(w.data, w.quant_state).float())
            n4 += 1
    assert n4 >= 8
    ref = PeftModel.from_pretrained(ref, str(run / "adapter"))
    with torch.no_grad():
        want = ref(torch.tensor([ids])).logits[0]
    diff = (sup.hf_logits(merged, ids) - want).abs().max().item()
    assert diff < 1e-4


# -- refusals and bad input: one clear error each, exit 2, nothing left that looks complete ---------

@pytest.mark.parametrize("dtype", ["nf4", "4bit", "mxfp4"])
def test_refuses_4bit_merge(run, tmp_path, capsys, dtype):
    out = tmp_path / "m"
    with pytest.raises(FourBitMergeError, match="4-bit"):
        merge(str(run), out=str(out), dtype=dtype)
    rc, err = _cli(["merge", "--run", str(run), "--out", str(out), "--dtype", dtype], capsys)
    assert rc == 2 and "refused" in err and err.count("\n") == 1
    assert not out.exists() and list(tmp_path.iterdir()) == []


def _copy_run(run: Path, dst: Path) -> Path:
    shutil.copytree(run, dst)
    return dst


def _assert_clean_failure(capsys, run_dir: Path, out: Path, exc, match: str):
    capsys.readouterr()  # drop what building the inputs printed
    with pytest.raises(exc, match=match):
        merge(str(run_dir), out=str(out))
    rc, err = _cli(["merge", "--run", str(run_dir), "--out", str(out)], capsys)
    assert rc == 2 and err.startswith("gptoss: error:") and err.count("\n") == 1, err
    print("\n" + err.strip())
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")]
    return err


def test_adapter_rank_mismatch(run, tmp_path, capsys):
    bad = _copy_run(run, tmp_path / "run")
    cfg = json.loads((bad / "adapter/adapter_config.json").read_text())
    cfg["r"] = 8
    (bad / "adapter/adapter_config.json").write_text(json.dumps(cfg))
    err = _assert_clean_failure(capsys, bad, tmp_path / "out", AdapterMismatchError, "does not fit the base")
    assert "r=8" in err


def test_adapter_for_other_geometry(base, tmp_path, capsys):
    """An adapter trained on a model with 8 experts and another FFN width, merged into the tiny base."""
    from transformers import GptOssConfig, GptOssForCausalLM

    from lora_fixtures import make_run
    from gptoss.fixtures import tiny_config

    other = tmp_path / "other-base"
    cfg = tiny_config()
    cfg.update(num_local_experts=8, intermediate_size=128)
    torch.manual_seed(0)
    GptOssForCausalLM(GptOssConfig(**cfg)).to(torch.bfloat16).save_pretrained(str(other))
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copyfile(base / f, other / f)
    bad = make_run(other, tmp_path / "run", base_model=str(base))
    err = _assert_clean_failure(capsys, bad, tmp_path / "out", AdapterMismatchError, "does not fit the base")
    assert "mlp.experts" in err


def test_adapter_target_names_mismatch(run, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    bad = _copy_run(run, tmp_path / "run")
    path = bad / "adapter/adapter_model.safetensors"
    tensors = {k.replace("q_proj", "qkv_proj"): v for k, v in load_file(str(path)).items()}
    save_file(tensors, str(path))
    err = _assert_clean_failure(capsys, bad, tmp_path / "out", AdapterMismatchError, "qkv_proj")
    assert "base has no" in err


def test_adapter_vocab_mismatch_tokenizer(run, tmp_path, capsys):
    from transformers import AutoTokenizer

    bad = _copy_run(run, tmp_path / "run")
    tok = AutoTokenizer.from_pretrained(str(bad / "adapter"))
    tok.add_tokens(["<|my_new_token_1|>", "<|my_new_token_2|>"])
    tok.save_pretrained(str(bad / "adapter"))
    _assert_clean_failure(capsys, bad, tmp_path / "out", AdapterMismatchError, "201090 tokens")


def test_adapter_vocab_mismatch_saved_lm_head(run, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    bad = _copy_run(run, tmp_path / "run")
    path = bad / "adapter/adapter_model.safetensors"
    tensors = load_file(str(path))
    tensors["base_model.model.lm_head.weight"] = torch.zeros(201100, 256, dtype=torch.bfloat16)
    save_file(tensors, str(path))
    _assert_clean_failure(capsys, bad, tmp_path / "out", AdapterMismatchError, "vocabulary size differs")


@pytest.mark.parametrize("missing", ["adapter/adapter_model.safetensors", "adapter/adapter_config.json",
                                     "training_info.json", "adapter"])
def test_missing_run_files(run, tmp_path, capsys, missing):
    bad = _copy_run(run, tmp_path / "run")
    target = bad / missing
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    _assert_clean_failure(capsys, bad, tmp_path / "out", MissingFilesError, Path(missing).name)


def test_missing_base_files(run, base, tmp_path, capsys):
    broken = tmp_path / "base"
    broken.mkdir()
    shutil.copyfile(base / "config.json", broken / "config.json")  # weights missing
    bad = _copy_run(run, tmp_path / "run")
    dataclasses.replace(TrainingInfo.load(bad), base_model=str(broken)).write(bad)
    _assert_clean_failure(capsys, bad, tmp_path / "out", MissingFilesError, "no \\*.safetensors")


def test_not_enough_disk(run, tmp_path, monkeypatch, capsys):
    """Disk space is checked before writing (free space is simulated: monkeypatched)."""
    from gptoss.exporters import records

    monkeypatch.setattr(records, "free_bytes", lambda path: 10 << 20)
    _assert_clean_failure(capsys, run, tmp_path / "out", DiskSpaceError, "only 10.5 MB is free")


def test_resolve_run_reads_training_info(run):
    inputs = resolve_run(str(run))
    assert inputs.name == "tiny-run" and inputs.adapter_dir == run / "adapter"
    assert Path(inputs.base).is_dir()


def test_hub_id_base_uses_the_hub_cache(base, run, tmp_path, monkeypatch):
    """A Hugging Face id resolves through huggingface_hub.snapshot_download (mocked: no hub here) to a
    cache snapshot; the resolved commit is recorded and blob names serve as sha256 without re-reading."""
    import huggingface_hub

    from gptoss.exporters.runs import MergeInputs

    commit = "0123456789abcdef0123456789abcdef01234567"
    snap = hub_cache_holding(base, "openai/gpt-oss-tiny", tmp_path / "hub", commit)
    calls = []

    def fake_snapshot_download(repo_id, revision=None, allow_patterns=None, local_files_only=False):
        calls.append((repo_id, revision))
        assert local_files_only is huggingface_hub.constants.HF_HUB_OFFLINE  # offline: the cache only
        if repo_id != "openai/gpt-oss-tiny":
            raise huggingface_hub.errors.RepositoryNotFoundError("404 Client Error: Repository Not Found")
        return str(snap)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    real_sha = records.sha256_file

    def no_rereads(p):
        assert "hub/" not in str(p), f"re-read {p} instead of using the blob name"
        return real_sha(p)

    monkeypatch.setattr(records, "sha256_file", no_rereads)
    res = merge_checkpoint(MergeInputs("hub", "openai/gpt-oss-tiny", "main", run / "adapter"), tmp_path / "m",
                           progress=False)
    rec = res.record["inputs"]["base"]
    assert calls == [("openai/gpt-oss-tiny", "main")] and rec["revision"] == commit
    assert rec["files"]["model.safetensors"]["sha256"] == Path(os.path.realpath(snap / "model.safetensors")).name
    with pytest.raises(MissingFilesError, match="could not be fetched from the Hugging Face Hub"):
        merge_checkpoint(MergeInputs("hub", "openai/nope", None, run / "adapter"), tmp_path / "m2", progress=False)
