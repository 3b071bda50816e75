"""Serving without a server: Harmony tokens -> OpenAI deltas (serving.chat), flag checks, the registry."""

from __future__ import annotations

import json
import os

import pytest

from gptoss import harmony
from gptoss.cli import resolve
from gptoss.records import GGUFArtifact, Manifest, MergedFolder, TrainingInfo
from gptoss.serving import serve
from gptoss.serving.backends import BACKENDS, ServeError, get_backend
from gptoss.serving.chat import ChatOutput
from gptoss.serving.server import resolve_config

TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
QUESTION = [{"role": "user", "content": "Weather in Paris and Rome?"}]


def completion_tokens(prompt_messages, answer, tools=None) -> list[int]:
    """What a model would generate for ``answer``, rendered by the Harmony core."""
    full = harmony.render_training(prompt_messages + [answer], tools=tools)
    return full[len(harmony.render_prompt(prompt_messages, tools=tools)):]


def run(tokens, stop=None, engine_reason="stop"):
    out = ChatOutput(stop=stop)
    deltas = [d for t in tokens for d in out.feed(t)]
    deltas += out.flush()
    return out, deltas, out.finish_reason(engine_reason)


def test_final_and_analysis_are_separated():
    answer = {"role": "assistant", "reasoning_content": "Think about it.", "content": "Bonjour, ça va? 🙂"}
    out, deltas, finish = run(completion_tokens(QUESTION, answer))
    assert out.content == answer["content"] and out.reasoning == answer["reasoning_content"]
    assert "".join(d.get("content", "") for d in deltas) == answer["content"]
    assert "".join(d.get("reasoning_content", "") for d in deltas) == answer["reasoning_content"]
    assert finish == "stop" and out.tool_calls == []


def test_two_calls_to_the_same_function_are_two_tool_calls():
    answer = {"role": "assistant", "reasoning_content": "Two cities.", "tool_calls": [
        {"id": "a", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
        {"id": "b", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}},
    ]}
    tokens = completion_tokens(QUESTION, answer, TOOLS)
    out, deltas, finish = run(tokens)
    assert [json.loads(c["function"]["arguments"]) for c in out.tool_calls] == [{"city": "Paris"}, {"city": "Rome"}]
    assert [c["function"]["name"] for c in out.tool_calls] == ["get_weather", "get_weather"]
    assert len({c["id"] for c in out.tool_calls}) == 2
    # streamed: the first delta of each call carries id and name, later ones only arguments
    firsts = [d["tool_calls"][0] for d in deltas if "tool_calls" in d and "id" in d["tool_calls"][0]]
    assert [f["index"] for f in firsts] == [0, 1]
    # the reference parser agrees on what was called
    ref = harmony.parse_completion(tokens)
    assert [(c.name, c.arguments) for c in ref.tool_calls] == [(c["function"]["name"], c["function"]["arguments"]) for c in out.tool_calls]
    assert finish == "tool_calls"
    assert not out.content


@pytest.mark.parametrize("stop", [["world"], ["wor", "zzz"], ["o, w"]])
def test_stop_strings_cut_content_across_tokens(stop):
    answer = {"role": "assistant", "content": "Hello, world and more"}
    out, deltas, finish = run(completion_tokens(QUESTION, answer), stop=stop)
    cut = min(answer["content"].find(s) for s in stop if s in answer["content"])
    assert out.content == answer["content"][:cut]
    assert "".join(d.get("content", "") for d in deltas) == out.content
    assert finish == "stop" and out.stopped_by_string


def test_held_back_prefix_is_flushed_when_the_stop_never_comes():
    answer = {"role": "assistant", "content": "ends with wor"}
    out, deltas, _ = run(completion_tokens(QUESTION, answer), stop=["world"])
    assert out.content == "ends with wor" and "".join(d.get("content", "") for d in deltas) == "ends with wor"


def test_truncated_output_is_length_and_garbage_never_leaks():
    answer = {"role": "assistant", "content": "A long answer that gets cut"}
    tokens = completion_tokens(QUESTION, answer)[:-3]
    out, _, finish = run(tokens, engine_reason="length")
    assert finish == "length" and out.content.startswith("A long")
    garbage = harmony.encoding().encode("<|channel|>final<|message|>", allowed_special="all")[::-1] + [1, 2, 3]
    out, deltas, _ = run(garbage)
    assert out.content == "" and "<|" not in json.dumps(deltas)


def test_command_table_and_registry():
    assert resolve("serve") is serve
    assert set(BACKENDS) == {"llamacpp", "transformers"}
    with pytest.raises(ServeError, match="known: llamacpp, transformers"):
        get_backend("vllm")


def test_flags_are_checked_together(tmp_path):
    with pytest.raises(ServeError) as e:
        resolve_config(backend="llamacpp", model=str(tmp_path / "missing.gguf"), adapter=None, quant=None, device="gpu0",
                       ctx=0, parallel=0, threads=None, dtype="auto")
    message = str(e.value)
    for flag in ("--device", "--ctx", "--parallel", "--model"):
        assert flag in message


def test_gpu_that_does_not_exist_names_the_ones_that_do(tmp_path, monkeypatch):
    """No GPU on CI: a stand-in nvidia-smi on PATH lists two (the only fake in this file)."""
    from gptoss.serving.server import gpu_problem

    smi = tmp_path / "bin" / "nvidia-smi"
    smi.parent.mkdir()
    smi.write_text("#!/bin/sh\necho 'GPU 0: NVIDIA GeForce RTX 3090 (UUID: GPU-a)'\n"
                   "echo 'GPU 1: NVIDIA GeForce RTX 3090 (UUID: GPU-b)'\n")
    smi.chmod(0o755)
    monkeypatch.setenv("PATH", f"{smi.parent}:{os.environ['PATH']}")
    assert gpu_problem("cuda:1") is None
    assert gpu_problem("cuda:2") == "--device cuda:2: GPU 2 does not exist here (2 visible); pick one of cuda:0..cuda:1"
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    with pytest.raises(ServeError, match="GPU 7 does not exist here"):
        _config(tmp_path, model=str(gguf), device="cuda:7")


def _config(tmp_path, **kw):
    args = dict(backend="llamacpp", adapter=None, quant=None, device="cpu", ctx=1024, parallel=1, threads=None, dtype="auto")
    args.update(kw)
    return resolve_config(**args)


def gguf_manifest(export, labels):
    """An export's manifest listing ``labels`` (e.g. F16) under gguf/, built with the writer's dataclasses
    (tests/test_records.py feeds the resolver a real export)."""
    Manifest(run=export.name, merged=MergedFolder(path="merged"), artifacts=[
        GGUFArtifact(path=f"gguf/{export.name}-{q}.gguf", quant=q.lower(), label=q, sha256="0" * 64, size=4)
        for q in labels]).write(export)


def test_export_folder_resolves_through_its_manifest(tmp_path):
    export = tmp_path / "exports" / "run1"
    (export / "gguf").mkdir(parents=True)
    for q in ("F16", "Q4_K_M"):
        (export / "gguf" / f"run1-{q}.gguf").write_bytes(b"GGUF")
    gguf_manifest(export, ("F16", "Q4_K_M"))
    assert _config(tmp_path, model=str(export), quant="q4_k_m").model == str((export / "gguf" / "run1-Q4_K_M.gguf").resolve())
    with pytest.raises(ServeError, match="F16, Q4_K_M"):  # two GGUFs and no --quant: say which exist
        _config(tmp_path, model=str(export))
    with pytest.raises(ServeError, match="Q5_K_M"):
        _config(tmp_path, model=str(export), quant="Q5_K_M")
    (export / "gguf" / "run1-F16.gguf").unlink()
    with pytest.raises(ServeError, match="re-run `gptoss export`"):
        _config(tmp_path, model=str(export), quant="f16")
    loose = tmp_path / "loose"
    loose.mkdir()
    (loose / "a.gguf").write_bytes(b"GGUF")
    assert _config(tmp_path, model=str(loose)).model == str((loose / "a.gguf").resolve())
    (loose / "b.gguf").write_bytes(b"GGUF")
    with pytest.raises(ServeError, match="a.gguf, b.gguf"):
        _config(tmp_path, model=str(loose))


def test_training_run_resolves_to_base_and_adapter(tmp_path):
    run = tmp_path / "models" / "run1"
    (run / "adapter").mkdir(parents=True)
    (run / "adapter" / "adapter_config.json").write_text("{}")
    TrainingInfo(base_model="openai/gpt-oss-20b", base_model_revision="abc123").write(run)
    config = _config(tmp_path, backend="transformers", model=str(run))
    assert (config.model, config.adapter, config.revision) == ("openai/gpt-oss-20b", str((run / "adapter").absolute()), "abc123")
    export = tmp_path / "exports" / "run1"
    (export / "merged").mkdir(parents=True)
    (export / "merged" / "config.json").write_text("{}")
    Manifest(run="run1", merged=MergedFolder(path="merged")).write(export)
    assert _config(tmp_path, backend="transformers", model=str(export)).model == str((export / "merged").resolve())
    with pytest.raises(ServeError) as e:
        _config(tmp_path, backend="transformers", model=str(tmp_path / "nothing"), quant="q4_k_m", sample_on_device=True)
    for part in ("--quant", "does not exist", "--sample-on-device"):
        assert part in str(e.value)


def test_llamacpp_path_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys, gptoss.serving, gptoss.serving.api; assert 'torch' not in sys.modules and 'transformers' not in sys.modules, sorted(sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True)


# Characters str.splitlines (and so httpx's aiter_lines) breaks at; llama-server writes them raw in JSON.
SPLITLINES_BREAKERS = "\u2028\u2029\x85\x0b\x0c\x1c\x1d\x1e"


def test_engine_events_survive_unicode_line_separators():
    """A random-weight GPU run tore llama-server events at U+2028 inside generated text."""
    import asyncio

    from gptoss.serving.llamacpp_backend import sse_lines

    events = [{"content": f"a{c}b", "tokens": [i]} for i, c in enumerate(SPLITLINES_BREAKERS)]
    events.append({"content": "é日本", "tokens": [99], "stop": True})
    body = "".join(f"data: {json.dumps(e, ensure_ascii=False)}\n\n" for e in events).encode()

    async def chunks():  # 7-byte pieces: split inside JSON strings and inside multi-byte characters
        for i in range(0, len(body), 7):
            yield body[i:i + 7]

    async def collect():
        return [line async for line in sse_lines(chunks())]

    lines = asyncio.run(collect())
    assert [json.loads(line[6:]) for line in lines if line.startswith("data: ")] == events
    assert len(body.decode().splitlines()) > len(lines)  # what aiter_lines would have made of it


def test_api_events_are_one_line_for_any_line_splitter():
    from gptoss.serving.api import _sse

    text = _sse({"choices": [{"delta": {"content": "x" + SPLITLINES_BREAKERS + "日本"}}]})
    assert text.endswith("\n\n") and text.count("\n") == 2
    assert text.splitlines() == [text[:-2], ""]
    assert json.loads(text[6:])["choices"][0]["delta"]["content"] == "x" + SPLITLINES_BREAKERS + "日本"


def test_sample_on_device_takes_compose_words(tmp_path):
    """compose passes --sample-on-device=${SERVE_SAMPLE_ON_DEVICE:-true}; fire leaves 'true' as text."""
    gguf = tmp_path / "a.gguf"
    gguf.write_bytes(b"GGUF")
    assert _config(tmp_path, model=str(gguf), sample_on_device="true").sample_on_device is True
    assert _config(tmp_path, model=str(gguf), sample_on_device="False").sample_on_device is False
    with pytest.raises(ServeError, match="is a switch"):
        _config(tmp_path, model=str(gguf), sample_on_device="yes please")


@pytest.mark.parametrize("group", [2, 3, 7, 1000])
def test_one_event_per_engine_read_carries_the_same_answer(group):
    """Tokens that arrive together are fed together and their deltas merged (serving.chat.merge_deltas):
    fewer events, and a client that joins them (chat completions or Responses) gets the same answer."""
    from gptoss.serving.chat import merge_deltas
    from gptoss.serving.responses import OutputItems

    answer = {"role": "assistant", "reasoning_content": "Two cities, then a word.", "tool_calls": [
        {"id": "a", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
        {"id": "b", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}},
    ]}
    tokens = completion_tokens(QUESTION, answer, TOOLS)
    single, single_deltas, _ = run(tokens)
    out = ChatOutput()
    merged = []
    for i in range(0, len(tokens), group):
        merged += merge_deltas([d for t in tokens[i:i + group] for d in out.feed(t)])
    assert len(merged) < len(single_deltas)

    def joined(deltas):
        reasoning = "".join(d.get("reasoning_content", "") for d in deltas)
        assert reasoning == "".join(d.get("reasoning", "") for d in deltas)
        calls: dict = {}
        for d in deltas:
            for c in d.get("tool_calls", []):
                call = calls.setdefault(c["index"], {"name": c.get("function", {}).get("name"), "arguments": "", "ids": []})
                call["ids"] += [c["id"]] if "id" in c else []
                call["arguments"] += c["function"].get("arguments", "")
        return reasoning, "".join(d.get("content", "") for d in deltas), calls

    ids = lambda calls: [c.pop("ids") for c in calls.values()]  # noqa: E731 (random per ChatOutput)
    merged_answer, single_answer = joined(merged), joined(single_deltas)
    assert ids(merged_answer[2]) == [[c["id"]] for c in out.tool_calls] and len(ids(single_answer[2])) == 2
    assert merged_answer == single_answer
    items_one, items_merged = OutputItems(), OutputItems()
    for d in single_deltas:
        items_one.feed(d)
    for d in merged:
        items_merged.feed(d)
    strip = lambda items: [{k: v for k, v in i.items() if k not in ("id", "call_id")} for i in items]  # noqa: E731 (random ids)
    assert strip(items_merged.items) == strip(items_one.items)


def test_engine_lines_come_per_read():
    import asyncio

    from gptoss.serving.llamacpp_backend import sse_line_batches

    reads = [b'data: {"tokens": [1]}\n\ndata: {"tok', b'ens": [2]}\n\n', b'data: {"tokens": [3]}\n\ndata: {"tokens": [4]}\n\n']

    async def chunks():
        for r in reads:
            yield r

    async def collect():
        return [batch async for batch in sse_line_batches(chunks())]

    batches = [[line for line in b if line] for b in asyncio.run(collect())]
    assert batches == [['data: {"tokens": [1]}'], ['data: {"tokens": [2]}'], ['data: {"tokens": [3]}', 'data: {"tokens": [4]}']]


def test_engine_args_go_after_ours_and_ours_are_refused(tmp_path):
    from gptoss.serving.llamacpp_backend import server_command

    gguf = tmp_path / "a.gguf"
    gguf.write_bytes(b"GGUF")
    config = _config(tmp_path, model=str(gguf), engine_args="--flash-attn on --kv-unified")
    cmd = server_command(config, tmp_path / "llama-server", 1234)
    assert cmd[-3:] == ["--flash-attn", "on", "--kv-unified"] and "--no-kv-unified" in cmd[:-3]
    with pytest.raises(ServeError, match="--port: set by gptoss serve itself"):
        _config(tmp_path, model=str(gguf), engine_args="--port 9")
    with pytest.raises(ServeError, match="for the llamacpp backend"):
        _config(tmp_path, backend="transformers", model=str(tmp_path), engine_args="--flash-attn on")
