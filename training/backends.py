"""Training backends: how the model is loaded, given LoRA, and asked for a loss.

Backends register themselves (``@register_backend``); ``gptoss train --backend`` picks one by
name. Both put LoRA on attention (q/k/v/o) and on the MoE experts, and both are checked the same
way afterwards (``lora_groups``, ``check_expert_lora``):

- ``transformers``: AutoModelForCausalLM (+ bitsandbytes 4-bit on CUDA) and PEFT. gpt-oss keeps
  each layer's experts as fused 3-D parameters (``mlp.experts.gate_up_proj`` [E, H, 2I] with
  gate/up interleaved, ``mlp.experts.down_proj`` [E, I, H]), so module names ``gate_proj`` or
  ``up_proj`` match nothing; PEFT ``target_parameters`` wraps the parameters themselves.
- ``unsloth``: FastLanguageModel. Unsloth's 4-bit gpt-oss splits the experts into per-expert
  Linear4bit modules (``mlp.experts.gate_up_projs.<i>``, ``mlp.experts.down_projs.<i>``), which are
  targeted as modules; a fused checkpoint loaded unquantised keeps ``target_parameters``.

Importing this module needs neither torch nor a GPU.
"""

from __future__ import annotations

import logging
import re
from typing import Any

from gptoss.errors import ToolchainError

log = logging.getLogger("gptoss.train")

ATTENTION_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
EXPERT_PARAMETERS = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")
_SPLIT_EXPERT = re.compile(r"(?:^|\.)experts\.(gate_up_projs|down_projs)\.(\d+)$")


class BackendError(ToolchainError):
    """A backend that cannot run here, or a model it cannot train as asked."""


BACKENDS: dict[str, type["Backend"]] = {}


def register_backend(name: str):
    def wrap(cls):
        cls.name = name
        BACKENDS[name] = cls
        return cls

    return wrap


def get_backend(name: str) -> "Backend":
    if name not in BACKENDS:
        raise BackendError(f"--backend: unknown backend {name!r}; known backends: {', '.join(BACKENDS)}")
    return BACKENDS[name]()


class Backend:
    name = "?"
    default_model = ""
    targets: tuple[list[str], list[str]] = ([], [])  # (target_modules, target_parameters) used by wrap()

    def problem(self, device: str) -> str | None:
        """Why this backend cannot run on ``device`` here, or None."""
        return None

    def prepare(self) -> None:
        """Imports that must happen before transformers is imported."""

    def load(self, cfg) -> Any:
        raise NotImplementedError

    def wrap(self, model, cfg) -> Any:
        raise NotImplementedError

    def loss(self, model, input_ids, attention_mask, labels):
        """(sum of token losses over supervised positions, number of those positions)."""
        raise NotImplementedError


def torch_dtype(cfg):
    import torch

    name = cfg.dtype
    if name == "auto":
        name = "bfloat16" if cfg.device == "cuda" else "float32"
    return getattr(torch, name)


def _gradient_checkpointing(model, cfg) -> None:
    if cfg.gradient_checkpointing == "off":
        return
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False


def _shifted_token_loss(hidden, lm_head, labels):
    """Cross-entropy summed over the supervised positions only: logits are never built for the prompt."""
    import torch.nn.functional as F

    targets = labels[:, 1:]
    keep = targets != -100
    logits = lm_head(hidden[:, :-1][keep]).float()
    return F.cross_entropy(logits, targets[keep], reduction="sum"), int(keep.sum())


def expert_layout(model) -> str:
    """"fused" (3-D expert parameters), "split" (per-expert Linear modules) or "none"."""
    for name, _ in model.named_modules():
        if _SPLIT_EXPERT.search(name):
            return "split"
    for name, _ in model.named_parameters():
        if name.endswith(EXPERT_PARAMETERS):
            return "fused"
    return "none"


def split_expert_targets(model, which: tuple[str, ...] = ("gate_up_projs", "down_projs")) -> list[str]:
    found = set()
    for name, _ in model.named_modules():
        m = _SPLIT_EXPERT.search(name)
        if m and m.group(1) in which:
            found.add(f"{m.group(1)}.{m.group(2)}")
    return sorted(found, key=lambda t: (t.split(".")[0], int(t.split(".")[1])))


def lora_targets(model, cfg) -> tuple[list[str], list[str]]:
    """(target_modules, target_parameters) for this model and ``--lora-targets``."""
    modules: list[str] = list(ATTENTION_MODULES) if cfg.lora_targets in ("all", "attention") else []
    parameters: list[str] = []
    if cfg.lora_targets in ("all", "experts"):
        layout = expert_layout(model)
        if layout == "fused":
            parameters = list(EXPERT_PARAMETERS)
        elif layout == "split":
            modules += split_expert_targets(model)
        else:
            raise BackendError(
                f"{cfg.model}: found no MoE expert weights (neither {', '.join(EXPERT_PARAMETERS)} nor "
                f"per-expert experts.gate_up_projs/down_projs modules); is this a gpt-oss checkpoint? "
                f"Use --lora-targets attention to train attention only"
            )
    return modules, parameters


def resolved_targets(peft_model) -> tuple[list[str], list[str]]:
    """(target_modules, target_parameters) as PEFT recorded them after wrapping."""
    pc = peft_model.peft_config["default"]
    modules = pc.target_modules
    modules = [modules] if isinstance(modules, str) else sorted(modules or [])
    return modules, list(getattr(pc, "target_parameters", None) or [])


# ---------------------------------------------------------------------------------------------
# What got LoRA, by group


def _group_of(name: str, module) -> str | None:
    from peft.tuners.lora import LoraLayer

    param_name = getattr(module, "parameter_name", None)
    if isinstance(module, LoraLayer) and param_name:  # ParamWrapper around a fused expert parameter
        return "experts." + param_name.rsplit(".", 1)[-1]
    m = _SPLIT_EXPERT.search(name)
    if m:
        return "experts." + m.group(1)[:-1]  # gate_up_projs -> gate_up_proj
    if name.rsplit(".", 1)[-1] in ATTENTION_MODULES:
        return "attention"
    return None


def lora_groups(model) -> dict[str, dict[str, Any]]:
    """Trainable parameters by group ("attention", "experts.gate_up_proj", "experts.down_proj",
    "other"): count of parameters and tensors and the norm of the LoRA B matrices (zero at init)."""
    import torch

    owners = {name: _group_of(name, module) for name, module in model.named_modules()}
    groups: dict[str, dict[str, Any]] = {}
    b_sq: dict[str, float] = {}
    for pname, p in model.named_parameters():
        if not p.requires_grad:
            continue
        owner = pname.split(".lora_")[0] if ".lora_" in pname else pname.rsplit(".", 1)[0]
        group = owners.get(owner) or "other"
        g = groups.setdefault(group, {"parameters": 0, "tensors": 0})
        g["parameters"] += p.numel()
        g["tensors"] += 1
        if ".lora_B" in pname:
            with torch.no_grad():
                b_sq[group] = b_sq.get(group, 0.0) + float(p.detach().float().pow(2).sum())
    for group, g in groups.items():
        g["lora_B_norm"] = b_sq.get(group, 0.0) ** 0.5
    return dict(sorted(groups.items()))


def expert_parameters(groups: dict[str, dict[str, Any]]) -> int:
    return sum(g["parameters"] for k, g in groups.items() if k.startswith("experts."))


def check_expert_lora(groups: dict[str, dict[str, Any]], cfg) -> None:
    """Fail unless the experts got trainable LoRA (attention-only runs excepted)."""
    if cfg.lora_targets == "attention":
        return
    missing = [g for g in ("experts.gate_up_proj", "experts.down_proj") if groups.get(g, {}).get("parameters", 0) == 0]
    if missing:
        raise BackendError(
            f"LoRA did not reach the MoE experts ({', '.join(missing)} have no trainable parameters; got "
            f"{ {k: v['parameters'] for k, v in groups.items()} }); the adapter would leave the experts untouched. "
            f"Use --lora-targets attention if that is what you want"
        )


def log_groups(groups: dict[str, dict[str, Any]], title: str) -> None:
    total = sum(g["parameters"] for g in groups.values())
    parts = ", ".join(f"{k} {v['parameters']:,} ({v['tensors']} tensors)" for k, v in groups.items())
    log.info("%s: %s trainable parameters: %s", title, f"{total:,}", parts)


# ---------------------------------------------------------------------------------------------
# Backends


@register_backend("transformers")
class TransformersBackend(Backend):
    """transformers + PEFT; bitsandbytes 4-bit for the non-expert linears on CUDA."""

    default_model = "openai/gpt-oss-20b"

    def problem(self, device: str) -> str | None:
        import importlib.util

        if importlib.util.find_spec("peft") is None:
            return "--backend transformers needs peft: pip install 'gptoss-toolchain[train]'"
        return None

    def load(self, cfg):
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        kwargs: dict[str, Any] = {"revision": cfg.revision, "dtype": torch_dtype(cfg)}
        if cfg.device == "cuda":
            kwargs["device_map"] = {"": torch.cuda.current_device()}  # this process's GPU (0 unless data-parallel)
        hf_config = AutoConfig.from_pretrained(cfg.model, revision=cfg.revision)
        quant = getattr(hf_config, "quantization_config", None) or {}
        quant_method = quant.get("quant_method") if isinstance(quant, dict) else getattr(quant, "quant_method", None)
        if quant_method == "mxfp4":
            from transformers import Mxfp4Config

            # LoRA needs real-valued weights to differentiate through; the MXFP4 experts are dequantised to bf16.
            kwargs["quantization_config"] = Mxfp4Config(dequantize=True)
            if cfg.load_in_4bit:
                log.warning("%s is MXFP4: dequantising to %s; --load-in-4bit is not applied on top", cfg.model, kwargs["dtype"])
        elif cfg.load_in_4bit:
            from transformers import BitsAndBytesConfig

            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type="nf4",
                bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=torch.bfloat16,
            )
        model = AutoModelForCausalLM.from_pretrained(cfg.model, **kwargs)
        if cfg.device == "cpu":
            model.to("cpu")
        _gradient_checkpointing(model, cfg)
        return model

    def wrap(self, model, cfg):
        from peft import LoraConfig, get_peft_model

        modules, parameters = lora_targets(model, cfg)
        lora = LoraConfig(
            r=cfg.rank,
            lora_alpha=cfg.lora_alpha,
            lora_dropout=cfg.lora_dropout,
            use_rslora=cfg.use_rslora,
            bias="none",
            task_type="CAUSAL_LM",
            target_modules=modules or None,
            target_parameters=parameters or None,
        )
        model = get_peft_model(model, lora)
        self.targets = resolved_targets(model)
        model.train()
        return model

    def loss(self, model, input_ids, attention_mask, labels):
        base = model.get_base_model()
        hidden = base.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        return _shifted_token_loss(hidden, base.lm_head, labels)


@register_backend("unsloth")
class UnslothBackend(Backend):
    """Unsloth FastLanguageModel (CUDA only): 4-bit split experts, Unsloth gradient checkpointing."""

    default_model = "unsloth/gpt-oss-20b-unsloth-bnb-4bit"

    def problem(self, device: str) -> str | None:
        if device != "cuda":
            return "--backend unsloth runs on CUDA only; use --backend transformers (or --backend auto) on this machine"
        import importlib.util

        if importlib.util.find_spec("unsloth") is None:
            return "--backend unsloth: the unsloth package is not installed (pip install unsloth, or use the train container)"
        return None

    def prepare(self) -> None:
        import unsloth  # noqa: F401  (patches transformers; must be imported first)

    def load(self, cfg):
        import torch
        import torch.distributed as dist
        from unsloth import FastLanguageModel

        extra: dict[str, Any] = {}
        if dist.is_initialized():  # data-parallel: the whole copy on this process's GPU
            extra["device_map"] = {"": torch.cuda.current_device()}
        model, _tokenizer = FastLanguageModel.from_pretrained(
            model_name=cfg.model,
            revision=cfg.revision,
            max_seq_length=cfg.max_seq_length,
            dtype=None if cfg.dtype == "auto" else torch_dtype(cfg),
            load_in_4bit=bool(cfg.load_in_4bit),
            full_finetuning=False,
            **extra,
        )
        return model

    def wrap(self, model, cfg):
        from unsloth import FastLanguageModel

        modules, parameters = lora_targets(model, cfg)
        if expert_layout(model) == "split" and cfg.lora_targets != "attention":
            # Unsloth maps the MLP names onto its per-expert modules (experts.gate_up_projs.<i>,
            # experts.down_projs.<i>) and runs them through its fused MoE LoRA path; listing the
            # 64 modules ourselves would route them around it. The check after wrapping verifies.
            modules = [m for m in modules if m in ATTENTION_MODULES] + ["gate_proj", "up_proj", "down_proj"]
        gc = {"unsloth": "unsloth", "on": True, "off": False}[cfg.gradient_checkpointing]
        model = FastLanguageModel.get_peft_model(
            model,
            r=cfg.rank,
            target_modules=modules,
            target_parameters=parameters,  # [] stops Unsloth from guessing its own
            lora_alpha=cfg.lora_alpha,
            lora_dropout=cfg.lora_dropout,
            bias="none",
            use_gradient_checkpointing=gc,
            random_state=cfg.seed,
            use_rslora=cfg.use_rslora,
            max_seq_length=cfg.max_seq_length,
        )
        self.targets = resolved_targets(model)
        model.train()
        return model

    def loss(self, model, input_ids, attention_mask, labels):
        out = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, use_cache=False)
        n = int((labels[:, 1:] != -100).sum())
        return out.loss * n, n  # Unsloth's fused loss is the mean over supervised tokens
