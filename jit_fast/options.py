"""Settings declared once: each config field carries its help, flags, choices (a Literal type) and range.

`option(...)` declares a dataclass field with that metadata; `add_options` builds the argparse arguments of
a config dataclass from it (grouped by the dataclass that declares them, so train.py and sample.py share one
generator), and `check_options` checks a finished config's choices and ranges with messages naming the flag.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal


@dataclass(frozen=True)
class NumberRange:
    """Allowed values of a numeric setting; also an argparse `type=` so bad flags fail at parse time."""

    kind: type = float  # int or float
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False

    def describe(self) -> str:
        """Human-readable range, e.g. 'a finite number in (0, 1]' or 'an integer >= 1'."""
        what = "an integer" if self.kind is int else "a finite number"
        fmt = "{:d}" if self.kind is int else "{:g}"
        lo, hi = (None if b is None else fmt.format(int(b) if self.kind is int else b) for b in (self.lo, self.hi))
        if self.lo is not None and self.hi is not None:
            return f"{what} in {'(' if self.lo_open else '['}{lo}, {hi}{')' if self.hi_open else ']'}"
        if self.lo is not None:
            return f"{what} {'>' if self.lo_open else '>='} {lo}"
        if self.hi is not None:
            return f"{what} {'<' if self.hi_open else '<='} {hi}"
        return what

    def contains(self, v: float) -> bool:
        """True if `v` has the right kind, is finite and lies within the bounds."""
        if isinstance(v, bool) or not isinstance(v, (int, float)) or (self.kind is int and not isinstance(v, int)):
            return False
        if not math.isfinite(v):
            return False
        if self.lo is not None and (v < self.lo or (self.lo_open and v == self.lo)):
            return False
        return not (self.hi is not None and (v > self.hi or (self.hi_open and v == self.hi)))

    def __call__(self, text: str) -> int | float:
        """Parse and check a command-line value; ArgumentTypeError gives argparse's 'argument --x: ...' line."""
        try:
            v = self.kind(text)
        except ValueError:
            v = None
        if v is None or not self.contains(v):
            raise argparse.ArgumentTypeError(f"must be {self.describe()}, got {text!r}")
        return v


INT_POSITIVE = NumberRange(int, lo=1)
INT_NONNEGATIVE = NumberRange(int, lo=0)
SEED = NumberRange(int, lo=0, hi=2**63 - 1)
PROBABILITY = NumberRange(float, lo=0.0, hi=1.0)
UNIT_OPEN = NumberRange(float, lo=0.0, hi=1.0, lo_open=True, hi_open=True)
DECAY = NumberRange(float, lo=0.0, hi=1.0, hi_open=True)
POSITIVE = NumberRange(float, lo=0.0, lo_open=True)
NONNEGATIVE = NumberRange(float, lo=0.0)
LEARNING_RATE = NumberRange(float, lo=0.0, hi=1.0, lo_open=True)  # AdamW lr > 1 is nonsense, 1e300 overflows


def option(default: Any = dataclasses.MISSING, help: str = "", *, flags: tuple[str, ...] = (),  # noqa: A002
           range: NumberRange | None = None, parse: Callable[[str], Any] | None = None,  # noqa: A002
           factory: Callable[[], Any] | None = None, unset: Any = None, cli: bool = True, **argparse_kw: Any):
    """A dataclass field with its command line: `flags` (default `--field-name`; the first is the one messages
    name), `range` (checked at parse time and by `check_options`), `parse` (argparse `type=` when no range),
    `unset` (a value meaning "not set", exempt from the range), `cli=False` (no flag), extra argparse keywords."""
    meta = dict(help=help, flags=flags, range=range, parse=parse, unset=unset, cli=cli, argparse=argparse_kw)
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def choices(cls: type, name: str) -> tuple[Any, ...] | None:
    """The allowed values of field `name` if its type is a Literal (or an optional Literal), else None."""
    hint = _hints(cls)[name]
    args = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    literal = [a for a in args if typing.get_origin(a) is Literal]
    return typing.get_args(literal[0]) if literal else None


def flags(f: dataclasses.Field) -> list[str]:
    """Every spelling of a field's flag: the declared ones (or `--field-name`) plus their underscore forms."""
    out: list[str] = []
    for n in f.metadata.get("flags") or ("--" + f.name.replace("_", "-"),):
        for s in (n, "--" + n[2:].replace("-", "_")):
            if s not in out:
                out.append(s)
    return out


def flag_of(cls: type, name: str) -> str:
    """The spelling messages use for field `name` of config `cls` (the field name for one without a flag)."""
    f = {f.name: f for f in dataclasses.fields(cls)}[name]
    return flags(f)[0] if f.metadata.get("cli", False) else name


def _shown(value: Any) -> str | None:
    if value in ("", None, False, {}, (), []) or value is dataclasses.MISSING:
        return None
    if isinstance(value, (list, tuple)):
        return " ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value)
    return f"{value:g}" if isinstance(value, float) else str(value)


def _add(group: argparse._ArgumentGroup, cls: type, f: dataclasses.Field) -> None:
    meta = f.metadata
    spell = flags(f)
    default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    kw: dict[str, Any] = dict(dest=f.name, **meta["argparse"])
    help_ = meta["help"]
    shown = _shown(default)
    if shown is not None and "default" not in help_ and not isinstance(default, bool):
        help_ += f" (default: {shown})"
    if isinstance(default, bool):
        inverse = spell[0].startswith("--no-")  # `--no-metrics` clears a True field, `--no-npz` sets no_npz
        group.add_argument(*spell, action="store_false" if inverse and default else "store_true", help=help_, **kw)
        if not inverse:
            group.add_argument(*["--no-" + s[2:] for s in spell], action="store_false", help=argparse.SUPPRESS, **kw)
        return
    if default is dataclasses.MISSING:
        kw["required"] = True
    allowed = choices(cls, f.name)
    if allowed is not None:
        kw["choices"] = allowed
    elif meta["range"] is not None or meta["parse"] is not None:  # a parse helper may check more than the range
        kw["type"] = meta["parse"] or meta["range"]
    group.add_argument(*spell, help=help_, **kw)


def add_options(parser: argparse.ArgumentParser, cls: type) -> None:
    """Add one argument per `cli` field of config `cls`, in one help section per dataclass that declares
    fields (titled by its docstring's first line). Defaults are not set on the namespace (SUPPRESS), so a
    caller tells the flags given from the defaults; the dataclass holds the defaults."""
    groups = [c for c in reversed(cls.__mro__) if dataclasses.is_dataclass(c)]
    done: set[str] = set()
    for c in groups:
        own = [f for f in dataclasses.fields(c) if f.name not in done and f.name in vars(c).get("__annotations__", {})]
        done.update(f.name for f in own)
        shown = [f for f in own if f.metadata.get("cli", False)]
        if shown:
            group = parser.add_argument_group((c.__doc__ or c.__name__).strip().splitlines()[0].rstrip("."))
            for f in shown:
                _add(group, cls, f)


def check_options(cfg: Any, error: type[Exception], name: Callable[[str], str] | None = None) -> None:
    """Raise `error` naming the flag (or `name(field)`) for a value outside its field's choices or range; a
    list or tuple is checked item by item, None and the field's `unset` value are exempt."""
    cls = type(cfg)
    spell = name or (lambda n: flag_of(cls, n))
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if value is None or (f.metadata.get("unset") is not None and value == f.metadata["unset"]):
            continue
        allowed = choices(cls, f.name)
        if allowed is not None and value not in allowed:
            raise error(f"{spell(f.name)} must be one of {', '.join(map(str, allowed))}, got {value!r}")
        rng = f.metadata.get("range")
        items = value if isinstance(value, (list, tuple)) else (value,)
        bad = [v for v in items if rng is not None and not rng.contains(v)]
        if bad:
            raise error(f"{spell(f.name)} must be {rng.describe()}, got {bad[0]!r}")
