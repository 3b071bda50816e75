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
