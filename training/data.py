"""Training data: load rows of chat ``messages``, check them, render them for gpt-oss, mask the loss.

Sources register themselves by kind (``@register_format``): local JSONL and Parquet files, and Hub
dataset ids through ``datasets``. Each row is ``{"messages": [...]}`` in the OpenAI style of
HuggingFaceH4/Multilingual-Thinking: an assistant message's ``thinking`` (or ``reasoning_content``)
is its analysis, ``content`` its final answer. A row may carry ``reasoning_effort``.

Rows are rendered with the model's chat template; the loss mask comes from the Harmony structure
of the rendered tokens: every assistant message after the last user message (the turn being
trained on) is supervised from the token after ``<|start|>assistant`` through its end token
(``<|end|>``, ``<|return|>`` or ``<|call|>``), i.e. exactly what the model generates.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import random
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from gptoss import harmony
from gptoss.hubid import is_hub_id
from gptoss.errors import ToolchainError

log = logging.getLogger("gptoss.train")

IGNORE_INDEX = -100
ROLES = ("system", "developer", "user", "assistant", "tool")


class DataError(ToolchainError):
    """A dataset that cannot be used; names the file (or Hub id), row and field."""


@dataclasses.dataclass(frozen=True)
class Source:
    """Where rows come from, for messages and records."""

    kind: str  # a registered format: "jsonl", "parquet", "hub"
    name: str  # file path or Hub id
    split: str | None = None
    revision: str | None = None
    found: dict = dataclasses.field(default_factory=dict, compare=False)  # what reading learnt (Hub commit)

    def where(self, row: int) -> str:
        if self.kind == "hub":
            return f"{self.name} (split {self.split}) row {row}"
        return f"{self.name} row {row}"


# ---------------------------------------------------------------------------------------------
# Formats

Reader = Callable[[Source], Iterator[tuple[int, Any]]]
FORMATS: dict[str, Reader] = {}
SUFFIXES: dict[str, str] = {}


def register_format(kind: str, *suffixes: str):
    def wrap(reader: Reader) -> Reader:
        FORMATS[kind] = reader
        for s in suffixes:
            SUFFIXES[s] = kind
        return reader

    return wrap


@register_format("jsonl", ".jsonl")
def read_jsonl(source: Source) -> Iterator[tuple[int, Any]]:
    """(line number, parsed object); blank lines are skipped; a line that is not UTF-8 or not JSON is a bad row."""
    with open(source.name, "rb") as f:  # bytes: one undecodable line is that row's problem, not the file's
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield lineno, _BadRow(
                    f"not valid UTF-8 (byte 0x{raw[e.start]:02x} at byte {e.start + 1} of the line: {e.reason}); the file must be "
                    f"UTF-8: re-save it as UTF-8 (`iconv -f latin1 -t utf-8 IN > OUT` if it is Latin-1)")
                continue
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as e:
                yield lineno, _BadRow(f"not valid JSON ({e.msg} at column {e.colno})")


@register_format("parquet", ".parquet")
def read_parquet(source: Source) -> Iterator[tuple[int, Any]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(source.name)
    except Exception as e:  # pyarrow raises several types for a broken file
        raise DataError(f"{source.name}: cannot read it as Parquet ({e}); pass a valid .parquet file") from e
    for i, row in enumerate(table.to_pylist(), start=1):
        yield i, row


@register_format("hub")
def read_hub(source: Source) -> Iterator[tuple[int, Any]]:
    try:
        import datasets
    except ImportError as e:
        raise DataError("loading a Hub dataset needs the `datasets` package: pip install 'gptoss-toolchain[train]'") from e
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        # datasets cannot resolve a Hub id from the cache alone when offline: load the cached snapshot folder.
        yield from _read_cached_hub(source, datasets)
        return
    try:
        ds = datasets.load_dataset(source.name, split=source.split, revision=source.revision)
    except Exception as e:  # network, auth, unknown id or split: all surface here
        raise DataError(
            f"--dataset {source.name}: could not load split {source.split!r} from the Hugging Face Hub "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); check the id, the split and your "
            f"network/HF_TOKEN, or pass a local .jsonl/.parquet file"
        ) from e
    source.found["revision"] = _hub_commit(ds)
    for i, row in enumerate(ds, start=1):
        yield i, row


def _read_cached_hub(source: Source, datasets) -> Iterator[tuple[int, Any]]:
    from huggingface_hub import snapshot_download

    try:
        local = Path(snapshot_download(source.name, repo_type="dataset", revision=source.revision,
                                       local_files_only=True))
    except Exception as e:
        raise DataError(
            f"--dataset {source.name}: HF_HUB_OFFLINE is set and the dataset is not in the Hugging Face cache"
            f"{f' at revision {source.revision}' if source.revision else ''} ({type(e).__name__}); `gptoss cache check` "
            f"lists what is missing, `gptoss cache import DIR --repo-id {source.name} --repo-type dataset` lays a copy in"
        ) from e
    try:
        ds = datasets.load_dataset(str(local), split=source.split)
    except Exception as e:
        raise DataError(f"--dataset {source.name}: the cached copy {local} has no loadable split {source.split!r} "
                        f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from e
    source.found["revision"] = local.name if len(local.name) == 40 else source.revision  # snapshots/<commit>
    for i, row in enumerate(ds, start=1):
        yield i, row


def _hub_commit(ds) -> str | None:
    """The dataset repo commit the data came from, as recorded in the files datasets downloaded."""
    import re

    urls = list(getattr(ds.info, "download_checksums", None) or {}) + [f.get("filename", "") for f in getattr(ds, "cache_files", [])]
    for url in urls:
        m = re.search(r"@([0-9a-f]{40})/", str(url))
        if m:
            return m.group(1)
    return None


class _BadRow:
    def __init__(self, why: str):
        self.why = why


def looks_like_path(name: str) -> bool:
    return Path(name).suffix in SUFFIXES or not is_hub_id(name)


def resolve_source(dataset: str, *, split: str = "train", revision: str | None = None) -> Source:
    """A local file (by suffix) or a Hub id ("owner/name")."""
    path = Path(dataset).expanduser()
    if path.exists() or looks_like_path(dataset):
        if not path.exists():
            raise DataError(f"--dataset {dataset}: no such file; pass a .jsonl/.parquet file or a Hub id like {'HuggingFaceH4/Multilingual-Thinking'}")
        if path.is_dir():
            raise DataError(f"--dataset {dataset}: is a directory; pass one .jsonl or .parquet file")
        kind = SUFFIXES.get(path.suffix.lower())
        if kind is None:
            raise DataError(f"--dataset {dataset}: unknown file type {path.suffix!r}; known: {', '.join(sorted(SUFFIXES))}")
        return Source(kind, str(path))
    return Source("hub", dataset, split=split, revision=revision)


def dataset_problem(dataset: str) -> str | None:
    try:
        resolve_source(dataset)
    except DataError as e:
        return str(e)
    return None


# ---------------------------------------------------------------------------------------------
# Row checks


def check_row(row: Any) -> tuple[list[dict[str, Any]], str | None, str | None]:
    """(normalised messages, reasoning effort or None, problem "field: what is wrong" or None)."""
    if isinstance(row, _BadRow):
        return [], None, row.why
    if not isinstance(row, Mapping):
        return [], None, f"expected an object with a 'messages' field, got {type(row).__name__}"
    if surrogate := _lone_surrogate(row):
        return [], None, surrogate
    messages = row.get("messages")
    if messages is None:
        return [], None, f"field 'messages': missing (fields present: {', '.join(sorted(map(str, row))) or 'none'})"
    if not isinstance(messages, list) or not messages:
        return [], None, "field 'messages': must be a non-empty list of {role, content} objects"
    out = []
    for i, m in enumerate(messages):
        where = f"field 'messages[{i}]"
        if not isinstance(m, Mapping):
            return [], None, f"{where}': expected an object, got {type(m).__name__}"
        role = m.get("role")
        if role not in ROLES:
            return [], None, f"{where}.role': must be one of {', '.join(ROLES)}, got {role!r}"
        content = m.get("content")
        if content is not None and not isinstance(content, (str, list)):
            return [], None, f"{where}.content': must be a string, got {type(content).__name__}"
        msg = {k: v for k, v in m.items() if v is not None}
        for key in ("content", "thinking", "reasoning_content"):
            text = m.get(key)
            parts = text if isinstance(text, list) else [text]
            for part in parts:
                value = part.get("text") if isinstance(part, Mapping) else part
                bad = next((t for t in harmony.CONTROL_TOKENS if isinstance(value, str) and t in value), None)
                if bad:
                    return [], None, f"{where}.{key}': contains the Harmony control token {bad}, which would break the conversation's structure; remove it"
        thinking = m.get("thinking", m.get("reasoning_content"))
        if role == "assistant":
            if thinking is not None and not isinstance(thinking, str):
                return [], None, f"{where}.thinking': must be a string, got {type(thinking).__name__}"
            msg.pop("reasoning_content", None)
            if thinking:
                msg["thinking"] = thinking
        else:
            msg.pop("thinking", None)
            msg.pop("reasoning_content", None)
        out.append(msg)
    if out[-1]["role"] != "assistant":
        return [], None, f"field 'messages[{len(out) - 1}].role': the last message must be the assistant's answer to train on, got {out[-1]['role']!r}"
    try:
        harmony.to_conversation(out)
    except harmony.HarmonyInputError as e:
        field, _, what = str(e).partition(": ")
        return [], None, f"field '{field}': {what}" if field.startswith("messages") and what else f"field 'messages': {e}"
    effort = row.get("reasoning_effort")
    if effort is not None and effort not in harmony.REASONING_EFFORTS:
        return [], None, f"field 'reasoning_effort': must be one of {', '.join(harmony.REASONING_EFFORTS)}, got {effort!r}"
    return out, effort, None


def _lone_surrogate(value: Any, path: str = "") -> str | None:
    """A problem naming the first string (or key) holding a lone UTF-16 surrogate such as JSON's "\\ud800"
    (a pair like "\\ud83d\\ude00" is one character once parsed), else None."""
    if isinstance(value, str):
        bad = next((i for i, c in enumerate(value) if "\ud800" <= c <= "\udfff"), None)
        if bad is None:
            return None
        return (f"field '{path or 'the row'}': a lone UTF-16 surrogate (\\u{ord(value[bad]):04x} at character {bad + 1}) is not "
                f"text and cannot be tokenized; fix the escape in the file (a character beyond U+FFFF is written as a "
                f"surrogate pair, e.g. \\ud83d\\ude00) or drop it")
    if isinstance(value, Mapping):
        for key, item in value.items():
            key_text = str(key).encode("utf-8", "backslashreplace").decode("utf-8")  # printable even when it is the culprit
            where = f"{path}.{key_text}" if path else key_text
            if found := _lone_surrogate(key, where + " (the key)") or _lone_surrogate(item, where):
                return found
    elif isinstance(value, list):
        for i, item in enumerate(value):
            if found := _lone_surrogate(item, f"{path}[{i}]"):
                return found
    return None


def _canonical(row: Any) -> bytes:
    # surrogatepass: a row with a lone surrogate is hashed (it is then reported bad), not a crash
    return json.dumps(row, sort_keys=True, ensure_ascii=False, default=str).encode("utf-8", "surrogatepass")


# ---------------------------------------------------------------------------------------------
# Rendering and masks


@dataclasses.dataclass
class HarmonyIds:
    start: int
    end: int
    message: int
    channel: int
    stops: tuple[int, ...]  # <|end|>, <|return|>, <|call|>
    assistant: tuple[int, ...]  # tokens of the role name after <|start|>

    @classmethod
    def of(cls, tokenizer) -> "HarmonyIds":
        def one(text):
            ids = tokenizer.convert_tokens_to_ids(text)
            if ids is None or ids == tokenizer.unk_token_id:
                raise DataError(f"the tokenizer has no Harmony token {text}; is this a gpt-oss tokenizer?")
            return ids

        return cls(
            start=one(harmony.START),
            end=one(harmony.END),
            message=one(harmony.MESSAGE),
            channel=one(harmony.CHANNEL),
            stops=(one(harmony.END), one(harmony.RETURN), one(harmony.CALL)),
            assistant=tuple(tokenizer.encode("assistant", add_special_tokens=False)),
        )


@dataclasses.dataclass
class Part:
    """One Harmony message in a token sequence."""

    start: int  # index of <|start|>
    body: int  # first generated token (after the role name) for assistant messages
    stop: int  # index of the end token (inclusive)
    role: str
    channel: str | None


def harmony_parts(ids: list[int], tokenizer, hid: HarmonyIds) -> list[Part]:
    parts = []
    i, n = 0, len(ids)
    while i < n:
        if ids[i] != hid.start:
            i += 1
            continue
        j = i + 1
        while j < n and ids[j] != hid.message:
            j += 1
        k = j + 1
        while k < n and ids[k] not in hid.stops:
            k += 1
        header = tokenizer.decode(ids[i + 1 : j])
        role = header.split(harmony.CHANNEL)[0].split(" ")[0]
        channel = header.split(harmony.CHANNEL, 1)[1].split(" ")[0] if harmony.CHANNEL in header else None
        body = i + 1 + len(hid.assistant) if tuple(ids[i + 1 : i + 1 + len(hid.assistant)]) == hid.assistant else i + 1
        parts.append(Part(i, body, min(k, n - 1), role, channel))
        i = k + 1
    return parts


def loss_mask(ids: list[int], tokenizer, hid: HarmonyIds, *, loss_on: str) -> list[bool]:
    """True where the loss applies: assistant messages of the last turn (only ``final`` ones if asked),
    with the ``<|start|>assistant`` header of those that follow another assistant message."""
    parts = harmony_parts(ids, tokenizer, hid)
    last_user = max((p.start for p in parts if p.role == "user"), default=-1)
    mask = [False] * len(ids)
    for prev, p in zip([None, *parts[:-1]], parts):
        if p.role != "assistant" or p.start < last_user:
            continue
        if loss_on == "final" and p.channel != "final":
            continue
        # After another assistant message (<|end|> is no stop) the model writes this one's <|start|>assistant
        # itself; after a user or tool message the prompt ends with it.
        begin = p.start if prev is not None and prev.role == "assistant" else p.body
        for t in range(begin, p.stop + 1):
            mask[t] = True
    return mask


def render(messages: list[dict[str, Any]], tokenizer, *, reasoning_effort: str) -> list[int]:
    """Token ids of a whole conversation with the model's chat template (Harmony core if it has none)."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=False, reasoning_effort=reasoning_effort
        )
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return harmony.render_training(messages, options=harmony.SystemOptions(reasoning_effort=reasoning_effort))


# ---------------------------------------------------------------------------------------------
# The dataset


@dataclasses.dataclass
class Example:
    input_ids: list[int]
    labels: list[int]
    row: int

    @property
    def n_supervised(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE_INDEX)


@dataclasses.dataclass
class PreparedData:
    train: list[Example]
    eval: list[Example]
    source: Source
    stats: dict[str, int]
    content_sha256: str
    file_sha256: str | None
    hub_revision: str | None = None

    def record(self) -> dict[str, Any]:
        return {
            "id": self.source.name if self.source.kind == "hub" else None,
            "path": self.source.name if self.source.kind != "hub" else None,
            "format": self.source.kind,
            "split": self.source.split,
            "revision": self.hub_revision or self.source.revision,
            "content_sha256": self.content_sha256,
            "file_sha256": self.file_sha256,
            "rows": self.stats,
            "train_examples": len(self.train),
            "eval_examples": len(self.eval),
            "train_tokens": sum(len(e.input_ids) for e in self.train),
            "train_supervised_tokens": sum(e.n_supervised for e in self.train),
        }


def _file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def prepare(
    source: Source,
    tokenizer,
    *,
    max_seq_length: int,
    too_long: str = "drop",
    loss_on: str = "assistant",
    reasoning_effort: str = "medium",
    eval_fraction: float = 0.0,
    skip_bad_rows: bool = False,
    max_rows: int | None = None,
    seed: int = 0,
) -> PreparedData:
    """Load, check, render and mask every row; log the counts; split off the eval rows."""
    hid = HarmonyIds.of(tokenizer)
    content = hashlib.sha256()
    stats = {"read": 0, "bad": 0, "too_long_dropped": 0, "truncated": 0, "no_supervised_tokens": 0, "kept": 0}
    examples: list[Example] = []
    bad: list[str] = []
    for rowno, row in FORMATS[source.kind](source):
        if max_rows is not None and stats["read"] >= max_rows:
            break
        stats["read"] += 1
        content.update(_canonical(row if not isinstance(row, _BadRow) else row.why) + b"\n")
        messages, effort, problem = check_row(row)
        if problem is None:
            try:
                ids = render(messages, tokenizer, reasoning_effort=effort or reasoning_effort)
            except Exception as e:  # a template that raises on this row (jinja2 TemplateError and friends)
                problem = f"field 'messages': the chat template cannot render it ({type(e).__name__}: {e})"
        if problem is not None:
            stats["bad"] += 1
            msg = f"{source.where(rowno)}: {problem}"
            if not skip_bad_rows:
                raise DataError(msg + "; fix the row or pass --skip-bad-rows")
            bad.append(msg)
            continue
        mask = loss_mask(ids, tokenizer, hid, loss_on=loss_on)
        if len(ids) > max_seq_length:
            if too_long == "drop":
                stats["too_long_dropped"] += 1
                continue
            ids, mask = ids[:max_seq_length], mask[:max_seq_length]
            stats["truncated"] += 1
        if not any(mask):
            stats["no_supervised_tokens"] += 1
            continue
        labels = [t if m else IGNORE_INDEX for t, m in zip(ids, mask)]
        examples.append(Example(ids, labels, rowno))
    stats["kept"] = len(examples)
    for msg in bad[:5]:
        log.warning("skipped bad row: %s", msg)
    if len(bad) > 5:
        log.warning("... and %d more bad rows", len(bad) - 5)
    log.info(
        "data %s: %d rows read, %d kept, %d bad%s, %d longer than %d tokens %s, %d without supervised tokens",
        source.name, stats["read"], stats["kept"], stats["bad"], " (skipped)" if bad else "",
        stats["too_long_dropped"] + stats["truncated"], max_seq_length,
        "truncated" if too_long == "truncate" else "dropped", stats["no_supervised_tokens"],
    )
    if not examples:
        raise DataError(
            f"{source.name}: no usable rows ({stats['read']} read, {stats['bad']} bad, "
            f"{stats['too_long_dropped']} longer than --max-seq-length {max_seq_length}, "
            f"{stats['no_supervised_tokens']} without assistant tokens to train on)"
        )
    train, evals = examples, []
    if eval_fraction > 0:
        order = list(range(len(examples)))
        random.Random(seed).shuffle(order)
        n_eval = max(1, math.floor(len(examples) * eval_fraction))
        if n_eval >= len(examples):
            raise DataError(f"--eval-fraction {eval_fraction}: leaves no training rows out of {len(examples)}")
        eval_ids = set(order[:n_eval])
        train = [e for i, e in enumerate(examples) if i not in eval_ids]
        evals = [e for i, e in enumerate(examples) if i in eval_ids]
    return PreparedData(
        train=train,
        eval=evals,
        source=source,
        stats=stats,
        content_sha256=content.hexdigest(),
        file_sha256=_file_sha256(source.name) if source.kind != "hub" else None,
        hub_revision=source.found.get("revision"),
    )
