"""Config dataclasses to and from JSON: what every output records and every reader rebuilds.

``config_to_dict`` keeps the fields a dataclass is constructed from (``init=True``), so runtime
state (``init=False`` fields) is never mistaken for configuration. ``config_from_dict`` rebuilds the
dataclass, turning JSON lists back into tuples where the field's default is a tuple, and refuses
unknown keys with their names (a record from another version, or a typo in an override).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, TypeVar

from looptrace.errors import ConfigError

T = TypeVar("T")

__all__ = ["config_from_dict", "config_to_dict", "diff_configs", "parse_override"]


def config_to_dict(obj: Any) -> dict[str, Any]:
    """The init fields of a config dataclass as JSON-ready values (tuples become lists)."""
    if not (dataclasses.is_dataclass(obj) and not isinstance(obj, type)):
        raise ConfigError(f"expected a config dataclass, got {type(obj).__name__}")
    out = {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj) if f.init}
    return json.loads(json.dumps(out, default=_jsonable))


def _jsonable(v: Any) -> Any:
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        return config_to_dict(v)
    return str(v)


def _tuple_fields(cls: type) -> set[str]:
    names = set()
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        default = f.default if f.default is not dataclasses.MISSING else None
        if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = f.default_factory()  # type: ignore[misc]
        if isinstance(default, tuple) or "tuple" in str(f.type):
            names.add(f.name)
    return names


def config_from_dict(cls: type[T], data: dict[str, Any], what: str | None = None) -> T:
    """Rebuild ``cls`` from :func:`config_to_dict` output; unknown keys raise :class:`ConfigError`."""
    init = {f.name for f in dataclasses.fields(cls) if f.init}  # type: ignore[arg-type]
    unknown = sorted(set(data) - init)
    if unknown:
        raise ConfigError(
            f"{what or cls.__name__} has no field(s) {unknown}; known fields: {sorted(init)}. The record was "
            "written by another version of looptrace, or an override names a field that does not exist"
        )
    tuples = _tuple_fields(cls)
    kwargs = {k: tuple(_tuple_items(v)) if k in tuples and isinstance(v, list) else v for k, v in data.items()}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"invalid {what or cls.__name__}: {exc}") from exc


def _tuple_items(v: list[Any]) -> list[Any]:
    return [tuple(x) if isinstance(x, list) else x for x in v]


def diff_configs(have: dict[str, Any], want: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested config dicts (for error messages)."""
    out: list[str] = []
    for k in sorted(set(have) | set(want)):
        a, b = have.get(k, "<absent>"), want.get(k, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            out += diff_configs(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}: {a!r} != {b!r}")
    return out


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"task.n_puzzles=200"`` -> (["task", "n_puzzles"], 200); the value is parsed as JSON when it can be."""
    key, sep, raw = text.partition("=")
    if not sep or not key or any(not part.isidentifier() for part in key.split(".")):
        raise ConfigError(f"an override looks like section.field=value (e.g. task.n_puzzles=200), got {text!r}")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return key.split("."), value
