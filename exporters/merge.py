"""`gptoss merge`: fold a LoRA adapter into its base, streaming, into 16-bit safetensors.

Shard by shard and tensor by tensor: each base tensor is read lazily (``safe_open``), dequantized
(MXFP4 experts, bitsandbytes 4-bit) to float, its LoRA delta added in float32, cast to the output
dtype and appended to an output shard whose header was written up front. Peak memory is about one
tensor in float32 plus the adapter, so a 24 GB machine merges the 42 GB gpt-oss-20b.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

from gptoss.choices import choice_problem
from gptoss.exporters import records
from gptoss.exporters.adapter import ADAPTER_CONFIG, ADAPTER_WEIGHTS, LoraAdapter
from gptoss.exporters.checkpoint import TOKENIZER_FILES, BaseCheckpoint, resolve_model_dir
from gptoss.exporters.errors import AdapterMismatchError, DiskSpaceError, ExportStageError, FourBitMergeError
from gptoss.exporters.runs import MERGED_DIR, MergeInputs, MergeInto, export_root, resolve_inputs
from gptoss.exporters.safetensors_stream import Entry, ShardWriter, plan_shards, torch_dtype
from gptoss import layouts
from gptoss.records import MergeInfo, RecordError

MERGE_RECORD = MergeInfo.FILE
DTYPES = {"bfloat16": "BF16", "bf16": "BF16", "float16": "F16", "fp16": "F16", "float32": "F32", "fp32": "F32"}
FOUR_BIT = ("4bit", "4-bit", "int4", "nf4", "fp4", "mxfp4", "bnb-4bit", "bnb4", "q4", "q4_0", "q4_k_m")
FOUR_BIT_REASON = (
    "merging a LoRA into 4-bit weights is refused: a LoRA delta is far smaller than one 4-bit quantization "
    "step, so rounding W+dW back to 4 bits throws most of the fine-tune away and stacks a second "
    "quantization error on the base's. Merge into 16-bit (--dtype bfloat16, the default), then make "
    "4-bit files from it: gptoss export --quants q4_k_m,mxfp4_moe"
)
INDEX = "model.safetensors.index.json"
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMG]?)B?\s*$", re.I)


@dataclasses.dataclass
class MergeResult:
    merged_dir: Path
    skipped: bool
    record: dict  # merge_info.json as written (MergeInfo.to_dict())


def parse_size(text: str | int) -> int:
    if isinstance(text, int):
        return text
    m = _SIZE.match(str(text))
    if not m:
        raise ExportStageError(f"--max-shard-size {text!r}: use a size like 2GB or 500MB")
    return int(float(m[1]) * {"": 1, "K": 10**3, "M": 10**6, "G": 10**9}[m[2].upper()])


def check_dtype(dtype: str) -> str:
    key = str(dtype).lower()
    if key in FOUR_BIT:
        raise FourBitMergeError(f"--dtype {dtype}: {FOUR_BIT_REASON}")
    if wrong := choice_problem("--dtype", key, DTYPES):
        raise ExportStageError(wrong)
    return DTYPES[key]


def _tokenizer_vocab(path: Path) -> int | None:
    tok = path / "tokenizer.json"
    if not tok.is_file():
        return None
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(tok)).get_vocab_size(with_added_tokens=True)


def check_vocab(adapter: LoraAdapter, base: BaseCheckpoint) -> None:
    """The adapter's tokenizer (when it saved one) must be the base's vocabulary."""
    vocab = base.config.get("vocab_size")
    got = _tokenizer_vocab(adapter.path)
    if got is None:
        return
    base_tok = _tokenizer_vocab(base.path)
    if vocab is not None and got > vocab:
        raise AdapterMismatchError(
            f"{adapter.path / 'tokenizer.json'} has {got} tokens but the base's vocab_size is {vocab}: "
            "the adapter was trained for another model (or with added tokens); merge it into its own base"
        )
    if base_tok is not None and base_tok != got:
        raise AdapterMismatchError(
            f"{adapter.path / 'tokenizer.json'} has {got} tokens, the base's tokenizer {base_tok}: "
            "the adapter was trained for another model; merge it into its own base"
        )


def _source_digests(base: BaseCheckpoint, adapter: LoraAdapter, known: dict | None) -> dict:
    known = known or {}
    base_files = sorted({*base.shards, "config.json", *(n for n in (INDEX,) if (base.path / n).is_file())})
    kb = (known.get("base") or {}).get("files", {})
    ka = (known.get("adapter") or {}).get("files", {})
    return {
        "base": {"files": {n: records.file_digest(base.path / n, kb.get(n)) for n in base_files}},
        "adapter": {"files": {n: records.file_digest(adapter.path / n, ka.get(n))
                              for n in (ADAPTER_CONFIG, ADAPTER_WEIGHTS, *TOKENIZER_FILES)
                              if (adapter.path / n).is_file()}},
    }


def _write_config(base: BaseCheckpoint, out: Path, dtype: str) -> None:
    config = dict(base.config)
    config.pop("quantization_config", None)  # the merged weights are plain 16-bit
    name = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}[dtype]
    config["dtype"] = name
    if "torch_dtype" in config:
        config["torch_dtype"] = name
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _copy_side_files(base: BaseCheckpoint, adapter: LoraAdapter, out: Path) -> dict[str, str]:
    """Tokenizer + chat template (the adapter's when it saved one, else the base's) and generation defaults."""
    src = adapter.path if (adapter.path / "tokenizer.json").is_file() else base.path
    copied = {}
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, out / name)
            copied[name] = str(src / name)
    if (base.path / "generation_config.json").is_file():
        shutil.copyfile(base.path / "generation_config.json", out / "generation_config.json")
        copied["generation_config.json"] = str(base.path / "generation_config.json")
    has_template = (out / "chat_template.jinja").is_file() or "chat_template" in (
        json.loads((out / "tokenizer_config.json").read_text()) if (out / "tokenizer_config.json").is_file() else {}
    )
    if not has_template:
        from importlib import resources

        template = resources.files("gptoss").joinpath("templates/harmony_chat_template.jinja")
        (out / "chat_template.jinja").write_text(template.read_text())
        copied["chat_template.jinja"] = "gptoss/templates/harmony_chat_template.jinja"
    return copied


@dataclasses.dataclass
class MergePlan:
    """Everything checked and decided before the first byte is written."""

    inputs: MergeInputs
    out: Path
    out_dtype: str
    shard_bytes: int
    adapter: LoraAdapter
    base: BaseCheckpoint
    deltas: dict
    inputs_record: dict
    old_record: MergeInfo | None
    entries: list[Entry]
    source_shard: dict[str, str]

    @property
    def up_to_date(self) -> bool:
        old = self.old_record
        return old is not None and records.same_content(old.inputs, self.inputs_record)

    @property
    def total_bytes(self) -> int:
        return sum(e.nbytes for e in self.entries)

    @property
    def identity(self) -> str:
        """A hash of what the merge is made from (base and adapter contents, dtype)."""
        return records.identity(self.inputs_record)


def _merge_base(inputs: MergeInputs, base: BaseCheckpoint, base_dir: Path, revision: str | None):
    """What the adapter is folded into: (checkpoint, its id, folder, revision, "base" | "original" | "dequantized").

    A bitsandbytes 4-bit base is replaced by its 16-bit original (``--merge-base``, what training
    recorded, or the known original of a Hub id) unless ``--merge-into dequantized`` was asked.
    """
    if base.quant != "bnb-4bit" or inputs.merge_into == "dequantized":
        if inputs.merge_into == "dequantized" and base.quant != "bnb-4bit":
            print(f"merge: --merge-into dequantized has no effect: {inputs.base} is not a 4-bit checkpoint "
                  f"({base.quant}); merging into it", file=sys.stderr)
        return base, inputs.base, base_dir, revision, ("dequantized" if base.quant == "bnb-4bit" else "base")
    original = inputs.merge_base or layouts.sixteen_bit_original(inputs.base, base_dir)
    if not original:
        raise ExportStageError(
            f"{inputs.base} is a bitsandbytes 4-bit checkpoint and its 16-bit original is unknown: pass "
            "--merge-base ID_OR_DIR (the bf16 checkpoint it was quantized from, e.g. unsloth/gpt-oss-20b-BF16), "
            "or --merge-into dequantized to merge into the 4-bit weights dequantized"
        )
    original_dir, original_rev = resolve_model_dir(original, what="--merge-base")
    sixteen = BaseCheckpoint(original_dir)
    if sixteen.quant == "bnb-4bit":
        raise ExportStageError(f"--merge-base {original} is itself a bitsandbytes 4-bit checkpoint; "
                               "pass the 16-bit original (bf16 or MXFP4 release)")
    theirs = {n: s.shape for n, s in base.tensors.items()}
    ours = {n: s.shape for n, s in sixteen.tensors.items()}
    if theirs != ours:
        diff = sorted(set(theirs) ^ set(ours)) or sorted(n for n in theirs if theirs[n] != ours[n])
        raise ExportStageError(
            f"--merge-base {original} is not the 16-bit original of {inputs.base}: their tensors differ "
            f"({', '.join(diff[:4])}{' ...' if len(diff) > 4 else ''}); pass the checkpoint it was quantized from"
        )
    base.close()
    print(f"merge: {inputs.base} is 4-bit; merging into its 16-bit original {original} "
          "(--merge-into dequantized merges into the 4-bit weights instead)", file=sys.stderr)
    return sixteen, original, original_dir, original_rev, "original"


def merge_record(out: Path) -> MergeInfo | None:
    """The record of the merge already in ``out``; an unreadable one means the merge is redone."""
    if not MergeInfo.exists(out):
        return None
    try:
        return MergeInfo.load(out)
    except RecordError:
        return None


def prepare_merge(inputs: MergeInputs, out: Path, *, dtype: str = "bfloat16",
                  max_shard_size: str | int = "5GB") -> MergePlan:
    """Validate the adapter against the base and plan the output; raises before anything is written."""
    out_dtype = check_dtype(dtype)
    shard_bytes = parse_size(max_shard_size)
    adapter = LoraAdapter(inputs.adapter_dir)
    base_dir, revision = resolve_model_dir(inputs.base, revision=inputs.base_revision)
    base = BaseCheckpoint(base_dir)
    trained_on = {"id": inputs.base, "revision": revision or inputs.base_revision, "layout": base.layout,
                  "quantization": base.quant}
    base, base_id, base_dir, revision, merge_into = _merge_base(inputs, base, base_dir, revision)
    check_vocab(adapter, base)
    deltas = adapter.plan({n: s.shape for n, s in base.tensors.items()})
    out = Path(out).absolute()
    old = merge_record(out)
    digests = _source_digests(base, adapter, old.inputs if old else None)
    inputs_record = {
        "base": {"id": base_id, "path": str(base_dir),
                 "revision": revision if merge_into == "original" else revision or inputs.base_revision,
                 "quantization": base.quant, "layout": base.layout, **digests["base"]},
        "merge_into": merge_into,
        "trained_on": trained_on,
        "adapter": {"path": str(adapter.path), **digests["adapter"]},
        "dtype": out_dtype,
        "max_shard_bytes": shard_bytes,
    }
    # Output tensors in base shard order, so reads stay sequential and one base shard is mapped at a time.
    entries, source_shard = [], {}
    for shard, specs in base.tensors_by_shard():
        for spec in specs:
            is_float = spec.quantized or spec.dtype in ("F64", "F32", "F16", "BF16")
            entries.append(Entry(spec.name, out_dtype if is_float else spec.dtype, spec.shape))
            source_shard[spec.name] = shard
    return MergePlan(inputs, out, out_dtype, shard_bytes, adapter, base, deltas, inputs_record, old, entries,
                     source_shard)


def run_merge(mp: MergePlan, *, progress: bool = True, command: str | None = None,
              check_disk: bool = True) -> MergeResult:
    """Write the merge planned in ``mp`` (under a temporary name; renamed when complete)."""
    import torch
    from gptoss.progress import Stage

    out, base, adapter, plan = mp.out, mp.base, mp.adapter, mp.deltas
    shards = plan_shards(mp.entries, mp.shard_bytes)
    total = mp.total_bytes
    # the old merge (if any) stays until the new one is complete
    need = int(total * 1.02) + _side_bytes(base, adapter)
    free = records.free_bytes(out.parent)
    if check_disk and free < need:
        raise DiskSpaceError(f"merging needs about {records.human(need)} in {out.parent} but only "
                             f"{records.human(free)} is free; free space or pass --out on a larger disk")
    weights = mp.adapter.load_weights()
    out.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    merged_names: list[str] = []
    writing = {"file": "the output folder", "bytes": 0}  # for the disk-full message
    tmp = None
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's 0700 would hide the merged folder from other users (containers)
        names = (["model.safetensors"] if len(shards) == 1 else
                 [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
        weight_map = {}
        bar = Stage("merge", total=total, bytes_=True, enabled=progress)  # a bar on a terminal, else one line
        current_source = None
        for fname, shard in zip(names, shards):
            writing["file"] = fname
            writer = ShardWriter(tmp / fname, shard, metadata={"format": "pt"})
            try:
                for e in shard:
                    if current_source not in (None, mp.source_shard[e.name]):
                        base.release(current_source)  # unmap what we are done with
                    current_source = mp.source_shard[e.name]
                    t = base.load(e.name)
                    out_torch = torch_dtype(e.dtype)
                    if e.name in adapter.replacements:
                        t = weights[adapter.replacements[e.name][0]]
                    deltas = plan.get(e.name, [])
                    if any(d.kind in ("experts", "expert") for d in deltas):
                        # one expert at a time: float32 temporaries of 1/E of the tensor
                        merged_t = torch.empty(e.shape, dtype=out_torch)
                        for x in range(e.shape[0]):
                            w = t[x].to(torch.float32)
                            for d in deltas:
                                if d.kind == "experts":
                                    w += LoraAdapter.delta(d, weights, expert=x)
                                elif d.expert == x:
                                    w += LoraAdapter.delta(d, weights)
                            merged_t[x] = w.to(out_torch)
                        t = merged_t
                    elif deltas:
                        w = t.to(torch.float32, copy=True)
                        for d in deltas:
                            w += LoraAdapter.delta(d, weights)
                        t = w.to(out_torch)
                    else:
                        t = t.to(out_torch)
                    if deltas or e.name in adapter.replacements:
                        merged_names.append(e.name)
                    writer.write(e.name, t)
                    weight_map[e.name] = fname
                    writing["bytes"] += e.nbytes
                    bar.update(e.nbytes)
                    del t
                writer.close()
            except BaseException:
                writer.abort()
                raise
        bar.close()
        base.close()
        writing["file"] = "the index, config, tokenizer and merge record"
        if len(shards) > 1:
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            (tmp / INDEX).write_text(json.dumps(index, indent=2) + "\n")
        _write_config(base, tmp, mp.out_dtype)
        side = _copy_side_files(base, adapter, tmp)
        kinds: dict[str, int] = {}
        for deltas in plan.values():
            for d in deltas:
                kinds[d.kind] = kinds.get(d.kind, 0) + 1
        record = MergeInfo(
            inputs=mp.inputs_record,
            identity=mp.identity,
            run=mp.inputs.name,
            merge_into=mp.inputs_record["merge_into"],
            adapter_base_model=adapter.base_model,
            lora={"r": adapter.config.get("r"), "lora_alpha": adapter.config.get("lora_alpha"),
                  "target_modules": adapter.config.get("target_modules"),
                  "target_parameters": adapter.config.get("target_parameters"),
                  "deltas_by_kind": kinds, "replaced_tensors": sorted(adapter.replacements)},
            merged_tensors=len(merged_names),
            output={"files": names + ([INDEX] if len(shards) > 1 else []), "total_bytes": total,
                    "side_files": side},
            elapsed_s=round(time.perf_counter() - start, 3),
            peak_rss_bytes=records.peak_rss_bytes(),
            versions=records.versions(),
            command=command,
        )
        record.write(tmp)
        if out.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, trash / "old")
            os.replace(tmp, out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        partial = f"; the partial output {tmp.name} was removed" if tmp is not None else ""
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        now = records.free_bytes(out.parent)
        raise DiskSpaceError(
            f"the disk is full ({os.strerror(e.errno)}): merging into {out} needs about {records.human(need)} in "
            f"{out.parent}; {records.human(free)} was free when it started and it ran out writing {writing['file']} "
            f"after {records.human(writing['bytes'])} of weights{partial} ({records.human(now)} free now). Free at least "
            f"{records.human(max(need - now, 0))} there or pass --out on a larger disk, then run gptoss merge again"
        ) from e
    finally:
        if tmp is not None and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return MergeResult(out, False, record.to_dict())


def _side_bytes(base: BaseCheckpoint, adapter: LoraAdapter) -> int:
    """About what `_copy_side_files` and `_write_config` add beside the weights (the tokenizer is tens of MB)."""
    src = adapter.path if (adapter.path / "tokenizer.json").is_file() else base.path
    files = [src / n for n in TOKENIZER_FILES] + [base.path / "generation_config.json", base.path / "config.json"]
    return sum(f.stat().st_size for f in files if f.is_file()) + (1 << 20)  # + index, record, template


def merge_checkpoint(inputs: MergeInputs, out: Path, *, dtype: str = "bfloat16", max_shard_size: str | int = "5GB",
                     force: bool = False, progress: bool = True, command: str | None = None) -> MergeResult:
    """Merge ``inputs`` into ``out`` unless ``out`` already holds the same merge."""
    mp = prepare_merge(inputs, out, dtype=dtype, max_shard_size=max_shard_size)
    if mp.up_to_date and not force:
        return MergeResult(mp.out, True, mp.old_record.to_dict())
    return run_merge(mp, progress=progress, command=command)


def merge(run: str | None = None, *, base: str | None = None, adapter: str | None = None, out: str | None = None,
          dtype: str = "bfloat16", max_shard_size: str = "5GB", exports_dir: str | None = None,
          merge_into: MergeInto = "original", merge_base: str | None = None, force: bool = False) -> str:
    """Merge a LoRA adapter into its base: sharded 16-bit safetensors + tokenizer + chat template.

    Args:
        run: training run folder (models/<run>/ with adapter/ and training_info.json).
        base: instead of --run: the base model, a Hugging Face id or a local folder (bf16, MXFP4 or bnb 4-bit;
            transformers' fused layout or Unsloth's split one). The output is always the fused layout.
        adapter: instead of --run: the PEFT LoRA adapter folder.
        out: output folder (default exports/<run>/merged).
        dtype: bfloat16 (default), float16 or float32; 4-bit is refused (merge into 16-bit, then quantize).
        max_shard_size: largest output shard, e.g. 5GB.
        exports_dir: root of the exports tree (default ./exports).
        merge_into: for an adapter trained on a bitsandbytes 4-bit base: original (its 16-bit original, the
            default) or dequantized (the 4-bit base dequantized). Recorded in merge_info.json.
        merge_base: the 16-bit original to merge into (default: what training recorded, or the known
            original of the Hub id, e.g. unsloth/gpt-oss-20b-BF16 for unsloth/gpt-oss-20b-unsloth-bnb-4bit).
        force: merge again even if the output's record shows the same inputs.
    Returns:
        The merged folder.
    """
    check_dtype(dtype)
    inputs = resolve_inputs(run, base, adapter, merge_into=merge_into, merge_base=merge_base)
    target = Path(out) if out else export_root(inputs.name, exports_dir) / MERGED_DIR
    result = merge_checkpoint(inputs, target, dtype=dtype, max_shard_size=max_shard_size, force=force,
                              command=" ".join(["gptoss", "merge", *sys.argv[2:]]) if sys.argv[1:2] == ["merge"] else None)
    if result.skipped:
        print(f"merge: {result.merged_dir} already holds this merge ({MERGE_RECORD} matches); --force redoes it",
              file=sys.stderr)
    return str(result.merged_dir)
