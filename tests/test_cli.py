"""The CLI only wires: its table matches the README, and --help documents every flag."""

import inspect
import re
import subprocess
import sys
from pathlib import Path

import pytest

from gptoss.cli import COMMANDS, resolve

README = Path(__file__).resolve().parent.parent / "README.md"


def test_command_table_matches_readme():
    documented = re.findall(r"^\| `gptoss (\w+)` \|", README.read_text(), flags=re.M)
    assert sorted(documented) == sorted(COMMANDS)


def test_commands_live_in_stage_folders():
    stage_modules = ("gptoss.fixtures", "gptoss.pipeline", "training", "exporters", "modelfiles", "serving")
    for name in COMMANDS:
        fn = resolve(name)
        assert fn.__module__.startswith(stage_modules), f"{name} -> {fn.__module__}"


def _help(*args):
    proc = subprocess.run([sys.executable, "-m", "gptoss", *args, "--help"], capture_output=True, text=True,
                          timeout=120, env={"PAGER": "cat", "PATH": "/usr/bin:/bin"})
    return proc.stdout + proc.stderr


def test_top_level_help_lists_every_command():
    text = _help()
    for name in COMMANDS:
        assert name in text


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_command_help_documents_every_flag(name):
    text = _help(name)
    fn = resolve(name)
    doc = inspect.getdoc(fn) or ""
    for param in inspect.signature(fn).parameters:
        assert f"--{param}" in text or param.upper() in text, f"{name}: --{param} missing from --help"
        assert re.search(rf"^\s+{param}:", doc, flags=re.M), f"{name}: {param} has no Args: entry in the docstring"


def _readme_block_after(marker: str) -> str:
    text = README.read_text()
    start = text.index(marker)
    block = text[text.index("```bash", start) + len("```bash"): text.index("```", text.index("```bash", start) + 7)]
    return block.strip()


def test_ci_runs_the_readme_setup_and_test_commands():
    ci = (README.parent / ".ci" / "run").read_text()
    setup = _readme_block_after("Python 3.10+ with pip")
    test_cmd = _readme_block_after("Run the tests")
    assert setup in ci
    assert test_cmd in ci.splitlines()
