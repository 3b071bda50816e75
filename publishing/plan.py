"""The plan: every file that goes into the repo, checked locally (sizes, sha256, token scan) before any upload."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any

from gptoss.choices import choice_problem
from gptoss.modelfiles import gguf_header
from gptoss.modelfiles.reader import Modelfile, read_modelfile
from gptoss.publishing.card import _published, _toolchain_version, build_card_text
from gptoss.publishing.records import (
    _HASH_CHUNK, ADAPTER_DIR, ADAPTER_REQUIRED, MANIFEST, MERGE_RECORD, MERGED_REQUIRED, OLLAMA_PARAMS_FILE,
    OLLAMA_SYSTEM_FILE, OLLAMA_TEMPLATE_FILE, TRAINING_INFO, WHATS, Artifact, ExportManifest, PublishError,
    TrainingRecord, _as_dict, _human_size, _locate, _read_json, gguf_quant_tag,
)



@dataclasses.dataclass
class RepoFile:
    path_in_repo: str
    local: Path | None = None  # a file on disk, or
    data: bytes | None = None  # generated content (card, template, params)
    expected_sha256: str | None = None  # from the records, when they have it
    expected_size: int | None = None
    sha256: str | None = None
    size: int | None = None

    def __post_init__(self):
        if self.data is not None:
            self.sha256 = hashlib.sha256(self.data).hexdigest()
            self.size = len(self.data)


@dataclasses.dataclass
class GgufEntry:
    artifact: Artifact
    tag: str
    file: RepoFile
    modelfile: RepoFile


@dataclasses.dataclass
class PublishPlan:
    """Everything a publish will do, decided before the network is touched."""

    what: str
    repo_id: str
    revision: str
    private: bool
    run_name: str
    training: TrainingRecord | None
    manifest: ExportManifest | None
    record_dir: Path
    files: list[RepoFile]
    ggufs: list[GgufEntry] = dataclasses.field(default_factory=list)
    adapter_config: dict = dataclasses.field(default_factory=dict)
    merged_repo: str | None = None  # our published merged repo, for the GGUF card's lineage
    card: Any = None  # huggingface_hub.ModelCard

    @property
    def commit_message(self) -> str:
        return f"gptoss publish {self.what} from run {self.run_name}"

    @property
    def commit_description(self) -> str:
        total = sum(f.size or 0 for f in self.files)
        return (
            f"{len(self.files)} files, {_human_size(total)}, published by gptoss-toolchain "
            f"{_toolchain_version()} from run {self.run_name}."
        )

    def describe(self) -> str:
        total = sum(f.size or 0 for f in self.files)
        lines = [
            "gptoss publish --dry-run: nothing was sent to the Hub.",
            f"repo: {self.repo_id} (model, {'private' if self.private else 'public if created'}), "
            f"revision {self.revision}",
            f"commit message: {self.commit_message}",
            f"files ({len(self.files)}, {_human_size(total)}):",
        ]
        width = max(len(f.path_in_repo) for f in self.files)
        for f in self.files:
            source = str(f.local) if f.local is not None else "(generated)"
            lines.append(f"  {f.path_in_repo:<{width}}  {_human_size(f.size or 0):>10}  {f.sha256}  {source}")
        if self.ggufs:
            lines.append("quant tags: " + ", ".join(f"hf.co/{self.repo_id}:{g.tag}" for g in self.ggufs))
        lines += ["", "README.md (model card):", "", str(self.card)]
        return "\n".join(lines)


def _files_under(folder: Path, *, skip_names: tuple[str, ...] = ("README.md",)) -> list[Path]:
    """Regular files of a folder (recursive), without hidden files, checkpoints or temp names."""
    out = []
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder)
        if any(part.startswith(".") or part.startswith("checkpoint-") for part in rel.parts):
            continue
        if p.is_file() and not (len(rel.parts) == 1 and rel.name in skip_names):
            out.append(p)
    return out


def _plan_adapter(training_dir: Path | None, problems: list[str]) -> tuple[TrainingRecord | None, list[RepoFile], dict]:
    if training_dir is None:
        problems.append(f"--what adapter needs the training run folder (models/<run> with {TRAINING_INFO})")
        return None, [], {}
    training = TrainingRecord.load(training_dir, problems)
    adapter_dir = training_dir / ADAPTER_DIR
    missing = [n for n in ADAPTER_REQUIRED if not (adapter_dir / n).is_file()]
    if missing:
        problems.append(
            f"{adapter_dir}: missing {', '.join(missing)}; the run did not finish, re-run `gptoss train`"
        )
        return training, [], {}
    config = _read_json(adapter_dir / "adapter_config.json", problems) or {}
    files = [RepoFile(str(p.relative_to(adapter_dir).as_posix()), local=p) for p in _files_under(adapter_dir)]
    return training, files, config


def _plan_merged(manifest: ExportManifest, problems: list[str]) -> list[RepoFile]:
    where = manifest.export_dir / MANIFEST
    merged = manifest.of_kind("merged")
    if not merged:
        problems.append(f"{where}: no 'merged' folder recorded; re-run `gptoss export`")
        return []
    merged_dir = merged[0].path
    if not merged_dir.is_dir():
        problems.append(f"{merged_dir}: the merged folder named in {MANIFEST} is missing; re-run `gptoss export` (it merges again)")
        return []
    expected = {manifest.export_dir / rel: (sha, size) for rel, sha, size in merged[0].files}
    if not expected:
        problems.append(f"{where}: 'merged' lists no files; re-run `gptoss export`")
    for p in expected:
        if not p.is_file():
            problems.append(f"{p}: listed in {MANIFEST} but missing; re-run `gptoss export`")
    for name in MERGED_REQUIRED:
        if not (merged_dir / name).is_file():
            problems.append(f"{merged_dir / name} is missing; re-run `gptoss export`")
    local = _files_under(merged_dir, skip_names=("README.md", MERGE_RECORD))
    if not any(p.suffix == ".safetensors" for p in local):
        problems.append(f"{merged_dir}: no .safetensors weights; re-run `gptoss export`")
    index = merged_dir / "model.safetensors.index.json"
    if index.is_file():
        data = _read_json(index, problems) or {}
        for shard in sorted(set(_as_dict(data.get("weight_map")).values())):
            if not (merged_dir / shard).is_file():
                problems.append(f"{merged_dir / shard}: shard named in {index.name} is missing; re-run `gptoss export`")
    files = []
    for p in local:
        if expected and p not in expected:
            problems.append(f"{p}: not among the merged files of {MANIFEST} (added after export?); remove it or re-run `gptoss export`")
            continue
        sha, size = expected.get(p, (None, None))
        files.append(RepoFile(p.relative_to(merged_dir).as_posix(), local=p, expected_sha256=sha, expected_size=size))
    return files


def _plan_gguf(manifest: ExportManifest, problems: list[str]) -> tuple[list[RepoFile], list[GgufEntry]]:
    ggufs = manifest.of_kind("gguf")
    where = manifest.export_dir / MANIFEST
    if not ggufs:
        problems.append(f"{where}: no 'gguf' artifacts; run `gptoss export --run ...` first")
        return [], []
    modelfiles = list(manifest.of_kind("modelfile"))
    # A Modelfile written later by hand (`gptoss modelfile --gguf X`) sits next to its GGUF, unlisted.
    listed = {m.path.resolve() for m in modelfiles}
    for folder in sorted({a.path.parent for a in ggufs if a.path.parent.is_dir()}):
        for candidate in sorted(folder.iterdir()):
            if "Modelfile" in candidate.name and candidate.is_file() and candidate.resolve() not in listed:
                modelfiles.append(Artifact(path=candidate, rel=str(candidate.relative_to(manifest.export_dir)), kind="modelfile"))
    by_target: dict[Path, Artifact] = {}
    parsed: dict[Path, Modelfile] = {}
    for m in modelfiles:
        if not m.path.is_file():
            problems.append(f"{m.path}: Modelfile listed in {MANIFEST} is missing; run `gptoss modelfile --gguf ...`")
            continue
        try:
            mf = read_modelfile(m.path)
        except (OSError, UnicodeDecodeError, ValueError) as e:
            problems.append(f"{m.path}: unreadable Modelfile ({e})")
            continue
        parsed[m.path] = mf
        target = None
        if mf.from_ and not Path(mf.from_).is_absolute():
            target = (m.path.parent / mf.from_).resolve()
        elif mf.from_:
            problems.append(
                f"{m.path}: FROM {mf.from_} is an absolute path and will not resolve after download; "
                "regenerate it with `gptoss modelfile`"
            )
        elif m.gguf:
            target = (manifest.export_dir / m.gguf).resolve()
        if target is not None:
            by_target[target] = m
    files: list[RepoFile] = []
    entries: list[GgufEntry] = []
    tags: dict[str, str] = {}
    for a in ggufs:
        name = a.path.name
        if not a.path.is_file():
            problems.append(f"{a.path}: GGUF listed in {MANIFEST} is missing; re-run `gptoss export`")
            continue
        if not gguf_header.is_gguf(a.path):
            problems.append(f"{a.path}: not a GGUF file (bad magic); re-run `gptoss export`")
            continue
        if not a.quant:
            problems.append(f"{where}: artifact {a.rel} has no 'quant'")
            continue
        tag = gguf_quant_tag(name)
        if tag != a.quant:
            problems.append(
                f"{a.path}: the Hub would serve this file as tag {tag or '(none)'}, not {a.quant}; "
                f"name it <model>-{a.quant}.gguf"
            )
            continue
        if tag in tags:
            problems.append(f"{a.path} and {tags[tag]} both map to tag {tag}; publish one GGUF per quant")
            continue
        tags[tag] = str(a.path)
        m = by_target.get(a.path.resolve())
        if m is None:
            problems.append(
                f"{a.path}: no Modelfile (listed in {MANIFEST} or next to it) points at it; run `gptoss modelfile --gguf {a.path}`"
            )
            continue
        if m.path.parent.resolve() != a.path.parent.resolve():
            problems.append(
                f"{m.path}: must sit next to {name} so its relative FROM still resolves in the repo"
            )
            continue
        gfile = RepoFile(name, local=a.path, expected_sha256=a.sha256, expected_size=a.size)
        mfile = RepoFile(m.path.name, local=m.path, expected_sha256=m.sha256, expected_size=m.size)
        files += [gfile, mfile]
        entries.append(GgufEntry(artifact=a, tag=tag, file=gfile, modelfile=mfile))
    names = [f.path_in_repo for f in files]
    for dup in sorted({n for n in names if names.count(n) > 1}):
        problems.append(f"two files would both be uploaded as {dup}")
    # Ollama pulls from hf.co read `template`/`params`/`system` files, not the Modelfile.
    chosen = [parsed[e.modelfile.local] for e in entries if e.modelfile.local in parsed]
    if chosen:
        first = chosen[0]
        for other in chosen[1:]:
            if (other.template, other.system, other.parameters) != (first.template, first.system, first.parameters):
                problems.append(
                    f"{other.path} and {first.path} differ beyond FROM; one template serves every tag, "
                    "regenerate them with `gptoss modelfile`"
                )
                break
        if not first.template:
            problems.append(f"{first.path}: no TEMPLATE; Ollama would not speak Harmony. Regenerate it with `gptoss modelfile`")
        else:
            files.append(RepoFile(OLLAMA_TEMPLATE_FILE, data=first.template.encode()))
            files.append(RepoFile(OLLAMA_PARAMS_FILE, data=(json.dumps(first.params_json(), indent=2) + "\n").encode()))
            if first.system:
                files.append(RepoFile(OLLAMA_SYSTEM_FILE, data=first.system.encode()))
    return files, entries


def _check_args(repo_id: Any, what: Any, revision: Any, private: Any, problems: list[str]) -> str:
    if wrong := choice_problem("--what", what, WHATS):
        problems.append(wrong)
    if not isinstance(repo_id, str) or repo_id.count("/") != 1:
        problems.append(f"--repo-id {repo_id!r}: give ORG/NAME (your user or organisation, a slash, the repo name)")
    else:
        from huggingface_hub.utils import HFValidationError, validate_repo_id

        try:
            validate_repo_id(repo_id)
        except HFValidationError as e:
            problems.append(f"--repo-id {repo_id!r} is not a valid Hub repo id: {e}")
    revision = str(revision) if isinstance(revision, (int, float)) and not isinstance(revision, bool) else revision
    if not isinstance(revision, str) or not revision or revision.startswith(("/", "refs/")) or ".." in revision:
        problems.append(f"--revision {revision!r}: give a branch name, e.g. main")
    if not isinstance(private, bool):
        problems.append(f"--private takes no value (got {private!r})")
    return revision


def _raise(problems: list[str], token: str | None = None) -> None:
    if not problems:
        return
    text = problems[0] if len(problems) == 1 else f"{len(problems)} problems: " + "; ".join(
        f"({i}) {p}" for i, p in enumerate(problems, 1)
    )
    raise PublishError(_scrub(text, token))


def _scrub(text: str, token: str | None) -> str:
    return text.replace(token, "***") if token else text


def _import_hub():
    try:
        import huggingface_hub
    except ImportError as e:  # the publish extra is not installed
        raise PublishError(
            "publishing needs huggingface_hub: pip install 'gptoss-toolchain[publish]'"
        ) from e
    return huggingface_hub


def _find_token() -> str | None:
    """HF_TOKEN, else the stored login (`hf auth login` writes it to HF_HOME/token); nothing else.

    Not huggingface_hub.get_token(): that may also exchange an OIDC token over the network,
    which a dry run must not do.
    """
    from huggingface_hub import constants

    token = (os.environ.get("HF_TOKEN") or "").strip()
    if not token:
        try:
            token = Path(constants.HF_TOKEN_PATH).read_text(encoding="utf-8").strip()
        except (FileNotFoundError, NotADirectoryError):
            token = ""
        except OSError as e:
            raise PublishError(f"cannot read the stored Hugging Face login {constants.HF_TOKEN_PATH} ({e.strerror})") from None
    return token or None


def _hash_and_scan(files: list[RepoFile], token: str | None, problems: list[str]) -> None:
    """sha256 of every local file, checked against the records; and no file may contain the token."""
    from tqdm.auto import tqdm

    needle = token.encode() if token else None
    total = sum(f.local.stat().st_size for f in files if f.local is not None)
    with tqdm(total=total, unit="B", unit_scale=True, desc="sha256", file=sys.stderr, disable=None) as bar:
        for f in files:
            if f.local is None:
                if needle and needle in f.data:
                    problems.append(f"{f.path_in_repo} would contain your Hugging Face token; refusing to upload it")
                continue
            h = hashlib.sha256()
            size = 0
            tail = b""
            leaked = False
            with open(f.local, "rb") as fh:
                while chunk := fh.read(_HASH_CHUNK):
                    h.update(chunk)
                    size += len(chunk)
                    if needle and not leaked:
                        leaked = needle in tail + chunk
                        tail = chunk[-(len(needle) - 1):] if len(needle) > 1 else b""
                    bar.update(len(chunk))
            f.sha256, f.size = h.hexdigest(), size
            if leaked:
                problems.append(f"{f.local} contains your Hugging Face token; remove it before publishing")
            if f.expected_size is not None and f.expected_size != size:
                problems.append(
                    f"{f.local}: {size} bytes, but the record says {f.expected_size}; "
                    "the file changed after export, re-run the stage that wrote it"
                )
            elif f.expected_sha256 and f.expected_sha256.removeprefix("sha256:") != f.sha256:
                problems.append(
                    f"{f.local}: sha256 {f.sha256} differs from the record ({f.expected_sha256}); "
                    "the file changed after export, re-run the stage that wrote it"
                )


NO_TOKEN = "no Hugging Face token: set HF_TOKEN or run `hf auth login` (a write token)"


def plan_publish(
    *, run: str | os.PathLike, repo_id: str, what: str, revision: str = "main", private: bool = False,
    token: str | None = None, need_token: bool = False, models_dir: str | os.PathLike | None = None,
    exports_dir: str | os.PathLike | None = None,
) -> PublishPlan:
    """Read the records, check every file, build the card; touches no network.

    ``token`` (when known) is only used to make sure no uploaded file contains it; with
    ``need_token`` its absence is reported together with every other problem.
    """
    _import_hub()
    problems: list[str] = []
    if need_token and not token:
        problems.append(NO_TOKEN)
    revision = _check_args(repo_id, what, revision, private, problems)
    if isinstance(run, (str, os.PathLike)) and str(run):
        training_dir, export_dir = _locate(Path(run).expanduser(), problems, models_dir=models_dir,
                                           exports_dir=exports_dir)
    else:
        problems.append(f"--run {run!r}: give the run folder (models/<run> or exports/<run>)")
        training_dir = export_dir = None

    training = manifest = None
    files: list[RepoFile] = []
    ggufs: list[GgufEntry] = []
    adapter_config: dict = {}
    record_dir = training_dir if what == "adapter" else export_dir
    if what == "adapter" and (training_dir or export_dir):
        training, files, adapter_config = _plan_adapter(training_dir, problems)
    elif what in WHATS and (training_dir or export_dir):
        if export_dir is None:
            problems.append(
                f"--what {what} needs the export folder (exports/<run> with {MANIFEST}); run `gptoss export` first"
            )
        else:
            manifest = ExportManifest.load(export_dir, problems)
        if training_dir is not None:
            training = TrainingRecord.load(training_dir, problems)
            adapter_cfg_path = training_dir / ADAPTER_DIR / "adapter_config.json"
            if adapter_cfg_path.is_file():
                adapter_config = _read_json(adapter_cfg_path, problems) or {}
        if manifest is not None and what == "merged":
            files = _plan_merged(manifest, problems)
        elif manifest is not None:
            files, ggufs = _plan_gguf(manifest, problems)
    _raise(problems, token)

    _hash_and_scan(files, token, problems)
    _raise(problems, token)

    run_name = (training.name if training else None) or (manifest.run and Path(manifest.run).name) or record_dir.name
    plan = PublishPlan(
        what=what, repo_id=repo_id, revision=revision, private=private, run_name=run_name,
        training=training, manifest=manifest, record_dir=record_dir, files=files, ggufs=ggufs,
        adapter_config=adapter_config,
    )
    if what == "gguf":
        plan.merged_repo = _published(export_dir).get("merged", {}).get("repo_id")
    from huggingface_hub import ModelCard

    plan.card = ModelCard(build_card_text(plan))
    card_file = RepoFile("README.md", data=str(plan.card).encode())
    _hash_and_scan([card_file], token, problems)
    _raise(problems, token)
    plan.files.append(card_file)
    return plan


