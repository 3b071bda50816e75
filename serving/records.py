"""What `gptoss serve --model` may name, resolved through the records of earlier stages.

llamacpp:      a .gguf file, or an export folder (``exports/<run>``) whose ``manifest.json`` lists
               GGUF artifacts (``--quant`` picks one; a folder with a single .gguf needs no record).
transformers:  a checkpoint folder (merged, or the base of ``--adapter``); an export folder (the
               folder named by its manifest's ``merged.path``); a training run (``models/<run>``: the base named in
               ``training_info.json`` + ``adapter/``); or a Hugging Face Hub id (from the HF cache).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from gptoss.hubid import is_hub_id
from gptoss.records import Manifest, TrainingInfo

MANIFEST = Manifest.FILE
TRAINING_INFO = TrainingInfo.FILE
ADAPTER_DIR = "adapter"


@dataclasses.dataclass(frozen=True)
class ResolvedModel:
    model: str  # a .gguf path, a checkpoint folder or a Hub id
    adapter: str | None = None
    revision: str | None = None  # Hub revision of the base, from training_info.json
    source: str = ""  # how it was found, for the log and /health


def resolve_gguf(model: Path, quant: str | None, problems: list[str]) -> ResolvedModel | None:
    if model.is_file():
        if model.suffix != ".gguf":
            problems.append(f"--model {model}: the llamacpp backend serves a .gguf file (or an export folder)")
            return None
        return ResolvedModel(str(model), source="gguf file")
    if Manifest.exists(model):
        manifest = Manifest.try_load(model, problems)
        if manifest is None:
            return None
        ggufs = manifest.artifacts
        known = ", ".join(sorted(a.label for a in ggufs)) or "none"
        if quant:
            chosen = manifest.gguf(quant)
        else:
            chosen = ggufs if len(ggufs) == 1 else []
        if len(chosen) != 1:
            problems.append(f"--model {model}: {model / MANIFEST} has no single GGUF for --quant {quant or '(not given)'}; "
                            f"its GGUFs: {known}")
            return None
        path = (model / chosen[0].path).resolve()
        if not path.is_file():
            problems.append(f"{model / MANIFEST} lists {chosen[0].path} but {path} is missing; re-run `gptoss export`")
            return None
        return ResolvedModel(str(path), source=f"{MANIFEST} quant {chosen[0].label}")
    ggufs = sorted(model.glob("*.gguf"))
    if quant:
        ggufs = [g for g in ggufs if quant.lower().replace("_", "") in g.name.lower().replace("_", "")]
    if len(ggufs) == 1:
        return ResolvedModel(str(ggufs[0].resolve()), source="the folder's only .gguf")
    names = ", ".join(g.name for g in sorted(model.glob("*.gguf"))) or "none"
    problems.append(f"--model {model}: a folder without {MANIFEST}; pass one .gguf file or --quant (GGUFs here: {names})")
    return None


def resolve_checkpoint(model: str, adapter: str | None, problems: list[str]) -> ResolvedModel | None:
    path = Path(model).expanduser()
    if not path.exists():
        if is_hub_id(model):
            return ResolvedModel(model, adapter, source="Hub id (from the Hugging Face cache)")
        problems.append(f"--model {model} does not exist (give a checkpoint folder, models/<run>, exports/<run> or a Hub id)")
        return None
    if (path / "config.json").is_file():
        return ResolvedModel(str(path.absolute()), adapter, source="checkpoint folder")
    if TrainingInfo.exists(path):
        info = TrainingInfo.try_load(path, problems)
        if info is None:
            return None
        if adapter is None:
            if not (path / info.adapter / "adapter_config.json").is_file():
                problems.append(f"--model {model}: a training run without {info.adapter}/adapter_config.json; did training finish?")
                return None
            adapter = str((path / info.adapter).absolute())
        return ResolvedModel(info.base_model, adapter, info.base_model_revision, source=f"{TRAINING_INFO} base + adapter")
    if Manifest.exists(path):
        manifest = Manifest.try_load(path, problems)
        if manifest is None:
            return None
        folder = (path / manifest.merged.path).resolve()
        if (folder / "config.json").is_file():
            return ResolvedModel(str(folder), adapter, source=f"{MANIFEST} merged")
        problems.append(f"--model {model}: the merged folder {folder} named in {path / MANIFEST} has no config.json; "
                        "re-run `gptoss export` (it merges again)")
        return None
    problems.append(f"--model {model}: no config.json, {TRAINING_INFO} or {MANIFEST}; not something the transformers backend can load")
    return None
