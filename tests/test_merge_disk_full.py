"""Disk full during `gptoss merge`: one clear error, nothing left that looks complete.

On a real small filesystem: a tmpfs mounted under the test's folder (needs root, as on the test
machines). Where no tmpfs can be mounted, the write-time test falls back to simulating ENOSPC at the
shard writer's file write, and says so in its output.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import subprocess
from pathlib import Path

import pytest

import export_support as sup
from gptoss.exporters import records
from gptoss.exporters.errors import DiskSpaceError
from gptoss.exporters.merge import MERGE_RECORD, prepare_merge, run_merge
from gptoss.exporters.runs import resolve_run

MB = 1 << 20


@pytest.fixture(scope="module")
def run(request, tmp_path_factory) -> Path:
    return sup.tiny_run(request, tmp_path_factory)


@contextlib.contextmanager
def tmpfs(where: Path, size: int):
    """A tmpfs of ``size`` bytes at ``where``; None when this machine cannot mount one."""
    where.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True, text=True)
    if proc.returncode != 0:
        yield None
        return
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=True)


def _sizes(run: Path, out: Path) -> tuple[int, int]:
    """(weights bytes, what the merge needs in all) for the tiny run in bf16."""
    mp = prepare_merge(resolve_run(str(run)), out)
    from gptoss.exporters.merge import _side_bytes

    return mp.total_bytes, int(mp.total_bytes * 1.02) + _side_bytes(mp.base, mp.adapter)


def _digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_too_small_disk_is_refused_before_writing(run, tmp_path, capsys):
    """Room for the weights but not for the tokenizer beside them (28 MB here): refused up front."""
    weights, need = _sizes(run, tmp_path / "probe" / "merged")
    with tmpfs(tmp_path / "small", int(weights * 1.02) + 4 * MB) as small:
        if small is None:
            pytest.skip("cannot mount a tmpfs here (not root); test_merge.py checks the refusal with free space mocked")
        from gptoss.cli import main

        capsys.readouterr()
        assert main(["merge", "--run", str(run), "--out", str(small / "merged")]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"gptoss: error: merging needs about {records.human(need)} in {small} but only ") and err.count("\n") == 1, err
        assert list(small.iterdir()) == []


def test_disk_full_while_writing_leaves_the_old_merge_and_no_partial(run, tmp_path):
    """The disk fills while the shards are written (``check_disk=False`` stands for space that
    another writer takes after the check): DiskSpaceError naming the folder, what was needed and
    free, and what to do; the partial output is gone and the previous complete merge is untouched."""
    weights, need = _sizes(run, tmp_path / "probe" / "merged")
    with tmpfs(tmp_path / "small", need + need // 2) as small:
        simulated = small is None
        if simulated:  # no tmpfs here: the same failure, raised by the write call itself
            small = tmp_path / "small"
        out = small / "merged"
        first = run_merge(prepare_merge(resolve_run(str(run)), out, max_shard_size="60MB"), progress=False)
        assert (out / MERGE_RECORD).is_file() and len(first.record["output"]["files"]) > 2
        before = _digests(out)
        mp = prepare_merge(resolve_run(str(run)), out, dtype="float32", max_shard_size="60MB")  # twice as big
        with contextlib.ExitStack() as stack:
            if simulated:
                print("simulated ENOSPC: no tmpfs could be mounted here")
                stack.enter_context(_enospc_after(need // 2))
            with pytest.raises(DiskSpaceError) as e:
                run_merge(mp, progress=False, check_disk=False)
        message = str(e.value)
        print(message)
        assert message.startswith(f"the disk is full (No space left on device): merging into {out} needs about "
                                  f"{records.human(int(mp.total_bytes * 1.02) + need - int(weights * 1.02))} in {small}; ")
        assert " was free when it started and it ran out writing model-0000" in message
        assert "the partial output .merged.partial-" in message and "was removed" in message
        assert "Free at least " in message and "or pass --out on a larger disk, then run gptoss merge again" in message
        assert isinstance(e.value.__cause__, OSError) and e.value.__cause__.errno == errno.ENOSPC
        # nothing half-written is left, and the complete merge from before is as it was
        assert sorted(p.name for p in small.iterdir()) == ["merged"]
        assert _digests(out) == before


@contextlib.contextmanager
def _enospc_after(budget: int):
    """Fallback only: shard writes fail with ENOSPC once ``budget`` bytes were written."""
    from gptoss.exporters import safetensors_stream

    original = safetensors_stream.ShardWriter.write
    written = [0]

    def write(self, name, tensor):
        written[0] += tensor.numel() * tensor.element_size()
        if written[0] > budget:
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(self, name, tensor)

    safetensors_stream.ShardWriter.write = write
    try:
        yield
    finally:
        safetensors_stream.ShardWriter.write = original
