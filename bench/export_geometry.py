#!/usr/bin/env python3
"""Export stage at gpt-oss-20b's real widths: merge / convert / quantize cost, fallbacks, fidelity.

    python3 bench/export_geometry.py --stages all            # or a comma list of stages, run in order

Stages (each one a child process measured for wall time and peak RSS, each skipped when its record
exists, so a 10-minute command limit can be met by running them in several calls):

  fixture      gptoss fixture geometry-20b --layers N          (bf16, real widths 2880 / 32 experts)
  adapter      seeded random LoRA (attention + fused experts via target_parameters) as a run folder
  merge        gptoss merge --run ...                          (streaming: one tensor at a time)
  peft-merge   transformers + PEFT: load bf16, merge_and_unload(), save_pretrained (in memory)
  compare      streaming merge vs PEFT merge, tensor by tensor
  mxfp4-base   the fixture with experts stored as MXFP4 _blocks/_scales (like openai/gpt-oss-20b)
  merge-mxfp4  gptoss merge --base <mxfp4 copy> --adapter ...  (dequantize MXFP4 while streaming)
  export       gptoss export --run ... --quants q4_k_m,q5_k_m --also mxfp4_moe (convert, quantize, fidelity)
  report       JSON + markdown table, with sizes / fallbacks / times extrapolated to 24 layers

Needs (no network): torch, transformers, safetensors, numpy (present on the device image) and the
wheels bench/carry_export.sh collects (peft, accelerate, fire, openai-harmony, tiktoken, regex,
diskcache, ...) plus the pinned llama.cpp (converter, bindings, llama-quantize and its libraries)
under .cache/gptoss/llama.cpp. Environment: GPTOSS_CACHE=$PWD/.cache/gptoss
GPTOSS_O200K_GZ=$GPTOSS_CACHE/o200k_base.tiktoken.gz GPTOSS_LLAMA_CPP_BIN=$GPTOSS_CACHE/llama.cpp/bin
GPTOSS_LLAMA_CPP_SRC=$GPTOSS_CACHE/llama.cpp/src
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from gptoss.exporters import records  # noqa: E402
from gptoss.exporters.gguf import inspect, run_measured  # noqa: E402

STAGES = ("fixture", "adapter", "merge", "peft-merge", "compare", "mxfp4-base", "merge-mxfp4", "export", "report")
RUN = "g20b-run"
REAL_LAYERS = 24
REAL_MERGED_BYTES = 41.8e9  # gpt-oss-20b in bf16: 20.9B parameters x 2 bytes


def env() -> dict:
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join([str(REPO)] + ([e["PYTHONPATH"]] if e.get("PYTHONPATH") else []))
    return e


def measured(name: str, cmd: list[str], state: dict, work: Path) -> dict:
    print(f"== {name}: {' '.join(cmd)}", flush=True)
    start = time.perf_counter()
    rc, lines, peak = run_measured(cmd, env(), lambda line: print("   " + line[-300:], flush=True))
    rec = {"command": " ".join(cmd), "rc": rc, "wall_s": round(time.perf_counter() - start, 2), "peak_rss_bytes": peak}
    if rc != 0:
        print("\n".join(lines[-30:]), file=sys.stderr)
        raise SystemExit(f"stage {name} failed (exit {rc})")
    try:  # a stage may print a JSON result as its last line
        rec["result"] = json.loads(next(line for line in reversed(lines) if line.strip()))
    except (StopIteration, json.JSONDecodeError):
        pass
    state[name] = rec
    (work / "bench_stages.json").write_text(json.dumps(state, indent=2) + "\n")
    print(f"== {name}: {rec['wall_s']} s, peak RSS {records.human(peak or 0)}", flush=True)
    return rec


def py(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def compare(streaming_dir: str, peft_dir: str, base_dir: str) -> None:
    """Streaming merge vs PEFT's in-memory merge, per tensor; prints one JSON line.

    PEFT merges a bf16 model in bf16 arithmetic, the streaming merge adds the delta in float32 and
    rounds once, so they differ by rounding; the figure that matters is that difference relative
    to the LoRA delta itself (||streaming - peft|| / ||peft - base||).
    """
    import glob

    from safetensors import safe_open

    def tensors(d):
        out = {}
        for shard in sorted(glob.glob(d + "/*.safetensors")):
            f = safe_open(shard, "pt")
            out.update({k: f for k in f.keys()})
        return out

    a, b, base = tensors(streaming_dir), tensors(peft_dir), tensors(base_dir)
    names = sorted(set(a) & set(b))
    worst_rel, worst_abs, changed = 0.0, 0.0, 0
    for k in names:
        x, y = a[k].get_tensor(k).float(), b[k].get_tensor(k).float()
        worst_abs = max(worst_abs, (x - y).abs().max().item())
        if k in base:
            delta = (y - base[k].get_tensor(k).float()).norm().item()
            if delta > 0:
                changed += 1
                worst_rel = max(worst_rel, (x - y).norm().item() / delta)
    print(json.dumps({"tensors": len(names), "changed_by_lora": changed, "only_streaming": sorted(set(a) - set(b)),
                      "only_peft": sorted(set(b) - set(a)), "max_abs_diff": worst_abs,
                      "max_diff_relative_to_delta": worst_rel}))


def layer_split(sizes: dict[str, int], layer_key: str) -> tuple[int, int]:
    """(bytes outside layers, bytes inside layers) of a {tensor name: bytes} table."""
    inside = sum(v for k, v in sizes.items() if layer_key in k)
    return sum(sizes.values()) - inside, inside


def report(work: Path, state: dict, layers: int) -> dict:
    from safetensors import safe_open

    root = work / "exports" / RUN
    manifest = json.loads((root / "manifest.json").read_text())
    scale = REAL_LAYERS / layers
    merged_sizes = {}
    for shard in sorted((root / "merged").glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as f:
            for k in f.keys():
                sl = f.get_slice(k)
                n = 2
                for d in sl.get_shape():
                    n *= d
                merged_sizes[k] = n
    m_out, m_in = layer_split(merged_sizes, "layers.")
    merged_now, merged_24 = m_out + m_in, m_out + m_in * scale
    rows = []
    for a in manifest["artifacts"]:
        info = inspect(root / a["path"], keys=())
        out_b, in_b = layer_split({n: t.n_bytes for n, t in info.tensors.items()}, "blk.")
        fb_in = sum(1 for f in a["fallback_tensors"] if f["tensor"].startswith("blk."))
        fb_out = a["fallbacks"] - fb_in
        size_24 = out_b + in_b * scale
        f = a.get("fidelity") or {}
        rows.append({
            "file": a["path"], "quant": a["quant"], "size_bytes": a["size"], "size_24_layers_bytes": int(size_24),
            "tensor_types": a["tensor_types"], "fallbacks": a["fallbacks"],
            "fallbacks_24_layers": int(fb_out + fb_in * scale), "off_nominal_weights": a["off_nominal_weights"],
            "fallback_examples": sorted({f"{x['wanted']}->{x['got']}" for x in a["fallback_tensors"]}),
            "time_s": a["elapsed_s"], "time_24_layers_s": round(a["elapsed_s"] * size_24 / max(a["size"], 1), 1),
            "peak_rss_bytes": a["peak_rss_bytes"], "tool": a["tool"],
            "fidelity": {k: f.get(k) for k in ("reference", "nmse", "mean_kl", "top1_agreement", "passed")},
        })
    merge = state.get("merge", {})
    peft = state.get("peft-merge", {})
    mx = state.get("merge-mxfp4", {})
    out = {
        "date": dt.date.today().isoformat(),
        "machine": {"host": platform.node(), "cpus": os.cpu_count(), "python": platform.python_version(),
                    "mem_total_bytes": _mem_total()},
        "versions": records.versions(),
        "llama_cpp_commit": manifest["tools"]["llama_cpp_commit"],
        "layers": layers,
        "merged_bytes": merged_now, "merged_bytes_24_layers": int(merged_24),
        "merge_streaming": merge, "merge_streaming_from_mxfp4": mx, "merge_in_memory_peft": peft,
        "merge_time_24_layers_s": round(merge.get("wall_s", 0) * merged_24 / merged_now, 1) if merge else None,
        # PEFT holds the whole model (and more) in memory: scale its peak with the model's bytes
        "peft_merge_peak_rss_24_layers_bytes": int(peft["peak_rss_bytes"] * merged_24 / merged_now) if peft.get("peak_rss_bytes") else None,
        "compare": (state.get("compare") or {}).get("result"),
        "artifacts": rows,
        "stages": state,
    }
    (work / "bench_export_geometry.json").write_text(json.dumps(out, indent=2) + "\n")
    if os.environ.get("OUT"):  # the device machine hands back what is under $OUT
        import shutil

        for f in (work / "bench_export_geometry.json", work / "bench_stages.json", root / "manifest.json"):
            shutil.copyfile(f, Path(os.environ["OUT"]) / f.name)
    h = records.human
    print(f"\n### Export at gpt-oss-20b widths, {layers} layers (extrapolated to 24)\n")
    print(f"{out['date']}, {out['machine']['cpus']} CPUs, {h(out['machine']['mem_total_bytes'] or 0)} RAM, "
          f"llama.cpp {out['llama_cpp_commit'][:10]}\n")
    print("| step | time | peak RSS | 24 layers (extrapolated) |\n|---|---|---|---|")
    if merge:
        print(f"| merge, streaming (bf16 base) | {merge['wall_s']} s | {h(merge['peak_rss_bytes'] or 0)} | "
              f"~{out['merge_time_24_layers_s']} s, same peak (one tensor at a time) |")
    if mx:
        print(f"| merge, streaming (MXFP4 base) | {mx['wall_s']} s | {h(mx['peak_rss_bytes'] or 0)} | same peak |")
    if peft:
        print(f"| merge, in memory (PEFT merge_and_unload) | {peft['wall_s']} s | {h(peft['peak_rss_bytes'] or 0)} | "
              f"~{h(out['peft_merge_peak_rss_24_layers_bytes'] or 0)} |")
    if out["compare"]:
        c = out["compare"]
        print(f"\nstreaming vs PEFT merge: {c['tensors']} tensors, {c['changed_by_lora']} changed by the LoRA; "
              f"max |diff| {c['max_abs_diff']:.2e}, max ||diff|| / ||delta|| {c['max_diff_relative_to_delta']:.2e}")
    print("\n| file | size (24 layers) | tensor types | fallbacks (24 layers) | time (24 layers) | peak RSS | "
          "NMSE / KL / top-1 vs reference |\n|---|---|---|---|---|---|---|")
    for r in rows:
        f = r["fidelity"]
        fid = (f"{f['nmse']:.2e} / {f['mean_kl']:.2e} / {f['top1_agreement']:.1%}" if f.get("nmse") is not None
               else "n/a")
        types = ", ".join(f"{k} {v}" for k, v in r["tensor_types"].items())
        print(f"| {Path(r['file']).name} | {h(r['size_bytes'])} ({h(r['size_24_layers_bytes'])}) | {types} | "
              f"{r['fallbacks']} ({r['fallbacks_24_layers']}) {', '.join(r['fallback_examples'])} | "
              f"{r['time_s']} s ({r['time_24_layers_s']} s) | {h(r['peak_rss_bytes'] or 0)} | {fid} |")
    return out


def _mem_total() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="bench-out/export-geometry", help="work folder (gitignored bench-out/)")
    ap.add_argument("--stages", default="all", help=f"comma list of {', '.join(STAGES)}, or all")
    ap.add_argument("--fixture", default="geometry-20b", choices=["geometry-20b", "tiny"],
                    help="tiny: check the script quickly on a CPU")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--quants", default="q4_k_m,q5_k_m")
    ap.add_argument("--also", default="mxfp4_moe")
    ap.add_argument("--backend", default="auto", choices=["auto", "tool", "python"])
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--force", action="store_true", help="redo stages that have a record")
    args = ap.parse_args()
    stages = STAGES if args.stages == "all" else tuple(s.strip() for s in args.stages.split(","))
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise SystemExit(f"unknown stage(s) {unknown}; known: {', '.join(STAGES)}")
    work = Path(args.work).absolute()
    work.mkdir(parents=True, exist_ok=True)
    state_path = work / "bench_stages.json"
    state = json.loads(state_path.read_text()) if state_path.is_file() else {}
    base, run = work / "base", work / "models" / RUN
    layers = args.layers if args.fixture == "geometry-20b" else 2

    def todo(stage: str) -> bool:
        return stage in stages and (args.force or stage not in state)

    if todo("fixture"):
        cmd = [sys.executable, "-m", "gptoss", "fixture", args.fixture, "--out", str(base), "--force"]
        measured("fixture", cmd + (["--layers", str(args.layers)] if args.fixture == "geometry-20b" else []), state, work)
    if todo("adapter"):
        measured("adapter", py(
            f"import sys; sys.path.insert(0, {str(REPO / 'tests')!r}); from lora_fixtures import make_run; "
            f"make_run({str(base)!r}, {str(run)!r}, r=8, alpha=16, seed=0, b_std=0.01)"), state, work)
    if todo("merge"):
        measured("merge", [sys.executable, "-m", "gptoss", "merge", "--run", str(run), "--exports-dir",
                           str(work / "exports"), "--force"], state, work)
    if todo("peft-merge"):
        measured("peft-merge", py(
            "import torch; from transformers import AutoModelForCausalLM; from peft import PeftModel; "
            f"m = AutoModelForCausalLM.from_pretrained({str(base)!r}, dtype=torch.bfloat16); "
            f"m = PeftModel.from_pretrained(m, {str(run / 'adapter')!r}).merge_and_unload(); "
            f"m.save_pretrained({str(work / 'peft-merged')!r})"), state, work)
    if todo("compare"):
        measured("compare", py(
            f"import sys; sys.path.insert(0, {str(REPO / 'bench')!r}); import export_geometry as b; "
            f"b.compare({str(work / 'exports' / RUN / 'merged')!r}, {str(work / 'peft-merged')!r}, {str(base)!r})"),
            state, work)
    if todo("mxfp4-base"):
        measured("mxfp4-base", py(
            f"import sys; sys.path.insert(0, {str(REPO / 'tests')!r}); from lora_fixtures import write_mxfp4_copy; write_mxfp4_copy({str(base)!r}, {str(work / 'base-mxfp4')!r})"),
            state, work)
    if todo("merge-mxfp4"):
        measured("merge-mxfp4", [sys.executable, "-m", "gptoss", "merge", "--base", str(work / "base-mxfp4"),
                                 "--adapter", str(run / "adapter"), "--out", str(work / "merged-from-mxfp4"),
                                 "--force"], state, work)
    if todo("export"):
        measured("export", [sys.executable, "-m", "gptoss", "export", "--run", str(run), "--exports-dir",
                            str(work / "exports"), "--quants", args.quants, "--also", args.also,
                            "--backend", args.backend, "--threads", str(args.threads)], state, work)
    if "report" in stages:
        report(work, state, layers)


if __name__ == "__main__":
    main()
