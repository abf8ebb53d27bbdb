"""Command-line flags generated from a settings dataclass: one source for each setting's name, type,
default, choices and meaning.

A field's `--help` text is its comment in the class body: the comment at the end of its line (or lines),
else the comment lines right above it. Section headers (`# --- ...`) are not help. `Literal[...]` fields
become `choices`, `bool` fields `--x / --no-x`, `X | None` fields take an X.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import io
import tokenize
import types
import typing
from functools import cache
from typing import Any, Literal, get_args, get_origin, get_type_hints


@cache
def field_help(cls: type) -> dict[str, str]:
    """{field name: its comment text} for the fields of dataclass `cls` that have one."""
    source = inspect.getsource(cls)
    comments: dict[int, str] = {}  # line number (1-based, in `source`) -> comment text
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string.lstrip("#").strip()
    body = ast.parse(source).body[0]
    assert isinstance(body, ast.ClassDef), cls
    out: dict[str, str] = {}
    previous_end = body.lineno
    for node in body.body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            previous_end = node.end_lineno or node.lineno
            continue
        end = node.end_lineno or node.lineno
        trailing = [comments[n] for n in range(node.lineno, end + 1) if n in comments]
        above = []
        line = node.lineno - 1
        while line > previous_end and line in comments and not comments[line].startswith("---"):
            above.insert(0, comments[line])
            line -= 1
        text = " ".join(trailing or above)
        if text:
            out[node.target.id] = text
        previous_end = end
    return out


def choices_of(hint: Any) -> tuple | None:
    """The allowed values of a Literal (or Optional Literal) type hint, else None."""
    if get_origin(hint) is Literal:
        return get_args(hint)
    if _is_union(hint):
        for arg in get_args(hint):
            if get_origin(arg) is Literal:
                return get_args(arg)
    return None


def _is_union(hint: Any) -> bool:
    return get_origin(hint) in (typing.Union, types.UnionType)


def _scalar_type(hint: Any) -> type:
    """int, float or str: what argparse converts a flag's text to."""
    candidates = get_args(hint) if _is_union(hint) else (hint,)
    for kind in (int, float):
        if kind in candidates:
            return kind
    literal = choices_of(hint)
    if literal and all(isinstance(v, int) and not isinstance(v, bool) for v in literal):
        return int
    return str


def add_dataclass_flags(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    cls: type,
    *,
    defaults_from_cls: bool = False,
    skip: tuple[str, ...] = (),
    rename: dict[str, str] | None = None,
) -> None:
    """One `--flag` per field of dataclass `cls` (underscores become dashes).

    With `defaults_from_cls` the flags default to the fields' defaults (a parser that builds `cls` from
    its namespace); otherwise they default to None so that a config file's values survive (the caller
    merges). The help text always names the default.
    """
    hints = get_type_hints(cls)
    docs = field_help(cls)
    rename = rename or {}
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        flag = rename.get(f.name, "--" + f.name.replace("_", "-"))
        hint = hints[f.name]
        default = f.default if f.default is not dataclasses.MISSING else None
        text = docs.get(f.name, "")
        help_text = f"{text} (default: {default})" if text else f"(default: {default})"
        given_default = default if defaults_from_cls else None
        if hint is bool:
            parser.add_argument(
                flag,
                dest=f.name,
                action=argparse.BooleanOptionalAction,
                default=given_default,
                help=help_text.replace("%", "%%"),
            )
            continue
        choices = choices_of(hint)
        parser.add_argument(
            flag,
            dest=f.name,
            type=_scalar_type(hint),
            choices=choices,
            default=given_default,
            metavar=None if choices else f.name.upper(),
            help=help_text.replace("%", "%%"),
        )


def literal_problems(obj: Any) -> list[str]:
    """Messages for fields of dataclass instance `obj` whose value is not among its Literal's choices."""
    hints = get_type_hints(type(obj))
    problems = []
    for f in dataclasses.fields(obj):
        choices = choices_of(hints[f.name])
        value = getattr(obj, f.name)
        if choices is not None and value not in choices and not (value is None and _is_union(hints[f.name])):
            problems.append(f"{f.name} must be one of {', '.join(map(str, choices))}; got {value!r}")
    return problems
