"""Pulsed outer-product update: aihwkit `UpdateParameters`, BL/UM management, pulse trains.

Sign convention (aihwkit `updateMatrix`): ΔW = −lr·Σₙ dₙ xₙᵀ in expectation. A coincidence of
slot pulses on row i and column j with sign(x_j)·sign(d_i) > 0 is a **down** pulse.

Per sample n (SEMANTICS §1.2, aihwkit `calculateBlAB`, `performUpdateManagement` and the CUDA
`kernelUMGetScaleAndKValues`), with g the device granularity:
- base: BL = desired_bl, A = B = sqrt(lr/(g·BL)); with `fixed_bl=False` (and UBLM off) and
  g·desired_bl < lr: A = B = 1, BL = ceil(lr/g);
- x_max = max(|xₙ|_∞, g²), d_max = max(|dₙ|_∞·um_grad_scale, g²), k = lr·x_max·d_max/g;
- UBLM: BLₙ = min(ceil(k), desired_bl), A = B = sqrt(lr/(g·BLₙ));
- UM (forced on by UBLM): if k > BL then d_max *= BL/k (the requested update is truncated);
  A *= sqrt(x_max/d_max), B *= sqrt(d_max/x_max);
- row i fires in each of the BLₙ slots with probability min(A|d_i|, 1), column j with
  min(B|x_j|, 1); the coincidence count is Σ_slots of the products.

Update modes (`UpdateParameters.mode`; aihwkit has only the first):
- ``"exact"``: Bernoulli slot trains per sample, coincidences counted per sample, applied to the
  devices sample after sample, pulse by pulse, through the device's own rule (the reference;
  exact in distribution for every device model). The trains of a chunk of samples are kept as
  the fired rows and columns of each slot (`sample_trains`: work ∝ pulses, not samples ×
  devices) and applied by `apply_per_sample`: by a compiled walk in time order (numba,
  `devices.kernels`: slot after slot, every fired row times every fired column stepping its
  device once through the rule's scalar kernel, with its own c2c normal from `devices.normals`,
  then the clip) where
  every array is float32 on the CPU and its rule has a kernel; elsewhere (CUDA, float64,
  PiecewiseStep, numba missing) by torch ops: each pulse ranked by the device's earlier pulses,
  the devices sorted by their number of pulses so that each rank is a contiguous prefix, then
  stepped rank after rank (one pulse per device per rank, in time order).
- ``"fast"``: per element, the up and down coincidence counts of the whole batch drawn at once
  from a binomial with the exact mean and variance of the sum of the per-sample counts (see
  `fast_counts`); applied in one `DeviceArray.apply_pulses` call (the device's own order:
  alternating up/down pairs, then the surplus). Approximations: the correlation between elements
  that share a slot train is dropped, the count distribution is a moment-matched binomial rather
  than the exact Poisson-binomial, and the per-sample order of pulses is replaced by the
  device's alternating order. When some device gets more than `fast_exact_max_pulses` pulses,
  the n-pulse response is integrated instead of simulated pulse by pulse: `fast_substeps` Euler
  steps of dw/dn with the device's noise-free mean steps (pairs drift by Δ⁺(w) − Δ⁻(w), the
  surplus moves by its own direction), plus Gaussian cycle-to-cycle noise with the variance of the
  sum of the per-pulse noises (dw_min_std·|mean step| per pulse; dw_min_std·dw_min for
  additive-noise models).
- ``"expected"``: no sampling: ΔW = μ_up·Δ⁺(W) − μ_down·Δ⁻(W) with the device's noise-free
  mean step at the current weight (`DeviceArray.mean_step`); linearised in the number of pulses.

`pulse_type="deterministic_implicit"` replaces the trains by nₙᵢⱼ = round(BLₙ·pᵢ·qⱼ) per sample
(probabilities first rounded to `x_res_implicit`/`d_res_implicit` when set);
`pulse_type="none"` is a float update (W −= lr·Σ d xᵀ, clipped to the device bounds).
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from devices import kernels, normals
from devices.physics import select
from ept_hw.config import check_choice, check_positive_int, check_finite_range

__all__ = ["UpdateParameters", "PulsePlan", "PulseEvents", "SlotTrains", "plan_pulses", "sample_counts_per_sample",
           "sample_coincidences", "sample_events", "sample_trains", "expected_counts", "fast_counts", "deterministic_counts_per_sample",
           "deterministic_coincidences", "deterministic_events", "apply_per_sample", "PULSE_TYPES", "UPDATE_MODES"]

PULSE_TYPES = ("stochastic_compressed", "deterministic_implicit", "none")
UPDATE_MODES = ("exact", "fast", "expected")

# Largest number of (sample, row, column) count entries materialised at once.
_CHUNK_ELEMENTS = 1 << 23
# Padded coincidence entries `sample_events` materialises at once, and expected coincidences
# (pulses) one chunk of `apply_per_sample` handles (its fixed cost per chunk: one product
# rowsᵀ·cols, a sort of the array's devices, their weights gathered and written back).
_GEN_ELEMENTS = 1 << 20
_EXACT_ENTRIES = 1 << 21


@dataclass(frozen=True)
class UpdateParameters:
    """aihwkit `UpdateParameters` (names and defaults of aihwkit 1.2) plus our `mode`."""

    desired_bl: int = 31
    fixed_bl: bool = True
    pulse_type: str = "stochastic_compressed"
    update_bl_management: bool = True
    update_management: bool = True
    um_grad_scale: float = 1.0
    x_res_implicit: float = 0.0
    d_res_implicit: float = 0.0
    mode: str = "fast"
    fast_substeps: int = 8
    fast_exact_max_pulses: int = 16

    def __post_init__(self) -> None:
        check_positive_int("desired_bl", self.desired_bl)
        check_choice("pulse_type", self.pulse_type, PULSE_TYPES)
        check_choice("mode", self.mode, UPDATE_MODES)
        check_finite_range("um_grad_scale", self.um_grad_scale, 0.0, lo_open=True)
        check_finite_range("x_res_implicit", self.x_res_implicit, 0.0)
        check_finite_range("d_res_implicit", self.d_res_implicit, 0.0)
        check_positive_int("fast_substeps", self.fast_substeps)
        check_positive_int("fast_exact_max_pulses", self.fast_exact_max_pulses, minimum=0)

    @property
    def um_effective(self) -> bool:
        """aihwkit forces update management on whenever UBLM is on."""
        return self.update_management or self.update_bl_management


class PulsePlan:
    """Per-sample pulse-train parameters: slot count BL (N,), row factor A (N, 1) and column
    factor B (N, 1). The signed row probabilities ps = clip(A·d, −1, 1) (N, out) and column
    probabilities qs = clip(B·x, −1, 1) (N, in) are built on first use: |ps|, |qs| are the firing
    probabilities, their signs those of d and x. `unclipped` is true when no probability reaches
    1, so that BL·p·q = lr·|d x|/g exactly (no truncation)."""

    def __init__(self, bl: Tensor, a: Tensor, b: Tensor, x: Tensor, d: Tensor, lr: float, granularity: float,
                 unclipped: bool):
        self.bl, self.a, self.b = bl, a, b
        self.x, self.d = x, d
        self.lr, self.granularity = lr, granularity
        self.unclipped = unclipped
        self._ps: Tensor | None = None
        self._qs: Tensor | None = None

    @property
    def ps(self) -> Tensor:
        if self._ps is None:
            self._ps = (self.d * self.a).clamp_(-1.0, 1.0)
        return self._ps

    @property
    def qs(self) -> Tensor:
        if self._qs is None:
            self._qs = (self.x * self.b).clamp_(-1.0, 1.0)
        return self._qs

    @property
    def p(self) -> Tensor:
        return self.ps.abs()

    @property
    def q(self) -> Tensor:
        return self.qs.abs()

    @property
    def d_sign(self) -> Tensor:
        return torch.sign(self.d)

    @property
    def x_sign(self) -> Tensor:
        return torch.sign(self.x)


def _check_inputs(x: Tensor, d: Tensor, lr: float, granularity: float) -> None:
    if x.dim() != 2 or d.dim() != 2 or x.shape[0] != d.shape[0]:
        raise ValueError(f"pulse plan needs x (N, in) and d (N, out), got {tuple(x.shape)} and {tuple(d.shape)}")
    if not (lr >= 0.0) or math.isinf(lr):
        raise ValueError(f"learning rate must be finite and >= 0 (aihwkit), got {lr}")
    if not granularity > 0.0:
        raise ValueError(f"pulsed update needs a device granularity > 0, got {granularity}")


def _abs_max(v: Tensor) -> Tensor:
    lo, hi = torch.aminmax(v, dim=1, keepdim=True)  # one pass instead of abs + amax
    return torch.maximum(-lo, hi)


def plan_pulses(x: Tensor, d: Tensor, lr: float, granularity: float, up: UpdateParameters) -> PulsePlan:
    """BL, A, B per sample (module docstring)."""
    _check_inputs(x, d, lr, granularity)
    n = x.shape[0]
    g = granularity
    dtype, dev = x.dtype, x.device
    if lr == 0.0:
        zero = torch.zeros(n, 1, dtype=dtype, device=dev)
        return PulsePlan(torch.zeros(n, dtype=torch.long, device=dev), zero, zero, x, d, lr, g, True)
    if up.fixed_bl or up.update_bl_management or g * up.desired_bl >= lr:
        base_bl, a_base = up.desired_bl, math.sqrt(lr / (g * up.desired_bl))
    else:
        base_bl, a_base = max(math.ceil(lr / g), 1), 1.0
    bl = torch.full((n,), base_bl, dtype=torch.long, device=dev)
    x_abs_max, d_abs_max = _abs_max(x), _abs_max(d)
    if up.um_effective:
        reg = g * g
        x_max = x_abs_max.clamp_min(reg)
        d_max = (d_abs_max * up.um_grad_scale).clamp_min(reg)
        k = lr * x_max * d_max / g
        if up.update_bl_management:
            bl = torch.ceil(k).squeeze(1).clamp(1, up.desired_bl).long()
            a = torch.sqrt(lr / (g * bl.to(dtype))).unsqueeze(1)
        else:
            a = torch.full((n, 1), a_base, dtype=dtype, device=dev)
        kmax = bl.to(dtype).unsqueeze(1)
        d_max = torch.where(k > kmax, d_max * kmax / k, d_max)
        ratio = torch.sqrt(x_max / d_max)
        a, b = a * ratio, a / ratio
    else:
        a = torch.full((n, 1), a_base, dtype=dtype, device=dev)
        b = a.clone()
    unclipped = bool(((a * d_abs_max).max() <= 1.0) & ((b * x_abs_max).max() <= 1.0))
    return PulsePlan(bl, a, b, x, d, lr, g, unclipped)


def _split_by_sign(counts: Tensor, d_sign: Tensor, x_sign: Tensor) -> tuple[Tensor, Tensor]:
    """(…, out, in) non-negative coincidence counts -> (n_up, n_down): s = sign(d)·sign(x) > 0 is down."""
    s = d_sign.unsqueeze(-1) * x_sign.unsqueeze(-2)
    zero = torch.zeros((), dtype=counts.dtype, device=counts.device)
    return torch.where(s < 0, counts, zero), torch.where(s > 0, counts, zero)


def _chunks(n: int, per_sample: int, elements: int = _CHUNK_ELEMENTS):
    size = max(1, elements // max(per_sample, 1))
    for start in range(0, n, size):
        yield slice(start, min(n, start + size))


def sample_counts_per_sample(plan: PulsePlan, generator: torch.Generator, chunk: slice | None = None
                             ) -> tuple[Tensor, Tensor]:
    """Exact stochastic-compressed trains: per-sample (n_up, n_down), each (N, out, in), float.

    Row and column Bernoulli trains are drawn for every slot of every sample; counts are the
    number of slots in which both fire (a batched product of the 0/1 trains).
    """
    sl = chunk if chunk is not None else slice(0, plan.bl.shape[0])
    return _split_by_sign(sample_coincidences(plan, generator, sl), plan.d_sign[sl], plan.x_sign[sl])


def sample_coincidences(plan: PulsePlan, generator: torch.Generator, chunk: slice | None = None,
                        signed: bool = False) -> Tensor:
    """The coincidence counts of `sample_counts_per_sample` before the split by sign, (N, out, in):
    the same draws in the same order. `signed`: times sign(d_i)·sign(x_j) (> 0: down pulses).

    Dense: the (N, BL, out) and (N, BL, in) trains in one batched product, for small batches
    (a pair's refresh, the reference tests). The exact mode keeps the same trains sparsely
    (`sample_trains`; `sample_events` lists their coincidences: the same distribution, other draws)."""
    sl = chunk if chunk is not None else slice(0, plan.bl.shape[0])
    bl, p, q = plan.bl[sl], plan.p[sl], plan.q[sl]
    n, n_out, n_in = p.shape[0], p.shape[1], q.shape[1]
    if n == 0:
        z = torch.zeros(0, n_out, n_in, dtype=p.dtype, device=p.device)
        return z, z.clone()
    bl_max = int(bl.max())
    slot_on = (torch.arange(bl_max, device=p.device).unsqueeze(0) < bl.unsqueeze(1)).to(p.dtype)  # (N, BL)

    def draw(probs: Tensor) -> Tensor:
        u = torch.rand((n, bl_max, probs.shape[1]), generator=generator, device=generator.device,
                       dtype=probs.dtype).to(probs.device)
        return (u < probs.unsqueeze(1)).to(probs.dtype) * slot_on.unsqueeze(2)

    rows = draw(p)  # (N, BL, out)
    cols = draw(q)  # (N, BL, in)
    if signed:  # a sign per row and per column: fold it into the trains (exact: ±1 times 0/1)
        rows.mul_(plan.d_sign[sl].unsqueeze(1))
        cols.mul_(plan.x_sign[sl].unsqueeze(1))
    return torch.bmm(rows.transpose(1, 2), cols)


class PulseEvents:
    """The coincidences of a run of consecutive samples, sample after sample, as a sparse list.

    `per_sample`: the number of entries of each sample (a list of ints, in sample order);
    `element` (E,) int32: the flat device index i·n_in + j; `signed` (E,) int16: the entry's pulse
    count, times +1 for down pulses and −1 for up pulses (sign(d_i)·sign(x_j) > 0 is down). A
    device may have several entries in one sample (stochastic trains: one per slot in which its
    row and its column both fired), always with the same sign. `groups`: the entries split into
    consecutive runs (each within one sample) in which no device appears twice: the slots of a
    stochastic train; default `per_sample` (one entry per device and sample)."""

    def __init__(self, per_sample: list[int], element: Tensor, signed: Tensor, groups: list[int] | None = None):
        self.per_sample, self.element, self.signed = per_sample, element, signed
        self.groups = per_sample if groups is None else groups

    def sample_index(self) -> Tensor:
        """(E,) the sample (counted from the run's first) of each entry."""
        dev = self.element.device
        counts = torch.tensor(self.per_sample, dtype=torch.long, device=dev)
        return torch.repeat_interleave(torch.arange(len(self.per_sample), device=dev), counts)

    def dense(self, shape: tuple[int, int], dtype: torch.dtype) -> Tensor:
        """(S, out, in) signed counts: the entries summed per sample and device."""
        n_el = shape[0] * shape[1]
        out = torch.zeros(len(self.per_sample) * n_el, dtype=dtype, device=self.element.device)
        out.index_add_(0, self.sample_index() * n_el + self.element.long(), self.signed.to(dtype))
        return out.view(len(self.per_sample), *shape)

    def n_pulses(self) -> int:
        """The number of pulses listed (Σ |signed|)."""
        return int(self.signed.abs().sum(dtype=torch.int64)) if self.signed.numel() else 0

    def hits(self, n_el: int) -> Tensor:
        """(n_el,) int32: the pulses of each device over the run."""
        counts = self.signed.abs().to(torch.float64)
        return torch.bincount(self.element.long(), weights=counts, minlength=n_el).to(torch.int32)

    def pulse_groups(self):
        """(element int64, up uint8 (1: up), count int32) per group (`groups`), in time order."""
        a = 0
        for cnt in self.groups:
            if cnt:
                signed = self.signed[a:a + cnt]
                yield self.element[a:a + cnt].long(), (signed < 0).to(torch.uint8), signed.abs().to(torch.int32)
                a += cnt

    @staticmethod
    def concat(parts: Sequence["PulseEvents"]) -> "PulseEvents":
        return PulseEvents([c for p in parts for c in p.per_sample], torch.cat([p.element for p in parts]),
                           torch.cat([p.signed for p in parts]), [c for p in parts for c in p.groups])


class SlotTrains:
    """The stochastic trains of a run of consecutive samples: the rows and columns that fired in
    each slot, slot after slot (a sample's BLₙ slots in a row). A slot's coincidences are all
    pairs of its fired rows and fired columns, one pulse each, down where
    sign(d_i)·sign(x_j) > 0, up elsewhere; no device is pulsed twice in one slot.

    `slot_sample` (T,): each slot's sample (counted from the run's first); `rows` (T, out) and
    `cols` (T, in) bool: fired; `d_neg` (S, out) and `x_neg` (S, in) bool: the signs of the
    run's d and x. `events()` lists the coincidences as `PulseEvents`; `hits` and
    `pulse_groups` feed `apply_per_sample` without that list."""

    def __init__(self, slot_sample: Tensor, rows: Tensor, cols: Tensor, d_neg: Tensor, x_neg: Tensor):
        self.slot_sample, self.rows, self.cols, self.d_neg, self.x_neg = slot_sample, rows, cols, d_neg, x_neg

    def n_pulses(self) -> int:
        """The number of pulses: Σ_slots (fired rows)·(fired columns)."""
        return int((self.rows.sum(1) * self.cols.sum(1)).sum()) if self.rows.numel() else 0

    def hits(self, n_el: int) -> Tensor:
        """(n_el,) int32: the pulses of each device over the run, Σ_slots rowᵀ·col (one product;
        exact: float32 holds these integer counts exactly below 2^24)."""
        counts = self.rows.T.to(torch.float32) @ self.cols.to(torch.float32)
        return counts.reshape(-1).to(torch.int32)

    def pulse_groups(self):
        """(element int64, up uint8, None) per slot with coincidences, in time order: the device
        i·n_in + j and the direction (1: up) of each of the slot's pulses (count 1 each). (uint8,
        not bool: a broadcast xor of bools is ~3x slower.)"""
        n_in = self.cols.shape[1]
        t_r, i_r = self.rows.nonzero(as_tuple=True)
        t_c, j_c = self.cols.nonzero(as_tuple=True)
        row_code = i_r * n_in
        row_neg = self.d_neg[self.slot_sample[t_r], i_r].to(torch.uint8)
        col_neg = self.x_neg[self.slot_sample[t_c], j_c].to(torch.uint8)
        a = b = 0
        for nr, nc in zip(self.rows.sum(1).tolist(), self.cols.sum(1).tolist()):
            if nr and nc:
                element = (row_code[a:a + nr].unsqueeze(1) + j_c[b:b + nc]).view(-1)
                up = (row_neg[a:a + nr].unsqueeze(1) ^ col_neg[b:b + nc]).view(-1)  # signs differ: up
                yield element, up, None
            a, b = a + nr, b + nc

    def events(self) -> PulseEvents:
        """The coincidences as `PulseEvents` (sample after sample, slot, row, column within it).
        Built without an (N, out, in) tensor: the fired columns of each slot, padded to the
        longest slot, are gathered once per fired row and offset by the row (entries ∝ the
        coincidences, not the array)."""
        rows, cols, slot_sample = self.rows, self.cols, self.slot_sample
        dev = rows.device
        n_t, n_out, n_in = rows.shape[0], rows.shape[1], cols.shape[1]
        n_s = self.d_neg.shape[0]
        n_cols = cols.sum(1)
        per_slot = rows.sum(1) * n_cols
        per_sample = torch.zeros(n_s, dtype=torch.long, device=dev).index_add_(0, slot_sample, per_slot)
        nc_max = int(n_cols.max()) if n_t else 0
        if nc_max == 0 or not bool(per_slot.any()):
            return PulseEvents([0] * n_s, torch.zeros(0, dtype=torch.int32, device=dev),
                               torch.zeros(0, dtype=torch.int16, device=dev))
        # code of an entry: 2·(i·n_in + j) + [sign(d_i)·sign(x_j) < 0] (low bit 1: an up pulse)
        t_c, j_c = cols.nonzero(as_tuple=True)
        pos = cols.to(torch.int32).cumsum(1)[t_c, j_c] - 1  # place of the column within its slot
        col_code = (j_c * 2 + self.x_neg[slot_sample[t_c], j_c]).to(torch.int32)
        sentinel = -2 * (n_out * n_in + 1)  # marks padding
        pad = torch.full((n_t, 2, nc_max), sentinel, dtype=torch.int32, device=dev)
        pad[t_c, 0, pos] = col_code
        pad[t_c, 1, pos] = col_code ^ 1  # the same columns seen from a row with d_i < 0
        t_r, i_r = rows.nonzero(as_tuple=True)
        d_neg = self.d_neg[slot_sample[t_r], i_r]
        entries = pad.view(2 * n_t, nc_max).index_select(0, t_r * 2 + d_neg)
        entries += (i_r * (2 * n_in)).to(torch.int32).unsqueeze(1)
        # the first n_cols[t] places of each fired row's padded block (no scan for the padding)
        per_row = n_cols.index_select(0, t_r)
        first = torch.cumsum(per_row, 0) - per_row
        shift = torch.arange(t_r.numel(), device=dev) * nc_max - first
        keep = torch.arange(int(first[-1] + per_row[-1]), device=dev) + shift.repeat_interleave(per_row)
        codes = entries.view(-1).index_select(0, keep)
        signed = (codes & 1).to(torch.int16).mul_(-2).add_(1)
        return PulseEvents(per_sample.tolist(), codes.bitwise_right_shift_(1), signed, per_slot.tolist())


def _slices_by(weights: Tensor, budget: float, start: int = 0) -> list[slice]:
    """Consecutive slices (from `start`) whose `weights` sum to about `budget`, at least one item each."""
    out: list[slice] = []
    first, acc = start, 0.0
    for k, wk in enumerate(weights.tolist(), start):
        if acc > 0.0 and acc + wk > budget:
            out.append(slice(first, k))
            first, acc = k, 0.0
        acc += wk
    if weights.numel():
        out.append(slice(first, start + weights.numel()))
    return out


def sample_events(plan: PulsePlan, generator: torch.Generator, chunk: slice | None = None) -> PulseEvents:
    """Exact stochastic-compressed trains of the samples in `chunk`, as sparse coincidences
    (`SlotTrains.events`), drawn in parts of about `_GEN_ELEMENTS` padded entries."""
    sl = chunk if chunk is not None else slice(0, plan.bl.shape[0])
    lo, hi, _ = sl.indices(plan.bl.shape[0])
    if hi <= lo:
        return PulseEvents([], torch.zeros(0, dtype=torch.int32, device=plan.p.device),
                           torch.zeros(0, dtype=torch.int16, device=plan.p.device))
    p, q = plan.p[lo:hi], plan.q[lo:hi]
    # padded entries of a sample: fired rows times the longest slot's fired columns (estimated)
    q_sum = q.sum(1)
    padded = plan.bl[lo:hi].to(p.dtype) * (p.sum(1) + 1.0) * (q_sum + 4.0 * q_sum.sqrt() + 1.0)
    parts = [_draw_trains(plan, generator, s.start, s.stop).events() for s in _slices_by(padded, _GEN_ELEMENTS, lo)]
    return parts[0] if len(parts) == 1 else PulseEvents.concat(parts)


def sample_trains(plan: PulsePlan, generator: torch.Generator, chunk: slice | None = None) -> SlotTrains:
    """Exact stochastic-compressed trains of the samples in `chunk` (`SlotTrains`): for every slot
    of every sample (BLₙ slots), each row fires with probability pᵢ and each column with qⱼ (one
    uniform draw each, rows then columns, slot after slot)."""
    sl = chunk if chunk is not None else slice(0, plan.bl.shape[0])
    lo, hi, _ = sl.indices(plan.bl.shape[0])
    return _draw_trains(plan, generator, lo, max(lo, hi))


def _draw_trains(plan: PulsePlan, generator: torch.Generator, lo: int, hi: int) -> SlotTrains:
    p, q = plan.p[lo:hi], plan.q[lo:hi]
    dev = p.device
    n_s, n_out, n_in = hi - lo, p.shape[1], q.shape[1]
    slot_sample = torch.repeat_interleave(torch.arange(n_s, device=dev), plan.bl[lo:hi])  # (T,)
    n_t = slot_sample.numel()

    def uniform(shape: tuple[int, int]) -> Tensor:
        return torch.rand(shape, generator=generator, device=generator.device, dtype=p.dtype).to(dev)

    rows = uniform((n_t, n_out)) < p.index_select(0, slot_sample)  # (T, out) fired rows per slot
    cols = uniform((n_t, n_in)) < q.index_select(0, slot_sample)    # (T, in) fired columns
    return SlotTrains(slot_sample, rows, cols, plan.d_sign[lo:hi] < 0, plan.x_sign[lo:hi] < 0)


def deterministic_counts_per_sample(plan: PulsePlan, up: UpdateParameters, chunk: slice | None = None
                                    ) -> tuple[Tensor, Tensor]:
    """DETERMINISTIC_IMPLICIT: nₙᵢⱼ = round(BLₙ·pᵢ·qⱼ) (`deterministic_coincidences`), split by
    sign into up and down counts."""
    sl = chunk if chunk is not None else slice(0, plan.bl.shape[0])
    return _split_by_sign(deterministic_coincidences(plan, up, chunk), plan.d_sign[sl], plan.x_sign[sl])


def deterministic_coincidences(plan: PulsePlan, up: UpdateParameters, chunk: slice | None = None,
                               signed: bool = False) -> Tensor:
    """DETERMINISTIC_IMPLICIT coincidences nₙᵢⱼ = round(BLₙ·pᵢ·qⱼ), (N, out, in), probabilities
    rounded to the implicit resolutions first when those are set; `signed`: times
    sign(d_i)·sign(x_j) (> 0: down pulses)."""
    sl = chunk if chunk is not None else slice(0, plan.bl.shape[0])
    p, q = plan.p[sl], plan.q[sl]
    if up.d_res_implicit > 0:
        p = torch.round(p / up.d_res_implicit) * up.d_res_implicit
    if up.x_res_implicit > 0:
        q = torch.round(q / up.x_res_implicit) * up.x_res_implicit
    bl = plan.bl[sl].to(p.dtype).view(-1, 1, 1)
    counts = torch.floor(bl * p.unsqueeze(2) * q.unsqueeze(1) + 0.5)
    if signed:
        counts.mul_(plan.d_sign[sl].unsqueeze(2) * plan.x_sign[sl].unsqueeze(1))
    return counts


def deterministic_events(plan: PulsePlan, up: UpdateParameters, chunk: slice | None = None) -> PulseEvents:
    """`deterministic_coincidences` as sparse entries (one per sample and pulsed device)."""
    sl = chunk if chunk is not None else slice(0, plan.bl.shape[0])
    dense = deterministic_coincidences(plan, up, sl, signed=True)
    flat = dense.reshape(dense.shape[0], -1)
    s_idx, e_idx = flat.nonzero(as_tuple=True)
    per_sample = torch.bincount(s_idx, minlength=flat.shape[0]).tolist()
    return PulseEvents(per_sample, e_idx.to(torch.int32), flat[s_idx, e_idx].to(torch.int16))


class _Gathered(dict):
    """A view of a dict of tensors at an index (a gather) or a slice (e.g. a prefix), each entry
    taken on first use (the hidden parameters an update rule reads)."""

    def __init__(self, source: Mapping[str, Tensor], index: Tensor | slice):
        super().__init__()
        self.source, self.index = source, index

    def __missing__(self, key: str) -> Tensor:
        src, index = self.source[key], self.index
        value = self[key] = src[index] if isinstance(index, slice) else src.index_select(0, index)
        return value

    def get(self, key: str, default: Any = None) -> Any:
        try:
            return self[key]
        except KeyError:
            return default


def _pulse_queue(pulses: PulseEvents | SlotTrains, n_el: int) -> tuple[Tensor, Tensor, Tensor, list[int], Tensor] | None:
    """The pulses of a chunk, each device's in time order: (queue, top, base, m, hits), None
    without pulses.

    `hits` (n_el,): the pulses per device; `queue`: their directions (uint8, 1: up), device
    after device (device-major), each device's in time order, so that a device's rank-r pulse
    (r earlier pulses of the chunk on it) sits at its start + r (one byte each: the rank loop's
    random gathers from it stay in cache better than from floats); `top`: the pulsed devices, most
    pulses first, so that the devices with a rank-r pulse are top[:m[r]]; `base`: the start of
    each of them. One gather and two scatters per group of pulses (`pulse_groups`: in time
    order, no device twice in a group); a group entry with count c > 1 takes c consecutive
    places."""
    hits = pulses.hits(n_el)
    k_max = int(hits.max())
    if k_max == 0:
        return None
    order = _descending(hits, k_max).to(hits.device)
    m = n_el - torch.cumsum(torch.bincount(hits, minlength=k_max + 1), 0)[:k_max]  # devices with > r pulses
    start = torch.cumsum(hits, 0, dtype=torch.int64) - hits
    cursor = start.to(torch.int32)  # each device's next place (int32: half the memory of the random accesses)
    queue = torch.empty(int(start[-1] + hits[-1]), dtype=torch.uint8, device=hits.device)
    for element, up, count in pulses.pulse_groups():
        place = cursor.index_select(0, element)
        if count is None:
            cursor.scatter_(0, element, place + 1)  # (int64 index: the fast scatter)
        else:
            cursor.scatter_(0, element, place + count)
            if int(count.max()) > 1:
                c = count.long()
                first = torch.cumsum(c, 0) - c
                within = torch.arange(int(first[-1] + c[-1]), device=c.device) - first.repeat_interleave(c)
                place, up = place.repeat_interleave(c) + within, up.repeat_interleave(c)
        queue.scatter_(0, place.long(), up)
    top = order[: int(m[0])]
    return queue, top, start.index_select(0, top), m.tolist(), hits


def _descending(hits: Tensor, k_max: int) -> Tensor:
    """The devices ordered by their number of pulses, most first (any order among equals).
    On CPU with fewer than 256 ranks, numpy's stable argsort of uint8 keys (a radix sort, ~4x
    faster than torch's comparison sort here)."""
    if hits.device.type == "cpu" and k_max < 256:
        key = (k_max - hits).to(torch.uint8).numpy()
        return torch.from_numpy(np.argsort(key, kind="stable"))
    return torch.argsort(hits, descending=True)


def apply_per_sample(arrays: Sequence[Any], pair: bool, pulses_of: Callable[[slice], PulseEvents | SlotTrains],
                     plan: PulsePlan, generator: torch.Generator, compiled: bool | None = None) -> Tensor:
    """Apply the per-sample coincidences of `plan` to the devices sample after sample (the exact
    mode), every pulse through the device's own update rule, in time order.

    Per chunk of consecutive samples (about `_EXACT_ENTRIES` coincidences), `pulses_of(chunk)`
    gives the chunk's pulses in time order: `SlotTrains` (the fired rows and columns of each
    slot, slot after slot) or `PulseEvents` (a sparse list, e.g. deterministic trains). Two ways
    to apply them, with the same meaning:

    - compiled (`devices.kernels`, numba; used when every array is a float32 CPU array whose
      rule has a kernel and numba imports; `compiled=None` decides, True insists, False refuses):
      the pulses are walked as the hardware sends them, sample after sample, slot after slot, in
      each slot every fired row times every fired column (row-major) stepping device (i, j)
      once through its rule's scalar kernel, with its own standard normal, then the clip. The
      normals are one `devices.normals` draw per chunk (keyed by `generator`; the chunk's
      coincidences counted first, the buffer reused by the thread's later updates), consumed in
      walk order; one thread; no sorting.
    - torch (`_apply_ranked`, any rule and device, e.g. CUDA tensors or PiecewiseStep): each
      pulse gets its rank (the number of earlier pulses of the chunk on the same device), the
      devices are sorted by their number of pulses, and the devices are stepped rank after rank
      with torch ops (one pulse per device per rank, in time order per device).

    Either way every device sees its pulses in time order, one by one, exactly as one
    `DeviceArray.apply_pulses` call per sample would apply them (within one sample a device's
    pulses all go one way, so their order there does not matter), and the device state evolves
    pulse by pulse, sample by sample, for every device model; the work is proportional to the
    number of pulses, not to samples × devices. c2c normals: none are drawn when `dw_min_std` is
    0 (every rule's step is then noise-free). Random draws differ from a per-sample loop and
    between the two ways (other order); their distribution is the same.

    `arrays`: one `DeviceArray`, or (G⁺, G⁻) of a differential pair (`pair`): up pulses
    potentiate G⁺, down pulses G⁻ (each pulse's normal is used on the side it pulses; the pair's
    refresh is the tile's, after the update). Write noise is redrawn once at the end for the
    devices that got pulses, not after every sample: the weight the next read sees is the same
    in distribution. Returns the pulses per device (out, in).
    """
    shape = arrays[0].shape
    use_kernel = compiled is not False and _kernels_apply(arrays)
    if compiled and not use_kernel:
        raise ValueError("apply_per_sample(compiled=True): no compiled kernel applies (numba missing, "
                         "a non-CPU or non-float32 array, or a rule without a kernel)")
    apply = _apply_compiled if use_kernel else _apply_ranked
    entries = plan.bl.to(plan.p.dtype) * plan.p.sum(1) * plan.q.sum(1)  # expected coincidences per sample
    chunks = _slices_by(entries, _EXACT_ENTRIES)
    noisy = any(getattr(arr.config, "dw_min_std", 0.0) != 0 for arr in arrays)  # else no c2c draws (same result)
    flat, totals = apply(arrays, pair, pulses_of, chunks, noisy, generator)
    for k, arr in enumerate(arrays):
        arr._persistent = flat[k].reshape(shape)
        if arr._apparent is not None:
            written = arr._persistent + arr._write_noise_scale() * torch.randn(
                shape, generator=generator, device=generator.device, dtype=arr.dtype).to(arr.device)
            arr._apparent = torch.where(totals[k].reshape(shape) > 0, written, arr._apparent)
    total = totals[0] if len(totals) == 1 else totals[0] + totals[1]
    return total.reshape(shape)


def _kernels_apply(arrays: Sequence[Any]) -> bool:
    """Whether `_apply_compiled` applies: numba imports, every array is float32 on the CPU and its
    rule has a compiled kernel (`devices.kernels`)."""
    return all(arr.device.type == "cpu" and arr.dtype == torch.float32 and kernels.kernel_for(arr.rule) is not None
               for arr in arrays)


def _apply_compiled(arrays: Sequence[Any], pair: bool, pulses_of: Callable[[slice], PulseEvents | SlotTrains],
                    chunks: list[slice], noisy: bool, generator: torch.Generator) -> tuple[list[Tensor], list[Tensor]]:
    """The compiled walk (`apply_per_sample`, chunk after chunk; c2c normals drawn when `noisy`):
    (new flat weights, pulses per device) per array."""
    n_el = arrays[0].shape[0] * arrays[0].shape[1]
    flat = [arr.persistent_weights.reshape(-1).clone().contiguous() for arr in arrays]
    counts = [np.zeros(n_el, np.int32) for _ in arrays]  # pulses per device of each array
    sides = []
    for arr, f, n in zip(arrays, flat, counts):
        kernel = kernels.kernel_for(arr.rule)
        sides.append((kernel, arr.config, f.numpy(), *kernels.pack(kernel, arr.config, arr.hidden), n))
    for sl in chunks:
        pulses = pulses_of(sl)
        count = pulses.n_pulses()
        if count == 0:
            continue
        xi = None
        if noisy:  # the c2c normals, in a buffer reused by this thread's exact updates
            xi = normals.fill(_normals_buffer(normals.padded(count)), generator)
        if isinstance(pulses, SlotTrains):
            done = kernels.apply_slot_trains(pulses.rows.numpy(), pulses.cols.numpy(), pulses.slot_sample.numpy(),
                                             pulses.d_neg.numpy(), pulses.x_neg.numpy(), xi, sides)
        else:
            done = kernels.apply_pulse_list(pulses.element.numpy(), pulses.signed.numpy(), xi, sides)
        if done != count:
            raise RuntimeError(f"compiled walk applied {done} pulses, expected {count}")
    return flat, [torch.from_numpy(n).to(torch.float32) for n in counts]  # (a pair: G⁺ ups, G⁻ downs)


_SCRATCH = threading.local()


def _normals_buffer(n: int) -> np.ndarray:
    """A float32 array of n elements, this thread's, reused by every compiled exact update (a fresh
    array of tens of MB pays its page faults on each update, several times the draw itself)."""
    buf = getattr(_SCRATCH, "normals", None)
    if buf is None or buf.size < n:
        buf = _SCRATCH.normals = np.empty(n, dtype=np.float32)
    return buf[:n]


def _apply_ranked(arrays: Sequence[Any], pair: bool, pulses_of: Callable[[slice], PulseEvents | SlotTrains],
                  chunks: list[slice], noisy: bool, generator: torch.Generator) -> tuple[list[Tensor], list[Tensor]]:
    """The torch path (`apply_per_sample`): pulses ranked per device, devices sorted by their
    number of pulses, stepped rank after rank. (new flat weights, pulses per device) per array."""
    shape = arrays[0].shape
    n_el = shape[0] * shape[1]
    flat = [arr.persistent_weights.reshape(-1).clone() for arr in arrays]
    hidden = [{k: v.reshape(-1) for k, v in arr.hidden.items()} for arr in arrays]
    dtype, device = flat[0].dtype, flat[0].device
    totals = [torch.zeros(n_el, dtype=dtype, device=device) for _ in arrays]
    for sl in chunks:
        laid_out = _pulse_queue(pulses_of(sl), n_el)
        if laid_out is None:
            continue
        queue, top, base, m_list, hits = laid_out
        xi = torch.randn((queue.numel(),), generator=generator, device=generator.device, dtype=dtype).to(device) \
            if noisy else None
        k_max, o = len(m_list), 0
        wp = [f.index_select(0, top) for f in flat]
        hp = [_Gathered(h, top) for h in hidden]
        n_up = torch.zeros(m_list[0], dtype=dtype, device=device) if pair else None
        for r in range(k_max):
            mr = m_list[r]
            up = queue.index_select(0, base[:mr] + r).to(dtype)  # the rank-r pulses of top[:mr]: 1.0 up
            noise = xi[o:o + mr] if noisy else None
            o += mr
            if not pair:
                arr, w, h = arrays[0], wp[0][:mr], _Gathered(hp[0], slice(0, mr))
                w.copy_(arr._clip(w + arr._step(w, up, noise, h), h))
                continue
            n_up[:mr] += up
            for k, mask in ((0, up), (1, 1.0 - up)):  # both as potentiation of their side
                arr, w, h = arrays[k], wp[k][:mr], _Gathered(hp[k], slice(0, mr))
                new = arr._clip(w + arr._step(w, True, noise, h), h)
                w.copy_(select(mask, new, w))
        for k in range(len(arrays)):
            flat[k].index_copy_(0, top, wp[k])
        if pair:
            totals[0].index_add_(0, top, n_up)
            totals[1].index_add_(0, top, hits.index_select(0, top).to(dtype) - n_up)
        else:
            totals[0] += hits.to(dtype)
    return flat, totals


def _split_sums(bl: Tensor, ps: Tensor, qs: Tensor, p_abs: Tensor, q_abs: Tensor) -> tuple[Tensor, Tensor]:
    """(Σ over up coincidences, Σ over down coincidences) of BLₙ·|ps|·|qs|, from two products:
    the signed sum M and the absolute sum S give up = (S − M)/2 and down = (S + M)/2."""
    w = bl.to(ps.dtype).unsqueeze(1)
    signed = (ps * w).T @ qs
    total = (p_abs * w).T @ q_abs
    return (total - signed) * 0.5, (total + signed) * 0.5


def expected_counts(plan: PulsePlan) -> tuple[Tensor, Tensor]:
    """Exact expected up and down coincidence counts summed over the batch, each (out, in).

    Without clipped probabilities BL·p·q = lr·|d x|/g, so the sums are two plain products of
    d and x (no probability tensors are built)."""
    if plan.unclipped:
        factor = plan.lr / plan.granularity
        signed = plan.d.T @ plan.x
        total = plan.d.abs().T @ plan.x.abs()
        mu_up = (total - signed).mul_(0.5 * factor)
        mu_down = (total + signed).mul_(0.5 * factor)
    else:
        mu_up, mu_down = _split_sums(plan.bl, plan.ps, plan.qs, plan.p, plan.q)
    return mu_up.clamp_min_(0.0), mu_down.clamp_min_(0.0)


def fast_counts(plan: PulsePlan, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Batch-aggregated counts per element, drawn from a binomial whose mean and variance match
    the exact ones: the count is a sum of independent Bernoulli(pₙᵢqₙⱼ) slots, mean
    μ = Σ BL p q and variance μ − ν with ν = Σ BL (p q)²; Binomial(m, μ/m) with m = ceil(μ²/ν)
    has that mean and (up to the rounding of m) that variance."""
    mu_up, mu_down = expected_counts(plan)
    p_sq, q_sq = plan.ps * plan.ps, plan.qs * plan.qs
    nu_up, nu_down = _split_sums(plan.bl, plan.ps.abs() * plan.ps, plan.qs.abs() * plan.qs, p_sq, q_sq)
    nu_up.clamp_min_(0.0)
    nu_down.clamp_min_(0.0)

    def draw(mu: Tensor, nu: Tensor) -> Tensor:
        positive = (mu > 0) & (nu > 0)
        # relative slack: μ and ν come from different float products (μ²/ν = 20.000004 must give 20)
        ratio = mu * mu / torch.where(positive, nu, torch.ones_like(nu))
        trials = torch.where(positive, torch.ceil(ratio * (1 - 1e-5)), torch.zeros_like(mu))
        trials = torch.maximum(trials, torch.ceil(mu * (1 - 1e-5)))
        prob = torch.where(trials > 0, mu / trials.clamp_min(1.0), torch.zeros_like(mu)).clamp(0.0, 1.0)
        if generator.device.type == "cpu":
            out = torch.binomial(trials.float().cpu(), prob.float().cpu(), generator=generator)
        else:
            out = torch.binomial(trials.float(), prob.float(), generator=generator)
        return out.to(device=mu.device, dtype=mu.dtype)

    return draw(mu_up, nu_up), draw(mu_down, nu_down)
