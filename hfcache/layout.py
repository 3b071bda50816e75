"""`gptoss cache import`: lay a downloaded folder into the Hugging Face cache as huggingface_hub does.

    <cache>/<models|datasets>--OWNER--NAME/
      blobs/<etag>               the file's bytes, named by the ETag the Hub sends for it: the sha256
                                 for LFS (and Xet) files, the git blob sha1 for the others
      snapshots/<commit>/PATH    relative symlink to ../../blobs/<etag> (one more ../ per folder level)
      refs/<ref>                 the commit (refs/main by default)

hf_hub_download names blobs by that ETag, so a blob laid here with the right name is reused, not
downloaded again, once the machine is online. Which files are LFS is read from the folder's own
records when `hf download --local-dir` left them (`.cache/huggingface/`: the tree listing, per-file
ETags, the commit); otherwise it is decided as the Hub does, from `.gitattributes` (the Hub's
default one when the folder has none), the size (over 10 MiB) and binary content. A wrong guess
costs only a re-download online; offline loading does not depend on blob names.

Nothing half-laid looks complete: blobs are written under temporary names and renamed, the snapshot
is built beside the repo's snapshots/ and renamed into place, and the ref is written last.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Literal

from gptoss.choices import choice_problem
from gptoss.hfcache.errors import ImportRefusedError, ImportVerificationError

RepoType = Literal["model", "dataset"]
REPO_TYPES: tuple[str, ...] = ("model", "dataset")
COMMIT_RE = re.compile(r"[0-9a-f]{40}")
REF_RE = re.compile(r"[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+)*")
# The Hub refuses files over 10 MB outside LFS; Xet-backed repos store them the same way.
LFS_MIN_SIZE = 10 * 1024 * 1024
# How much of a file the Hub looks at to tell binary from text (huggingface_hub sends 512 bytes as
# the preupload "sample", lfs.UploadInfo).
SAMPLE_BYTES = 512
# The .gitattributes the Hub creates in a new repo (every pattern is filter=lfs).
HUB_DEFAULT_LFS_PATTERNS = (
    "*.7z", "*.arrow", "*.bin", "*.bz2", "*.ckpt", "*.ftz", "*.gz", "*.h5", "*.joblib", "*.lfs.*",
    "*.mlmodel", "*.model", "*.msgpack", "*.npy", "*.npz", "*.onnx", "*.ot", "*.parquet", "*.pb",
    "*.pickle", "*.pkl", "*.pt", "*.pth", "*.rar", "*.safetensors", "saved_model/**/*", "*.tar.*",
    "*.tar", "*.tflite", "*.tgz", "*.wasm", "*.xz", "*.zip", "*.zst", "*tfevents*",
)
# What `hf download --local-dir` writes beside the files (huggingface_hub._local_folder); never imported.
LOCAL_DIR_RECORDS = (".cache", "huggingface")
SKIPPED_DIRS = (".git",)
CHUNK = 16 * 1024 * 1024
TMP_PREFIX = ".gptoss-import-"

EtagSource = Literal["hub tree listing", "hub download record", "lfs (sha256)", "git blob (sha1)"]
CommitSource = Literal["--revision", "hub download record", "made up from the file hashes"]


@dataclasses.dataclass(frozen=True)
class SourceFile:
    """One file of the folder being imported."""

    path: str  # in the repo, '/'-separated
    source: Path
    size: int
    sha256: str
    git_sha1: str
    etag: str  # the blob's name
    etag_source: EtagSource


@dataclasses.dataclass(frozen=True)
class ImportResult:
    """What `gptoss cache import` laid into the cache, and how it was checked."""

    repo_id: str
    repo_type: RepoType
    commit: str
    commit_source: CommitSource
    ref: str
    ref_was: str | None  # the commit refs/<ref> held before (None: it did not exist)
    snapshot_path: Path
    files: tuple[SourceFile, ...]
    blobs_written: int
    bytes_written: int
    already_there: bool  # the snapshot held these files already
    loaded_offline: Path  # what snapshot_download(local_files_only=True) returned under HF_HUB_OFFLINE=1
    size_on_disk: int  # the revision's blobs, as scan_cache_dir counts them
    refs: tuple[str, ...]  # every ref pointing at the commit


# ---------------------------------------------------------------------------------------------
# Arguments


def repo_folder(cache_dir: Path, repo_id: str, repo_type: str) -> Path:
    from huggingface_hub.file_download import repo_folder_name

    return cache_dir / repo_folder_name(repo_id=repo_id, repo_type=repo_type)


def default_cache_dir() -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def repo_id_problem(repo_id: object) -> str | None:
    if not isinstance(repo_id, str) or repo_id.count("/") != 1 or not all(repo_id.split("/")):
        return f"--repo-id {repo_id!r}: must be a Hub id 'owner/name' (e.g. unsloth/gpt-oss-20b-BF16)"
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        return f"--repo-id {repo_id!r}: {e}"
    return None


def _argument_problems(folder: Path, repo_id, revision, ref, repo_type) -> list[str]:
    problems = []
    if not folder.exists():
        problems.append(f"FOLDER {folder}: no such folder; pass the folder `hf download ID --local-dir FOLDER` wrote")
    elif not folder.is_dir():
        problems.append(f"FOLDER {folder}: is a file, not a folder; pass the folder that holds the repo's files")
    if (p := repo_id_problem(repo_id)) is not None:
        problems.append(p)
    if revision is not None and not (isinstance(revision, str) and COMMIT_RE.fullmatch(revision)):
        problems.append(f"--revision {revision!r}: must be the full commit hash (40 lowercase hex digits); "
                        "a branch or tag name goes in --ref")
    if not isinstance(ref, str) or not REF_RE.fullmatch(ref) or ".." in ref.split("/") or COMMIT_RE.fullmatch(ref):
        problems.append(f"--ref {ref!r}: must be a branch or tag name such as main")
    if wrong := choice_problem("--repo-type", repo_type, REPO_TYPES):
        problems.append(wrong)
    return problems


# ---------------------------------------------------------------------------------------------
# The folder and what huggingface_hub recorded in it


def list_files(folder: Path) -> dict[str, Path]:
    """repo path -> file, skipping `.git/` and the `.cache/huggingface/` records of a local-dir download."""
    out: dict[str, Path] = {}
    broken = []
    for root, dirs, names in os.walk(folder, followlinks=True):
        rel_root = Path(root).relative_to(folder)
        dirs[:] = sorted(d for d in dirs if not (rel_root == Path(".") and d in SKIPPED_DIRS)
                         and not (rel_root.parts + (d,))[:2] == LOCAL_DIR_RECORDS)
        for name in sorted(names):
            path = Path(root) / name
            if not path.is_file():
                broken.append(str(path))
                continue
            out[(rel_root / name).as_posix()] = path
    if broken:
        raise ImportRefusedError(f"FOLDER {folder}: {len(broken)} entries are not readable files (broken links?): "
                                 f"{', '.join(broken[:5])}; fix or remove them")
    return out


@dataclasses.dataclass
class HubRecords:
    """What `hf download --local-dir` left in FOLDER/.cache/huggingface."""

    trees: dict  # commit -> {path: TreeCacheEntry}
    downloads: dict[str, tuple[str, str]]  # path -> (commit, etag)


def read_hub_records(folder: Path) -> HubRecords:
    base = folder.joinpath(*LOCAL_DIR_RECORDS)
    trees: dict = {}
    if (base / "trees").is_dir():
        try:
            from huggingface_hub._tree_cache import read_tree_cache  # huggingface_hub >= 1.x writes these
        except ImportError:
            read_tree_cache = None
        for listing in sorted((base / "trees").glob("*.json")) if read_tree_cache else ():
            if COMMIT_RE.fullmatch(listing.stem) and (entries := read_tree_cache(str(base), listing.stem)) is not None:
                trees[listing.stem] = entries
    downloads: dict[str, tuple[str, str]] = {}
    # `<path>.metadata`: commit, etag, timestamp, one a line (huggingface_hub write_download_metadata).
    # Read here, not with read_download_metadata: that one takes locks inside FOLDER (which may be
    # read-only) and drops records older than the file's mtime, which any copy changes; the content
    # hash is checked against the etag instead.
    for record in sorted((base / "download").rglob("*.metadata")) if (base / "download").is_dir() else ():
        lines = record.read_text(encoding="utf-8", errors="replace").splitlines()
        if len(lines) >= 2 and COMMIT_RE.fullmatch(lines[0].strip()):
            path = record.relative_to(base / "download").as_posix()[: -len(".metadata")]
            downloads[path] = (lines[0].strip(), lines[1].strip())
    return HubRecords(trees, downloads)


def lfs_patterns(folder: Path) -> list[tuple[str, bool]]:
    """(pattern, is LFS) from FOLDER/.gitattributes, or the Hub's default patterns."""
    attributes = folder / ".gitattributes"
    if not attributes.is_file():
        return [(p, True) for p in HUB_DEFAULT_LFS_PATTERNS]
    out = []
    for line in attributes.read_text(encoding="utf-8", errors="replace").splitlines():
        parts = line.split()
        if not parts or parts[0].startswith("#"):
            continue
        filters = [a for a in parts[1:] if a.lstrip("-!").split("=")[0] == "filter"]
        if filters:
            out.append((parts[0], filters[-1] == "filter=lfs"))
    return out


def _matches(pattern: str, path: str) -> bool:
    # git: a pattern without a slash matches the name at any depth, one with a slash the whole path.
    if "/" not in pattern.rstrip("/"):
        return fnmatch.fnmatchcase(path.rsplit("/", 1)[-1], pattern)
    return fnmatch.fnmatchcase(path, pattern.lstrip("/")) or fnmatch.fnmatchcase(path, pattern.lstrip("/").replace("/**/", "/"))


def is_lfs(path: str, size: int, sample: bytes, patterns: list[tuple[str, bool]]) -> bool:
    """Whether the Hub stores this file in LFS/Xet (its ETag is then the sha256)."""
    if size == 0:
        return False  # huggingface_hub commits empty files as regular ones
    tracked = None
    for pattern, lfs in patterns:  # the last matching line wins, as in git
        if _matches(pattern, path):
            tracked = lfs
    if tracked:
        return True
    return size >= LFS_MIN_SIZE or b"\0" in sample[:SAMPLE_BYTES]


def _bar(desc: str, total: int):
    """A byte progress bar on stderr, shown on a terminal only."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, disable=None, leave=False)


def _hashes(path: Path, size: int, bar=None) -> tuple[str, str]:
    """(sha256, git blob sha1) in one read. The git hash is sha1(b"blob <size>\\0" + bytes), as
    huggingface_hub.utils.sha.git_hash computes it (tests compare the two)."""
    sha256, sha1 = hashlib.sha256(), hashlib.sha1(b"blob %d\0" % size)
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            sha256.update(chunk)
            sha1.update(chunk)
            if bar is not None:
                bar.update(len(chunk))
    return sha256.hexdigest(), sha1.hexdigest()


def _sha256(path: Path, bar=None) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
            if bar is not None:
                bar.update(len(chunk))
    return h.hexdigest()


def describe(folder: Path, files: dict[str, Path], records: HubRecords, commit: str | None) -> list[SourceFile]:
    """Hash every file and name its blob; a file that contradicts the Hub's record is refused."""
    patterns = lfs_patterns(folder)
    tree = records.trees.get(commit) if commit else None
    out, wrong = [], []
    bar = _bar("hashing FOLDER", sum(p.stat().st_size for p in files.values()))
    for rel, path in files.items():
        size = path.stat().st_size
        with path.open("rb") as f:
            sample = f.read(SAMPLE_BYTES)
        sha256, git_sha1 = _hashes(path, size, bar)
        entry = tree.get(rel) if tree else None
        recorded = records.downloads.get(rel)
        if entry is not None:
            etag, source = entry.lfs_sha256 or entry.blob_id, "hub tree listing"
            expected = sha256 if entry.lfs_sha256 else git_sha1
        elif recorded is not None and recorded[0] == commit:
            etag, source = recorded[1], "hub download record"
            expected = sha256 if len(etag) == 64 else git_sha1
        elif is_lfs(rel, size, sample, patterns):
            etag = expected = sha256
            source = "lfs (sha256)"
        else:
            etag = expected = git_sha1
            source = "git blob (sha1)"
        if etag != expected:
            wrong.append(f"{rel} (the Hub's etag {etag}, the file's {'sha256' if expected == sha256 else 'git sha1'} {expected})")
        out.append(SourceFile(rel, path, size, sha256, git_sha1, etag, source))
    bar.close()
    if wrong:
        raise ImportRefusedError(
            f"FOLDER {folder}: {len(wrong)} files differ from what the Hub served at commit {commit} "
            f"(recorded in {folder.joinpath(*LOCAL_DIR_RECORDS)}): {'; '.join(wrong[:5])}; download them again "
            f"(hf download --local-dir re-fetches changed files)")
    return out


def choose_commit(folder: Path, revision: str | None, records: HubRecords, files: dict[str, Path], force: bool) -> tuple[str | None, CommitSource | None]:
    """The commit to lay the snapshot under: --revision, else the one the folder was downloaded at;
    None when nothing records it (the caller makes one up from the file hashes)."""
    seen: dict[str, int] = {}
    for rel in files:
        if rel in records.downloads:
            seen[records.downloads[rel][0]] = seen.get(records.downloads[rel][0], 0) + 1
    if not seen:
        seen = {c: sum(1 for rel in files if rel in entries) for c, entries in records.trees.items()}
    where = folder.joinpath(*LOCAL_DIR_RECORDS)
    if revision is not None:
        if seen and revision not in seen and not force:
            raise ImportRefusedError(
                f"--revision {revision}: {where} records that FOLDER was downloaded at "
                f"{', '.join(seen)}; pass that commit, or --force to lay it in as {revision} anyway")
        return revision, "--revision"
    if len(seen) > 1:
        counts = ", ".join(f"{c} ({n} files)" for c, n in seen.items())
        raise ImportRefusedError(f"FOLDER {folder}: its files were downloaded at different commits ({counts}, "
                                 f"per {where}); download it again at one commit, or pass --revision")
    if seen:
        return next(iter(seen)), "hub download record"
    return None, None


def made_up_commit(files: list[SourceFile]) -> str:
    """A commit-shaped id derived from the paths and blob names: the same folder always gets the same one."""
    h = hashlib.sha1(b"gptoss cache import\n")
    for f in sorted(files, key=lambda f: f.path):
        h.update(f"{f.path}\0{f.etag}\n".encode())
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# Laying it in


def _existing_conflicts(snapshot: Path, files: list[SourceFile]) -> tuple[list[str], dict[str, Path]]:
    """(files whose content differs from the snapshot's, the snapshot's entries by repo path)."""
    existing = {p.relative_to(snapshot).as_posix(): p for p in snapshot.rglob("*") if p.is_symlink() or p.is_file()}
    conflicts = []
    for f in files:
        old = existing.get(f.path)
        if old is None:
            continue
        if old.is_symlink() and os.path.basename(os.readlink(old)) == f.etag and old.exists():
            continue
        if not old.exists():
            conflicts.append(f"{f.path} (its blob is missing)")
        elif old.stat().st_size != f.size or _sha256(old) != f.sha256:
            conflicts.append(f.path)
    return conflicts, existing


def _copy_blob(f: SourceFile, blobs: Path, bar=None) -> bool:
    """Copy one file into blobs/<etag> (temporary name, hash checked, renamed); False when it was there."""
    from huggingface_hub.utils import WeakFileLock

    blob = blobs / f.etag
    lock = blobs.parent.parent / ".locks" / blobs.parent.name / f"{f.etag}.lock"  # where hf_hub_download locks it
    lock.parent.mkdir(parents=True, exist_ok=True)
    with WeakFileLock(lock):
        if blob.is_file() and blob.stat().st_size == f.size:
            return False
        tmp = blobs / f"{TMP_PREFIX}{f.etag}.{secrets.token_hex(4)}.tmp"
        try:
            sha256 = hashlib.sha256()
            with f.source.open("rb") as src, tmp.open("wb") as dst:
                while chunk := src.read(CHUNK):
                    sha256.update(chunk)
                    dst.write(chunk)
                    if bar is not None:
                        bar.update(len(chunk))
                dst.flush()
                os.fsync(dst.fileno())
            if sha256.hexdigest() != f.sha256:
                raise ImportRefusedError(f"{f.source}: changed while it was being imported; run the import again")
            os.replace(tmp, blob)
        finally:
            tmp.unlink(missing_ok=True)
    return True


def _write_ref(repo: Path, ref: str, commit: str) -> str | None:
    """Point refs/<ref> at ``commit`` (atomically); returns the commit it pointed at before, if any."""
    path = repo / "refs" / ref
    path.parent.mkdir(parents=True, exist_ok=True)
    before = path.read_text().strip() if path.is_file() else None
    if before != commit:
        tmp = path.with_name(f"{path.name}.{secrets.token_hex(4)}.tmp")
        tmp.write_text(commit)  # no newline, as huggingface_hub writes it
        os.replace(tmp, path)
    return before


def _free_bytes(path: Path) -> int:
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return shutil.disk_usage(probe).free


def import_folder(
    folder: str | os.PathLike,
    *,
    repo_id: str,
    revision: str | None = None,
    ref: str = "main",
    repo_type: RepoType = "model",
    cache_dir: str | os.PathLike | None = None,
    force: bool = False,
) -> ImportResult:
    """Lay ``folder`` into the Hugging Face cache as ``repo_id`` at ``revision``, then load it offline.

    Raises ImportRefusedError (nothing written) for a missing or empty folder, a bad id, revision or
    ref, files that contradict the folder's own Hub records, a snapshot of that commit that already
    holds different content (unless ``force``), or too little free disk; ImportVerificationError
    when the result does not load offline byte for byte.
    """
    folder = Path(folder).expanduser().absolute()
    problems = _argument_problems(folder, repo_id, revision, ref, repo_type)
    if problems:
        raise ImportRefusedError("; ".join(problems))
    paths = list_files(folder)
    if not paths:
        raise ImportRefusedError(f"FOLDER {folder}: holds no files to import")
    cache = Path(cache_dir).expanduser().absolute() if cache_dir is not None else default_cache_dir()
    records = read_hub_records(folder)
    commit, commit_source = choose_commit(folder, revision, records, paths, force)
    files = describe(folder, paths, records, commit)
    if commit is None:
        commit, commit_source = made_up_commit(files), "made up from the file hashes"

    repo = repo_folder(cache, repo_id, repo_type)
    snapshot, blobs = repo / "snapshots" / commit, repo / "blobs"
    conflicts, existing = _existing_conflicts(snapshot, files) if snapshot.is_dir() else ([], {})
    if conflicts and not force:
        raise ImportRefusedError(
            f"{snapshot} already holds {repo_id} at {commit} with different content in {len(conflicts)} files "
            f"({', '.join(conflicts[:5])}); pass --force to replace that snapshot with FOLDER's files")
    same = not conflicts and all(f.path in existing for f in files)
    new_bytes = sum({f.etag: f.size for f in files if not (blobs / f.etag).is_file()}.values())
    if new_bytes > (free := _free_bytes(cache)):
        raise ImportRefusedError(f"{cache}: {free / 2**30:.1f} GiB free, the import needs {new_bytes / 2**30:.1f} GiB; "
                                 "free some space or point HF_HOME (or --cache-dir) at a larger disk")

    blobs.mkdir(parents=True, exist_ok=True)
    (repo / "snapshots").mkdir(exist_ok=True)
    written = bytes_written = 0
    if not same:
        with _bar("copying into the cache", new_bytes) as bar:
            for f in files:
                if _copy_blob(f, blobs, bar):
                    written += 1
                    bytes_written += f.size
        work = repo / f"{TMP_PREFIX}{secrets.token_hex(4)}"
        try:
            # Built at the snapshot's own depth (repo/<work>/<commit>/...), so its relative links hold after the rename.
            staged = work / commit
            staged.mkdir(parents=True)
            keep = {} if force else {rel: p for rel, p in existing.items() if rel not in {f.path for f in files}}
            for rel, old in keep.items():
                target = staged / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                if old.is_symlink():
                    os.symlink(os.readlink(old), target)
                else:
                    os.link(old, target)
            for f in files:
                target = staged / f.path
                target.parent.mkdir(parents=True, exist_ok=True)
                final_dir = snapshot.joinpath(*f.path.split("/")[:-1])
                os.symlink(os.path.relpath(blobs / f.etag, final_dir), target)
            if snapshot.is_dir():
                os.rename(snapshot, work / "replaced")
                try:
                    os.rename(staged, snapshot)
                except OSError:
                    os.rename(work / "replaced", snapshot)
                    raise
            else:
                os.rename(staged, snapshot)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    _copy_tree_listing(records, repo, commit, snapshot)
    ref_was = _write_ref(repo, ref, commit)
    loaded, size_on_disk, refs = verify_offline(cache, repo_id, repo_type, ref, snapshot, files)
    return ImportResult(repo_id, repo_type, commit, commit_source, ref, ref_was, snapshot, tuple(files), written,
                        bytes_written, same, loaded, size_on_disk, refs)


def _copy_tree_listing(records: HubRecords, repo: Path, commit: str, snapshot: Path) -> None:
    """The Hub's file listing for the commit, where huggingface_hub keeps it (repo/trees/<commit>.json), when
    the snapshot holds every file in it: online downloads then skip listing the repo again. A partial
    snapshot gets none (huggingface_hub would call it incomplete, though the files it has load)."""
    entries = records.trees.get(commit)
    if not entries or not all((snapshot / path).is_file() for path in entries):
        return
    from huggingface_hub._tree_cache import write_tree_cache

    write_tree_cache(str(repo), commit, entries)


# ---------------------------------------------------------------------------------------------
# Checking it


_LOAD = """
import sys
from huggingface_hub import constants, snapshot_download
assert constants.HF_HUB_OFFLINE
print(snapshot_download(sys.argv[1], repo_type=sys.argv[2], revision=sys.argv[3], cache_dir=sys.argv[4], local_files_only=True))
"""


def verify_offline(cache: Path, repo_id: str, repo_type: str, ref: str, snapshot: Path,
                   files: list[SourceFile]) -> tuple[Path, int, tuple[str, ...]]:
    """Load the repo at ``ref`` in a fresh process with HF_HUB_OFFLINE=1 and compare every file with
    the source; returns the loaded folder, the revision's size on disk and its refs."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache)}
    proc = subprocess.run([sys.executable, "-c", _LOAD, repo_id, repo_type, ref, str(cache)],
                          capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise ImportVerificationError(
            f"{repo_id} ({repo_type}) at {ref}: snapshot_download(local_files_only=True) with HF_HUB_OFFLINE=1 failed "
            f"after the import:\n{proc.stderr.strip()[-1500:]}")
    loaded = Path(proc.stdout.strip().splitlines()[-1])
    if loaded.resolve() != snapshot.resolve():
        raise ImportVerificationError(f"{repo_id} at {ref}: offline loading returned {loaded}, not the imported {snapshot}")
    with _bar("comparing the snapshot with FOLDER", sum(f.size for f in files)) as bar:
        differ = [f.path for f in files if not (loaded / f.path).is_file() or _sha256(loaded / f.path, bar) != f.sha256]
    if differ:
        raise ImportVerificationError(f"{loaded}: {len(differ)} files differ from the source: {', '.join(differ[:5])}")
    from huggingface_hub import scan_cache_dir

    info = scan_cache_dir(cache)
    for repo in info.repos:
        if repo.repo_id == repo_id and repo.repo_type == repo_type:
            for rev in repo.revisions:
                if rev.snapshot_path.resolve() == snapshot.resolve():
                    return loaded, rev.size_on_disk, tuple(sorted(rev.refs))
    why = "; ".join(str(w) for w in info.warnings) or "not listed"
    raise ImportVerificationError(f"{snapshot}: huggingface_hub's scan_cache_dir does not see the imported revision ({why})")
