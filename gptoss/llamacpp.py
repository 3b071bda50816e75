"""The one pinned llama.cpp: the source vendored in the llama-cpp-python sdist, built once per machine.

Export (convert_hf_to_gguf.py + gguf-py, llama-quantize, the llama_cpp bindings for fidelity) and
serving (llama-server) use this exact source, fetched from the package index at image build or
first use and cached under $GPTOSS_CACHE (default ~/.cache/gptoss). One CMake build
(`gptoss build`) gives the tools and the shared libraries (libllama, libggml*) that the sdist's own
pure-Python ``llama_cpp`` package (ctypes bindings of the same version, so the same ABI) loads;
every binary finds its libraries beside it ($ORIGIN), so the bin folder can be copied elsewhere
(the images do). A build is announced (what compiles, an estimate, the log file), shows progress,
and marks its folder complete only when it succeeded; an interrupted one is resumed, a failed one
removed.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import functools
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from gptoss.errors import ToolchainError
from gptoss.progress import Stage, human_seconds

LLAMA_CPP_PYTHON_VERSION = "0.3.36"
SDIST_NAME = f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}.tar.gz"
# Build products we use; each is a CMake target of llama.cpp.
TOOLS = ("llama-server", "llama-quantize", "llama-bench")
# Built only when asked for (bench/serve_gpu.sh): the engine's own multi-sequence decode benchmark.
BENCH_TOOLS = ("llama-batched-bench",)
# Shared libraries the llama_cpp bindings load (libggml brings libggml-base and the CPU/CUDA backends).
LIBRARIES = ("llama", "ggml")
# Inside source_dir(): the sdist's pure-Python llama_cpp package (ctypes bindings).
BINDINGS_DIR = "llama-cpp-python"
# What source_dir() holds; a cache extracted by an older layout is extracted again.
SOURCE_LAYOUT = f"{LLAMA_CPP_PYTHON_VERSION} layout 2 (vendor/llama.cpp + {BINDINGS_DIR}/llama_cpp)"
BUILD_MARKER = ".complete.json"
BUILD_FORMAT = 1
# Measured compile work (user + sys CPU seconds of a cold `gptoss build`, docs/BENCHMARKS.md): the
# CPU build, and what CUDA adds per GPU architecture. The estimate divides it by the jobs.
CPU_BUILD_CORE_SECONDS = 900
CUDA_ARCH_CORE_SECONDS = 3400
CONFIGURE_FLAGS = (
    "-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_TOOLS=ON", "-DLLAMA_BUILD_SERVER=ON",
    # Shared libraries for the bindings; every binary looks for them in its own folder.
    "-DBUILD_SHARED_LIBS=ON", "-DCMAKE_BUILD_WITH_INSTALL_RPATH=ON", "-DCMAKE_INSTALL_RPATH=$ORIGIN",
    # Portable (AVX2/FMA/F16C on x86-64), so a cache or an image runs on other machines of its kind.
    "-DGGML_NATIVE=OFF",
)
_NINJA_STEP = re.compile(r"^\[(\d+)/(\d+)\]")
_MAKE_PERCENT = re.compile(r"^\[\s*(\d+)%\]")


class LlamaCppError(ToolchainError):
    """The pinned llama.cpp source or a tool built from it is not available."""


def cache_root() -> Path:
    base = os.environ.get("GPTOSS_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "gptoss"
    )
    return Path(base) / f"llama.cpp-{LLAMA_CPP_PYTHON_VERSION}"


@contextlib.contextmanager
def _locked(name: str, what: str):
    """One process at a time does ``what`` in the cache (others wait, and say so)."""
    cache_root().mkdir(parents=True, exist_ok=True)
    path = cache_root() / f".{name}.lock"
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "?"
            print(f"gptoss: waiting for another process ({holder}) that is {what} in {cache_root()}",
                  file=sys.stderr, flush=True)
            fcntl.flock(f, fcntl.LOCK_EX)
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()}")
        f.flush()
        try:
            yield
        finally:
            f.seek(0)
            f.truncate()
            fcntl.flock(f, fcntl.LOCK_UN)


def sdist(*, download: bool = True) -> Path:
    """The llama-cpp-python sdist: $GPTOSS_LLAMA_CPP_SDIST, the cache, or (first use) the package index."""
    override = os.environ.get("GPTOSS_LLAMA_CPP_SDIST")
    if override:
        path = Path(override)
        if not path.is_file():
            raise LlamaCppError(f"GPTOSS_LLAMA_CPP_SDIST={override} does not exist")
        return path
    path = cache_root() / SDIST_NAME
    if path.is_file():
        return path
    if not download:
        raise LlamaCppError(f"{path} is missing and downloads are off; run `gptoss build` once with network or mount the cache")
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp, \
            Stage(f"llama.cpp: fetching the llama-cpp-python {LLAMA_CPP_PYTHON_VERSION} sdist (its source) from the package index",
                  bytes_=True) as st:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-d", tmp,
               f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        got = Path(tmp) / SDIST_NAME
        if proc.returncode != 0 or not got.is_file():
            raise LlamaCppError(
                f"could not fetch llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION} from the package index "
                f"(needed once for llama.cpp's converter and tools): {proc.stderr.strip()[-500:]}"
            )
        st.set(got.stat().st_size)
        os.replace(got, path)
    return path


@functools.lru_cache(maxsize=None)
def source_dir() -> Path:
    """vendor/llama.cpp extracted from the sdist (without its models/ and docs/), with the sdist's
    llama_cpp package in ``BINDINGS_DIR``; $GPTOSS_LLAMA_CPP_SRC wins."""
    override = os.environ.get("GPTOSS_LLAMA_CPP_SRC")
    if override:
        if not (Path(override) / "convert_hf_to_gguf.py").is_file():
            raise LlamaCppError(f"GPTOSS_LLAMA_CPP_SRC={override} holds no convert_hf_to_gguf.py")
        return Path(override)
    target = cache_root() / "src"
    marker = target / ".complete"
    if marker.is_file() and marker.read_text().strip() == SOURCE_LAYOUT:
        return target
    with _locked("src", "extracting the llama.cpp source"):
        if marker.is_file() and marker.read_text().strip() == SOURCE_LAYOUT:
            return target
        archive = sdist()
        _extract(archive, target)
    return target


def _extract(archive: Path, target: Path) -> None:
    prefix = f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}/"
    vendor = prefix + "vendor/llama.cpp/"
    package = prefix + "llama_cpp/"
    head = prefix + ".git/modules/vendor/llama.cpp/HEAD"
    tmp = Path(tempfile.mkdtemp(prefix="src.partial-", dir=cache_root()))
    try:
        with Stage(f"llama.cpp: extracting the source from {archive.name}", unit="files") as st, tarfile.open(archive) as tar:
            members = []
            for m in tar.getmembers():
                if m.name == head:
                    m.name = "LLAMA_CPP_COMMIT"
                    members.append(m)
                elif m.name.startswith(vendor):
                    rel = m.name[len(vendor):]
                    if not rel or rel.split("/")[0] in ("models", "docs", "media") or rel == ".git":
                        continue
                    m.name = rel
                    members.append(m)
                elif m.name.startswith(package) and "/server/" not in m.name:
                    m.name = f"{BINDINGS_DIR}/llama_cpp/{m.name[len(package):]}"
                    members.append(m)
            # The "data" filter (no links out, no devices) where this Python has it (3.11.4+, 3.12).
            safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
            tar.extractall(tmp, members=members, **safe)
            st.set(len(members))
        if not (tmp / BINDINGS_DIR / "llama_cpp" / "llama_cpp.py").is_file():
            raise LlamaCppError(f"{archive} holds no llama_cpp package (is it the llama-cpp-python {LLAMA_CPP_PYTHON_VERSION} sdist?)")
        (tmp / ".complete").write_text(SOURCE_LAYOUT + "\n")
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def commit() -> str:
    """The llama.cpp commit vendored in the pinned llama-cpp-python."""
    path = source_dir() / "LLAMA_CPP_COMMIT"
    return path.read_text().strip() if path.is_file() else "unknown"


def converter() -> tuple[Path, dict[str, str]]:
    """convert_hf_to_gguf.py and the environment that makes it import the vendored gguf-py."""
    src = source_dir()
    script = src / "convert_hf_to_gguf.py"
    if not script.is_file():
        raise LlamaCppError(f"{script} missing from the vendored llama.cpp")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(src / "gguf-py"), str(src)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env["NO_LOCAL_GGUF"] = ""
    return script, env


# ---------------------------------------------------------------------------------------------
# The build


def build_dir(*, cuda: bool = False) -> Path:
    return cache_root() / ("build-cuda" if cuda else "build-cpu")


def build_log(*, cuda: bool = False) -> Path:
    """Where the compiler's output goes (kept after the build; the last failed one too)."""
    return cache_root() / ("build-cuda.log" if cuda else "build-cpu.log")


def _library_file(name: str) -> str:
    return f"lib{name}.so"


def _outputs(targets: tuple[str, ...]) -> list[str]:
    return [_library_file(t) if t in LIBRARIES else t for t in targets]


def _flags(cuda: bool) -> list[str]:
    flags = list(CONFIGURE_FLAGS)
    if cuda:
        flags += ["-DGGML_CUDA=ON", f"-DCMAKE_CUDA_ARCHITECTURES={';'.join(_cuda_archs())}",
                  # libcuda.so.1 comes with the driver, absent where images build (as llama.cpp's cuda.Dockerfile)
                  "-DCMAKE_EXE_LINKER_FLAGS=-Wl,--allow-shlib-undefined"]
    return flags


def _read_marker(bdir: Path) -> dict | None:
    try:
        marker = json.loads((bdir / BUILD_MARKER).read_text())
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) and marker.get("format") == BUILD_FORMAT else None


def _complete(bdir: Path, targets: tuple[str, ...], flags: list[str]) -> bool:
    """A finished build of the same source and flags holds every target."""
    marker = _read_marker(bdir)
    return (marker is not None and marker.get("source") == SOURCE_LAYOUT and marker.get("flags") == flags
            and set(targets) <= set(marker.get("targets", ()))
            and all((bdir / "bin" / out).is_file() for out in _outputs(targets)))


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def default_jobs() -> int:
    """Parallel compile jobs: $GPTOSS_BUILD_JOBS, else one per core this process may use."""
    env = os.environ.get("GPTOSS_BUILD_JOBS")
    if env:
        if not env.isdigit() or int(env) < 1:
            raise LlamaCppError(f"GPTOSS_BUILD_JOBS={env!r}: give a positive number of compile jobs")
        return int(env)
    return _cores()


def _cuda_archs() -> list[str]:
    return [a for a in os.environ.get("CUDA_ARCHS", "90").replace(",", ";").split(";") if a.strip()]


def _load() -> float:
    """Runnable processes on this machine now (1-minute load average): other work shares the cores."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return 0.0


def estimate_seconds(jobs: int, *, cuda: bool = False, load: float = 0.0) -> float:
    """Wall time of a cold build of the default targets with ``jobs`` jobs on this machine's cores,
    beside ``load`` other runnable processes (each gets an equal share of the cores)."""
    work = CPU_BUILD_CORE_SECONDS + (CUDA_ARCH_CORE_SECONDS * len(_cuda_archs()) if cuda else 0)
    cores = _cores()
    usable = min(jobs, cores)
    if load + jobs > cores:
        usable = min(usable, cores * jobs / (load + jobs))
    return work / max(usable, 1e-3)


def _announce(targets: tuple[str, ...], *, cuda: bool, jobs: int, mode: str) -> None:
    tools = [t for t in targets if t not in LIBRARIES]
    libs = "/".join(f"lib{t}" for t in LIBRARIES if t in targets)
    what = ", ".join(tools) + (f" and {libs} (for the llama_cpp Python bindings)" if libs else "")
    load = _load()
    est = estimate_seconds(jobs, cuda=cuda, load=load)
    busy = load + jobs > _cores()
    if mode == "adding to":
        how_long = "only what is missing compiles"
    else:
        how_long = (f"about {human_seconds(est)} with {jobs} job{'s' if jobs != 1 else ''} "
                    f"({_cores()} core{'s' if _cores() != 1 else ''} here"
                    f"{f', shared with other work (load {load:.1f})' if busy else ''}"
                    f"{', CUDA_ARCHS=' + ';'.join(_cuda_archs()) if cuda else ''})"
                    f"{'; less, as it resumes' if mode == 'resuming' else ''}")
    head = {"compiling": "compiling", "resuming": "resuming the interrupted build of",
            "adding to": "adding to the build of"}[mode]
    print(f"gptoss build: {head} llama.cpp {commit()[:10]} (llama-cpp-python {LLAMA_CPP_PYTHON_VERSION}) "
          f"for {'CUDA' if cuda else 'CPU'}, once per machine: {what}\n"
          f"  into {build_dir(cuda=cuda)}; {how_long}\n"
          f"  compiler output: {build_log(cuda=cuda)}", file=sys.stderr, flush=True)


def _die_with_parent() -> None:
    """Linux: the build tool gets SIGTERM when we die, even by SIGKILL (no orphaned compiles)."""
    with contextlib.suppress(Exception):
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class _StepFailed(Exception):
    def __init__(self, step: str, returncode: int):
        super().__init__(step)
        self.step, self.returncode = step, returncode


def _run_logged(cmd: list[str], log, stage: Stage | None = None) -> None:
    """Run ``cmd`` with its output appended to ``log``; ninja's [n/total] or make's [ nn%] move ``stage``."""
    log.write(f"$ {' '.join(cmd)}\n")
    log.flush()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True,
                            errors="replace", bufsize=1, preexec_fn=_die_with_parent)
    assert proc.stdout is not None
    try:
        for line in proc.stdout:
            log.write(line)
            if stage is not None:
                if m := _NINJA_STEP.match(line):
                    stage.set_total(int(m[2]))
                    stage.set(int(m[1]))
                elif m := _MAKE_PERCENT.match(line):
                    stage.set_total(100)
                    stage.set(int(m[1]))
        rc = proc.wait()
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait()
        proc.stdout.close()
        log.flush()
    if rc != 0:
        raise _StepFailed(Path(cmd[0]).name + (" (configure)" if "-S" in cmd else " (compile)"), rc)


def _compile(bdir: Path, targets: tuple[str, ...], flags: list[str], jobs: int, log) -> None:
    generator = ["-G", "Ninja"] if shutil.which("ninja") and not (bdir / "Makefile").is_file() else []
    with Stage("llama.cpp: configuring (cmake)"):
        _run_logged(["cmake", "-S", str(source_dir()), "-B", str(bdir), *generator, *flags], log)
    ninja = (bdir / "build.ninja").is_file()
    with Stage(f"llama.cpp: compiling ({'ninja' if ninja else 'make'}, {jobs} jobs)",
               unit="steps" if ninja else "%", bar=True) as st:
        _run_logged(["cmake", "--build", str(bdir), "--config", "Release", "-j", str(jobs), "--target", *targets], log, st)


def _tail(path: Path, n: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def ensure_built(*, cuda: bool = False, targets: tuple[str, ...] = (), jobs: int | None = None,
                 force: bool = False) -> Path:
    """The bin folder of a finished build holding ``targets`` (plus the default tools and libraries),
    building first if needed (announced, with progress, output in build_log())."""
    unknown = [t for t in targets if t not in TOOLS + BENCH_TOOLS + LIBRARIES]
    if unknown:
        raise LlamaCppError(f"unknown llama.cpp target {', '.join(unknown)}; known: {', '.join(TOOLS + BENCH_TOOLS + LIBRARIES)}")
    want = tuple(dict.fromkeys(TOOLS + LIBRARIES + tuple(targets)))
    bdir, flags = build_dir(cuda=cuda), _flags(cuda)
    if not force and _complete(bdir, want, flags):
        return bdir / "bin"
    if shutil.which("cmake") is None:
        raise LlamaCppError("cmake is needed to build llama.cpp (once per machine): apt-get install cmake g++ "
                            "(or pip install cmake), then run `gptoss build`")
    with _locked(bdir.name, f"building llama.cpp ({bdir.name})"):
        if not force and _complete(bdir, want, flags):
            return bdir / "bin"
        marker = _read_marker(bdir)
        adding = bool(marker and marker.get("flags") == flags and marker.get("source") == SOURCE_LAYOUT and not force)
        if adding:
            want = tuple(dict.fromkeys(tuple(marker.get("targets", ())) + want))  # keep what was built before
        jobs = jobs or default_jobs()
        if force and bdir.exists():
            shutil.rmtree(bdir)
        source_dir()  # fetch and extract first: the announcement names the commit
        (bdir / BUILD_MARKER).unlink(missing_ok=True)
        resumed = (bdir / "CMakeCache.txt").is_file()
        _announce(want, cuda=cuda, jobs=jobs, mode="adding to" if adding else "resuming" if resumed else "compiling")
        log_path = build_log(cuda=cuda)
        start = time.perf_counter()
        with open(log_path, "a") as log:
            log.write(f"\n# gptoss build {time.strftime('%Y-%m-%d %H:%M:%S')}: {', '.join(want)} in {bdir}, {jobs} jobs\n")
            try:
                try:
                    _compile(bdir, want, flags, jobs, log)
                except _StepFailed as e:
                    if not resumed or e.returncode < 0:
                        raise
                    # What an interrupted build left may not be usable (an earlier layout, a half-written
                    # object): start over once.
                    print("gptoss build: the resumed build failed; starting over from scratch", file=sys.stderr, flush=True)
                    log.write("# resumed build failed: starting over\n")
                    shutil.rmtree(bdir, ignore_errors=True)
                    _compile(bdir, want, flags, jobs, log)
            except _StepFailed as e:
                if e.returncode < 0:  # killed by a signal: what is there is resumed next time
                    raise LlamaCppError(f"building llama.cpp was interrupted ({e.step} got signal {-e.returncode}); "
                                        f"run `gptoss build` to resume it. Compiler output: {log_path}") from None
                shutil.rmtree(bdir, ignore_errors=True)  # nothing half-built is left to fail later
                raise LlamaCppError(
                    f"building llama.cpp failed in {e.step} (exit {e.returncode}); the build folder was removed. "
                    f"Compiler output: {log_path}\n{_tail(log_path)}\n"
                    f"Fix the cause (a C++ compiler and cmake are needed: apt-get install g++ cmake), then run `gptoss build`"
                ) from None
        missing = [out for out in _outputs(want) if not (bdir / "bin" / out).is_file()]
        if missing:
            raise LlamaCppError(f"building llama.cpp did not produce {', '.join(missing)} in {bdir / 'bin'}; see {log_path}")
        elapsed = time.perf_counter() - start
        tmp = bdir / f"{BUILD_MARKER}.partial"
        tmp.write_text(json.dumps({"format": BUILD_FORMAT, "source": SOURCE_LAYOUT, "commit": commit(), "flags": flags,
                                   "targets": list(want), "jobs": jobs, "elapsed_s": round(elapsed, 1)}, indent=2) + "\n")
        os.replace(tmp, bdir / BUILD_MARKER)
        print(f"gptoss build: llama.cpp built in {human_seconds(elapsed)}: {bdir / 'bin'}", file=sys.stderr, flush=True)
    return bdir / "bin"


def build_tools(*, cuda: bool = False, targets: tuple[str, ...] = TOOLS, jobs: int | None = None) -> Path:
    """ensure_built() under its older name (bench scripts); returns the bin folder."""
    return ensure_built(cuda=cuda, targets=tuple(targets), jobs=jobs)


def build(*, cuda: bool = False, jobs: int | None = None, bench: bool = False, force: bool = False) -> str:
    """Compile llama.cpp from the pinned source, once per machine (export and serve do it on first use).

    One CMake build of the llama.cpp vendored in llama-cpp-python 0.3.36: llama-server (serve),
    llama-quantize (export), llama-bench, and libllama/libggml, which the llama_cpp Python bindings
    of the same sdist load (export's fidelity report). Output goes to a log file; a finished build is
    reused, an interrupted one resumed.

    Args:
        cuda: build with CUDA (GPU architectures from $CUDA_ARCHS, default 90) into build-cuda/.
        jobs: parallel compile jobs (default: $GPTOSS_BUILD_JOBS, else one per core).
        bench: also build llama-batched-bench (bench/serve_gpu.sh).
        force: rebuild from scratch even when a finished build is there.
    Returns:
        The folder holding the tools and libraries.
    """
    if jobs is not None and (not isinstance(jobs, int) or isinstance(jobs, bool) or jobs < 1):
        raise LlamaCppError(f"--jobs must be a positive integer, got {jobs!r}")
    binary_override = os.environ.get("GPTOSS_LLAMA_CPP_BIN")
    if binary_override:
        raise LlamaCppError(f"GPTOSS_LLAMA_CPP_BIN={binary_override} points at prebuilt tools (an image's); "
                            "unset it to build into the cache")
    return str(ensure_built(cuda=cuda, targets=BENCH_TOOLS if bench else (), jobs=jobs, force=force))


# ---------------------------------------------------------------------------------------------
# What the stages use


def tool(name: str, *, build: bool = True, cuda: bool = False) -> Path:
    """Path of a llama.cpp tool built from the pinned source (built on first use, then cached).

    $GPTOSS_LLAMA_CPP_BIN (a folder) wins: images ship prebuilt tools there, libraries beside them.
    """
    if name not in TOOLS + BENCH_TOOLS:
        raise LlamaCppError(f"unknown llama.cpp tool {name!r}; known: {', '.join(TOOLS + BENCH_TOOLS)}")
    bin_override = os.environ.get("GPTOSS_LLAMA_CPP_BIN")
    if bin_override:
        path = Path(bin_override) / name
        if not path.is_file():
            raise LlamaCppError(f"{path} not found (GPTOSS_LLAMA_CPP_BIN={bin_override})")
        return path
    bdir = build_dir(cuda=cuda)
    if not build:
        if not _complete(bdir, (name,), _flags(cuda)):
            raise LlamaCppError(f"{bdir / 'bin' / name} is not built; run `gptoss build{' --cuda' if cuda else ''}`")
        return bdir / "bin" / name
    return ensure_built(cuda=cuda, targets=(name,)) / name


def library_dir(*, build: bool = True, cuda: bool = False) -> Path:
    """The folder holding libllama.so and libggml*.so ($GPTOSS_LLAMA_CPP_BIN, else the build's bin)."""
    bin_override = os.environ.get("GPTOSS_LLAMA_CPP_BIN")
    if bin_override:
        path = Path(bin_override)
        if not (path / _library_file("llama")).is_file():
            raise LlamaCppError(f"{path / _library_file('llama')} not found (GPTOSS_LLAMA_CPP_BIN={bin_override})")
        return path
    bdir = build_dir(cuda=cuda)
    if not build:
        if not _complete(bdir, LIBRARIES, _flags(cuda)):
            raise LlamaCppError(f"libllama is not built in {bdir / 'bin'}; run `gptoss build{' --cuda' if cuda else ''}`")
        return bdir / "bin"
    return ensure_built(cuda=cuda)


def bindings(*, build: bool = True, cuda: bool = False):
    """The ``llama_cpp`` module of the pinned llama-cpp-python (its pure-Python ctypes bindings from
    the sdist), loading libllama from our build (LLAMA_CPP_LIB_PATH)."""
    package_dir = source_dir() / BINDINGS_DIR
    if not (package_dir / "llama_cpp" / "llama_cpp.py").is_file():
        raise LlamaCppError(f"{package_dir} holds no llama_cpp bindings; remove {source_dir()} and run `gptoss build`")
    loaded = sys.modules.get("llama_cpp")
    if loaded is not None:
        if Path(getattr(loaded, "__file__", "") or "").resolve().is_relative_to(package_dir.resolve()):
            return loaded
        raise LlamaCppError(f"another llama_cpp is already imported ({loaded.__file__}); the pinned bindings come from "
                            f"{package_dir} (uninstall llama-cpp-python or import it after gptoss)")
    lib = library_dir(build=build, cuda=cuda)
    os.environ["LLAMA_CPP_LIB_PATH"] = str(lib)  # read by llama_cpp/llama_cpp.py at import; children inherit it
    if str(package_dir) not in sys.path:
        sys.path.insert(0, str(package_dir))
    try:
        import llama_cpp
    except (OSError, RuntimeError, FileNotFoundError) as e:
        raise LlamaCppError(f"the llama_cpp bindings could not load {lib / _library_file('llama')}: {e}; "
                            f"run `gptoss build --force`") from e
    if getattr(llama_cpp, "__version__", None) != LLAMA_CPP_PYTHON_VERSION:
        raise LlamaCppError(f"{llama_cpp.__file__} is llama-cpp-python {getattr(llama_cpp, '__version__', '?')}, "
                            f"expected {LLAMA_CPP_PYTHON_VERSION}")
    return llama_cpp


@contextlib.contextmanager
def log_lines_to(llama_cpp, on_line):
    """While inside, llama.cpp's log lines (of the bindings' library) go to ``on_line(str)``, not the screen."""
    from llama_cpp import _logger

    pending = [""]

    @llama_cpp.llama_log_callback
    def collect(level, text, user_data):  # noqa: ARG001 - ctypes signature
        pending[0] += text.decode("utf-8", errors="replace")
        *done, pending[0] = pending[0].split("\n")
        for line in done:
            on_line(line)

    llama_cpp.llama_log_set(collect, ctypes.c_void_p(0))
    try:
        yield
    finally:
        llama_cpp.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))
        if pending[0]:
            on_line(pending[0])


def install(prefix: str | os.PathLike, *, tools: tuple[str, ...] = TOOLS, cuda: bool = False,
            with_source: bool = True) -> Path:
    """Copy ``tools``, the shared libraries (beside them: the binaries look in $ORIGIN) and, with
    ``with_source``, the converter, gguf-py and the bindings into ``prefix`` (bin/ and src/), as the
    images ship them (GPTOSS_LLAMA_CPP_BIN=prefix/bin, GPTOSS_LLAMA_CPP_SRC=prefix/src)."""
    bin_dir = ensure_built(cuda=cuda, targets=tuple(tools))
    dest = Path(prefix)
    (dest / "bin").mkdir(parents=True, exist_ok=True)
    for name in tools:
        shutil.copy2(bin_dir / name, dest / "bin" / name)
    for lib in sorted(bin_dir.glob("lib*.so*")):
        target = dest / "bin" / lib.name
        target.unlink(missing_ok=True)
        if lib.is_symlink():
            target.symlink_to(os.readlink(lib))
        else:
            shutil.copy2(lib, target)
    if with_source:
        src = source_dir()
        out = dest / "src"
        if out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True)
        for name in ("convert_hf_to_gguf.py", "conversion", "gguf-py", BINDINGS_DIR):
            if (src / name).is_dir():
                shutil.copytree(src / name, out / name, ignore=shutil.ignore_patterns("__pycache__"))
            elif (src / name).is_file():
                shutil.copy2(src / name, out / name)
        for name in ("LLAMA_CPP_COMMIT", ".complete"):
            shutil.copy2(src / name, out / name)
    return dest


def _main(argv: list[str]) -> int:
    usage = ("usage: python -m gptoss.llamacpp build [--cuda] [--bench] [--jobs N] | commit | "
             "install PREFIX [--tools a,b] [--cuda] [--no-source]")
    try:
        if argv[:1] == ["build"]:
            jobs = int(argv[argv.index("--jobs") + 1]) if "--jobs" in argv else None
            print(build(cuda="--cuda" in argv, bench="--bench" in argv, jobs=jobs, force="--force" in argv))
        elif argv[:1] == ["commit"]:
            print(commit())
        elif argv[:1] == ["install"] and len(argv) >= 2:
            tools = tuple(argv[argv.index("--tools") + 1].split(",")) if "--tools" in argv else TOOLS
            print(install(argv[1], tools=tools, cuda="--cuda" in argv, with_source="--no-source" not in argv))
        else:
            print(usage, file=sys.stderr)
            return 2
    except LlamaCppError as e:
        print(f"gptoss: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
