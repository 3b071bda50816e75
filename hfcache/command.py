"""`gptoss cache check | import`: the command, wired by gptoss/cli.py."""

from __future__ import annotations

from typing import Literal

from gptoss.choices import choice_problem
from gptoss.hfcache.errors import CacheError, MissingFromCacheError

ACTIONS = ("check", "import")
CHECK_ONLY = ("profile", "model", "dataset", "merge_base", "backend")
IMPORT_ONLY = ("folder", "repo_id", "ref", "repo_type", "force")


def _size(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def cache(
    action: Literal["check", "import"],
    folder: str | None = None,
    *,
    repo_id: str | None = None,
    revision: str | None = None,
    ref: str = "main",
    repo_type: Literal["model", "dataset"] = "model",
    force: bool = False,
    profile: str | None = None,
    model: str | None = None,
    dataset: str | None = None,
    merge_base: str | None = None,
    backend: Literal["auto", "unsloth", "transformers"] = "auto",
    cache_dir: str | None = None,
) -> str | None:
    """Get the real checkpoints and the dataset into the Hugging Face cache, offline.

    `gptoss cache check` lists what the configured path needs (training base, the 16-bit original
    the merge folds into, the dataset), whether each is in the cache at the revision asked for
    (commit, refs, size) and the free disk; it exits 2 when something is missing and prints the
    `gptoss cache import` command for it. `gptoss cache import FOLDER --repo-id ID` lays a
    downloaded folder (`hf download ID --local-dir FOLDER`, or a copy) into the cache as
    huggingface_hub does, then loads it with HF_HUB_OFFLINE=1 and compares every file.

    Args:
        action: check (what the path needs, and whether it is cached) or import (lay FOLDER into the cache).
        folder: import: the downloaded repo folder to lay into the cache.
        repo_id: import: the Hub id it belongs to, owner/name.
        revision: import: the commit FOLDER was downloaded at, 40 hex digits (default: what `hf download` recorded in FOLDER/.cache/huggingface, else one derived from the file hashes, and said so). check: the training base's revision, as `gptoss train --revision`.
        ref: import: the branch or tag that points at the commit (default main).
        repo_type: import: model (default) or dataset.
        force: import: replace a snapshot of the same commit that holds different files, or use --revision although FOLDER records another commit.
        profile: check: the training profile whose settings are checked (default standard).
        model: check: the training base, a Hub id or local folder (default: the backend's gpt-oss-20b).
        dataset: check: the training dataset, a Hub id or local file (default: the profile's, HuggingFaceH4/Multilingual-Thinking).
        merge_base: check: the checkpoint the merge folds into (default: the 16-bit original of a 4-bit base, else the base).
        backend: check: auto (what `gptoss train` picks on this machine), unsloth or transformers; sets the default training base.
        cache_dir: the hub cache folder (default: huggingface_hub's HF_HUB_CACHE, i.e. $HF_HOME/hub).
    Returns:
        import: the snapshot folder. check: nothing (the table).
    """
    given = {k: v for k, v in locals().items() if k not in ("action", "cache_dir")}
    defaults = {"ref": "main", "repo_type": "model", "force": False, "backend": "auto"}
    used = {k for k, v in given.items() if v is not None and v != defaults.get(k)}
    if wrong := choice_problem("ACTION", action, ACTIONS):
        raise CacheError(f"{wrong}: gptoss cache check, gptoss cache import FOLDER --repo-id ID")
    wrong = sorted(used & set(IMPORT_ONLY if action == "check" else CHECK_ONLY))
    problems = [f"{'FOLDER' if k == 'folder' else '--' + k.replace('_', '-')} is for `gptoss cache {'import' if action == 'check' else 'check'}`" for k in wrong]
    if action == "import":
        if folder is None:
            problems.append("FOLDER: missing; gptoss cache import FOLDER --repo-id ID")
        if repo_id is None:
            problems.append("--repo-id: missing; the Hub id FOLDER was downloaded from, owner/name")
    if problems:
        raise CacheError("; ".join(problems))
    if action == "check":
        return _check(profile=profile, model=model, dataset=dataset, merge_base=merge_base, backend=backend,
                      revision=revision, cache_dir=cache_dir)
    return _import(str(folder), repo_id=str(repo_id), revision=revision, ref=ref, repo_type=repo_type, force=force,
                   cache_dir=cache_dir)


def _check(*, cache_dir, **settings) -> None:
    from rich.console import Console
    from rich.table import Table

    from gptoss.hfcache.check import check, configured_needs

    needs, backend = configured_needs(**settings)
    statuses, cache, free = check(needs, cache_dir=cache_dir)
    table = Table(title=f"What `gptoss train` ({backend} backend) and the merge read",
                  caption=f"cache {cache}: {_size(free)} free")
    for column in ("needed for", "repo", "status", "at commit (refs)", "size"):
        table.add_column(column, overflow="fold")
    for s in statuses:
        repo = f"{s.need.name} ({'local' if s.need.local else s.need.repo_type})"
        if s.need.revision:
            repo += f" @ {s.need.revision}"
        at = f"{s.commit[:12]} ({', '.join(s.refs) or 'no ref'})" if s.commit else "-"
        status = f"[green]ok[/]: {s.note}" if s.present else f"[red]missing[/]: {s.note}"
        table.add_row(", ".join(s.need.roles), repo, status, at, _size(s.size_on_disk))
    Console(soft_wrap=False).print(table)
    missing = [s for s in statuses if not s.present]
    if missing:
        lines = []
        for s in missing:
            if s.need.local:
                lines.append(f"{s.need.name}: {s.note}")
            else:
                lines.append(f"{s.need.name}: {s.note}; on a machine with the Hub: `{s.download_command()}`, "
                             f"copy DIR here, then: {s.import_command()}")
        raise MissingFromCacheError(f"{len(missing)} of {len(statuses)} needed inputs are missing from {cache}:\n  "
                                    + "\n  ".join(lines), statuses)
    return None


def _import(folder: str, **kwargs) -> str:
    from rich.console import Console

    from gptoss.hfcache.layout import import_folder

    result = import_folder(folder, **kwargs)
    console = Console(stderr=True)
    kinds: dict[str, int] = {}
    for f in result.files:
        kinds[f.etag_source] = kinds.get(f.etag_source, 0) + 1
    console.print(f"{result.repo_id} ({result.repo_type}): {len(result.files)} files, "
                  f"{_size(sum(f.size for f in result.files))}; blobs named by " + ", ".join(f"{k} ({n})" for k, n in kinds.items()))
    note = {"--revision": "from --revision", "hub download record": "as recorded by hf download in FOLDER/.cache/huggingface",
            "made up from the file hashes": "[yellow]made up from the file hashes: no commit was known, and training and merge "
            "records will name this one; pass --revision with the real commit[/]"}[result.commit_source]
    console.print(f"commit {result.commit} ({note})")
    moved = "" if result.ref_was in (None, result.commit) else f" (was {result.ref_was})"
    console.print(f"refs/{result.ref} -> {result.commit}{moved}; refs at this commit: {', '.join(result.refs)}")
    console.print("already in the cache, nothing copied" if result.already_there
                  else f"{result.blobs_written} blobs written ({_size(result.bytes_written)})")
    console.print(f"verified: snapshot_download(local_files_only=True) with HF_HUB_OFFLINE=1 returns {result.loaded_offline}, "
                  f"every file byte-equal to FOLDER; {_size(result.size_on_disk)} on disk")
    return str(result.snapshot_path)
