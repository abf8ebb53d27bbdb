"""Command-line flags generated from a settings dataclass: one source for each setting's name, type,
default, choices and meaning.

A field's `--help` text is its comment in the class body: the comment at the end of its line (or lines),
else the comment lines right above it. Section headers (`# --- ...`) are not help. `Literal[...]` fields
become `choices`, `bool` fields `--x / --no-x`, `X | None` fields take an X. A flag's dest is its field's
name, so `dataclass_from_args` builds the dataclass back from the parsed namespace.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import io
import sys
import textwrap
import tokenize
import types
import typing
from functools import cache
from typing import TYPE_CHECKING, Any, Literal, TypeVar, get_args, get_origin, get_type_hints

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

T = TypeVar("T", bound="DataclassInstance")


@cache
def field_help(cls: type) -> dict[str, str]:
    """{field name: its comment text} for the fields of dataclass `cls` that have one."""
    source = textwrap.dedent(inspect.getsource(cls))  # a class defined in a function is indented
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
        above: list[str] = []
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
    flag_prefix: str = "",
) -> None:
    """One `--flag` per field of dataclass `cls`: `--{flag_prefix}{name}`, underscores become dashes.

    With `defaults_from_cls` the flags default to the fields' defaults (a parser that builds `cls` from
    its namespace); otherwise they default to None so that a config file's values survive (the caller
    merges). The help text always names the default. `rename` gives some fields another flag (the whole
    `--flag`). Two flags with one dest would silently share a value, so a field whose name another flag of
    `parser` already uses raises.
    """
    hints = get_type_hints(cls)
    docs = field_help(cls)
    rename = rename or {}
    taken = {action.dest for action in parser._actions}
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        if f.name in taken:
            raise ValueError(f"{cls.__name__}.{f.name}: the parser already has a flag with dest {f.name!r}")
        flag = rename.get(f.name, "--" + (flag_prefix + f.name).replace("_", "-"))
        hint = hints[f.name]
        default = f.default if f.default is not dataclasses.MISSING else None
        text = docs.get(f.name, "")
        if default is None and "default" in text:
            help_text = text  # the comment says what no value means ("default: the model's ...")
        else:
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


def dataclass_from_args(cls: type[T], args: argparse.Namespace) -> T:
    """`cls` from the values of its flags (add_dataclass_flags) in `args`; fields without a flag keep their
    defaults."""
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)})


def add_deprecated_alias(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup, old: str, new: str
) -> None:
    """`old` as a hidden flag for the valued flag `new` (a renamed setting): it sets what `new` sets and
    says on stderr that it is deprecated."""
    target = parser._option_string_actions[new]

    class DeprecatedAlias(argparse.Action):
        def __call__(self, parser, namespace, values, option_string=None):
            print(f"warning: {old} is deprecated; use {new}", file=sys.stderr)
            setattr(namespace, self.dest, values)

    parser.add_argument(
        old,
        action=DeprecatedAlias,
        dest=target.dest,
        type=target.type or str,
        metavar=target.metavar,
        default=argparse.SUPPRESS,  # the default is `new`'s
        help=argparse.SUPPRESS,
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
