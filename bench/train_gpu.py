"""GPU benchmark of `gptoss train`: Unsloth vs transformers+PEFT+bitsandbytes, same batch and length.

Runs on a CUDA machine, offline. For each depth in --layers it writes the
``gptoss fixture geometry-20b --layers N`` checkpoint (gpt-oss-20b widths), a synthetic dataset
whose rows are --seq tokens long, then runs ``gptoss train`` once per backend in its own process
(so peak memory is that backend's alone) and prints one JSON object:

- per run: median step time (first step excluded), tokens/s, peak VRAM (allocated and reserved),
  the expert-LoRA check (trainable expert parameters right after wrapping, non-zero expert LoRA B
  after training), first and last loss, or the error tail if the run failed;
- per depth: Unsloth / transformers ratios of step time and peak VRAM (goal: both <= 0.6);
- with two or more depths: peak VRAM per layer and an extrapolation to gpt-oss-20b's 24 layers,
  with the arithmetic spelled out;
- with ``--gpus 1,2``: each backend once per GPU count (``gptoss train --gpus N``, data-parallel under
  torchrun, the same per-GPU batch, so the effective batch grows with N), the peak VRAM of every GPU,
  and the N-GPU / 1-GPU ratios of tokens/s (goal >= 1.8 for 2) and step time.

    PYTHONPATH=$PWD:$PWD/.gpu_site GPTOSS_O200K_GZ=$PWD/.gpu_site/o200k_base.tiktoken.gz HF_HUB_OFFLINE=1 \
        python3 bench/train_gpu.py --layers 2,4 --steps 12 --out $OUT
    # 1 vs 2 GPUs (a machine with two):
    ... python3 bench/train_gpu.py --layers 4 --steps 12 --gpus 1,2 --backends unsloth,transformers --out $OUT
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FULL_LAYERS = 24
# gpt-oss-20b expert parameters per layer: 32 experts x (gate_up 2880x5760 + 5760 bias + down 2880x2880 + 2880 bias).
EXPERT_PARAMS_PER_LAYER = 32 * (2880 * 5760 + 5760 + 2880 * 2880 + 2880)
GIB = 1024**3
WORDS = ("the model thinks about every step of the answer carefully and checks each number twice before it "
         "writes a short final reply in the language the user asked for").split()


def write_dataset(path: Path, *, rows: int, seq: int, seed: int = 0) -> None:
    """Rows whose rendered length is just under ``seq`` tokens (measured with the real tokenizer)."""
    sys.path.insert(0, str(REPO))
    from gptoss.tokenizer import build_tokenizer

    tok = build_tokenizer()
    rng = random.Random(seed)
    with path.open("w", encoding="utf-8") as f:
        for i in range(rows):
            messages = [
                {"role": "system", "content": "reasoning language: English"},
                {"role": "user", "content": f"Question {i}: explain your reasoning."},
                {"role": "assistant", "thinking": "", "content": "Done."},
            ]
            words: list[str] = []
            step = 64
            while step:
                trial = words + [rng.choice(WORDS) for _ in range(step)]
                messages[2]["thinking"] = " ".join(trial)
                n = len(tok.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"])
                if n <= seq:
                    words = trial
                else:
                    step //= 2
            messages[2]["thinking"] = " ".join(words)
            f.write(json.dumps({"messages": messages}) + "\n")


def run_backend(backend: str, model: Path, data: Path, out: Path, args, gpus: int = 1) -> dict:
    run_name = f"bench-{backend}" + (f"-{gpus}gpu" if gpus > 1 else "")
    for old in (out / run_name, out / f"{run_name}.partial"):
        shutil.rmtree(old, ignore_errors=True)
    cmd = [
        sys.executable, "-m", "gptoss", "train", "--backend", backend, "--device", args.device, "--model", str(model),
        "--dataset", str(data), "--profile", "standard", "--max-steps", str(args.steps),
        "--batch-size", str(args.batch_size), "--grad-accum", "1", "--max-seq-length", str(args.seq),
        "--too-long", "truncate", "--learning-rate", "2e-4", "--lr-scheduler", "constant", "--warmup-steps", "0",
        "--save-steps", str(args.steps), "--keep-checkpoints", "1", "--tensorboard", "false",
        "--output-dir", str(out), "--run-name", run_name, "--logging-steps", "1", "--gpus", str(gpus),
    ]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, cwd=REPO, env=os.environ.copy())
    result: dict = {"backend": backend, "gpus": gpus, "command": " ".join(cmd),
                    "wall_seconds": round(time.perf_counter() - t0, 1)}
    (out / f"{run_name}.log").write_text(proc.stdout + proc.stderr)
    info_path = out / run_name / "training_info.json"
    if proc.returncode != 0 or not info_path.is_file():
        result.update(ok=False, returncode=proc.returncode, error_tail=(proc.stderr or proc.stdout)[-4000:])
        return result
    sys.path.insert(0, str(REPO))
    from gptoss.records import TrainingInfo

    record = TrainingInfo.load(info_path)
    info = record.to_dict()
    mem = info["peak_memory"]
    dp = record.data_parallel
    start, end = info["lora"]["trainable_at_start"], info["lora"]["trainable_at_end"]
    expert_params = sum(v["parameters"] for k, v in start.items() if k.startswith("experts."))
    result.update(
        ok=True,
        step_seconds_median=info["steady_state"].get("median_step_seconds"),
        tokens_per_second_median=info["steady_state"].get("median_tokens_per_second"),
        tokens_per_step=info["tokens"] // max(info["steps"], 1),
        peak_vram_allocated_gib=round(mem["cuda_allocated_bytes"] / GIB, 3) if mem.get("cuda_allocated_bytes") else None,
        peak_vram_reserved_gib=round(mem["cuda_reserved_bytes"] / GIB, 3) if mem.get("cuda_reserved_bytes") else None,
        gpu=mem.get("cuda_device"),
        effective_batch_size=dp.effective_batch_size if dp else None,
        peak_vram_allocated_gib_per_gpu=[round(m.cuda_allocated_bytes / GIB, 3) for m in dp.peak_memory_per_rank
                                         if m.cuda_allocated_bytes] if dp else None,
        expert_lora={
            "trainable_after_wrapping": {k: v["parameters"] for k, v in start.items()},
            "expert_parameters": expert_params,
            "lora_B_norm_after_training": {k: round(v["lora_B_norm"], 6) for k, v in end.items()},
            "experts_trained": info["lora"]["experts_trained"],
            "ok": expert_params > 0 and info["lora"]["experts_trained"],
        },
        target_modules=info["lora"]["target_modules"][:8] + (["..."] if len(info["lora"]["target_modules"]) > 8 else []),
        target_parameters=info["lora"]["target_parameters"],
        loss_first=info["loss"].get("first"),
        loss_last=info["loss"]["history"][-1][1] if info["loss"].get("history") else None,
        versions={k: v for k, v in info["versions"].items() if v},
    )
    return result


def extrapolate(results: list[dict]) -> dict:
    """Peak VRAM = fixed + per_layer x layers, fitted on the measured depths, taken to 24 layers."""
    out = {}
    for backend in sorted({r["backend"] for r in results}):
        points = sorted((r["layers"], r["peak_vram_allocated_gib"]) for r in results
                        if r["backend"] == backend and r.get("ok") and r.get("peak_vram_allocated_gib"))
        if len(points) < 2:
            continue
        (l1, m1), (l2, m2) = points[0], points[-1]
        per_layer = (m2 - m1) / (l2 - l1)
        fixed = m1 - per_layer * l1
        full = fixed + per_layer * FULL_LAYERS
        bf16_experts = EXPERT_PARAMS_PER_LAYER * 2 / GIB
        nf4_experts = EXPERT_PARAMS_PER_LAYER * (0.5 + 4 / 64) / GIB  # 4-bit codes + one fp32 absmax per 64
        out[backend] = {
            "measured": points,
            "per_layer_gib": round(per_layer, 3),
            "fixed_gib": round(fixed, 3),
            "full_depth_gib": round(full, 2),
            "reasoning": (
                f"peak(L) = {fixed:.2f} + {per_layer:.3f} x L GiB from L={l1},{l2}; at L=24: {full:.2f} GiB. "
                f"The fixture's experts are fused bf16 ({bf16_experts:.2f} GiB/layer), which bitsandbytes does not "
                f"quantise; Unsloth's pre-quantised unsloth/gpt-oss-20b-unsloth-bnb-4bit keeps them as 4-bit per-expert "
                f"modules (~{nf4_experts:.2f} GiB/layer), so with that checkpoint expect about "
                f"{full - FULL_LAYERS * (bf16_experts - nf4_experts):.2f} GiB at 24 layers."
            ),
            "full_depth_with_4bit_experts_gib": round(full - FULL_LAYERS * (bf16_experts - nf4_experts), 2),
            "fits_24_gib": full - FULL_LAYERS * (bf16_experts - nf4_experts) < 24,
        }
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", default="2", help="comma-separated depths of the geometry-20b fixture")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--backends", default="unsloth,transformers")
    parser.add_argument("--out", default=os.environ.get("OUT") or "/tmp/gptoss-bench-train/out",
                        help="where train_gpu.json and the run logs go (small files only)")
    parser.add_argument("--work", default="/tmp/gptoss-bench-train", help="fixtures, data and runs (GBs)")
    parser.add_argument("--timeout", type=int, default=480, help="seconds per training run")
    parser.add_argument("--fixture", default="geometry-20b", help="fixture kind (tiny: a CPU smoke test of this script)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--gpus", default="1", help="comma-separated GPU counts to run each backend with, e.g. 1,2")
    args = parser.parse_args()

    out = Path(args.out).absolute()
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work).absolute()
    fixtures = work / "fixtures"
    fixtures.mkdir(parents=True, exist_ok=True)
    data = work / f"bench_seq{args.seq}.jsonl"
    if not data.is_file():
        write_dataset(data, rows=args.rows, seq=args.seq)

    results = []
    for layers in [int(x) for x in args.layers.split(",")]:
        model = fixtures / f"{args.fixture}-L{layers}"
        if not (model / "config.json").is_file():
            subprocess.run([sys.executable, "-m", "gptoss", "fixture", args.fixture, "--layers", str(layers),
                            "--out", str(model), "--force"], check=True, cwd=REPO, stdout=sys.stderr)
        for gpus in [int(x) for x in args.gpus.split(",")]:
            for backend in args.backends.split(","):
                runs = work / f"runs-L{layers}"
                runs.mkdir(exist_ok=True)
                r = run_backend(backend, model, data, runs, args, gpus)
                name = f"bench-{backend}" + (f"-{gpus}gpu" if gpus > 1 else "")
                tag = f"L{layers}-{backend}" + (f"-{gpus}gpu" if gpus > 1 else "")
                shutil.copy(runs / f"{name}.log", out / f"train-{tag}.log")
                info = runs / name / "training_info.json"
                if info.is_file():
                    shutil.copy(info, out / f"training_info-{tag}.json")
                r["layers"] = layers
                results.append(r)
                print(json.dumps({k: r.get(k) for k in ("layers", "backend", "gpus", "ok", "step_seconds_median",
                                                        "tokens_per_second_median", "peak_vram_allocated_gib")}),
                      file=sys.stderr)

    # Results accumulate across invocations (one depth per call keeps each call short).
    store = work / "results.json"
    previous = json.loads(store.read_text()) if store.is_file() else []
    key = lambda r: (r["layers"], r["backend"], r.get("gpus", 1))  # noqa: E731
    fresh = {key(r) for r in results}
    results = [r for r in previous if key(r) not in fresh] + results
    results.sort(key=key)
    store.write_text(json.dumps(results, indent=1))

    ratios = {}
    for layers in sorted({r["layers"] for r in results}):
        by = {r["backend"]: r for r in results if r["layers"] == layers and r.get("ok") and r.get("gpus", 1) == 1}
        if "unsloth" in by and "transformers" in by and by["transformers"]["peak_vram_allocated_gib"]:
            u, t = by["unsloth"], by["transformers"]
            ratios[layers] = {
                "step_time": round(u["step_seconds_median"] / t["step_seconds_median"], 3),
                "peak_vram": round(u["peak_vram_allocated_gib"] / t["peak_vram_allocated_gib"], 3),
                "goal": "<= 0.6 each",
            }
    scaling = {}
    for r in results:
        one = next((o for o in results if o.get("ok") and o.get("gpus", 1) == 1 and o["layers"] == r["layers"]
                    and o["backend"] == r["backend"]), None)
        if r.get("ok") and r.get("gpus", 1) > 1 and one and one["tokens_per_second_median"]:
            scaling[f"L{r['layers']}-{r['backend']}-{r['gpus']}gpu"] = {
                "tokens_per_second": round(r["tokens_per_second_median"] / one["tokens_per_second_median"], 3),
                "step_time": round(r["step_seconds_median"] / one["step_seconds_median"], 3),
                "effective_batch": [one["effective_batch_size"], r["effective_batch_size"]],
                "goal": f"tokens/s >= {0.9 * r['gpus']:.1f}x",
            }
    report = {
        "benchmark": "gptoss train, geometry-20b fixture, Unsloth vs transformers+PEFT+bitsandbytes",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "settings": {"batch_size": args.batch_size, "grad_accum": 1, "seq": args.seq, "steps": args.steps, "rows": args.rows},
        "results": results,
        "ratios_unsloth_over_transformers": ratios,
        "scaling_over_one_gpu": scaling,
        "extrapolation_24_layers": extrapolate(results),
    }
    text = json.dumps(report, indent=2)
    (out / "train_gpu.json").write_text(text + "\n")
    print(text)
    return 0 if results and all(r.get("ok") for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
