"""Compiled (numba) pulse kernels: one device's one pulse as a scalar function, per device rule.

The one home of the compiled physics. Each kernel means exactly what its rule in
`devices.physics` means (`DeviceRule.step`, then `DeviceRule.clip`), for one device and one
pulse, in float32 with every operation in the rule's order (constants rounded to float32 first,
as torch rounds a Python scalar in a float32 op): `tests/test_device_kernels.py` steps random
devices through both and asserts equality (bit for bit, or within a stated number of ulps where
the rule calls `exp`/`pow`, whose float32 implementations differ between torch and libm).

A kernel is registered per rule class (`register_kernel`) with the hidden parameters it reads
(`pack`: one (n_devices, K) float32 array, a device's K parameters side by side), the config
constants it reads and which of the rule's two noise forms a config uses (`alt`). `kernel_for(rule)` matches the rule's exact class (a subclass that
changes the physics must register its own kernel). Rules with kernels: ConstantStep,
LinearStep, SoftBounds, SoftBoundsReference, ExpStep, PowStep. Without: PiecewiseStep (and
Ideal, which takes no pulses): those use the torch path.

The pulse walkers (`apply_slot_trains`, `apply_pulse_list`) step the devices pulse after pulse in
the order given (time order), each pulse through the kernel with its own standard normal, one
thread; they are compiled per rule kind, noise on/off and noise form (constants, so the kernel
is inlined without branches on them). They live here, beside the scalar kernels, so that
numba's on-disk cache (`cache=True`, keyed on this file's contents) never pairs a walker with a
stale kernel.

numba is a project dependency; where it does not import, `AVAILABLE` is False and `kernel_for`
returns None (callers fall back to torch).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from .physics import (
    ConstantStepRule, DeviceRule, ExpStepRule, LinearStepRule, PowStepRule, SoftBoundsReferenceRule, SoftBoundsRule,
)

try:  # numba is a dependency (pyproject); the torch path stays the fallback where it is missing
    from numba import njit
    AVAILABLE = True
except ImportError:  # pragma: no cover - exercised by monkeypatching AVAILABLE in the tests
    AVAILABLE = False

    def njit(*args: Any, **kwargs: Any):  # type: ignore[no-redef]
        """Stand-in: the kernels stay plain Python (never called: `kernel_for` returns None)."""
        if args and callable(args[0]):
            return args[0]
        return lambda f: f

__all__ = ["Kernel", "KERNELS", "AVAILABLE", "register_kernel", "kernel_for", "pack", "step_each",
           "apply_slot_trains", "apply_pulse_list"]

# rule kinds (the scalar kernel's branch)
CONSTANT, LINEAR, SB_REFERENCE, EXP, POW = 0, 1, 2, 3, 4

_ONE = np.float32(1.0)
_TWO = np.float32(2.0)
_ZERO = np.float32(0.0)


@dataclass(frozen=True)
class Kernel:
    """A rule's kernel: its `kind`, the hidden parameters it reads (columns of the packed rows),
    `constants(cfg)`, the config values it reads (rounded to float32), and `alt(cfg)`, which of
    the rule's two noise forms the config uses (a compile-time constant of the walkers)."""

    kind: int
    hidden: tuple[str, ...]
    constants: Callable[[Any], tuple[float, ...]]
    alt: Callable[[Any], bool] = lambda cfg: False


KERNELS: dict[type, Kernel] = {}


def register_kernel(rule_type: type[DeviceRule], kind: int, hidden: tuple[str, ...],
                    constants: Callable[[Any], tuple[float, ...]],
                    alt: Callable[[Any], bool] = lambda cfg: False) -> None:
    KERNELS[rule_type] = Kernel(kind, hidden, constants, alt)


def kernel_for(rule: DeviceRule) -> Kernel | None:
    """The kernel of `rule`'s exact class; None without one or without numba."""
    return KERNELS.get(type(rule)) if AVAILABLE else None


def pack(kernel: Kernel, cfg: Any, hidden: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """(hp (n, K) float32, cp (C,) float32): the devices' hidden parameters of `kernel`, one row
    per device (flattened), and its config constants. `hidden`: torch tensors of one shape."""
    cols = [hidden[k].reshape(-1).float().cpu().numpy() for k in kernel.hidden]
    hp = np.ascontiguousarray(np.stack(cols, axis=1), dtype=np.float32)
    cp = np.asarray(kernel.constants(cfg), dtype=np.float32)
    return hp, cp


register_kernel(ConstantStepRule, CONSTANT, ("dwmin_up", "dwmin_down", "min_bound", "max_bound"),
                lambda c: (c.dw_min_std,))
for _rule in (LinearStepRule, SoftBoundsRule):
    register_kernel(_rule, LINEAR,
                    ("slope_up", "slope_down", "dwmin_up", "dwmin_down", "min_bound", "max_bound"),
                    lambda c: (c.dw_min_std,), lambda c: not c.mult_noise)
register_kernel(SoftBoundsReferenceRule, SB_REFERENCE,
                ("max_bound", "min_bound", "reference", "dwmin_up", "dwmin_down"),
                lambda c: (c.dw_min_std,), lambda c: not c.mult_noise)
register_kernel(ExpStepRule, EXP, ("max_bound", "min_bound", "dwmin_up", "dwmin_down"),
                lambda c: (c.a, c.b, c.A_up, c.A_down, c.gamma_up, c.gamma_down, c.dw_min_std, c.dw_min_std_add,
                           c.dw_min_std_slope), ExpStepRule._extra_noise)
register_kernel(PowStepRule, POW, ("max_bound", "min_bound", "dwmin_up", "dwmin_down", "gamma_up", "gamma_down"),
                lambda c: (c.dw_min_std,))


# ---------------------------------------------------------------------- scalar kernels
@njit(cache=True, inline="always")
def _clamp(v, lo, hi):
    """torch.clamp(v, lo, hi) = min(max(v, lo), hi)."""
    if v < lo:
        v = lo
    if v > hi:
        v = hi
    return v


@njit(cache=True, inline="always")
def _constant(w, up, xi, noisy, alt, hp, e, cp):
    """ConstantStepRule: w ± Δ±(1 + σξ), clipped to the bounds."""
    mag = hp[e, 0] if up else hp[e, 1]
    if noisy:
        mag = mag * (_ONE + cp[0] * xi)
    step = mag if up else -mag
    return _clamp(w + step, hp[e, 2], hp[e, 3])


@njit(cache=True, inline="always")
def _linear(w, up, xi, noisy, alt, hp, e, cp):
    """_LinearFamilyRule (LinearStep, SoftBounds): ±(slope±·w + Δ±), multiplicative (1 + σξ) or
    additive (Δ±σξ) noise, clipped to the bounds."""
    if up:
        slope, base = hp[e, 0], hp[e, 2]
    else:
        slope, base = hp[e, 1], hp[e, 3]
    if not noisy:
        mag = slope * w + base
    elif not alt:  # multiplicative noise
        mag = (slope * w + base) * (_ONE + cp[0] * xi)
    else:
        mag = slope * w + base * (_ONE + cp[0] * xi)
    step = mag if up else -mag
    return _clamp(w + step, hp[e, 4], hp[e, 5])


@njit(cache=True, inline="always")
def _sb_reference(w, up, xi, noisy, alt, hp, e, cp):
    """SoftBoundsReferenceRule: soft bounds acting on w + r; the pulse clips w + r to the bounds."""
    b_max, b_min, ref = hp[e, 0], hp[e, 1], hp[e, 2]
    wr = w + ref
    if up:
        bound, base = b_max, hp[e, 3]
        usable = bound > 0
    else:
        bound, base = b_min, hp[e, 4]
        usable = bound < 0
    shape_factor = _ONE - (wr / bound if usable else _ZERO)
    if not noisy:
        mag = base * shape_factor
    elif not alt:  # multiplicative noise
        mag = base * shape_factor * (_ONE + cp[0] * xi)
    else:
        mag = base * (shape_factor + cp[0] * xi)
    step = mag if up else -mag
    return _clamp((w + step) + ref, b_min, b_max) - ref


@njit(cache=True, inline="always")
def _exp(w, up, xi, noisy, alt, hp, e, cp):
    """ExpStepRule: y = max(1 − A·exp(±γz), 0), z = 2w/(b_max − b_min)·a + b; zero step where
    b_max − b_min <= 0; clipped to the bounds."""
    b_max, b_min = hp[e, 0], hp[e, 1]
    b_diff = b_max - b_min
    z = _TWO * w / b_diff * cp[0] + cp[1]
    if up:
        y = _ONE - cp[2] * np.exp(cp[4] * z)
        if y < 0:
            y = _ZERO
        dw = y * hp[e, 2]
    else:
        y = _ONE - cp[3] * np.exp(-cp[5] * z)
        if y < 0:
            y = _ZERO
        dw = -y * hp[e, 3]
    if noisy:
        if alt:  # dw_min_std_add / dw_min_std_slope
            dw = dw + cp[6] * (abs(dw) + cp[7] + cp[8] * abs(w)) * xi
        else:
            dw = dw * (_ONE + cp[6] * xi)
    if not b_diff > 0:
        dw = _ZERO
    return _clamp(w + dw, b_min, b_max)


@njit(cache=True, inline="always")
def _pow(w, up, xi, noisy, alt, hp, e, cp):
    """PowStepRule: up Δ⁺((b_max − w)/R)^γ⁺, down Δ⁻((w − b_min)/R)^γ⁻, R = b_max − b_min (zero
    step where R = 0); clipped to the bounds."""
    b_max, b_min = hp[e, 0], hp[e, 1]
    rng = b_max - b_min
    safe = rng if rng != 0 else _ONE
    if up:
        frac, gamma, base = (b_max - w) / safe, hp[e, 4], hp[e, 2]
    else:
        frac, gamma, base = (w - b_min) / safe, hp[e, 5], hp[e, 3]
    if frac < 0:
        frac = _ZERO
    mag = base * frac ** gamma
    if noisy:
        mag = mag * (_ONE + cp[0] * xi)
    step = mag if up else -mag
    if rng == 0:
        step = _ZERO
    return _clamp(w + step, b_min, b_max)


@njit(cache=True, inline="always")
def _pulse(kind, w, up, xi, noisy, alt, hp, e, cp):
    """Device e's weight after one pulse (up or down) with the standard normal xi (unused
    unless `noisy`; `alt`: the rule's other noise form, `Kernel.alt`): the rule's step, then its clip."""
    if kind == LINEAR:
        return _linear(w, up, xi, noisy, alt, hp, e, cp)
    if kind == SB_REFERENCE:
        return _sb_reference(w, up, xi, noisy, alt, hp, e, cp)
    if kind == CONSTANT:
        return _constant(w, up, xi, noisy, alt, hp, e, cp)
    if kind == EXP:
        return _exp(w, up, xi, noisy, alt, hp, e, cp)
    return _pow(w, up, xi, noisy, alt, hp, e, cp)


# ---------------------------------------------------------------------- walkers
@njit(cache=True)
def _step_each(kind, w, up, xi, noisy, alt, hp, cp):
    out = np.empty_like(w)
    for e in range(w.shape[0]):
        out[e] = _pulse(kind, w[e], up[e], xi[e], noisy, alt, hp, e, cp)
    return out


def step_each(kernel: Kernel, w: np.ndarray, up: np.ndarray, xi: np.ndarray | None, hp: np.ndarray,
              cp: np.ndarray, alt: bool) -> np.ndarray:
    """One pulse on every device e (direction up[e], normal xi[e]; None: noise-free): the new
    weights, clipped (for the kernel-vs-rule tests)."""
    noise = np.zeros_like(w) if xi is None else np.ascontiguousarray(xi, dtype=np.float32)
    return _step_each(kernel.kind, np.ascontiguousarray(w, dtype=np.float32), np.ascontiguousarray(up, dtype=np.bool_),
                      noise, xi is not None, alt, hp, cp)


def _make_walkers(kind: int, noisy: bool, alt: bool):
    """The two walkers compiled for one rule kind, with or without c2c noise, in one of the rule's
    two noise forms (closure constants: the kernel is inlined and its branches folded; numba
    compiles each combination on first use and caches it on disk separately)."""

    @njit(cache=True)
    def walk_trains(rows, cols, slot_sample, d_neg, x_neg, xi, w0, hp0, cp0, n0, w1, hp1, cp1, n1, pair):
        n_t, n_out = rows.shape
        n_in = cols.shape[1]
        fired = np.empty(n_in, np.int64)
        fired_neg = np.empty(n_in, np.bool_)
        k = 0
        x = _ZERO
        for t in range(n_t):
            s = slot_sample[t]
            nc = 0
            for j in range(n_in):
                if cols[t, j]:
                    fired[nc] = j
                    fired_neg[nc] = x_neg[s, j]
                    nc += 1
            if nc == 0:
                continue
            for i in range(n_out):
                if not rows[t, i]:
                    continue
                row_neg = d_neg[s, i]
                base = i * n_in
                for c in range(nc):
                    e = base + fired[c]
                    up = row_neg != fired_neg[c]  # sign(d_i)·sign(x_j) < 0: an up pulse
                    if noisy:
                        x = xi[k]
                    k += 1
                    # (the same six lines as in walk_list: a shared inline helper taking the
                    # sides as arguments made this walk 2x slower, 131x vs 68x a rank-k update)
                    if not pair:
                        n0[e] += 1
                        w0[e] = _pulse(kind, w0[e], up, x, noisy, alt, hp0, e, cp0)
                    elif up:  # an up pulse potentiates G⁺
                        n0[e] += 1
                        w0[e] = _pulse(kind, w0[e], True, x, noisy, alt, hp0, e, cp0)
                    else:  # a down pulse potentiates G⁻
                        n1[e] += 1
                        w1[e] = _pulse(kind, w1[e], True, x, noisy, alt, hp1, e, cp1)
        return k

    @njit(cache=True)
    def walk_list(element, signed, xi, w0, hp0, cp0, n0, w1, hp1, cp1, n1, pair):
        k = 0
        x = _ZERO
        for a in range(element.shape[0]):
            e = element[a]
            count = signed[a]
            up = count < 0
            if up:
                count = -count
            for _ in range(count):
                if noisy:
                    x = xi[k]
                k += 1
                if not pair:
                    n0[e] += 1
                    w0[e] = _pulse(kind, w0[e], up, x, noisy, alt, hp0, e, cp0)
                elif up:
                    n0[e] += 1
                    w0[e] = _pulse(kind, w0[e], True, x, noisy, alt, hp0, e, cp0)
                else:
                    n1[e] += 1
                    w1[e] = _pulse(kind, w1[e], True, x, noisy, alt, hp1, e, cp1)
        return k

    return walk_trains, walk_list


_WALKERS = {(kind, noisy, alt): _make_walkers(kind, noisy, alt)
            for kind in (CONSTANT, LINEAR, SB_REFERENCE, EXP, POW) for noisy in (False, True) for alt in (False, True)}


def _sides(sides: list[tuple[Kernel, Any, np.ndarray, np.ndarray, np.ndarray, np.ndarray]], noisy: bool):
    (k0, cfg0, *side0), (k1, cfg1, *side1) = sides[0], sides[-1]
    alt = bool(k0.alt(cfg0))
    if k0.kind != k1.kind or alt != bool(k1.alt(cfg1)):
        raise ValueError("both sides of a pair need the same kernel and noise form")
    return _WALKERS[(k0.kind, noisy, alt)], (*side0, *side1, len(sides) == 2)


def apply_slot_trains(rows: np.ndarray, cols: np.ndarray, slot_sample: np.ndarray, d_neg: np.ndarray,
                      x_neg: np.ndarray, xi: np.ndarray | None,
                      sides: list[tuple[Kernel, Any, np.ndarray, np.ndarray, np.ndarray, np.ndarray]]) -> int:
    """Walk stochastic slot trains in time order: slot after slot (`slot_sample[t]`: the slot's
    sample), in each slot every fired row i (rows[t, i]) times every fired column j (cols[t, j])
    steps device i·n_in + j once, in that order (row-major), down where d_neg[s, i] == x_neg[s, j]
    (sign(d_i)·sign(x_j) > 0), up elsewhere, with the next normal of `xi` (None: noise-free).

    `sides`: [(kernel, config, w, hp, cp, counts)] for one array, or (G⁺, G⁻) of a differential pair (up
    pulses potentiate G⁺, down pulses potentiate G⁻); `w` (n,) float32 (`hp`, `cp`: `pack`) is
    updated in place and `counts` (n,) int32 counts the pulses each device of that side takes.
    Returns the number of pulses."""
    noisy = xi is not None
    walkers, args = _sides(sides, noisy)
    noise = xi if noisy else np.zeros(1, np.float32)
    return int(walkers[0](rows, cols, slot_sample, d_neg, x_neg, noise, *args))


def apply_pulse_list(element: np.ndarray, signed: np.ndarray, xi: np.ndarray | None,
                     sides: list[tuple[Kernel, Any, np.ndarray, np.ndarray, np.ndarray, np.ndarray]]) -> int:
    """Walk a list of pulse entries in order: entry a gives device element[a] |signed[a]|
    consecutive pulses, up where signed[a] < 0, down where > 0; otherwise as `apply_slot_trains`."""
    noisy = xi is not None
    walkers, args = _sides(sides, noisy)
    noise = xi if noisy else np.zeros(1, np.float32)
    return int(walkers[1](element, signed, noise, *args))
