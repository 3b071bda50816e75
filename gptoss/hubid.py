"""Is a name a Hugging Face Hub repo id (``ORG/NAME``) or a local path? One rule for every stage."""

from __future__ import annotations

import re
from pathlib import Path

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# A name ending like a data file is a local file even when it has the ORG/NAME shape.
LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv", ".gguf")


def is_hub_id(name: str | None) -> bool:
    """``ORG/NAME`` that is not an existing local path, does not start with ``.``, ``/`` or ``~`` and
    does not end like a data file."""
    if not isinstance(name, str) or not name or name.startswith((".", "/", "~")):
        return False
    if Path(name).suffix in LOCAL_SUFFIXES or Path(name).expanduser().exists():
        return False
    return HUB_ID.match(name) is not None
