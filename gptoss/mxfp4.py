"""MXFP4 as gpt-oss checkpoints store it: ``<param>_blocks`` + ``<param>_scales`` per expert tensor.

Layout (the one transformers' ``convert_moe_packed_tensors`` reads): blocks ``(E, out, in/32, 16)``
uint8, two FP4 (E2M1) codes per byte, low nibble first; scales ``(E, out, in/32)`` uint8, an E8M0
exponent biased by 127. Dequantized weights are returned in the HF parameter layout ``(E, in, out)``.
"""

from __future__ import annotations

import math

import torch

BLOCK = 32  # values per shared scale
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
SCALE_BIAS = 127
# Root mean square of FP4_VALUES: what a uniformly random code is worth before its scale.
CODE_RMS = math.sqrt(sum(v * v for v in FP4_VALUES) / len(FP4_VALUES))


def dequantize(blocks: torch.Tensor, scales: torch.Tensor, *, dtype: torch.dtype = torch.bfloat16,
               rows_per_chunk: int = 1 << 20) -> torch.Tensor:
    """``(E, out, G, 16)`` blocks + ``(E, out, G)`` scales -> ``(E, G*32, out)`` weights (chunked: low peak RAM)."""
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8:
        raise ValueError(f"MXFP4 blocks/scales must be uint8, got {blocks.dtype}/{scales.dtype}")
    if tuple(blocks.shape[:-1]) != tuple(scales.shape) or blocks.shape[-1] != BLOCK // 2:
        raise ValueError(f"MXFP4 blocks {tuple(blocks.shape)} do not match scales {tuple(scales.shape)}")
    *prefix, groups, nbytes = blocks.shape
    lut = torch.tensor(FP4_VALUES, dtype=torch.float32)
    flat_blocks = blocks.reshape(-1, nbytes)
    flat_exp = scales.reshape(-1, 1).to(torch.int32) - SCALE_BIAS
    out = torch.empty(flat_blocks.shape[0], nbytes * 2, dtype=dtype)
    for r0 in range(0, flat_blocks.shape[0], rows_per_chunk):
        blk = flat_blocks[r0:r0 + rows_per_chunk]
        vals = torch.empty(blk.shape[0], nbytes * 2, dtype=torch.float32)
        vals[:, 0::2] = lut[(blk & 0x0F).long()]
        vals[:, 1::2] = lut[(blk >> 4).long()]
        out[r0:r0 + rows_per_chunk] = torch.ldexp(vals, flat_exp[r0:r0 + rows_per_chunk]).to(dtype)
    return out.reshape(*prefix, groups * nbytes * 2).transpose(-1, -2).contiguous()


def quantize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(E, in, out)`` weights -> (blocks, scales), round to nearest FP4 with a per-32 power-of-two scale.

    Used to write MXFP4 test checkpoints; the scale is chosen so the block maximum fits FP4's 6.0.
    """
    w = weight.detach().to(torch.float32).transpose(-1, -2).contiguous()  # (E, out, in)
    *prefix, n_in = w.shape
    if n_in % BLOCK:
        raise ValueError(f"MXFP4 needs the input width to be a multiple of {BLOCK}, got {n_in}")
    w = w.reshape(*prefix, n_in // BLOCK, BLOCK)
    amax = w.abs().amax(dim=-1)
    # largest FP4 magnitude is 6 = 1.5 * 2**2: pick e with amax / 2**e <= 6
    exp = torch.where(amax > 0, torch.ceil(torch.log2(amax / 6.0)), torch.zeros_like(amax)).clamp(-127, 127)
    scaled = w / torch.ldexp(torch.ones_like(exp), exp.to(torch.int32)).unsqueeze(-1)
    magnitudes = torch.tensor(FP4_VALUES[:8])
    midpoints = (magnitudes[1:] + magnitudes[:-1]) / 2  # nearest FP4 magnitude, without an 8x temporary
    idx = torch.bucketize(scaled.abs(), midpoints)
    codes = (idx | ((scaled < 0).to(torch.long) << 3)).to(torch.uint8)
    blocks = (codes[..., 0::2] | (codes[..., 1::2] << 4)).to(torch.uint8)
    scales = (exp.to(torch.int32) + SCALE_BIAS).to(torch.uint8)
    return blocks, scales


def random_codes(weight_shape: tuple[int, ...], *, exponent: int,
                 generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Uniformly random FP4 codes for an ``(E, in, out)`` weight, every block scaled by ``2**exponent``.

    Returns (blocks, scales) shaped as ``quantize`` returns them, without a float weight in between
    (fixtures too big to write in bf16 first). RMS of the weights: ``CODE_RMS * 2**exponent``.
    """
    *prefix, n_in, n_out = weight_shape
    if n_in % BLOCK:
        raise ValueError(f"MXFP4 needs the input width to be a multiple of {BLOCK}, got {n_in}")
    if not -SCALE_BIAS <= exponent <= SCALE_BIAS:
        raise ValueError(f"an E8M0 exponent is between {-SCALE_BIAS} and {SCALE_BIAS}, got {exponent}")
    groups = n_in // BLOCK
    blocks = torch.empty(*prefix, n_out, groups, BLOCK // 2, dtype=torch.uint8).random_(generator=generator)
    scales = torch.full((*prefix, n_out, groups), exponent + SCALE_BIAS, dtype=torch.uint8)
    return blocks, scales
