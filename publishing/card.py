"""The model card (README.md): what the records say, built with huggingface_hub's ModelCard."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gptoss.hubid import is_hub_id as _is_hub_id
from gptoss.machine import package_version
from gptoss.records import EvalRecord, Published
from gptoss.publishing.records import DEFAULT_TAG, WHATS, _human_size

if TYPE_CHECKING:
    from gptoss.publishing.plan import PublishPlan



def _public(value: Any) -> Any:
    """Local absolute paths reduced to their last component: cards must not leak home folders."""
    if isinstance(value, dict):
        return {k: _public(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_public(v) for v in value]
    if isinstance(value, str) and (value.startswith(("/", "~")) or re.match(r"^[A-Za-z]:\\", value)):
        return f"<local>/{Path(value).name}"
    return value


def _fmt(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _toolchain_version() -> str:
    return package_version("gptoss-toolchain") or "unknown"


def _published(folder: Path | None) -> dict:
    if folder is None or not Published.exists(folder):
        return {}
    record = Published.try_load(folder, [])  # unreadable: the card links nothing published
    if record is None:
        return {}
    from huggingface_hub import constants

    return {k: dataclasses.asdict(v) for k in WHATS if (v := getattr(record, k)) is not None
            and v.endpoint == constants.ENDPOINT}


def card_metadata(plan: PublishPlan) -> dict:
    """The YAML header: what the Hub indexes (base model lineage, library, license, data, tags)."""
    training = plan.training
    base = training.base_model if training else plan.manifest.base_model if plan.manifest else None
    base = base if isinstance(base, str) else None
    relation = {"adapter": "adapter", "merged": "finetune", "gguf": "quantized"}[plan.what]
    base_model = base if _is_hub_id(base) else None
    if plan.what == "gguf" and plan.merged_repo:
        base_model = plan.merged_repo  # quantized from our merged fine-tune, which points at the base
    tags = ["gpt-oss", "harmony", "gptoss-toolchain"]
    tags += {"adapter": ["lora", "peft"], "merged": ["safetensors"], "gguf": ["gguf", "llama.cpp", "ollama"]}[plan.what]
    if training and (training.backend == "unsloth" or (base or "").lower().startswith("unsloth/")):
        tags.append("unsloth")
    meta: dict[str, Any] = {
        "base_model": base_model,
        "library_name": {"adapter": "peft", "merged": "transformers", "gguf": "gguf"}[plan.what],
        "pipeline_tag": "text-generation",
        "license": "apache-2.0",
        "tags": tags,
    }
    if base_model:
        meta["base_model_relation"] = relation
    if training and _is_hub_id(training.dataset_id):
        meta["datasets"] = [training.dataset_id]
    return meta


def build_card_text(plan: PublishPlan) -> str:
    from huggingface_hub import ModelCardData

    meta = card_metadata(plan)
    data = ModelCardData(**{k: v for k, v in meta.items() if v is not None})
    body = _card_body(plan)
    return f"---\n{data.to_yaml()}\n---\n\n{body}"


def _card_body(plan: PublishPlan) -> str:
    t = plan.training
    repo = plan.repo_id
    base = t.base_model if t else (plan.manifest.base_model if plan.manifest else None)
    base_shown = base if _is_hub_id(base) else _public(base) or "(not recorded)"
    dataset_shown = (t.dataset_id if _is_hub_id(t.dataset_id) else _public(t.dataset_id)) if t else None
    kind_line = {
        "adapter": f"A LoRA adapter for `{base_shown}`",
        "merged": f"`{base_shown}` with a LoRA fine-tune merged into bf16 weights",
        "gguf": f"GGUF quantizations of a fine-tune of `{base_shown}`"
        + (f" (converted from [`{plan.merged_repo}`](https://huggingface.co/{plan.merged_repo}))" if plan.merged_repo else ""),
    }[plan.what]
    out = [f"# {repo.split('/')[1]}", ""]
    data_part = f", trained on `{dataset_shown}`" if dataset_shown else ""
    out += [
        f"{kind_line}{data_part}, made with gptoss-toolchain from run `{plan.run_name}`.",
        "",
        "gpt-oss speaks the [Harmony](https://github.com/openai/harmony) chat format: use the chat template "
        "shipped here (or the Modelfile / `template` for Ollama) and stop on `<|return|>` / `<|call|>`, "
        "not `<|end|>`. Reasoning goes to the `analysis` channel, the answer to `final`.",
        "",
    ]
    if plan.what == "gguf":
        out += _quant_section(plan)
    out += _usage_section(plan, base_shown)
    out += _training_section(plan)
    out += _eval_section(plan)
    out += _provenance_section(plan)
    out += [
        "## License",
        "",
        "Apache-2.0, as the gpt-oss-20b base model. Check the license of the training data before reuse.",
        "",
    ]
    return "\n".join(out)


def _quant_section(plan: PublishPlan) -> list[str]:
    m = plan.manifest
    prompts = f"{m.fidelity_prompts} fixed Harmony prompts" if m and m.fidelity_prompts else "a fixed Harmony prompt set"
    out = [
        "## Quantizations",
        "",
        "Figures from the export record (`manifest.json`): size, tensor types, how many tensors fell back "
        f"to another type, and fidelity of the logits on {prompts} against the reference below "
        "(NMSE, mean KL divergence, top-1 agreement).",
        "",
        "| Tag | File | Size | Tensor types | Fallbacks | NMSE | KL | Top-1 | sha256 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    any_fallback = False
    references: dict[str, list[str]] = {}
    failed = []
    for e in plan.ggufs:
        a = e.artifact
        fid = a.fidelity or {}
        types = ", ".join(f"{k}×{v}" for k, v in sorted((a.tensor_types or {}).items(), key=lambda kv: -kv[1])) or "n/a"
        fallbacks = a.fallbacks
        if isinstance(fallbacks, list):
            fallbacks = len(fallbacks)
        any_fallback |= bool(fallbacks)
        if isinstance(fid.get("nmse"), (int, float)):
            top1 = fid.get("top1")
            top1 = f"{top1 * 100:.1f}%" if isinstance(top1, (int, float)) else _fmt(top1)
            nmse, kl = _fmt(fid.get("nmse")), _fmt(fid.get("kl"))
            references.setdefault(str(fid.get("reference") or "not recorded"), []).append(e.tag)
            if fid.get("passed") is False:
                failed.append(e.tag)
        elif a.quant in ("F16", "BF16", "F32"):
            nmse = kl = top1 = "ref."  # not measured itself; the reference the other quants are measured against
        else:
            nmse = kl = top1 = "n/a"
        out.append(
            f"| `{e.tag}` | `{e.file.path_in_repo}` | {_human_size(e.file.size or 0)} | {types} | {_fmt(fallbacks)} "
            f"| {nmse} | {kl} | {top1} | `{e.file.sha256[:12]}` |"
        )
    out.append("")
    if references:
        out += ["Fidelity references: " + "; ".join(
            f"{', '.join(f'`{t}`' for t in tags)} against {f'`{ref}`' if ref.endswith('.gguf') else ref}"
            for ref, tags in references.items()) + ".", ""]
    if failed:
        out += [f"{', '.join(f'`{t}`' for t in failed)} did not meet the export's fidelity thresholds "
                "(recorded in `manifest.json`); prefer another quant.", ""]
    if any_fallback:
        out += [
            "Fallbacks are tensors that the quant type could not hold: K-quants need rows that are multiples "
            "of 256 and gpt-oss-20b's width 2880 is not, so llama.cpp stores those tensors in another type "
            "(for example Q5_0/Q5_1). The counts above say how many.",
            "",
        ]
    return out


def _usage_section(plan: PublishPlan, base_shown: str) -> list[str]:
    repo = plan.repo_id
    out = ["## Usage", ""]
    tokenizer_call = (
        'inputs = tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=True,\n'
        '                                 return_tensors="pt", reasoning_effort="medium").to(model.device)\n'
        "out = model.generate(**inputs, max_new_tokens=512)\n"
        'print(tok.decode(out[0, inputs["input_ids"].shape[1]:]))'
    )
    messages = 'messages = [{"role": "user", "content": "Explain MoE routing in two sentences."}]'
    serve_request = (
        "curl -s localhost:8000/v1/chat/completions -H 'Content-Type: application/json' \\\n"
        "  -d '{\"model\": \"gpt-oss\", \"messages\": [{\"role\": \"user\", \"content\": \"Hello\"}], "
        "\"reasoning_effort\": \"low\"}'\n"
        "# message.content is the final answer, message.reasoning_content the analysis, tool calls in tool_calls"
    )
    if plan.what == "adapter":
        out += [
            "### transformers + PEFT", "", "```python",
            "from peft import PeftModel",
            "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
            f'base = AutoModelForCausalLM.from_pretrained("{base_shown}", torch_dtype="auto", device_map="auto")',
            f'model = PeftModel.from_pretrained(base, "{repo}")',
            f'tok = AutoTokenizer.from_pretrained("{repo}")',
            messages, tokenizer_call, "```", "",
            "### llama.cpp and Ollama", "",
            "Use the GGUF repo published from the same run, if there is one, or merge into bf16 weights "
            "(never into 4-bit) and convert with llama.cpp:", "", "```bash",
            f"hf download {repo} --local-dir adapter",
            f"gptoss merge --base {base_shown} --adapter adapter --out merged",
            *_convert_lines(), "```", "",
            "### gptoss serve (OpenAI-compatible API)", "", "```bash",
            f"hf download {repo} --local-dir adapter",
            f"gptoss serve --backend transformers --model {base_shown} --adapter adapter --port 8000",
            serve_request, "```", "",
        ]
    elif plan.what == "merged":
        out += [
            "### transformers", "", "```python",
            "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
            f'model = AutoModelForCausalLM.from_pretrained("{repo}", torch_dtype="auto", device_map="auto")',
            f'tok = AutoTokenizer.from_pretrained("{repo}")',
            messages, tokenizer_call, "```", "",
            "### llama.cpp and Ollama", "",
            "Use the GGUF repo published from the same run, if there is one, or convert with llama.cpp:", "",
            "```bash", f"hf download {repo} --local-dir merged", *_convert_lines(), "```", "",
            "### gptoss serve (OpenAI-compatible API)", "", "```bash",
            f"hf download {repo} --local-dir merged",
            "gptoss serve --backend transformers --model merged --port 8000",
            serve_request, "```", "",
        ]
    else:
        tags = [e.tag for e in plan.ggufs]
        tag = DEFAULT_TAG if DEFAULT_TAG in tags else tags[0]
        entry = next(e for e in plan.ggufs if e.tag == tag)
        gguf_name, modelfile_name = entry.file.path_in_repo, entry.modelfile.path_in_repo
        transformers_hint = (
            f"Load the merged safetensors from [`{plan.merged_repo}`](https://huggingface.co/{plan.merged_repo})."
            if plan.merged_repo else
            "Use the merged safetensors published from the same run (`gptoss publish --what merged`)."
        )
        out += [
            "Every quant is served by tag: " + ", ".join(f"`hf.co/{repo}:{t}`" for t in tags)
            + (f" (`{DEFAULT_TAG}` is the default)." if DEFAULT_TAG in tags else "."), "",
            "### llama.cpp", "", "```bash",
            f"llama-server -hf {repo}:{tag} --jinja",
            f"llama-cli -hf {repo}:{tag} --jinja", "```", "",
            "### Ollama", "",
            "Straight from the Hub (the repo's `template` and `params` files carry the Harmony template and "
            "the gpt-oss sampling defaults):", "", "```bash",
            f"ollama run hf.co/{repo}:{tag}", "```", "",
            "or with the Modelfile shipped next to each GGUF:", "", "```bash",
            f"hf download {repo} {gguf_name} {modelfile_name} --local-dir .",
            f"ollama create {repo.split('/')[1].lower()} -f {modelfile_name}",
            f"ollama run {repo.split('/')[1].lower()} --think high", "```", "",
            "### transformers", "", transformers_hint, "",
            "### gptoss serve (OpenAI-compatible API)", "", "```bash",
            f"hf download {repo} {gguf_name} --local-dir .",
            f"gptoss serve --backend llamacpp --model {gguf_name} --port 8000",
            serve_request, "```", "",
        ]
    return out


def _convert_lines() -> list[str]:
    return [
        "python convert_hf_to_gguf.py merged --outtype f16 --outfile model-F16.gguf   # llama.cpp's converter",
        "llama-quantize model-F16.gguf model-Q4_K_M.gguf Q4_K_M",
        "# then a Modelfile that speaks Harmony: gptoss modelfile --gguf model-Q4_K_M.gguf",
    ]


def _training_section(plan: PublishPlan) -> list[str]:
    t = plan.training
    out = ["## Training", ""]
    if t is None:
        return out + ["No gptoss training record was found for this export, so the training is not described here.", ""]
    rows = [
        ("Run", f"`{t.name}`"),
        ("Base model", f"`{t.base_model if _is_hub_id(t.base_model) else _public(t.base_model)}`"
         + (f" @ `{t.base_revision}`" if t.base_revision else " (revision not recorded)")),
        ("Dataset", f"`{t.dataset_id if _is_hub_id(t.dataset_id) else _public(t.dataset_id)}`"
         + (f" @ `{t.dataset_revision}`" if t.dataset_revision else "")),
        ("Dataset content sha256", f"`{t.dataset_hash}`"),
        ("Backend", _fmt(t.backend)),
        ("Steps", _fmt(t.steps)),
    ]
    ac = plan.adapter_config
    if ac:
        targets = ac.get("target_modules")
        targets = sorted(targets) if isinstance(targets, list) else targets
        rows += [
            ("LoRA rank / alpha", f"{_fmt(ac.get('r'))} / {_fmt(ac.get('lora_alpha'))}"
             + (" (rsLoRA)" if ac.get("use_rslora") else "")),
            ("LoRA target modules", f"`{targets}`"),
            ("LoRA target parameters (experts)", f"`{ac.get('target_parameters') or 'none'}`"),
        ]
    m = plan.manifest
    if m is not None and m.merge_into in ("original", "dequantized"):
        shown = m.base_model if _is_hub_id(m.base_model or "") else _public(m.base_model or "")
        rows.append(("Merged into", f"the 16-bit original `{shown}` of the 4-bit base trained on" if m.merge_into == "original"
                     else "the 4-bit base trained on, dequantized (`--merge-into dequantized`)"))
    rows += [(k, _fmt(v)) for k, v in t.metrics.items()]
    out += ["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows] + [""]
    if t.loss:
        out += ["Loss summary:", "", "| | |", "|---|---|"] + [f"| {k} | {_fmt(v)} |" for k, v in t.loss.items()] + [""]
    else:
        out += ["Loss summary: not recorded.", ""]
    if t.config:
        out += [
            "<details><summary>Resolved training configuration</summary>", "", "```json",
            json.dumps(_public(t.config), indent=2, sort_keys=True), "```", "", "</details>", "",
        ]
    return out


def _eval_record(plan: PublishPlan) -> EvalRecord | None:
    """eval.json of `gptoss eval`: beside training_info.json, else beside the export's manifest."""
    for folder in (plan.training.run_dir if plan.training else None, plan.record_dir):
        if folder is not None and EvalRecord.exists(folder):
            return EvalRecord.try_load(folder, [])  # unreadable: the card shows no evaluation
    return None


def _eval_section(plan: PublishPlan) -> list[str]:
    """The `gptoss eval` table, when the run was evaluated."""
    record = _eval_record(plan)
    if record is None or not (record.artifacts or record.generation or record.harness):
        return []
    d = record.data
    rows = "the rows training held out" if d.get("source") == "held-out" else f"`{_public(d.get('path'))}`"
    out = ["## Evaluation", ""]
    if record.artifacts:
        out += [f"Loss on {rows} ({_fmt(d.get('examples'))} rows, {_fmt(d.get('tokens'))} assistant tokens of the last "
                f"turn, masked as in training), by `gptoss eval`{f' on {record.created[:10]}' if record.created else ''}. "
                "Lower is better; Δ vs merged is what each quant cost.", "",
                "| artifact | mean loss | perplexity | Δ vs base | Δ vs merged |", "|---|---|---|---|---|"]
        for a in record.artifacts:
            signed = lambda x: "" if x is None else f"{x:+.4f}"  # noqa: E731
            out.append(f"| {a.name} | {a.mean_loss:.4f} | {a.perplexity:.4g} | {signed(a.delta_vs_base)} | "
                       f"{signed(a.delta_vs_merged)} |")
        out.append("")
    gen = record.generation or {}
    if gen.get("models"):
        out += ["Generation checks through the serving API (temperature 0, seed "
                f"{_fmt(gen.get('seed'))}, {_fmt(gen.get('prompts'))} prompts):", "",
                "| model | well-formed Harmony | exact | contains | token F1 | answer chars |", "|---|---|---|---|---|---|"]
        for name, m in gen["models"].items():
            out.append(f"| {name} | {_fmt(m.get('well_formed'))} | {_fmt(m.get('exact'))} | {_fmt(m.get('contains'))} | "
                       f"{_fmt(m.get('token_f1'))} | {_fmt(m.get('answer_chars'))} |")
        out.append("")
    h = record.harness or {}
    if h.get("metrics"):
        out += [f"lm-evaluation-harness task `{h.get('task')}`:", "", "| metric | value |", "|---|---|"]
        out += [f"| {k} | {_fmt(v)} |" for k, v in h["metrics"].items()] + [""]
    return out


def _provenance_section(plan: PublishPlan) -> list[str]:
    out = ["## Provenance", "", f"Published by gptoss-toolchain {_toolchain_version()} from run `{plan.run_name}`.", ""]
    m = plan.manifest
    if m is not None:
        out += [f"- llama.cpp commit: `{m.llama_cpp_commit or 'not recorded'}`"]
        if m.base_model:
            shown = m.base_model if _is_hub_id(m.base_model) else _public(m.base_model)
            out.append(f"- base model merged into: `{shown}`" + (f" @ `{m.base_revision}`" if m.base_revision else ""))
        if m.adapter_sha256:
            out.append(f"- adapter weights (`adapter_model.safetensors`) sha256: `{m.adapter_sha256}`")
        if m.merge_identity:
            out.append(f"- merge identity (hash of the merge inputs and settings): `{m.merge_identity}`")
        out.append("")
    versions: dict[str, dict] = {}
    if plan.training:
        versions["training"] = plan.training.versions
    if m is not None:
        versions["export"] = m.versions
    for stage, table in versions.items():
        if table:
            out += [f"Package versions ({stage}):", "", "| package | version |", "|---|---|"]
            out += [f"| {k} | {_fmt(v)} |" for k, v in sorted(table.items())] + [""]
    out += ["Files (sha256):", "", "| file | size | sha256 |", "|---|---|---|"]
    out += [f"| `{f.path_in_repo}` | {f.size} | `{f.sha256}` |" for f in plan.files] + [""]
    return out


