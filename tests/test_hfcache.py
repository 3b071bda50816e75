"""`gptoss cache import | check` against what huggingface_hub itself writes.

The reference is huggingface_hub: a repo served by the local Hub (tests/fakehub.py; the real one
cannot be reached from CI) is downloaded with snapshot_download into a cache (the layout to match)
and into a --local-dir folder (what users copy between machines); the import of that folder must
give the same cache, load offline with HF_HUB_OFFLINE=1 (huggingface_hub, transformers, the merge's
resolve_model_dir), and spare a re-download once online.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from huggingface_hub import HfApi, constants, snapshot_download

from fakehub import FakeHub
from gptoss.layouts import SIXTEEN_BIT_ORIGINALS
from gptoss.hfcache import layout
from gptoss.hfcache.check import Need, check, configured_needs
from gptoss.hfcache.errors import ImportRefusedError

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "hf_fake_write_token_0123456789"
REPO = "acme/gpt-oss-tiny"


def small_repo(root: Path) -> Path:
    """Files that exercise every blob-naming rule: text (git sha1), an LFS pattern, binary content,
    10 MiB and over, empty, and nesting (relative links two levels deep)."""
    root.mkdir(parents=True)
    (root / "config.json").write_text(json.dumps({"model_type": "gpt_oss", "num_hidden_layers": 2}))
    (root / "weights.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    (root / "blob.dat").write_bytes(b"\x00\x01binary")
    (root / "big.txt").write_bytes(b"a" * (10 * 1024 * 1024))
    (root / "empty.txt").write_bytes(b"")
    (root / "original" / "sub").mkdir(parents=True)
    (root / "original" / "sub" / "notes.md").write_text("nested\n")
    return root


@pytest.fixture
def hub(monkeypatch):
    fake = FakeHub()
    fake.start()
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)  # fakehub speaks LFS, not Xet
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    yield fake
    fake.stop()


def publish(hub: FakeHub, folder: Path, repo_id: str = REPO, repo_type: str = "model") -> str:
    api = HfApi(endpoint=hub.url, token=TOKEN)
    api.create_repo(repo_id, repo_type=repo_type)
    return api.upload_folder(repo_id=repo_id, repo_type=repo_type, folder_path=folder).oid


def env(tmp_path: Path, **extra) -> dict:
    out = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    return {**out, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", **extra}


def gptoss_cache(*args, environ: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gptoss", "cache", *map(str, args)], capture_output=True,
                          text=True, env=environ, cwd=ROOT, timeout=600)


def tree(repo_dir: Path) -> dict[str, str]:
    """Every entry of a cached repo: links by target, files by content (refs, tree listings) or 'blob'."""
    out = {}
    for p in sorted(repo_dir.rglob("*")):
        rel = p.relative_to(repo_dir).as_posix()
        if p.is_symlink():
            out[rel] = "-> " + os.readlink(p)
        elif p.is_file():
            out[rel] = "blob" if rel.startswith("blobs/") else p.read_text()
    return out


def offline(code: str, environ: dict) -> str:
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=environ, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.strip()


# ---------------------------------------------------------------------------------------------
# import


def test_import_of_a_local_dir_download_is_the_cache_huggingface_hub_writes(hub, tmp_path):
    commit = publish(hub, small_repo(tmp_path / "src"))
    reference = Path(snapshot_download(REPO, cache_dir=tmp_path / "ref", endpoint=hub.url)).parent.parent
    downloaded = Path(snapshot_download(REPO, local_dir=tmp_path / "dl", endpoint=hub.url))
    assert (downloaded / ".cache" / "huggingface" / "trees" / f"{commit}.json").is_file()

    e = env(tmp_path)
    proc = gptoss_cache("import", downloaded, "--repo-id", REPO, environ=e)
    assert proc.returncode == 0, proc.stderr
    cache = tmp_path / "hf" / "hub"
    snapshot = cache / f"models--{REPO.replace('/', '--')}" / "snapshots" / commit
    assert proc.stdout.strip() == str(snapshot)
    assert f"commit {commit} (as recorded by hf download" in proc.stderr
    assert "verified: snapshot_download(local_files_only=True) with HF_HUB_OFFLINE=1" in proc.stderr
    imported = tree(snapshot.parent.parent)
    assert imported == tree(reference), "blob names, links, refs and the tree listing match huggingface_hub's"
    assert imported["snapshots/" + commit + "/original/sub/notes.md"].startswith("-> ../../../../blobs/")
    assert imported["refs/main"] == commit
    assert not list(cache.rglob(f"{layout.TMP_PREFIX}*")), "no temporary names left behind"

    loaded = offline(f"from huggingface_hub import snapshot_download; print(snapshot_download({REPO!r}, local_files_only=True))", e)
    assert loaded == str(snapshot)
    for src in (tmp_path / "src").rglob("*"):
        if src.is_file():
            assert (snapshot / src.relative_to(tmp_path / "src")).read_bytes() == src.read_bytes()


def test_a_plain_copy_gets_the_hubs_blob_names_and_is_not_downloaded_again(hub, tmp_path):
    """Without hf download's records the blob names are worked out (sha256 for LFS, git sha1 for the
    rest) and the commit is made up; online, huggingface_hub then finds every blob and downloads nothing."""
    src = small_repo(tmp_path / "src")
    commit = publish(hub, src)
    reference = Path(snapshot_download(REPO, cache_dir=tmp_path / "ref", endpoint=hub.url)).parent.parent
    copy = tmp_path / "copy"
    shutil.copytree(Path(snapshot_download(REPO, local_dir=tmp_path / "dl", endpoint=hub.url)), copy,
                    ignore=shutil.ignore_patterns(".cache"))

    cache = tmp_path / "cache"
    result = layout.import_folder(copy, repo_id=REPO, cache_dir=cache)
    assert result.commit_source == "made up from the file hashes" and result.commit != commit
    assert result.commit == layout.import_folder(copy, repo_id=REPO, cache_dir=tmp_path / "again").commit
    assert sorted(p.name for p in (cache / reference.name / "blobs").iterdir()) == sorted(
        p.name for p in (reference / "blobs").iterdir())
    assert {f.path: f.etag_source for f in result.files} == {
        ".gitattributes": "git blob (sha1)", "config.json": "git blob (sha1)", "empty.txt": "git blob (sha1)",
        "original/sub/notes.md": "git blob (sha1)", "weights.safetensors": "lfs (sha256)",
        "blob.dat": "lfs (sha256)", "big.txt": "lfs (sha256)"}

    hub.requests.clear()
    online = snapshot_download(REPO, cache_dir=cache, endpoint=hub.url)
    assert Path(online).name == commit
    assert not [r for r in hub.requests if r[0] == "GET" and "/resolve/" in r[1]], "nothing downloaded again"
    assert (cache / reference.name / "refs" / "main").read_text() == commit


def test_the_tiny_fixture_imported_loads_offline_in_transformers_and_the_merge(tiny_model, tmp_path):
    commit = "0123456789abcdef0123456789abcdef01234567"
    e = env(tmp_path)
    proc = gptoss_cache("import", tiny_model, "--repo-id", REPO, "--revision", commit, environ=e)
    assert proc.returncode == 0, proc.stderr
    assert f"commit {commit} (from --revision)" in proc.stderr
    config = json.loads((tiny_model / "config.json").read_text())
    out = offline(
        "from transformers import AutoConfig, AutoTokenizer\n"
        "from gptoss.exporters.checkpoint import resolve_model_dir\n"
        f"c = AutoConfig.from_pretrained({REPO!r}); t = AutoTokenizer.from_pretrained({REPO!r})\n"
        f"print(c.model_type, c.num_hidden_layers, c.hidden_size, len(t), *resolve_model_dir({REPO!r}))", e)
    assert out.split() == ["gpt_oss", str(config["num_hidden_layers"]), str(config["hidden_size"]),
                           out.split()[3], proc.stdout.strip(), commit]
    assert int(out.split()[3]) > 200_000  # the real o200k vocabulary plus Harmony tokens


def test_a_dataset_repo_imports_and_loads_offline(tmp_path):
    folder = tmp_path / "ds"
    (folder / "data").mkdir(parents=True)
    (folder / "data" / "train.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    (folder / "README.md").write_text("---\nlicense: apache-2.0\n---\n")
    e = env(tmp_path)
    proc = gptoss_cache("import", folder, "--repo-id", "HuggingFaceH4/Multilingual-Thinking", "--repo-type", "dataset",
                        environ=e)
    assert proc.returncode == 0, proc.stderr
    assert "/datasets--HuggingFaceH4--Multilingual-Thinking/snapshots/" in proc.stdout
    loaded = offline("from huggingface_hub import snapshot_download; print(snapshot_download("
                     "'HuggingFaceH4/Multilingual-Thinking', repo_type='dataset', local_files_only=True))", e)
    assert (Path(loaded) / "data" / "train.jsonl").read_bytes() == (folder / "data" / "train.jsonl").read_bytes()


def test_git_blob_hash_is_huggingface_hubs(tmp_path):
    from huggingface_hub.utils.sha import git_hash

    for data in (b"", b"hello\n", b"\x00" * 1000, os.urandom(3 * 1024 * 1024)):
        path = tmp_path / "f"
        path.write_bytes(data)
        assert layout._hashes(path, len(data))[1] == git_hash(data)


def test_lfs_rules_without_the_hubs_records(tmp_path):
    """A copy without .gitattributes falls back to the Hub's default patterns, size and binary content
    (the Hub appends such files to .gitattributes, which the tests above read back)."""
    default = layout.lfs_patterns(tmp_path)
    assert layout.is_lfs("a/model.safetensors", 10, b"{}", default)
    assert layout.is_lfs("saved_model/x/y.pb2", 10, b"text", default)
    assert layout.is_lfs("big.txt", layout.LFS_MIN_SIZE, b"a", default)
    assert not layout.is_lfs("big.txt", layout.LFS_MIN_SIZE - 1, b"a", default)
    assert layout.is_lfs("blob.dat", 8, b"\x00\x01", default)
    assert not layout.is_lfs("empty.bin", 0, b"", default)
    assert not layout.is_lfs("config.json", 100, b"{}", default)
    (tmp_path / ".gitattributes").write_text("*.json filter=lfs diff=lfs merge=lfs -text\nconfig.json -filter\n")
    own = layout.lfs_patterns(tmp_path)
    assert layout.is_lfs("tokenizer.json", 100, b"{}", own) and not layout.is_lfs("config.json", 100, b"{}", own)
    assert not layout.is_lfs("model.safetensors", 100, b"{}", own)  # the folder's own attributes replace the defaults


def test_importing_again_is_a_no_op_and_a_second_ref_points_at_the_same_commit(tmp_path):
    src = small_repo(tmp_path / "src")
    first = layout.import_folder(src, repo_id=REPO, cache_dir=tmp_path / "c")
    blob_times = {p: p.stat().st_mtime_ns for p in (first.snapshot_path.parent.parent / "blobs").iterdir()}
    again = layout.import_folder(src, repo_id=REPO, cache_dir=tmp_path / "c", ref="v1.0")
    assert again.already_there and again.blobs_written == 0 and again.commit == first.commit
    assert again.refs == ("main", "v1.0")
    assert {p: p.stat().st_mtime_ns for p in blob_times} == blob_times


def test_a_failed_import_leaves_no_snapshot_and_no_ref(tmp_path, monkeypatch):
    """A copy that fails half-way (a disk error injected into the blob copy: monkeypatched, as a full
    disk cannot be made here) leaves complete blobs at most, under their final names only."""
    src = small_repo(tmp_path / "src")
    real, calls = layout._copy_blob, []

    def failing(f, blobs, bar=None):
        calls.append(f.path)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        return real(f, blobs, bar)

    monkeypatch.setattr(layout, "_copy_blob", failing)
    with pytest.raises(OSError):
        layout.import_folder(src, repo_id=REPO, cache_dir=tmp_path / "c")
    repo = tmp_path / "c" / "models--acme--gpt-oss-tiny"
    assert not any((repo / "snapshots").iterdir()) and not (repo / "refs").exists()
    assert len(list((repo / "blobs").iterdir())) == 2
    monkeypatch.setattr(layout, "_copy_blob", real)
    assert layout.import_folder(src, repo_id=REPO, cache_dir=tmp_path / "c").blobs_written == 6 - 2


# ---------------------------------------------------------------------------------------------
# refusals


@pytest.mark.parametrize("args, message", [
    (["{missing}", "--repo-id", REPO], "FOLDER {missing}: no such folder"),
    (["{empty}", "--repo-id", REPO], "FOLDER {empty}: holds no files to import"),
    (["{src}", "--repo-id", "gpt-oss-20b"], "--repo-id 'gpt-oss-20b': must be a Hub id 'owner/name'"),
    (["{src}", "--repo-id", "a/b/c"], "--repo-id 'a/b/c': must be a Hub id 'owner/name'"),
    (["{src}", "--repo-id", REPO, "--revision", "main"], "--revision 'main': must be the full commit hash"),
    (["{src}"], "--repo-id: missing"),
    (["{src}", "--repo-id", REPO, "--profile", "quick_test"], "--profile is for `gptoss cache check`"),
])
def test_bad_input_is_refused_and_nothing_is_written(tmp_path, args, message):
    paths = {"missing": tmp_path / "nope", "empty": tmp_path / "empty", "src": small_repo(tmp_path / "src")}
    (paths["empty"] / ".cache" / "huggingface").mkdir(parents=True)
    (paths["empty"] / ".cache" / "huggingface" / "CACHEDIR.TAG").write_text("x")
    proc = gptoss_cache("import", *[a.format(**paths) for a in args], environ=env(tmp_path))
    assert proc.returncode == 2
    assert message.format(**paths) in proc.stderr
    assert not (tmp_path / "hf").exists()


def test_an_unknown_repo_type_is_refused(tmp_path):
    with pytest.raises(ImportRefusedError, match="--repo-type 'space': not one of model, dataset"):
        layout.import_folder(small_repo(tmp_path / "src"), repo_id=REPO, repo_type="space", cache_dir=tmp_path / "c")
    proc = gptoss_cache("import", tmp_path / "src", "--repo-id", REPO, "--repo-type", "space", environ=env(tmp_path))
    assert proc.returncode == 2 and "--repo-type" in proc.stderr and "model, dataset" in proc.stderr
    assert not (tmp_path / "c").exists() and not (tmp_path / "hf").exists()


def test_a_revision_that_exists_with_other_content_is_refused_unless_forced(tmp_path):
    commit = "fedcba9876543210fedcba9876543210fedcba98"
    first, second = small_repo(tmp_path / "a"), small_repo(tmp_path / "b")
    (second / "config.json").write_text('{"changed": true}')
    cache = tmp_path / "c"
    snapshot = layout.import_folder(first, repo_id=REPO, revision=commit, cache_dir=cache).snapshot_path
    before = tree(snapshot.parent.parent)
    with pytest.raises(ImportRefusedError, match=r"already holds acme/gpt-oss-tiny at fedcba98.* different content in 1 "
                                                 r"files \(config.json\); pass --force"):
        layout.import_folder(second, repo_id=REPO, revision=commit, cache_dir=cache)
    assert tree(snapshot.parent.parent) == before
    forced = layout.import_folder(second, repo_id=REPO, revision=commit, cache_dir=cache, force=True)
    assert (forced.snapshot_path / "config.json").read_text() == '{"changed": true}'
    assert forced.snapshot_path == snapshot


def test_files_that_contradict_the_hub_record_are_refused(hub, tmp_path):
    commit = publish(hub, small_repo(tmp_path / "src"))
    downloaded = Path(snapshot_download(REPO, local_dir=tmp_path / "dl", endpoint=hub.url))
    (downloaded / "config.json").write_text('{"edited": 1}')
    with pytest.raises(ImportRefusedError, match=rf"1 files differ from what the Hub served at commit {commit}.*config.json"):
        layout.import_folder(downloaded, repo_id=REPO, cache_dir=tmp_path / "c")
    other = "1" * 40
    (downloaded / "config.json").unlink()
    with pytest.raises(ImportRefusedError, match=rf"--revision {other}: .* downloaded at {commit}; pass that commit, or --force"):
        layout.import_folder(downloaded, repo_id=REPO, revision=other, cache_dir=tmp_path / "c")
    assert not (tmp_path / "c").exists()
    assert layout.import_folder(downloaded, repo_id=REPO, revision=other, cache_dir=tmp_path / "c", force=True).commit == other


# ---------------------------------------------------------------------------------------------
# check


def test_needs_follow_the_backend_and_the_sixteen_bit_originals():
    unsloth, _ = configured_needs(backend="unsloth")
    assert [(n.roles, n.name, n.repo_type) for n in unsloth] == [
        (("training base",), "unsloth/gpt-oss-20b-unsloth-bnb-4bit", "model"),
        (("merge base (16-bit original)",), SIXTEEN_BIT_ORIGINALS["unsloth/gpt-oss-20b-unsloth-bnb-4bit"], "model"),
        (("dataset",), "HuggingFaceH4/Multilingual-Thinking", "dataset")]
    assert SIXTEEN_BIT_ORIGINALS["unsloth/gpt-oss-20b-unsloth-bnb-4bit"] == "unsloth/gpt-oss-20b-BF16"
    plain, backend = configured_needs(backend="transformers", dataset="tests/data/train_tiny.jsonl")
    assert backend == "transformers"
    assert [(n.roles, n.name, n.local) for n in plain] == [
        (("training base", "merge base"), "openai/gpt-oss-20b", False), (("dataset",), "tests/data/train_tiny.jsonl", True)]
    custom, _ = configured_needs(backend="unsloth", merge_base="acme/my-bf16")
    assert custom[1].name == "acme/my-bf16" and custom[1].roles == ("merge base",)


def test_check_lists_what_is_missing_with_the_import_command_then_passes(tmp_path, tiny_model):
    e = env(tmp_path, COLUMNS="250")
    proc = gptoss_cache("check", "--backend", "unsloth", environ=e)
    assert proc.returncode == 2
    assert "3 of 3 needed inputs are missing" in proc.stderr
    for line in ("gptoss cache import DIR --repo-id unsloth/gpt-oss-20b-unsloth-bnb-4bit\n",
                 "gptoss cache import DIR --repo-id unsloth/gpt-oss-20b-BF16\n",
                 "gptoss cache import DIR --repo-id HuggingFaceH4/Multilingual-Thinking --repo-type dataset\n"):
        assert line in proc.stderr + "\n"
    assert "hf download unsloth/gpt-oss-20b-BF16 --local-dir DIR" in proc.stderr

    base = gptoss_cache("import", tiny_model, "--repo-id", "unsloth/gpt-oss-20b-unsloth-bnb-4bit", environ=e)
    assert base.returncode == 0, base.stderr
    proc = gptoss_cache("check", "--backend", "unsloth", environ=e)
    assert proc.returncode == 2 and "2 of 3 needed inputs are missing" in proc.stderr
    assert "unsloth/gpt-oss-20b-unsloth-bnb-4bit" not in proc.stderr
    commit = Path(base.stdout.strip()).name
    row = next(line for line in proc.stdout.splitlines() if "unsloth-bnb-4bit" in line)
    assert "ok: 7 files" in row and f"{commit[:12]} (main)" in row and "MiB" in row
    assert "free" in proc.stdout

    bf16 = gptoss_cache("import", tiny_model, "--repo-id", "unsloth/gpt-oss-20b-BF16", environ=e)
    assert bf16.returncode == 0, bf16.stderr
    proc = gptoss_cache("check", "--backend", "unsloth", "--dataset", "tests/data/train_tiny.jsonl", environ=e)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("ok:") == 3


def test_check_sees_missing_shards_a_missing_ref_and_broken_blobs(tmp_path):
    folder = tmp_path / "sharded"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "model-00001-of-00002.safetensors").write_bytes(b"x")
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    cache = tmp_path / "c"
    layout.import_folder(folder, repo_id="acme/sharded", cache_dir=cache)
    pinned = layout.import_folder(small_repo(tmp_path / "whole"), repo_id="acme/pinned", cache_dir=cache, ref="dev")
    layout.import_folder(small_repo(tmp_path / "src"), repo_id="acme/broken", cache_dir=cache)
    next((cache / "models--acme--broken" / "blobs").iterdir()).unlink()
    needs = [Need(("training base",), "acme/sharded", "model", None, False),
             Need(("training base",), "acme/pinned", "model", None, False),
             Need(("training base",), "acme/pinned", "model", pinned.commit, False),
             Need(("training base",), "acme/broken", "model", None, False),
             Need(("dataset",), "acme/sharded", "dataset", None, False)]
    statuses, where, free = check(needs, cache_dir=cache)
    assert where == cache.resolve() and free > 0
    assert [s.present for s in statuses] == [False, False, True, False, False]
    assert statuses[0].note == "1 of 2 weight shards missing (model-00002-of-00002.safetensors)"
    assert statuses[1].note.startswith(f"in the cache, but not at main (cached commits: {pinned.commit[:12]}")
    assert statuses[2].refs == ("dev",)
    assert statuses[3].note.startswith("corrupted in the cache: Blob missing (broken symlink)")
    assert statuses[4].note == "not in the cache"
