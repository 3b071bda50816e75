"""What `gptoss serve --model` may name, resolved through the records of earlier stages.

llamacpp:      a .gguf file, or an export folder (``exports/<run>``) whose ``manifest.json`` lists
               GGUF artifacts (``--quant`` picks one; a folder with a single .gguf needs no record).
transformers:  a checkpoint folder (merged, or the base of ``--adapter``); an export folder (its
               ``merged`` artifact); a training run (``models/<run>``: the base named in
               ``training_info.json`` + ``adapter/``); or a Hugging Face Hub id (from the HF cache).
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

MANIFEST = "manifest.json"
TRAINING_INFO = "training_info.json"
ADAPTER_DIR = "adapter"
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclasses.dataclass(frozen=True)
class ResolvedModel:
    model: str  # a .gguf path, a checkpoint folder or a Hub id
    adapter: str | None = None
    revision: str | None = None  # Hub revision of the base, from training_info.json
    source: str = ""  # how it was found, for the log and /health


def _read(path: Path, problems: list[str]) -> dict | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        problems.append(f"{path} is not readable JSON ({e}); re-run the stage that wrote it")
        return None
    if not isinstance(data, dict):
        problems.append(f"{path} should hold a JSON object")
        return None
    return data


def _artifacts(export_dir: Path, kind: str, problems: list[str]) -> list[dict]:
    data = _read(export_dir / MANIFEST, problems)
    if data is None:
        return []
    return [a for a in data.get("artifacts") or [] if isinstance(a, dict) and str(a.get("kind", "")).lower() == kind
            and isinstance(a.get("path"), str)]


def resolve_gguf(model: Path, quant: str | None, problems: list[str]) -> ResolvedModel | None:
    if model.is_file():
        if model.suffix != ".gguf":
            problems.append(f"--model {model}: the llamacpp backend serves a .gguf file (or an export folder)")
            return None
        return ResolvedModel(str(model), source="gguf file")
    if (model / MANIFEST).is_file():
        ggufs = _artifacts(model, "gguf", problems)
        known = ", ".join(sorted(str(a.get("quant") or a["path"]) for a in ggufs)) or "none"
        if quant:
            chosen = [a for a in ggufs if str(a.get("quant", "")).lower() == quant.lower()]
        else:
            chosen = ggufs if len(ggufs) == 1 else []
        if len(chosen) != 1:
            problems.append(f"--model {model}: {model / MANIFEST} has no single GGUF for --quant {quant or '(not given)'}; "
                            f"its GGUFs: {known}")
            return None
        path = (model / chosen[0]["path"]).resolve()
        if not path.is_file():
            problems.append(f"{model / MANIFEST} lists {chosen[0]['path']} but {path} is missing; re-run `gptoss export`")
            return None
        return ResolvedModel(str(path), source=f"{MANIFEST} quant {chosen[0].get('quant')}")
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
        if HUB_ID.match(model):
            return ResolvedModel(model, adapter, source="Hub id (from the Hugging Face cache)")
        problems.append(f"--model {model} does not exist (give a checkpoint folder, models/<run>, exports/<run> or a Hub id)")
        return None
    if (path / "config.json").is_file():
        return ResolvedModel(str(path.absolute()), adapter, source="checkpoint folder")
    if (path / TRAINING_INFO).is_file():
        info = _read(path / TRAINING_INFO, problems) or {}
        base, revision = info.get("base_model"), info.get("base_revision")
        if isinstance(base, dict):
            base, revision = base.get("id") or base.get("path") or base.get("name_or_path"), base.get("revision") or revision
        if not isinstance(base, str) or not base:
            problems.append(f"{path / TRAINING_INFO} names no base_model; re-run `gptoss train`")
            return None
        if adapter is None:
            if not (path / ADAPTER_DIR / "adapter_config.json").is_file():
                problems.append(f"--model {model}: a training run without {ADAPTER_DIR}/adapter_config.json; did training finish?")
                return None
            adapter = str((path / ADAPTER_DIR).absolute())
        return ResolvedModel(base, adapter, revision if isinstance(revision, str) else None, source=f"{TRAINING_INFO} base + adapter")
    if (path / MANIFEST).is_file():
        merged = _artifacts(path, "merged", problems)
        dirs = {str(Path(a["path"]).parent if Path(a["path"]).suffix else Path(a["path"])) for a in merged}
        if len(dirs) == 1:
            folder = (path / dirs.pop()).resolve()
            if (folder / "config.json").is_file():
                return ResolvedModel(str(folder), adapter, source=f"{MANIFEST} merged")
        problems.append(f"--model {model}: {path / MANIFEST} has no merged checkpoint folder; run `gptoss merge` or pass one")
        return None
    problems.append(f"--model {model}: no config.json, {TRAINING_INFO} or {MANIFEST}; not something the transformers backend can load")
    return None
