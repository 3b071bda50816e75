"""Generation checks of `gptoss eval --generate`: base vs fine-tuned answers through the serving API.

Each evaluation row's conversation without its last assistant message is sent to the fine-tuned
model (``--url``) and, when given, the base (``--base-url``), greedy (temperature 0) at a fixed
seed, with the row's reasoning effort. Per model: the share of well-formed Harmony answers (a final
answer present, the completion stopped rather than cut off, no Harmony control text left in the
content or reasoning), answer and reasoning length, and three matches against the row's reference
final answer: ``exact`` (equal after lower-casing and dropping punctuation), ``contains`` (the
reference inside the answer, same normalisation) and ``token_f1`` (SQuAD-style word-overlap F1).
Then the fine-tuned model's reasoning length at each ``reasoning_effort`` on the same prompts.
"""

from __future__ import annotations

import re
import statistics
import string
from collections import Counter
from typing import Any

from gptoss import harmony
from gptoss.errors import ToolchainError

EFFORTS = harmony.REASONING_EFFORTS
_PUNCT = re.compile(f"[{re.escape(string.punctuation)}¿¡«»…“”‘’]")


def normalise(text: str) -> str:
    return " ".join(_PUNCT.sub(" ", text.lower()).split())


def token_f1(answer: str, reference: str) -> float:
    a, r = normalise(answer).split(), normalise(reference).split()
    if not a or not r:
        return float(a == r)
    common = sum((Counter(a) & Counter(r)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(a), common / len(r)
    return 2 * precision * recall / (precision + recall)


def prompts(data: dict, *, default_effort: str) -> list[dict]:
    """The evaluation rows as (messages without the last assistant turn, reference final answer, effort),
    read again with training/data.py's reader and row check (rows named in ``data['rows']``)."""
    from gptoss.training import data as data_mod

    wanted = set(data["rows"])
    source = data_mod.resolve_source(data["path"])
    out = []
    for rowno, row in data_mod.FORMATS[source.kind](source):
        if rowno not in wanted:
            continue
        messages, effort, problem = data_mod.check_row(row)
        if problem:
            raise ToolchainError(f"{source.where(rowno)}: {problem}")
        last_user = max(i for i, m in enumerate(messages) if m["role"] == "user")
        reference = next((m.get("content") for m in reversed(messages) if m["role"] == "assistant"
                          and isinstance(m.get("content"), str) and m.get("content")), "")
        out.append({"row": rowno, "messages": messages[: last_user + 1], "reference": reference,
                    "effort": effort or default_effort})
    return out


def ask(client, model: str, messages: list[dict], *, effort: str, max_tokens: int, seed: int) -> dict:
    body = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0, "seed": seed,
            "reasoning_effort": effort}
    r = client.post("/chat/completions", json=body)
    if r.status_code != 200:
        return {"error": f"{r.status_code}: {r.text[:300]}"}
    choice = r.json()["choices"][0]
    msg = choice.get("message") or {}
    content = msg.get("content") or ""
    reasoning = msg.get("reasoning_content") or msg.get("reasoning") or ""
    control = any(t in content or t in reasoning for t in harmony.CONTROL_TOKENS)
    return {"content": content, "reasoning": reasoning, "finish_reason": choice.get("finish_reason"),
            "completion_tokens": (r.json().get("usage") or {}).get("completion_tokens"),
            "well_formed": bool(content.strip()) and choice.get("finish_reason") in ("stop", "tool_calls")
            and not control, "control_text": control}


def _summary(answers: list[dict], refs: list[str]) -> dict:
    ok = [a for a in answers if "error" not in a]
    n = len(answers)
    pairs = [(a, r) for a, r in zip(answers, refs) if "error" not in a]
    mean = lambda xs: round(statistics.fmean(xs), 4) if xs else None  # noqa: E731
    return {"prompts": n, "errors": n - len(ok),
            "well_formed": mean([float(a["well_formed"]) for a in ok] + [0.0] * (n - len(ok))),
            "exact": mean([float(normalise(a["content"]) == normalise(r)) for a, r in pairs]),
            "contains": mean([float(bool(normalise(r)) and normalise(r) in normalise(a["content"])) for a, r in pairs]),
            "token_f1": mean([token_f1(a["content"], r) for a, r in pairs]),
            "answer_chars": mean([len(a["content"]) for a in ok]),
            "reasoning_chars": mean([len(a["reasoning"]) for a in ok]),
            "completion_tokens": mean([a["completion_tokens"] for a in ok if a.get("completion_tokens") is not None])}


def _client(url: str, api_key: str | None):
    import httpx

    from gptoss.evaluation.bench import api_base, check_reachable, headers

    model = check_reachable(url, api_key)  # a clear error naming the URL when it is down or wants a key
    return httpx.Client(base_url=api_base(url), headers=headers(api_key), timeout=600), model


def run_checks(target, rows, tokenizer, *, url: str, base_url: str | None, api_key: str | None, max_tokens: int,
               seed: int, data: dict, progress: bool = True, efforts: tuple[str, ...] = EFFORTS) -> dict:
    from gptoss.progress import Stage

    default_effort = (target.info.config.get("reasoning_effort") if target.info else None) or "medium"
    items = prompts(data, default_effort=default_effort)
    refs = [p["reference"] for p in items]
    models: dict[str, Any] = {}
    samples: dict[str, list] = {}
    endpoints = [("fine-tuned", url)] + ([("base", base_url)] if base_url else [])
    for name, where in endpoints:
        client, served = _client(where, api_key)
        with client, Stage(f"answers of the {name} model", total=len(items), unit="prompts", enabled=progress) as bar:
            answers = []
            for p in items:
                answers.append(ask(client, served, p["messages"], effort=p["effort"], max_tokens=max_tokens, seed=seed))
                bar.update(1)
        models[name] = {"url": where, "model": served, **_summary(answers, refs)}
        samples[name] = [{"row": p["row"], "reference": p["reference"], **{k: a.get(k) for k in
                          ("content", "reasoning", "finish_reason", "well_formed", "error")}}
                         for p, a in zip(items, answers)][:20]
    by_effort: dict[str, Any] = {}
    client, served = _client(url, api_key)
    with client, Stage("reasoning by effort (fine-tuned)", total=len(items) * len(efforts), unit="answers",
                       enabled=progress) as bar:
        for effort in efforts:
            answers = []
            for p in items:
                answers.append(ask(client, served, p["messages"], effort=effort, max_tokens=max_tokens, seed=seed))
                bar.update(1)
            s = _summary(answers, refs)
            by_effort[effort] = {k: s[k] for k in ("reasoning_chars", "answer_chars", "completion_tokens", "well_formed")}
    return {"seed": seed, "temperature": 0, "max_tokens": max_tokens, "prompts": len(items), "models": models,
            "reasoning_by_effort": {"fine-tuned": by_effort}, "samples": samples,
            "match": "exact: equal after lower-casing and dropping punctuation; contains: the reference inside the "
                     "answer (same normalisation); token_f1: word-overlap F1 (SQuAD style)"}


def table(gen: dict):
    from rich.table import Table

    t = Table(title=f"generation checks ({gen['prompts']} prompts, temperature 0, seed {gen['seed']})")
    for col in ("model", "well-formed", "exact", "contains", "token F1", "answer chars", "reasoning chars", "errors"):
        t.add_column(col, justify="left" if col == "model" else "right")
    f = lambda x: "" if x is None else f"{x:.3g}"  # noqa: E731
    for name, m in gen["models"].items():
        t.add_row(name, f(m["well_formed"]), f(m["exact"]), f(m["contains"]), f(m["token_f1"]), f(m["answer_chars"]),
                  f(m["reasoning_chars"]), str(m["errors"]))
    for effort, m in gen.get("reasoning_by_effort", {}).get("fine-tuned", {}).items():
        t.add_row(f"fine-tuned, effort {effort}", f(m["well_formed"]), "", "", "", f(m["answer_chars"]),
                  f(m["reasoning_chars"]), "")
    return t


def plot(ax, gen: dict) -> None:
    metrics = ("well_formed", "exact", "contains", "token_f1")
    names = list(gen["models"])
    width = 0.8 / max(len(names), 1)
    for i, name in enumerate(names):
        values = [gen["models"][name][m] or 0 for m in metrics]
        ax.bar([j + i * width for j in range(len(metrics))], values, width, label=name,
               color="#888888" if name == "base" else "#2b6cd9")
    ax.set_xticks([j + width * (len(names) - 1) / 2 for j in range(len(metrics))], metrics)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("share of prompts / score")
    ax.set_title("generation: base vs fine-tuned")
    ax.legend(fontsize=8)
