"""Helpers for the Modelfile tests: small GGUF files and the Go renderer (tests/gotemplate)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

GOTEMPLATE_DIR = Path(__file__).resolve().parent / "gotemplate"


def write_gguf(path: Path, *, arch: str = "gpt-oss", context_length: int | None = 131072, name: str = "tiny") -> Path:
    """A small, valid GGUF (one 4-element tensor) written by gguf-py's GGUFWriter."""
    import gguf
    import numpy as np

    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(path), arch=arch)
    writer.add_name(name)
    if context_length is not None:
        writer.add_context_length(context_length)
    writer.add_tensor("token_embd.weight", np.zeros((4,), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def go_env(scratch: Path) -> dict[str, str]:
    """Offline, self-contained Go build settings (standard library only)."""
    env = dict(os.environ)
    env.update(
        GOCACHE=str(scratch / "gocache"),
        GOPATH=str(scratch / "gopath"),
        GOFLAGS="-mod=mod",
        GOPROXY="off",
        GOTOOLCHAIN="local",
        GOTELEMETRY="off",
        CGO_ENABLED="0",
    )
    return env


def build_gotemplate(scratch: Path) -> Path:
    """`go build` tests/gotemplate into `scratch`; returns the binary."""
    go = shutil.which("go")
    if go is None:
        raise FileNotFoundError("go")
    binary = scratch / "gotemplate"
    proc = subprocess.run(
        [go, "build", "-o", str(binary), "."], cwd=GOTEMPLATE_DIR, env=go_env(scratch), capture_output=True, text=True
    )
    if proc.returncode != 0:
        raise AssertionError(f"go build of tests/gotemplate failed:\n{proc.stdout}\n{proc.stderr}")
    return binary


def run_gotemplate(binary: Path, modelfile: Path, cases: list[dict], scratch: Path, *, nested: str = "ordered") -> dict:
    """Render each case with the Modelfile's TEMPLATE the way Ollama's /api/chat does."""
    cases_file = scratch / f"cases-{os.getpid()}-{id(cases)}.json"
    cases_file.write_text(json.dumps(cases, ensure_ascii=False), encoding="utf-8")
    proc = subprocess.run(
        [str(binary), "-modelfile", str(modelfile), "-cases", str(cases_file), "-nested", nested],
        capture_output=True,
        text=True,
        encoding="utf-8",
    )
    if proc.returncode != 0:
        raise AssertionError(f"gotemplate failed on {modelfile}:\n{proc.stderr}")
    return json.loads(proc.stdout)
