"""`gptoss fixture`: the tiny checkpoint loads and generates, its tokenizer is gpt-oss's, bad input fails cleanly."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gptoss import fixtures, harmony, vocab

# ~8 KB of mixed scripts, code, numbers, whitespace runs and emoji.
MIXED_TEXT = (
    "The quick brown fox jumps over the lazy dog. 1234567890 3.14159 -42\n"
    "Größenwahn und Übermut: Schloß Neuschwanstein liegt in Bayern.\n"
    "Le cœur a ses raisons que la raison ne connaît point. ¿Qué tal? ¡Muy bien!\n"
    "日本語の文章を正しくトークン化できるか確認します。東京は大きな都市です。\n"
    "中文分词测试：我们今天去公园散步，天气很好。\n"
    "한국어 문장도 포함합니다. 서울은 한국의 수도입니다.\n"
    "Русский текст: Съешь же ещё этих мягких французских булок.\n"
    "العربية: مرحبا بالعالم، كيف حالك اليوم؟\n"
    "हिन्दी: नमस्ते दुनिया, आप कैसे हैं?\n"
    "ελληνικά: Γειά σου Κόσμε\n"
    "def f(x):\n\treturn {'a': [x ** 2 for x in range(10)]}  # comment\n\n\n    indented\r\n"
    "Emoji: 🎉👩‍💻🇫🇷 ❤️ ✓ ∑∫√ — “quotes” ‘single’ … «guillemets»\n"
    "URLs: https://example.com/path?q=1&r=2#frag and e-mail: someone@example.org\n"
    "I'm, you're, they've, we'll, she'd, IT'S, DON'T\n"
) * 8


def test_tiny_loads_and_generates_on_cpu(tiny_model):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    prompt = harmony.render_prompt([{"role": "user", "content": "Hello"}])
    out = model.generate(torch.tensor([prompt]), max_new_tokens=5, do_sample=False, pad_token_id=199999)
    new = out[0, len(prompt):].tolist()
    assert len(new) == 5 and all(0 <= t < vocab.VOCAB_SIZE for t in new)


def test_tiny_geometry_matches_the_issue(tiny_model):
    cfg = json.loads((tiny_model / "config.json").read_text())
    assert cfg["architectures"] == ["GptOssForCausalLM"] and cfg["model_type"] == "gpt_oss"
    assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["intermediate_size"]) == (2, 256, 256)
    assert (cfg["num_local_experts"], cfg["num_experts_per_tok"], cfg["head_dim"]) == (4, 2, 64)
    assert cfg["layer_types"] == ["sliding_attention", "full_attention"]
    assert cfg["rope_parameters"]["rope_type"] == "yarn" and cfg["rope_parameters"]["factor"] == 32.0
    assert cfg["vocab_size"] == 201088 and cfg["eos_token_id"] == 200002 and cfg["pad_token_id"] == 199999
    assert list(tiny_model.glob("*.safetensors")), "weights must be safetensors"


def test_tokenizer_is_gpt_oss(tiny_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    enc = harmony.encoding()
    assert len(MIXED_TEXT.encode()) > 8000
    assert tok.encode(MIXED_TEXT, add_special_tokens=False) == enc.encode(MIXED_TEXT)
    assert tok.decode(enc.encode(MIXED_TEXT)) == MIXED_TEXT
    assert len(tok) == 201088
    specials = harmony.special_tokens()
    assert len(specials) == 1090 and min(specials) == 199998 and max(specials) == 201087
    assert tok.convert_ids_to_tokens(list(specials)) == list(specials.values())
    assert tok.eos_token == "<|return|>" and tok.pad_token == "<|endoftext|>"
    assert tok.encode("<|start|>user<|message|>hi<|end|>", add_special_tokens=False) == enc.encode(
        "<|start|>user<|message|>hi<|end|>", allowed_special="all")


def test_same_seed_gives_identical_bytes(tiny_model, tmp_path):
    again = Path(fixtures.fixture("tiny", out=str(tmp_path / "again")))
    names = sorted(p.name for p in tiny_model.iterdir())
    assert names == sorted(p.name for p in again.iterdir())
    for name in names:
        assert hashlib.sha256((tiny_model / name).read_bytes()).digest() == hashlib.sha256((again / name).read_bytes()).digest(), name


def test_geometry_20b_has_the_real_widths():
    cfg = fixtures.geometry_20b_config(3)
    assert (cfg["hidden_size"], cfg["intermediate_size"], cfg["num_local_experts"], cfg["num_experts_per_tok"]) == (2880, 2880, 32, 4)
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]) == (64, 8, 64)
    assert (cfg["vocab_size"], cfg["sliding_window"], cfg["num_hidden_layers"]) == (201088, 128, 3)
    rope = cfg["rope_parameters"]
    assert (rope["factor"], rope["original_max_position_embeddings"], rope["rope_theta"]) == (32.0, 4096, 150000.0)
    with pytest.raises(fixtures.FixtureError, match="between 1 and 24"):
        fixtures.geometry_20b_config(25)


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gptoss", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=300)


def _leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir()] if folder.exists() else []


def test_unknown_fixture_lists_known_ones(tmp_path):
    proc = run_cli("fixture", "huge", "--out", str(tmp_path / "x"))
    assert proc.returncode != 0
    assert "unknown fixture 'huge'" in proc.stderr and "tiny" in proc.stderr and "geometry-20b" in proc.stderr
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("layers, message", [("0", "--layers must be a positive integer, got 0"),
                                             ("25", "--layers must be between 1 and 24 (gpt-oss-20b has 24), got 25")])
def test_geometry_layers_out_of_range(tmp_path, layers, message):
    proc = run_cli("fixture", "geometry-20b", "--layers", layers, "--out", str(tmp_path / "x"))
    assert proc.returncode == 2 and proc.stderr.strip() == f"gptoss: error: {message}"
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("problem", ["corrupt", "wrong-content", "missing"])
def test_bad_vocabulary_fails_clearly_and_leaves_nothing(tmp_path, problem):
    bad = tmp_path / "vocab" / "o200k_base.tiktoken.gz"
    bad.parent.mkdir()
    if problem == "corrupt":
        bad.write_bytes(b"this is not gzip")
    elif problem == "wrong-content":
        bad.write_bytes(gzip.compress(b"aGVsbG8= 0\n"))
    out_parent = tmp_path / "models"
    proc = run_cli("fixture", "tiny", "--out", str(out_parent / "tiny"),
                   env={"GPTOSS_O200K_GZ": str(bad), "GPTOSS_CACHE": str(tmp_path / "cache")})
    assert proc.returncode == 2, proc.stderr
    assert str(bad) in proc.stderr
    assert "Traceback" not in proc.stderr
    if problem == "wrong-content":
        assert vocab.O200K_SHA256 in proc.stderr
        assert hashlib.sha256(b"aGVsbG8= 0\n").hexdigest() in proc.stderr
    if problem == "missing":
        assert "not found" in proc.stderr
    assert _leftovers(out_parent) == []


def test_unwritable_out_fails_clearly(tmp_path):
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    proc = run_cli("fixture", "tiny", "--out", str(a_file / "tiny"))
    assert proc.returncode == 2 and "cannot write there" in proc.stderr and str(a_file) in proc.stderr
    proc = run_cli("fixture", "tiny", "--out", "/proc/gptoss-tiny")
    assert proc.returncode == 2 and "/proc/gptoss-tiny" in proc.stderr and "Traceback" not in proc.stderr


def test_non_empty_out_is_refused_without_force(tmp_path):
    out = tmp_path / "tiny"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    proc = run_cli("fixture", "tiny", "--out", str(out))
    assert proc.returncode == 2 and "--force" in proc.stderr
    assert (out / "keep.txt").read_text() == "user data"


# ---------------------------------------------------------------------------------------------
# --format mxfp4: OpenAI's release layout straight from random codes, no bf16 original first


def _tensor_specs(folder: Path) -> dict[str, tuple[list[int], str]]:
    from safetensors import safe_open

    specs = {}
    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as f:
            for key in f.keys():
                s = f.get_slice(key)
                specs[key] = (s.get_shape(), s.get_dtype())
    return specs


def _tensors(folder: Path) -> dict:
    from safetensors.torch import load_file

    out = {}
    for shard in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(shard)))
    return out


@pytest.fixture(scope="module")
def direct_mxfp4(tmp_path_factory) -> Path:
    """`gptoss fixture tiny --format mxfp4`, as users run it."""
    out = tmp_path_factory.mktemp("direct") / "tiny-mxfp4"
    proc = run_cli("fixture", "tiny", "--format", "mxfp4", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == str(out)
    return out


@pytest.fixture(scope="module")
def layout_mxfp4(tiny_model, tmp_path_factory) -> Path:
    """What `--layouts mxfp4` writes: write_layout from the bf16 fixture (the reference layout)."""
    return fixtures.write_layout(tiny_model, tmp_path_factory.mktemp("layout") / "tiny-mxfp4", "mxfp4")


def test_direct_mxfp4_has_the_layout_writers_tensors_and_config(direct_mxfp4, layout_mxfp4):
    from gptoss import layouts

    assert _tensor_specs(direct_mxfp4) == _tensor_specs(layout_mxfp4)
    assert any(k.endswith("_blocks") for k in _tensor_specs(direct_mxfp4))
    assert json.loads((direct_mxfp4 / "config.json").read_text()) == json.loads((layout_mxfp4 / "config.json").read_text())
    names = sorted(p.name for p in direct_mxfp4.iterdir())
    assert names == sorted(p.name for p in layout_mxfp4.iterdir())
    for name in names:
        if not name.endswith(".safetensors") and name not in ("config.json", fixtures.FIXTURE_RECORD):
            assert (direct_mxfp4 / name).read_bytes() == (layout_mxfp4 / name).read_bytes(), name
    record = json.loads((direct_mxfp4 / fixtures.FIXTURE_RECORD).read_text())
    reference = json.loads((layout_mxfp4 / fixtures.FIXTURE_RECORD).read_text())
    assert "original" not in record and reference.pop("original")  # no bf16 original to name
    assert record == reference
    assert layouts.describe(direct_mxfp4) == layouts.describe(layout_mxfp4) == {"layout": "fused", "quantization": "mxfp4"}
    assert layouts.sixteen_bit_original(str(direct_mxfp4)) is None


def test_direct_mxfp4_weights_have_the_bf16_fixtures_magnitudes(direct_mxfp4, tiny_model):
    import torch

    from gptoss import mxfp4

    ours, bf16 = _tensors(direct_mxfp4), _tensors(tiny_model)
    experts = 0
    for key, ref in bf16.items():
        ref = ref.float()
        if key + "_blocks" in ours:
            w = mxfp4.dequantize(ours[key + "_blocks"], ours[key + "_scales"], dtype=torch.float32)
            assert w.shape == ref.shape, key
            ratio = w.pow(2).mean().sqrt() / ref.pow(2).mean().sqrt()
            assert 0.9 < ratio < 1.3, (key, float(ratio))  # 2**-7 * 2.93 = 0.023 against normal(0, 0.02)
            experts += 1
            continue
        t = ours[key].float()
        if (ref == ref.flatten()[0]).all():  # zero biases, unit norms
            assert (t == ref).all(), key
        elif ref.numel() >= 1000:
            assert 0.9 < t.std() / ref.std() < 1.1, key
    assert experts == 4
    pad = harmony.token_id(harmony.ENDOFTEXT)
    assert not ours["model.embed_tokens.weight"][pad].any()


def test_direct_mxfp4_loads_in_transformers_and_generates(direct_mxfp4):
    """transformers' mxfp4 loader (dequantized to bf16 on a CPU) reads the codes as we meant them."""
    import torch
    from transformers import AutoModelForCausalLM, Mxfp4Config

    from gptoss import mxfp4

    model = AutoModelForCausalLM.from_pretrained(direct_mxfp4, quantization_config=Mxfp4Config(dequantize=True),
                                                 dtype=torch.float32)
    stored = _tensors(direct_mxfp4)
    for param in ("gate_up_proj", "down_proj"):
        key = f"model.layers.1.mlp.experts.{param}"
        expected = mxfp4.dequantize(stored[key + "_blocks"], stored[key + "_scales"], dtype=torch.float32)
        assert torch.equal(getattr(model.model.layers[1].mlp.experts, param).float(), expected), param
    prompt = harmony.render_prompt([{"role": "user", "content": "Hello"}])
    with torch.no_grad():
        logits = model(torch.tensor([prompt])).logits
    assert logits.shape == (1, len(prompt), vocab.VOCAB_SIZE) and torch.isfinite(logits).all()
    out = model.generate(torch.tensor([prompt]), max_new_tokens=4, do_sample=False, pad_token_id=199999)
    assert all(0 <= t < vocab.VOCAB_SIZE for t in out[0, len(prompt):].tolist())


def test_direct_mxfp4_in_shards_is_the_same_checkpoint_and_converts(direct_mxfp4, tmp_path):
    """Small shards (as geometry-20b's 24 layers get): same tensors, same bytes; the pinned llama.cpp
    converter keeps the experts MXFP4 (its codes decode to ours) and makes the other matrices Q8_0."""
    import numpy as np
    import torch

    from gptoss import mxfp4
    from gptoss.exporters import gguf as gg

    sharded = tmp_path / "sharded"
    sharded.mkdir()
    fixtures._write_mxfp4_checkpoint(sharded, "tiny", fixtures.FIXTURES["tiny"], fixtures.tiny_config(), 0,
                                     max_shard_size="60MB")
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in sharded.glob("*.safetensors"))
    assert len(shards) > 2 and sorted(set(index["weight_map"].values())) == shards
    ours, single = _tensors(sharded), _tensors(direct_mxfp4)
    assert sorted(ours) == sorted(index["weight_map"]) == sorted(single)
    assert all(ours[k].dtype == single[k].dtype and torch.equal(ours[k], single[k]) for k in ours)

    gguf_path = tmp_path / "tiny-mxfp4-Q8_0.gguf"
    gg.convert(sharded, gguf_path, outtype="q8_0", progress=False)
    types = {t.name: t.type for t in gg.inspect(gguf_path).tensors.values()}
    experts = [n for n in types if n.endswith("_exps.weight")]
    assert len(experts) == 2 * 3 and {types[n] for n in experts} == {"MXFP4"}
    matrices = ["token_embd.weight", "output.weight"] + [
        n for n in types if n.endswith((".attn_q.weight", ".attn_k.weight", ".attn_v.weight", ".attn_output.weight"))]
    assert len(matrices) == 2 + 2 * 4 and {types[n] for n in matrices} == {"Q8_0"}
    gguf = gg.gguf_module()
    tensor = next(t for t in gguf.GGUFReader(str(gguf_path)).tensors if t.name == "blk.1.ffn_down_exps.weight")
    decoded = gguf.quants.dequantize(tensor.data, tensor.tensor_type)  # (E, out, in)
    key = "model.layers.1.mlp.experts.down_proj"
    expected = mxfp4.dequantize(ours[key + "_blocks"], ours[key + "_scales"], dtype=torch.float32)  # (E, in, out)
    np.testing.assert_array_equal(decoded, expected.transpose(-1, -2).numpy())


def test_save_sharded_writes_each_shard_as_it_fills(tmp_path):
    """At most one shard waits in memory: earlier shards are on disk before the last tensor is made."""
    import torch

    on_disk = []

    def tensors():
        for i in range(6):
            on_disk.append(len(list(tmp_path.glob("*.partial"))))
            yield f"t{i}", torch.full((10**6,), i, dtype=torch.uint8)

    fixtures._save_sharded(tensors(), tmp_path, 2 * 10**6 + 10)
    assert on_disk == [0, 0, 0, 1, 1, 2]
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)] + \
        ["model.safetensors.index.json"]
    stored = _tensors(tmp_path)
    assert sorted(stored) == [f"t{i}" for i in range(6)] and all((stored[f"t{i}"] == i).all() for i in range(6))


@pytest.mark.parametrize("args, message", [
    (["--format", "nf4"], "--format 'nf4': not one of bf16, mxfp4"),
    (["--format", "mxfp4", "--layouts", "unsloth-bnb-4bit"],
     "--layouts unsloth-bnb-4bit needs the bf16 original, which --format mxfp4 does not write"),
])
def test_bad_format_fails_clearly_and_leaves_nothing(tmp_path, args, message):
    proc = run_cli("fixture", "tiny", "--out", str(tmp_path / "x"), *args)
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr
    assert _leftovers(tmp_path) == []
    with pytest.raises(fixtures.FixtureError, match="not one of bf16, mxfp4"):
        fixtures.fixture("tiny", out=str(tmp_path / "y"), format="nf4")
