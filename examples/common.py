"""What the examples share: their command line, read from an ``Args`` dataclass (CleanRL style).

Each trainer declares ``Args``: typed fields with defaults, a one-line docstring under each.  `parse_args`
turns the fields into flags (``num_envs`` -> ``--num-envs``; a ``bool`` field gives ``--lstm`` /
``--no-lstm``), their docstrings into ``--help``, and returns an ``Args``.
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import sys
import textwrap
import typing

ArgsT = typing.TypeVar("ArgsT")


def field_docs(args_class: type) -> dict[str, str]:
    """The docstring written under each field of the class `args_class` (``{}`` when its source is not at hand)."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(args_class)))
    except (OSError, TypeError):
        return {}
    docs, body = {}, tree.body[0].body
    for statement, following in zip(body, body[1:]):
        if (isinstance(statement, ast.AnnAssign) and isinstance(statement.target, ast.Name)
                and isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant)
                and isinstance(following.value.value, str)):
            docs[statement.target.id] = following.value.value.strip().replace("%", "%%")  # argparse formats help
    return docs


def parse_args(args_class: type[ArgsT], argv: list[str] | None = None) -> ArgsT:
    """An `args_class` instance from the command line (`argv`, default ``sys.argv[1:]``): one flag per field."""
    module_doc = sys.modules[args_class.__module__].__doc__ or ""
    parser = argparse.ArgumentParser(description=(module_doc.strip().splitlines() or [""])[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    types, docs = typing.get_type_hints(args_class), field_docs(args_class)
    for field in dataclasses.fields(args_class):
        flag, kind = "--" + field.name.replace("_", "-"), types[field.name]
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=field.default,
                                help=docs.get(field.name))
        else:
            parser.add_argument(flag, type=kind, default=field.default, help=docs.get(field.name))
    return args_class(**vars(parser.parse_args(argv)))
