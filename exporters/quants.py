"""The GGUF kinds `gptoss export` makes, registered in one place.

Each kind knows its llama.cpp name (file suffix and llama-quantize argument), the GGML type most
weights should get (to count tensors that ended up elsewhere), size estimates for the disk check,
and the fidelity gate against the F16 file. F16 is the converter's output; every other kind is
quantized from the F16 file by llama.cpp's quantizer.
"""

from __future__ import annotations

from typing import ClassVar

from gptoss.exporters.errors import UnknownQuantError

QUANTS: dict[str, type["Quant"]] = {}


def register_quant(name: str):
    def deco(cls: type[Quant]) -> type[Quant]:
        if name in QUANTS:
            raise ValueError(f"quant {name!r} registered twice")
        cls.name = name
        QUANTS[name] = cls
        return cls

    return deco


class Quant:
    name: ClassVar[str]
    label: ClassVar[str]  # llama.cpp ftype name: file suffix and llama-quantize argument
    nominal: ClassVar[str]  # GGML type the bulk of the weights gets
    description: ClassVar[str]
    # bits per weight for the size estimate: expert tensors, embeddings/output, other weights
    bpw_experts: ClassVar[float]
    bpw_embeddings: ClassVar[float]
    bpw_other: ClassVar[float]
    # Fidelity gate against the reference (F16: the merged HF model; others: the F16 GGUF) on the fixed
    # prompt set. A sanity gate that a broken file fails (NMSE ~1, KL >> 0.1), set at about twice what
    # the tiny random fixture measures; the measured figures are the report. Top-1 agreement on random
    # weights is dominated by near-tied logits and MoE routing flips, so it gates F16 only.
    max_nmse: ClassVar[float]
    max_kl: ClassVar[float]
    min_top1: ClassVar[float] = 0.0
    from_converter: ClassVar[bool] = False  # True: written by convert_hf_to_gguf (--outtype), not quantized

    def __init__(self):
        raise TypeError("quant kinds are used as classes")

    @classmethod
    def estimate_bytes(cls, tensor_sizes: dict[str, int]) -> int:
        """Estimated file size from {merged tensor name: number of elements}."""
        bits = 0.0
        for name, n in tensor_sizes.items():
            if "experts" in name:
                bits += n * cls.bpw_experts
            elif "embed" in name or "lm_head" in name:
                bits += n * cls.bpw_embeddings
            else:
                bits += n * cls.bpw_other
        return int(bits / 8) + (32 << 20)  # + metadata and tokenizer


@register_quant("f16")
class F16(Quant):
    label, nominal = "F16", "F16"
    description = "16-bit reference: what every other file is measured against"
    bpw_experts = bpw_embeddings = bpw_other = 16.0
    max_nmse, max_kl, min_top1 = 1e-5, 1e-5, 1.0  # against the merged HF model
    from_converter = True


@register_quant("q8_0")
class Q8_0(Quant):
    label, nominal = "Q8_0", "Q8_0"
    description = "8-bit, near-lossless"
    bpw_experts = bpw_embeddings = bpw_other = 8.5
    max_nmse, max_kl = 2e-2, 2e-3


@register_quant("q5_k_m")
class Q5_K_M(Quant):
    label, nominal = "Q5_K_M", "Q5_K"
    description = "5-bit K-quant mix (Q6_K for some tensors; widths not divisible by 256 fall back to Q5_1/Q8_0)"
    bpw_experts, bpw_embeddings, bpw_other = 6.0, 6.6, 8.5
    max_nmse, max_kl = 1e-1, 1e-2


@register_quant("q4_k_m")
class Q4_K_M(Quant):
    label, nominal = "Q4_K_M", "Q4_K"
    description = "4-bit K-quant mix (Q6_K for some tensors; widths not divisible by 256 fall back to Q5_0/Q8_0)"
    bpw_experts, bpw_embeddings, bpw_other = 5.5, 6.6, 8.5
    max_nmse, max_kl = 1.5e-1, 1.5e-2


@register_quant("mxfp4_moe")
class MXFP4_MOE(Quant):
    label, nominal = "MXFP4_MOE", "MXFP4"
    description = "experts in MXFP4 (gpt-oss's native format), everything else Q8_0"
    bpw_experts, bpw_embeddings, bpw_other = 4.25, 8.5, 8.5
    max_nmse, max_kl = 1.5e-1, 1.5e-2


def get_quant(name: str) -> type[Quant]:
    key = str(name).strip().lower()
    if key not in QUANTS:
        known = ", ".join(f"{k} ({q.description})" for k, q in QUANTS.items())
        raise UnknownQuantError(f"unknown quant {name!r}; supported: {known}")
    return QUANTS[key]


def parse_quants(value) -> list[str]:
    """--quants q4_k_m,q5_k_m (fire may hand a tuple) -> validated names; all unknown ones reported at once."""
    if value is None or value == "":
        return []
    items = value if isinstance(value, (list, tuple)) else str(value).split(",")
    names = [str(x).strip().lower() for x in items if str(x).strip()]
    unknown = [n for n in names if n not in QUANTS]
    if unknown:
        known = ", ".join(QUANTS)
        raise UnknownQuantError(f"unknown quant{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}; "
                                f"supported: {known}")
    return list(dict.fromkeys(names))
