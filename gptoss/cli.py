"""`gptoss`: one command per stage. This file only wires names to stage functions."""

from __future__ import annotations

import sys

import fire

from gptoss.errors import ToolchainError
from gptoss.fixtures import fixture
from exporters.export import export
from exporters.merge import merge

# The command table; README.md's "Commands" section lists the same names (tests/test_cli.py).
COMMANDS = {
    "fixture": fixture,
    "merge": merge,
    "export": export,
}


def main(argv: list[str] | None = None) -> int:
    try:
        fire.Fire(COMMANDS, command=argv, name="gptoss")
    except ToolchainError as e:
        print(f"gptoss: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
