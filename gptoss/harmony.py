"""The one Harmony module: render chat conversations for gpt-oss and parse what it generates.

Rendering turns OpenAI-style chat messages (what users, datasets and API clients speak) into an
openai-harmony ``Conversation`` and lets openai-harmony, the reference, make the tokens. Parsing
feeds generated tokens one at a time to openai-harmony's ``StreamableParser``; where the reference
would raise on truncated or garbled output we record what went wrong, keep what was complete and
resynchronise at the next ``<|start|>``, so a caller never sees an exception.

Training (chat template), serving (prompts and responses) and the Modelfile tests go through here.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

from gptoss import vocab
from gptoss.errors import ToolchainError

# Protocol strings: the Harmony formatting tokens.
START = "<|start|>"
END = "<|end|>"
MESSAGE = "<|message|>"
CHANNEL = "<|channel|>"
CONSTRAIN = "<|constrain|>"
RETURN = "<|return|>"
CALL = "<|call|>"
ENDOFTEXT = "<|endoftext|>"
STARTOFTEXT = "<|startoftext|>"
CONTROL_TOKENS = (START, END, MESSAGE, CHANNEL, CONSTRAIN, RETURN, CALL, ENDOFTEXT, STARTOFTEXT)
# A completion ends at <|return|> (answer done) or <|call|> (tool call), never at <|end|>.
STOP_TOKENS = (RETURN, CALL)
CHANNELS = ("analysis", "commentary", "final")
REASONING_EFFORTS = ("low", "medium", "high")
DEFAULT_IDENTITY = "You are ChatGPT, a large language model trained by OpenAI."
DEFAULT_KNOWLEDGE_CUTOFF = "2024-06"
FUNCTIONS_NS = "functions"
FIRST_SPECIAL_ID = vocab.N_BPE_TOKENS  # 199998
LAST_SPECIAL_ID = vocab.VOCAB_SIZE - 1  # 201087

ReasoningEffort = Literal["low", "medium", "high"]


class HarmonyInputError(ToolchainError, ValueError):
    """A conversation that cannot be rendered; the message names the message index and field."""


@functools.lru_cache(maxsize=None)
def encoding():
    """openai-harmony's gpt-oss encoding, loaded offline from the verified vocabulary."""
    vocab.tiktoken_dir()  # sets TIKTOKEN_ENCODINGS_BASE
    import openai_harmony as oh

    return oh.load_harmony_encoding(oh.HarmonyEncodingName.HARMONY_GPT_OSS)


@functools.lru_cache(maxsize=None)
def special_tokens() -> dict[int, str]:
    """Harmony special tokens by id, 199998..201087, named exactly as openai-harmony names them."""
    enc = encoding()
    out = {}
    for text in enc.special_tokens_set:
        (token_id,) = enc.encode(text, allowed_special="all")
        if FIRST_SPECIAL_ID <= token_id <= LAST_SPECIAL_ID:
            out[token_id] = text
    return dict(sorted(out.items()))


def token_id(text: str) -> int:
    (tid,) = encoding().encode(text, allowed_special="all")
    return tid


def stop_token_ids() -> list[int]:
    return [token_id(t) for t in STOP_TOKENS]


# ---------------------------------------------------------------------------------------------
# Rendering


@dataclasses.dataclass(frozen=True)
class SystemOptions:
    """What goes into the Harmony system message."""

    reasoning_effort: ReasoningEffort = "medium"
    current_date: str | None = None  # "YYYY-MM-DD"; omitted from the prompt when None
    knowledge_cutoff: str = DEFAULT_KNOWLEDGE_CUTOFF
    model_identity: str = DEFAULT_IDENTITY

    def __post_init__(self):
        if self.reasoning_effort not in REASONING_EFFORTS:
            raise HarmonyInputError(
                f"reasoning_effort must be one of {', '.join(REASONING_EFFORTS)}, got {self.reasoning_effort!r}"
            )


def _text(content: Any, where: str) -> str:
    """OpenAI content: a string, None, or a list of {"type": "text", "text": ...} parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for i, part in enumerate(content):
            if isinstance(part, Mapping) and part.get("type") == "text" and isinstance(part.get("text"), str):
                parts.append(part["text"])
            else:
                raise HarmonyInputError(f"{where}.content[{i}]: only text parts are supported, got {part!r:.80}")
        return "".join(parts)
    raise HarmonyInputError(f"{where}.content must be a string or a list of text parts, got {type(content).__name__}")


def _check_no_control_tokens(text: str, where: str) -> None:
    for tok in CONTROL_TOKENS:
        if tok in text:
            raise HarmonyInputError(f"{where} contains the Harmony control token {tok}; remove it")


def tool_descriptions(tools: Sequence[Mapping[str, Any]] | None) -> list[dict[str, Any]]:
    """Normalise OpenAI ``tools`` ({"type": "function", "function": {...}} or bare) to name/description/parameters."""
    out = []
    for i, tool in enumerate(tools or []):
        fn = tool.get("function", tool) if isinstance(tool, Mapping) else None
        if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise HarmonyInputError(f"tools[{i}]: needs a function with a non-empty string 'name'")
        params = fn.get("parameters")
        if params is not None and not isinstance(params, Mapping):
            raise HarmonyInputError(f"tools[{i}] ({fn['name']}): 'parameters' must be a JSON schema object")
        out.append({"name": fn["name"], "description": fn.get("description") or "", "parameters": params})
    return out


def _tool_call_arguments(call: Mapping[str, Any], where: str) -> tuple[str, str]:
    if not isinstance(call, Mapping):
        raise HarmonyInputError(f"{where}: a tool call must be an object with 'function', got {type(call).__name__}")
    if call.get("id") is not None and not isinstance(call["id"], str):
        raise HarmonyInputError(f"{where}.id: must be a string, got {type(call['id']).__name__}")
    fn = call.get("function", call)
    name = fn.get("name") if isinstance(fn, Mapping) else None
    if not isinstance(name, str) or not name:
        raise HarmonyInputError(f"{where}: a tool call needs function.name")
    args = fn.get("arguments", "{}")
    if not isinstance(args, str):
        args = json.dumps(args, ensure_ascii=False)
    return name, args


def to_conversation(
    messages: Sequence[Mapping[str, Any]],
    *,
    tools: Sequence[Mapping[str, Any]] | None = None,
    options: SystemOptions | None = None,
):
    """OpenAI-style chat messages -> openai-harmony Conversation.

    system/developer messages become the developer message's instructions (the Harmony system
    message is ours: identity, cutoff, date, reasoning, channels); an assistant message's
    ``reasoning_content`` (or ``thinking``) is its analysis, ``content`` its final answer and
    ``tool_calls`` commentary messages to ``functions.NAME``; ``tool`` messages are results.

    History rule: analysis belongs to its turn. Analysis of earlier turns (assistant messages
    before the last user message) is dropped; analysis of the current turn (e.g. before a tool
    call, or the answer being trained on) is kept. openai-harmony 0.0.8 drops only the analysis
    before the *first* final answer (openai/harmony PR #96), so we drop here and render with its
    auto-drop off; tests/test_harmony_conformance.py lists where the two differ.
    """
    import openai_harmony as oh

    options = options or SystemOptions()
    system = (
        oh.SystemContent.new()
        .with_model_identity(options.model_identity)
        .with_knowledge_cutoff(options.knowledge_cutoff)
        .with_reasoning_effort(oh.ReasoningEffort(options.reasoning_effort.capitalize()))
    )
    if options.current_date:
        system = system.with_conversation_start_date(options.current_date)
    out = [oh.Message.from_role_and_content(oh.Role.SYSTEM, system)]

    instructions = []
    body: list = []
    last_user = max((i for i, m in enumerate(messages) if isinstance(m, Mapping) and m.get("role") == "user"), default=-1)
    call_names: dict[str, str] = {}
    last_call_name: str | None = None
    for i, msg in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(msg, Mapping):
            raise HarmonyInputError(f"{where}: expected an object with 'role', got {type(msg).__name__}")
        role = msg.get("role")
        if role in ("system", "developer"):
            text = _text(msg.get("content"), where)
            _check_no_control_tokens(text, f"{where}.content")
            instructions.append(text)
        elif role == "user":
            body.append(oh.Message.from_role_and_content(oh.Role.USER, _text(msg.get("content"), where)))
        elif role == "assistant":
            thinking = msg.get("reasoning_content", msg.get("thinking"))
            content = _text(msg.get("content"), where)
            if msg.get("tool_calls") and content:
                # As OpenAI's gpt-oss chat template: text beside a tool call is the analysis before it.
                if thinking:
                    raise HarmonyInputError(
                        f"{where}: an assistant message with tool_calls has both content and reasoning_content/thinking; "
                        "put the analysis before the call in one of them"
                    )
                thinking, content = content, ""
            if thinking and i > last_user:
                body.append(oh.Message.from_role_and_content(oh.Role.ASSISTANT, _text(thinking, where)).with_channel("analysis"))
            if not isinstance(msg.get("tool_calls") or [], list):
                raise HarmonyInputError(f"{where}.tool_calls: must be a list of tool calls, got {type(msg['tool_calls']).__name__}")
            for j, call in enumerate(msg.get("tool_calls") or []):
                name, args = _tool_call_arguments(call, f"{where}.tool_calls[{j}]")
                if call.get("id"):
                    call_names[call["id"]] = name
                last_call_name = name
                body.append(
                    oh.Message.from_role_and_content(oh.Role.ASSISTANT, args)
                    .with_channel("commentary")
                    .with_recipient(f"{FUNCTIONS_NS}.{name}")
                    .with_content_type("json")
                )
            if content or not (thinking or msg.get("tool_calls")):
                body.append(oh.Message.from_role_and_content(oh.Role.ASSISTANT, content).with_channel("final"))
        elif role == "tool":
            for key in ("tool_call_id", "name"):
                if msg.get(key) is not None and not isinstance(msg[key], str):
                    raise HarmonyInputError(f"{where}.{key}: must be a string, got {type(msg[key]).__name__}")
            name = msg.get("name") or call_names.get(msg.get("tool_call_id") or "") or last_call_name
            if not name:
                raise HarmonyInputError(f"{where}: tool result with no 'name' and no earlier tool call to answer")
            author = oh.Author.new(oh.Role.TOOL, f"{FUNCTIONS_NS}.{name}")
            body.append(
                oh.Message.from_author_and_content(author, _text(msg.get("content"), where))
                .with_channel("commentary")
                .with_recipient("assistant")
            )
        else:
            raise HarmonyInputError(
                f"{where}.role must be one of system, developer, user, assistant, tool; got {role!r}"
            )

    described = tool_descriptions(tools)
    if instructions or described:
        dev = oh.DeveloperContent.new()
        if instructions:
            dev = dev.with_instructions("\n\n".join(instructions))
        if described:
            dev = dev.with_function_tools(
                [oh.ToolDescription.new(t["name"], t["description"], parameters=t["parameters"]) for t in described]
            )
        out.append(oh.Message.from_role_and_content(oh.Role.DEVELOPER, dev))
    return oh.Conversation.from_messages(out + body)


def _render(messages, tools, options, *, for_training: bool) -> list[int]:
    import openai_harmony as oh

    conv = to_conversation(messages, tools=tools, options=options)
    config = oh.RenderConversationConfig(auto_drop_analysis=False)  # to_conversation applied the history rule
    try:
        if for_training:
            return encoding().render_conversation_for_training(conv, config)
        return encoding().render_conversation_for_completion(conv, oh.Role.ASSISTANT, config)
    except oh.HarmonyError as e:
        raise HarmonyInputError(f"openai-harmony could not render the conversation: {e}") from e


def render_prompt(
    messages: Sequence[Mapping[str, Any]],
    *,
    tools: Sequence[Mapping[str, Any]] | None = None,
    options: SystemOptions | None = None,
) -> list[int]:
    """Token ids of the conversation followed by ``<|start|>assistant``, ready for completion."""
    return _render(messages, tools, options, for_training=False)


def render_training(
    messages: Sequence[Mapping[str, Any]],
    *,
    tools: Sequence[Mapping[str, Any]] | None = None,
    options: SystemOptions | None = None,
) -> list[int]:
    """Token ids of a whole conversation for training: a closing final answer ends in ``<|return|>``."""
    return _render(messages, tools, options, for_training=True)


def render_prompt_text(messages, *, tools=None, options: SystemOptions | None = None) -> str:
    return encoding().decode_utf8(render_prompt(messages, tools=tools, options=options))


# ---------------------------------------------------------------------------------------------
# Parsing


@dataclasses.dataclass
class ParsedMessage:
    channel: str | None
    content: str
    recipient: str | None = None
    content_type: str | None = None
    role: str = "assistant"
    complete: bool = True  # False: cut off before its end token


@dataclasses.dataclass
class Delta:
    """New text from one token, and where it belongs."""

    channel: str | None
    recipient: str | None
    text: str


@dataclasses.dataclass
class ToolCall:
    name: str
    arguments: str


@dataclasses.dataclass
class ParseResult:
    messages: list[ParsedMessage]
    errors: list[str]  # what could not be parsed, with token positions
    unparsed_tokens: list[int]
    stop: str | None  # "<|return|>" / "<|call|>" when the model stopped itself

    @property
    def final(self) -> str:
        return "".join(m.content for m in self.messages if m.channel == "final" and not m.recipient)

    @property
    def reasoning(self) -> str:
        return "".join(m.content for m in self.messages if m.channel == "analysis" and not m.recipient)

    @property
    def commentary(self) -> str:
        return "".join(m.content for m in self.messages if m.channel == "commentary" and not m.recipient)

    @property
    def tool_calls(self) -> list[ToolCall]:
        prefix = FUNCTIONS_NS + "."
        return [
            ToolCall(m.recipient[len(prefix):], m.content)
            for m in self.messages
            if m.recipient and m.recipient.startswith(prefix) and m.complete
        ]


# openai-harmony raises HarmonyError/ValueError, or pyo3's PanicException, which derives from
# BaseException; interrupts must still get through.
_PARSER_FAILURES = BaseException
_NOT_OURS = (KeyboardInterrupt, SystemExit, GeneratorExit)


def _role_name(role) -> str:
    return getattr(role, "value", str(role))


class HarmonyParser:
    """Incremental, never-raising parser for an assistant completion (tokens after ``<|start|>assistant``).

    ``feed(token)`` returns the deltas that token produced; ``finish()`` returns everything parsed,
    the errors met and the tokens that could not be placed in any message.
    """

    def __init__(self, *, role: str | None = "assistant"):
        import openai_harmony as oh

        self._oh = oh
        self._enc = encoding()
        self._start_id = token_id(START)
        self._stop_ids = {token_id(RETURN): RETURN, token_id(CALL): CALL}
        self._role = oh.Role(role) if role else None
        self._parser = self._new_parser(self._role)
        self._done: list[ParsedMessage] = []
        self.errors: list[str] = []
        self.unparsed: list[int] = []
        self._resync = False  # skipping to the next <|start|> after an error
        self._seen = 0  # messages already collected from the current parser
        self._pos = 0
        self._pending: list[int] = []  # tokens fed since the last complete message
        self.stop: str | None = None

    def _new_parser(self, role):
        return self._oh.StreamableParser(self._enc, role)

    def _collect(self) -> None:
        msgs = self._parser.messages
        if len(msgs) > self._seen:
            self._pending = []
        for m in msgs[self._seen:]:
            text = "".join(getattr(c, "text", "") for c in m.content)
            self._done.append(
                ParsedMessage(
                    channel=m.channel,
                    content=text,
                    recipient=m.recipient,
                    content_type=m.content_type,
                    role=_role_name(m.author.role),
                )
            )
        self._seen = len(msgs)

    def _partial(self) -> ParsedMessage | None:
        try:
            text = self._parser.current_content
            channel = self._parser.current_channel
            recipient = self._parser.current_recipient
            role = self._parser.current_role
        except _PARSER_FAILURES as e:  # the reference may refuse to describe a broken state
            if isinstance(e, _NOT_OURS):
                raise
            return None
        if not text and channel is None:
            return None
        return ParsedMessage(channel=channel, content=text or "", recipient=recipient, role=_role_name(role) if role else "assistant", complete=False)

    def _give_up(self, error: str) -> None:
        """Keep what the current parser completed, and its partial message if it has text."""
        partial = self._partial()
        self._collect()
        if partial is not None and partial.content:
            self._done.append(partial)
        else:
            self.unparsed.extend(self._pending)
        self._pending = []
        self.errors.append(error)

    def feed(self, token: int) -> list[Delta]:
        pos, self._pos = self._pos, self._pos + 1
        if self._resync:
            if token != self._start_id:
                self.unparsed.append(token)
                return []
            self._resync = False
            self._parser = self._new_parser(None)
            self._seen = 0
        self._pending.append(token)
        n_done = len(self._done)
        try:
            self._parser.process(token)
        except _PARSER_FAILURES as e:
            if isinstance(e, _NOT_OURS):
                raise
            self._give_up(f"token {pos} (id {token}): {e}")
            self._resync = True
            return []
        self._collect()
        if token in self._stop_ids and len(self._done) > n_done:
            self.stop = self._stop_ids[token]
        delta = self._parser.last_content_delta
        if not delta:
            return []
        return [Delta(channel=self._parser.current_channel, recipient=self._parser.current_recipient, text=delta)]

    def finish(self) -> ParseResult:
        if not self._resync:
            try:
                self._parser.process_eos()
                self._collect()
            except _PARSER_FAILURES as e:
                if isinstance(e, _NOT_OURS):
                    raise
                self._give_up(f"end of output inside a message: {e}")
        return ParseResult(messages=self._done, errors=self.errors, unparsed_tokens=self.unparsed, stop=self.stop)


def parse_completion(tokens: Iterable[int], *, role: str | None = "assistant") -> ParseResult:
    """Parse a whole completion; never raises (see ``ParseResult.errors``)."""
    parser = HarmonyParser(role=role)
    for t in tokens:
        parser.feed(int(t))
    return parser.finish()
