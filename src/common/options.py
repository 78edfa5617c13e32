"""Command-line options declared once: on the config dataclass field they set.

    @dataclass(frozen=True)
    class OptimConfig:
        lr: float = opt("--lr", default=5e-4, check=rule(lambda v: v > 0, "must be > 0"))

The field carries its flag name(s), help, argparse details and check; ``add_options`` generates the argparse
arguments from the fields, ``namespace_values`` reads the parsed values back by field name (a config is then built
with keywords), and a config's ``__post_init__`` calls ``check_options`` before its own cross-field checks. An
error is an ``OptionError`` whose message starts with the flag.

Defaults: the field's default is the flag's. argparse's type is the field's annotation when that is int, float or
str (optionally ``| None``); a bool field is a ``store_true`` flag (``negate=True``: a ``--no-X`` flag that turns the
field off). A field without a default is a required flag.
"""
from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from dataclasses import dataclass
from typing import Any, Callable, Optional

_KEY = "option"


class OptionError(ValueError):
    """A bad option value or combination; the message starts with the flag (``sep`` between the two)."""

    def __init__(self, flag: str, problem: str, sep: str = ": "):
        super().__init__(f"{flag}{sep}{problem}")
        self.flag, self.problem = flag, problem


@dataclass(frozen=True)
class Option:
    flags: tuple[str, ...]
    help: Optional[str]
    check: Optional[Callable[[Any], Optional[str]]]   # value -> what is wrong with it, or None
    convert: Optional[Callable[[Any], Any]]           # parsed value (not None) -> field value; ValueError: bad
    negate: bool
    section: Optional[str]                            # another --help section than its concern's
    argparse: dict                                    # dest, type, choices, nargs, metavar, action

    @property
    def dest(self) -> str:
        """The argparse dest: the key of the flag in the namespace and in params.json."""
        return self.argparse.get("dest") or self.flags[0].lstrip("-").replace("-", "_")


def opt(*flags: str, default=dataclasses.MISSING, help: Optional[str] = None, check=None, convert=None,
        negate: bool = False, section: Optional[str] = None, **argparse_kw):
    """A dataclass field that is also a command-line flag (see the module doc)."""
    meta = Option(flags, help, check, convert, negate, section, argparse_kw)
    if negate:
        default = True
    return dataclasses.field(default=default, metadata={_KEY: meta})


def rule(ok: Callable[[Any], bool], text: str) -> Callable[[Any], Optional[str]]:
    """A check: ``text`` (e.g. "must be >= 1") and the value when ``ok(value)`` is false (NaN fails any bound)."""
    return lambda v: None if ok(v) else f"{text}, got {v!r}"


def at_least(low) -> Callable[[Any], Optional[str]]:
    return rule(lambda v: v >= low, f"must be >= {low}")


def options(cls) -> list[tuple[dataclasses.Field, Option]]:
    """The fields of ``cls`` that are flags, in declaration order."""
    return [(f, f.metadata[_KEY]) for f in dataclasses.fields(cls) if _KEY in f.metadata]


def add_options(groups: dict, cls, section: str, defaults_none: bool = False) -> None:
    """One argument per option field of ``cls``, in ``groups[section]`` (or the field's own section).
    ``defaults_none``: every flag defaults to None, "not given" (the loss flags override a preset)."""
    hints = typing.get_type_hints(cls)
    for f, o in options(cls):
        kw = dict(o.argparse)
        base = _base_type(hints[f.name])
        if base is bool:
            kw.setdefault("action", "store_true")
        elif "type" not in kw and base in (int, float, str):
            kw["type"] = base
        if f.default is dataclasses.MISSING:
            kw["required"] = True
        else:
            kw["default"] = None if defaults_none else (False if o.negate else f.default)
        if o.help is not None:
            kw["help"] = o.help
        groups[o.section or section].add_argument(*o.flags, **kw)


def _base_type(hint):
    """int for ``int | None`` and ``Optional[int]``; the hint itself otherwise."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return hint


def namespace_values(cls, ns: argparse.Namespace) -> dict:
    """Field name -> value for the option fields of ``cls`` whose flag is in ``ns`` (converted, negated)."""
    values = {}
    for f, o in options(cls):
        if not hasattr(ns, o.dest):
            continue
        v = getattr(ns, o.dest)
        if o.negate:
            v = not v
        elif v is not None and o.convert is not None:
            try:
                v = o.convert(v)
            except ValueError as e:  # a convert raises what is wrong; the flag is added here
                raise OptionError(o.flags[0], str(e)) from None
        values[f.name] = v
    return values


def check_options(cfg, sep: str = ": ", only: Optional[tuple[str, ...]] = None) -> None:
    """Each option field's choices and check (a None value is "not given" and passes); ``only``: these fields."""
    for f, o in options(type(cfg)):
        v = getattr(cfg, f.name)
        if v is None or (only is not None and f.name not in only):
            continue
        choices = o.argparse.get("choices")
        if choices is not None and v not in choices:
            raise OptionError(o.flags[0], f"must be one of {', '.join(map(repr, choices))}, got {v!r}", sep)
        problem = o.check(v) if o.check is not None else None
        if problem:
            raise OptionError(o.flags[0], problem, sep)
