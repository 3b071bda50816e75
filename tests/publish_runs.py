"""Realistic run folders for the publish tests: what `gptoss train`, `merge`, `export` and `modelfile` write.

Weights are small random tensors (the publish stage never loads them), but every record, file name and
layout follows the stage contracts: models/<run>/{adapter/, train_config.json, training_info.json} and
exports/<run>/{merged/, gguf/*.gguf + Modelfiles, manifest.json} with sha256 and sizes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import struct
from pathlib import Path

RUN = "gpt-oss-20b_quick_test_r8_20250101-120000"
BASE = "openai/gpt-oss-20b"
BASE_REVISION = "6cee5e81ee83917806bbde320786a8fb61efebee"
DATASET = "HuggingFaceH4/Multilingual-Thinking"
DATASET_HASH = "sha256:" + hashlib.sha256(b"multilingual-thinking rows").hexdigest()
LLAMA_CPP_COMMIT = "4e6d3a5b8f0c1d2e3f4a5b6c7d8e9f0a1b2c3d4e"
QUANTS = ("F16", "Q4_K_M", "Q5_K_M", "MXFP4_MOE")

TEMPLATE = (
    "<|start|>system<|message|>You are ChatGPT, a large language model trained by OpenAI.\n"
    "Knowledge cutoff: 2024-06\nCurrent date: {{ currentDate }}\n\n"
    "Reasoning: {{ if .Think }}high{{ else }}medium{{ end }}\n\n"
    "# Valid channels: analysis, commentary, final. Channel must be included for every message.<|end|>"
    "{{- range .Messages }}<|start|>{{ .Role }}<|message|>{{ .Content }}<|end|>{{ end }}<|start|>assistant"
)


@dataclasses.dataclass
class Runs:
    root: Path
    training_dir: Path
    export_dir: Path

    @property
    def adapter_dir(self) -> Path:
        return self.training_dir / "adapter"

    def gguf(self, quant: str) -> Path:
        return self.export_dir / "gguf" / f"{self.export_dir.name}-{quant}.gguf"


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _safetensors(path: Path, tensors: dict[str, tuple[int, int]], seed: int) -> None:
    rng = random.Random(seed)
    header, blobs, offset = {"__metadata__": {"format": "pt"}}, [], 0
    for name, (rows, cols) in tensors.items():
        n = rows * cols * 2
        header[name] = {"dtype": "BF16", "shape": [rows, cols], "data_offsets": [offset, offset + n]}
        blobs.append(rng.randbytes(n))
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"".join(blobs))


def _tokenizer_files(folder: Path) -> None:
    (folder / "tokenizer.json").write_text(json.dumps({"version": "1.0", "model": {"type": "BPE", "vocab": {"a": 0}}}))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"eos_token": "<|return|>", "pad_token": "<|endoftext|>", "model_max_length": 131072}))
    (folder / "special_tokens_map.json").write_text(json.dumps({"eos_token": "<|return|>"}))
    (folder / "chat_template.jinja").write_text("{# Harmony chat template #}{% for m in messages %}{{ m.content }}{% endfor %}")


def build_training_run(root: Path, name: str = RUN) -> Path:
    run = root / "models" / name
    adapter = run / "adapter"
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": BASE,
        "r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "use_rslora": False, "bias": "none",
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
        "target_parameters": ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
    }, indent=2))
    _safetensors(adapter / "adapter_model.safetensors",
                 {f"base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight": (8, 256) for i in range(2)}
                 | {f"base_model.model.model.layers.{i}.mlp.experts.lora_B.weight": (512, 8) for i in range(2)}, seed=1)
    _tokenizer_files(adapter)
    (adapter / "README.md").write_text("---\nlibrary_name: peft\n---\n# Model Card for Model ID\n(PEFT's template)\n")
    ckpt = run / "checkpoints" / "checkpoint-5"
    ckpt.mkdir(parents=True)
    (ckpt / "optimizer.pt").write_bytes(b"\0" * 64)
    config = {
        "profile": "quick_test", "model": BASE, "dataset": DATASET, "max_steps": 30, "rank": 8, "alpha": 16,
        "learning_rate": 2e-4, "optimizer": "adamw_8bit", "batch_size": 2, "grad_accum": 8, "max_seq_len": 1024,
        "loss_on": "all_assistant", "output_dir": f"/home/alice/work/models/{name}", "seed": 3407,
    }
    (run / "train_config.json").write_text(json.dumps(config, indent=2))
    (run / "training_info.json").write_text(json.dumps({
        "run": name, "toolchain_version": "0.1.0", "backend": "unsloth",
        "base_model": {"id": BASE, "revision": BASE_REVISION},
        "dataset": {"id": DATASET, "hash": DATASET_HASH, "rows": 1000},
        "steps": 30,
        "loss": {"first": 2.314, "final": 0.612, "min": 0.588, "eval": 0.701, "history": [2.3, 1.2, 0.61]},
        "versions": {"torch": "2.11.0+cu130", "transformers": "5.17.0", "peft": "0.17.1", "unsloth": "2026.1.1"},
        "peak_vram_gb": 13.4, "tokens_per_s": 2150.0,
    }, indent=2))
    return run


def build_export(root: Path, name: str = RUN) -> Path:
    export = root / "exports" / name
    merged = export / "merged"
    merged.mkdir(parents=True)
    (merged / "config.json").write_text(json.dumps({"architectures": ["GptOssForCausalLM"], "model_type": "gpt_oss",
                                                    "hidden_size": 256, "num_hidden_layers": 2, "torch_dtype": "bfloat16"}))
    (merged / "generation_config.json").write_text(json.dumps({"eos_token_id": [200002, 199999, 200012]}))
    _safetensors(merged / "model-00001-of-00002.safetensors", {"model.embed_tokens.weight": (1024, 256)}, seed=2)
    _safetensors(merged / "model-00002-of-00002.safetensors", {"lm_head.weight": (512, 256)}, seed=3)
    (merged / "model.safetensors.index.json").write_text(json.dumps({
        "metadata": {"total_size": 786432},
        "weight_map": {"model.embed_tokens.weight": "model-00001-of-00002.safetensors",
                       "lm_head.weight": "model-00002-of-00002.safetensors"}}))
    _tokenizer_files(merged)
    gguf_dir = export / "gguf"
    gguf_dir.mkdir()
    rng = random.Random(f"gguf {name}")
    sizes = {"F16": 300_000, "Q4_K_M": 700_000, "Q5_K_M": 200_000, "MXFP4_MOE": 150_000}
    types = {
        "F16": ({"F16": 14, "F32": 11}, 0),
        "Q4_K_M": ({"Q4_K": 8, "Q6_K": 2, "Q5_0": 4, "F32": 11}, 4),
        "Q5_K_M": ({"Q5_K": 8, "Q6_K": 2, "Q5_1": 4, "F32": 11}, 4),
        "MXFP4_MOE": ({"MXFP4": 4, "Q8_0": 10, "F32": 11}, 0),
    }
    fidelity = {"F16": None, "Q4_K_M": (3.1e-3, 0.0112, 0.969), "Q5_K_M": (9.4e-4, 0.0041, 0.984),
                "MXFP4_MOE": (5.5e-3, 0.0198, 0.953)}
    artifacts = [{"path": "merged", "kind": "merged", "files": [
        {"path": f"merged/{p.name}", "sha256": _sha(p), "size": p.stat().st_size} for p in sorted(merged.iterdir())]}]
    for quant in QUANTS:
        gguf = gguf_dir / f"{name}-{quant}.gguf"
        gguf.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 25, 30) + rng.randbytes(sizes[quant]))
        modelfile = gguf_dir / f"{name}-{quant}.Modelfile"
        modelfile.write_text(
            "# Generated by gptoss modelfile\n"
            f"FROM ./{gguf.name}\n"
            f'TEMPLATE """{TEMPLATE}"""\n'
            "PARAMETER temperature 1.0\nPARAMETER top_p 1.0\nPARAMETER num_ctx 8192\n"
        )
        tensor_types, fallbacks = types[quant]
        fid = fidelity[quant]
        artifacts.append({
            "path": f"gguf/{gguf.name}", "kind": "gguf", "quant": quant, "sha256": _sha(gguf),
            "size": gguf.stat().st_size, "tensor_types": tensor_types, "fallbacks": fallbacks,
            "fidelity": None if fid is None else {"nmse": fid[0], "kl": fid[1], "top1": fid[2], "reference": "F16 GGUF"},
        })
        artifacts.append({"path": f"gguf/{modelfile.name}", "kind": "modelfile", "gguf": f"gguf/{gguf.name}",
                          "sha256": _sha(modelfile), "size": modelfile.stat().st_size})
    (export / "manifest.json").write_text(json.dumps({
        "run": name,
        "inputs": {"run": f"models/{name}", "base_model": BASE, "base_revision": BASE_REVISION,
                   "adapter_sha256": _sha(root / "models" / name / "adapter" / "adapter_model.safetensors")},
        "versions": {"gguf": "0.17.1", "llama_cpp_python": "0.3.36", "transformers": "5.17.0"},
        "llama_cpp": {"commit": LLAMA_CPP_COMMIT, "version": "0.3.36"},
        "artifacts": artifacts,
    }, indent=2))
    return export


def build_runs(root: Path, name: str = RUN) -> Runs:
    training = build_training_run(root, name)
    export = build_export(root, name)
    return Runs(root, training, export)
