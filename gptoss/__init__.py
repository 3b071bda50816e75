"""The gpt-oss toolchain. Every stage imports as ``gptoss.<stage>`` (gptoss.training, gptoss.exporters, ...).

Installed, pyproject's package-dir puts the stage folders inside this package. In a checkout they
sit beside it (shared/ARCHITECTURE.md's layout); for a bare ``PYTHONPATH=<checkout>`` (the GPU
benches, child processes of the tests) the checkout is searched for ``gptoss.<stage>`` too.
"""

from pathlib import Path as _Path

_checkout = _Path(__file__).resolve().parent.parent
if (_checkout / "pyproject.toml").is_file() and (_checkout / "training" / "__init__.py").is_file():
    __path__.append(str(_checkout))  # noqa: F821 (the package's own __path__)
