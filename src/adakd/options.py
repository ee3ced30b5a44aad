"""One options resolver for every room: a typed frozen dataclass from layers of plain values (YAML, presets, args).

The engine's run config, a distiller's hyper-parameters and a strategy's options are all built here, so a value is
checked one way wherever it is given: against the field's annotation, with the dotted key in the error.

Rules (`coerce`): `Optional`/unions try each member; `tuple[X, ...]` and `tuple[X, Y]` accept YAML lists (nested
too); an int is accepted for a float (and becomes one); a bool is refused for a number; `Literal[...]` lists its
allowed values; a nested dataclass is built from a mapping over its field's default; `dict[K, V]` checks V; `Any`
passes. Keys: a key no field takes fails with the closest valid key, or the list of them.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Literal, Mapping, Sequence, Union

from adakd.registry import suggestions


class OptionsError(ValueError):
    """A value or key of an options mapping is refused: `key` is its dotted name, `problem` what is wrong with it.

    `unknown` lists every key of the mapping that no field takes (sorted) when that is the problem.
    """

    def __init__(self, key: str, problem: str, message: str | None = None, unknown: Sequence[str] = ()) -> None:
        super().__init__(message or f"{key}: {problem}")
        self.key = key
        self.problem = problem
        self.unknown = tuple(unknown)

    def __reduce__(self) -> tuple:
        # Rebuilt from its own fields: the default pickling would pass only the message to __init__.
        return type(self), (self.key, self.problem, str(self), self.unknown)


def dotted(where: str, key: str) -> str:
    """`where.key`, or `key` alone at the top level (where == "")."""
    return f"{where}.{key}" if where else key


def settable_fields(cls: type) -> list[dataclasses.Field]:
    """Fields a caller may give: init fields not marked `metadata={"resolved": True}` (set by the class itself)."""
    return [f for f in dataclasses.fields(cls) if f.init and not f.metadata.get("resolved")]


def type_name(tp: Any) -> str:
    """A readable name of an annotation: float, int | None, tuple[int, ...]."""
    if typing.get_origin(tp) is None and isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def to_plain(value: Any) -> Any:
    """Plain nested data (dataclasses as dicts, tuples as lists) of a value, for YAML, JSON and checkpoints."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (tuple, list)):
        return [to_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: to_plain(v) for k, v in value.items()}
    return value


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def coerce(value: Any, tp: Any, key: str, noun: str = "option") -> Any:
    """`value` checked against the annotation `tp` and converted (lists to tuples, ints to floats); OptionsError
    naming `key` otherwise (`noun` names an unknown key of a nested dataclass: "unknown <noun> <key>...")."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        members = typing.get_args(tp)
        if value is None and type(None) in members:
            return None
        errors = []
        for member in members:
            if member is type(None):
                continue
            try:
                return coerce(value, member, key, noun)
            except OptionsError as err:
                errors.append(err)
        # One real member (X | None): its own error says more than the union's.
        raise errors[0] if len(errors) == 1 else OptionsError(key, f"expected {type_name(tp)}, got {value!r}")
    if origin is Literal:
        allowed = typing.get_args(tp)
        # `True == 1`: an allowed value matches only a value of its own type.
        if not any(value == choice and type(value) is type(choice) for choice in allowed):
            raise OptionsError(key, f"must be one of {list(allowed)}, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise OptionsError(key, f"expected a mapping of {tp.__name__} fields, got {value!r}")
        return build_options(tp, value, key, noun=noun)
    if origin is tuple or tp is tuple:
        return _coerce_tuple(value, tp, key, noun)
    if origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            raise OptionsError(key, f"expected a mapping, got {value!r}")
        item_args = typing.get_args(tp)
        if len(item_args) == 2 and item_args[1] is not Any:
            return {k: coerce(v, item_args[1], dotted(key, str(k)), noun) for k, v in value.items()}
        return dict(value)
    if tp is Any:
        return value
    if tp is type(None):
        if value is not None:
            raise OptionsError(key, f"expected null, got {value!r}")
        return None
    if tp is float and _is_number(value):
        return float(value)
    if tp in (int, float) and isinstance(value, bool):
        raise OptionsError(key, f"expected {tp.__name__}, got the boolean {value!r}")
    if not isinstance(value, origin or tp):
        raise OptionsError(key, f"expected {type_name(tp)}, got {type(value).__name__} {value!r}")
    return value


def _coerce_tuple(value: Any, tp: Any, key: str, noun: str) -> tuple:
    """A list or tuple as a tuple of the annotation's items: tuple[X, ...], tuple[X, Y], or a bare tuple."""
    if not isinstance(value, (list, tuple)):
        raise OptionsError(key, f"expected a list, got {value!r}")
    items = typing.get_args(tp)
    if not items:
        return tuple(value)
    if len(items) == 2 and items[1] is Ellipsis:
        return tuple(coerce(v, items[0], f"{key}[{i}]", noun) for i, v in enumerate(value))
    if items == ((),):  # tuple[()]: the empty tuple
        items = ()
    if len(value) != len(items):
        raise OptionsError(key, f"expected a list of {len(items)} values, got {list(value)!r}")
    return tuple(coerce(v, item, f"{key}[{i}]", noun) for i, (v, item) in enumerate(zip(value, items)))


def build_options(cls: type, values: Mapping[str, Any], where: str = "", *, layers: Sequence[Mapping[str, Any]] = (),
                  noun: str = "option") -> Any:
    """An instance of the dataclass `cls` from `values` over `layers` (lowest first, e.g. a preset), every value
    checked against its field's annotation; OptionsError naming the dotted key (under `where`) otherwise.

    A key no field takes fails as `unknown <noun> <where>.<key>; did you mean <where>.<close>?` (or the valid keys).
    A nested dataclass given as a mapping keeps the field default's values for the keys it omits. An OptionsError
    that `cls`'s own checks raise (its __post_init__) gets `where` put before its key.
    """
    merged: dict[str, Any] = {}
    for layer in (*layers, values):
        merged.update(layer)
    fields = settable_fields(cls)
    names = [f.name for f in fields]
    unknown = [key for key in merged if key not in names]
    if unknown:
        first = str(unknown[0])
        close = suggestions(first, names, n=1)
        hint = f"did you mean {dotted(where, close[0])}?" if close else f"valid keys: {', '.join(names) or 'none'}"
        raise OptionsError(dotted(where, first), hint, f"unknown {noun} {dotted(where, first)}; {hint}",
                           unknown=sorted(map(str, unknown)))
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for f in fields:
        if f.name not in merged:
            continue
        value, tp = merged[f.name], hints[f.name]
        default = _default(f)
        if isinstance(value, Mapping) and dataclasses.is_dataclass(default) and _accepts(tp, type(default)):
            # A partial section keeps the defaults of the keys it omits (`model: {weights: x}` keeps model.name).
            value = {**to_plain(default), **value}
        kwargs[f.name] = coerce(value, tp, dotted(where, f.name), noun)
    try:
        return cls(**kwargs)
    except OptionsError as err:
        if not where:
            raise
        raise OptionsError(dotted(where, err.key), err.problem) from None


def _default(f: dataclasses.Field) -> Any:
    """The field's default value (None when it has none)."""
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def _accepts(tp: Any, member: type) -> bool:
    """Whether the annotation `tp` is `member` or a union holding it."""
    return tp is member or member in typing.get_args(tp)


__all__ = ["OptionsError", "build_options", "coerce", "dotted", "settable_fields", "to_plain", "type_name"]
