"""How a setting is declared and checked: `H` gives a field its type, one-line help and bounds;
`Section` checks those bounds (and the class's own `check`) whenever a config is built, from a
file, a flag or code; a failure is a `ConfigError` naming the key. The settings themselves are in
`schema.py`."""

import functools
import typing
from typing import Annotated, Any, Literal

from msgspec import Meta, Struct


class ConfigError(ValueError):
    """A configuration value or key that is not accepted; the message names it."""


def require(cond: bool, key: str, msg: str) -> None:
    """Raise ConfigError(`key`: `msg`) unless cond."""
    if not cond:
        raise ConfigError(f"{key}: {msg}")


@functools.cache
def _bounds(cls: type) -> tuple[tuple[str, Any], ...]:
    """(field name, annotated type) of the fields of cls that carry a bound or a set of choices."""
    out = []
    for name, tp in typing.get_type_hints(cls, include_extras=True).items():
        if typing.get_origin(tp) is Annotated or typing.get_origin(tp) is Literal:
            out.append((name, tp))
    return tuple(out)


def _check_value(key: str, tp: Any, value: Any) -> None:
    if typing.get_origin(tp) is Literal:
        require(value in typing.get_args(tp), key, f"must be one of {', '.join(map(str, typing.get_args(tp)))}")
        return
    base, *metas = typing.get_args(tp)
    if typing.get_origin(base) is Literal:
        _check_value(key, base, value)
    for meta in metas:
        if not isinstance(meta, Meta):
            continue
        for attr, ok, word in (("ge", lambda v, b: v >= b, ">="), ("gt", lambda v, b: v > b, ">"),
                               ("le", lambda v, b: v <= b, "<="), ("lt", lambda v, b: v < b, "<")):
            bound = getattr(meta, attr)
            if bound is not None and isinstance(value, int | float):
                require(ok(value, bound), key, f"must be {word} {bound}")


class Section(Struct, forbid_unknown_fields=True):
    """Base of every config class: bounds from the annotations, then the class's own rules."""

    def __post_init__(self) -> None:
        for name, tp in _bounds(type(self)):
            _check_value(name, tp, getattr(self, name))
        self.check()

    def check(self) -> None:
        """Rules between fields; raise ConfigError naming the field."""


def H(tp: Any, help: str, **bounds: Any) -> Any:  # noqa: A002 - `help` reads best at the call sites
    """A field type carrying its one-line help text (and optional bounds: ge, gt, le, lt)."""
    return Annotated[tp, Meta(description=help, **bounds)]
