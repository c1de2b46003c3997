"""Sweep axes: one registry entry per axis, each with its own apply rule and base-value reader.

An axis (`AxisSpec`) says how its values are typed and validated, which way is "weaker" (less
demanding of the hardware), what configuration field it overrides, how to apply a value to a
tile (`apply(edit, value)`) and how to read the base tile's value (`read(tile, device)`).
Adding an axis touches one place: the `AXES` registry below (plus its test).

Also here: parsing ``NAME=v1,v2`` (`parse_axis`), the points of a sweep (`sweep_points`) and
their stable ids (`point_id`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

from crossbar.io import bits_from_res, res_from_bits
from ept_hw.config import ConfigError
from experiments.markdown import table

__all__ = [
    "AxisSpec", "TileEdit", "AXES", "ALGORITHMS", "ALGORITHM_ALIASES", "PERIPHERY_AXES", "axis_table", "parse_axis",
    "sweep_points", "point_id", "apply_overrides", "base_values", "bits_to_res", "res_to_bits",
]


# one home for bits <-> resolution: crossbar.io (aihwkit's convention, 2^bits - 2 steps)
bits_to_res = res_from_bits
res_to_bits = bits_from_res


@dataclass
class TileEdit:
    """The changes that a point's axis values make, collected before the tile is rebuilt once.

    `device` (aihwkit device parameters), `tile` (TileConfig fields), `io` (the same IO field on
    the forward and the transposed read), `update` (UpdateParameters fields). `device_cfg` is the
    base device, for rules that scale from it.
    """

    device_cfg: Any
    device: dict[str, Any] = field(default_factory=dict)
    tile: dict[str, Any] = field(default_factory=dict)
    io: dict[str, Any] = field(default_factory=dict)
    update: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class AxisSpec:
    """One sweep axis: how its values are typed, which way is "weaker", what it overrides.

    `stronger` says which values demand more of the hardware: "higher" (more bits, more states,
    more reads), "lower" (less noise, less variation), "abs_lower" (|asymmetry| smaller), or
    "ordered" with `choices` listed from the least to the most demanding. The *weakest* value is
    the least demanding one. `scope` is "device" (needs a pulsed device), "periphery" (needs
    non-perfect IO) or "tile".
    """

    name: str
    kind: str  # "int" | "float" | "choice"
    stronger: str  # "higher" | "lower" | "abs_lower" | "ordered"
    unit: str
    meaning: str
    target: str  # the configuration field(s) the value overrides (documentation and spec export)
    apply: Callable[[TileEdit, Any], None] = field(repr=False, compare=False, default=lambda e, v: None)
    read: Callable[[Any, Any], Any] = field(repr=False, compare=False, default=lambda t, d: None)
    scope: str = "tile"  # "device" | "periphery" | "tile"
    choices: tuple[str, ...] = ()
    aliases: Mapping[str, str] = field(default_factory=dict, compare=False)
    minimum: float | None = None

    def parse(self, text: str) -> Any:
        text = text.strip()
        if self.kind == "choice":
            text = self.aliases.get(text, text)
            if text not in self.choices:
                raise ConfigError(f"axis {self.name}", text, "one of " + ", ".join(self.choices))
            return text
        try:
            value: Any = int(text) if self.kind == "int" else float(text)
        except ValueError:
            raise ConfigError(f"axis {self.name}", text, f"a {self.kind}") from None
        if self.kind == "float" and not math.isfinite(value):
            raise ConfigError(f"axis {self.name}", text, "a finite number")
        if self.minimum is not None and value < self.minimum:
            raise ConfigError(f"axis {self.name}", value, f"a number >= {self.minimum:g}")
        return value

    def strength(self, value: Any) -> float:
        """A number that grows with how demanding `value` is for the hardware."""
        if self.stronger == "higher":
            return float(value)
        if self.stronger == "lower":
            return -float(value)
        if self.stronger == "abs_lower":
            return -abs(float(value))
        if self.stronger == "ordered":
            return float(self.choices.index(value))
        raise ValueError(f"unknown direction {self.stronger!r}")

    @property
    def weaker_means(self) -> str:
        return {
            "higher": "lower value",
            "lower": "higher value",
            "abs_lower": "larger magnitude",
            "ordered": "earlier in " + " < ".join(self.choices),
        }[self.stronger]


# ------------------------------------------------------------------------------ apply rules
def _n_states(edit: TileEdit, value: Any) -> None:
    device = edit.device_cfg
    if device.is_ideal:
        raise ConfigError("axis n_states", value, "a pulsed device (the ideal device has no states)")
    # granularity is proportional to dw_min for every model, so scale dw_min to hit n_states
    target = (device.w_max - device.w_min) / float(value)
    edit.device["dw_min"] = device.dw_min * target / device.granularity


def _d2d(edit: TileEdit, value: Any) -> None:
    edit.device.update(dw_min_dtod=float(value), w_max_dtod=float(value), w_min_dtod=float(value))


def _reads(edit: TileEdit, value: Any) -> None:
    edit.tile["n_reads"] = int(value)


def _n_states_of(tile: Any, device: Any) -> Any:
    g = device.granularity
    return int(round((device.w_max - device.w_min) / g)) if g > 0 else None


def _bits_of(res: float) -> int | None:
    bits = res_to_bits(res)
    return None if bits is None else int(round(bits))


#: The update algorithms (crossbar's names) from the least to the most demanding periphery: plain
#: SGD ("sgd") needs nothing beyond the array; Tiki-Taka v2 ("ttv2") a second (fast) array and a
#: digital buffer of the columns being transferred; chopped TTv2 ("c_ttv2") adds the choppers' sign
#: bits; AGAD ("agad") adds a digital reference per weight (its dynamic reference); mixed precision
#: a digital accumulator per weight, updated at full precision on every step.
ALGORITHMS = ("sgd", "ttv2", "c_ttv2", "agad", "mixed_precision")
ALGORITHM_ALIASES = {"plain": "sgd", "tiki_taka_v2": "ttv2", "tiki_taka": "ttv2", "tt_v2": "ttv2", "mp": "mixed_precision",
                     "c-ttv2": "c_ttv2", "chopped_ttv2": "c_ttv2"}

AXES: dict[str, AxisSpec] = {
    a.name: a
    for a in (
        AxisSpec("n_states", "int", "higher", "states",
                 "number of device states (w_max - w_min)/granularity",
                 "tile.device.dw_min scaled so that (w_max - w_min)/granularity = n_states",
                 apply=_n_states, read=_n_states_of, scope="device", minimum=2),
        AxisSpec("up_down", "float", "abs_lower", "1",
                 "up/down asymmetry: up step dw_min(1 + up_down), down step dw_min(1 - up_down)",
                 "tile.device.up_down",
                 apply=lambda e, v: e.device.__setitem__("up_down", float(v)),
                 read=lambda t, d: d.up_down, scope="device"),
        AxisSpec("c2c", "float", "lower", "fraction of dw_min",
                 "cycle-to-cycle (pulse-to-pulse) step noise", "tile.device.dw_min_std",
                 apply=lambda e, v: e.device.__setitem__("dw_min_std", float(v)),
                 read=lambda t, d: d.dw_min_std, scope="device", minimum=0),
        AxisSpec("d2d", "float", "lower", "fraction (relative std)",
                 "device-to-device variation of step size and bounds",
                 "tile.device.dw_min_dtod = w_max_dtod = w_min_dtod",
                 apply=_d2d, read=lambda t, d: d.dw_min_dtod, scope="device", minimum=0),
        AxisSpec("dac_bits", "int", "higher", "bits", "DAC resolution of the inputs (forward and transposed reads)",
                 "tile.forward.inp_res = tile.backward.inp_res = 1/(2^bits - 2)",
                 apply=lambda e, v: e.io.__setitem__("inp_res", bits_to_res(int(v))),
                 read=lambda t, d: _bits_of(t.forward.inp_res), scope="periphery", minimum=2),
        AxisSpec("adc_bits", "int", "higher", "bits", "ADC resolution of the outputs (forward and transposed reads)",
                 "tile.forward.out_res = tile.backward.out_res = 1/(2^bits - 2)",
                 apply=lambda e, v: e.io.__setitem__("out_res", bits_to_res(int(v))),
                 read=lambda t, d: _bits_of(t.forward.out_res), scope="periphery", minimum=2),
        AxisSpec("read_noise", "float", "lower", "tile output units (std)",
                 "additive output (read) noise per MVM", "tile.forward.out_noise = tile.backward.out_noise",
                 apply=lambda e, v: e.io.__setitem__("out_noise", float(v)),
                 read=lambda t, d: t.forward.out_noise, scope="periphery", minimum=0),
        AxisSpec("reads_averaged", "int", "higher", "reads", "reads averaged per MVM",
                 "tile.n_reads",
                 apply=_reads, read=lambda t, d: t.n_reads, minimum=1),
        AxisSpec("pulse_length", "int", "higher", "pulses", "update pulse-train length BL",
                 "tile.update.desired_bl",
                 apply=lambda e, v: e.update.__setitem__("desired_bl", int(v)),
                 read=lambda t, d: t.update.desired_bl, minimum=1),
        AxisSpec("algorithm", "choice", "ordered", "-", "update algorithm (sgd = plain, ttv2 = Tiki-Taka v2)",
                 "tile.algorithm",
                 apply=lambda e, v: e.tile.__setitem__("algorithm", ALGORITHM_ALIASES.get(v, v)),
                 read=lambda t, d: t.algorithm, choices=ALGORITHMS, aliases=ALGORITHM_ALIASES),
    )
}

#: Axes that need a non-perfect periphery (derived from the registry).
PERIPHERY_AXES = tuple(n for n, a in AXES.items() if a.scope == "periphery")


def _check_name(name: str) -> AxisSpec:
    if name not in AXES:
        raise ConfigError("axis", name, "one of " + ", ".join(AXES))
    return AXES[name]


def _edit(tile: Any, overrides: Mapping[str, Any]) -> TileEdit:
    edit = TileEdit(tile.device_config())
    for name, value in overrides.items():
        _check_name(name).apply(edit, value)
    return edit


def apply_overrides(tile: Any, overrides: Mapping[str, Any]) -> Any:
    """The `crossbar.config.TileConfig` with the axis values of `overrides` applied (validated again).

    Device axes rewrite the tile's device table (aihwkit names); periphery axes set the same value
    on the forward and the transposed (backward) read. Unknown axis names raise `ConfigError`;
    the rebuilt tile and device go through their own constructors' validation.
    """
    edit = _edit(tile, overrides)
    changes = dict(edit.tile)
    if edit.device:
        if edit.device_cfg.is_ideal:
            names = sorted(n for n in overrides if AXES[n].scope == "device")
            raise ConfigError("axis " + ", ".join(names), "ideal",
                              "a pulsed device (the ideal device has no pulse parameters)")
        changes["device"] = edit.device_cfg.replace(**edit.device).to_dict()
    if edit.io:
        changes["forward"] = dataclasses.replace(tile.forward, **edit.io)
        changes["backward"] = dataclasses.replace(tile.backward, **edit.io)
    if edit.update:
        changes["update"] = dataclasses.replace(tile.update, **edit.update)
    return dataclasses.replace(tile, **changes) if changes else tile


def base_values(tile: Any) -> dict[str, Any]:
    """Every axis's value in the base tile (None where it does not apply, e.g. bits of perfect periphery)."""
    device = tile.device_config()
    out: dict[str, Any] = {}
    for name, spec in AXES.items():
        if (spec.scope == "device" and device.is_ideal) or (spec.scope == "periphery" and tile.forward.is_perfect):
            out[name] = None
        else:
            out[name] = spec.read(tile, device)
    return out


def axis_table() -> str:
    """The axes and the configuration fields they override, as a Markdown table."""
    return table(["axis", "meaning", "unit", "overrides", "weaker ="],
                 [[f"`{a.name}`", a.meaning, a.unit, f"`{a.target}`", a.weaker_means] for a in AXES.values()])


def parse_axis(text: str) -> tuple[str, tuple[Any, ...]]:
    """``"adc_bits=2,4,8"`` -> ``("adc_bits", (2, 4, 8))``; unknown names and bad values raise `ConfigError`."""
    if "=" not in text:
        raise ConfigError("axis", text, "NAME=v1,v2,... with NAME one of " + ", ".join(AXES))
    name, _, values_text = text.partition("=")
    spec = _check_name(name.strip())
    parts = [p for p in values_text.split(",") if p.strip()]
    if not parts:
        raise ConfigError(f"axis {spec.name}", values_text, "at least one value")
    values: list[Any] = []
    for p in parts:
        v = spec.parse(p)
        if v not in values:
            values.append(v)
    return spec.name, tuple(values)


def sweep_points(axes: Mapping[str, Sequence[Any]], grid: bool = False, include_base: bool = True) -> list[dict[str, Any]]:
    """The overrides of every point.

    One axis at a time (default): the base point ``{}`` and ``{name: value}`` for every value of
    every axis. Grid: the Cartesian product of all axes (every point overrides every axis).
    """
    if grid:
        points: list[dict[str, Any]] = [{}]
        for name, values in axes.items():
            points = [dict(p, **{name: v}) for p in points for v in values]
        return points
    points = [{}] if include_base else []
    for name, values in axes.items():
        points.extend({name: v} for v in values)
    return points


def point_id(overrides: Mapping[str, Any]) -> str:
    """A stable id of a point: a hash of its overrides (order of keys does not matter)."""
    blob = json.dumps(dict(overrides), sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]
