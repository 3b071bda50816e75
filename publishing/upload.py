"""The Hub: one create_commit per publish, resumable; published.json records what went where."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Literal

from gptoss.records import Published, PublishedRepo
from gptoss.publishing.plan import PublishPlan, _find_token, _import_hub, _scrub, plan_publish
from gptoss.publishing.records import (OLLAMA_PARAMS_FILE, OLLAMA_SYSTEM_FILE, OLLAMA_TEMPLATE_FILE, PublishError,
                                _human_size)



def _existing_kind(paths: list[str]) -> str | None:
    names = {Path(p).name for p in paths}
    if any(p.endswith(".gguf") for p in paths):
        return "gguf"
    if "adapter_config.json" in names:
        return "adapter"
    if "config.json" in names or any(p.endswith(".safetensors") for p in paths):
        return "merged"
    return None


def _http_errors() -> tuple[type[Exception], ...]:
    """The HTTP client's base error: httpx under huggingface_hub 1.x, httpx2 under 2.x."""
    import importlib

    out = []
    for name in ("httpx", "httpx2"):
        try:
            out.append(importlib.import_module(name).HTTPError)
        except ImportError:
            pass
    return tuple(out)


def _is_artifact_file(path: str) -> bool:
    """Files a publish owns: weights, shard indexes, Modelfiles and the Ollama files of a GGUF repo."""
    name = Path(path).name
    return (
        Path(name).suffix in (".safetensors", ".gguf", ".bin", ".pt", ".pth", ".Modelfile")
        or name.endswith(".index.json")
        or name == "Modelfile"
        or path in (OLLAMA_TEMPLATE_FILE, OLLAMA_PARAMS_FILE, OLLAMA_SYSTEM_FILE)
    )


def _hub_error(e: BaseException, token: str | None, what: str) -> PublishError:
    detail = str(e).strip().splitlines()
    detail = " ".join(line.strip() for line in detail if line.strip())[:500]
    return PublishError(_scrub(f"{what}: {type(e).__name__}: {detail}", token))


def _upload(plan: PublishPlan, token: str) -> str:
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi, constants
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

    api = HfApi(token=token)
    repo_id = plan.repo_id
    endpoint = constants.ENDPOINT
    network_errors = (HfHubHTTPError, OSError, *_http_errors())
    try:
        api.whoami()
    except HfHubHTTPError as e:
        if e.response is not None and e.response.status_code == 401:
            raise PublishError(
                f"the Hub at {endpoint} rejected your token (HF_TOKEN or `hf auth login`); "
                "create a write token at https://huggingface.co/settings/tokens"
            ) from None
        raise _hub_error(e, token, f"cannot check your token at {endpoint}") from None
    except network_errors as e:
        raise _hub_error(e, token, f"cannot reach the Hub at {endpoint}") from None

    try:
        try:
            info = api.model_info(repo_id)
        except RepositoryNotFoundError:
            info = None
        if info is None:
            for other in ("dataset", "space"):
                if api.repo_exists(repo_id, repo_type=other):
                    raise PublishError(
                        f"--repo-id {repo_id} already exists as a {other} repo, not a model repo; "
                        "choose another --repo-id"
                    )
        else:
            if plan.private and info.private is False:
                raise PublishError(
                    f"--private: {repo_id} already exists and is public; make it private on the Hub first "
                    "or publish to another --repo-id"
                )
            try:
                head = api.model_info(repo_id, revision=plan.revision)
            except RevisionNotFoundError:
                head = info
            kind = _existing_kind([s.rfilename for s in head.siblings or []])
            if kind is not None and kind != plan.what:
                held = {"adapter": "an adapter", "merged": "a merged model", "gguf": "GGUF files"}[kind]
                raise PublishError(
                    f"--repo-id {repo_id} already holds {held}; publish the {plan.what} to its own repo "
                    f"(e.g. {repo_id}-{plan.what.upper() if plan.what == 'gguf' else plan.what})"
                )
        if info is None:
            api.create_repo(repo_id, repo_type="model", private=plan.private, exist_ok=True)
            print(f"created {'private ' if plan.private else ''}model repo {repo_id}", file=sys.stderr)
        try:
            remote = api.model_info(repo_id, revision=plan.revision)
        except RevisionNotFoundError:
            api.create_branch(repo_id, branch=plan.revision, exist_ok=True)
            print(f"created branch {plan.revision}", file=sys.stderr)
            remote = api.model_info(repo_id, revision=plan.revision)
    except PublishError:
        raise
    except network_errors as e:
        raise _hub_error(e, token, f"preparing {repo_id} on {endpoint} failed; nothing was uploaded") from None

    operations: list = []
    for f in plan.files:
        op = CommitOperationAdd(f.path_in_repo, str(f.local) if f.local is not None else f.data)
        op.upload_info.sha256 = bytes.fromhex(f.sha256)  # already computed and checked above
        operations.append(op)
    # Weights and Ollama files of an earlier publish that this one does not replace would leave the
    # repo inconsistent (two files for one quant tag, stale shards, a `system` the new Modelfile lacks).
    uploading = {f.path_in_repo for f in plan.files}
    stale = sorted(s.rfilename for s in remote.siblings or [] if _is_artifact_file(s.rfilename) and s.rfilename not in uploading)
    operations += [CommitOperationDelete(path) for path in stale]
    description = plan.commit_description
    if stale:
        description += f" Removed from the previous publish: {', '.join(stale)}."
        print(f"removing {len(stale)} files of the previous publish: {', '.join(stale)}", file=sys.stderr)
    total = sum(f.size or 0 for f in plan.files)
    print(f"uploading {len(plan.files)} files ({_human_size(total)}) to {repo_id}@{plan.revision}", file=sys.stderr)
    # One create_commit: with hf_xet installed (a huggingface_hub 1.x dependency) files go through Xet,
    # which deduplicates chunks already uploaded; without it (or HF_HUB_DISABLE_XET=1) through LFS,
    # where the batch API skips objects the Hub already holds. Transfers are retried by http_backoff
    # (429/5xx/network errors, 5 tries). upload_folder would need a staging folder and splits big
    # uploads into "(part N)" commits; upload_large_folder is deprecated and cannot name the commit.
    try:
        commit = api.create_commit(
            repo_id,
            operations,
            commit_message=plan.commit_message,
            commit_description=description,
            revision=plan.revision,
        )
    except (RuntimeError, ValueError, *network_errors) as e:
        # huggingface_hub wraps a failed LFS upload as RuntimeError("Error while uploading 'x' ...") from the cause.
        reason = e.__cause__ if isinstance(e, RuntimeError) and e.__cause__ is not None else e
        where = f"{e} " if reason is not e else ""
        raise _hub_error(
            reason, token,
            f"upload to {repo_id} did not complete; nothing was committed. Re-run the same command to resume: "
            f"files already on the Hub are not sent again. {where}Reason",
        ) from None
    changed = commit.oid != remote.sha
    _write_record(plan, commit, endpoint, changed)
    print(
        f"{'committed' if changed else 'already up to date, nothing committed'}: {commit.commit_url}",
        file=sys.stderr,
    )
    return commit.commit_url


def _write_record(plan: PublishPlan, commit, endpoint: str, changed: bool) -> None:
    record = (Published.try_load(plan.record_dir, []) if Published.exists(plan.record_dir) else None) or Published()
    setattr(record, plan.what, PublishedRepo(
        repo_id=plan.repo_id,
        revision=plan.revision,
        commit=commit.oid,
        commit_url=commit.commit_url,
        endpoint=endpoint,
        private=plan.private,
        run=plan.run_name,
        files={f.path_in_repo: f.sha256 for f in plan.files},
    ))
    record.write(plan.record_dir)


def publish(
    *,
    run: str,
    repo_id: str,
    what: Literal["adapter", "merged", "gguf"],
    private: bool = False,
    revision: str = "main",
    dry_run: bool = False,
    models_dir: str | None = None,
    exports_dir: str | None = None,
) -> str:
    """Publish a run's adapter, merged model or GGUFs to the Hugging Face Hub, with a model card.

    Args:
        run: the run folder: models/<run> (training) or exports/<run> (export); the other is found beside it.
        repo_id: the model repo, ORG/NAME; created when missing.
        what: adapter (PEFT LoRA), merged (bf16 safetensors) or gguf (every quant + Modelfiles, pullable as hf.co/ORG/NAME:QUANT).
        private: create the repo private (an existing public repo is refused).
        revision: branch to commit to; created from main when missing.
        dry_run: print the file list and the model card; nothing is sent.
        models_dir: where training runs are (default: beside the exports folder, ./models).
        exports_dir: where exports are (default: beside the models folder, ./exports).
    Returns:
        The commit URL (or, with --dry-run, the plan).
    """
    _import_hub()
    token = _find_token()
    plan = plan_publish(
        run=run, repo_id=repo_id, what=what, revision=revision, private=private, token=token,
        need_token=not dry_run, models_dir=models_dir, exports_dir=exports_dir,
    )
    if dry_run:
        return _scrub(plan.describe(), token)
    return _upload(plan, token)
