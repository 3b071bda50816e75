"""A conversation on disk: a JSON list of OpenAI chat messages (what `/save` and the page's Export write).

The system prompt, when there is one, is the first message; assistant messages keep their
``reasoning_content`` and ``tool_calls``, tool results their ``tool_call_id``: the file can be sent
back to any OpenAI-compatible server as ``messages`` unchanged. ``load`` also takes a request body
(``{"messages": [...]}``) and names the file and the message of anything it refuses.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from gptoss.chat.client import ChatError

ROLES = ("system", "developer", "user", "assistant", "tool")


def split_system(messages: list[dict]) -> tuple[str | None, list[dict]]:
    """(the leading system prompt or None, the rest)."""
    if messages and messages[0].get("role") in ("system", "developer") and isinstance(messages[0].get("content"), str):
        return messages[0]["content"], messages[1:]
    return None, list(messages)


def with_system(system: str | None, messages: list[dict]) -> list[dict]:
    return ([{"role": "system", "content": system}] if system else []) + list(messages)


def dumps(messages: list[dict]) -> str:
    return json.dumps(messages, ensure_ascii=False, indent=2) + "\n"


def save(path: str | Path, messages: list[dict]) -> Path:
    """Write atomically (a temp file beside it, renamed)."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise ChatError(f"{path} is a folder; give a file name, e.g. {path / 'chat.json'}")
    if not path.parent.is_dir():
        raise ChatError(f"cannot save to {path}: the folder {path.parent} does not exist")
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(dumps(messages))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def parse(text: str, *, source: str) -> list[dict]:
    """Messages from JSON text; every problem (with the message's index) in one ChatError."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ChatError(f"{source} is not JSON ({e}); it should be a list of chat messages as /save writes it")
    if isinstance(data, dict) and isinstance(data.get("messages"), list):
        data = data["messages"]
    if not isinstance(data, list):
        raise ChatError(f"{source}: expected a JSON list of messages (or {{\"messages\": [...]}}), got {type(data).__name__}")
    problems = []
    for i, msg in enumerate(data):
        where = f"message {i}"
        if not isinstance(msg, dict):
            problems.append(f"{where} is {type(msg).__name__}, not an object with role and content")
            continue
        role = msg.get("role")
        if role not in ROLES:
            problems.append(f"{where}: role {role!r} is not one of {', '.join(ROLES)}")
            continue
        content = msg.get("content")
        if content is not None and not isinstance(content, (str, list)):
            problems.append(f"{where}: content must be text")
        if role == "assistant" and not content and not msg.get("tool_calls"):
            problems.append(f"{where}: an assistant message needs content or tool_calls")
        if role in ("user", "system", "developer") and not isinstance(content, (str, list)):
            problems.append(f"{where}: a {role} message needs content")
        if role == "tool" and not msg.get("tool_call_id"):
            problems.append(f"{where}: a tool message needs tool_call_id")
        for call in msg.get("tool_calls") or []:
            if not (isinstance(call, dict) and isinstance(call.get("function"), dict) and call["function"].get("name")):
                problems.append(f"{where}: each tool call needs function.name")
                break
    if problems:
        raise ChatError(f"{source}: " + "; ".join(problems))
    return data


def load(path: str | Path) -> list[dict]:
    path = Path(path).expanduser()
    if not path.is_file():
        raise ChatError(f"{path} does not exist; /save FILE writes one")
    return parse(path.read_text(encoding="utf-8"), source=str(path))
