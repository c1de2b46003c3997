"""Project-wide configuration foundation: dataclass <-> TOML, and `ConfigError`.

Every layer may import this module; it imports nothing else of the project.

Conventions
-----------
- A config is a plain (usually frozen) dataclass. Nested dataclasses become TOML tables.
- `from_dict` refuses unknown keys (a silently ignored key is a classic trap: torchdeq issue 12)
  and coerces ints to floats where a float is declared. Range checks live in each dataclass's
  `__post_init__` and use `check_range` / `check_choice` so every message has the same shape:
  the key, the value and the allowed range. `from_dict` re-keys a dataclass's own check by the
  full dotted path of the table it loaded (a bad `floor` in `[stabilisers.jacreg]` is reported as
  `stabilisers.jacreg.floor`, whatever name the check used).
- A nested table given in part keeps the defaults of the table its container declares: with
  `solver: SolverConfig = field(default_factory=lambda: SolverConfig(max_steps=300))`, a
  `[solver]` table without `max_steps` gets 300, not the class default.
- Overrides of a table (a partial table applied later to a whole one) are checked for keys and
  types by `check_partial` and applied with `merge`.
- TOML has no null: `to_dict` drops `None` values, and loading leaves those fields at their
  defaults.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, Iterable, Mapping, TypeVar

import tomli_w

T = TypeVar("T")

__all__ = [
    "ConfigError",
    "check_range",
    "check_finite_range",
    "check_choice",
    "check_torch_device",
    "resolve_torch_device",
    "check_positive_int",
    "from_dict",
    "check_partial",
    "merge",
    "to_dict",
    "load_toml",
    "save_toml",
    "config_hash",
]


class ConfigError(ValueError):
    """An invalid configuration value; the message names the key, the value and what is allowed."""

    def __init__(self, key: str, value: Any, allowed: str):
        self.key = key
        self.value = value
        self.allowed = allowed
        super().__init__(f"invalid config: {key} = {value!r} (allowed: {allowed})")


def _fmt_interval(lo: float | None, hi: float | None, lo_open: bool, hi_open: bool) -> str:
    left = "(" if (lo_open or lo is None) else "["
    right = ")" if (hi_open or hi is None) else "]"
    lo_s = "-inf" if lo is None else f"{lo:g}"
    hi_s = "inf" if hi is None else f"{hi:g}"
    return f"{left}{lo_s}, {hi_s}{right}"


def check_range(
    key: str,
    value: Any,
    lo: float | None = None,
    hi: float | None = None,
    *,
    lo_open: bool = False,
    hi_open: bool = False,
    finite: bool = False,
) -> None:
    """Raise `ConfigError` unless `value` is a number in the given interval: finite where the
    interval is bounded on both sides, or everywhere with `finite` (±inf refused)."""
    allowed = ("a finite number in " if finite else "a number in ") + _fmt_interval(lo, hi, lo_open, hi_open)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(key, value, allowed)
    if math.isnan(value) or (math.isinf(value) and (finite or not (lo is None or hi is None))):
        raise ConfigError(key, value, allowed)
    if lo is not None and (value < lo or (lo_open and value == lo)):
        raise ConfigError(key, value, allowed)
    if hi is not None and (value > hi or (hi_open and value == hi)):
        raise ConfigError(key, value, allowed)


def check_finite_range(key: str, value: Any, lo: float | None = None, hi: float | None = None, **bounds: bool) -> None:
    """`check_range` that also refuses ±inf when the interval is unbounded on that side (device
    and tile parameters are always finite numbers); `bounds`: `lo_open`, `hi_open`."""
    check_range(key, value, lo, hi, finite=True, **bounds)


def check_positive_int(key: str, value: Any, minimum: int = 1) -> None:
    """Raise `ConfigError` unless `value` is an int >= `minimum`."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(key, value, f"an integer >= {minimum}")


def check_choice(key: str, value: Any, choices: Iterable[Any]) -> None:
    """Raise `ConfigError` unless `value` is one of `choices`."""
    choices = list(choices)
    if value not in choices:
        raise ConfigError(key, value, "one of " + ", ".join(repr(c) for c in choices))


_TORCH_DEVICE = re.compile(r"cpu|cuda(:[0-9]+)?")


def check_torch_device(key: str, value: Any) -> None:
    """Raise `ConfigError` unless `value` names a torch device this project runs on: "cpu",
    "cuda" or "cuda:N" (the format only; `resolve_torch_device` checks that it exists)."""
    if not isinstance(value, str) or not _TORCH_DEVICE.fullmatch(value):
        raise ConfigError(key, value, "'cpu', 'cuda' or 'cuda:N'")


def resolve_torch_device(key: str, value: str):
    """The `torch.device` named by `value` (`check_torch_device`), refused with a `ConfigError`
    when it is a CUDA device that this machine's torch cannot use."""
    check_torch_device(key, value)
    import torch  # lazily: this module imports no heavy dependency at import time

    if value == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError(key, value, "'cpu': CUDA is not available here (torch.cuda.is_available() is False; "
                          f"torch {torch.__version__}, CUDA build {torch.version.cuda or 'none'})")
    index = int(value.split(":")[1]) if ":" in value else 0
    count = torch.cuda.device_count()
    if index >= count:
        raise ConfigError(key, value, f"one of cuda:0..cuda:{count - 1} ({count} CUDA device(s))")
    return torch.device("cuda", index)


def _strip_optional(tp: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _coerce(key: str, tp: Any, value: Any) -> Any:
    tp = _strip_optional(tp)
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        if not isinstance(value, Mapping):
            raise ConfigError(key, value, f"a table of {tp.__name__} keys")
        return from_dict(tp, value, prefix=key + ".")
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is int and isinstance(value, float) and value.is_integer():
        return int(value)
    origin = typing.get_origin(tp)
    if origin is tuple and isinstance(value, list):
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(f"{key}[{i}]", args[0], v) for i, v in enumerate(value))
        return tuple(value)
    if tp in (int, float, str, bool):
        if tp is bool and not isinstance(value, bool):
            raise ConfigError(key, value, "true or false")
        if tp in (int, float) and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise ConfigError(key, value, f"a {tp.__name__}")
        if tp is str and not isinstance(value, str):
            raise ConfigError(key, value, "a string")
    return value


def from_dict(cls: type[T], data: Mapping[str, Any], prefix: str = "") -> T:
    """Build dataclass `cls` from a mapping; unknown keys raise `ConfigError` naming them."""
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            raise _unknown_key(cls, fields, prefix + key, value)
        default = _default_table(fields[key])
        if default is not None and isinstance(value, Mapping):
            value = merge(to_dict(default), value)  # a partial table keeps the container's defaults
        kwargs[key] = _coerce(prefix + key, hints[key], value)
    try:
        return cls(**kwargs)
    except ConfigError as exc:
        raise _located(exc, fields, prefix) from None


def _default_table(f: dataclasses.Field) -> Any:
    """The default of a nested-table field (a dataclass instance), or None."""
    if f.default_factory is not dataclasses.MISSING:
        default = f.default_factory()
    else:
        default = f.default
    return default if dataclasses.is_dataclass(default) and not isinstance(default, type) else None


def _unknown_key(cls: type, fields: Iterable[str], key: str, value: Any) -> ConfigError:
    return ConfigError(key, value, f"a key of {cls.__name__}: " + ", ".join(sorted(fields)))


def check_partial(cls: type, data: Any, prefix: str = "") -> None:
    """Check a partial table of dataclass `cls` (overrides: any subset of its keys, nested tables
    partial too) without building it: unknown keys and values of the wrong type raise
    `ConfigError` under the full dotted key. Ranges are checked when the overrides are applied
    to a whole table (`merge` then `from_dict`)."""
    if not isinstance(data, Mapping):
        raise ConfigError(prefix.rstrip("."), data, f"a table of {cls.__name__} keys")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls) if f.init}
    for key, value in data.items():
        if key not in fields:
            raise _unknown_key(cls, fields, prefix + key, value)
        tp = _strip_optional(hints[key])
        if dataclasses.is_dataclass(tp) and isinstance(tp, type):
            check_partial(tp, value, prefix + key + ".")
        else:
            _coerce(prefix + key, hints[key], value)


def merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """Recursive dict merge (override wins; nested tables merge)."""
    out = dict(base)
    for k, v in override.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = merge(out[k], v)
        else:
            out[k] = v
    return out


def _located(exc: ConfigError, fields: Iterable[str], prefix: str) -> ConfigError:
    """The error of a dataclass's own check, keyed by its full dotted path in the loaded tree.

    A dataclass names the field it checks (`heads`, or a qualified name such as
    `controller.floor`); only `from_dict` knows where that dataclass sits (`model.`,
    `stabilisers.jacreg.`), so the key is rebuilt here from the field's name and the prefix.
    A key that is not one of the dataclass's fields (a cross-field check) is left as it is.
    """
    field = exc.key.rsplit(".", 1)[-1].split("[", 1)[0]
    if not prefix or field not in fields or exc.key.startswith(prefix):
        return exc
    return ConfigError(prefix + exc.key.rsplit(".", 1)[-1], exc.value, exc.allowed)


def to_dict(obj: Any) -> dict[str, Any]:
    """Dataclass -> plain dict suitable for TOML/JSON (tuples become lists, `None` is dropped)."""

    def conv(v: Any) -> Any:
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            return {f.name: conv(getattr(v, f.name)) for f in dataclasses.fields(v)
                    if getattr(v, f.name) is not None}
        if isinstance(v, (list, tuple)):
            return [conv(x) for x in v]
        if isinstance(v, Mapping):
            return {str(k): conv(x) for k, x in v.items() if x is not None}
        return v

    out = conv(obj)
    if not isinstance(out, dict):
        raise TypeError(f"{obj!r} is not a dataclass instance or mapping")
    return out


def load_toml(path: str | Path) -> dict[str, Any]:
    """Read a TOML file; a missing file or a syntax error raises `ConfigError` naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError("path", str(path), "an existing TOML file")
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("path", str(path), f"valid TOML ({exc})") from exc


def save_toml(path: str | Path, data: Any) -> None:
    """Write a dataclass or mapping as TOML."""
    mapping = to_dict(data) if not isinstance(data, Mapping) else to_dict(dict(data))
    Path(path).write_text(tomli_w.dumps(mapping))


def config_hash(obj: Any) -> str:
    """A short, stable hash of a configuration (dataclass or mapping), for provenance."""
    mapping = to_dict(obj) if not isinstance(obj, Mapping) else to_dict(dict(obj))
    blob = json.dumps(mapping, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
