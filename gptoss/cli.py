"""`gptoss`: one command per stage. This file only wires names to stage functions."""

from __future__ import annotations

import importlib
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


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    names = [argv[0]] if argv and argv[0] in COMMANDS else list(COMMANDS)
    try:
        fire.Fire({name: resolve(name) for name in names}, command=argv, name="gptoss")
    except ToolchainError as e:
        print(f"gptoss: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
