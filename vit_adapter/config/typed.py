"""Typed YAML configs: one loader for train (engine/config.py), pretrain (engine/pretrain.py) and sweep (sweep/).

* ``parse_yaml``: PyYAML follows YAML 1.1, where ``1e-4`` is a string; accept it as a float (YAML 1.2) and reject
  duplicate keys, which PyYAML would otherwise resolve silently to the last one.
* ``build_dataclass``: a (frozen or not) dataclass from a mapping, each value checked (and, by default, coerced)
  against the dataclass annotations; unknown keys get a did-you-mean, and every error names the source (a file,
  ``--set key``, ``pretrain()``) the offending value came from.

Every error is a one-line ``ConfigError``, a ``ValueError``.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import re
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A bad profile, overlay or ``--set``; the message is one line and names the key and its source."""


# ---------------------------------------------------------------------------------------------------------
# YAML
# ---------------------------------------------------------------------------------------------------------

_FLOAT_12 = re.compile(
    r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
    |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""",
    re.X,
)


class _Loader(yaml.SafeLoader):
    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


_Loader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT_12, list("-+0123456789."))


def parse_yaml(text: str, source: str) -> Any:
    """Parse YAML text with the config loader; errors become a one-line ConfigError naming `source`."""
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader subclass
    except yaml.YAMLError as exc:
        detail = " ".join(str(exc).split()).replace('in "<unicode string>", line', "at line")
        raise ConfigError(f"{source}: invalid YAML: {detail}") from exc


def read_yaml(path: str | Path) -> Any:
    """parse_yaml() of a file; an unreadable file is a ConfigError too."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:  # a ValueError that would otherwise name no file
        byte = exc.object[exc.start : exc.start + 1].hex()
        raise ConfigError(
            f"config file {path} is not UTF-8 text (byte 0x{byte} at offset {exc.start}); save it as UTF-8"
        ) from exc
    return parse_yaml(text, str(path))


# ---------------------------------------------------------------------------------------------------------
# Type checking against dataclass annotations
# ---------------------------------------------------------------------------------------------------------

NOT = object()  # sentinel: value does not fit the type


@functools.cache
def hints(cls: type) -> dict[str, Any]:
    """The resolved field annotations of a dataclass (string annotations evaluated), in field order."""
    resolved = typing.get_type_hints(cls)
    return {f.name: resolved[f.name] for f in dataclasses.fields(cls)}


def coerce(value: Any, tp: Any) -> Any:
    """Return `value` converted to `tp`, or NOT. Ints are accepted for floats; bools never for numbers."""
    if tp is Any:
        return value
    if tp is type(None):
        return None if value is None else NOT
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        for arm in args:
            out = coerce(value, arm)
            if out is not NOT:
                return out
        return NOT
    if origin is Literal:
        return value if any(type(value) is type(a) and value == a for a in args) else NOT
    if tp is bool:
        return value if isinstance(value, bool) else NOT
    if tp is int:
        return value if isinstance(value, int) and not isinstance(value, bool) else NOT
    if tp is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        return float(value) if ok else NOT
    if tp is str:
        return value if isinstance(value, str) else NOT
    if origin is list:
        if not isinstance(value, list | tuple):
            return NOT
        items = [coerce(v, args[0]) for v in value]
        return NOT if any(i is NOT for i in items) else items
    if origin is tuple:
        if not isinstance(value, list | tuple) or len(value) != len(args):
            return NOT
        items = [coerce(v, a) for v, a in zip(value, args)]
        return NOT if any(i is NOT for i in items) else tuple(items)
    if origin is dict:
        return dict(value) if isinstance(value, dict) and all(isinstance(k, str) for k in value) else NOT
    raise TypeError(f"config schema uses an unsupported type {tp!r}")


def describe(tp: Any) -> str:
    """Human wording of what a field accepts, e.g. "one of 'det', 'seg'" or "an int or null"."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        parts = [describe(a) for a in args if a is not type(None)]
        return " or ".join(parts) + (" or null" if type(None) in args else "")
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin is list:
        plural = {bool: "bools", int: "ints", float: "numbers", str: "strings"}
        return f"a list of {plural.get(args[0], describe(args[0]))}"
    if origin is tuple:
        return f"a list of {len(args)} values ({', '.join(describe(a) for a in args)})"
    if origin is dict:
        return "a mapping"
    names = {bool: "a bool (true/false)", int: "an int", float: "a number", str: "a string"}
    return names.get(tp, repr(tp))


def suggest(key: str, options: Sequence[str]) -> str:
    """The "; did you mean 'x'?" for a close match of `key` in `options`, else "; known: a, b, ..."."""
    close = difflib.get_close_matches(key, list(options), n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else f"; known: {', '.join(options)}"


def reject_non_finite(value: Any, dotted: str, origins: Mapping[str, str], default: str = "defaults") -> None:
    """NaN/inf pass every range check (`nan <= 0` is False) and then break training far from their key."""
    if isinstance(value, float) and not math.isfinite(value):
        src = origins.get(dotted, default)
        raise ConfigError(f"{dotted} = {value!r} (from {src}) is invalid: must be a finite number")
    if isinstance(value, list | tuple):
        for v in value:
            reject_non_finite(v, dotted, origins, default)
    elif isinstance(value, dict):
        for k, v in value.items():
            sub = f"{dotted}.{k}"
            reject_non_finite(v, sub if sub in origins else dotted, origins, default)


# (dotted key, value, annotation, source) -> the message of a value that does not fit its annotation.
TypeMessage = Callable[[str, Any, Any, str], str]


def type_message(dotted: str, value: Any, tp: Any, source: str) -> str:
    return f"{dotted} = {value!r} (from {source}) is invalid: expected {describe(tp)}"


def check_value(
    value: Any,
    tp: Any,
    dotted: str,
    source: str,
    *,
    origins: Mapping[str, str] | None = None,
    finite: bool = True,
    message: TypeMessage = type_message,
) -> Any:
    """`value` coerced to `tp`; raises ConfigError (naming `dotted` and `source`) if it does not fit."""
    out = coerce(value, tp)
    if out is NOT:
        raise ConfigError(message(dotted, value, tp, source))
    if finite:
        reject_non_finite(out, dotted, origins or {}, source)
    return out


def build_dataclass(
    cls: type[T],
    values: Mapping[str, Any],
    source: str = "defaults",
    *,
    origins: Mapping[str, str] | None = None,
    prefix: str = "",
    what: str = "key",
    convert: bool = True,
    finite: bool = True,
    message: TypeMessage = type_message,
) -> T:
    """``cls(**values)`` with every value checked against the annotation of its field.

    Keys missing from `values` keep the dataclass default. `source` names where the values came from (a file,
    ``--set key``); `origins` (dotted key -> source) overrides it per key, for layered configs. `prefix` is
    prepended to the key in messages (e.g. ``"optim."``); `what` names a key in the unknown-key message
    ("unknown {what} 'x' in {source}; did you mean 'y'?"). ``convert=False`` checks the values but passes them
    on as given (an int stays an int in a float field, a list stays a list in a tuple field); ``finite``
    rejects NaN and inf. `message` words a type error. Errors from ``cls.__post_init__`` propagate unchanged.
    """
    fields = hints(cls)
    origins = origins or {}
    for key in values:
        if key not in fields:
            raise ConfigError(f"unknown {what} '{prefix}{key}' in {source}{suggest(str(key), list(fields))}")
    kwargs: dict[str, Any] = {}
    for key, tp in fields.items():
        if key not in values:
            continue
        dotted = f"{prefix}{key}"
        src = origins.get(dotted, source)
        out = check_value(values[key], tp, dotted, src, origins=origins, finite=finite, message=message)
        kwargs[key] = out if convert else values[key]
    return cls(**kwargs)


def check_dataclass(
    obj: Any, source: str = "defaults", *, finite: bool = True, message: TypeMessage = type_message
) -> None:
    """Check the fields of an existing dataclass instance against its annotations (nothing is converted)."""
    for key, tp in hints(type(obj)).items():
        check_value(getattr(obj, key), tp, key, source, finite=finite, message=message)
