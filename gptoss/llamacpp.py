"""The one pinned llama.cpp: the source vendored in the llama-cpp-python sdist.

Export (convert_hf_to_gguf.py + gguf-py, llama-quantize) and serving (llama-server) use this exact
source, fetched from the package index at image build or first use and cached; nothing is cloned
or downloaded at export or serve time once the cache (or an image) holds it.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from gptoss.errors import ToolchainError

LLAMA_CPP_PYTHON_VERSION = "0.3.36"
SDIST_NAME = f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}.tar.gz"
# Build products we use; each is a CMake target of llama.cpp.
TOOLS = ("llama-server", "llama-quantize", "llama-bench")
# Built only when asked for (bench/serve_gpu.sh): the engine's own multi-sequence decode benchmark.
BENCH_TOOLS = ("llama-batched-bench",)


class LlamaCppError(ToolchainError):
    """The pinned llama.cpp source or a tool built from it is not available."""


def cache_root() -> Path:
    base = os.environ.get("GPTOSS_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "gptoss"
    )
    return Path(base) / f"llama.cpp-{LLAMA_CPP_PYTHON_VERSION}"


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
        raise LlamaCppError(f"{path} is missing and downloads are off; run `gptoss` once with network or mount the cache")
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-d", tmp,
               f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        got = Path(tmp) / SDIST_NAME
        if proc.returncode != 0 or not got.is_file():
            raise LlamaCppError(
                f"could not fetch llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION} from the package index "
                f"(needed once for llama.cpp's converter and tools): {proc.stderr.strip()[-500:]}"
            )
        os.replace(got, path)
    return path


@functools.lru_cache(maxsize=None)
def source_dir() -> Path:
    """vendor/llama.cpp extracted from the sdist (without its models/ and docs/); $GPTOSS_LLAMA_CPP_SRC wins."""
    override = os.environ.get("GPTOSS_LLAMA_CPP_SRC")
    if override:
        if not (Path(override) / "convert_hf_to_gguf.py").is_file():
            raise LlamaCppError(f"GPTOSS_LLAMA_CPP_SRC={override} holds no convert_hf_to_gguf.py")
        return Path(override)
    target = cache_root() / "src"
    marker = target / ".complete"
    if marker.is_file():
        return target
    archive = sdist()
    prefix = f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}/"
    vendor = prefix + "vendor/llama.cpp/"
    head = prefix + ".git/modules/vendor/llama.cpp/HEAD"
    cache_root().mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="src.partial-", dir=cache_root()))
    try:
        with tarfile.open(archive) as tar:
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
            # The "data" filter (no links out, no devices) where this Python has it (3.11.4+, 3.12).
            safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
            tar.extractall(tmp, members=members, **safe)
        marker_tmp = tmp / ".complete"
        marker_tmp.write_text(LLAMA_CPP_PYTHON_VERSION + "\n")
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


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


def tool(name: str, *, build: bool = True, cuda: bool = False) -> Path:
    """Path of a llama.cpp tool built from the pinned source (built on first use, then cached).

    $GPTOSS_LLAMA_CPP_BIN (a folder) wins: images ship prebuilt tools there.
    """
    if name not in TOOLS + BENCH_TOOLS:
        raise LlamaCppError(f"unknown llama.cpp tool {name!r}; known: {', '.join(TOOLS + BENCH_TOOLS)}")
    bin_override = os.environ.get("GPTOSS_LLAMA_CPP_BIN")
    if bin_override:
        path = Path(bin_override) / name
        if not path.is_file():
            raise LlamaCppError(f"{path} not found (GPTOSS_LLAMA_CPP_BIN={bin_override})")
        return path
    build_dir = cache_root() / ("build-cuda" if cuda else "build-cpu")
    path = build_dir / "bin" / name
    if path.is_file():
        return path
    if not build:
        raise LlamaCppError(f"{path} is not built; run `python -m gptoss.llamacpp build`")
    build_tools(cuda=cuda)
    if not path.is_file():
        raise LlamaCppError(f"building llama.cpp did not produce {path}")
    return path


def build_tools(*, cuda: bool = False, targets: tuple[str, ...] = TOOLS, jobs: int | None = None) -> Path:
    """cmake-build the tools from the vendored source; returns the bin folder."""
    if shutil.which("cmake") is None:
        raise LlamaCppError("cmake is needed to build llama.cpp's tools: apt-get install cmake (or pip install cmake)")
    src = source_dir()
    build_dir = cache_root() / ("build-cuda" if cuda else "build-cpu")
    flags = [
        "-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_TESTS=OFF",
        "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_TOOLS=ON", "-DLLAMA_BUILD_SERVER=ON", "-DBUILD_SHARED_LIBS=OFF",
        "-DGGML_NATIVE=OFF",
    ]
    if cuda:
        flags += ["-DGGML_CUDA=ON", f"-DCMAKE_CUDA_ARCHITECTURES={os.environ.get('CUDA_ARCHS', '90')}"]
    subprocess.run(["cmake", "-S", str(src), "-B", str(build_dir), *flags], check=True)
    subprocess.run(
        ["cmake", "--build", str(build_dir), "--config", "Release", "-j", str(jobs or os.cpu_count() or 2),
         "--target", *targets],
        check=True,
    )
    return build_dir / "bin"


if __name__ == "__main__":  # python -m gptoss.llamacpp build [--cuda]
    if sys.argv[1:2] == ["build"]:
        print(build_tools(cuda="--cuda" in sys.argv))
    elif sys.argv[1:2] == ["commit"]:
        print(commit())
    else:
        print("usage: python -m gptoss.llamacpp build [--cuda] | commit", file=sys.stderr)
        sys.exit(2)
