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
  devices sample after sample (the reference). Batched as `apply_per_sample` describes: the
  counts of a chunk of samples in one bulk product, then only the pulsed devices are stepped,
  grouped by how many earlier samples pulsed them, so each device sees its pulses in sample order.
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
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import Tensor

from ept_hw.config import check_choice, check_positive_int, check_finite_range

__all__ = ["UpdateParameters", "PulsePlan", "plan_pulses", "sample_counts_per_sample", "sample_coincidences",
           "expected_counts", "fast_counts", "deterministic_counts_per_sample", "deterministic_coincidences",
           "apply_per_sample", "PULSE_TYPES", "UPDATE_MODES"]

PULSE_TYPES = ("stochastic_compressed", "deterministic_implicit", "none")
UPDATE_MODES = ("exact", "fast", "expected")

# Largest number of (sample, row, column) count entries materialised at once.
_CHUNK_ELEMENTS = 1 << 23
# The exact mode's chunk: larger, since its cost per chunk grows with the number of ranks (the
# most pulsed device's number of samples), which grows more slowly than the chunk.
_EXACT_CHUNK_ELEMENTS = 1 << 25


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
    the same draws in the same order. `signed`: times sign(d_i)·sign(x_j) (> 0: down pulses)."""
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


class _Gathered(dict):
    """A view of a dict of tensors at an index, each entry gathered on first use (the hidden
    parameters an update rule reads)."""

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


def _pulse_elements(arr: Any, w: Tensor, h: Mapping[str, Tensor], elems: Tensor, up: Tensor | bool,
                    counts: Tensor, multi: bool, generator: torch.Generator) -> None:
    """`counts` pulses (same direction per element) on the elements `elems` of the flat weights
    `w` (in place), one after the other, c2c noise drawn per pulse. `h`: the hidden parameters
    at `elems`."""
    idx = elems
    we = w.index_select(0, idx)
    xi = torch.randn(we.shape, generator=generator, device=generator.device, dtype=we.dtype).to(we.device)
    we = arr._clip(we + arr._step(we, up, xi, h), h)
    if multi:
        n_max = int(counts.max())
        h0, keep = h, None
        for t in range(1, n_max):
            sel = (counts > t).nonzero().squeeze(1)
            w.index_copy_(0, idx, we)
            keep = sel if keep is None else keep.index_select(0, sel)
            counts, we, idx = counts.index_select(0, sel), we.index_select(0, sel), elems.index_select(0, keep)
            h = _Gathered(h0, keep)
            if not isinstance(up, bool):
                up = up.index_select(0, sel)
            xi = torch.randn(we.shape, generator=generator, device=generator.device, dtype=we.dtype).to(we.device)
            we = arr._clip(we + arr._step(we, up, xi, h), h)
    w.index_copy_(0, idx, we)


def apply_per_sample(arrays: Sequence[Any], pair: bool, signed_coincidences: Callable[[slice], Tensor], plan: PulsePlan,
                     generator: torch.Generator, refresh: Callable[[], int] | None = None) -> Tensor:
    """Apply the per-sample coincidence counts of `plan` to the devices sample after sample (the
    exact mode).

    How it is batched: the counts of a chunk of samples come from one bulk op
    (`signed_coincidences`: one batched product of the ±1/0 slot trains, signed by direction); their non-zero entries are listed once per chunk,
    each with its direction (sign(d_i)·sign(x_j) > 0 is down) and its **rank**: how many earlier
    samples of the chunk pulsed the same device. Entries of equal rank touch distinct devices, so
    they are applied together, rank after rank: the devices' weights are gathered, stepped by the
    device's own update rule once per coincidence (c2c noise drawn per pulse, clipped to the
    device's bounds after each pulse) and scattered back. Every device thus sees its pulses in
    sample order, exactly as one `DeviceArray.apply_pulses` call per sample would apply them
    (within one sample a device gets pulses of one direction only), at the cost of one pass per
    rank instead of one per sample. Random draws differ from a per-sample loop (other shapes,
    other order); their distribution is the same.

    `arrays`: one `DeviceArray`, or (G⁺, G⁻) of a differential pair (`pair`): up pulses
    potentiate G⁺, down pulses G⁻, and after each rank `refresh()` (the unit cell's refresh
    check on the arrays' current weights, returning how many devices it refreshed) runs: for
    every device this is after each of its samples and before its next one, as a check after
    every sample would be. Write noise is redrawn once at the end for the devices that got
    pulses (for every device after a refresh), not after every sample: the weight the next read
    sees is the same in distribution. Returns the pulses per device (out, in).
    """
    n = plan.bl.shape[0]
    shape = arrays[0].shape
    n_out, n_in = shape
    n_el = n_out * n_in
    flat = [arr.persistent_weights.reshape(-1).clone() for arr in arrays]
    hidden = [{k: v.reshape(-1) for k, v in arr.hidden.items()} for arr in arrays]
    totals = [torch.zeros(n_el, dtype=flat[0].dtype, device=flat[0].device) for _ in arrays]
    refreshes = 0
    for sl in _chunks(n, n_el, _EXACT_CHUNK_ELEMENTS):
        signed = signed_coincidences(sl)  # (S, out, in), sign(d_i)·sign(x_j)·count: > 0 is down
        n_chunk = signed.shape[0]
        signed = signed.reshape(-1)
        where = signed.nonzero().squeeze(1)
        if where.numel() == 0:
            continue
        val = signed.index_select(0, where)
        del signed
        s_idx = torch.div(where, n_el, rounding_mode="floor")
        e_idx = where - s_idx * n_el
        down = val > 0
        cnt = val.abs()
        # rank of each entry: earlier samples of the chunk that pulsed the same device
        rank = torch.empty_like(e_idx)
        seen = torch.zeros(n_el, dtype=e_idx.dtype, device=e_idx.device)
        offsets = [0] + torch.bincount(s_idx, minlength=n_chunk).cumsum(0).tolist()
        for a, b in zip(offsets[:-1], offsets[1:]):
            if a < b:
                seg = e_idx[a:b]  # distinct devices within one sample
                r = seen.index_select(0, seg)
                rank[a:b] = r
                seen.index_copy_(0, seg, r + 1)
        multi = bool((cnt > 1).any())
        if pair:
            totals[0].index_add_(0, e_idx, torch.where(down, 0.0, cnt).to(totals[0].dtype))
            totals[1].index_add_(0, e_idx, torch.where(down, cnt, 0.0).to(totals[1].dtype))
            key = rank * 2 + down  # per rank: G⁺'s entries (up pulses), then G⁻'s (down pulses)
        else:
            totals[0].index_add_(0, e_idx, cnt.to(totals[0].dtype))
            key = rank
        key, order = torch.sort(key, stable=True)
        e_s, c_s = e_idx.index_select(0, order), cnt.index_select(0, order)
        bounds = [0] + torch.bincount(key).cumsum(0).tolist()
        h_s = [_Gathered(h, e_s) for h in hidden]  # gathered once per chunk, sliced per rank
        if not pair:
            up_s = ~down.index_select(0, order)
            for a, b in zip(bounds[:-1], bounds[1:]):
                if a < b:
                    _pulse_elements(arrays[0], flat[0], _Gathered(h_s[0], slice(a, b)), e_s[a:b], up_s[a:b],
                                    c_s[a:b], multi, generator)
            continue
        if len(bounds) % 2 == 0:
            bounds.append(bounds[-1])
        for a, m, b in zip(bounds[:-2:2], bounds[1:-1:2], bounds[2::2]):
            for k, (lo, hi) in enumerate(((a, m), (m, b))):  # both as potentiation of their side
                if lo < hi:
                    _pulse_elements(arrays[k], flat[k], _Gathered(h_s[k], slice(lo, hi)), e_s[lo:hi], True,
                                    c_s[lo:hi], multi, generator)
            if a < b and refresh is not None:
                for k, arr in enumerate(arrays):  # the arrays see the current weights
                    arr._persistent = flat[k].view(shape)
                n_refreshed = refresh()
                if n_refreshed:
                    refreshes += n_refreshed
                    flat = [arr.persistent_weights.reshape(-1).clone() for arr in arrays]
    for k, arr in enumerate(arrays):
        arr._persistent = flat[k].reshape(shape)
        if arr._apparent is not None:
            noisy = arr._persistent + arr._write_noise_scale() * torch.randn(
                shape, generator=generator, device=generator.device, dtype=arr.dtype).to(arr.device)
            arr._apparent = noisy if refreshes else torch.where(totals[k].reshape(shape) > 0, noisy, arr._apparent)
    total = totals[0] if len(totals) == 1 else totals[0] + totals[1]
    return total.reshape(shape)


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
