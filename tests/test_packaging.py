"""The installed distribution has one top-level import name, `gptoss`; every stage is `gptoss.<stage>`."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
STAGES = ("training", "exporters", "serving", "modelfiles", "publishing", "pipeline", "hfcache", "chat", "evaluation")

_NAMES = "|".join(STAGES)
CODE_IMPORT = re.compile(rf"(?:^|[;\n]|-c )\s*(?:import\s+(?:[\w.]+\s*,\s*)*(?:{_NAMES})\b(?!\.\w+\s*\()|from\s+(?:{_NAMES})[.\s])")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out),
                           str(REPO)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    (path,) = out.glob("gptoss_toolchain-*.whl")
    return path


def test_wheel_has_one_top_level_name(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/", 1)[0] for n in names if not n.split("/", 1)[0].endswith(".dist-info")}
    assert top == {"gptoss"}
    for stage in STAGES:  # each stage folder is inside the package, with its modules
        assert f"gptoss/{stage}/__init__.py" in names, stage
    assert "gptoss/publishing/plan.py" in names and "gptoss/modelfiles/reader.py" in names
    # package data the stages read through importlib.resources
    assert any(n.startswith("gptoss/training/profiles/") and n.endswith(".toml") for n in names)
    assert any(n.startswith("gptoss/templates/") and n.endswith(".jinja") for n in names)
    assert any(n.startswith("gptoss/data/") and n.endswith(".jsonl") for n in names)
    # test scaffolding stays out of the package
    assert not any("lora_fixtures" in n or n.startswith("gptoss/tests/") for n in names)


def test_installed_wheel_imports_stages_under_gptoss_only(wheel, tmp_path):
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    code = (
        "import importlib.util, gptoss\n"
        "from gptoss.training.config import profiles_dir\n"
        "from gptoss import publishing, pipeline, serving, hfcache, modelfiles, exporters\n"
        "assert gptoss.__path__ == [gptoss.__path__[0]], gptoss.__path__\n"  # no checkout searched
        "assert sorted(p.name for p in profiles_dir().glob('*.toml')), 'no training profiles'\n"
        "print([m for m in ('training', 'exporters', 'serving', 'modelfiles', 'publishing', 'pipeline', 'hfcache', 'chat')"
        " if importlib.util.find_spec(m) is not None])\n"
    )
    # cwd and PYTHONPATH away from the checkout: only the installed copy can be found
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(site), "PYTHONSAFEPATH": "1"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"  # no top-level `training`, `serving`, ... installed


def test_checkout_on_pythonpath_imports_stages_under_gptoss(tmp_path):
    """The GPU benches and test children run from a bare PYTHONPATH=<checkout>: gptoss.<stage> resolves there."""
    code = "import gptoss.publishing as p, gptoss.training as t; print(p.__file__); print(t.__file__)"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-S", "-c", f"import sys; sys.path.insert(0, {str(REPO)!r}); {code}"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [str(REPO / "publishing" / "__init__.py"), str(REPO / "training" / "__init__.py")]


def test_no_module_imports_a_stage_by_its_bare_folder_name():
    """In a checkout `import serving` still resolves (the folder is on sys.path), so only a scan catches it."""
    import ast

    bare = []
    for path in sorted(REPO.glob("*/**/*.py")):
        if path.parts[len(REPO.parts)] not in (*STAGES, "gptoss", "tests", "bench"):
            continue
        text = path.read_text(encoding="utf-8")
        for node in ast.walk(ast.parse(text)):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 else []
            bare += [f"{path.relative_to(REPO)}:{node.lineno}: {n}" for n in names if n.split(".")[0] in STAGES]
        # code run in child processes and containers: `python -c "import a, serving"`, `-m serving.x`
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                for m in CODE_IMPORT.finditer(node.value):
                    bare.append(f"{path.relative_to(REPO)}:{node.lineno}: {m.group(0).strip()!r}")
    assert bare == []
