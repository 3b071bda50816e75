"""GGUF files through the pinned llama.cpp: convert (convert_hf_to_gguf.py), quantize, inspect.

The converter runs as a subprocess with the vendored gguf-py (gptoss.llamacpp.converter()); the
quantizer is llama-quantize built from the same source (built on first use) or, with
``backend="python"``, the same llama_model_quantize through the pinned llama_cpp bindings. Both log
which tensors "fell back" to another type because their width is not a multiple of the quant's
block; we parse that log. Their output goes to ``log`` (a file), never to the screen; the screen
gets a progress bar (gptoss.progress).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import subprocess
import sys
import time
import typing
from pathlib import Path
from typing import Callable, Literal

import gptoss
from gptoss.choices import choice_problem
from gptoss.exporters.errors import ConversionError

QuantizeBackend = Literal["auto", "tool", "python"]
# llama.cpp log lines we read (src/llama-quant.cpp, convert_hf_to_gguf.py)
_QUANT_PROGRESS = re.compile(r"\[\s*(\d+)/\s*(\d+)\]\s+(\S+)")
_FALLBACK = re.compile(
    r"warning:\s+(?P<name>\S+)\s+- ncols\s+(?P<ncols>\d+) not divisible by\s+(?P<block>\d+) "
    r"\(required for type\s+(?P<wanted>\w+)\)\s*(?:\(WARNING: must use F16 due to unusual shape\)\s*)?"
    r"-> falling back to\s+(?P<got>\w+)"
)
_CONVERT_TENSOR = re.compile(r"^INFO:hf-to-gguf:(\S+),\s+torch\.\w+ --> (\w+), shape")
GGUF_CHAT_TEMPLATE = "tokenizer.chat_template"  # GGUF key the converter writes the chat template to
LOG_TAIL = 40


@dataclasses.dataclass
class StepResult:
    path: Path
    log: list[str]
    elapsed_s: float
    peak_rss_bytes: int | None
    command: list[str]
    fallbacks: list[dict] = dataclasses.field(default_factory=list)
    backend: str = ""


def gguf_module():
    """The gguf-py vendored with the pinned llama.cpp (not whatever `gguf` pip installed)."""
    from gptoss import llamacpp

    vendored = str(llamacpp.source_dir() / "gguf-py")
    mod = sys.modules.get("gguf")
    if mod is not None and not str(getattr(mod, "__file__", "")).startswith(vendored):
        for name in [m for m in sys.modules if m == "gguf" or m.startswith("gguf.")]:
            del sys.modules[name]
    if vendored not in sys.path:
        sys.path.insert(0, vendored)
    import gguf

    if not str(gguf.__file__).startswith(vendored):
        raise ConversionError(f"imported gguf from {gguf.__file__}, expected the vendored {vendored}")
    return gguf


def _vm_hwm(pid: int) -> int | None:
    """Peak RSS of a live process's current program (VmHWM restarts at exec, unlike ru_maxrss,
    which a child forked from a big Python process inherits)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return None


def run_measured(cmd: list[str], env: dict | None, on_line: Callable[[str], None]) -> tuple[int, list[str], int | None]:
    """Run ``cmd``, feed each output line (stdout+stderr) to ``on_line``; return (rc, lines, child peak RSS)."""
    import threading

    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            errors="replace", bufsize=1)
    peak = [None]
    done = threading.Event()

    def sample() -> None:  # VmHWM only grows, so the last reading before exit is the peak
        while not done.wait(0.2):
            v = _vm_hwm(proc.pid)
            if v is not None:
                peak[0] = max(peak[0] or 0, v)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    lines: list[str] = []
    assert proc.stdout is not None
    try:
        for line in proc.stdout:
            line = line.rstrip("\n")
            lines.append(line)
            on_line(line)
            v = _vm_hwm(proc.pid)
            if v is not None:
                peak[0] = max(peak[0] or 0, v)
        rc = proc.wait()
    finally:
        done.set()
        sampler.join()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
    return rc, lines, peak[0]


@contextlib.contextmanager
def tool_log(log: Path | None, title: str):
    """A writer of one tool's output lines into ``log`` (appended, under a ``title`` header); no file: dropped."""
    if log is None:
        yield lambda line: None
        return
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a", encoding="utf-8") as f:
        f.write(f"\n# {time.strftime('%Y-%m-%d %H:%M:%S')} {title}\n")
        yield lambda line: f.write(line + "\n")


def _failure(what: str, rc: int, lines: list[str], log: Path | None) -> str:
    tail = "\n".join(lines[-LOG_TAIL:])
    return f"{what} (exit {rc}){f'; full output in {log}' if log else ''}:\n{tail}"


def convert(merged_dir: Path, out_path: Path, *, outtype: str = "f16", expected_tensors: int | None = None,
            progress: bool = True, log: Path | None = None) -> StepResult:
    """merged HF folder -> GGUF at ``out_path`` (written under a temporary name, renamed when complete);
    the converter's output goes to ``log``."""
    from gptoss import llamacpp
    from gptoss.progress import Stage

    script, env = llamacpp.converter()
    tmp = out_path.with_name(f".{out_path.name}.partial")
    cmd = [sys.executable, str(script), str(merged_dir), "--outtype", outtype, "--outfile", str(tmp)]
    start = time.perf_counter()
    with tool_log(log, " ".join(cmd)) as write, \
            Stage(f"convert {out_path.name}", total=expected_tensors, unit="tensors", bar=True, enabled=progress) as bar:
        def on_line(line: str) -> None:
            write(line)
            if _CONVERT_TENSOR.match(line):
                bar.update(1)

        try:
            rc, lines, rss = run_measured(cmd, env, on_line)
            if rc != 0 or not tmp.is_file():
                raise ConversionError(_failure(f"convert_hf_to_gguf.py failed on {merged_dir}", rc, lines, log))
            os.replace(tmp, out_path)
        finally:
            tmp.unlink(missing_ok=True)
    return StepResult(out_path, lines, time.perf_counter() - start, rss, cmd, backend="convert_hf_to_gguf.py")


def parse_fallbacks(lines: list[str]) -> list[dict]:
    out = []
    for line in lines:
        m = _FALLBACK.search(line)
        if m:
            out.append({"tensor": m["name"], "ncols": int(m["ncols"]), "block": int(m["block"]),
                        "wanted": m["wanted"].upper(), "got": m["got"].upper()})
    return out


def quantize(src: Path, out_path: Path, *, label: str, backend: QuantizeBackend = "auto", threads: int | None = None,
             progress: bool = True, log: Path | None = None) -> StepResult:
    """F16 GGUF -> ``label`` (e.g. Q4_K_M) GGUF via llama.cpp; temp name, renamed when complete; the
    quantizer's output goes to ``log``. Builds llama.cpp first if it is not built yet (announced)."""
    from gptoss import llamacpp
    from gptoss.progress import Stage

    if wrong := choice_problem("quantize backend", backend, typing.get_args(QuantizeBackend)):
        raise ConversionError(wrong)
    tmp = out_path.with_name(f".{out_path.name}.partial")
    threads = threads or os.cpu_count() or 1
    if backend == "python":  # the same llama_model_quantize through the bindings, in a child process (isolated, measurable)
        llamacpp.library_dir()
        cmd = [sys.executable, "-m", "gptoss.exporters.gguf", "quantize", str(src), str(tmp), label, str(threads)]
        env = dict(os.environ)
        package_root = str(Path(gptoss.__file__).resolve().parents[1])  # the folder that holds gptoss/
        env["PYTHONPATH"] = os.pathsep.join([package_root] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
        used = "llama_cpp.llama_model_quantize"
    else:
        cmd = [str(llamacpp.tool("llama-quantize")), str(src), str(tmp), label, str(threads)]
        env = None
        used = "llama-quantize"
    start = time.perf_counter()
    with tool_log(log, " ".join(cmd)) as write, \
            Stage(f"quantize {out_path.name}", unit="tensors", bar=True, enabled=progress) as bar:
        def on_line(line: str) -> None:
            write(line)
            m = _QUANT_PROGRESS.search(line)
            if m:
                bar.set_total(int(m[2]))
                bar.set(int(m[1]))

        try:
            rc, lines, rss = run_measured(cmd, env, on_line)
            if rc != 0 or not tmp.is_file():
                raise ConversionError(_failure(f"quantizing {src.name} to {label} failed ({used})", rc, lines, log))
            os.replace(tmp, out_path)
        finally:
            tmp.unlink(missing_ok=True)
    return StepResult(out_path, lines, time.perf_counter() - start, rss, cmd, parse_fallbacks(lines), used)


def _quantize_in_process(src: Path, dst: Path, label: str, threads: int, on_line) -> tuple[int, list[str]]:
    import ctypes

    from gptoss import llamacpp

    llama_cpp = llamacpp.bindings(build=False)  # the parent built it
    ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{label}", None)
    if ftype is None:
        raise ConversionError(f"llama-cpp-python {llama_cpp.__version__} has no LLAMA_FTYPE_MOSTLY_{label}")
    lines: list[str] = []

    def collect(line: str) -> None:
        lines.append(line)
        on_line(line)

    params = llama_cpp.llama_model_quantize_default_params()  # the bindings' struct layout
    params.ftype = ftype
    params.nthread = threads
    with llamacpp.log_lines_to(llama_cpp, collect):
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    return rc, lines


@dataclasses.dataclass
class GgufTensor:
    name: str
    shape: list[int]  # GGUF order: ne0 (contiguous) first
    type: str  # GGML type name, e.g. Q4_K
    offset: int  # absolute byte offset of the data in the file
    n_bytes: int


@dataclasses.dataclass
class GgufInfo:
    tensor_count: int
    type_histogram: dict[str, int]  # GGML type -> number of tensors
    type_bytes: dict[str, int]  # GGML type -> bytes of tensor data
    types: dict[str, str]  # tensor name -> GGML type
    metadata: dict[str, object]
    shapes: dict[str, list[int]]
    tensors: dict[str, GgufTensor]


def inspect(path: Path, keys: tuple[str, ...] = ("general.architecture", "general.file_type", GGUF_CHAT_TEMPLATE,
                                                   "tokenizer.ggml.eos_token_id")) -> GgufInfo:
    """Tensor table, type histogram and a few metadata values of a GGUF.

    Reads only the header, sequentially (gguf-py's GGUFReader builds a view per vocabulary entry,
    ~20 s per gpt-oss file); type names and block sizes come from the vendored gguf-py, and a test
    checks the result against GGUFReader.
    """
    from gptoss.modelfiles import gguf_header

    gguf = gguf_module()
    header = gguf_header.read_header(path, keys)
    meta = header.metadata
    tensors: dict[str, GgufTensor] = {}
    data_start = header.data_start
    infos = [(t.name, t.dims, t.type_id, t.offset) for t in header.tensors]
    hist: dict[str, int] = {}
    nbytes: dict[str, int] = {}
    for name, dims, ttype, offset in infos:
        qtype = gguf.GGMLQuantizationType(ttype)
        block, type_size = gguf.GGML_QUANT_SIZES[qtype]
        n = 1
        for d in dims:
            n *= d
        size = n * type_size // block
        tensors[name] = GgufTensor(name, dims, qtype.name, data_start + offset, size)
        hist[qtype.name] = hist.get(qtype.name, 0) + 1
        nbytes[qtype.name] = nbytes.get(qtype.name, 0) + size
    return GgufInfo(len(tensors), dict(sorted(hist.items())), dict(sorted(nbytes.items())),
                    {t.name: t.type for t in tensors.values()}, meta, {t.name: t.shape for t in tensors.values()},
                    tensors)


def read_tensor(path: Path, name: str):
    """One tensor's data as float32 numpy in GGUF order reversed (numpy shape), dequantized by gguf-py."""
    import numpy as np

    info = inspect(path, keys=())
    if name not in info.tensors:
        raise KeyError(f"{path.name} has no tensor {name}")
    gguf = gguf_module()
    from gguf.quants import dequantize

    t = info.tensors[name]
    qtype = gguf.GGMLQuantizationType[t.type]
    raw = np.memmap(path, dtype=np.uint8, mode="r", offset=t.offset, shape=(t.n_bytes,))
    if t.type in ("F32", "F16"):
        data = raw.view(np.float32 if t.type == "F32" else np.float16)
    else:
        data = raw
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    rows = data.reshape(*reversed(t.shape[1:]), -1) if t.type in ("F32", "F16") else \
        data.reshape(*reversed(t.shape[1:]), t.shape[0] * type_size // block)
    return np.asarray(dequantize(rows, qtype), dtype=np.float32)


if __name__ == "__main__":  # python -m gptoss.exporters.gguf quantize SRC DST LABEL THREADS (the "python" backend)
    if len(sys.argv) == 6 and sys.argv[1] == "quantize":
        _rc, _ = _quantize_in_process(Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4], int(sys.argv[5]),
                                      lambda line: print(line, flush=True))
        sys.exit(0 if _rc == 0 else 1)
    print("usage: python -m gptoss.exporters.gguf quantize SRC DST LABEL THREADS", file=sys.stderr)
    sys.exit(2)
