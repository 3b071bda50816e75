"""A saved PEFT LoRA adapter, checked against a base and turned into per-tensor weight deltas.

The delta math is PEFT's (peft/tuners/lora/layer.py):
- ``target_modules`` (nn.Linear): ``delta = B @ A * scaling``, shape ``(out, in)`` like ``weight``.
- ``target_parameters`` (``lora.ParamWrapper``) on gpt-oss's fused 3-D experts, stored ``(E, in, out)``
  (transformers marks them ``is_transposed``, so PEFT does not swap in/out): ``A`` is ``(r*E, in)``,
  read as ``(E, r, in)``; ``B`` is ``(out, r*E)``, read as ``(out, r, E)``;
  ``delta = einsum("o r e, e r i -> e i o", B, A) * scaling``.
  Several parameters of one module are nested wrappers (``experts.base_layer...``); each pair is
  matched to its parameter by shape (gate_up ``in=H,out=2I`` and down ``in=I,out=H`` never coincide).
  The orientation assumes transformers' ``is_transposed`` GptOssExperts (checked in 5.17 and 5.23);
  with an experts class lacking it PEFT would swap in/out: gate_up would then not fit (an error
  here), but down_proj (in = out = 2880 on gpt-oss-20b) could not be told apart by shape.
- ``target_modules`` on Unsloth's split experts (``experts.gate_up_projs.<i>``, ``experts.down_projs.<i>``,
  one ``nn.Linear`` (out, in) per expert; gptoss/layouts.py): each pair is a Linear delta ``B @ A * scaling``
  that folds into expert ``i`` of the fused parameter, transposed: ``W[i] (in, out) += (B @ A * scaling)^T``
  (as unsloth_zoo's saving_utils merges them); ``router.linear`` folds into ``router.weight``.
- ``scaling = lora_alpha / r`` (``/ sqrt(r)`` with ``use_rslora``), per-key ``rank_pattern``/``alpha_pattern``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path

from gptoss.exporters.errors import AdapterMismatchError, MissingFilesError, UnsupportedAdapterError
from gptoss import layouts

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<ab>A|B)(?:\.(?P<adapter>[^.]+))?\.weight$")
# Config switches the streaming merge does not implement; each must be off.
_UNSUPPORTED = {
    "use_dora": "DoRA (use_dora)",
    "lora_bias": "LoRA biases (lora_bias)",
    "fan_in_fan_out": "fan_in_fan_out",
    "use_qalora": "QA-LoRA (use_qalora)",
    "alora_invocation_tokens": "aLoRA (alora_invocation_tokens)",
    "layer_replication": "layer_replication",
    "trainable_token_indices": "trainable_token_indices",
}
MAX_LISTED = 4


def _pattern_key(patterns, key: str) -> str | None:
    """PEFT's get_pattern_key: the first pattern that matches the end of ``key`` at a dot boundary."""
    for pattern in patterns:
        if re.match(rf"(.*\.)?({pattern})$", key):
            return pattern
    return None


@dataclasses.dataclass
class LoraPair:
    module: str  # module path without PEFT prefix and base_layer segments
    depth: int  # number of ".base_layer" segments (nesting of ParamWrappers)
    a_key: str
    b_key: str
    a_shape: tuple[int, ...]
    b_shape: tuple[int, ...]


@dataclasses.dataclass
class Delta:
    """How to build the delta of one base tensor."""

    target: str  # base tensor name
    pair: LoraPair
    kind: str  # "linear" (2-D), "experts" (3-D, all experts) or "expert" (one split expert's Linear)
    rank: int
    scaling: float
    expert: int | None = None  # kind "expert": which expert of the fused target


def _listed(items: list[str]) -> str:
    more = f" (+{len(items) - MAX_LISTED} more)" if len(items) > MAX_LISTED else ""
    return "; ".join(items[:MAX_LISTED]) + more


class LoraAdapter:
    """adapter_config.json + adapter_model.safetensors (tokenizer files optional)."""

    def __init__(self, path: str | Path):
        self.path = Path(path).expanduser().absolute()
        if not self.path.is_dir():
            raise MissingFilesError(f"adapter folder {self.path} does not exist; pass --adapter DIR (a PEFT save_pretrained folder)")
        missing = [n for n in (ADAPTER_CONFIG, ADAPTER_WEIGHTS) if not (self.path / n).is_file()]
        if ADAPTER_WEIGHTS in missing and (self.path / "adapter_model.bin").is_file():
            raise MissingFilesError(
                f"{self.path} holds adapter_model.bin (pickle); re-save the adapter with safetensors "
                "(peft_model.save_pretrained(dir, safe_serialization=True))"
            )
        if missing:
            raise MissingFilesError(f"adapter folder {self.path} lacks {', '.join(missing)}; "
                                    "it must be a PEFT LoRA adapter saved with save_pretrained")
        try:
            self.config: dict = json.loads((self.path / ADAPTER_CONFIG).read_text())
        except json.JSONDecodeError as e:
            raise MissingFilesError(f"{self.path / ADAPTER_CONFIG} is not valid JSON ({e})") from e
        self._check_config()
        self.pairs, self.replacements = self._read_keys()

    # -- config ------------------------------------------------------------------------------
    def _check_config(self) -> None:
        cfg = self.config
        where = self.path / ADAPTER_CONFIG
        if cfg.get("peft_type", "LORA") != "LORA":
            raise UnsupportedAdapterError(f"{where}: peft_type {cfg.get('peft_type')!r}; merge handles LoRA adapters only")
        problems = [label for key, label in _UNSUPPORTED.items() if cfg.get(key)]
        if problems:
            raise UnsupportedAdapterError(f"{where}: {', '.join(problems)} not supported by the streaming merge; "
                                          "train with plain LoRA (the gpt-oss profiles do)")
        if not isinstance(cfg.get("r"), int) or cfg["r"] <= 0:
            raise MissingFilesError(f"{where}: 'r' must be a positive integer, got {cfg.get('r')!r}")

    def rank_and_scaling(self, key: str) -> tuple[int, float]:
        cfg = self.config
        rp = _pattern_key((cfg.get("rank_pattern") or {}).keys(), key)
        ap = _pattern_key((cfg.get("alpha_pattern") or {}).keys(), key)
        r = cfg["rank_pattern"][rp] if rp else cfg["r"]
        alpha = cfg["alpha_pattern"][ap] if ap else cfg.get("lora_alpha", 8)
        scaling = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
        return r, scaling

    @property
    def base_model(self) -> str | None:
        return self.config.get("base_model_name_or_path")

    # -- weights -----------------------------------------------------------------------------
    def _read_keys(self) -> tuple[list[LoraPair], dict[str, tuple[str, tuple[int, ...]]]]:
        from safetensors import safe_open

        halves: dict[tuple[str, int], dict[str, tuple[str, tuple[int, ...]]]] = {}
        replacements: dict[str, tuple[str, tuple[int, ...]]] = {}  # base name -> (adapter key, shape)
        unknown: list[str] = []
        with safe_open(str(self.path / ADAPTER_WEIGHTS), framework="pt") as f:
            for key in f.keys():
                shape = tuple(f.get_slice(key).get_shape())
                name = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
                m = _LORA_KEY.match(name)
                if m:
                    module, depth = m["module"], 0
                    while module.endswith(".base_layer"):
                        module, depth = module[: -len(".base_layer")], depth + 1
                    halves.setdefault((module, depth), {})[m["ab"]] = (key, shape)
                elif "lora_embedding_" in name or "lora_magnitude_vector" in name:
                    unknown.append(f"{key} (embedding LoRA / DoRA is not supported)")
                elif ".lora_" in name:
                    unknown.append(key)
                else:  # modules_to_save: a full replacement tensor
                    replacements[name] = (key, shape)
        if unknown:
            raise UnsupportedAdapterError(f"{self.path / ADAPTER_WEIGHTS}: tensors merge cannot apply: {_listed(unknown)}")
        pairs, half = [], []
        for (module, depth), ab in sorted(halves.items()):
            if set(ab) != {"A", "B"}:
                half.append(f"{module}: only lora_{''.join(ab)}")
                continue
            pairs.append(LoraPair(module, depth, ab["A"][0], ab["B"][0], ab["A"][1], ab["B"][1]))
        if half:
            raise MissingFilesError(f"{self.path / ADAPTER_WEIGHTS} is incomplete: {_listed(half)}")
        if not pairs and not replacements:
            raise MissingFilesError(f"{self.path / ADAPTER_WEIGHTS} holds no LoRA weights")
        return pairs, replacements

    # -- matching against a base -------------------------------------------------------------
    def plan(self, base_shapes: dict[str, tuple[int, ...]]) -> dict[str, list[Delta]]:
        """Base tensor name -> deltas to add. Raises AdapterMismatchError listing every problem."""
        targets_params = list(self.config.get("target_parameters") or [])
        problems: list[str] = []
        plan: dict[str, list[Delta]] = {}
        by_module: dict[str, list[LoraPair]] = {}
        for pair in self.pairs:
            by_module.setdefault(pair.module, []).append(pair)
        for module, pairs in sorted(by_module.items()):
            params = sorted(
                name for name in base_shapes
                if name.startswith(module + ".") and "." not in name[len(module) + 1:]
                and any(name == t or name.endswith("." + t) for t in targets_params)
            )
            if params:  # lora.ParamWrapper on module parameters
                free = list(params)
                for pair in sorted(pairs, key=lambda p: p.depth):
                    fits = []
                    for name in free:
                        rank, scaling = self.rank_and_scaling(name)
                        if self._fits(pair, base_shapes[name], rank):
                            fits.append((name, rank, scaling))
                    if len(fits) != 1:
                        shapes = ", ".join(f"{n[len(module) + 1:]} {list(base_shapes[n])}" for n in free)
                        r = self.rank_and_scaling(free[0])[0] if free else self.config["r"]
                        problems.append(
                            f"{module}{'.base_layer' * pair.depth} lora A {list(pair.a_shape)}, B {list(pair.b_shape)} "
                            + ("fits none of " if not fits else "fits several of ") + f"the base's {shapes} (r={r})"
                        )
                        continue
                    name, rank, scaling = fits[0]
                    free.remove(name)
                    kind = "experts" if len(base_shapes[name]) == 3 else "linear"
                    plan.setdefault(name, []).append(Delta(name, pair, kind, rank, scaling))
                continue
            split = layouts.fused_name(module)
            if split and split[0] in base_shapes and module + ".weight" not in base_shapes:
                self._plan_split_expert(module, pairs, split, base_shapes, plan, problems)
                continue
            target = module + ".weight"
            if target not in base_shapes and module.endswith(".router.linear"):
                target = module[: -len(".linear")] + ".weight"  # Unsloth's router.linear is router.weight
            if target not in base_shapes:
                keys = ", ".join(k for p in pairs for k in (p.a_key, p.b_key))
                problems.append(f"{keys}: the base has no {target} (adapter targets {module}, a module of a layout "
                                "merge does not know; it reads transformers' fused layout and Unsloth's split experts)")
                continue
            for pair in pairs:
                rank, scaling = self.rank_and_scaling(module)
                if len(base_shapes[target]) != 2 or pair.depth:
                    problems.append(f"{pair.a_key}: {target} has shape {list(base_shapes[target])}, not a Linear weight")
                elif not self._fits(pair, base_shapes[target], rank):
                    problems.append(
                        f"{module} lora A {list(pair.a_shape)}, B {list(pair.b_shape)} do not fit the base's "
                        f"{target} {list(base_shapes[target])} (r={rank})"
                    )
                else:
                    plan.setdefault(target, []).append(Delta(target, pair, "linear", rank, scaling))
        for name, (key, shape) in sorted(self.replacements.items()):
            if name not in base_shapes:
                problems.append(f"{key}: the base has no tensor {name}")
            elif tuple(base_shapes[name]) != tuple(shape):
                problems.append(
                    f"{key}: shape {list(shape)} but the base's {name} is {list(base_shapes[name])}"
                    + (" (vocabulary size differs)" if "embed" in name or "lm_head" in name else "")
                )
        if problems:
            raise AdapterMismatchError(
                f"adapter {self.path} does not fit the base (trained for another model, rank or vocabulary?): "
                + _listed(problems)
            )
        return plan

    def _plan_split_expert(self, module: str, pairs: list[LoraPair], split: tuple[str, int],
                           base_shapes: dict, plan: dict, problems: list[str]) -> None:
        """One split expert's Linear LoRA -> a delta on expert ``i`` of the fused parameter (E, in, out)."""
        target, expert = split
        experts, n_in, n_out = base_shapes[target]
        rank, scaling = self.rank_and_scaling(module)
        for pair in pairs:
            if expert >= experts:
                problems.append(f"{pair.a_key}: expert {expert} but the base's {target} has {experts} experts")
            elif pair.depth or not self._fits(pair, (n_out, n_in), rank):
                problems.append(f"{module} lora A {list(pair.a_shape)}, B {list(pair.b_shape)} do not fit expert "
                                f"{expert} of the base's {target} {list(base_shapes[target])} as a Linear "
                                f"({n_out}, {n_in}) (r={rank})")
            else:
                plan.setdefault(target, []).append(Delta(target, pair, "expert", rank, scaling, expert))

    @staticmethod
    def _fits(pair: LoraPair, shape: tuple[int, ...], rank: int) -> bool:
        if len(pair.a_shape) != 2 or len(pair.b_shape) != 2:
            return False
        if len(shape) == 3:
            experts, n_in, n_out = shape
            return pair.a_shape == (rank * experts, n_in) and pair.b_shape == (n_out, rank * experts)
        if len(shape) == 2:
            n_out, n_in = shape
            return pair.a_shape == (rank, n_in) and pair.b_shape == (n_out, rank)
        return False

    # -- deltas ------------------------------------------------------------------------------
    def load_weights(self) -> dict:
        """All adapter tensors in float32 (adapters are small: megabytes to a few hundred MB)."""
        import torch
        from safetensors import safe_open

        with safe_open(str(self.path / ADAPTER_WEIGHTS), framework="pt") as f:
            return {k: f.get_tensor(k).to(torch.float32) for k in f.keys()}

    @staticmethod
    def delta(d: Delta, weights: dict, expert: int | None = None):
        """float32 delta in the base tensor's layout; for experts, one expert's ``(in, out)`` slice if given."""
        import torch

        a, b = weights[d.pair.a_key], weights[d.pair.b_key]
        if d.kind == "linear":
            return (b @ a) * d.scaling
        if d.kind == "expert":  # a Linear (out, in) delta, in the fused (in, out) orientation
            return ((b @ a) * d.scaling).T
        experts = a.shape[0] // d.rank
        a3 = a.reshape(experts, d.rank, a.shape[-1])  # (E, r, in)
        b3 = b.reshape(b.shape[0], d.rank, experts)  # (out, r, E)
        if expert is not None:  # einsum("o r, r i -> i o") for one expert
            return (b3[:, :, expert] @ a3[expert]).T * d.scaling
        return torch.einsum("o r e, e r i -> e i o", b3, a3) * d.scaling
