"""The checkpoint users start from: Unsloth's split bnb-4bit gpt-oss, an adapter trained on its
per-expert Linears, merged into transformers' fused layout (issue 11)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

import export_support as sup
import unsloth_split as us
from gptoss.exporters.errors import AdapterMismatchError, ExportStageError
from gptoss.exporters.merge import MERGE_RECORD, merge
from gptoss import layouts

pytest.importorskip("bitsandbytes")


@pytest.fixture(scope="session")
def base(request, tmp_path_factory) -> Path:
    return sup.tiny_base(request, tmp_path_factory)


@pytest.fixture(scope="session")
def split_base(base, tmp_path_factory) -> Path:
    """`gptoss fixture --layouts unsloth-bnb-4bit`'s writer, beside the bf16 original."""
    from gptoss.fixtures import write_layout

    def build(p: Path) -> None:
        write_layout(base, p / "tiny-unsloth-bnb-4bit", "unsloth-bnb-4bit")

    return sup.cached(tmp_path_factory, "split-base", build) / "tiny-unsloth-bnb-4bit"


@pytest.fixture(scope="session")
def split_run(base, split_base, tmp_path_factory) -> Path:
    """An adapter with one LoRA pair per expert Linear, 'trained on' the split bnb-4bit base."""
    return sup.cached(tmp_path_factory, "split-run",
                      lambda p: us.make_split_run(base, p / "split-run", trained_on=split_base)) / "split-run"


@pytest.fixture(scope="session")
def ids():
    return sup.prompt_ids()


def test_split_fixture_is_unsloths_layout(split_base, base):
    keys = set(layouts._stored_keys(split_base))
    for k in ("model.layers.0.mlp.experts.gate_up_projs.3.weight.absmax",
              "model.layers.0.mlp.experts.gate_up_projs.3.weight.quant_state.bitsandbytes__nf4",
              "model.layers.1.mlp.experts.down_projs.0.weight.nested_absmax", "model.layers.1.mlp.experts.down_projs.0.bias",
              "model.layers.0.mlp.router.linear.weight", "model.layers.0.self_attn.q_proj.weight.quant_map"):
        assert k in keys, k
    assert not any(k.endswith((".mlp.experts.gate_up_proj", ".mlp.router.weight")) for k in keys)
    config = json.loads((split_base / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "bitsandbytes"
    assert layouts.describe(split_base) == {"layout": "split", "quantization": "bnb-4bit"}
    assert layouts.sixteen_bit_original(str(split_base)) == str(base.resolve())


def test_adapter_holds_one_pair_per_expert(split_run):
    from safetensors import safe_open

    with safe_open(str(split_run / "adapter" / "adapter_model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
    assert "base_model.model.model.layers.0.mlp.experts.gate_up_projs.3.lora_A.weight" in keys
    assert "base_model.model.model.layers.1.mlp.experts.down_projs.0.lora_B.weight" in keys
    info = json.loads((split_run / "training_info.json").read_text())
    assert info["base_layout"] == "split" and info["base_quantization"] == "bnb-4bit" and info["merge_base"]


def test_merged_fused_model_equals_split_model_plus_adapter(base, split_run, ids, tmp_path):
    """(a) into the 16-bit original (the default): float32 logits of our fused merge = the split
    tree + PEFT adapter; and the experts changed."""
    out = merge(str(split_run), out=str(tmp_path / "merged"), dtype="float32")
    umask = os.umask(0)
    os.umask(umask)
    assert Path(out).stat().st_mode & 0o777 == 0o777 & ~umask  # readable by other users, as any folder
    record = json.loads((Path(out) / MERGE_RECORD).read_text())
    assert record["merge_into"] == "original"
    assert record["inputs"]["trained_on"]["layout"] == "split"
    assert record["inputs"]["base"]["path"] == str(base.resolve()) and record["inputs"]["base"]["layout"] == "fused"
    assert record["lora"]["deltas_by_kind"]["expert"] == 2 * 2 * 4  # layers x (gate_up, down) x experts
    want = us.split_logits(base, ids, adapter=split_run / "adapter")
    plain = us.split_logits(base, ids)
    assert (want - plain).abs().max().item() > 0.1, "the adapter barely changes the model; the check would prove nothing"
    got = sup.hf_logits(out, ids)  # transformers' own GptOssForCausalLM on the fused output
    assert (got - want).abs().max().item() < 1e-4
    from safetensors import safe_open

    with safe_open(str(Path(out) / "model.safetensors"), framework="pt") as m, \
            safe_open(str(base / "model.safetensors"), framework="pt") as b:
        assert set(m.keys()) == set(b.keys())  # fused names only: no gate_up_projs, no router.linear
        for k in ("model.layers.0.mlp.experts.gate_up_proj", "model.layers.1.mlp.experts.down_proj"):
            changed = (m.get_tensor(k) - b.get_tensor(k).float()).abs().amax(dim=(1, 2))
            assert (changed > 0).all(), f"{k}: experts left unchanged: {changed}"


def test_merge_into_dequantized_is_bitsandbytes_dequant_plus_delta(split_base, split_run, tmp_path):
    """(b) --merge-into dequantized: each expert = bitsandbytes' own dequantization of the NF4
    Linear, transposed, + (B @ A * s)^T."""
    import bitsandbytes.functional as bnbf
    from safetensors import safe_open

    out = Path(merge(str(split_run), out=str(tmp_path / "deq"), dtype="float32", merge_into="dequantized"))
    record = json.loads((out / MERGE_RECORD).read_text())
    assert record["merge_into"] == "dequantized" and record["inputs"]["base"]["quantization"] == "bnb-4bit"
    adapter_cfg = json.loads((split_run / "adapter" / "adapter_config.json").read_text())
    scaling = adapter_cfg["lora_alpha"] / adapter_cfg["r"]
    with safe_open(str(split_base / "model.safetensors"), framework="pt") as q, \
            safe_open(str(split_run / "adapter" / "adapter_model.safetensors"), framework="pt") as a, \
            safe_open(str(out / "model.safetensors"), framework="pt") as m:
        for fused, lst in (("model.layers.0.mlp.experts.gate_up_proj", "gate_up_projs"),
                           ("model.layers.1.mlp.experts.down_proj", "down_projs")):
            merged = m.get_tensor(fused)
            for i in range(merged.shape[0]):
                key = f"model.layers.{fused.split('.')[2]}.mlp.experts.{lst}.{i}"
                parts = {k[len(key) + len(".weight."):]: q.get_tensor(k) for k in q.keys() if k.startswith(key + ".weight.")}
                state = bnbf.QuantState.from_dict(parts, device="cpu")
                w = bnbf.dequantize_4bit(q.get_tensor(key + ".weight"), state).float()
                la = a.get_tensor(f"base_model.model.{key}.lora_A.weight").float()
                lb = a.get_tensor(f"base_model.model.{key}.lora_B.weight").float()
                want = (w + lb @ la * scaling).T
                assert (merged[i] - want).abs().max().item() < 1e-5, (fused, i)


def test_merge_base_flag_and_unknown_original(split_base, split_run, base, tmp_path):
    """No known 16-bit original -> a clear error naming both ways out; a wrong --merge-base is refused."""
    from gptoss.exporters.merge import merge_checkpoint
    from gptoss.exporters.runs import MergeInputs

    orphan = tmp_path / "orphan-4bit"
    orphan.mkdir()
    for p in split_base.iterdir():
        if p.name != "fixture.json":
            os.symlink(p, orphan / p.name)
    with pytest.raises(ExportStageError, match="--merge-base .*--merge-into dequantized"):
        merge_checkpoint(MergeInputs("x", str(orphan), None, split_run / "adapter"), tmp_path / "m1", progress=False)
    other = tmp_path / "other"
    from gptoss.fixtures import fixture

    fixture("tiny", out=str(other), layers=1)
    with pytest.raises(ExportStageError, match="not the 16-bit original"):
        merge_checkpoint(MergeInputs("x", str(orphan), None, split_run / "adapter", merge_base=str(other)),
                         tmp_path / "m2", progress=False)
    res = merge_checkpoint(MergeInputs("x", str(orphan), None, split_run / "adapter", merge_base=str(base)),
                           tmp_path / "m3", progress=False)
    assert res.record["merge_into"] == "original" and res.record["inputs"]["base"]["id"] == str(base)
    assert not (tmp_path / "m1").exists() and not (tmp_path / "m2").exists()


def test_adapter_of_unknown_layout_is_refused_naming_tensors(base, tmp_path):
    """(d) per-expert LoRA on modules no known layout has: refused, the tensor names in the error."""
    from safetensors.torch import save_file

    adapter = tmp_path / "odd" / "adapter"
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8}))
    key = "base_model.model.model.layers.0.mlp.experts.w1.0"
    save_file({f"{key}.lora_A.weight": torch.zeros(4, 256), f"{key}.lora_B.weight": torch.zeros(512, 4)},
              str(adapter / "adapter_model.safetensors"))
    with pytest.raises(AdapterMismatchError, match=r"experts\.w1\.0\.lora_A\.weight.*layout merge does not know"):
        merge(base=str(base), adapter=str(adapter), out=str(tmp_path / "m"))
    assert not (tmp_path / "m").exists()


def test_split_expert_lora_that_does_not_fit_is_refused(base, tmp_path):
    from safetensors.torch import save_file

    adapter = tmp_path / "bad" / "adapter"
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8}))
    key = "base_model.model.model.layers.0.mlp.experts.gate_up_projs.9"  # tiny has 4 experts
    save_file({f"{key}.lora_A.weight": torch.zeros(4, 256), f"{key}.lora_B.weight": torch.zeros(512, 4)},
              str(adapter / "adapter_model.safetensors"))
    with pytest.raises(AdapterMismatchError, match="expert 9 but the base's .*gate_up_proj has 4 experts"):
        merge(base=str(base), adapter=str(adapter), out=str(tmp_path / "m"))


def test_cpu_training_on_the_split_base_says_what_to_do(split_base):
    from gptoss.training.run import environment_problems

    _, problems = environment_problems({"model": str(split_base), "device": "cpu", "backend": "auto"})
    assert any("split" in p and "--backend unsloth" in p and "tiny" in p for p in problems), problems


def test_serving_the_split_run_on_cpu_says_what_to_run(split_run, capsys):
    """`gptoss serve --backend transformers --model models/<run>` of a split 4-bit run, on CPU."""
    from gptoss.cli import main

    rc = main(["serve", "--backend", "transformers", "--model", str(split_run), "--device", "cpu", "--port", "0"])
    err = capsys.readouterr().err
    assert rc == 2 and "split bnb-4bit" in err and f"gptoss export --run {split_run}" in err, err


@pytest.mark.slow
def test_split_run_exports_to_gguf_within_the_fidelity_gate(split_run, tmp_path, capsys):
    """(c) the whole chain from a per-expert adapter on the split 4-bit base: `gptoss export` merges
    into the 16-bit original, converts to GGUF F16 (and Q4_K_M) and both pass the fidelity gate; the
    merged model's card says what it was merged into."""
    import shutil

    from gptoss.exporters.export import export_run
    from gptoss.cli import main

    run = tmp_path / "models" / "split-run"
    shutil.copytree(split_run, run)
    (run / "training_info.json").write_text((split_run / "training_info.json").read_text())
    res = export_run(str(run), quants="q4_k_m", exports_dir=str(tmp_path / "exports"), progress=False,
                     threads=min(4, os.cpu_count() or 1))
    m = res.manifest
    assert m["inputs"]["merge_into"] == "original" and m["inputs"]["trained_on"]["layout"] == "split"
    by_kind = {a["quant"].lower() if a.get("quant") else a["label"].lower(): a for a in m["artifacts"]}
    f16 = next(a for k, a in by_kind.items() if "f16" in k)
    assert f16["fidelity"]["reference"].startswith("merged HF model") and f16["fidelity"]["passed"], f16["fidelity"]
    assert all(a["fidelity"]["passed"] for a in m["artifacts"]), [a["fidelity"] for a in m["artifacts"]]
    capsys.readouterr()
    assert main(["publish", "--run", str(tmp_path / "exports" / "split-run"), "--repo-id", "acme/split-merged",
                 "--what", "merged", "--dry-run"]) == 0
    card = capsys.readouterr().out.split("README.md (model card):")[1]
    assert "Merged into | the 16-bit original" in card and "Unsloth's split bnb-4bit" in card
