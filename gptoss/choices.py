"""One check of a value against its choices, for every command: the CLI applies it to a command's
``Literal[...]`` annotations before the command runs, and the stages (also called from Python)
apply it to the same annotations, so a wrong choice reads the same everywhere."""

from __future__ import annotations

import difflib
import types
import typing
from typing import Any, Callable, Iterable, Literal


def literal_choices(hint: Any) -> tuple | None:
    """The choices of ``Literal[...]``, also inside ``Optional`` / ``X | None``; None for other types."""
    if typing.get_origin(hint) is Literal:
        return typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, getattr(types, "UnionType", typing.Union)):
        for member in typing.get_args(hint):
            if typing.get_origin(member) is Literal:
                return typing.get_args(member)
    return None


def flag(name: str) -> str:
    """A parameter's name as the command line spells it: max_steps -> --max-steps."""
    return "--" + name.replace("_", "-")


def choice_problem(shown: str, value: Any, choices: Iterable) -> str | None:
    """None when ``value`` is one of ``choices``; otherwise "<shown> 'value': not one of a, b (did you mean a?)"."""
    names = [str(c) for c in choices]
    if str(value) in names:
        return None
    close = difflib.get_close_matches(str(value), names, n=1)
    return f"{shown} {value!r}: not one of {', '.join(names)}" + (f" (did you mean {close[0]}?)" if close else "")


def signature_problems(fn: Callable, values: dict[str, Any]) -> list[str]:
    """Every value in ``values`` (by parameter name) that is not one of its ``Literal`` choices in ``fn``'s
    annotations; None is allowed where the annotation allows it."""
    hints = typing.get_type_hints(fn)
    out = []
    for name, value in values.items():
        choices = literal_choices(hints.get(name))
        if choices is None or (value is None and type(None) in typing.get_args(hints.get(name))):
            continue
        if (p := choice_problem(flag(name), value, choices)) is not None:
            out.append(p)
    return out
