"""Per-point statistics over seeds and the detection of degenerate points.

Paired gaps: seed k of a point and seed k of every other point share the twin (same initial
weights, or the same `--init-ckpt`, the same data order and the same twin generators), so the gap
g_k = analog_k − twin_k is a paired difference. Over n seeds:

    mean ḡ = Σ g_k / n,   s² = Σ (g_k − ḡ)² / (n − 1),   se = s / √n,
    95 % interval ḡ ± t(0.975, n − 1)·se,   one-sided upper 95 % bound ḡ + t(0.95, n − 1)·se,
    one-sided lower 95 % bound ḡ − t(0.95, n − 1)·se   (Student t).

With one seed there is no interval (se, bounds null): such a point can be neither shown to pass
nor to fail.

A seed's run is *degenerate* (it never passes, whatever its gap) when one of these holds:

- ``diverged``: the analog path diverged (no gap);
- ``dead outputs``: at least `DEAD_FRACTION` of the ADC outputs read on one validation batch are
  exactly zero, or at the largest magnitude any output reached (all clipped);
- ``update cosine``: the mean cosine between the analog and the twin's updates, over projections
  and the second half of the run, is below `COSINE_FLOOR`;
- ``not moving``: the twin's validation loss fell by at least `MOVING_MIN` nats and the analog
  path's by less than `MOVING_FRACTION` of that.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

__all__ = ["GapStats", "gap_stats", "degenerate_reasons", "COSINE_FLOOR", "DEAD_FRACTION", "MOVING_MIN",
           "MOVING_FRACTION", "point_status"]

COSINE_FLOOR = 0.1
DEAD_FRACTION = 0.99
MOVING_MIN = 0.05
MOVING_FRACTION = 0.1


def _t(q: float, dof: int) -> float:
    from scipy.stats import t

    return float(t.ppf(q, dof))


@dataclass(frozen=True)
class GapStats:
    """Mean, standard error, two-sided 95 % interval and one-sided 95 % bounds of paired gaps."""

    n: int
    mean: float | None
    se: float | None = None
    lo: float | None = None  # two-sided 95 %
    hi: float | None = None
    upper: float | None = None  # one-sided upper 95 %
    lower: float | None = None  # one-sided lower 95 %

    def to_dict(self) -> dict[str, Any]:
        return {"n_seeds": self.n, "gap": self.mean, "gap_se": self.se, "gap_lo": self.lo, "gap_hi": self.hi,
                "gap_upper": self.upper, "gap_lower": self.lower}


def gap_stats(gaps: Sequence[float]) -> GapStats:
    """`GapStats` of the finite gaps in `gaps` (none: n = 0, mean None; one: no interval)."""
    g = [float(x) for x in gaps if x is not None and math.isfinite(float(x))]
    n = len(g)
    if n == 0:
        return GapStats(0, None)
    mean = sum(g) / n
    if n == 1:
        return GapStats(1, mean)
    sd = math.sqrt(sum((x - mean) ** 2 for x in g) / (n - 1))
    se = sd / math.sqrt(n)
    t2, t1 = _t(0.975, n - 1), _t(0.95, n - 1)
    return GapStats(n, mean, se, mean - t2 * se, mean + t2 * se, mean + t1 * se, mean - t1 * se)


def degenerate_reasons(record: Mapping[str, Any]) -> list[str]:
    """Why one seed's run of a point is degenerate (empty: it is not); see the module docstring."""
    reasons = []
    if record.get("analog_diverged"):
        reasons.append("diverged")
    zero, clipped = record.get("output_zero_fraction"), record.get("output_clipped_fraction")
    if zero is not None and zero >= DEAD_FRACTION:
        reasons.append(f"dead outputs: {zero:.1%} of ADC outputs are zero")
    if clipped is not None and clipped >= DEAD_FRACTION:
        reasons.append(f"dead outputs: {clipped:.1%} of ADC outputs are clipped")
    cos = record.get("update_cos_mean")
    if cos is not None and math.isfinite(cos) and cos < COSINE_FLOOR:
        reasons.append(f"update cosine {cos:.3f} below {COSINE_FLOOR:g}")
    a0, a1 = record.get("analog_initial_val_loss"), record.get("analog_val_loss")
    t0, t1 = record.get("twin_initial_val_loss"), record.get("twin_val_loss")
    if None not in (a0, a1, t0, t1) and all(math.isfinite(x) for x in (a0, a1, t0, t1)):
        twin_drop, analog_drop = t0 - t1, a0 - a1
        if twin_drop >= MOVING_MIN and analog_drop < MOVING_FRACTION * twin_drop:
            reasons.append(f"analog loss not moving (fell {analog_drop:.3f} nats, twin {twin_drop:.3f})")
    return reasons


def point_status(records: Sequence[Mapping[str, Any]]) -> tuple[str, list[str]]:
    """The status of a point from its seeds' records: invalid > failed > diverged > degenerate > ok."""
    statuses = [r.get("status") for r in records]
    if "invalid" in statuses:
        return "invalid", [str(r.get("error")) for r in records if r.get("status") == "invalid"][:1]
    if "failed" in statuses:
        return "failed", [str(r.get("error")) for r in records if r.get("status") == "failed"][:1]
    reasons: list[str] = []
    for r in records:
        for why in degenerate_reasons(r):
            label = f"seed {r.get('seed_index')}: {why}" if r.get("seed_index") is not None else why
            reasons.append(label)
    if any(r.get("analog_diverged") for r in records):
        return "diverged", reasons
    if reasons:
        return "degenerate", reasons
    return "ok", []
