"""Requirements: per axis, the weakest tested value whose paired gap stays within tolerance with 95 % confidence.

The decision rule, per axis (every other axis at the base), on the point rows of `tables.sweep_rows`:

1. A tested value *passes* when its point is not degenerate (`stats.point_status` "ok") and the
   one-sided upper 95 % bound of its paired gap (over seeds) is <= the tolerance. It *fails* when
   it is degenerate or diverged, or when its one-sided lower 95 % bound is > the tolerance. Otherwise
   (one seed, or an interval that contains the tolerance) it is *undecided*. Points that raised or
   were refused before running (status "failed"/"invalid") are listed and neither pass nor fail.
2. The requirement is the least demanding tested value v such that v and every more demanding
   tested value pass. Status:
   - ``undetermined`` when the twin has not learned enough for the question to mean anything: its
     mean final validation loss on the slice is not at least `TWIN_MARGIN` nats below the unigram
     entropy of the validation text (any device "keeps up" with a model that learned nothing);
   - ``met`` when such a v exists;
   - ``not_met`` when the most demanding tested value fails;
   - ``undetermined`` when the most demanding tested value is undecided (the interval is too wide
     to decide: more seeds or more steps);
   - ``no_data`` when no value was measured.
Each `Requirement` carries one sentence (`how`) saying how it was decided.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from ept_hw.config import ConfigError

from .axes import AXES
from .stats import COSINE_FLOOR
from .tables import axis_slice, finite_number

__all__ = ["Requirement", "TestedValue", "derive_requirements", "decide_value", "TWIN_MARGIN", "STATUSES"]

#: The twin must end at least this many nats below the unigram entropy for a requirement to mean anything.
TWIN_MARGIN = 0.3
STATUSES = ("met", "not_met", "undetermined", "no_data")


@dataclass(frozen=True)
class TestedValue:
    """One tested value of an axis: its point's gap statistics and the verdict against the tolerance."""

    value: Any
    gap: float | None
    se: float | None
    lo: float | None
    hi: float | None
    upper: float | None
    n_seeds: int
    point_status: str
    verdict: str  # "pass" | "fail" | "undecided"

    def to_dict(self) -> dict[str, Any]:
        return {"value": self.value, "gap": self.gap, "se": self.se, "lo": self.lo, "hi": self.hi,
                "upper": self.upper, "n_seeds": self.n_seeds, "point_status": self.point_status,
                "verdict": self.verdict}


def decide_value(row: Mapping[str, Any], tolerance: float) -> str:
    """"pass", "fail" or "undecided" for one point row (see the module docstring, rule 1)."""
    status = row.get("status")
    if status in ("degenerate", "diverged"):
        return "fail"
    upper, lower = row.get("gap_upper"), row.get("gap_lower")
    if status == "ok" and not finite_number(row.get("gap")):
        return "fail"  # an "ok" point without a finite gap: the analog path produced no loss
    if finite_number(upper) and upper <= tolerance:
        return "pass"
    if finite_number(lower) and lower > tolerance:
        return "fail"
    return "undecided"


@dataclass(frozen=True)
class Requirement:
    """The weakest value of one axis that keeps the gap within the tolerance (other axes at base)."""

    axis: str
    unit: str
    direction: str
    target: str
    tolerance: float
    required: Any
    status: str  # one of STATUSES
    tested: tuple[TestedValue, ...] = field(default_factory=tuple)  # weakest first
    failed_values: tuple[Any, ...] = ()
    non_monotone: bool = False
    how: str = ""
    seeds: int | None = None
    steps: int | None = None
    interval: tuple[float | None, float | None] | None = None  # 95 % interval of the required value's gap

    def to_dict(self) -> dict[str, Any]:
        return {
            "axis": self.axis, "unit": self.unit, "meaning": AXES[self.axis].meaning if self.axis in AXES else "",
            "weaker_means": self.direction, "overrides": self.target,
            "tolerance": self.tolerance, "required": self.required, "status": self.status,
            "tested": [t.to_dict() for t in self.tested],
            "failed_values": list(self.failed_values), "non_monotone": self.non_monotone,
            "how": self.how, "seeds": self.seeds, "steps": self.steps,
            "interval": None if self.interval is None else {"lo": self.interval[0], "hi": self.interval[1],
                                                            "level": 0.95},
        }


def _fmt(x: float | None) -> str:
    return "—" if x is None else f"{x:.3g}"


def _twin_check(rows: Sequence[Mapping[str, Any]]) -> tuple[bool | None, str]:
    twins = [float(r["twin_val_loss"]) for r in rows if finite_number(r.get("twin_val_loss"))]
    ents = [float(r["unigram_entropy"]) for r in rows if finite_number(r.get("unigram_entropy"))]
    if not twins or not ents:
        return None, "the unigram entropy or the twin's loss was not recorded, so the twin's learning was not checked"
    twin, ent = sum(twins) / len(twins), sum(ents) / len(ents)
    ok = twin <= ent - TWIN_MARGIN
    return ok, (f"the twin ends at {twin:.3f} nats, {'at least' if ok else 'less than'} {TWIN_MARGIN:g} nats below "
                f"the unigram entropy {ent:.3f}")


def derive_requirements(rows: Sequence[Mapping[str, Any]], axis_names: Sequence[str], tolerance: float,
                        base_values: Mapping[str, Any] | None = None) -> list[Requirement]:
    """Per axis, the requirement by the rule of the module docstring, from point rows (`sweep_rows`).

    When one value was measured by more than one point (a grid crossing the slice) the point with
    the worst verdict, then the highest upper bound, counts.
    """
    if not (isinstance(tolerance, (int, float)) and math.isfinite(tolerance)):
        raise ConfigError("tolerance", tolerance, "a finite number (nats)")
    tol = float(tolerance)
    rank = {"fail": 2, "undecided": 1, "pass": 0}
    reqs = []
    for name in axis_names:
        spec = AXES[name]
        chosen: dict[Any, tuple[Mapping[str, Any], str]] = {}
        keys: dict[Any, tuple[int, float]] = {}
        failed: list[Any] = []
        sl = axis_slice(rows, name, axis_names, base_values)
        for r in sl:
            v = r[name]
            if r.get("status") in ("failed", "invalid"):
                if v not in failed:
                    failed.append(v)
                continue
            verdict = decide_value(r, tol)
            key = (rank[verdict], r.get("gap_upper") if finite_number(r.get("gap_upper")) else math.inf)
            if v not in chosen or key > keys[v]:
                chosen[v], keys[v] = (r, verdict), key
        failed = [v for v in failed if v not in chosen]
        values = sorted(chosen, key=spec.strength)  # weakest first
        tested = tuple(
            TestedValue(v, r.get("gap") if finite_number(r.get("gap")) else None, r.get("gap_se"), r.get("gap_lo"),
                        r.get("gap_hi"), r.get("gap_upper"), int(r.get("n_seeds") or 0), str(r.get("status")), verdict)
            for v in values for r, verdict in [chosen[v]]
        )
        common = dict(axis=name, unit=spec.unit, direction=spec.weaker_means, target=spec.target, tolerance=tol,
                      failed_values=tuple(failed))
        if not values:
            reqs.append(Requirement(**common, required=None, status="no_data", tested=tested,
                                    how=f"no point of {name} finished (every point raised or was refused)"))
            continue
        ok_rows = [chosen[v][0] for v in values]
        seeds = min(int(r.get("n_seeds") or 0) for r in ok_rows)
        steps = min((int(r["steps"]) for r in ok_rows if r.get("steps") is not None), default=None)
        common.update(seeds=seeds, steps=steps)
        verdicts = {t.value: t for t in tested}
        required = None
        for v in reversed(values):  # from the most demanding down, while every value passes
            if verdicts[v].verdict == "pass":
                required = v
            else:
                break
        weaker = values[: values.index(required)] if required is not None else values
        non_monotone = any(verdicts[v].verdict == "pass" for v in weaker)
        learned, twin_note = _twin_check(ok_rows)
        evidence = f"{seeds} seed{'s' if seeds != 1 else ''}" + (f", {steps} steps" if steps is not None else "")
        if learned is False:
            reqs.append(Requirement(**common, required=None, status="undetermined", tested=tested,
                                    non_monotone=non_monotone,
                                    how=f"Undetermined: {twin_note}, so a small gap says nothing about the device "
                                        f"({evidence}); train longer."))
            continue
        strongest = verdicts[values[-1]]
        if required is not None:
            t = verdicts[required]
            stronger = [f"{v} ({_fmt(verdicts[v].upper)})" for v in values[values.index(required) + 1:]]
            nxt = verdicts[weaker[-1]] if weaker else None
            sentence = (f"Met at {required}: the one-sided upper 95 % bound of the paired gap ({evidence}) is "
                        f"{_fmt(t.upper)} <= {tol:g} nats"
                        + (" and so is that of every more demanding tested value: " + ", ".join(stronger)
                           if stronger else " and no more demanding value was tested"))
            if nxt is not None:
                sentence += (f"; the next weaker value {nxt.value} "
                             + {"fail": "fails", "undecided": "is undecided", "pass": "passes"}[nxt.verdict]
                             + f" (bound {_fmt(nxt.upper)}, status {nxt.point_status})")
            reqs.append(Requirement(**common, required=required, status="met", tested=tested,
                                    non_monotone=non_monotone, how=sentence + ".",
                                    interval=(t.lo, t.hi)))
        elif strongest.verdict == "fail":
            why = (f"it is {strongest.point_status} (never passes; update cosine floor {COSINE_FLOOR:g})"
                   if strongest.point_status != "ok" else
                   f"its one-sided lower 95 % bound of the gap is above {tol:g} nats (mean {_fmt(strongest.gap)})")
            reqs.append(Requirement(**common, required=None, status="not_met", tested=tested,
                                    non_monotone=non_monotone,
                                    how=f"Not met: the most demanding tested value {strongest.value} fails: {why} "
                                        f"({evidence})."))
        else:
            why = ("one seed gives no interval" if strongest.n_seeds < 2 else
                   f"its 95 % interval [{_fmt(strongest.lo)}, {_fmt(strongest.hi)}] contains the tolerance {tol:g}")
            reqs.append(Requirement(**common, required=None, status="undetermined", tested=tested,
                                    non_monotone=non_monotone,
                                    how=f"Undetermined: the most demanding tested value {strongest.value} can be "
                                        f"neither passed nor failed: {why} ({evidence}); run more seeds or steps."))
    return reqs
