"""Reading an Ollama Modelfile back: its directives (FROM, TEMPLATE, PARAMETER, SYSTEM, ...), quoted and
triple-quoted values included. publish takes the template and params the Hub's Ollama integration serves
from it; the Modelfile tests read what `gptoss modelfile` wrote."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

DIRECTIVES = ("FROM", "TEMPLATE", "PARAMETER", "SYSTEM", "ADAPTER", "LICENSE", "MESSAGE", "REQUIRES")

@dataclasses.dataclass(frozen=True)
class Modelfile:
    path: Path
    from_: str | None
    template: str | None
    system: str | None
    parameters: tuple[tuple[str, str], ...]

    def params_json(self) -> dict:
        """PARAMETER lines as the JSON object Ollama keeps in a model's params layer."""
        out: dict[str, Any] = {}
        for name, raw in self.parameters:
            value: Any = raw
            if re.fullmatch(r"[-+]?\d+", raw):
                value = int(raw)
            elif re.fullmatch(r"[-+]?(\d+\.\d*|\.\d+|\d+)([eE][-+]?\d+)?", raw):
                value = float(raw)
            elif raw.lower() in ("true", "false"):
                value = raw.lower() == "true"
            if name == "stop":
                out.setdefault("stop", []).append(raw)
            else:
                out[name] = value
        return out


def read_modelfile(path: Path) -> Modelfile:
    """Parse the directives of an Ollama Modelfile (triple-quoted and quoted values included)."""
    text = path.read_text(encoding="utf-8")
    values: dict[str, str] = {}
    params: list[tuple[str, str]] = []
    i = 0
    lines = text.splitlines(keepends=True)
    while i < len(lines):
        line = lines[i]
        i += 1
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        word, _, rest = stripped.partition(" ")
        directive = word.upper()
        if directive not in DIRECTIVES:
            raise ValueError(f"{path}: unknown directive {word!r} on line {i}")
        rest = line.lstrip()[len(word):].lstrip(" \t")
        if rest.startswith('"""'):
            body = rest[3:]
            while '"""' not in body and i < len(lines):
                body += lines[i]
                i += 1
            if '"""' not in body:
                raise ValueError(f"{path}: unterminated \"\"\" in {directive}")
            value = body[: body.index('"""')]
        else:
            value = rest.rstrip("\r\n").strip()
        if directive == "PARAMETER":
            name, _, raw = value.partition(" ")
            raw = raw.strip()
            if len(raw) >= 2 and raw[0] == raw[-1] == '"':
                raw = raw[1:-1]
            params.append((name.strip(), raw))
        else:
            if len(value) >= 2 and value[0] == value[-1] == '"' and "\n" not in value:
                value = value[1:-1]
            values[directive] = value
    return Modelfile(
        path=path,
        from_=values.get("FROM"),
        template=values.get("TEMPLATE"),
        system=values.get("SYSTEM"),
        parameters=tuple(params),
    )


