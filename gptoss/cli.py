"""`gptoss`: one command per stage. This file only wires names to stage functions.

fire runs the commands; the flags are checked first and the help is written here, both from each
function's signature and the Args: section of its docstring, so any command in COMMANDS (a
dispatcher with a first positional Literal argument too) gets the same treatment.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import re
import shutil
import sys
import textwrap
import types
import typing
from dataclasses import dataclass
from typing import Any, Callable, Literal

import fire
import fire.docstrings

from gptoss.choices import choice_problem, literal_choices
from gptoss.errors import ToolchainError

# The command table: name -> "module:function" in its stage folder. README.md's "Commands" table
# lists the same names (tests/test_cli.py). Modules are imported only for the command that runs,
# so the torch-free serving image never imports the trainer.
COMMANDS = {
    "fixture": "gptoss.fixtures:fixture",
    "train": "gptoss.training:train",
    "merge": "gptoss.exporters.merge:merge",
    "export": "gptoss.exporters.export:export",
    "modelfile": "gptoss.modelfiles:write",
    "publish": "gptoss.publishing:publish",
    "serve": "gptoss.serving:serve",
    "pipeline": "gptoss.pipeline:pipeline",
    "cache": "gptoss.hfcache:cache",
    "build": "gptoss.llamacpp:build",
    "chat": "gptoss.chat:chat",
    "ui": "gptoss.chat:ui",
    "eval": "gptoss.evaluation.eval:evaluate",
    "bench": "gptoss.evaluation.bench:bench",
}

# One example per command, shown in its help and in the error for a missing argument (each passes
# check_flags: tests/test_cli.py). A command without one gets an example built from its signature.
EXAMPLES = {
    "fixture": "gptoss fixture tiny --out models/tiny",
    "train": "gptoss train --profile quick_test --dataset my_chats.jsonl",
    "merge": "gptoss merge --run models/my-run",
    "export": "gptoss export --run models/my-run --quants q4_k_m,q5_k_m",
    "modelfile": "gptoss modelfile --gguf exports/my-run/gguf/my-run-Q4_K_M.gguf",
    "publish": "gptoss publish --run exports/my-run --repo-id ORG/NAME-GGUF --what gguf",
    "serve": "gptoss serve --backend llamacpp --model exports/my-run --quant q4_k_m",
    "pipeline": "gptoss pipeline --demo --work demo",
    "chat": 'gptoss chat "What is the capital of France?" --reasoning low',
    "ui": "gptoss ui --url http://127.0.0.1:8000/v1",
    "eval": "gptoss eval --run models/my-run",
    "bench": "gptoss bench --url http://127.0.0.1:8000/v1 --concurrency 1,2,4,8,16",
}

SUMMARY = "Fine-tune, merge, export, serve and publish gpt-oss-20b."
HELP = ("-h", "--help", "--helpfull")


def resolve(name: str) -> Callable:
    module, _, attr = COMMANDS[name].partition(":")
    return getattr(importlib.import_module(module), attr)


@dataclass
class Param:
    """One argument of a command as the user sees it."""

    name: str  # the Python name
    positional: bool  # may be given by position (or as --flag)
    required: bool
    default: Any
    kind: Literal["bool", "value", "optional-value"]  # optional-value: a bare --flag means True
    choices: tuple | None
    metavar: str
    help: str

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def label(self) -> str:
        """How the argument is written in usage lines and errors."""
        if self.positional:
            return self.metavar
        return self.flag if self.kind == "bool" else f"{self.flag} {self.metavar}"


def _type_hints(fn: Callable) -> dict:
    try:
        return typing.get_type_hints(fn)
    except Exception:  # an annotation this interpreter cannot evaluate: fall back to the defaults
        return {}


def _split_hint(hint: Any) -> list:
    """The members of a Union (None dropped), or [hint]."""
    if typing.get_origin(hint) in (typing.Union, getattr(types, "UnionType", typing.Union)):
        return [a for a in typing.get_args(hint) if a is not type(None)]
    return [hint]


def params(fn: Callable) -> tuple[list[Param], bool, bool]:
    """The command's arguments in signature order, whether it takes *args, whether it takes **kwargs."""
    hints = _type_hints(fn)
    docs = {a.name: " ".join((a.description or "").split())
            for a in fire.docstrings.parse(inspect.getdoc(fn) or "").args or []}
    out, var_args, var_kwargs = [], False, False
    for p in inspect.signature(fn).parameters.values():
        if p.kind is p.VAR_POSITIONAL:
            var_args = True
            continue
        if p.kind is p.VAR_KEYWORD:
            var_kwargs = True
            continue
        members = _split_hint(hints.get(p.name, Any))
        choices = literal_choices(hints.get(p.name))
        if members == [bool] or (p.name not in hints and isinstance(p.default, bool)):
            kind, metavar = "bool", ""
        elif choices:
            kind, metavar = "value", "{" + ",".join(map(str, choices)) + "}"
        else:
            kind = "optional-value" if bool in members else "value"
            metavar = {int: "INT", float: "FLOAT"}.get(members[0], p.name.upper()) if len(members) == 1 \
                else p.name.upper()
        out.append(Param(name=p.name, positional=p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD),
                         required=p.default is p.empty, default=p.default, kind=kind, choices=choices,
                         metavar=metavar, help=docs.get(p.name, "")))
    return out, var_args, var_kwargs


TRUE, FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


def _is_flag(arg: str) -> bool:
    """As fire reads it: `--x` or `-x` (a negative number is a value)."""
    return arg.startswith("--") or re.match(r"^-[a-zA-Z]", arg) is not None


def _choice_problem(p: Param, value: str) -> str | None:
    return choice_problem(p.name.upper() if p.positional else p.flag, value, p.choices) if p.choices else None


def example(name: str, fn: Callable) -> str:
    """A command line that runs ``name``: EXAMPLES, or its required arguments with placeholder values."""
    if name in EXAMPLES:
        return EXAMPLES[name]
    words = [f"gptoss {name}"]
    for p in params(fn)[0]:
        if p.required:
            value = str(p.choices[0]) if p.choices else p.metavar
            words.append(value if p.positional else (p.flag if p.kind == "bool" else f"{p.flag} {value}"))
    return " ".join(words)


def check_flags(name: str, fn: Callable, args: list[str]) -> list[str]:
    """``args`` as fire should see them; every problem (unknown flag, missing argument, a value that is
    not one of the choices, a non-boolean value of a boolean) is raised at once, before anything runs.

    fire alone runs the command with its defaults and only then complains about a flag it did not
    use, and reads `--force=false` as the (true) string "false". Booleans are passed on as
    `--FLAG=True|False`, from `--FLAG`, `--noFLAG`, `--no-FLAG`, `--FLAG=VALUE` or `--FLAG VALUE`.
    Flags are accepted with hyphens or underscores.
    """
    plist, var_args, var_kwargs = params(fn)
    by_flag = {p.flag[2:]: p for p in plist}
    out, problems, given, positionals = [], [], set(), []
    i = 0
    while i < len(args):
        arg = args[i]
        i += 1
        if arg == "--":
            out += args[i - 1:]
            break
        if not _is_flag(arg):
            positionals.append(arg)
            out.append(arg)
            continue
        if not arg.startswith("--"):  # fire's one-letter abbreviations are not offered
            close = [p.flag for p in plist if p.name.startswith(arg[1:2])]
            problems.append(f"unknown flag {arg}" + (f" (did you mean {' or '.join(close[:3])}?)" if close else ""))
            if "=" not in arg and i < len(args) and not _is_flag(args[i]):
                i += 1  # its value, not a positional argument
            continue
        key, eq, value = arg[2:].partition("=")
        flag = key.replace("_", "-")
        p = by_flag.get(flag)
        if p and p.kind == "bool":
            if not eq and i < len(args) and args[i].lower() in TRUE + FALSE:
                value, eq = args[i], "="
                i += 1
            if eq and value.lower() not in TRUE + FALSE:
                problems.append(f"--{key}={value}: say true or false")
            out.append(f"--{flag}={not eq or value.lower() in TRUE}")
            given.add(p.name)
        elif p:
            out.append(arg)
            given.add(p.name)
            if not eq and i < len(args) and not _is_flag(args[i]):
                value, eq = args[i], "="
                out.append(args[i])
                i += 1
            if eq:
                problems.append(_choice_problem(p, value))
            elif p.kind != "optional-value":
                problems.append(f"{p.flag} needs a value ({p.flag} {p.metavar})")
        elif not eq and (negated := by_flag.get(flag[3:] if flag.startswith("no-") else
                                                flag[2:] if flag.startswith("no") else "")) and negated.kind == "bool":
            out.append(f"{negated.flag}=False")
            given.add(negated.name)
        elif var_kwargs:
            out.append(arg)
        else:
            close = difflib.get_close_matches(flag, sorted(by_flag), n=1)
            problems.append(f"unknown flag --{key}" + (f" (did you mean --{close[0]}?)" if close else ""))
            if not eq and i < len(args) and not _is_flag(args[i]):
                i += 1  # its value, not a positional argument
    # fire fills the positional parameters not given as flags, in order, with the positional values
    for p in plist:
        if p.positional and p.name not in given and positionals:
            problems.append(_choice_problem(p, positionals.pop(0)))
            given.add(p.name)
    if positionals and not var_args:
        problems.append(f"unexpected argument{'s' if len(positionals) > 1 else ''} {' '.join(positionals)}")
    missing = [p for p in plist if p.required and p.name not in given]
    if missing:
        problems.append("missing " + ", ".join(f"{p.name.upper()} (or {p.flag})" if p.positional else p.flag
                                               for p in missing))
    problems = [p for p in problems if p]
    if problems:
        hint = f"; e.g. `{example(name, fn)}`" if missing else ""
        raise ToolchainError(f"{'; '.join(problems)} for `gptoss {name}`{hint}; "
                             f"`gptoss {name} --help` lists the flags")
    return out


# ---- help ------------------------------------------------------------------------------------------

def _width() -> int:
    return max(60, min(100, shutil.get_terminal_size((100, 24)).columns))


def _rows(rows: list[tuple[str, str]], width: int) -> list[str]:
    """Two columns: the term, then its text wrapped beside it (under it when the term is long)."""
    col = min(max((len(t) for t, _ in rows), default=0), 26) + 4
    lines = []
    for term, text in rows:
        wrapped = textwrap.wrap(text, width - col, break_on_hyphens=False, break_long_words=False) or [""]
        if len(term) + 4 > col:
            lines.append(f"  {term}")
        else:
            lines.append(f"  {term.ljust(col - 2)}{wrapped.pop(0)}")
        lines += [" " * col + w for w in wrapped]
    return lines


def _describe(p: Param) -> str:
    text = p.help or ""
    if p.required and not p.positional:
        text = "(required) " + text
    if p.positional:
        text += f" Also {p.flag} {p.metavar}."
    if p.kind == "bool":
        if p.default is True and "default" not in text.lower():
            text += f" On by default; {p.flag.replace('--', '--no-', 1)} turns it off."
    elif p.default not in (None, "", inspect.Parameter.empty) and "default" not in text.lower():
        text += f" Default: {p.default}."
    return text.strip()


def command_help(name: str, fn: Callable) -> str:
    width = _width()
    plist, var_args, _ = params(fn)
    doc = fire.docstrings.parse(inspect.getdoc(fn) or "")
    usage = [f"gptoss {name}"]
    usage += [p.metavar for p in plist if p.positional and p.required]
    usage += [p.label for p in plist if not p.positional and p.required]
    usage += [f"[{p.metavar}]" for p in plist if p.positional and not p.required]
    usage += ["[ARGS...]"] if var_args else []
    usage += ["[flags]"]
    lines = ["Usage: " + " ".join(usage), ""]
    for para in filter(None, [doc.summary, *(doc.description or "").split("\n\n")]):
        lines += textwrap.wrap(" ".join(para.split()), width, break_on_hyphens=False) + [""]
    positional = [(p.metavar, _describe(p)) for p in plist if p.positional]
    flags = []
    for p in sorted((p for p in plist if not p.positional), key=lambda p: not p.required):
        term = p.label
        if p.kind == "bool" and p.default is not False:
            term = f"{p.flag}, {p.flag.replace('--', '--no-', 1)}"
        elif p.kind == "optional-value":
            term = f"{p.flag} [{p.metavar}]"
        flags.append((term, _describe(p)))
    flags.append(("-h, --help", "Show this help and exit."))
    if positional:
        lines += ["Arguments:", *_rows(positional, width), ""]
    lines += ["Flags:", *_rows(flags, width), ""]
    lines += ["Example:", f"  {example(name, fn)}"]
    return "\n".join(lines)


def top_help() -> str:
    width = _width()
    rows = []
    for name in COMMANDS:
        try:
            summary = fire.docstrings.parse(inspect.getdoc(resolve(name)) or "").summary or ""
        except ImportError as e:  # an image without this stage's packages
            summary = f"(not installed here: {e})"
        rows.append((name, summary))
    return "\n".join(["Usage: gptoss COMMAND [ARGUMENTS] [flags]", "", SUMMARY, "", "Commands:",
                      *_rows(rows, width), "",
                      "`gptoss COMMAND --help` shows a command's arguments and flags (hyphens or underscores"
                      " in flag names both work)."])


def _unknown_command(word: str) -> str:
    if _is_flag(word):
        flag = word.split("=")[0].lstrip("-").replace("_", "-")
        having = []
        for name in COMMANDS:
            try:
                if flag in {p.flag[2:] for p in params(resolve(name))[0]}:
                    having.append(f"`gptoss {name} {word}`")
            except ImportError:
                pass
        return (f"a command comes before {word}" + (f" (did you mean {' or '.join(having)}?)" if having else "")
                + "; `gptoss --help` lists the commands")
    # difflib misses two swapped letters in a short name (`iu` for `ui`)
    close = difflib.get_close_matches(word, list(COMMANDS), n=1) or [
        c for c in COMMANDS if sorted(c) == sorted(word) and sum(x != y for x, y in zip(c, word)) == 2][:1]
    return (f"unknown command {word!r}" + (f" (did you mean {close[0]}?)" if close else "")
            + f"; the commands are {', '.join(COMMANDS)}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["help"]:  # `gptoss help [COMMAND]`
        argv = [*argv[1:], "--help"]
    if not argv or argv[0] in HELP:
        print(top_help())
        return 0 if argv else 2
    name = argv[0]
    try:
        if name not in COMMANDS:
            raise ToolchainError(_unknown_command(name))
        try:
            fn = resolve(name)
        except ModuleNotFoundError as e:  # an image without this stage's packages
            raise ToolchainError(f"`gptoss {name}` cannot run here: {e}") from e
        if any(a in HELP for a in argv[1:]):
            print(command_help(name, fn))
            return 0
        fire.Fire(fn, command=check_flags(name, fn, argv[1:]), name=f"gptoss {name}")
    except ToolchainError as e:
        print(f"gptoss: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
