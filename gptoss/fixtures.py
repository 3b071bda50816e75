"""`gptoss fixture`: seeded random GptOssForCausalLM checkpoints with the real gpt-oss tokenizer.

``tiny`` runs on a CPU in seconds (the test and demo model); ``geometry-20b`` has gpt-oss-20b's
real widths with fewer layers, for GPU benchmarks of later stages.

Besides the bf16 original (transformers' fused layout), ``--layouts`` writes the same weights in the
layouts users start from (gptoss/layouts.py): ``mxfp4`` (OpenAI's release: experts as MXFP4) and
``unsloth-bnb-4bit`` (Unsloth's split per-expert NF4 Linears, ``router.linear``), each in
``<out>-<layout>`` with a ``fixture.json`` naming its 16-bit original. ``--format mxfp4`` writes the
mxfp4 layout alone, straight from seeded random FP4 codes (no bf16 original; for checkpoints too big to
write in bf16 first, such as geometry-20b at 24 layers).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import tempfile
from pathlib import Path

from typing import Callable, Literal

from gptoss import harmony, vocab
from gptoss import layouts as ckpt_layouts
from gptoss.errors import ToolchainError

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


def _model_config(config_kwargs: dict):
    import torch
    from transformers import GptOssConfig

    config = GptOssConfig(**config_kwargs)
    config.architectures = ["GptOssForCausalLM"]
    config.dtype = torch.bfloat16
    return config


def _generation_config(config):
    from transformers import GenerationConfig

    return GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=[harmony.token_id(t) for t in harmony.STOP_TOKENS],
        pad_token_id=config.pad_token_id,
        do_sample=True,
        temperature=1.0,
        top_p=1.0,
    )


def _save_tokenizer(tokenizer, tmp: Path) -> None:
    tokenizer.save_pretrained(tmp)
    # The class name every transformers version (and llama.cpp's converter) knows.
    tok_config = tmp / "tokenizer_config.json"
    tok_json = json.loads(tok_config.read_text())
    tok_json["tokenizer_class"] = "PreTrainedTokenizerFast"
    tok_config.write_text(json.dumps(tok_json, indent=2, ensure_ascii=False) + "\n")


def _write_record(tmp: Path, record: dict) -> None:
    (tmp / FIXTURE_RECORD).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")


def _record(name: str, seed: int, config_kwargs: dict, parameters: int) -> dict:
    return {
        "fixture": name,
        "seed": seed,
        "geometry": {k: v for k, v in config_kwargs.items() if k != "layer_types"},
        "o200k_sha256": vocab.O200K_SHA256,
        "parameters": parameters,
    }


def _write_checkpoint(tmp: Path, name: str, kind: FixtureKind, config_kwargs: dict, seed: int) -> None:
    import torch
    from transformers import GptOssForCausalLM

    from gptoss.tokenizer import build_tokenizer

    tokenizer = build_tokenizer()  # before the model: a bad vocabulary fails fast
    config = _model_config(config_kwargs)
    torch.manual_seed(seed)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        model = GptOssForCausalLM(config)
    finally:
        torch.set_default_dtype(default_dtype)
    model.config.dtype = torch.bfloat16
    model.generation_config = _generation_config(config)
    model.save_pretrained(tmp, max_shard_size=kind.max_shard_size)
    _save_tokenizer(tokenizer, tmp)
    _write_record(tmp, _record(name, seed, config_kwargs, sum(p.numel() for p in model.parameters())))
    _normal_permissions(tmp)


def _swap_in(tmp: Path, out: Path) -> None:
    """Rename the finished ``tmp`` to ``out``; an old ``out`` is moved aside first, then removed."""
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.replace(out, old / "x")
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


def _normal_permissions(root: Path) -> None:
    """mkdtemp makes 0700 folders: give the checkpoint the umask's usual modes (containers read it)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(root, 0o777 & ~umask)
    for path in root.rglob("*"):
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)


# ---------------------------------------------------------------------------------------------
# The same weights in other layouts

def _side_files(src: Path, dst: Path) -> None:
    for p in src.iterdir():
        if p.is_file() and not p.name.endswith(".safetensors") and p.name != "model.safetensors.index.json":
            shutil.copyfile(p, dst / p.name)


def _fused_tensors(src: Path):
    """(key, tensor) of a fused safetensors checkpoint, one tensor at a time, in key order."""
    from safetensors import safe_open

    for shard in sorted(src.glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as f:
            for key in sorted(f.keys()):
                yield key, f.get_tensor(key)


def _shard_bytes(max_shard_size: str) -> int:
    """"2GB" / "500MB" -> bytes (transformers' max_shard_size spelling, decimal units)."""
    for unit, scale in (("GB", 10**9), ("MB", 10**6)):
        if max_shard_size.upper().endswith(unit):
            try:
                return int(float(max_shard_size[: -len(unit)]) * scale)
            except ValueError:
                break
    raise FixtureError(f"max_shard_size {max_shard_size!r}: write it as a number of GB or MB, e.g. 2GB or 500MB")


def _save_sharded(tensors, dst: Path, max_shard_bytes: int, *, written: Callable[[int], None] | None = None) -> None:
    """Write ``(key, tensor)`` pairs into size-bounded shards (+ index when more than one).

    Each shard is written as soon as it is full, so at most one shard (plus one tensor) is in memory;
    shards get their final ``model-0000i-of-0000n`` names once ``n`` is known. ``written(nbytes)`` is
    called after each shard.
    """
    from safetensors.torch import save_file

    parts: list[tuple[Path, dict[str, int]]] = []  # (temporary file, {key: bytes})

    def flush(shard: dict) -> None:
        part = dst / f".shard-{len(parts) + 1:05d}.partial"
        save_file(shard, str(part), metadata={"format": "pt"})
        sizes = {key: t.numel() * t.element_size() for key, t in shard.items()}
        parts.append((part, sizes))
        if written is not None:
            written(sum(sizes.values()))

    current, size = {}, 0
    for key, t in tensors:
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > max_shard_bytes:
            flush(current)
            current, size = {}, 0
        current[key] = t.contiguous()
        size += nbytes
    flush(current)
    del current
    names = (["model.safetensors"] if len(parts) == 1 else
             [f"model-{i + 1:05d}-of-{len(parts):05d}.safetensors" for i in range(len(parts))])
    weight_map, total = {}, 0
    for name, (part, sizes) in zip(names, parts):
        os.replace(part, dst / name)
        for key, nbytes in sizes.items():
            weight_map[key] = name
            total += nbytes
    if len(parts) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (dst / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def _mxfp4_tensors(src: Path):
    from gptoss import mxfp4

    for key, t in _fused_tensors(src):
        if key.rsplit(".", 1)[-1] in ckpt_layouts.EXPERT_PARAMETERS:
            blocks, scales = mxfp4.quantize(t)
            yield key + "_blocks", blocks
            yield key + "_scales", scales
        else:
            yield key, t


MXFP4_CONFIG = {
    "quant_method": "mxfp4",
    "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"],
}
# As transformers' BitsAndBytesConfig(load_in_4bit, nf4, double quant, bf16 compute).to_dict() writes it.
BNB_4BIT_CONFIG = {
    "_load_in_4bit": True, "_load_in_8bit": False, "bnb_4bit_compute_dtype": "bfloat16",
    "bnb_4bit_quant_storage": "uint8", "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True,
    "llm_int8_enable_fp32_cpu_offload": False, "llm_int8_has_fp16_weight": False,
    "llm_int8_skip_modules": ["lm_head", "model.embed_tokens", "router"], "llm_int8_threshold": 6.0,
    "load_in_4bit": True, "load_in_8bit": False, "quant_method": "bitsandbytes",
}
NF4_BLOCKSIZE = 64  # bitsandbytes' default for Linear4bit
_NF4_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj")


def _nf4(key: str, weight):
    """A Linear weight as bitsandbytes' Linear4bit saves it: packed NF4 + absmax/quant_map/nested/quant_state."""
    import bitsandbytes.functional as bnbf

    packed, state = bnbf.quantize_4bit(weight.contiguous(), blocksize=NF4_BLOCKSIZE, compress_statistics=True,
                                       quant_type="nf4", quant_storage=__import__("torch").uint8)
    yield key, packed
    for part, t in state.as_dict(packed=True).items():
        yield f"{key}.{part}", t


def _unsloth_bnb4_tensors(src: Path):
    """The fused checkpoint in Unsloth's split bnb-4bit layout (gptoss/layouts.py)."""
    for key, t in _fused_tensors(src):
        module, _, leaf = key.rpartition(".")
        if leaf in ckpt_layouts.EXPERT_PARAMETERS:  # (E, in, out) -> per expert Linear weight (out, in)
            for i in range(t.shape[0]):
                yield from _nf4(ckpt_layouts.split_tensor_name(key, i, "weight"), t[i].T.contiguous())
        elif leaf.endswith("_bias") and leaf[: -len("_bias")] in ckpt_layouts.EXPERT_PARAMETERS:
            for i in range(t.shape[0]):
                yield ckpt_layouts.split_tensor_name(f"{module}.{leaf[: -len('_bias')]}", i, "bias"), t[i].clone()
        elif module.endswith(".mlp.router"):
            yield f"{module}.linear.{leaf}", t
        elif leaf == "weight" and module.rsplit(".", 1)[-1] in _NF4_LINEARS:
            yield from _nf4(key, t)
        else:
            yield key, t


def _set_quantization_config(folder: Path, layout: str) -> None:
    """Add ``layout``'s quantization_config to ``folder``/config.json."""
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = dict(MXFP4_CONFIG if layout == "mxfp4" else BNB_4BIT_CONFIG)
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def write_layout(src: str | Path, dst: str | Path, layout: str, *, max_shard_size: str = "2GB") -> Path:
    """Write the bf16 fused checkpoint ``src`` in ``layout`` (one of ckpt_layouts.FIXTURE_LAYOUTS) at ``dst``.

    ``dst`` is written under a temporary name and renamed when complete; its fixture.json names
    ``src`` (relative) as the 16-bit original.
    """
    if layout not in ckpt_layouts.FIXTURE_LAYOUTS:
        raise FixtureError(f"unknown layout {layout!r}; known: {', '.join(ckpt_layouts.FIXTURE_LAYOUTS)}")
    if layout == "unsloth-bnb-4bit":
        try:
            import bitsandbytes  # noqa: F401
        except ImportError as e:
            raise FixtureError("--layouts unsloth-bnb-4bit quantizes with bitsandbytes: pip install bitsandbytes") from e
    src, dst = Path(src).absolute(), Path(dst).absolute()
    tmp = _make_tmp(dst)
    try:
        tensors = _mxfp4_tensors(src) if layout == "mxfp4" else _unsloth_bnb4_tensors(src)
        _save_sharded(tensors, tmp, _shard_bytes(max_shard_size))
        _side_files(src, tmp)
        _set_quantization_config(tmp, layout)
        record = json.loads((src / FIXTURE_RECORD).read_text()) if (src / FIXTURE_RECORD).is_file() else {}
        record.update(layout=layout, original=os.path.relpath(src, dst))
        _write_record(tmp, record)
        _normal_permissions(tmp)
        _swap_in(tmp, dst)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return dst


# ---------------------------------------------------------------------------------------------
# MXFP4 straight from random codes (no bf16 checkpoint first: geometry-20b at 24 layers is ~40 GB in bf16)

def _random_mxfp4_tensors(model, seed: int):
    """(key, tensor) of ``model`` (built on the meta device: names, shapes, module kinds) in the MXFP4
    layout, in key order, one tensor at a time.

    Values as GptOssPreTrainedModel._init_weights draws them for the bf16 fixture (normal(0,
    initializer_range) for Linear and embedding weights, sinks and the router; zero Linear and expert
    biases; unit norms; a zero padding row), except the experts: uniformly random FP4 codes.
    """
    import torch
    from torch import nn
    from transformers.models.gpt_oss import modeling_gpt_oss as gpt_oss

    from gptoss import mxfp4

    std = model.config.initializer_range
    # Uniform random codes have an RMS of mxfp4.CODE_RMS (2.93); 2**round(log2(0.02 / 2.93)) = 2**-7
    # brings it to 0.023, next to the bf16 fixture's normal(0, 0.02) experts (quantize() picks -7 for
    # most of their blocks too), so activations keep the bf16 fixture's scale.
    exponent = round(math.log2(std / mxfp4.CODE_RMS))
    generator = torch.Generator().manual_seed(seed)
    for key, param in sorted(model.state_dict().items()):
        module_name, _, leaf = key.rpartition(".")
        module = model.get_submodule(module_name)
        if isinstance(module, gpt_oss.GptOssExperts) and leaf in ckpt_layouts.EXPERT_PARAMETERS:
            blocks, scales = mxfp4.random_codes(tuple(param.shape), exponent=exponent, generator=generator)
            yield key + "_blocks", blocks
            yield key + "_scales", scales
            continue
        t = torch.empty(tuple(param.shape), dtype=torch.bfloat16)
        if isinstance(module, gpt_oss.GptOssRMSNorm):
            t.fill_(1.0)
        elif (isinstance(module, nn.Linear) and leaf == "bias") or isinstance(module, gpt_oss.GptOssExperts):
            t.zero_()  # the experts' *_bias
        elif (isinstance(module, (nn.Linear, nn.Embedding, gpt_oss.GptOssTopKRouter))
              or (isinstance(module, gpt_oss.GptOssAttention) and leaf == "sinks")):
            t.normal_(0.0, std, generator=generator)
            if isinstance(module, nn.Embedding) and module.padding_idx is not None:
                t[module.padding_idx] = 0
        else:
            raise FixtureError(f"--format mxfp4: no random values defined for {key} ({type(module).__name__}) "
                               "in this transformers version; use --format bf16 --layouts mxfp4")
        yield key, t


def _mxfp4_nbytes(model) -> int:
    """What _random_mxfp4_tensors writes: bf16 tensors, and 4.25 bits per expert weight (codes + scales)."""
    from gptoss import mxfp4

    total = 0
    for key, param in model.state_dict().items():
        if key.rsplit(".", 1)[-1] in ckpt_layouts.EXPERT_PARAMETERS and ".mlp.experts." in key:
            total += param.numel() // 2 + param.numel() // mxfp4.BLOCK
        else:
            total += param.numel() * 2
    return total


def _write_mxfp4_checkpoint(tmp: Path, name: str, kind: FixtureKind, config_kwargs: dict, seed: int,
                            *, max_shard_size: str | None = None) -> None:
    """The MXFP4 layout written by write_layout, from random codes: one shard in memory at a time."""
    import torch
    from transformers import GptOssForCausalLM

    from gptoss.progress import Stage
    from gptoss.tokenizer import build_tokenizer

    tokenizer = build_tokenizer()  # before the weights: a bad vocabulary fails fast
    config = _model_config(config_kwargs)
    with torch.device("meta"):
        model = GptOssForCausalLM(config)
    with Stage(f"fixture {name}: random MXFP4 checkpoint in {tmp.parent}", total=_mxfp4_nbytes(model),
               bytes_=True) as bar:
        _save_sharded(_random_mxfp4_tensors(model, seed), tmp, _shard_bytes(max_shard_size or kind.max_shard_size),
                      written=bar.update)
    config.save_pretrained(tmp)
    _generation_config(config).save_pretrained(tmp)
    _save_tokenizer(tokenizer, tmp)
    _set_quantization_config(tmp, "mxfp4")
    # No "original": there is no 16-bit checkpoint of these weights.
    record = _record(name, seed, config_kwargs, sum(p.numel() for p in model.parameters()))
    record["layout"] = "mxfp4"
    _write_record(tmp, record)
    _normal_permissions(tmp)


def layout_dir(out: str | Path, layout: str) -> Path:
    """Where `gptoss fixture --out OUT --layouts LAYOUT` puts that layout: ``OUT-LAYOUT`` beside OUT."""
    out = Path(out)
    return out.with_name(f"{out.name}-{layout}")


Format = Literal["bf16", "mxfp4"]


def fixture(name: str, *, out: str, layers: int | None = None, seed: int = 0, format: Format = "bf16",
            layouts: str = "", force: bool = False) -> str:
    """Write a seeded random gpt-oss checkpoint with the real tokenizer (bf16 in transformers' fused layout,
    or --format mxfp4).

    Args:
        name: which fixture: "tiny" (CPU tests and the demo) or "geometry-20b" (real widths).
        out: directory to create; written under a temporary name and renamed when complete.
        layers: number of layers (tiny: default 2; geometry-20b: 1..24, default 2).
        seed: RNG seed; the same seed gives identical bytes.
        format: what OUT holds: bf16 (the 16-bit original, transformers' fused layout) or mxfp4 (OpenAI's
            release layout as --layouts mxfp4 writes it, but straight from random FP4 codes with no bf16
            original, so geometry-20b at 24 layers is ~14 GB written in minutes, not ~40 GB of bf16 first).
        layouts: also write these layouts of the same weights, comma-separated: mxfp4 (OpenAI's release),
            unsloth-bnb-4bit (Unsloth's split NF4 experts); each goes to OUT-LAYOUT beside OUT (bf16 only).
        force: replace a non-empty ``out`` (and the layout folders).
    Returns:
        The path of the written checkpoint.
    """
    from gptoss.choices import signature_problems

    if name not in FIXTURES:
        known = ", ".join(f"{k} ({v.description})" for k, v in FIXTURES.items())
        raise FixtureError(f"unknown fixture {name!r}; known fixtures: {known}")
    if wrong := signature_problems(fixture, {"format": format}):
        raise FixtureError("; ".join(wrong))
    if layers is not None and (not isinstance(layers, int) or isinstance(layers, bool) or layers < 1):
        raise FixtureError(f"--layers must be a positive integer, got {layers!r}")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise FixtureError(f"--seed must be an integer, got {seed!r}")
    wanted = [x.strip() for x in (layouts.split(",") if isinstance(layouts, str) else layouts) if x.strip()]
    unknown = [x for x in wanted if x not in ckpt_layouts.FIXTURE_LAYOUTS]
    if unknown:
        raise FixtureError(f"--layouts {','.join(unknown)}: unknown; known: {', '.join(ckpt_layouts.FIXTURE_LAYOUTS)} "
                           "(the bf16 original is always written at --out)")
    if wanted and format != "bf16":
        raise FixtureError(f"--layouts {','.join(wanted)} needs the bf16 original, which --format {format} does not "
                           f"write; leave --layouts out, or use --format bf16 --layouts {','.join(wanted)}")
    kind = FIXTURES[name]
    config_kwargs = kind.config(layers)
    out_path = Path(out).expanduser().absolute()
    _check_out(out_path, force)
    for layout in wanted:
        _check_out(layout_dir(out_path, layout), force)
    tmp = _make_tmp(out_path)
    try:
        if format == "mxfp4":
            _write_mxfp4_checkpoint(tmp, name, kind, config_kwargs, seed)
        else:
            _write_checkpoint(tmp, name, kind, config_kwargs, seed)
        _swap_in(tmp, out_path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    for layout in wanted:
        write_layout(out_path, layout_dir(out_path, layout), layout, max_shard_size=kind.max_shard_size)
    return str(out_path)
