"""Fit a device config to measured up/down pulse traces (scipy.optimize), and read/write trace CSVs.

Trace CSV (UTF-8, a byte-order mark is accepted): header `trace,pulse,direction,value`. Within a
trace, rows are consecutive row numbers `pulse`; `value` is the weight read after that row's
pulse, whose direction is +1/up or −1/down; direction 0 is a read without a pulse (the initial
read, or a repeated read of the same state, from which the read noise is measured). Values are
weights, or conductances mapped linearly from [g_min, g_max] onto [−1, 1] when both are given;
conductances without a range (values that are not weights: all within (0, 0.01], or any beyond
±10) and values outside the given range (by more than `RANGE_SLACK` of it) are refused.

Method. The fitted device is one nominal device (every *_dtod = 0; the d2d spreads are not
identifiable from one device and are left for the user to set). Its noise-free step f(w; θ) is
fitted to the measured one-step changes Δw_k = w_k − w_{k−1} given the measured w_{k−1}
(`scipy.optimize.least_squares`), which is the unbiased regression for a Markov chain with
zero-mean cycle-to-cycle noise; the hard bounds enter through clipping. The c2c noise
`dw_min_std` is then estimated from the residuals (multiplicative form: σ̂² = Σr²/Σf²). Read noise
(independent per read, σ_r) adds 2σ_r² to every one-step residual; when the traces hold repeated
reads (direction 0 after a read), σ_r² = mean(Δ²)/2 over those pairs and the c2c estimate becomes
σ̂² = (Σr² − 2nσ_r²)/Σf². Without repeated reads, `dw_min_std` includes any read noise (an upper
bound), and the result says so.

Refusals (`FitRefused`, a ValueError): traces with no pulse response (the mean step after up
pulses not positive, or after down pulses not negative, by 3 standard errors), and a fit whose
trajectory error exceeds `MAX_TRAJECTORY_RMS` of (w_max − w_min).
Identifiable in ExpStep are only A_up·e^{γ_up b}, A_down·e^{−γ_down b} and γ·a/(w_max − w_min);
we report them with a = 1, b = 0.

Fit quality: `step_rms` is the RMS one-step residual relative to the mean |step| (≈ dw_min_std
for a perfect fit), `trajectory_rms` the RMS difference between the measured traces and the
noise-free fitted trajectory from each trace's first read, relative to (w_max − w_min).

NeuroSim-style nonlinearity: each monotone up (LTP) or down (LTD) segment is normalised to
x = P/P_max, y ∈ [0, 1] and fitted with NeuroSim's G(P) = B(1 − e^{−P/A}) + G_min, i.e.
y = (1 − e^{−νx})/(1 − e^{−ν}) with ν = P_max/A. The label is max_x(y − x)/0.099, which
reproduces NeuroSim V3's "Nonlinearity–normalized A" table (e.g. label 1.51 ↔ A/P_max = 0.8195,
3.01 ↔ 0.3853, 6.01 ↔ 0.1351) to three digits; LTD labels are reported negative, as papers do.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from scipy.optimize import least_squares, minimize_scalar

from ept_hw.config import check_choice

from .array import DeviceArray
from .configs import DeviceConfig, device_from_dict
from .response import default_n_steps, protocol_directions

__all__ = ["Trace", "FitResult", "FitRefused", "FIT_MODELS", "MAX_TRAJECTORY_RMS", "RANGE_SLACK", "read_traces",
           "write_traces", "generate_traces", "fit_device", "neurosim_label", "fit_nonlinearity"]

FIT_MODELS = ("soft_bounds", "linear_step", "exp_step", "pow_step")
_NO_D2D = {"dw_min_dtod": 0.0, "up_down_dtod": 0.0, "w_max_dtod": 0.0, "w_min_dtod": 0.0}
#: the largest trajectory error accepted, relative to (w_max - w_min): beyond it the model does not
#: describe the traces (a fit of pure noise gives several times the range)
MAX_TRAJECTORY_RMS = 0.25
#: conductances may exceed [g_min, g_max] by this fraction of (g_max - g_min) (read noise at the bounds)
RANGE_SLACK = 0.05


class FitRefused(ValueError):
    """Traces that cannot be fitted (the message says why)."""


@dataclass
class Trace:
    """One measured trace: `values[k]` read after pulse k with direction `direction[k]` (±1)."""

    name: str
    direction: np.ndarray
    values: np.ndarray


# ------------------------------------------------------------------ CSV
def _parse_direction(text: str, where: str) -> int:
    t = text.strip().lower()
    if t in ("+1", "1", "up", "+"):
        return 1
    if t in ("-1", "down", "-"):
        return -1
    if t in ("0", ""):
        return 0
    raise ValueError(f"{where}: direction {text!r} is not +1/up, -1/down (or 0 for the initial read)")


def read_traces(path: str | Path, g_min: float | None = None, g_max: float | None = None) -> list[Trace]:
    """Read a trace CSV (see module docstring); errors name the file, line and problem."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"trace file not found: {path}")
    if (g_min is None) != (g_max is None):
        raise ValueError("give both --g-min and --g-max (or neither)")
    if g_min is not None and not g_max > g_min:
        raise ValueError(f"g_max ({g_max}) must be larger than g_min ({g_min})")
    rows: dict[str, list[tuple[int, int, float]]] = {}
    with path.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.reader(fh)
        header = next(reader, None)
        if header is None:
            raise ValueError(f"{path}: empty file (expected header trace,pulse,direction,value)")
        header = [h.strip().lower() for h in header]
        if header != ["trace", "pulse", "direction", "value"]:
            raise ValueError(f"{path}:1: header is {','.join(header)!r}, expected 'trace,pulse,direction,value'")
        for lineno, row in enumerate(reader, start=2):
            if not row or all(not c.strip() for c in row):
                continue
            where = f"{path}:{lineno}"
            if len(row) != 4:
                raise ValueError(f"{where}: {len(row)} columns, expected 4 (trace,pulse,direction,value)")
            name, pulse_s, dir_s, value_s = row
            try:
                pulse = int(pulse_s)
            except ValueError:
                raise ValueError(f"{where}: pulse {pulse_s!r} is not an integer") from None
            try:
                value = float(value_s)
            except ValueError:
                raise ValueError(f"{where}: value {value_s!r} is not a number") from None
            if not math.isfinite(value):
                raise ValueError(f"{where}: value {value_s!r} is not finite")
            direction = _parse_direction(dir_s, where)
            rows.setdefault(name.strip(), []).append((pulse, direction, value))
    if not rows:
        raise ValueError(f"{path}: no data rows")
    traces = []
    for name, items in rows.items():
        items.sort()
        pulses = np.array([p for p, _, _ in items])
        if len(items) < 3:
            raise ValueError(f"{path}: trace {name!r} has {len(items)} rows; at least 3 are needed")
        if np.any(np.diff(pulses) != 1):
            bad = int(np.nonzero(np.diff(pulses) != 1)[0][0])
            raise ValueError(f"{path}: trace {name!r} pulses are not consecutive ({pulses[bad]} then {pulses[bad + 1]})")
        values = np.array([v for _, _, v in items], dtype=np.float64)
        if g_min is not None:
            lo, hi = g_min - RANGE_SLACK * (g_max - g_min), g_max + RANGE_SLACK * (g_max - g_min)
            out = (values < lo) | (values > hi)
            if out.any():
                raise FitRefused(
                    f"{path}: trace {name!r} has {int(out.sum())} values outside --g-min/--g-max [{g_min:g}, {g_max:g}] "
                    f"(they span [{values.min():g}, {values.max():g}]); give the range the conductances were measured in")
            values = 2.0 * (values - g_min) / (g_max - g_min) - 1.0
        elif values.max() > 10.0 or values.min() < -10.0 or (values.min() > 0.0 and values.max() <= 1e-2):
            raise FitRefused(
                f"{path}: trace {name!r} values span [{values.min():g}, {values.max():g}]: these look like conductances, "
                "not weights; give --g-min and --g-max (the conductances mapped to weights -1 and +1)")
        traces.append(Trace(name, np.array([d for _, d, _ in items]), values))
    return traces


def write_traces(path: str | Path, traces: list[Trace]) -> None:
    """Write traces in the CSV format `read_traces` reads (pulse 0 = initial read, direction 0)."""
    with Path(path).open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["trace", "pulse", "direction", "value"])
        for tr in traces:
            for k, (d, v) in enumerate(zip(tr.direction, tr.values)):
                w.writerow([tr.name, k, int(d), repr(float(v))])


def generate_traces(config: DeviceConfig, *, n_traces: int = 4, n_steps: int | None = None,
                    n_loops: int = 2, seed: int = 0) -> list[Trace]:
    """Pulse-response traces of `n_traces` devices of `config` (starting at w_min): test data."""
    n_steps = default_n_steps(config) if n_steps is None else n_steps
    g = torch.Generator().manual_seed(seed)
    arr = DeviceArray(config, (n_traces,), g, dtype=torch.float64)
    arr.set_weights(torch.full((n_traces,), config.w_min, dtype=torch.float64), g)
    directions = protocol_directions(n_steps, n_loops)
    reads = [arr.weights.clone()]
    for d in directions:
        arr.pulse_once(bool(d > 0), g)
        reads.append(arr.weights.clone())
    values = torch.stack(reads).numpy()
    dirs = np.concatenate([[0], directions])
    return [Trace(f"t{i}", dirs.copy(), values[:, i].copy()) for i in range(n_traces)]


# ------------------------------------------------------------------ models
@dataclass(frozen=True)
class _Model:
    names: tuple[str, ...]
    step: Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]   # (theta, w, up) -> signed step
    lower: tuple[float, ...]
    upper: tuple[float, ...]


def _split(theta):
    return [float(t) for t in theta]


def _sb_step(th, w, up):
    du, dd, wmax, wmin = th
    return np.where(up, du * (1 - w / wmax), -dd * (1 - w / wmin))


def _ls_step(th, w, up):
    du, dd, gu, gd, wmax, wmin = th
    return np.where(up, du * (1 - gu * w / wmax), -dd * (1 - gd * w / wmin))


def _es_step(th, w, up):
    du, dd, cu, ku, cd, kd, wmax, wmin = th
    with np.errstate(over="ignore"):
        yu = np.maximum(1 - cu * np.exp(np.minimum(ku * w, 700)), 0)
        yd = np.maximum(1 - cd * np.exp(np.minimum(-kd * w, 700)), 0)
    return np.where(up, du * yu, -dd * yd)


def _ps_step(th, w, up):
    du, dd, gu, gd, wmax, wmin = th
    r = wmax - wmin
    fu = np.clip((wmax - w) / r, 0, None) ** gu
    fd = np.clip((w - wmin) / r, 0, None) ** gd
    return np.where(up, du * fu, -dd * fd)


_INF = np.inf
MODELS: dict[str, _Model] = {
    "soft_bounds": _Model(("dw_up", "dw_down", "w_max", "w_min"), _sb_step,
                          (0, 0, 1e-6, -_INF), (_INF, _INF, _INF, -1e-6)),
    "linear_step": _Model(("dw_up", "dw_down", "gamma_up", "gamma_down", "w_max", "w_min"), _ls_step,
                          (0, 0, -_INF, -_INF, 1e-6, -_INF), (_INF, _INF, _INF, _INF, _INF, -1e-6)),
    "exp_step": _Model(("dw_up", "dw_down", "C_up", "k_up", "C_down", "k_down", "w_max", "w_min"), _es_step,
                       (0, 0, -_INF, -50, -_INF, -50, 1e-6, -_INF), (_INF, _INF, _INF, 50, _INF, 50, _INF, -1e-6)),
    "pow_step": _Model(("dw_up", "dw_down", "gamma_up", "gamma_down", "w_max", "w_min"), _ps_step,
                       (0, 0, 0, 0, 1e-6, -_INF), (_INF, _INF, 20, 20, _INF, -1e-6)),
}


def _pair_to_bias(up: float, down: float) -> tuple[float, float]:
    """(scale, up_down) with aihwkit's bias convention: up = (1 + min(ud, 0))·scale, down = (1 − max(ud, 0))·scale."""
    scale = max(up, down)
    if scale <= 0:
        return 0.0, 0.0
    return scale, (1.0 - down / scale) if up >= down else (up / scale - 1.0)


def _to_config(model: str, th: list[float], dw_min_std: float) -> DeviceConfig:
    common = {"dw_min_std": dw_min_std, **_NO_D2D}
    if model == "soft_bounds":
        du, dd, wmax, wmin = th
        dw, ud = _pair_to_bias(du, dd)
        return device_from_dict({"model": model, "dw_min": dw, "up_down": ud, "w_max": wmax, "w_min": wmin, **common})
    if model == "linear_step":
        du, dd, gu, gd, wmax, wmin = th
        dw, ud = _pair_to_bias(du, dd)
        return device_from_dict({"model": model, "dw_min": dw, "up_down": ud, "w_max": wmax, "w_min": wmin,
                                 "gamma_up": gu, "gamma_down": gd, "gamma_up_dtod": 0.0, "gamma_down_dtod": 0.0,
                                 "allow_increasing": gu < 0 or gd < 0, "mean_bound_reference": True, **common})
    if model == "exp_step":
        du, dd, cu, ku, cd, kd, wmax, wmin = th
        dw, ud = _pair_to_bias(du, dd)
        half_span = 0.5 * (wmax - wmin)
        return device_from_dict({"model": model, "dw_min": dw, "up_down": ud, "w_max": wmax, "w_min": wmin,
                                 "a": 1.0, "b": 0.0, "A_up": cu, "gamma_up": ku * half_span,
                                 "A_down": cd, "gamma_down": kd * half_span, **common})
    du, dd, gu, gd, wmax, wmin = th
    dw, ud = _pair_to_bias(du, dd)
    pg, pud = _pair_to_bias(gu, gd)
    return device_from_dict({"model": model, "dw_min": dw, "up_down": ud, "w_max": wmax, "w_min": wmin,
                             "pow_gamma": pg, "pow_up_down": pud, "pow_gamma_dtod": 0.0, "pow_up_down_dtod": 0.0,
                             **common})


# ------------------------------------------------------------------ nonlinearity label
def neurosim_label(nu: float) -> float:
    """NeuroSim's nonlinearity label for y = (1 − e^{−νx})/(1 − e^{−ν}) (ν = P_max/A)."""
    if abs(nu) < 1e-9:
        return 0.0
    x = np.linspace(0.0, 1.0, 20001)
    y = -np.expm1(-abs(nu) * x) / -np.expm1(-abs(nu))
    return math.copysign(float(np.max(y - x)) / 0.099, nu)


def fit_nonlinearity(traces: list[Trace]) -> tuple[float, float]:
    """(LTP label, LTD label) from the longest monotone up and down segments of the traces."""
    ups, downs = [], []
    for tr in traces:
        keep = tr.direction != 0
        keep[0] = True  # repeated reads (direction 0) do not split a monotone segment
        d, values = tr.direction[keep], tr.values[keep]
        k = 1
        while k < len(d):
            j = k
            while j + 1 < len(d) and d[j + 1] == d[k]:
                j += 1
            seg = values[k - 1:j + 1]           # read before the segment, then after each pulse
            if len(seg) >= 5:
                (ups if d[k] > 0 else downs).append(seg)
            k = j + 1

    def label(segments: list[np.ndarray]) -> float:
        if not segments:
            return float("nan")
        xs, ys = [], []
        for seg in segments:
            span = seg[-1] - seg[0]
            if span == 0:
                continue
            xs.append(np.linspace(0, 1, len(seg)))
            ys.append((seg - seg[0]) / span)
        if not xs:
            return float("nan")
        x, y = np.concatenate(xs), np.concatenate(ys)

        def loss(nu: float) -> float:
            if abs(nu) < 1e-6:
                return float(np.sum((y - x) ** 2))
            return float(np.sum((y - np.expm1(-nu * x) / np.expm1(-nu)) ** 2))

        nu = minimize_scalar(loss, bounds=(-30, 30), method="bounded").x
        return neurosim_label(nu)

    # y is the fraction of the segment's change done after x·P_max pulses, in both directions,
    # so a saturating LTD curve has ν > 0 like LTP; its label carries the papers' minus sign.
    return label(ups), -label(downs)


# ------------------------------------------------------------------ fit
@dataclass
class FitResult:
    model: str
    config: DeviceConfig
    params: dict[str, float]
    dw_min_std: float
    step_rms: float
    trajectory_rms: float
    nonlinearity_ltp: float
    nonlinearity_ltd: float
    n_pulses: int
    extra: dict[str, Any] = field(default_factory=dict)
    read_noise: float | None = None  # std of one read (weight units), from repeated reads; None: none in the traces


def _initial(model: str, w: np.ndarray, dw: np.ndarray, up: np.ndarray) -> np.ndarray:
    wmax, wmin = float(w.max()), float(w.min())
    wmax = max(wmax, 1e-3)
    wmin = min(wmin, -1e-3)
    du = float(np.median(np.abs(dw[up]))) if up.any() else 1e-3
    dd = float(np.median(np.abs(dw[~up]))) if (~up).any() else 1e-3
    du, dd = max(du, 1e-9), max(dd, 1e-9)
    if model == "soft_bounds":
        return np.array([du, dd, wmax, wmin])
    if model == "linear_step":
        return np.array([du, dd, 0.5, 0.5, wmax, wmin])
    if model == "exp_step":
        return np.array([du, dd, 0.05, 1.0, 0.05, 1.0, wmax, wmin])
    return np.array([du, dd, 1.0, 1.0, wmax, wmin])


def _simulate(model: _Model, th, traces: list[Trace]) -> list[np.ndarray]:
    out = []
    wmax, wmin = th[-2], th[-1]
    for tr in traces:
        w = np.empty(len(tr.values))
        w[0] = tr.values[0]
        ups = tr.direction > 0
        for k in range(1, len(w)):
            if tr.direction[k] == 0:  # a read without a pulse
                w[k] = w[k - 1]
                continue
            w[k] = min(max(w[k - 1] + float(model.step(th, np.array(w[k - 1]), np.array(ups[k]))), wmin), wmax)
        out.append(w)
    return out


def fit_device(traces: list[Trace], model: str) -> FitResult:
    """Fit `model` (one of FIT_MODELS) to the traces; see the module docstring for the method."""
    check_choice("model", model, FIT_MODELS)
    if not traces:
        raise ValueError("no traces to fit")
    w_prev_all = np.concatenate([t.values[:-1] for t in traces])
    w_next_all = np.concatenate([t.values[1:] for t in traces])
    d_all = np.concatenate([t.direction[1:] for t in traces])
    pulsed = d_all != 0
    repeat = w_next_all[~pulsed] - w_prev_all[~pulsed]
    read_noise = float(np.sqrt(np.mean(repeat ** 2) / 2.0)) if repeat.size >= 2 else None
    w_prev, w_next, up = w_prev_all[pulsed], w_next_all[pulsed], d_all[pulsed] > 0
    dw = w_next - w_prev
    if up.all() or (~up).all():
        raise FitRefused("the traces need both up and down pulses to fit up and down steps")
    _check_response(dw, up)
    m = MODELS[model]
    scale = float(np.mean(np.abs(dw))) or 1.0
    # A hard bound the traces ran into shows as the same read repeated (no read noise): it is
    # then fixed at that value, since the clipping makes the loss non-smooth in the bound.
    all_values = np.concatenate([t.values for t in traces])
    fixed: dict[int, float] = {}
    n_par = len(m.names)
    for index, extreme in ((n_par - 2, all_values.max()), (n_par - 1, all_values.min())):
        hits = int(np.sum(all_values == extreme))
        if hits >= 3 and (extreme > 0 if index == n_par - 2 else extreme < 0):
            fixed[index] = float(extreme)
    free = [i for i in range(n_par) if i not in fixed]

    def full(x: np.ndarray) -> np.ndarray:
        th = np.empty(n_par)
        th[free] = x
        for i, v in fixed.items():
            th[i] = v
        return th

    def residual(x: np.ndarray) -> np.ndarray:
        th = full(x)
        pred = np.clip(w_prev + m.step(th, w_prev, up), th[-1], th[-2]) - w_prev
        return (pred - dw) / scale

    best = None
    starts = [_initial(model, w_prev, dw, up)]
    if model == "exp_step":  # the exponential terms have several basins: try both signs of curvature
        base = starts[0]
        starts += [np.concatenate([base[:2], [c, k, c, k], base[-2:]]) for c, k in ((0.3, 3.0), (-0.3, -3.0))]
    lower, upper = np.array(m.lower)[free], np.array(m.upper)[free]
    for th0 in starts:
        x0 = np.clip(th0[free], lower + 1e-12, upper - 1e-12)
        res = least_squares(residual, x0, bounds=(lower, upper), x_scale="jac", method="trf",
                            tr_solver="lsmr", max_nfev=400 * len(x0))
        if best is None or res.cost < best.cost:
            best = res
    best.x = full(best.x)
    th = best.x
    f = m.step(th, w_prev, up)
    pred = np.clip(w_prev + f, th[-1], th[-2]) - w_prev
    r = dw - pred
    inside = (w_next > th[-1] + 1e-12) & (w_next < th[-2] - 1e-12) & (np.abs(f) > 0)
    sigma = 0.0
    if inside.any():
        excess = float(np.sum(r[inside] ** 2)) - (2.0 * read_noise ** 2 * int(inside.sum()) if read_noise else 0.0)
        sigma = float(np.sqrt(max(excess, 0.0) / np.sum(f[inside] ** 2)))
    sims = _simulate(m, th, traces)
    span = th[-2] - th[-1]
    traj = float(np.sqrt(np.mean(np.concatenate([(s - t.values) ** 2 for s, t in zip(sims, traces)])))) / span
    if not traj <= MAX_TRAJECTORY_RMS:
        raise FitRefused(f"the {model} fit does not describe the traces: trajectory error {traj:.3g} of (w_max - w_min), "
                         f"above the bound {MAX_TRAJECTORY_RMS}; try another --model or check the data")
    config = _to_config(model, _split(th), sigma)
    ltp, ltd = fit_nonlinearity(traces)
    return FitResult(model=model, config=config, params=dict(zip(m.names, _split(th))), dw_min_std=sigma,
                     step_rms=float(np.sqrt(np.mean(r ** 2))) / float(np.mean(np.abs(pred)) or 1.0),
                     trajectory_rms=traj, nonlinearity_ltp=ltp, nonlinearity_ltd=ltd, n_pulses=len(dw),
                     extra={"bounds_seen": {"w_max": (n_par - 2) in fixed, "w_min": (n_par - 1) in fixed},
                            "repeated_reads": int(repeat.size)},
                     read_noise=read_noise)


def _check_response(dw: np.ndarray, up: np.ndarray) -> None:
    """Refuse traces whose mean step does not follow the pulses (3 standard errors)."""
    for mask, sign, what in ((up, 1.0, "up"), (~up, -1.0, "down")):
        steps = dw[mask]
        mean = float(np.mean(steps))
        se = float(np.std(steps) / math.sqrt(len(steps))) if len(steps) > 1 else math.inf
        if not sign * mean > 3.0 * se:
            raise FitRefused(f"no pulse response: the mean change after {what} pulses is {mean:+.3g} "
                             f"(standard error {se:.2g}, {len(steps)} pulses), not {'positive' if sign > 0 else 'negative'}; "
                             "the traces show no device to fit")
