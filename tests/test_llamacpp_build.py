"""`gptoss build`: one announced build with progress, a marker only on success, resume after a kill,
nothing half-built left after a failure, binaries that run when copied out of the build tree.

These run the real machinery (cmake, ninja, the lock, the marker, the progress display) on
tests/data/fake_llama_cpp, a stand-in source with llama.cpp's target names and layout that builds
in seconds; the real llama.cpp build is what tests/test_export.py uses (its figures are in
docs/BENCHMARKS.md).
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, missing_tool
from pty_support import run_in_terminal

FAKE_SRC = REPO / "tests" / "data" / "fake_llama_cpp"


@pytest.fixture
def env(tmp_path) -> dict:
    if shutil.which("cmake") is None:
        missing_tool("cmake is needed to build llama.cpp (apt-get install cmake)")
    src = tmp_path / "src"
    shutil.copytree(FAKE_SRC, src)
    out = {k: v for k, v in os.environ.items() if k not in ("GPTOSS_LLAMA_CPP_BIN", "GPTOSS_LLAMA_CPP_SDIST")}
    out.update(GPTOSS_CACHE=str(tmp_path / "cache"), GPTOSS_LLAMA_CPP_SRC=str(src), GPTOSS_BUILD_JOBS="2",
               PYTHONPATH=str(REPO))
    return out


def cache(env: dict) -> Path:
    return Path(env["GPTOSS_CACHE"]) / "llama.cpp-0.3.36"


def gptoss(env: dict, *args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gptoss", *args], capture_output=True, text=True, env=env, cwd=REPO,
                          timeout=300, **kw)


def test_build_announces_itself_logs_the_compiler_and_is_reused(env):
    proc = gptoss(env, "build")
    assert proc.returncode == 0, proc.stderr
    bin_dir = cache(env) / "build-cpu" / "bin"
    assert proc.stdout.strip() == str(bin_dir)
    err = proc.stderr.splitlines()
    log = cache(env) / "build-cpu.log"
    # what compiles, where, an estimate and the log file, before anything compiles
    assert err[0].startswith("gptoss build: compiling llama.cpp 0000000000 (llama-cpp-python 0.3.36) for CPU")
    assert "llama-server, llama-quantize, llama-bench and libllama/libggml" in err[0]
    assert "about" in err[1] and "with 2 jobs" in err[1] and err[2].strip() == f"compiler output: {log}"
    # not a terminal: one line per stage, and none of the compiler's lines
    assert [line.split(" ...")[0] for line in err[3:5]] == ["llama.cpp: configuring (cmake)",
                                                            "llama.cpp: compiling (ninja, 2 jobs)"]
    assert err[4].endswith(" s") and " steps in " in err[4]
    assert err[5].startswith("gptoss build: llama.cpp built in") and len(err) == 6
    assert "Building C object" in log.read_text()
    marker = json.loads((bin_dir.parent / ".complete.json").read_text())
    assert set(marker["targets"]) == {"llama-server", "llama-quantize", "llama-bench", "llama", "ggml"}
    again = gptoss(env, "build")
    assert again.returncode == 0 and again.stderr == "" and again.stdout == proc.stdout


def test_tools_run_copied_out_of_the_build_tree(env, tmp_path):
    """Images copy the bin folder elsewhere: each binary finds its libraries beside it ($ORIGIN)."""
    proc = subprocess.run([sys.executable, "-m", "gptoss.llamacpp", "install", str(tmp_path / "opt"), "--no-source",
                           "--tools", "llama-server"], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    shutil.rmtree(cache(env))  # nothing of the build tree is left to find
    assert sorted(p.name for p in (tmp_path / "opt" / "bin").iterdir()) == ["libggml.so", "libllama.so", "llama-server"]
    run = subprocess.run([str(tmp_path / "opt" / "bin" / "llama-server")], capture_output=True, text=True,
                         env={"PATH": "/usr/bin:/bin"})
    assert run.returncode == 0 and run.stdout == "fake tool: 42\n", run.stderr


def test_a_killed_build_is_resumed_not_trusted(env, tmp_path):
    gate = tmp_path / "gate"
    os.mkfifo(gate)
    proc = subprocess.Popen([sys.executable, "-m", "gptoss", "build"], env={**env, "STEP_GATE": str(gate)},
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    with open(gate, "w") as fifo:  # opens once the build step reads it: the build is under way
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
        fifo.write("go\n")
    bdir = cache(env) / "build-cpu"
    assert (bdir / "CMakeCache.txt").is_file() and not (bdir / ".complete.json").exists()
    from_code = subprocess.run([sys.executable, "-c", "from gptoss import llamacpp; llamacpp.tool('llama-server', build=False)"],
                               capture_output=True, text=True, env=env, cwd=REPO)
    assert from_code.returncode == 1 and "is not built; run `gptoss build`" in from_code.stderr
    resumed = gptoss(env, "build")
    assert resumed.returncode == 0, resumed.stderr
    assert resumed.stderr.startswith("gptoss build: resuming the interrupted build of llama.cpp")
    assert (bdir / ".complete.json").is_file()
    assert subprocess.run([str(bdir / "bin" / "llama-quantize")], capture_output=True, text=True).stdout == "fake tool: 42\n"


def test_a_failed_build_is_removed_and_the_error_says_what_to_run(env):
    src = Path(env["GPTOSS_LLAMA_CPP_SRC"])
    (src / "llama.c").write_text("int fake_llama(void) { return ; ) }\n")
    proc = gptoss(env, "build")
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()
    assert any("building llama.cpp failed in cmake (compile)" in line for line in last)
    assert f"Compiler output: {cache(env) / 'build-cpu.log'}" in proc.stderr
    assert "llama.c" in proc.stderr and "then run `gptoss build`" in proc.stderr
    assert not (cache(env) / "build-cpu").exists()


def test_a_second_process_waits_for_the_build_in_progress(env):
    cache(env).mkdir(parents=True)
    with open(cache(env) / ".build-cpu.lock", "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        proc = subprocess.Popen([sys.executable, "-m", "gptoss", "build"], env=env, cwd=REPO, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        first = proc.stderr.readline()
        assert first.startswith("gptoss: waiting for another process") and "building llama.cpp" in first
        fcntl.flock(held, fcntl.LOCK_UN)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0 and "gptoss build: compiling llama.cpp" in err


def test_build_in_a_terminal_shows_a_progress_bar(env):
    text = run_in_terminal([sys.executable, "-m", "gptoss", "build"], env=env, cwd=REPO)
    assert "gptoss build: compiling llama.cpp" in text
    # tqdm's bar: "llama.cpp: compiling (ninja, 2 jobs): 100%|█████| 12/12 [00:01<00:00, ...]"
    assert "llama.cpp: compiling (ninja, 2 jobs): 100%|" in text and "\r" in text
    assert "Building C object" not in text
