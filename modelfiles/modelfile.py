"""Write an Ollama Modelfile for a gpt-oss GGUF: FROM, the Harmony TEMPLATE, SYSTEM, PARAMETERs.

The Modelfile is read by Ollama's parser (ollama/ollama parser/parser.go), so what goes in it
must survive that parser: a triple-quoted value ends at the first ``\"\"\"`` before a line break,
and runes that are not printable (other than spaces, tabs and line breaks) are dropped.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from gptoss import folders
from gptoss import harmony
from gptoss.errors import ToolchainError
from gptoss.modelfiles import gguf_header
from gptoss.modelfiles.template import harmony_template

# Modelfile directives (Ollama's parser: FROM, TEMPLATE, SYSTEM, PARAMETER).
FROM = "FROM"
TEMPLATE = "TEMPLATE"
SYSTEM = "SYSTEM"
PARAMETER = "PARAMETER"
TRIPLE_QUOTE = '"""'

# gpt-oss samples at temperature 1.0 and top_p 1.0 (Ollama's defaults are 0.8 and 0.9).
TEMPERATURE = 1.0
TOP_P = 1.0
# Ollama's own comment on gpt-oss: "works best with a context length of at least 8k".
DEFAULT_NUM_CTX = 8192
MIN_NUM_CTX = 256
MODELFILE_SUFFIX = folders.MODELFILE_SUFFIX


class ModelfileError(ToolchainError):
    """A Modelfile cannot be written for these inputs; the message says which flag and why."""


def default_out(gguf: Path) -> Path:
    """Where a GGUF's Modelfile goes by default: beside it, ``<stem>.Modelfile``."""
    return folders.modelfile_path(gguf)


def _dropped_by_ollama(text: str) -> list[str]:
    """Characters Ollama's Modelfile parser would silently drop (not printable, not white space)."""
    return sorted({c for c in text if not c.isprintable() and c not in " \t\r\n"})


def check_system(system: str) -> None:
    problems = []
    for tok in harmony.CONTROL_TOKENS:
        if tok in system:
            problems.append(f"the Harmony control token {tok}")
    if TRIPLE_QUOTE in system:
        problems.append(f"{TRIPLE_QUOTE} (Ollama's Modelfile parser ends the SYSTEM value at one before a line break)")
    dropped = _dropped_by_ollama(system)
    if dropped:
        names = ", ".join(f"U+{ord(c):04X}" for c in dropped)
        problems.append(f"characters Ollama's Modelfile parser drops ({names})")
    if problems:
        raise ModelfileError(f"--system contains {'; '.join(problems)}; remove them")


def from_path(gguf: Path, modelfile: Path) -> str:
    """The GGUF's path relative to the Modelfile's folder, as Ollama resolves FROM (./ or ../ first)."""
    rel = Path(os.path.relpath(gguf.resolve(), modelfile.parent.resolve())).as_posix()
    path = rel if rel.startswith("../") else f"./{rel}"
    if "\n" in path or "\r" in path or _dropped_by_ollama(path) or path != path.strip() or path.startswith('"'):
        raise ModelfileError(f"--gguf {gguf}: its path cannot be written on a Modelfile FROM line; rename the file")
    return path


def render(*, from_line: str, system: str | None, num_ctx: int) -> str:
    """The Modelfile text."""
    template = harmony_template()
    assert TRIPLE_QUOTE not in template
    lines = [
        "# gpt-oss (Harmony) Modelfile written by gptoss-toolchain (`gptoss modelfile`).",
        "# Create the model: ollama create NAME -f <this file>; chat: ollama run NAME --think high",
        "# Needs Ollama 0.11.5 or later (gpt-oss GGUFs with MXFP4 tensors, Harmony output parser).",
        f"{FROM} {from_line}",
        f"{TEMPLATE} {TRIPLE_QUOTE}{template}{TRIPLE_QUOTE}",
    ]
    if system:
        lines.append(f"{SYSTEM} {TRIPLE_QUOTE}{system}{TRIPLE_QUOTE}")
    lines += [
        f"{PARAMETER} temperature {TEMPERATURE}",
        f"{PARAMETER} top_p {TOP_P}",
        f"{PARAMETER} num_ctx {num_ctx}",
    ]
    return "\n".join(lines) + "\n"


def write(gguf: str, *, system: str | None = None, num_ctx: int | None = None, out: str | None = None) -> Path:
    """Write an Ollama Modelfile that speaks Harmony for a gpt-oss GGUF.

    Args:
        gguf: the gpt-oss GGUF file (its header must say general.architecture = gpt-oss).
        system: a system prompt; Ollama sends it as the developer message's instructions when a
            request brings no system message of its own.
        num_ctx: context length Ollama runs the model with (at most the GGUF's context length;
            default 8192, or the GGUF's context length when that is smaller).
        out: the Modelfile to write, or a folder for it; default <gguf stem>.Modelfile beside the GGUF.
    Returns:
        The path of the written Modelfile (FROM holds the GGUF's path relative to it).
    """
    if not isinstance(gguf, (str, os.PathLike)) or not str(gguf):
        raise ModelfileError(f"--gguf must be the path of a GGUF file, got {gguf!r}")
    gguf_path = Path(gguf).expanduser()
    problems = []
    if system is not None and not isinstance(system, str):
        problems.append(f"--system must be text, got {system!r}")
    if num_ctx is None:
        pass
    elif isinstance(num_ctx, bool) or not isinstance(num_ctx, int):
        problems.append(f"--num-ctx must be an integer, got {num_ctx!r}")
    elif num_ctx < MIN_NUM_CTX:
        problems.append(f"--num-ctx must be at least {MIN_NUM_CTX}, got {num_ctx}")
    if problems:
        raise ModelfileError("; ".join(problems))
    if system:
        check_system(system)

    arch, context_length = gguf_header.architecture(gguf_path)
    if arch != gguf_header.GPT_OSS_ARCH:
        found = f"general.architecture = {arch!r}" if arch is not None else "no general.architecture"
        raise ModelfileError(
            f"--gguf {gguf_path}: {found}, not {gguf_header.GPT_OSS_ARCH!r}; this Harmony Modelfile is only for gpt-oss GGUFs"
        )
    if num_ctx is None:
        num_ctx = min(DEFAULT_NUM_CTX, context_length) if context_length else DEFAULT_NUM_CTX
    elif context_length is not None and num_ctx > context_length:
        raise ModelfileError(f"--num-ctx {num_ctx} exceeds the GGUF's context length {context_length}; pass at most that")

    out_path = default_out(gguf_path)
    if out:
        out_path = Path(out).expanduser()
        if out_path.is_dir() or str(out).endswith(("/", os.sep)):
            out_path = out_path / default_out(gguf_path).name
    if out_path.resolve() == gguf_path.resolve():
        raise ModelfileError(f"--out {out} is the GGUF itself; pass another file or a folder")
    text = render(from_line=from_path(gguf_path, out_path), system=system, num_ctx=num_ctx)

    try:
        if out_path.is_file() and out_path.read_text(encoding="utf-8") == text:
            return out_path  # unchanged: a re-run leaves the file (and its mtime) alone
    except (OSError, UnicodeDecodeError):
        pass
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out_path.name}.", suffix=".partial", dir=out_path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, out_path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out_path
