"""Generated token ids -> OpenAI chat output, through gptoss.harmony's incremental parser.

The final channel becomes ``content``; analysis (and commentary preambles) ``reasoning`` and
``reasoning_content`` (the same text under both names: OpenAI's and vLLM's, and the older one);
messages addressed to a tool (``to=functions.NAME``) become ``tool_calls``. Raw Harmony never
reaches the client. Stop strings from the request apply to ``content``.
"""

from __future__ import annotations

import uuid

from gptoss import harmony


def request_messages(messages: list[dict]) -> list[dict]:
    """Request messages as gptoss.harmony reads them: an assistant turn's ``reasoning`` (sent back as it
    came) is its ``reasoning_content`` unless that is given too."""
    out = []
    for m in messages:
        if isinstance(m, dict) and m.get("role") == "assistant" and m.get("reasoning") is not None \
                and m.get("reasoning_content") is None and m.get("thinking") is None:
            m = {**{k: v for k, v in m.items() if k != "reasoning"}, "reasoning_content": m["reasoning"]}
        out.append(m)
    return out


def new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


class ChatOutput:
    """Feed generated token ids; get OpenAI ``delta`` dicts; read the totals when done."""

    def __init__(self, *, stop: list[str] | None = None):
        self.parser = harmony.HarmonyParser()
        self._start_id = harmony.token_id(harmony.START)
        self._message_start = True  # the completion starts inside <|start|>assistant
        self._recipient: str | None = None
        self.stop_strings = [s for s in (stop or []) if s]
        self._held = ""  # content that could be the start of a stop string
        self.content = ""
        self.reasoning = ""
        self.tool_calls: list[dict] = []
        self.stopped_by_string = False
        self.n_tokens = 0
        self.n_reasoning_tokens = 0  # tokens that carried analysis (or preamble) text

    def feed(self, token: int) -> list[dict]:
        self.n_tokens += 1
        if token == self._start_id:
            self._message_start = True
        out: list[dict] = []
        if self.stopped_by_string:
            return out
        deltas = self.parser.feed(token)
        if token >= harmony.FIRST_SPECIAL_ID:  # a control token is never text, even where the parser calls it content
            deltas = []
        for d in deltas:
            if d.recipient and d.recipient != "assistant":
                out.append(self._tool_call_delta(d.recipient, d.text))
            elif d.channel == "final":
                text = self._content(d.text)
                if text:
                    out.append({"content": text})
            elif d.text:  # analysis, commentary preambles
                if not any("reasoning" in o for o in out):
                    self.n_reasoning_tokens += 1
                self.reasoning += d.text
                out.append({"reasoning": d.text, "reasoning_content": d.text})
            self._message_start = False
        return out

    def _tool_call_delta(self, recipient: str, text: str) -> dict:
        if self._message_start or recipient != self._recipient or not self.tool_calls:
            name = recipient.split(".", 1)[1] if recipient.startswith(harmony.FUNCTIONS_NS + ".") else recipient
            call = {"id": new_call_id(), "type": "function", "function": {"name": name, "arguments": text}}
            self.tool_calls.append(call)
            self._recipient = recipient
            return {"tool_calls": [{"index": len(self.tool_calls) - 1, **call, "function": dict(call["function"])}]}
        self.tool_calls[-1]["function"]["arguments"] += text
        return {"tool_calls": [{"index": len(self.tool_calls) - 1, "function": {"arguments": text}}]}

    def _content(self, text: str) -> str:
        if not self.stop_strings:
            self.content += text
            return text
        buf = self._held + text
        hits = [(buf.find(s), s) for s in self.stop_strings if s in buf]
        if hits:
            emit = buf[: min(i for i, _ in hits)]
            self._held = ""
            self.stopped_by_string = True
        else:
            keep = 0
            for s in self.stop_strings:
                for k in range(min(len(s) - 1, len(buf)), 0, -1):
                    if s.startswith(buf[-k:]):
                        keep = max(keep, k)
                        break
            emit, self._held = buf[: len(buf) - keep], buf[len(buf) - keep:]
        self.content += emit
        return emit

    def flush(self) -> list[dict]:
        """Content held back for a stop string that never came."""
        text, self._held = self._held, ""
        self.content += text
        return [{"content": text}] if text else []

    def finish_reason(self, engine_reason: str | None) -> str:
        if self.stopped_by_string:
            return "stop"
        result = self.parser.finish()
        if result.stop == harmony.CALL or (self.tool_calls and engine_reason == "stop"):
            return "tool_calls"
        return "length" if engine_reason == "length" else "stop"


def merge_deltas(deltas: list[dict]) -> list[dict]:
    """ChatOutput.feed's deltas of several tokens with adjacent ones of one kind joined (content with
    content, reasoning with reasoning, a tool call's argument pieces with that call): the same text in
    fewer stream events."""
    out: list[dict] = []
    for d in deltas:
        last = out[-1] if out else None
        if last is not None and d.keys() == last.keys():
            if d.keys() == {"content"}:
                last["content"] += d["content"]
                continue
            if d.keys() == {"reasoning", "reasoning_content"}:
                last["reasoning"] += d["reasoning"]
                last["reasoning_content"] += d["reasoning_content"]
                continue
            if d.keys() == {"tool_calls"} and len(d["tool_calls"]) == len(last["tool_calls"]) == 1:
                new, prev = d["tool_calls"][0], last["tool_calls"][-1]
                if new.get("index") == prev.get("index") and new.keys() == {"index", "function"} \
                        and new["function"].keys() == {"arguments"}:
                    prev["function"]["arguments"] = (prev["function"].get("arguments") or "") + new["function"]["arguments"]
                    continue
        out.append(d)  # ChatOutput.feed makes fresh dicts: merging into them changes nothing it keeps
    return out
