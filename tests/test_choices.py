"""Flags from one source: `gptoss train`'s flags are TrainConfig's fields, and a wrong choice reads the same
whether the CLI refuses it (from the command's signature) or the stage does (called from Python)."""

from __future__ import annotations

import dataclasses
import typing

import pytest

from gptoss import publishing
from gptoss.choices import literal_choices
from gptoss.cli import check_flags, command_help, params
from gptoss.errors import ToolchainError
from gptoss.exporters.errors import ExportStageError
from gptoss.exporters.export import export, export_run
from gptoss.training import config as C
from gptoss.training.run import train


def test_train_flags_types_and_help_come_from_the_config_fields():
    by_name = {p.name: p for p in params(train)[0]}
    hints = typing.get_type_hints(C.TrainConfig)
    text = command_help("train", train)
    for field in dataclasses.fields(C.TrainConfig):
        p = by_name[field.name]
        assert p.choices == literal_choices(hints[field.name]), field.name  # Literal fields are choices on the CLI
        assert " ".join(field.metadata["help"].rstrip(".").split())[:40] in " ".join(text.split()), field.name
    # a flag left out takes the default profile's value (else the field's), and the help says which
    preset, _ = C.load_profile(C.DEFAULT_PROFILE)
    shown = 0
    for field in dataclasses.fields(C.TrainConfig):
        value = preset.get(field.name, field.default) if field.name != "profile" else field.default
        if value is not None and "default" not in field.metadata["help"]:
            value = str(value).lower() if isinstance(value, bool) else value
            assert C.flag_help(field.name).endswith(f"(default {value})."), field.name
            shown += 1
    assert shown > 30


def test_unknown_keyword_is_refused_by_train():
    with pytest.raises(C.ConfigError, match=r"--max-step: not a flag of `gptoss train`"):
        train(max_step=3)


def _config_problem(**values) -> str:
    with pytest.raises(C.ConfigError) as e:
        C.build_config(values)
    (problem,) = e.value.problems
    return problem


def test_a_wrong_choice_reads_the_same_from_the_cli_and_from_the_config():
    with pytest.raises(ToolchainError) as cli:
        check_flags("train", train, ["--optim", "adamw"])
    assert str(cli.value).startswith(_config_problem(optim="adamw"))
    assert "--optim 'adamw': not one of auto, adamw_8bit, adamw_torch" in str(cli.value)


def test_stages_called_from_python_use_the_cli_choice_check(tmp_path):
    with pytest.raises(ToolchainError) as cli:
        check_flags("export", export, ["--run", "r", "--compare-hf", "maybe"])
    with pytest.raises(ExportStageError) as stage:
        export_run(str(tmp_path), compare_hf="maybe")
    assert str(cli.value).startswith(str(stage.value))
    assert str(stage.value) == "--compare-hf 'maybe': not one of auto, on, off"

    with pytest.raises(ToolchainError) as cli:
        check_flags("publish", publishing.publish, ["--run", "r", "--repo-id", "a/b", "--what", "lora"])
    with pytest.raises(publishing.PublishError) as stage:
        publishing.plan_publish(run=str(tmp_path), repo_id="a/b", what="lora", need_token=False)
    assert str(cli.value).split(" for `")[0] in str(stage.value)
