"""Requirements: per axis, the weakest tested value that keeps the analog − twin gap within tolerance."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from ept_hw.config import ConfigError

from .axes import AXES
from .tables import axis_slice, finite_number

__all__ = ["Requirement", "derive_requirements"]

@dataclass(frozen=True)
class Requirement:
    """The weakest value of one axis that keeps the gap within the tolerance (other axes at base).

    `required` is the least demanding tested value v such that v and every more demanding tested
    value pass (so "at least as good as v" is backed by every tested point); None when the most
    demanding tested value fails. `non_monotone` flags a less demanding value that passed on its
    own below a failing one (noise in the sweep: read the gaps). Points that raised are listed in
    `failed_values` and neither pass nor fail.
    """

    axis: str
    unit: str
    direction: str
    target: str
    tolerance: float
    required: Any
    status: str  # "met" | "not_met" | "no_data"
    tested: tuple[tuple[Any, float | None], ...] = field(default_factory=tuple)  # (value, gap), weakest first
    failed_values: tuple[Any, ...] = ()
    non_monotone: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "axis": self.axis, "unit": self.unit, "meaning": AXES[self.axis].meaning if self.axis in AXES else "",
            "weaker_means": self.direction, "overrides": self.target,
            "tolerance": self.tolerance, "required": self.required, "status": self.status,
            "tested": [{"value": v, "gap": g} for v, g in self.tested],
            "failed_values": list(self.failed_values), "non_monotone": self.non_monotone,
        }


def derive_requirements(rows: Sequence[Mapping[str, Any]], axis_names: Sequence[str], tolerance: float,
                        base_values: Mapping[str, Any] | None = None) -> list[Requirement]:
    """Per axis, the weakest value whose gap (and that of every stronger tested value) is <= tolerance.

    `rows` are flat sweep rows (`sweep_rows`): each has the axis values, ``status`` and ``gap``. A
    point with status "ok" and a non-finite or missing gap (the analog path diverged) fails. When
    one value was measured more than once the worst gap counts.
    """
    if not (isinstance(tolerance, (int, float)) and math.isfinite(tolerance)):
        raise ConfigError("tolerance", tolerance, "a finite number (nats)")
    reqs = []
    for name in axis_names:
        spec = AXES[name]
        gaps: dict[Any, float] = {}
        failed: list[Any] = []
        for r in axis_slice(rows, name, axis_names, base_values):
            v = r[name]
            if r.get("status") != "ok":
                if v not in failed:
                    failed.append(v)
                continue
            g = float(r["gap"]) if finite_number(r.get("gap")) else math.inf
            gaps[v] = max(gaps.get(v, -math.inf), g)
        failed = [v for v in failed if v not in gaps]
        values = sorted(gaps, key=spec.strength)  # weakest first
        tested = tuple((v, gaps[v] if math.isfinite(gaps[v]) else None) for v in values)
        if not values:
            reqs.append(Requirement(name, spec.unit, spec.weaker_means, spec.target, float(tolerance), None,
                                    "no_data", tested, tuple(failed)))
            continue
        required = None
        for v in reversed(values):  # from the most demanding down, while every value passes
            if gaps[v] <= tolerance:
                required = v
            else:
                break
        weaker = values[: values.index(required)] if required is not None else values
        non_monotone = any(gaps[v] <= tolerance for v in weaker)
        reqs.append(Requirement(name, spec.unit, spec.weaker_means, spec.target, float(tolerance), required,
                                "met" if required is not None else "not_met", tested, tuple(failed), non_monotone))
    return reqs

