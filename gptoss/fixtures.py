"""`gptoss fixture`: seeded random GptOssForCausalLM checkpoints with the real gpt-oss tokenizer.

``tiny`` runs on a CPU in seconds (the test and demo model); ``geometry-20b`` has gpt-oss-20b's
real widths with fewer layers, for GPU benchmarks of later stages.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path

from gptoss.errors import ToolchainError
from typing import Callable

from gptoss import harmony, vocab

FIXTURE_RECORD = "fixture.json"


class FixtureError(ToolchainError):
    """Bad fixture request: unknown name, bad flag, unwritable output."""


def _yarn(factor: float = 32.0, original: int = 4096, theta: float = 150000.0) -> dict:
    return {
        "rope_type": "yarn",
        "rope_theta": theta,
        "factor": factor,
        "original_max_position_embeddings": original,
        "beta_fast": 32.0,
        "beta_slow": 1.0,
        "truncate": False,
    }


def _layer_types(n: int) -> list[str]:
    # gpt-oss alternates sliding-window and full attention, starting with sliding.
    return ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n)]


def _base_config(**geometry) -> dict:
    special = harmony.special_tokens()
    ids = {text: i for i, text in special.items()}
    return dict(
        vocab_size=vocab.VOCAB_SIZE,
        head_dim=64,
        sliding_window=128,
        max_position_embeddings=131072,
        rope_parameters=_yarn(),
        rms_norm_eps=1e-5,
        swiglu_limit=7.0,
        attention_bias=True,
        tie_word_embeddings=False,
        initializer_range=0.02,
        eos_token_id=ids[harmony.RETURN],
        pad_token_id=ids[harmony.ENDOFTEXT],
        bos_token_id=ids[harmony.STARTOFTEXT],
        layer_types=_layer_types(geometry["num_hidden_layers"]),
        **geometry,
    )


def tiny_config(layers: int | None = None) -> dict:
    n = layers or 2
    return _base_config(
        num_hidden_layers=n,
        hidden_size=256,
        intermediate_size=256,
        num_local_experts=4,
        num_experts_per_tok=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )


def geometry_20b_config(layers: int | None = None) -> dict:
    n = 2 if layers is None else layers
    if not 1 <= n <= 24:
        raise FixtureError(f"--layers must be between 1 and 24 (gpt-oss-20b has 24), got {n}")
    return _base_config(
        num_hidden_layers=n,
        hidden_size=2880,
        intermediate_size=2880,
        num_local_experts=32,
        num_experts_per_tok=4,
        num_attention_heads=64,
        num_key_value_heads=8,
    )


@dataclasses.dataclass(frozen=True)
class FixtureKind:
    config: Callable[[int | None], dict]
    description: str
    max_shard_size: str


FIXTURES: dict[str, FixtureKind] = {
    "tiny": FixtureKind(tiny_config, "2 layers, hidden 256, 4 experts top-2: runs on a CPU in seconds", "1GB"),
    "geometry-20b": FixtureKind(
        geometry_20b_config, "gpt-oss-20b widths (2880, 32 experts top-4, 64/8 heads), N of 24 layers", "2GB"
    ),
}


def _check_out(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise FixtureError(f"--out {out} exists and is not a directory; choose another path")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise FixtureError(f"--out {out} is not empty; pass --force to replace it or choose another path")


def _make_tmp(out: Path) -> Path:
    """The temporary sibling of ``out`` the checkpoint is written into; fails early if unwritable."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    except OSError as e:
        raise FixtureError(f"--out {out}: cannot write there ({e.strerror or e}); choose a writable path") from e


def _write_checkpoint(tmp: Path, name: str, kind: FixtureKind, config_kwargs: dict, seed: int) -> None:
    import torch
    from transformers import GenerationConfig, GptOssConfig, GptOssForCausalLM

    from gptoss.tokenizer import build_tokenizer

    tokenizer = build_tokenizer()  # before the model: a bad vocabulary fails fast
    config = GptOssConfig(**config_kwargs)
    config.architectures = ["GptOssForCausalLM"]
    torch.manual_seed(seed)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        model = GptOssForCausalLM(config)
    finally:
        torch.set_default_dtype(default_dtype)
    model.config.dtype = torch.bfloat16
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=[harmony.token_id(t) for t in harmony.STOP_TOKENS],
        pad_token_id=config.pad_token_id,
        do_sample=True,
        temperature=1.0,
        top_p=1.0,
    )
    model.save_pretrained(tmp, max_shard_size=kind.max_shard_size)
    tokenizer.save_pretrained(tmp)
    # The class name every transformers version (and llama.cpp's converter) knows.
    tok_config = tmp / "tokenizer_config.json"
    tok_json = json.loads(tok_config.read_text())
    tok_json["tokenizer_class"] = "PreTrainedTokenizerFast"
    tok_config.write_text(json.dumps(tok_json, indent=2, ensure_ascii=False) + "\n")
    record = {
        "fixture": name,
        "seed": seed,
        "geometry": {k: v for k, v in config_kwargs.items() if k != "layer_types"},
        "o200k_sha256": vocab.O200K_SHA256,
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    (tmp / FIXTURE_RECORD).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    _normal_permissions(tmp)


def _normal_permissions(root: Path) -> None:
    """mkdtemp makes 0700 folders: give the checkpoint the umask's usual modes (containers read it)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(root, 0o777 & ~umask)
    for path in root.rglob("*"):
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)


def fixture(name: str, *, out: str, layers: int | None = None, seed: int = 0, force: bool = False) -> str:
    """Write a seeded random gpt-oss checkpoint with the real tokenizer.

    Args:
        name: which fixture: "tiny" (CPU tests and the demo) or "geometry-20b" (real widths).
        out: directory to create; written under a temporary name and renamed when complete.
        layers: number of layers (tiny: default 2; geometry-20b: 1..24, default 2).
        seed: RNG seed; the same seed gives identical bytes.
        force: replace a non-empty ``out``.
    Returns:
        The path of the written checkpoint.
    """
    if name not in FIXTURES:
        known = ", ".join(f"{k} ({v.description})" for k, v in FIXTURES.items())
        raise FixtureError(f"unknown fixture {name!r}; known fixtures: {known}")
    if layers is not None and (not isinstance(layers, int) or isinstance(layers, bool) or layers < 1):
        raise FixtureError(f"--layers must be a positive integer, got {layers!r}")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise FixtureError(f"--seed must be an integer, got {seed!r}")
    kind = FIXTURES[name]
    config_kwargs = kind.config(layers)
    out_path = Path(out).expanduser().absolute()
    _check_out(out_path, force)
    tmp = _make_tmp(out_path)
    try:
        _write_checkpoint(tmp, name, kind, config_kwargs, seed)
        if out_path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out_path.name}.old-", dir=out_path.parent))
            os.replace(out_path, old / "x")
            os.replace(tmp, out_path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return str(out_path)
