"""How close a GGUF's logits are to a reference, on a fixed set of Harmony prompts.

Prompts are rendered by the Harmony core (gptoss.harmony.render_prompt). GGUFs run in the pinned
llama_cpp bindings (gptoss.llamacpp.bindings(): llama-cpp-python's ctypes layer on our libllama)
with logits for every position and an F32 KV cache (the file is measured, not the runtime's F16
cache; llama.cpp's log lines go to a log file); the merged HF model runs in transformers in float32, with YaRN's
correction range truncated as llama.cpp always does it (gpt-oss's config says `truncate: false`,
which llama.cpp cannot reproduce: that engine difference alone is NMSE ~2.5e-4 at gpt-oss-20b's
widths, see docs/BENCHMARKS.md). Metrics over all prompt positions: NMSE of logits (sum of squared
error / sum of squared reference), mean KL(reference || test) of the next-token distributions,
top-1 agreement (all positions, and over the decisive ones where the reference's top token leads by
more than TIE_MARGIN: the top-1 gate uses those).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path

from gptoss import harmony

# Fixed prompt set: changing it changes every recorded fidelity figure (its hash is in the manifest).
PROMPTS: tuple[dict, ...] = (
    {"messages": [{"role": "user", "content": "What is the capital of France? Answer in one word."}]},
    {"messages": [{"role": "user", "content": "Write a haiku about the sea."}],
     "options": {"reasoning_effort": "low"}},
    {"messages": [{"role": "developer", "content": "Answer as a pirate."},
                  {"role": "user", "content": "How many legs does a spider have?"}],
     "options": {"reasoning_effort": "high"}},
    {"messages": [{"role": "user", "content": "Compute 17 * 23 and explain the steps."},
                  {"role": "assistant", "thinking": "17*23 = 391.", "content": "17 * 23 = 391."},
                  {"role": "user", "content": "Now divide that by 7."}]},
)


def prompt_tokens() -> list[list[int]]:
    out = []
    for p in PROMPTS:
        options = harmony.SystemOptions(**p["options"]) if p.get("options") else None
        out.append(harmony.render_prompt(p["messages"], options=options))
    return out


# How logits are measured; part of the digest, so records made another way are measured again.
METHOD = "gguf: f32 kv cache; hf: float32, yarn truncate as llama.cpp; top-1 gate on decisive positions"


def prompts_digest(tokens: list[list[int]]) -> str:
    return hashlib.sha256(json.dumps({"tokens": tokens, "method": METHOD}).encode()).hexdigest()


def gguf_logits(path: str | os.PathLike, tokens: list[list[int]], *, threads: int | None = None,
                progress: bool = False, log: Path | None = None):
    """Logits at every prompt position, one float32 array (n_tokens, vocab) per prompt; llama.cpp's
    log lines go to ``log`` (appended; dropped without one)."""
    import numpy as np

    from gptoss.exporters.gguf import tool_log
    from gptoss import llamacpp
    from gptoss.progress import Stage

    llama_cpp = llamacpp.bindings()
    n_ctx = max(len(t) for t in tokens) + 8
    f32 = 0  # GGML_TYPE_F32
    with tool_log(log, f"fidelity: llama_cpp.Llama({path}, logits_all=True)") as write, \
            llamacpp.log_lines_to(llama_cpp, write), \
            Stage(f"logits of {Path(path).name}", total=len(tokens), unit="prompts", enabled=progress) as bar:
        llm = llama_cpp.Llama(model_path=str(path), logits_all=True, n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx,
                              n_threads=threads or os.cpu_count(), verbose=False, seed=0, type_k=f32, type_v=f32)
        try:
            out = []
            for toks in tokens:
                llm.reset()
                llm.eval(toks)
                out.append(np.array(llm.scores[: len(toks)], dtype=np.float32, copy=True))
                bar.update(1)
            return out
        finally:
            llm.close()


def reference_config(model_dir: str | os.PathLike):
    """The checkpoint's config with YaRN truncation on (as llama.cpp computes RoPE), and a note
    saying so when the config had it off (None otherwise)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(model_dir))
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None)
    if isinstance(rope, dict) and rope.get("rope_type") == "yarn" and rope.get("truncate") is False:
        rope["truncate"] = True
        return config, "YaRN truncated as llama.cpp computes it; the config says truncate: false"
    return config, None


def hf_logits(model_dir: str | os.PathLike, tokens: list[list[int]], *, progress: bool = False):
    """Logits of the HF checkpoint in float32 (transformers), one array per prompt; RoPE as
    llama.cpp computes it (reference_config)."""
    import torch
    from transformers import AutoModelForCausalLM

    from gptoss.progress import Stage

    with Stage(f"logits of the merged HF model ({Path(model_dir).name}, float32)", total=len(tokens), unit="prompts",
               enabled=progress) as bar:
        config, _ = reference_config(model_dir)
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), config=config, dtype=torch.float32)
        model.eval()
        out = []
        with torch.no_grad():
            for toks in tokens:
                out.append(model(torch.tensor([toks])).logits[0].numpy().astype("float32"))
                bar.update(1)
        del model
    return out


# A position is decisive when the reference's top token leads the next by more than this many
# logits; below it, 16-bit rounding alone can swap two tokens the reference considers equal.
TIE_MARGIN = 0.01


@dataclasses.dataclass
class Fidelity:
    nmse: float
    mean_kl: float
    top1_agreement: float
    max_abs_diff: float
    positions: int
    median_position_nmse: float  # robust to a few positions where MoE routing flips
    top1_agreement_decisive: float  # over decisive positions only (what the top-1 gate uses)
    decisive_positions: int

    def passes(self, max_nmse: float, max_kl: float, min_top1: float) -> bool:
        return self.nmse <= max_nmse and self.mean_kl <= max_kl and self.top1_agreement_decisive >= min_top1


def compare(reference, test) -> Fidelity:
    import numpy as np

    if len(reference) != len(test):
        raise ValueError("reference and test cover different prompt sets")
    se = ref_sq = kl = 0.0
    agree = positions = decisive = agree_decisive = 0
    max_abs = 0.0
    per_position: list = []
    for r, t in zip(reference, test):
        r = np.asarray(r, dtype=np.float64)
        t = np.asarray(t, dtype=np.float64)
        if r.shape != t.shape:
            raise ValueError(f"logit shapes differ: {r.shape} vs {t.shape}")
        se += float(((t - r) ** 2).sum())
        per_position.extend((((t - r) ** 2).sum(-1) / np.maximum((r ** 2).sum(-1), 1e-30)).tolist())
        ref_sq += float((r ** 2).sum())
        max_abs = max(max_abs, float(np.abs(t - r).max()))
        lr = r - r.max(axis=-1, keepdims=True)
        lr -= np.log(np.exp(lr).sum(axis=-1, keepdims=True))
        lt = t - t.max(axis=-1, keepdims=True)
        lt -= np.log(np.exp(lt).sum(axis=-1, keepdims=True))
        kl += float((np.exp(lr) * (lr - lt)).sum())
        same = r.argmax(-1) == t.argmax(-1)
        top2 = np.partition(r, -2, axis=-1)[:, -2:]
        clear = (top2[:, 1] - top2[:, 0]) > TIE_MARGIN
        agree += int(same.sum())
        decisive += int(clear.sum())
        agree_decisive += int((same & clear).sum())
        positions += r.shape[0]
    return Fidelity(nmse=se / ref_sq if ref_sq else 0.0, mean_kl=kl / positions, top1_agreement=agree / positions,
                    max_abs_diff=max_abs, positions=positions, median_position_nmse=float(np.median(per_position)),
                    top1_agreement_decisive=agree_decisive / decisive if decisive else 1.0, decisive_positions=decisive)
