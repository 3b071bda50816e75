"""`gptoss`: one command per stage. This file only wires names to stage functions."""

from __future__ import annotations

import difflib
import importlib
import inspect
import sys
from typing import Callable

import fire

from gptoss.errors import ToolchainError

# The command table: name -> "module:function" in its stage folder. README.md's "Commands" table
# lists the same names (tests/test_cli.py). Modules are imported only for the command that runs,
# so the torch-free serving image never imports the trainer.
COMMANDS = {
    "fixture": "gptoss.fixtures:fixture",
    "train": "training:train",
    "merge": "exporters.merge:merge",
    "export": "exporters.export:export",
    "modelfile": "modelfiles:write",
    "publish": "exporters.publish:publish",
    "serve": "serving:serve",
    "pipeline": "gptoss.pipeline:pipeline",
}


def resolve(name: str) -> Callable:
    module, _, attr = COMMANDS[name].partition(":")
    return getattr(importlib.import_module(module), attr)


TRUE, FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


def check_flags(name: str, fn: Callable, args: list[str]) -> list[str]:
    """``args`` as fire should see them; unknown flags and non-boolean values of booleans raise.

    fire alone runs the command with its defaults and only then complains about a flag it did not
    use, and reads `--force=false` as the (true) string "false". Booleans are passed on as
    `--FLAG=True|False`, from `--FLAG`, `--noFLAG`, `--no-FLAG`, `--FLAG=VALUE` or `--FLAG VALUE`.
    """
    params = inspect.signature(fn).parameters
    known = {p.replace("_", "-") for p in params}
    booleans = {p.replace("_", "-") for p, v in params.items()
                if isinstance(v.default, bool) or str(v.annotation) in ("bool", "bool | None", "Optional[bool]")}
    out, problems = [], []
    i = 0
    while i < len(args):
        arg = args[i]
        i += 1
        if arg == "--":
            out += args[i - 1:]
            break
        key, eq, value = arg[2:].partition("=") if arg.startswith("--") and len(arg) > 2 else ("", "", "")
        flag = key.replace("_", "-")
        if not key or flag in ("help", "helpfull"):
            out.append(arg)
        elif flag in booleans:
            if not eq and i < len(args) and args[i].lower() in TRUE + FALSE:
                value, eq = args[i], "="
                i += 1
            if eq and value.lower() not in TRUE + FALSE:
                problems.append(f"--{key}={value}: say true or false")
            out.append(f"--{flag}={not eq or value.lower() in TRUE}")
        elif flag in known:
            out.append(arg)
        elif not eq and (negated := flag[3:] if flag.startswith("no-") else flag[2:] if flag.startswith("no") else "") in booleans:
            out.append(f"--{negated}=False")
        else:
            close = difflib.get_close_matches(flag, sorted(known), n=1)
            problems.append(f"unknown flag --{key}" + (f" (did you mean --{close[0]}?)" if close else ""))
    if problems:
        raise ToolchainError(f"{'; '.join(problems)} for `gptoss {name}`; `gptoss {name} --help` lists the flags")
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    names = [argv[0]] if argv and argv[0] in COMMANDS else list(COMMANDS)
    try:
        if len(names) == 1:
            argv = [argv[0], *check_flags(argv[0], resolve(argv[0]), argv[1:])]
        fire.Fire({name: resolve(name) for name in names}, command=argv, name="gptoss")
    except ToolchainError as e:
        print(f"gptoss: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
