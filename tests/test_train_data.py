"""Training data: loss masks against openai-harmony, schema errors, length handling, splits."""

from __future__ import annotations

import json

import openai_harmony as oh
import pytest
from _train_support import TRAIN_JSONL, tokenizer

from gptoss import harmony
from gptoss.training import data as D


def _spans(ids, labels, tok) -> list[str]:
    """Decoded runs of supervised tokens; each label must equal its input id."""
    spans, run = [], []
    for i, lab in zip(ids, labels):
        if lab == D.IGNORE_INDEX:
            if run:
                spans.append(tok.decode(run))
                run = []
        else:
            assert lab == i
            run.append(lab)
    if run:
        spans.append(tok.decode(run))
    return spans


def _reference(message, *, last=False, own_header=False) -> str:
    """What the model generates for one assistant message, per openai-harmony: its rendering
    without the leading ``<|start|>assistant`` (which the prompt gives), or with it after another
    assistant message (``own_header``: the model writes it); the closing final ends in <|return|>."""
    text = harmony.encoding().decode_utf8(harmony.encoding().render(message))
    assert text.startswith("<|start|>assistant")
    if not own_header:
        text = text[len("<|start|>assistant"):]
    if last:
        assert text.endswith("<|end|>")
        text = text[: -len("<|end|>")] + "<|return|>"
    return text


def _analysis(text):
    return oh.Message.from_role_and_content(oh.Role.ASSISTANT, text).with_channel("analysis")


def _final(text):
    return oh.Message.from_role_and_content(oh.Role.ASSISTANT, text).with_channel("final")


def _call(name, args):
    return (
        oh.Message.from_role_and_content(oh.Role.ASSISTANT, args)
        .with_channel("commentary").with_recipient(f"functions.{name}").with_content_type("json")
    )


def _example(tok, messages, *, loss_on="assistant", effort="medium"):
    msgs, row_effort, problem = D.check_row({"messages": messages})
    assert problem is None
    ids = D.render(msgs, tok, reasoning_effort=row_effort or effort)
    mask = D.loss_mask(ids, tok, D.HarmonyIds.of(tok), loss_on=loss_on)
    labels = [t if m else D.IGNORE_INDEX for t, m in zip(ids, mask)]
    return ids, labels


SINGLE = [
    {"role": "system", "content": "reasoning language: French", "thinking": None},
    {"role": "user", "content": "What is 2+2?", "thinking": None},
    {"role": "assistant", "thinking": "Deux plus deux font quatre.", "content": "4"},
]
MULTI = [
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "thinking": "greet back", "content": "Hello!"},
    {"role": "user", "content": "Capital of Peru?"},
    {"role": "assistant", "thinking": "Peru's capital is Lima.", "content": "Lima."},
]
TOOLS = [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "reasoning_content": "I need the tool.",
     "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}]},
    {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
    {"role": "assistant", "content": "Sunny."},
]


def test_label_spans_are_exactly_the_assistant_parts(tokenizer):
    ids, labels = _example(tokenizer, SINGLE)
    assert _spans(ids, labels, tokenizer) == [
        _reference(_analysis("Deux plus deux font quatre.")) + _reference(_final("4"), last=True, own_header=True),
    ]


def test_only_the_last_turn_is_supervised(tokenizer):
    ids, labels = _example(tokenizer, MULTI)
    assert _spans(ids, labels, tokenizer) == [
        _reference(_analysis("Peru's capital is Lima.")) + _reference(_final("Lima."), last=True, own_header=True),
    ]
    # the earlier turn is in the input (its final; its analysis is dropped by the Harmony rule)
    text = tokenizer.decode(ids)
    assert "Hello!" in text and "greet back" not in text


def test_loss_on_final(tokenizer):
    ids, labels = _example(tokenizer, SINGLE, loss_on="final")
    assert _spans(ids, labels, tokenizer) == [_reference(_final("4"), last=True, own_header=True)]


def test_tool_calls_supervise_the_recipient_too(tokenizer):
    """The model generates " to=functions.NAME" after <|start|>assistant: it must be trained on it."""
    ids, labels = _example(tokenizer, TOOLS)
    assert _spans(ids, labels, tokenizer) == [
        _reference(_analysis("I need the tool.")) + _reference(_call("get_weather", '{"city":"Paris"}'), own_header=True),
        _reference(_final("Sunny."), last=True),
    ]


def test_mask_agrees_with_the_templates_generation_blocks(tokenizer):
    """Where the chat template marks assistant parts ({% generation %}), our mask matches it
    (last turn only; the template also marks earlier turns)."""
    out = tokenizer.apply_chat_template(SINGLE, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    ids, labels = _example(tokenizer, SINGLE)
    assert out["input_ids"] == ids
    assert [lab != D.IGNORE_INDEX for lab in labels] == [bool(m) for m in out["assistant_masks"]]


def test_rendering_matches_harmony_core(tokenizer):
    for conv in (SINGLE, MULTI, TOOLS):
        msgs, _, _ = D.check_row({"messages": conv})
        assert D.render(msgs, tokenizer, reasoning_effort="high") == harmony.render_training(
            msgs, options=harmony.SystemOptions(reasoning_effort="high")
        )


def _write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


GOOD = {"messages": SINGLE}


@pytest.mark.parametrize(
    "bad, field",
    [
        ({"text": "hi"}, "field 'messages': missing"),
        ({"messages": []}, "field 'messages': must be a non-empty list"),
        ({"messages": [{"role": "robot", "content": "x"}, SINGLE[2]]}, "field 'messages[0].role'"),
        ({"messages": [SINGLE[1], {"role": "assistant", "content": 5}]}, "field 'messages[1].content'"),
        ({"messages": [SINGLE[1], {"role": "assistant", "content": "a", "thinking": ["x"]}]}, "field 'messages[1].thinking'"),
        ({"messages": SINGLE[:2]}, "field 'messages[1].role': the last message must be the assistant"),
        ({"messages": [SINGLE[1], {"role": "assistant", "content": "a<|end|>b"}]}, "control token"),
        ({"messages": SINGLE, "reasoning_effort": "max"}, "field 'reasoning_effort'"),
        ("{not json", "not valid JSON"),
    ],
)
def test_bad_row_names_file_row_and_field(tmp_path, tokenizer, bad, field):
    path = _write_jsonl(tmp_path / "d.jsonl", [GOOD, GOOD, bad, GOOD])
    with pytest.raises(D.DataError) as e:
        D.prepare(D.resolve_source(str(path)), tokenizer, max_seq_length=1024)
    assert f"{path} row 3: " in str(e.value)
    assert field in str(e.value)
    assert "--skip-bad-rows" in str(e.value)


def test_skip_bad_rows_counts_them(tmp_path, tokenizer):
    path = _write_jsonl(tmp_path / "d.jsonl", [GOOD, {"text": "x"}, "{oops", GOOD])
    prepared = D.prepare(D.resolve_source(str(path)), tokenizer, max_seq_length=1024, skip_bad_rows=True)
    assert prepared.stats["bad"] == 2 and prepared.stats["kept"] == 2
    assert [e.row for e in prepared.train] == [1, 4]


def test_parquet_rows_and_errors(tmp_path, tokenizer):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"reasoning_effort": None, **json.loads(line)} for line in TRAIN_JSONL.read_text().splitlines()]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    prepared = D.prepare(D.resolve_source(str(tmp_path / "d.parquet")), tokenizer, max_seq_length=1024)
    from_jsonl = D.prepare(D.resolve_source(str(TRAIN_JSONL)), tokenizer, max_seq_length=1024)
    assert [e.input_ids for e in prepared.train] == [e.input_ids for e in from_jsonl.train]
    assert [e.labels for e in prepared.train] == [e.labels for e in from_jsonl.train]

    bad = rows[:2] + [{"messages": [{"role": "user", "content": "only a question"}]}]
    pq.write_table(pa.Table.from_pylist(bad), tmp_path / "bad.parquet")
    with pytest.raises(D.DataError, match=r"bad\.parquet row 3: field 'messages\[0\]\.role': the last message"):
        D.prepare(D.resolve_source(str(tmp_path / "bad.parquet")), tokenizer, max_seq_length=1024)


def test_reasoning_effort_per_row_or_global(tokenizer):
    rows = [{"messages": SINGLE, "reasoning_effort": "low"}, {"messages": SINGLE}]
    texts = []
    for row in rows:
        msgs, effort, _ = D.check_row(row)
        texts.append(tokenizer.decode(D.render(msgs, tokenizer, reasoning_effort=effort or "high")))
    assert "Reasoning: low" in texts[0] and "Reasoning: high" in texts[1]


def test_too_long_rows_dropped_or_truncated(tmp_path, tokenizer):
    long = {"messages": [SINGLE[1], {"role": "assistant", "thinking": "word " * 300, "content": "done"}]}
    path = _write_jsonl(tmp_path / "d.jsonl", [GOOD, long, GOOD])
    dropped = D.prepare(D.resolve_source(str(path)), tokenizer, max_seq_length=128)
    assert dropped.stats["too_long_dropped"] == 1 and dropped.stats["kept"] == 2
    cut = D.prepare(D.resolve_source(str(path)), tokenizer, max_seq_length=128, too_long="truncate")
    assert cut.stats["truncated"] == 1 and cut.stats["kept"] == 3
    assert max(len(e.input_ids) for e in cut.train) == 128
    # a row cut before its answer has nothing to learn and is dropped, counted
    prompt_only = {"messages": [{"role": "user", "content": "x " * 300}, {"role": "assistant", "content": "y"}]}
    path2 = _write_jsonl(tmp_path / "d2.jsonl", [GOOD, prompt_only])
    cut2 = D.prepare(D.resolve_source(str(path2)), tokenizer, max_seq_length=128, too_long="truncate")
    assert cut2.stats["no_supervised_tokens"] == 1 and cut2.stats["kept"] == 1


def test_eval_split_and_content_hash(tmp_path, tokenizer):
    a = D.prepare(D.resolve_source(str(TRAIN_JSONL)), tokenizer, max_seq_length=1024, eval_fraction=0.25, seed=1)
    b = D.prepare(D.resolve_source(str(TRAIN_JSONL)), tokenizer, max_seq_length=1024, eval_fraction=0.25, seed=1)
    assert len(a.eval) == 2 and len(a.train) == 6
    assert {e.row for e in a.eval} == {e.row for e in b.eval}
    assert not {e.row for e in a.eval} & {e.row for e in a.train}
    assert a.content_sha256 == b.content_sha256
    changed = _write_jsonl(tmp_path / "c.jsonl", [json.loads(x) for x in TRAIN_JSONL.read_text().splitlines()][:-1])
    assert D.prepare(D.resolve_source(str(changed)), tokenizer, max_seq_length=1024).content_sha256 != a.content_sha256


def test_source_resolution(tmp_path):
    assert D.resolve_source("HuggingFaceH4/Multilingual-Thinking").kind == "hub"
    assert D.resolve_source(str(TRAIN_JSONL)).kind == "jsonl"
    with pytest.raises(D.DataError, match="no such file"):
        D.resolve_source(str(tmp_path / "missing.jsonl"))
    (tmp_path / "d.csv").write_text("a,b\n")
    with pytest.raises(D.DataError, match=r"unknown file type '\.csv'; known: \.jsonl, \.parquet"):
        D.resolve_source(str(tmp_path / "d.csv"))


def test_hub_dataset_rows_and_errors(monkeypatch, tokenizer):
    """The Hub path. Mocked: the Hub is unreachable here, so datasets.load_dataset returns an
    in-memory Dataset shaped like HuggingFaceH4/Multilingual-Thinking (extra columns included)."""
    import datasets

    rows = [json.loads(line) for line in TRAIN_JSONL.read_text().splitlines()]
    hub_rows = [{"reasoning_language": r["reasoning_language"], "developer": "x", "user": "y", "analysis": "a",
                 "final": "f", "messages": r["messages"]} for r in rows]
    calls = []

    def fake_load_dataset(name, split=None, revision=None):
        calls.append((name, split, revision))
        return datasets.Dataset.from_list(hub_rows)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    source = D.resolve_source("HuggingFaceH4/Multilingual-Thinking", split="train", revision="main")
    prepared = D.prepare(source, tokenizer, max_seq_length=1024)
    assert calls == [("HuggingFaceH4/Multilingual-Thinking", "train", "main")]
    assert prepared.stats["kept"] == 8
    assert prepared.record()["id"] == "HuggingFaceH4/Multilingual-Thinking" and prepared.record()["path"] is None
    local = D.prepare(D.resolve_source(str(TRAIN_JSONL)), tokenizer, max_seq_length=1024)
    assert [e.labels for e in prepared.train] == [e.labels for e in local.train]

    hub_rows[2]["messages"] = hub_rows[2]["messages"][:2]  # no answer
    with pytest.raises(D.DataError, match=r"HuggingFaceH4/Multilingual-Thinking \(split train\) row 3: field 'messages\[1\]\.role'"):
        D.prepare(source, tokenizer, max_seq_length=1024)

    def offline(*a, **k):
        raise ConnectionError("no route to host")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(D.DataError, match=r"could not load split 'train' from the Hugging Face Hub \(ConnectionError: no route to host\)"):
        D.prepare(source, tokenizer, max_seq_length=1024)


def test_hub_dataset_reads_from_the_cache_offline(tmp_path, monkeypatch):
    """HF_HUB_OFFLINE with the dataset laid into the cache by `gptoss cache import`: the rows load
    and the cached commit is recorded; missing from the cache, the error names the import command."""
    import shutil

    from huggingface_hub import constants

    from gptoss.hfcache.layout import import_folder

    folder = tmp_path / "download" / "data"
    folder.mkdir(parents=True)
    shutil.copyfile(TRAIN_JSONL, folder / "train.jsonl")
    cache = tmp_path / "hub"
    commit = "a" * 40
    import_folder(folder.parent, repo_id="acme/chats", revision=commit, repo_type="dataset", cache_dir=cache)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    source = D.resolve_source("acme/chats")
    rows = list(D.read_hub(source))
    want = [json.loads(line) for line in TRAIN_JSONL.read_text().splitlines() if line.strip()]
    assert [r["messages"] for _, r in rows] == [w["messages"] for w in want]
    assert source.found["revision"] == commit
    with pytest.raises(D.DataError, match="gptoss cache import DIR --repo-id acme/other --repo-type dataset"):
        list(D.read_hub(D.resolve_source("acme/other")))


# Rows that crashed `gptoss train` with a traceback before they were checked (the exception they
# raised is noted): each is now a bad row naming the file, the row and the field.
_TOOL_Q = {"role": "user", "content": "Weather in Paris?"}
_CALL = {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}
CRASHING_ROWS = [
    # UnicodeDecodeError while iterating the file (it was opened as UTF-8 text)
    (b'{"messages": [{"role": "user", "content": "caf\xe9"}, {"role": "assistant", "content": "ok"}]}',
     "not valid UTF-8 (byte 0xe9 at byte 47 of the line: invalid continuation byte)"),
    # AttributeError in harmony._tool_call_arguments ('str' object has no attribute 'get')
    (json.dumps({"messages": [_TOOL_Q, {"role": "assistant", "tool_calls": "get_weather"}]}).encode(),
     "field 'messages[1].tool_calls': must be a list of tool calls, got str"),
    (json.dumps({"messages": [_TOOL_Q, {"role": "assistant", "tool_calls": [5]}]}).encode(),
     "field 'messages[1].tool_calls[0]': a tool call must be an object with 'function', got int"),
    # TypeError: unhashable type (the id is a dict key)
    (json.dumps({"messages": [_TOOL_Q, {"role": "assistant", "tool_calls": [{**_CALL, "id": ["c1"]}]},
                              {"role": "tool", "tool_call_id": "c1", "content": "sunny"}, {"role": "assistant", "content": "Sunny."}]}).encode(),
     "field 'messages[1].tool_calls[0].id': must be a string, got list"),
    (json.dumps({"messages": [_TOOL_Q, {"role": "assistant", "tool_calls": [_CALL]},
                              {"role": "tool", "tool_call_id": {"id": "c1"}, "content": "sunny"}, {"role": "assistant", "content": "Sunny."}]}).encode(),
     "field 'messages[2].tool_call_id': must be a string, got dict"),
    # UnicodeEncodeError (surrogates not allowed) when the row was hashed, then when tokenized
    (b'{"messages": [{"role": "user", "content": "a\\ud800b"}, {"role": "assistant", "content": "ok"}]}',
     "field 'messages[0].content': a lone UTF-16 surrogate (\\ud800 at character 2)"),
    (b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "tool_calls": [{"id": "c1", "type": "function", '
     b'"function": {"name": "f", "arguments": "{\\"a\\": \\"\\udfff\\"}"}}]}]}',
     "field 'messages[1].tool_calls[0].function.arguments': a lone UTF-16 surrogate (\\udfff at character 8)"),
    (b'{"messages\\ud800": []}', "field 'messages\\ud800 (the key)': a lone UTF-16 surrogate"),
]


def _write_lines(path, lines: list[bytes]):
    path.write_bytes(b"".join(line + b"\n" for line in lines))
    return path


@pytest.mark.parametrize("line, problem", CRASHING_ROWS, ids=range(len(CRASHING_ROWS)))
def test_rows_that_crashed_train_are_bad_rows(tmp_path, tokenizer, line, problem):
    good = json.dumps(GOOD).encode()
    path = _write_lines(tmp_path / "d.jsonl", [good, good, line, good])
    with pytest.raises(D.DataError) as e:
        D.prepare(D.resolve_source(str(path)), tokenizer, max_seq_length=1024)
    message = str(e.value)
    assert message.startswith(f"{path} row 3: {problem}"), message
    assert message.endswith("; fix the row or pass --skip-bad-rows")
    message.encode("utf-8")  # printable: no surrogate of the row leaks into the message


def test_skip_bad_rows_skips_the_rows_that_crashed(tmp_path, tokenizer):
    good = json.dumps(GOOD).encode()
    path = _write_lines(tmp_path / "d.jsonl", [good, *(line for line, _ in CRASHING_ROWS), good])
    prepared = D.prepare(D.resolve_source(str(path)), tokenizer, max_seq_length=1024, skip_bad_rows=True)
    assert prepared.stats["bad"] == len(CRASHING_ROWS) and prepared.stats["kept"] == 2
    assert [e.row for e in prepared.train] == [1, len(CRASHING_ROWS) + 2]
    # A surrogate pair is one character once parsed (not a lone surrogate): that row is kept.
    emoji = b'{"messages": [{"role": "user", "content": "\\ud83d\\ude00?"}, {"role": "assistant", "content": "ok"}]}'
    pair = D.prepare(D.resolve_source(str(_write_lines(tmp_path / "e.jsonl", [emoji]))), tokenizer, max_seq_length=1024)
    assert pair.stats["kept"] == 1 and "\U0001F600" in tokenizer.decode(pair.train[0].input_ids)


def test_train_reports_a_bad_row_without_a_traceback(tmp_path, tiny_model, capsys):
    from _train_support import cli

    path = _write_lines(tmp_path / "d.jsonl", [json.dumps(GOOD).encode(), CRASHING_ROWS[0][0]])
    assert cli("train", "--profile", "quick_test", "--model", tiny_model, "--dataset", path, "--max-steps", "1",
               "--output-dir", tmp_path / "models") == 2
    err = capsys.readouterr().err
    assert f"{path} row 2: not valid UTF-8" in err and "--skip-bad-rows" in err and "Traceback" not in err
    assert not (tmp_path / "models").exists() or not any((tmp_path / "models").iterdir())
