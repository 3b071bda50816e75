"""GPU evidence for Unsloth's split bnb-4bit gpt-oss (issue 11 item 5): train, merge, compare logits.

Runs on one CUDA machine, offline, in one call; every stage adds to ``$OUT/unsloth_split_gpu.json``
(written again after each stage, so a call killed part-way still returns what finished) and its
logs to ``$OUT/logs.tar.gz``. The first depth in --layers is the one merged and compared.

1. ``gptoss fixture geometry-20b --layers N --layouts unsloth-bnb-4bit`` for N in --layers (the
   other depths in the background): the bf16 original and, beside it, Unsloth's split per-expert
   NF4 layout, gpt-oss-20b widths.
2. ``gptoss train --backend unsloth`` on each split fixture, one after another with nothing else
   running (seq, batch, accumulation 1, --steps; bench/train_gpu.py's synthetic dataset and
   ``run_backend``): median step time (first excluded), tokens/s, peak VRAM, the expert-LoRA
   groups of training_info.json, and the adapter's keys (per-expert
   ``...experts.gate_up_projs.<i>.lora_A.weight``, as Unsloth saves them).
3. ``gptoss merge --run`` of that run into both bases (default: the 16-bit original;
   ``--merge-into dequantized``: the 4-bit base dequantized), on the CPU (CUDA hidden).
4. Logits on exporters/fidelity.py's fixed Harmony prompts: Unsloth's own in-memory model
   (FastLanguageModel.from_pretrained of the split fixture, the adapter through PeftModel,
   FastLanguageModel.for_inference) against transformers on each merged folder (bf16, then the
   same weights in float32), and the base-vs-base gap (Unsloth 4-bit without adapter vs the bf16
   original) so the reader sees which part is quantization: max |dlogit|, NMSE, top-1.
5. Unsloth's ``save_pretrained_merged(dir, tokenizer, save_method="merged_16bit")``, as called and
   then pointed at the fixture's 16-bit original (as Unsloth maps a Hub 4-bit id to its 16-bit
   repo), compared tensor by tensor to our merge; an error is recorded, not raised.
6. Peak VRAM per layer from the depths and its extrapolation to 24 layers, arithmetic spelled out.

Unsloth patches transformers when imported, so Unsloth's model and the transformers reference run
in separate child processes of this script (``--child unsloth|hf``), side by side with the merges.

    PYTHONPATH=$PWD:$PWD/.gpu_site GPTOSS_O200K_GZ=$PWD/.gpu_site/o200k_base.tiktoken.gz HF_HUB_OFFLINE=1 \\
        python3 bench/unsloth_split_gpu.py --layers 2,1 --steps 12 --dataset bench-out/bench_seq1024.jsonl --out $OUT
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_gpu import FULL_LAYERS, GIB, REPO, run_backend, write_dataset  # noqa: E402

LAYOUT = "unsloth-bnb-4bit"
SPLIT_LORA_KEY = re.compile(r"\.experts\.(gate_up_projs|down_projs)\.(\d+)\.lora_(A|B)\.weight$")
GOAL_GB = 16  # full depth, seq 1024, batch 2: fits a 24 GB RTX 3090 with room to spare
T0 = time.monotonic()


def remaining(args) -> float:
    return args.deadline - (time.monotonic() - T0)


def tail(text: str, n: int = 3000) -> str:
    return text[-n:] if text else ""


# ---------------------------------------------------------------------------------------------
# Logits (children)

def prompt_tokens() -> list[list[int]]:
    sys.path.insert(0, str(REPO))
    from gptoss.exporters import fidelity

    return fidelity.prompt_tokens()


def logits_of(model, tokens, device: str):
    """float32 logits at every position of every prompt, stacked (positions, vocab)."""
    import numpy as np
    import torch

    out = []
    with torch.no_grad():
        for ids in tokens:
            x = torch.tensor([ids], device=device)
            logits = model(input_ids=x, attention_mask=torch.ones_like(x), use_cache=False).logits
            if logits is None or logits.shape[-2] != len(ids):
                raise RuntimeError(f"the model returned logits of shape {None if logits is None else tuple(logits.shape)} "
                                   f"for {len(ids)} tokens")
            out.append(logits[0].float().cpu().numpy())
    return np.concatenate(out)


def child_unsloth(args) -> int:
    """Unsloth's model: base 4-bit (+ adapter), logits; then its own save_pretrained_merged."""
    os.environ.setdefault("UNSLOTH_RETURN_LOGITS", "1")
    import unsloth  # noqa: F401  (first: patches transformers)
    import numpy as np
    import torch
    from unsloth import FastLanguageModel

    work = Path(args.work)
    result_path = work / "unsloth_child.json"
    result: dict = {}
    result_path.unlink(missing_ok=True)

    def save():
        result_path.write_text(json.dumps(result, indent=1))

    tokens = prompt_tokens()
    split, adapter, original = Path(args.split), Path(args.adapter), Path(args.original)
    t = time.perf_counter()
    model, tokenizer = FastLanguageModel.from_pretrained(model_name=str(split), max_seq_length=args.seq, dtype=None,
                                                         load_in_4bit=True)
    result["load_seconds"] = round(time.perf_counter() - t, 1)
    result["modules"] = {n: type(m).__name__ for n, m in model.named_modules()
                         if re.search(r"layers\.0\.mlp\.(experts|router|experts\.gate_up_projs\.0|router\.linear)$", n)}
    FastLanguageModel.for_inference(model)
    np.save(work / "logits-unsloth-base.npy", logits_of(model, tokens, "cuda"))
    result["base_logits"] = True
    save()

    from peft import PeftModel

    model = PeftModel.from_pretrained(model, str(adapter))
    try:  # what Unsloth's own loader does after attaching an adapter (unsloth/models/loader.py)
        from unsloth_zoo.temporary_patches.moe_grouped_modulelist import auto_enable_grouped_moe

        auto_enable_grouped_moe(model)
    except Exception as e:
        result["auto_enable_grouped_moe"] = f"{type(e).__name__}: {e}"[:500]
    from unsloth.save import patch_saving_functions

    model = patch_saving_functions(model, vision=True)  # as FastBaseModel.post_patch_model: save_pretrained_merged
    FastLanguageModel.for_inference(model)
    names = [n for n, _ in model.named_modules()]
    result["lora_modules_on_experts"] = sum(1 for n in names if re.search(r"\.experts\.(gate_up|down)_projs\.\d+\.lora_A$", n))
    np.save(work / "logits-unsloth-lora.npy", logits_of(model, tokens, "cuda"))
    result["lora_logits"] = True
    result["peak_vram_allocated_gib"] = round(torch.cuda.max_memory_allocated() / GIB, 3)
    save()

    # 5. Unsloth's own merge: as called, then pointed at the 16-bit original.
    attempts = [("as_called", None), ("into_original", str(original))]
    for name, name_or_path in attempts:
        out = work / f"unsloth-merged-{name}"
        shutil.rmtree(out, ignore_errors=True)
        entry: dict = {"config._name_or_path": name_or_path or model.config._name_or_path}
        if name_or_path:
            model.config._name_or_path = name_or_path
        t = time.perf_counter()
        try:
            model.save_pretrained_merged(str(out), tokenizer, save_method="merged_16bit")
            files = sorted(p.name for p in out.glob("*.safetensors")) if out.is_dir() else []
            entry.update(ok=bool(files), files=files, dir=str(out))
            if not files:
                entry["error"] = "save_pretrained_merged returned without writing safetensors"
        except BaseException as e:  # record what Unsloth says, whatever it raises
            entry.update(ok=False, error=f"{type(e).__name__}: {e}"[:3000], traceback=tail(traceback.format_exc(), 3000))
        entry["seconds"] = round(time.perf_counter() - t, 1)
        result.setdefault("save_pretrained_merged", {})[name] = entry
        save()
    return 0


def child_hf(args) -> int:
    """transformers (no Unsloth) on fused folders: bf16 logits, then the same weights in float32."""
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    work = Path(args.work)
    tokens = prompt_tokens()
    done = {}
    for item in args.models.split(","):
        name, path = item.split("=", 1)
        t = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, device_map={"": args.device}).eval()
        np.save(work / f"logits-{name}-bf16.npy", logits_of(model, tokens, args.device))
        model.float()
        np.save(work / f"logits-{name}-fp32.npy", logits_of(model, tokens, args.device))
        done[name] = {"path": path, "seconds": round(time.perf_counter() - t, 1),
                      "attn_implementation": getattr(model.config, "_attn_implementation", None)}
        del model
        if args.device == "cuda":
            torch.cuda.empty_cache()
        (work / "hf_child.json").write_text(json.dumps(done, indent=1))
    return 0


# ---------------------------------------------------------------------------------------------
# Parent: stages

class Bench:
    def __init__(self, args):
        self.args = args
        self.out = Path(args.out).absolute()
        self.work = Path(args.work).absolute()
        self.out.mkdir(parents=True, exist_ok=True)
        self.work.mkdir(parents=True, exist_ok=True)
        self.logs = self.work / "logs"
        self.logs.mkdir(exist_ok=True)
        self.report: dict = {
            "benchmark": "Unsloth split bnb-4bit gpt-oss: gptoss train --backend unsloth, gptoss merge, logits vs Unsloth",
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "settings": {"layers": args.layers, "steps": args.steps, "batch_size": args.batch_size, "grad_accum": 1,
                         "seq": args.seq, "rows": args.rows},
            "stages": {},
        }

    def save(self) -> None:
        self.report["elapsed_seconds"] = round(time.monotonic() - T0, 1)
        (self.out / "unsloth_split_gpu.json").write_text(json.dumps(self.report, indent=2) + "\n")
        with tarfile.open(self.out / "logs.tar.gz", "w:gz") as tar:
            tar.add(self.logs, arcname="logs")

    def stage(self, name: str, fn, *a, need: float = 30.0):
        """Run one stage: its result (or error) goes into the report, which is saved right after."""
        if remaining(self.args) < need:
            self.report["stages"][name] = {"ok": False, "skipped": f"{remaining(self.args):.0f} s left, needs ~{need:.0f} s"}
            self.save()
            return None
        t = time.monotonic()
        try:
            value = fn(*a)
            entry = {"ok": True, **(value if isinstance(value, dict) else {})}
        except Exception as e:
            value = None
            entry = {"ok": False, "error": f"{type(e).__name__}: {e}"[:4000], "traceback": tail(traceback.format_exc())}
        entry["seconds"] = round(time.monotonic() - t, 1)
        self.report["stages"][name] = entry
        print(json.dumps({"stage": name, "ok": entry["ok"], "seconds": entry["seconds"],
                          "error": entry.get("error", "")[:300]}), file=sys.stderr, flush=True)
        self.save()
        return value if entry["ok"] else None

    def run(self, cmd: list[str], log: str, *, timeout: float, env: dict | None = None) -> subprocess.CompletedProcess:
        timeout = max(1.0, min(timeout, remaining(self.args) - 5))
        with open(self.logs / log, "w") as f:
            proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO, timeout=timeout,
                                  env={**os.environ, **(env or {})})
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd[:6])} ... exited {proc.returncode}: {tail((self.logs / log).read_text(), 2500)}")
        return proc

    def popen(self, cmd: list[str], log: str, env: dict | None = None) -> subprocess.Popen:
        f = open(self.logs / log, "w")
        return subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO, env={**os.environ, **(env or {})})

    def wait(self, proc: subprocess.Popen, log: str, timeout: float) -> dict:
        t = time.monotonic()
        try:
            rc = proc.wait(timeout=max(1.0, min(timeout, remaining(self.args) - 5)))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise RuntimeError(f"{log}: still running after {timeout:.0f} s; killed")
        if rc != 0:
            raise RuntimeError(f"{log}: exited {rc}: {tail((self.logs / log).read_text(), 2500)}")
        return {"waited_seconds": round(time.monotonic() - t, 1)}

    # -- 1. fixtures ------------------------------------------------------------------------
    def fixture_cmd(self, layers: int) -> list[str]:
        return [sys.executable, "-m", "gptoss", "fixture", self.args.fixture, "--layers", str(layers),
                "--out", str(self.original(layers)), "--layouts", LAYOUT, "--force"]

    def original(self, layers: int) -> Path:
        return self.work / "fixtures" / f"{self.args.fixture}-L{layers}"

    def split(self, layers: int) -> Path:
        return self.work / "fixtures" / f"{self.args.fixture}-L{layers}-{LAYOUT}"

    def describe_fixture(self, layers: int) -> dict:
        from gptoss import layouts

        split = self.split(layers)
        size = lambda d: round(sum(p.stat().st_size for p in d.glob("*.safetensors")) / GIB, 3)  # noqa: E731
        return {"layers": layers, "original": str(self.original(layers)), "split": str(split),
                "original_gib": size(self.original(layers)), "split_gib": size(split),
                "split_layout": layouts.describe(split),
                "record": {k: v for k, v in json.loads((split / "fixture.json").read_text()).items() if k != "geometry"}}

    def build_fixture(self, layers: int) -> dict:
        self.run(self.fixture_cmd(layers), f"fixture-L{layers}.log", timeout=self.args.fixture_timeout)
        return self.describe_fixture(layers)

    # -- 2. training ------------------------------------------------------------------------
    def train(self, layers: int, data: Path) -> dict:
        runs = self.work / f"runs-L{layers}"
        runs.mkdir(exist_ok=True)
        ns = argparse.Namespace(device="cuda", steps=self.args.steps, batch_size=self.args.batch_size, seq=self.args.seq,
                                timeout=max(30, min(self.args.train_timeout, remaining(self.args) - 10)))
        r = run_backend("unsloth", self.split(layers), data, runs, ns)
        shutil.copy(runs / "bench-unsloth.log", self.logs / f"train-L{layers}.log")
        run_dir = runs / "bench-unsloth"
        if (run_dir / "training_info.json").is_file():
            shutil.copy(run_dir / "training_info.json", self.logs / f"training_info-L{layers}.json")
        r["layers"] = layers
        if not r.get("ok"):
            raise RuntimeError(f"training L{layers} failed (rc {r.get('returncode')}): {r.get('error_tail', '')[-2500:]}")
        info = json.loads((run_dir / "training_info.json").read_text())
        r["base"] = {k: info.get(k) for k in ("base_model", "base_layout", "base_quantization", "merge_base")}
        r["run_dir"] = str(run_dir)
        r["adapter_keys"] = adapter_keys(run_dir / "adapter")
        return r

    # -- 3. merges (CPU) ---------------------------------------------------------------------
    def merge_cmd(self, run_dir: Path, into: str) -> list[str]:
        cmd = [sys.executable, "-m", "gptoss", "merge", "--run", str(run_dir), "--out", str(self.work / f"merged-{into}"),
               "--force"]
        return cmd + (["--merge-into", "dequantized"] if into == "dequantized" else [])

    def merge_record(self, into: str, wall: float) -> dict:
        rec = json.loads((self.work / f"merged-{into}" / "merge_info.json").read_text())
        return {"wall_seconds_at_most": round(wall, 1), "merge_into": rec["merge_into"], "base": rec["inputs"]["base"]["path"],
                "base_quantization": rec["inputs"]["base"]["quantization"], "trained_on": rec["inputs"]["trained_on"],
                "merged_tensors": rec["merged_tensors"], "deltas_by_kind": rec["lora"]["deltas_by_kind"],
                "elapsed_s": rec["elapsed_s"], "peak_rss_gib": round((rec.get("peak_rss_bytes") or 0) / GIB, 2)}


def adapter_keys(adapter: Path) -> dict:
    """What the adapter holds, by kind of key; per-expert keys as Unsloth/PEFT save them."""
    from safetensors import safe_open

    with safe_open(str(adapter / "adapter_model.safetensors"), framework="pt") as f:
        keys = sorted(f.keys())
        shapes = {k: list(f.get_slice(k).get_shape()) for k in keys}
    per_expert = [k for k in keys if SPLIT_LORA_KEY.search(k)]
    experts = {(m[1], int(m[2])) for m in map(SPLIT_LORA_KEY.search, per_expert)}
    fused = [k for k in keys if ".experts.lora_" in k or ".experts.base_layer" in k]
    example = sorted(per_expert, key=lambda k: (len(k), k))[:4]
    config = json.loads((adapter / "adapter_config.json").read_text())
    tm = config.get("target_modules")
    return {
        "total": len(keys),
        "per_expert": len(per_expert),
        "per_expert_lists": sorted({e[0] for e in experts}),
        "experts_per_list": len({e[1] for e in experts}),
        "fused_expert_keys": len(fused),
        "attention": sum(1 for k in keys if ".self_attn." in k),
        "examples": {k: shapes[k] for k in example},
        "adapter_config": {"r": config.get("r"), "lora_alpha": config.get("lora_alpha"),
                           "target_modules": (sorted(tm)[:10] + (["..."] if len(tm) > 10 else [])) if isinstance(tm, list) else tm,
                           "target_parameters": config.get("target_parameters")},
    }


def compare_logits(work: Path, pairs: dict[str, tuple[str, str]]) -> dict:
    import numpy as np

    sys.path.insert(0, str(REPO))
    from gptoss.exporters import fidelity

    lengths = [len(t) for t in prompt_tokens()]
    cuts = np.cumsum(lengths)[:-1]
    out = {}
    for label, (ref, test) in pairs.items():
        rp, tp = work / f"logits-{ref}.npy", work / f"logits-{test}.npy"
        if not (rp.is_file() and tp.is_file()):
            out[label] = {"missing": [p.name for p in (rp, tp) if not p.is_file()]}
            continue
        r, t = np.load(rp), np.load(tp)
        f = fidelity.compare(np.split(r, cuts), np.split(t, cuts))
        out[label] = {"reference": ref, "test": test, "max_abs_dlogit": round(f.max_abs_diff, 5), "nmse": float(f"{f.nmse:.4g}"),
                      "top1": round(f.top1_agreement, 4), "top1_decisive": round(f.top1_agreement_decisive, 4),
                      "decisive_positions": f.decisive_positions, "positions": f.positions,
                      "median_position_nmse": float(f"{f.median_position_nmse:.4g}"),
                      "reference_logit_std": round(float(r.std()), 4)}
    return out


def compare_tensors(theirs: Path, ours: Path, base: Path) -> dict:
    """Name sets and max |theirs - ours| per tensor; the LoRA delta (ours - base) for scale."""
    import torch
    from safetensors import safe_open

    def index(d: Path) -> dict[str, Path]:
        m = {}
        for shard in sorted(d.glob("*.safetensors")):
            with safe_open(str(shard), framework="pt") as f:
                m.update({k: shard for k in f.keys()})
        return m

    a, b, c = index(theirs), index(ours), index(base)
    common = sorted(set(a) & set(b))
    rows, worst = {}, 0.0
    for k in common:
        with safe_open(str(a[k]), framework="pt") as fa, safe_open(str(b[k]), framework="pt") as fb:
            ta, tb = fa.get_tensor(k), fb.get_tensor(k)
        if ta.shape != tb.shape:
            rows[k] = {"shape_theirs": list(ta.shape), "shape_ours": list(tb.shape)}
            continue
        diff = float((ta.float() - tb.float()).abs().max())
        row = {"max_abs_diff": diff, "dtype_theirs": str(ta.dtype).removeprefix("torch."),
               "dtype_ours": str(tb.dtype).removeprefix("torch.")}
        if k in c:
            with safe_open(str(c[k]), framework="pt") as fc:
                row["max_abs_lora_delta_ours"] = float((tb.float() - fc.get_tensor(k).float()).abs().max())
        rows[k] = row
        worst = max(worst, diff)
        del ta, tb
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    changed = {k: v for k, v in rows.items() if v.get("max_abs_lora_delta_ours", 0) > 0}
    return {
        "theirs": str(theirs), "ours": str(ours),
        "only_theirs": sorted(set(a) - set(b)), "only_ours": sorted(set(b) - set(a)),
        "common": len(common), "shape_mismatches": [k for k, v in rows.items() if "shape_theirs" in v],
        "max_abs_diff": worst,
        "tensors_equal": sum(1 for v in rows.values() if v.get("max_abs_diff") == 0.0),
        "lora_changed_tensors": len(changed),
        "worst": dict(sorted(rows.items(), key=lambda kv: -kv[1].get("max_abs_diff", 0))[:8]),
    }


def extrapolate(trains: list[dict]) -> dict:
    """peak(L) = fixed + per_layer x L fitted on the measured depths, taken to 24 layers."""
    out = {}
    for field in ("peak_vram_allocated_gib", "peak_vram_reserved_gib"):
        points = sorted((r["layers"], r[field]) for r in trains if r.get(field))
        if len(points) < 2:
            continue
        (l1, m1), (l2, m2) = points[0], points[-1]
        per_layer = (m2 - m1) / (l2 - l1)
        fixed = m1 - per_layer * l1
        full = fixed + per_layer * FULL_LAYERS
        out[field.removeprefix("peak_vram_").removesuffix("_gib")] = {
            "measured": points, "per_layer_gib": round(per_layer, 3), "fixed_gib": round(fixed, 3),
            "full_depth_gib": round(full, 2), "full_depth_gb": round(full * GIB / 1e9, 2),
            "goal_gb": GOAL_GB, "meets_goal": full * GIB / 1e9 <= GOAL_GB,
            "reasoning": (f"per layer = ({m2:.3f} - {m1:.3f}) / ({l2} - {l1}) = {per_layer:.3f} GiB; fixed = {m1:.3f} - "
                          f"{per_layer:.3f} x {l1} = {fixed:.3f} GiB; at 24 layers: {fixed:.3f} + 24 x {per_layer:.3f} = "
                          f"{full:.2f} GiB = {full * GIB / 1e9:.2f} GB (goal <= {GOAL_GB} GB)"),
        }
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", default="2,1", help="depths of the geometry-20b fixture; the first is merged and compared")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--fixture", default="geometry-20b")
    parser.add_argument("--dataset", help="a dataset write_dataset wrote before (default: written here)")
    parser.add_argument("--out", default=os.environ.get("OUT") or "/tmp/gptoss-bench-split/out",
                        help="unsloth_split_gpu.json and logs.tar.gz (small files only)")
    parser.add_argument("--work", default="/tmp/gptoss-bench-split", help="fixtures, runs, merges, logits (tens of GB)")
    parser.add_argument("--deadline", type=float, default=560, help="seconds for the whole call; stages that would not fit are skipped")
    parser.add_argument("--fixture-timeout", type=float, default=240)
    parser.add_argument("--train-timeout", type=float, default=240)
    parser.add_argument("--child", choices=("unsloth", "hf"), help=argparse.SUPPRESS)
    parser.add_argument("--split", help=argparse.SUPPRESS)
    parser.add_argument("--adapter", help=argparse.SUPPRESS)
    parser.add_argument("--original", help=argparse.SUPPRESS)
    parser.add_argument("--models", help=argparse.SUPPRESS)
    parser.add_argument("--device", default="cuda", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child == "unsloth":
        return child_unsloth(args)
    if args.child == "hf":
        return child_hf(args)

    b = Bench(args)
    depths = [int(x) for x in args.layers.split(",")]
    deep = depths[0]
    me = [sys.executable, str(Path(__file__).resolve())]
    cpu_only = {"CUDA_VISIBLE_DEVICES": ""}
    stages = b.report["stages"]
    ok = lambda name: stages.get(name, {}).get("ok", False)  # noqa: E731

    b.stage("gpu", lambda: {"nvidia_smi": subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
                                                          "--format=csv,noheader"], capture_output=True, text=True).stdout.strip()},
            need=0)
    # 1. Fixtures: the other depths in the background (CPU) while the deepest is written.
    others = {n: b.popen(b.fixture_cmd(n), f"fixture-L{n}.log", cpu_only) for n in depths[1:]}
    b.stage(f"fixture_L{deep}", b.build_fixture, deep, need=60)
    for n, proc in others.items():
        b.stage(f"fixture_L{n}", lambda p=proc, n=n: (b.wait(p, f"fixture-L{n}.log", args.fixture_timeout),
                                                     b.describe_fixture(n))[1], need=5)
    data = Path(args.dataset) if args.dataset else b.work / f"bench_seq{args.seq}.jsonl"
    if not data.is_file():
        b.stage("dataset", lambda: (write_dataset(data, rows=args.rows, seq=args.seq), {"path": str(data)})[1], need=10)

    # 2. Training, one depth after another (nothing else on the machine while the GPU is timed).
    trains = []
    for n in depths:
        if ok(f"fixture_L{n}") and data.is_file():
            r = b.stage(f"train_L{n}", b.train, n, data, need=90)
            if not r:
                break  # the same error at the next depth would only cost device time
            trains.append(r)
    b.report["training"] = [{k: r.get(k) for k in ("layers", "step_seconds_median", "tokens_per_second_median",
                                                   "tokens_per_step", "peak_vram_allocated_gib", "peak_vram_reserved_gib",
                                                   "loss_first", "loss_last", "gpu")} for r in trains]
    b.report["extrapolation_24_layers"] = extrapolate(trains)  # 6.
    b.save()
    if not ok(f"train_L{deep}"):
        return 1
    run_dir = Path(stages[f"train_L{deep}"]["run_dir"])

    # 3. Both merges on the CPU, and 4./5. Unsloth's own model on the GPU, side by side.
    merges = {into: (b.popen(b.merge_cmd(run_dir, into), f"merge-{into}.log", cpu_only), time.monotonic())
              for into in ("original", "dequantized")}
    unsloth = b.popen(me + ["--child", "unsloth", "--work", str(b.work), "--split", str(b.split(deep)), "--adapter",
                            str(run_dir / "adapter"), "--original", str(b.original(deep)), "--seq", str(args.seq)],
                      "unsloth-child.log")
    for into, (proc, started) in merges.items():
        b.stage(f"merge_{into}", lambda p=proc, i=into, s=started: (b.wait(p, f"merge-{i}.log", 300),
                                                                   b.merge_record(i, time.monotonic() - s))[1], need=5)
    # transformers on the merged folders and on the bf16 original (base-vs-base gap), while Unsloth runs
    models = {"original": b.original(deep), **{f"merged-{i}": b.work / f"merged-{i}" for i in merges if ok(f"merge_{i}")}}
    spec = ",".join(f"{k}={v}" for k, v in models.items())
    b.stage("hf_logits", lambda: (b.run(me + ["--child", "hf", "--work", str(b.work), "--models", spec, "--device", args.device], "hf-child.log",
                                        timeout=300), json.loads((b.work / "hf_child.json").read_text()))[1], need=45)

    finished: dict = {}

    def unsloth_result():
        try:
            b.wait(unsloth, "unsloth-child.log", 400)
        finally:  # what the child finished, even if it died later
            child = b.work / "unsloth_child.json"
            finished.update(json.loads(child.read_text()) if child.is_file() else {})
        return finished
    b.stage("unsloth_model", unsloth_result, need=5)
    if unsloth.poll() is None:
        unsloth.kill()
    if not ok("unsloth_model"):
        stages["unsloth_model"]["partial"] = finished
        b.save()

    pairs = {
        # the merges against Unsloth's own model (4-bit base + adapter, for_inference)
        "merged_dequantized_bf16_vs_unsloth": ("unsloth-lora", "merged-dequantized-bf16"),
        "merged_dequantized_fp32_vs_unsloth": ("unsloth-lora", "merged-dequantized-fp32"),
        "merged_original_bf16_vs_unsloth": ("unsloth-lora", "merged-original-bf16"),
        "merged_original_fp32_vs_unsloth": ("unsloth-lora", "merged-original-fp32"),
        # which part is quantization: the bases alone, and our two merges against each other
        "base_unsloth_4bit_vs_original_fp32": ("original-fp32", "unsloth-base"),
        "base_unsloth_4bit_vs_original_bf16": ("original-bf16", "unsloth-base"),
        "merged_original_vs_merged_dequantized_fp32": ("merged-dequantized-fp32", "merged-original-fp32"),
        # how far the adapter moves each model (the scale the differences above sit against)
        "adapter_effect_unsloth": ("unsloth-base", "unsloth-lora"),
        "adapter_effect_transformers_fp32": ("original-fp32", "merged-original-fp32"),
        # bf16 vs float32 of the same weights in transformers
        "merged_dequantized_bf16_vs_fp32": ("merged-dequantized-fp32", "merged-dequantized-bf16"),
    }
    b.stage("logits", compare_logits, b.work, pairs, need=20)
    saved = finished.get("save_pretrained_merged") or {}
    for name, entry in saved.items():
        if entry.get("ok") and ok("merge_original"):
            b.stage(f"tensors_unsloth_{name}_vs_ours", compare_tensors, Path(entry["dir"]), b.work / "merged-original",
                    b.original(deep), need=20)
    print(json.dumps({k: b.report[k] for k in ("training", "extrapolation_24_layers", "elapsed_seconds")}, indent=1))
    return 0 if all(s.get("ok") for s in stages.values()) else 1

if __name__ == "__main__":
    sys.exit(main())
