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


def _gptoss(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "gptoss", *args], capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).resolve().parent.parent)


def test_unknown_flag_is_refused_before_the_command_runs(tmp_path):
    """fire alone would run the command with its defaults and complain about the flag afterwards."""
    out = tmp_path / "tiny"
    proc = _gptoss("fixture", "tiny", "--out", str(out), "--seeds", "3")
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("gptoss: error: unknown flag --seeds (did you mean --seed?) for `gptoss fixture`; "
                                   "`gptoss fixture --help` lists the flags")
    assert not out.exists()
    proc = _gptoss("export", "--run", str(tmp_path / "none"), "--quant", "q4_k_m", "--no-fidelty")
    assert proc.returncode == 2 and proc.stderr.count("gptoss: error:") == 1
    assert "unknown flag --quant (did you mean --quants?); unknown flag --no-fidelty" in proc.stderr


def test_no_flag_spellings_of_a_boolean(tmp_path):
    """--no-force (argparse habit), --noforce (fire's), --force=false and --force no all mean
    force=False (fire alone reads "false" as a true string and would replace the folder)."""
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    for spelling in (["--no-force"], ["--noforce"], ["--force=false"], ["--force", "no"], ["--force=0"]):
        proc = _gptoss("fixture", "tiny", "--out", str(out), *spelling)
        assert proc.returncode == 2 and "is not empty; pass --force" in proc.stderr, (spelling, proc.stderr)
    proc = _gptoss("fixture", "tiny", "--out", str(out), "--force=maybe")
    assert proc.returncode == 2 and "--force=maybe: say true or false" in proc.stderr
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_documented_commands_use_flags_that_exist():
    """Every `gptoss CMD ...` line in the READMEs passes the flag check the CLI runs first."""
    import shlex

    from gptoss.cli import check_flags

    root = README.parent
    checked = 0
    for doc in (README, root / "docker" / "README.md", root / "docs" / "BENCHMARKS.md"):
        for block in re.findall(r"```(?:bash|sh)?\n(.*?)```", doc.read_text(), re.S):
            for line in block.replace("\\\n", " ").splitlines():
                m = re.search(r"\bgptoss (\w+)(.*)", line)
                if not m or m.group(1) not in COMMANDS:
                    continue
                rest = re.split(r"#|\||&&|>", m.group(2))[0]
                check_flags(m.group(1), resolve(m.group(1)), shlex.split(rest))
                checked += 1
    assert checked >= 20
