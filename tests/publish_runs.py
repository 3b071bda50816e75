"""Realistic run folders for the publish tests: what `gptoss train` and `gptoss export` write.

Weights are small random tensors (the publish stage never loads them), but the records are built
with the writers' own dataclasses (gptoss/records.py: TrainingInfo, MergeInfo, Manifest), the
``train_config.json`` from the real TrainConfig and the Modelfiles from modelfiles.render. The
figures are those of a GPU run, for the model card. tests/test_integration_publish.py runs the real
stages and checks these records have the same keys, so a change in a writer shows up there.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import struct
from pathlib import Path

from gptoss.records import DataInfo, GGUFArtifact, Manifest, MergedFolder, MergeInfo, TrainingInfo

RUN = "gpt-oss-20b_quick_test_r8_20250101-120000"
BASE = "openai/gpt-oss-20b"
BASE_REVISION = "6cee5e81ee83917806bbde320786a8fb61efebee"
DATASET = "HuggingFaceH4/Multilingual-Thinking"
DATASET_HASH = hashlib.sha256(b"multilingual-thinking rows").hexdigest()
LLAMA_CPP_COMMIT = "4e6d3a5b8f0c1d2e3f4a5b6c7d8e9f0a1b2c3d4e"
QUANTS = ("F16", "Q4_K_M", "Q5_K_M", "MXFP4_MOE")  # llama.cpp labels: file suffixes and Hub tags


def harmony_template() -> str:
    """The TEMPLATE of the Modelfiles below (the Modelfiles stage's Harmony template)."""
    from gptoss.modelfiles import harmony_template

    return harmony_template()


TEMPLATE = harmony_template()


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


def _digest(path: Path) -> dict:
    """exporters.records.file_digest: size, mtime_ns, sha256."""
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}


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
    (folder / "chat_template.jinja").write_text("{# Harmony chat template #}{% for m in messages %}{{ m.content }}{% endfor %}")


def build_training_run(root: Path, name: str = RUN) -> Path:
    from gptoss.training.config import TrainConfig

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
    ckpt = run / "checkpoints" / "step-000005"
    ckpt.mkdir(parents=True)
    (ckpt / "optimizer.pt").write_bytes(b"\0" * 64)
    config = TrainConfig(
        profile="quick_test", model=BASE, backend="unsloth", device="cuda", dataset=DATASET, max_steps=30,
        save_steps=10, warmup_steps=3, output_dir="/home/alice/work/models", run_name=name,
    ).to_dict()
    (run / "train_config.json").write_text(json.dumps(config, indent=2))
    start = {"attention": {"parameters": 28672, "tensors": 16, "lora_B_norm": 0.0},
             "experts.down_proj": {"parameters": 32768, "tensors": 4, "lora_B_norm": 0.0},
             "experts.gate_up_proj": {"parameters": 49152, "tensors": 4, "lora_B_norm": 0.0}}
    end = {k: {**v, "lora_B_norm": 0.012} for k, v in start.items()}
    TrainingInfo(
        run=name, base_model=BASE, base_model_revision=BASE_REVISION,
        backend="unsloth", device="cuda", profile="quick_test", adapter="adapter",
        started_at="2025-01-01T12:00:00+00:00", finished_at="2025-01-01T12:09:30+00:00",
        steps=30, max_steps=30, resumed_from_step=None, tokens=491520, supervised_tokens=201000,
        train_seconds=228.6, seconds_per_step=7.62, tokens_per_second=2150.0,
        steady_state={"steps": 29, "median_step_seconds": 7.5, "median_tokens_per_second": 2184.5},
        model_load_seconds=41.2,
        loss={"first": 2.314, "min": 0.588, "final": 0.612, "final_window_steps": 3, "target": 0.5,
                 "verdict": "ok", "note": "final loss 0.612 is near the target 0.5",
                 "history": [[1, 2.314], [15, 1.2], [30, 0.61]],
                 "eval": {"final": 0.701, "min": 0.69, "history": [[10, 0.9], [30, 0.701]]}},
        peak_memory={"cpu_rss_bytes": 9_812_000_000, "cuda_allocated_bytes": 13_400_000_000,
                        "cuda_reserved_bytes": 14_100_000_000, "cuda_device": "NVIDIA H100 80GB HBM3"},
        lora={"rank": 8, "alpha": 16, "dropout": 0.0, "rslora": False, "targets": "all",
                 "target_modules": ["k_proj", "o_proj", "q_proj", "v_proj"],
                 "target_parameters": ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
                 "trainable_at_start": start, "trainable_at_end": end, "experts_trained": True},
        dataset=DataInfo(id=DATASET, path=None, format="hub", split="train",
                         revision="0d3f0c1a2b3c4d5e6f708192a3b4c5d6e7f80912", content_sha256=DATASET_HASH,
                         file_sha256=None,
                         rows={"read": 1000, "bad": 0, "too_long_dropped": 0, "truncated": 0,
                               "no_supervised_tokens": 0, "kept": 1000},
                         train_examples=1000, eval_examples=0, train_tokens=512000,
                         train_supervised_tokens=210000),
        versions={"python": "3.12.3", "gptoss-toolchain": "0.1.0", "torch": "2.11.0+cu130",
                     "transformers": "5.17.0", "peft": "0.17.1", "unsloth": "2026.1.1", "trl": None},
        config=config,
    ).write(run)
    return run


def build_export(root: Path, name: str = RUN) -> Path:
    from gptoss.modelfiles import render

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
    MergeInfo(inputs={"adapter": {"path": f"/home/alice/work/models/{name}/adapter"}},
              identity=hashlib.sha256(b"merge").hexdigest()).write(merged)
    gguf_dir = export / "gguf"
    gguf_dir.mkdir()
    rng = random.Random(f"gguf {name}")
    sizes = {"F16": 300_000, "Q4_K_M": 700_000, "Q5_K_M": 200_000, "MXFP4_MOE": 150_000}
    nominal = {"F16": "F16", "Q4_K_M": "Q4_K", "Q5_K_M": "Q5_K", "MXFP4_MOE": "MXFP4"}
    types = {
        "F16": ({"F16": 14, "F32": 11}, 0),
        "Q4_K_M": ({"Q4_K": 8, "Q6_K": 2, "Q5_0": 4, "F32": 11}, 4),
        "Q5_K_M": ({"Q5_K": 8, "Q6_K": 2, "Q5_1": 4, "F32": 11}, 4),
        "MXFP4_MOE": ({"MXFP4": 4, "Q8_0": 10, "F32": 11}, 0),
    }
    fidelity = {"F16": (2.1e-6, 1.3e-6, 1.0), "Q4_K_M": (3.1e-3, 0.0112, 0.969), "Q5_K_M": (9.4e-4, 0.0041, 0.984),
                "MXFP4_MOE": (5.5e-3, 0.0198, 0.953)}
    prompts_sha256 = hashlib.sha256(b"fidelity prompts").hexdigest()
    artifacts = []
    for quant in QUANTS:
        gguf = gguf_dir / f"{name}-{quant}.gguf"
        gguf.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 25, 30) + rng.randbytes(sizes[quant]))
        modelfile = gguf_dir / f"{name}-{quant}.Modelfile"
        modelfile.write_text(render(from_line=f"./{gguf.name}", system=None, num_ctx=8192))
        tensor_types, fallbacks = types[quant]
        nmse, kl, top1 = fidelity[quant]
        reference = "merged HF model (transformers, float32)" if quant == "F16" else f"{name}-F16.gguf"
        g, m = _digest(gguf), _digest(modelfile)
        artifacts.append(GGUFArtifact(
            kind="gguf", path=f"gguf/{gguf.name}", quant=quant.lower(), label=quant,
            sha256=g["sha256"], size=g["size"], nominal_type=nominal[quant], tensor_count=25,
            tensor_types=tensor_types, tensor_type_bytes={t: 1000 * n for t, n in tensor_types.items()},
            fallbacks=fallbacks, fallback_tensors=[f"blk.{i}.ffn_down_exps.weight" for i in range(fallbacks)],
            quantizable_weights=14, off_nominal_weights=fallbacks + 2,
            off_nominal_weight_types={"output.weight": "Q6_K"}, chat_template=True,
            fidelity={"reference": reference, "nmse": nmse, "mean_kl": kl, "top1_agreement": top1,
                         "max_abs_diff": 0.5, "positions": 300, "median_position_nmse": nmse / 2,
                         "top1_agreement_decisive": top1, "decisive_positions": 290,
                         "thresholds": {"max_nmse": 0.15, "max_kl": 0.05, "min_top1": 0.0}, "passed": True,
                         "prompts_sha256": prompts_sha256},
            tool="convert_hf_to_gguf.py" if quant == "F16" else "llama-quantize", elapsed_s=12.5,
            peak_rss_bytes=2_000_000_000, skipped=False,
            modelfile=f"gguf/{modelfile.name}", modelfile_sha256=m["sha256"], modelfile_size=m["size"],
        ))
    adapter_files = {p.name: _digest(p) for p in sorted((root / "models" / name / "adapter").iterdir()) if p.is_file()}
    Manifest(
        run=name,
        created="2025-01-01T12:30:00+00:00",
        inputs={
            "run": str(root / "models" / name),
            "training_info": _digest(root / "models" / name / "training_info.json"),
            "base": {"id": BASE, "path": f"/home/alice/.cache/huggingface/hub/models--openai--gpt-oss-20b/snapshots/{BASE_REVISION}",
                     "revision": BASE_REVISION, "quantization": "mxfp4", "layout": "fused", "files": {}},
            "merge_into": "base",  # the MXFP4 release merges into itself
            "trained_on": {"id": BASE, "revision": BASE_REVISION, "layout": "fused", "quantization": "mxfp4"},
            "adapter": {"path": str(root / "models" / name / "adapter"), "files": adapter_files},
            "dtype": "BF16",
            "max_shard_bytes": 5_000_000_000,
        },
        merged=MergedFolder(path="merged", identity={"merge_identity": hashlib.sha256(b"merge").hexdigest()},
                            files=[{"path": f"merged/{p.name}", **{k: v for k, v in _digest(p).items() if k != "mtime_ns"}}
                                   for p in sorted(merged.iterdir())],
                            merge={"skipped": False, "elapsed_s": 310.2, "peak_rss_bytes": 6_100_000_000}),
        tools={"llama_cpp_commit": LLAMA_CPP_COMMIT, "llama_cpp_python": "0.3.36",
                  "converter": "convert_hf_to_gguf.py (vendored in llama-cpp-python sdist)",
                  "python": "3.12.3", "gptoss-toolchain": "0.1.0", "torch": "2.11.0+cu130", "transformers": "5.17.0"},
        commands={"export": f"gptoss export --run models/{name}", "steps": []},
        fidelity_prompts={"count": 4, "sha256": prompts_sha256},
        artifacts=artifacts,
    ).write(export)
    return export


def build_runs(root: Path, name: str = RUN) -> Runs:
    training = build_training_run(root, name)
    export = build_export(root, name)
    return Runs(root, training, export)
