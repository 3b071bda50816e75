"""`gptoss cache check`: what the configured path needs from the Hugging Face cache, and whether it is there.

The path needs the training base (the backend's default or --model), the checkpoint the merge folds
the adapter into (the 16-bit original of a 4-bit base: gptoss.layouts.SIXTEEN_BIT_ORIGINALS, the
table training and the merge read too) and the dataset. Each is
looked up with huggingface_hub's own cache API (scan_cache_dir, try_to_load_from_cache) at the
revision training asks for (refs/main unless --revision).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import shutil
from pathlib import Path
from typing import Literal

from gptoss.hfcache.layout import COMMIT_RE, RepoType, default_cache_dir
from gptoss.hubid import is_hub_id
from gptoss.layouts import SIXTEEN_BIT_ORIGINALS, sixteen_bit_original

WEIGHTS_INDEX = "model.safetensors.index.json"
NOT_DATA = {".gitattributes", "README.md"}


@dataclasses.dataclass(frozen=True)
class Need:
    """One checkpoint or dataset the configured path reads."""

    roles: tuple[str, ...]  # "training base", "merge base", "dataset"
    name: str  # Hub id or local path
    repo_type: RepoType
    revision: str | None  # None: main
    local: bool  # a local folder or file, not a Hub id


@dataclasses.dataclass(frozen=True)
class NeedStatus:
    """Whether a Need can be loaded offline, and what of it is on disk."""

    need: Need
    present: bool
    note: str  # what is there, or what is missing
    commit: str | None = None
    refs: tuple[str, ...] = ()
    size_on_disk: int | None = None
    location: Path | None = None

    def import_command(self) -> str | None:
        """The command that puts a missing Hub repo in place (None for local paths and present rows)."""
        if self.present or self.need.local:
            return None
        cmd = f"gptoss cache import DIR --repo-id {self.need.name}"
        if self.need.repo_type != "model":
            cmd += f" --repo-type {self.need.repo_type}"
        rev = self.need.revision
        if rev and COMMIT_RE.fullmatch(rev):
            cmd += f" --revision {rev}"
        elif rev:
            cmd += f" --ref {rev}"
        return cmd

    def download_command(self) -> str | None:
        if self.present or self.need.local:
            return None
        cmd = f"hf download {self.need.name}"
        if self.need.repo_type != "model":
            cmd += f" --repo-type {self.need.repo_type}"
        if self.need.revision:
            cmd += f" --revision {self.need.revision}"
        return cmd + " --local-dir DIR"


def auto_backend() -> Literal["unsloth", "transformers"]:
    """What `gptoss train --backend auto` picks here (training.run.environment_problems): Unsloth on CUDA when installed."""
    if importlib.util.find_spec("unsloth") is None:
        return "transformers"
    import torch

    return "unsloth" if torch.cuda.is_available() else "transformers"


def _looks_local(name: str) -> bool:
    return not is_hub_id(name)


def configured_needs(*, profile: str | None = None, model: str | None = None, dataset: str | None = None,
                     merge_base: str | None = None, backend: str = "auto", revision: str | None = None) -> tuple[list[Need], str]:
    """The Needs of `gptoss train` with these settings (a profile, then flags, as train resolves them)
    and of the merge after it; returns them and the backend they were resolved for."""
    from gptoss.training.config import DEFAULT_MODEL, build_config
    from gptoss.training.data import looks_like_path

    cfg = build_config({"profile": profile, "model": model, "dataset": dataset, "backend": backend, "revision": revision})
    chosen = auto_backend() if cfg.backend == "auto" else cfg.backend
    base = cfg.model or DEFAULT_MODEL[chosen]
    merge = merge_base or sixteen_bit_original(base) or base
    needs = [Need(("training base",) + (("merge base",) if merge == base else ()), base, "model", cfg.revision, _looks_local(base))]
    if merge != base:
        role = "merge base (16-bit original)" if SIXTEEN_BIT_ORIGINALS.get(base) == merge else "merge base"
        needs.append(Need((role,), merge, "model", None, _looks_local(merge)))
    needs.append(Need(("dataset",), cfg.dataset, "dataset", cfg.dataset_revision, looks_like_path(cfg.dataset) or Path(cfg.dataset).expanduser().exists()))
    return needs, chosen


def _disk_size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _local_status(need: Need) -> NeedStatus:
    path = Path(need.name).expanduser()
    if need.repo_type == "model":
        ok = (path / "config.json").is_file()
        note = "local checkpoint folder" if ok else ("no config.json in this folder" if path.is_dir() else "no such folder")
    else:
        ok = path.is_file()
        note = "local file" if ok else "no such file"
    return NeedStatus(need, ok, note, size_on_disk=_disk_size(path) if path.exists() else None, location=path.absolute())


def _missing_files(need: Need, rev: str, cache: Path, files: set[str]) -> str | None:
    """What an offline load of this revision would not find, or None."""
    from huggingface_hub import try_to_load_from_cache

    def cached(name: str) -> str | None:
        hit = try_to_load_from_cache(need.name, name, cache_dir=cache, revision=rev, repo_type=need.repo_type)
        return hit if isinstance(hit, str) else None

    if need.repo_type == "dataset":
        return None if files - NOT_DATA else "no data files (only README.md / .gitattributes)"
    if cached("config.json") is None:
        return "no config.json"
    index = cached(WEIGHTS_INDEX)
    if index is not None:
        shards = sorted(set(json.loads(Path(index).read_text()).get("weight_map", {}).values()))
        missing = [s for s in shards if cached(s) is None]
        if missing:
            return f"{len(missing)} of {len(shards)} weight shards missing ({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''})"
    elif not any(f.endswith(".safetensors") for f in files):
        return "no weights (*.safetensors)"
    return None


def need_status(need: Need, repos: list, warnings: list[str], cache: Path) -> NeedStatus:
    """``need`` looked up in what scan_cache_dir found in ``cache`` (its repos and the warnings about corrupted ones)."""
    if need.local:
        return _local_status(need)
    from gptoss.hfcache.layout import repo_folder

    folder = repo_folder(cache, need.name, need.repo_type)
    broken = [w for w in warnings if str(folder) in w]
    if broken:
        return NeedStatus(need, False, f"corrupted in the cache: {broken[0][:300]}", location=folder)
    repo = next((r for r in repos if r.repo_id == need.name and r.repo_type == need.repo_type), None)
    if repo is None:
        return NeedStatus(need, False, "not in the cache")
    rev = need.revision or "main"
    revision = (next((r for r in repo.revisions if r.commit_hash == rev), None) if COMMIT_RE.fullmatch(rev)
                else repo.refs.get(rev))
    if revision is None:
        cached = ", ".join(sorted(r.commit_hash[:12] for r in repo.revisions)) or "none"
        return NeedStatus(need, False, f"in the cache, but not at {rev} (cached commits: {cached})",
                          size_on_disk=repo.size_on_disk, location=repo.repo_path)
    files = {f.file_path.relative_to(revision.snapshot_path).as_posix() for f in revision.files}
    problem = _missing_files(need, rev, cache, files)
    return NeedStatus(need, problem is None, problem or f"{len(files)} files", revision.commit_hash,
                      tuple(sorted(revision.refs)), revision.size_on_disk, revision.snapshot_path)


def check(needs: list[Need], *, cache_dir: str | Path | None = None) -> tuple[list[NeedStatus], Path, int]:
    """Each Need's status, the cache folder and its free bytes."""
    from huggingface_hub import scan_cache_dir

    cache = (Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()).resolve()
    if cache.is_dir():
        info = scan_cache_dir(cache)
        repos, warnings = list(info.repos), [str(w) for w in info.warnings]
    else:
        repos, warnings = [], []
    probe = cache
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return [need_status(n, repos, warnings, cache) for n in needs], cache, shutil.disk_usage(probe).free
