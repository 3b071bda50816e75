"""`gptoss export`: merged model -> GGUF files with an honest report, and exports/<run>/manifest.json.

Order of work: check everything (quant names, inputs, adapter vs base, disk space), merge (unless
the merged folder already holds the same merge), convert to F16 with llama.cpp's converter,
quantize each requested kind from the F16 file, read each file back (tensor types, fallbacks),
measure fidelity (F16 against the merged HF model, every other kind against F16) and write the
manifest last. Each artifact's record (``.records/<file>.json``) names its inputs; a re-run skips
artifacts whose inputs and bytes are unchanged. Files are written under temporary names.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import os
import sys
from pathlib import Path

from typing import Literal

from gptoss.choices import signature_problems
from gptoss.latest import LATEST, switch_latest
from gptoss.folders import gguf_name
from gptoss.machine import mem_available_bytes
from gptoss.records import GGUFArtifact, Manifest, MergedFolder, TrainingInfo

from gptoss.exporters import fidelity as fid
from gptoss.exporters import gguf as gg
from gptoss.exporters.gguf import QuantizeBackend
from gptoss.exporters import records
from gptoss.exporters.errors import DiskSpaceError, ExportStageError, MissingFilesError
from gptoss.exporters.merge import MergePlan, merge_record, prepare_merge, run_merge
from gptoss.exporters.quants import Quant, get_quant, parse_quants
from gptoss.exporters.runs import GGUF_DIR, MERGED_DIR, MergeInto, export_root, resolve_inputs

CompareHF = Literal["auto", "on", "off"]
MANIFEST = Manifest.FILE
LOG = "export.log"  # llama.cpp's output (converter, quantizer, fidelity runs), appended per export
RECORDS_DIR = ".records"
ARTIFACT_FORMAT = 1
DISK_MARGIN = 1.05


@dataclasses.dataclass
class ExportResult:
    manifest_path: Path
    manifest: dict  # manifest.json as written (Manifest.to_dict())


def write_modelfile(gguf_path: Path, merged_dir: Path) -> Path | None:
    """An Ollama Modelfile that speaks Harmony, next to ``gguf_path`` (the Modelfiles stage's writer)."""
    from gptoss import modelfiles

    return Path(modelfiles.write(str(gguf_path)))


def _merged_identity(merged_dir: Path) -> dict:
    rec = merge_record(merged_dir)
    if rec is not None:
        return {"merge_identity": rec.identity}
    files = sorted(p for p in merged_dir.iterdir() if p.is_file() and p.suffix in (".safetensors", ".json"))
    return {"files": {p.name: records.file_digest(p) for p in files}}


def _tensor_elements(merged_dir: Path) -> dict[str, int]:
    from gptoss.exporters.checkpoint import BaseCheckpoint

    ck = BaseCheckpoint(merged_dir)
    out = {}
    for name, spec in ck.tensors.items():
        n = 1
        for d in spec.shape:
            n *= d
        out[name] = n
    return out


def _elements_from_plan(mp: MergePlan) -> dict[str, int]:
    out = {}
    for e in mp.entries:
        n = 1
        for d in e.shape:
            n *= d
        out[e.name] = n
    return out


def _artifact_up_to_date(record: dict | None, inputs: dict, path: Path) -> bool:
    if not record or record.get("format") != ARTIFACT_FORMAT or not path.is_file():
        return False
    if not records.same_content(record.get("inputs"), inputs):
        return False
    st = path.stat()
    f = record.get("file", {})
    return f.get("size") == st.st_size and f.get("mtime_ns") == st.st_mtime_ns


def _compare_hf_wanted(compare_hf: str, merged_bytes: int) -> bool:
    if compare_hf == "on":
        return True
    if compare_hf == "off":
        return False
    avail = mem_available_bytes()
    # float32 copy of the model plus logits: stay well inside available memory
    return avail is not None and merged_bytes * 2 * 1.5 < avail * 0.6


def export(run: str | None = None, *, quants: str | tuple = "q4_k_m,q5_k_m", also: str | tuple = "",
           merged: str | None = None, base: str | None = None, adapter: str | None = None, name: str | None = None,
           out: str | None = None, exports_dir: str | None = None, fidelity: bool = True, compare_hf: CompareHF = "auto",
           backend: QuantizeBackend = "auto", threads: int | None = None, max_shard_size: str = "5GB",
           merge_into: MergeInto = "original", merge_base: str | None = None, force: bool = False,
           progress: bool = True) -> str:
    """Merge a training run and export GGUF files (F16 always, plus the requested quants) with a manifest.

    Args:
        run: training run folder (models/<run>/ with adapter/ and training_info.json).
        quants: comma-separated GGUF kinds to make from the F16 file: q4_k_m, q5_k_m, q8_0, mxfp4_moe (f16 is always made).
        also: more kinds, same syntax (e.g. mxfp4_moe,q8_0).
        merged: instead of --run: an already merged HF folder to export.
        base: instead of --run: the base model (Hugging Face id or folder), with --adapter.
        adapter: instead of --run: the PEFT LoRA adapter folder, with --base.
        name: file name stem of the GGUFs (default: the run name).
        out: export folder (default exports/<run>); manifest.json is written there last.
        exports_dir: root of the exports tree (default ./exports); its `latest` link is switched to
            the run once the manifest is written (not with --out).
        fidelity: measure logits fidelity of every file on the fixed Harmony prompt set.
        compare_hf: compare F16 with the merged HF model in transformers: auto (when it fits in RAM), on, off.
        backend: quantizer: auto or tool (llama-quantize), python (the same llama_model_quantize through the llama_cpp bindings).
        threads: CPU threads for quantizing and fidelity runs (default: all).
        max_shard_size: largest merged safetensors shard, e.g. 5GB.
        merge_into: for a run trained on a bitsandbytes 4-bit base: original (its 16-bit original, the default)
            or dequantized (the 4-bit base dequantized); see `gptoss merge --help`.
        merge_base: the 16-bit original to merge into (default: what training recorded).
        force: redo every step even where the records show the same inputs.
        progress: show progress (bars in a terminal, one line per stage otherwise).
    Returns:
        The path of manifest.json.
    """
    result = export_run(run, quants=quants, also=also, merged=merged, base=base, adapter=adapter, name=name, out=out,
                        exports_dir=exports_dir, fidelity=fidelity, compare_hf=compare_hf, backend=backend,
                        threads=threads, max_shard_size=max_shard_size, merge_into=merge_into, merge_base=merge_base,
                        force=force, progress=progress)
    _print_report(result.manifest, sys.stderr)
    return str(result.manifest_path)


def export_run(run: str | None = None, *, quants="q4_k_m,q5_k_m", also="", merged: str | None = None,
               base: str | None = None, adapter: str | None = None, name: str | None = None, out: str | None = None,
               exports_dir: str | None = None, fidelity: bool = True, compare_hf: CompareHF = "auto", backend: QuantizeBackend = "auto",
               threads: int | None = None, max_shard_size: str = "5GB", merge_into: str = "original",
               merge_base: str | None = None, force: bool = False, progress: bool = True) -> ExportResult:
    """`export` returning the manifest as a dict (for tests, benches and later stages)."""
    from gptoss import llamacpp

    # 1. Validate every flag before touching anything.
    kinds = ["f16"] + [q for q in parse_quants(quants) + parse_quants(also) if q != "f16"]
    kinds = list(dict.fromkeys(kinds))
    if wrong := signature_problems(export, {"compare_hf": compare_hf, "backend": backend}):
        raise ExportStageError("; ".join(wrong))
    mp: MergePlan | None = None
    if merged is not None:
        if run is not None or base is not None or adapter is not None:
            raise ExportStageError("pass --merged DIR alone, or --run / --base + --adapter")
        merged_dir = Path(merged).expanduser().absolute()
        if not (merged_dir / "config.json").is_file():
            raise MissingFilesError(f"--merged {merged}: no config.json there; pass a folder written by gptoss merge")
        stem = name or (merged_dir.parent.name if merged_dir.name == MERGED_DIR else merged_dir.name)
        root = Path(out).absolute() if out else export_root(stem, exports_dir)
        inputs_desc: dict = {"merged": str(merged_dir)}
    else:
        inputs = resolve_inputs(run, base, adapter, merge_into=merge_into, merge_base=merge_base)
        stem = name or inputs.name
        root = Path(out).absolute() if out else export_root(inputs.name, exports_dir)
        merged_dir = root / MERGED_DIR
        mp = prepare_merge(inputs, merged_dir, dtype="bfloat16", max_shard_size=max_shard_size)
        inputs_desc = {"run": str(inputs.run_dir) if inputs.run_dir else None,
                       "training_info": (records.file_digest(TrainingInfo.file_in(inputs.run_dir))
                                         if inputs.run_dir else None),
                       **mp.inputs_record}
    if out is None and root.name == LATEST:
        raise ExportStageError(f"export name {LATEST!r} is reserved for the {root.parent / LATEST} link; pass --name NAME")
    gguf_dir = root / GGUF_DIR
    rec_dir = root / RECORDS_DIR
    cli_command = " ".join(["gptoss", *sys.argv[1:]]) if sys.argv[1:2] == ["export"] else None
    commit = llamacpp.commit()
    versions = records.versions()

    # 2. What is already done, and disk space for the rest.
    merge_needed = mp is not None and (force or not mp.up_to_date)
    if mp is not None:
        merged_ident = {"merge_identity": mp.identity}
        elements = _elements_from_plan(mp)
        merged_bytes = mp.total_bytes
    else:
        merged_ident = _merged_identity(merged_dir)
        elements = _tensor_elements(merged_dir)
        merged_bytes = sum(p.stat().st_size for p in merged_dir.glob("*.safetensors"))
    plan = []
    for kind in kinds:
        q = get_quant(kind)
        path = gguf_dir / gguf_name(stem, q.label)
        inputs = {"merged": merged_ident, "quant": q.name, "llama_cpp_commit": commit,
                  "source": "merged" if q.from_converter else f"{stem}-F16.gguf"}
        record = records.read_json(rec_dir / f"{path.name}.json")
        fresh = not force and not merge_needed and _artifact_up_to_date(record, inputs, path)
        if not q.from_converter and any(p["redo"] for p in plan):  # F16 changed: quants follow
            fresh = False
        plan.append({"quant": q, "path": path, "inputs": inputs, "record": record, "redo": not fresh})
    need = (merged_bytes if merge_needed else 0) + sum(
        p["quant"].estimate_bytes(elements) for p in plan if p["redo"])
    need = int(need * DISK_MARGIN)
    free = records.free_bytes(root)
    if need > free:
        parts = ([f"merged {records.human(merged_bytes)}"] if merge_needed else []) + [
            f"{p['path'].name} ~{records.human(p['quant'].estimate_bytes(elements))}" for p in plan if p["redo"]]
        raise DiskSpaceError(f"export needs about {records.human(need)} in {root} ({', '.join(parts)}) but only "
                             f"{records.human(free)} is free; free space, pass --out on a larger disk or fewer --quants")

    # llama.cpp is built (once per machine, announced) before any stage starts, not in the middle of one.
    digest_now = fid.prompts_digest(fid.prompt_tokens()) if fidelity else None
    fidelity_todo = fidelity and any(
        p["redo"] or ((p["record"] or {}).get("fidelity") or {}).get("prompts_sha256") != digest_now for p in plan)
    if any(p["redo"] and not p["quant"].from_converter for p in plan) and backend != "python":
        llamacpp.tool("llama-quantize")
    if fidelity_todo or backend == "python":
        llamacpp.library_dir()

    # 3. Merge. A manifest describes a finished export: drop the old one before changing anything.
    root.mkdir(parents=True, exist_ok=True)
    log_path = root / LOG
    if merge_needed or any(p["redo"] for p in plan) or fidelity_todo:
        print(f"export {stem}: llama.cpp's own output goes to {log_path}", file=sys.stderr, flush=True)
    manifest_path = root / MANIFEST
    if merge_needed or any(p["redo"] for p in plan):
        manifest_path.unlink(missing_ok=True)
    commands = []
    steps: dict[str, dict] = {}
    if mp is not None:
        if merge_needed:
            res = run_merge(mp, progress=progress, command=cli_command, check_disk=False)
            steps["merge"] = {"skipped": False, "elapsed_s": res.record["elapsed_s"],
                              "peak_rss_bytes": res.record["peak_rss_bytes"]}
        else:
            steps["merge"] = {"skipped": True}
        mp.base.close()

    # 4. Convert and quantize.
    gguf_dir.mkdir(parents=True, exist_ok=True)
    rec_dir.mkdir(parents=True, exist_ok=True)
    f16_path = plan[0]["path"]
    n_tensors = len(elements) + sum(1 for n in elements if "gate_up_proj" in n)
    f16_types: dict[str, str] | None = None
    for p in plan:
        q: type[Quant] = p["quant"]
        if not p["redo"]:
            continue
        p["path"].unlink(missing_ok=True)
        (rec_dir / f"{p['path'].name}.json").unlink(missing_ok=True)
        if q.from_converter:
            step = gg.convert(merged_dir, p["path"], outtype=q.label.lower(), expected_tensors=n_tensors,
                              progress=progress, log=log_path)
        else:
            step = gg.quantize(f16_path, p["path"], label=q.label, backend=backend, threads=threads,
                               progress=progress, log=log_path)
        commands.append(" ".join(step.command))
        info = gg.inspect(p["path"])
        digest = records.file_digest(p["path"])
        if f16_types is None:
            f16_types = info.types if q.from_converter else gg.inspect(f16_path).types
        # weights the converter wrote in 16 bits are the ones a quant may change; off-nominal = not the
        # quant's main type, whether by llama.cpp's mixture rules (Q6_K for some) or by a fallback
        quantizable = [n for n, t in f16_types.items() if t in ("F16", "BF16")]
        off_nominal = sorted(n for n in quantizable if info.types.get(n) != q.nominal)
        p["record"] = {
            "format": ARTIFACT_FORMAT,
            "inputs": p["inputs"],
            "file": digest,
            "quant": q.name,
            "label": q.label,
            "nominal_type": q.nominal,
            "tensor_count": info.tensor_count,
            "tensor_types": info.type_histogram,
            "tensor_type_bytes": info.type_bytes,
            "fallbacks": len(step.fallbacks),
            "fallback_tensors": step.fallbacks,
            "off_nominal_weights": len(off_nominal),
            "quantizable_weights": len(quantizable),
            "off_nominal_weight_types": {n: info.types.get(n) for n in off_nominal},
            "chat_template": bool(info.metadata.get(gg.GGUF_CHAT_TEMPLATE)),
            "tool": step.backend,
            "command": step.command,
            "elapsed_s": round(step.elapsed_s, 3),
            "peak_rss_bytes": step.peak_rss_bytes,
            "fidelity": None,
        }
        records.write_json_atomic(rec_dir / f"{p['path'].name}.json", p["record"])

    # 5. Fidelity: F16 vs the merged HF model, every other kind vs F16.
    prompt_digest = None
    if fidelity:
        tokens = fid.prompt_tokens()
        prompt_digest = fid.prompts_digest(tokens)
        todo = [p for p in plan if p["record"].get("fidelity") is None
                or p["record"]["fidelity"].get("prompts_sha256") != prompt_digest]
        if todo:
            ref16 = fid.gguf_logits(f16_path, tokens, threads=threads, progress=progress, log=log_path)
            for p in todo:
                q = p["quant"]
                if q.from_converter:
                    if not _compare_hf_wanted(compare_hf, merged_bytes):
                        p["record"]["fidelity"] = {"reference": None, "skipped": "--compare-hf off, or the model is too large for RAM",
                                                   "prompts_sha256": prompt_digest}
                        records.write_json_atomic(rec_dir / f"{p['path'].name}.json", p["record"])
                        continue
                    note = fid.reference_config(merged_dir)[1]
                    ref_name = "merged HF model (transformers, float32" + (f"; {note})" if note else ")")
                    ref, test = fid.hf_logits(merged_dir, tokens, progress=progress), ref16
                else:
                    ref, test, ref_name = ref16, fid.gguf_logits(p["path"], tokens, threads=threads, progress=progress,
                                                                 log=log_path), f"{stem}-F16.gguf"
                f = fid.compare(ref, test)
                p["record"]["fidelity"] = {
                    "reference": ref_name, **dataclasses.asdict(f),
                    "thresholds": {"max_nmse": q.max_nmse, "max_kl": q.max_kl, "min_top1": q.min_top1},
                    "passed": f.passes(q.max_nmse, q.max_kl, q.min_top1),
                    "prompts_sha256": prompt_digest,
                }
                records.write_json_atomic(rec_dir / f"{p['path'].name}.json", p["record"])

    # 6. Modelfiles (hook), then the manifest, last.
    artifacts = []
    for p in plan:
        r = p["record"]
        modelfile = write_modelfile(p["path"], merged_dir)
        modelfile_digest = records.file_digest(modelfile) if modelfile else {}
        artifacts.append(GGUFArtifact(
            kind="gguf",
            path=os.path.relpath(p["path"], root),
            quant=r["quant"], label=r["label"],
            sha256=r["file"]["sha256"], size=r["file"]["size"],
            nominal_type=r["nominal_type"], tensor_count=r["tensor_count"], tensor_types=r["tensor_types"],
            tensor_type_bytes=r["tensor_type_bytes"],
            fallbacks=r["fallbacks"], fallback_tensors=r["fallback_tensors"],
            quantizable_weights=r["quantizable_weights"],
            off_nominal_weights=r["off_nominal_weights"], off_nominal_weight_types=r["off_nominal_weight_types"],
            chat_template=r["chat_template"],
            fidelity=r["fidelity"],
            tool=r["tool"], elapsed_s=r["elapsed_s"], peak_rss_bytes=r["peak_rss_bytes"],
            skipped=not p["redo"],
            modelfile=os.path.relpath(modelfile, root) if modelfile else None,
            modelfile_sha256=modelfile_digest.get("sha256"), modelfile_size=modelfile_digest.get("size"),
        ))
    merged_files = []
    for f in sorted(merged_dir.iterdir()):
        if f.is_file():
            merged_files.append({"path": os.path.relpath(f, root) if f.is_relative_to(root) else str(f),
                                 **{k: v for k, v in records.file_digest(f).items() if k != "mtime_ns"}})
    manifest = Manifest(
        run=stem,
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        inputs=inputs_desc,
        merged=MergedFolder(path=os.path.relpath(merged_dir, root) if merged_dir.is_relative_to(root) else str(merged_dir),
                            identity=merged_ident, files=merged_files, merge=steps.get("merge")),
        tools={"llama_cpp_commit": commit, "llama_cpp_python": llamacpp.LLAMA_CPP_PYTHON_VERSION,
               "converter": "convert_hf_to_gguf.py (vendored in llama-cpp-python sdist)", **versions},
        commands={"export": cli_command, "steps": commands},
        fidelity_prompts={"count": len(fid.PROMPTS), "sha256": prompt_digest} if fidelity else None,
        artifacts=artifacts,
    )
    manifest.write(manifest_path)
    if out is None:
        switch_latest(root)
    return ExportResult(manifest_path, manifest.to_dict())


def _print_report(manifest: dict, stream) -> None:
    print(f"export {manifest['run']} (llama.cpp {manifest['tools']['llama_cpp_commit'][:10]}):", file=stream)
    for a in manifest["artifacts"]:
        f = a.get("fidelity") or {}
        fid_txt = ("fidelity n/a" if not f or f.get("nmse") is None else
                   f"vs {f['reference']}: NMSE {f['nmse']:.2e}, KL {f['mean_kl']:.2e}, top-1 {f['top1_agreement']:.1%}"
                   f" ({f.get('top1_agreement_decisive', f['top1_agreement']):.1%} of {f.get('decisive_positions', '?')} decisive)"
                   f" [{'ok' if f['passed'] else 'FAILED'}]")
        types = ", ".join(f"{k} {v}" for k, v in a["tensor_types"].items())
        print(f"  {a['path']}: {records.human(a['size'])}; types {types}; fallbacks {a['fallbacks']}; "
              f"{fid_txt}{' (unchanged)' if a['skipped'] else ''}", file=stream)
