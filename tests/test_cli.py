"""The CLI only wires: its table matches the README, and --help documents every flag."""

import inspect
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Literal

import pytest

from gptoss.cli import COMMANDS, EXAMPLES, check_flags, command_help, example, main, params, resolve
from gptoss.errors import ToolchainError

README = Path(__file__).resolve().parent.parent / "README.md"


def test_command_table_matches_readme():
    documented = re.findall(r"^\| `gptoss (\w+)` \|", README.read_text(), flags=re.M)
    assert sorted(documented) == sorted(COMMANDS)


def test_commands_live_in_stage_folders():
    stage_modules = ("gptoss.fixtures", "gptoss.pipeline", "gptoss.training", "gptoss.exporters", "gptoss.modelfiles",
                     "gptoss.publishing", "gptoss.serving", "gptoss.hfcache", "gptoss.llamacpp", "gptoss.chat",
                     "gptoss.evaluation")
    for name in COMMANDS:
        fn = resolve(name)
        assert fn.__module__.startswith(stage_modules), f"{name} -> {fn.__module__}"


def _help(*args, flag="--help"):
    """What `gptoss ARGS --help` prints, as a user's shell runs it (no terminal: 100 columns)."""
    proc = subprocess.run([sys.executable, "-m", "gptoss", *args, flag], capture_output=True, text=True,
                          timeout=120, env={"PAGER": "cat", "PATH": "/usr/bin:/bin", "COLUMNS": "100"})
    assert proc.returncode == 0, proc.stderr
    return proc.stdout + proc.stderr


def _summary(fn) -> str:
    return " ".join((inspect.getdoc(fn) or "").split("\n\n")[0].split())


def test_top_level_help_lists_every_command_with_its_summary():
    text = _help()
    assert text == _help(flag="-h")
    assert "INFO:" not in text and "Showing help" not in text
    flat = " ".join(text.split())
    for name in COMMANDS:
        assert re.search(rf"^  {name} ", text, flags=re.M), f"{name} missing from gptoss --help"
        assert f"{name} {_summary(resolve(name))}" in flat, f"{name}: its docstring's first line is not beside it"


# Signs of fire's own help, or of a type printed as Python writes it.
NOT_PLAIN = re.compile(r"INFO:|Showing help|Optional\[|Literal\[|Union\[|NoneType|<class|'str|'int|\| None")


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_command_has_finished_help(name):
    """For every command of the table: no fire banner, plain types, the list of choices, every flag
    with hyphens, -h is help, an Args: entry per parameter, an example that runs, underscores still
    accepted, and a missing required argument named with that example."""
    fn = resolve(name)
    text = _help(name)
    assert text == _help(name, flag="-h")
    assert not NOT_PLAIN.search(text), NOT_PLAIN.search(text)
    assert not re.findall(r"--\w+_[\w-]*", text), "flags are shown with hyphens"
    assert text.startswith(f"Usage: gptoss {name}")
    doc = inspect.getdoc(fn) or ""
    plist = params(fn)[0]
    for p in plist:
        assert re.search(rf"^\s+{p.name}:", doc, flags=re.M), f"{name}: {p.name} has no Args: entry in the docstring"
        shown = p.metavar if p.positional else p.flag
        assert re.search(rf"^  {re.escape(shown)}[ ,\n]", text, flags=re.M), f"{name}: {shown} missing from --help"
        if p.choices:
            assert "{" + ",".join(map(str, p.choices)) + "}" in text, f"{name}: {p.name}'s choices not listed"
    ex = example(name, fn)
    assert f"Example:\n  {ex}" in text
    ex_args = shlex.split(ex)[2:]
    check_flags(name, fn, ex_args)  # complete and every flag known
    for p in plist:
        if "_" in p.name and p.name not in ex:
            value = [] if p.kind == "bool" else [str(p.choices[0]) if p.choices else "1"]
            check_flags(name, fn, [*ex_args, f"--{p.name}", *value])  # underscores are accepted
    required = [p for p in plist if p.required]
    if required:
        with pytest.raises(ToolchainError) as e:
            check_flags(name, fn, [])
        message = str(e.value)
        for p in required:
            assert p.flag in message, message
        assert f"e.g. `{ex}`" in message


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_a_mistyped_command_gets_did_you_mean(name, capsys):
    for typo in (name[:-1], name[1] + name[0] + name[2:]):
        assert main([typo, "--help"]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"gptoss: error: unknown command {typo!r} (did you mean {name}?)"), err
        assert "Cannot find key" not in err


def test_a_flag_before_the_command_names_the_command_that_takes_it(capsys):
    assert main(["--demo"]) == 2
    assert "did you mean `gptoss pipeline --demo`?" in capsys.readouterr().err


def cache(action: Literal["check", "import"], path: str | None = None, *, cache_dir: str | None = None,
          jobs: int = 2, force: bool = False) -> str:
    """Check or import the tools cache (a dispatcher as the CLI may get one; not a real command).

    Args:
        action: check (report what is built) or import (copy a built tree in).
        path: the tree to import.
        cache_dir: where the cache lives.
        jobs: parallel build jobs.
        force: replace what is there.
    """
    return f"{action} {path} {cache_dir} {jobs} {force}"


def test_a_dispatcher_with_a_positional_action(monkeypatch, capsys):
    """A command whose first positional argument picks a sub-command: choices in usage and help,
    a misspelt action gets did-you-mean, a second positional fills the next parameter, and fire runs it."""
    monkeypatch.setitem(COMMANDS, "cache", f"{__name__}:cache")
    text = command_help("cache", cache)
    assert text.startswith("Usage: gptoss cache {check,import} [PATH] [flags]\n")
    assert re.search(r"^  \{check,import\} +check \(report what is built\)", text, flags=re.M)
    assert re.search(r"^  --cache-dir CACHE_DIR +where the cache lives", text, flags=re.M)
    assert re.search(r"^  --jobs INT +parallel build jobs\. Default: 2\.", text, flags=re.M)
    assert "Example:\n  gptoss cache check\n" in text + "\n"
    with pytest.raises(ToolchainError, match=r"^ACTION 'chek': not one of check, import \(did you mean check\?\)"):
        check_flags("cache", cache, ["chek"])
    with pytest.raises(ToolchainError,
                       match=r"missing ACTION \(or --action\) for `gptoss cache`; e\.g\. `gptoss cache check`"):
        check_flags("cache", cache, ["--jobs", "3"])
    with pytest.raises(ToolchainError, match="unexpected argument c"):
        check_flags("cache", cache, ["import", "a/b", "c"])
    assert main(["cache", "import", "a/b", "--cache_dir", "x", "--jobs", "3", "--no-force"]) == 0
    assert capsys.readouterr().out == "import a/b x 3 False\n"
    assert main(["cache", "-h"]) == 0 and capsys.readouterr().out.startswith("Usage: gptoss cache {check,import}")


def test_a_missing_required_flag_is_named_with_an_example(capsys):
    assert main(["serve"]) == 2
    err = capsys.readouterr().err
    assert err == ("gptoss: error: missing --model for `gptoss serve`; "
                   f"e.g. `{EXAMPLES['serve']}`; `gptoss serve --help` lists the flags\n")


def test_a_value_not_among_the_choices_is_refused_before_the_command_runs(capsys):
    assert main(["serve", "--backend", "llama", "--model", "x.gguf"]) == 2
    assert ("--backend 'llama': not one of llamacpp, transformers (did you mean llamacpp?)"
            in capsys.readouterr().err)


def test_one_letter_flags_are_not_fires_abbreviations(capsys):
    """fire alone reads `-h` on serve as --host and `-b` as --backend; here -h is help, others are refused."""
    assert main(["serve", "-b", "llamacpp", "--model", "x.gguf"]) == 2
    assert capsys.readouterr().err.startswith("gptoss: error: unknown flag -b (did you mean --backend?) for")


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


def _shell_blocks(text: str) -> list[str]:
    """The bodies of the ```bash / ```sh / plain fenced blocks of a Markdown text."""
    blocks, lang, body = [], None, []
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            if lang is None:
                lang, body = line.strip()[3:].strip(), []
            else:
                if lang in ("bash", "sh", ""):
                    blocks.append("\n".join(body))
                lang = None
        elif lang is not None:
            body.append(line)
    return blocks


def test_documented_commands_use_flags_that_exist():
    """Every `gptoss CMD ...` line in the READMEs passes the check the CLI runs first: known flags,
    valid choices, nothing required left out."""
    root = README.parent
    checked = 0
    for doc in (README, root / "docker" / "README.md", root / "docs" / "BENCHMARKS.md"):
        for block in _shell_blocks(doc.read_text()):
            for line in block.replace("\\\n", " ").splitlines():
                m = re.search(r"\bgptoss (\w+)(.*)", line)
                if not m or m.group(1) not in COMMANDS:
                    continue
                rest = re.split(r"\s(?:#|\||&&|>)", m.group(2))[0]  # a comment, pipe or redirection ends it
                check_flags(m.group(1), resolve(m.group(1)), shlex.split(rest))
                checked += 1
    assert checked >= 20
