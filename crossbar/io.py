"""DAC/ADC periphery of an analog matrix-vector read (aihwkit `IOParameters`, SEMANTICS §1.1).

`analog_read` realises y = W x (or Wᵀ d for the transposed read) with aihwkit's order of
operations: noise management (divide by α) -> input quantisation (DAC, step inp_res·2·inp_bound)
-> clip ±inp_bound -> input noise -> MVM -> weight read noise -> output noise -> output
quantisation (ADC, step out_res·2·out_bound) -> clip ±out_bound -> multiply by α (and by the
bound-management factor). Vectorised over every leading dimension.

Where we differ from aihwkit
----------------------------
- Not modelled: `ir_drop`, `out_nonlinearity`, `*_asymmetry`, `slope_calibration`,
  `v_offset_*`, `r_series`, `w_read_asymmetry_dtod`, `mv_type` other than ONE_PASS, and the
  bound-management types other than NONE/ITERATIVE.
- aihwkit silently turns bound management off for the backward (transposed) pass; here a read
  does what its `IOParameters` say. The tile presets in `crossbar.presets` therefore give the
  backward IO `bound_management="none"`, as aihwkit effectively runs it.
- `PCM_READ` weight noise: σ_i = w_noise·sqrt(Σ_j |W_ij| x_j²) (the current-dependent form of
  aihwkit's docstring, without its w_max normalisation).
- Iterative bound management re-reads only the vectors that saturated (aihwkit re-reads the whole
  batch); the outputs are the same in distribution.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ept_hw.config import ConfigError, check_choice, check_finite_range

__all__ = ["IOParameters", "ReadStats", "analog_read", "effective_res", "res_from_bits", "bits_from_res", "BOUND_MANAGEMENT", "NOISE_MANAGEMENT",
           "W_NOISE_TYPES"]

BOUND_MANAGEMENT = ("none", "iterative")
NOISE_MANAGEMENT = ("none", "abs_max", "max", "constant")
W_NOISE_TYPES = ("none", "additive_constant", "pcm_read")


def res_from_bits(bits: int) -> float:
    """aihwkit's convention: a converter of b bits has res = 1/(2^b − 2) (e.g. 7 bits -> 1/126)."""
    if isinstance(bits, bool) or not isinstance(bits, int) or bits < 2:
        raise ConfigError("bits", bits, "an integer >= 2")
    return 1.0 / (2**bits - 2)


def bits_from_res(res: float) -> float | None:
    """Inverse of `res_from_bits`: log2(steps + 2) bits, with steps = res when res > 1 (a number of
    steps) else 1/res; None for res <= 0 (no quantisation)."""
    if res <= 0.0:
        return None
    steps = res if res > 1.0 else 1.0 / res
    return math.log2(steps + 2.0)


def effective_res(res: float) -> float:
    """aihwkit `checkRes`: a resolution > 1 is a number of steps (-> 1/res); <= 0 means none."""
    if res <= 0.0:
        return 0.0
    return 1.0 / res if res > 1.0 else res


@dataclass(frozen=True)
class IOParameters:
    """aihwkit `IOParameters` (names and defaults as aihwkit 1.2), the subset this simulator models."""

    is_perfect: bool = False
    inp_bound: float = 1.0
    inp_noise: float = 0.0
    inp_res: float = 1.0 / 126.0
    inp_sto_round: bool = False
    out_bound: float = 12.0
    out_noise: float = 0.06
    out_res: float = 1.0 / 510.0
    out_sto_round: bool = False
    out_scale: float = 1.0
    bound_management: str = "iterative"
    noise_management: str = "abs_max"
    nm_thres: float = 0.0
    w_noise: float = 0.0
    w_noise_type: str = "none"
    max_bm_factor: float = 1000.0
    max_bm_res: float = 0.25
    bm_test_negative_bound: bool = True

    def __post_init__(self) -> None:
        check_finite_range("inp_bound", self.inp_bound, 0.0, lo_open=True)
        check_finite_range("out_bound", self.out_bound, 0.0, lo_open=True)
        for key in ("inp_noise", "out_noise", "w_noise", "nm_thres", "inp_res", "out_res"):
            check_finite_range(key, getattr(self, key), 0.0)
        check_finite_range("out_scale", self.out_scale, 0.0, lo_open=True)
        check_finite_range("max_bm_factor", self.max_bm_factor, 1.0)
        check_finite_range("max_bm_res", self.max_bm_res, 0.0, lo_open=True)
        check_choice("bound_management", self.bound_management, BOUND_MANAGEMENT)
        check_choice("noise_management", self.noise_management, NOISE_MANAGEMENT)
        check_choice("w_noise_type", self.w_noise_type, W_NOISE_TYPES)
        if self.noise_management != "none" and self.inp_bound != 1.0 and not self.is_perfect:
            raise ConfigError("inp_bound", self.inp_bound, "1.0 when noise_management is on (as aihwkit)")
        if self.noise_management == "constant" and self.nm_thres <= 0.0 and not self.is_perfect:
            raise ConfigError("nm_thres", self.nm_thres, "> 0 with noise_management = 'constant'")

    @property
    def inp_step(self) -> float:
        return effective_res(self.inp_res) * 2.0 * self.inp_bound

    @property
    def out_step(self) -> float:
        return effective_res(self.out_res) * 2.0 * self.out_bound


class ReadStats:
    """Counts of one tile's reads: MVM vectors (including bound-management re-reads), ADC
    conversions (output values converted), ADC clips (outputs at ±out_bound in the kept read)."""

    def __init__(self) -> None:
        self.mvm_reads = 0
        self.adc_conversions = 0
        self.adc_clipped = 0

    def as_dict(self) -> dict[str, int]:
        return {"mvm_reads": self.mvm_reads, "adc_conversions": self.adc_conversions, "adc_clipped": self.adc_clipped}

    def load(self, state: dict[str, Any]) -> None:
        self.mvm_reads = int(state["mvm_reads"])
        self.adc_conversions = int(state["adc_conversions"])
        self.adc_clipped = int(state["adc_clipped"])


def _randn(shape: tuple[int, ...], like: Tensor, generator: torch.Generator) -> Tensor:
    return torch.randn(shape, generator=generator, device=generator.device, dtype=like.dtype).to(like.device)


def _quantise_(v: Tensor, stochastic: bool, generator: torch.Generator) -> Tensor:
    """Round in place to integers (values already in units of the step)."""
    if stochastic:
        v.add_(torch.rand(v.shape, generator=generator, device=generator.device, dtype=v.dtype).to(v.device))
        return v.floor_()
    return v.round_()


def _one_pass(w: Tensor, x: Tensor, inv_alpha: Tensor, io: IOParameters, generator: torch.Generator,
              inputs_within_bound: bool) -> tuple[Tensor, Tensor, Tensor, float]:
    """One read of the (N, in) inputs x·inv_alpha. Works in units of the DAC and ADC steps so
    that scalings fold into the small weight matrix and the output noise fuses into the product.

    Returns the outputs in ADC units, per-vector saturation (what bound management tests), the
    per-vector count of clipped outputs and the ADC unit.
    """
    in_step = io.inp_step
    in_unit = in_step if in_step > 0 else 1.0
    xu = x * (inv_alpha / in_unit)
    if in_step > 0:
        _quantise_(xu, io.inp_sto_round, generator)
    if not inputs_within_bound:
        xu.clamp_(-io.inp_bound / in_unit, io.inp_bound / in_unit)
    if io.inp_noise > 0.0:
        xu.add_(_randn(tuple(xu.shape), xu, generator), alpha=io.inp_noise / in_unit)
    out_step = io.out_step
    out_unit = out_step if out_step > 0 else 1.0
    w_units = w * (in_unit / out_unit)
    has_w_noise = io.w_noise > 0.0 and io.w_noise_type != "none"
    if io.out_noise > 0.0 and not has_w_noise:
        noise = _randn((xu.shape[0], w.shape[0]), xu, generator)
        y = torch.addmm(noise, xu, w_units.T, beta=io.out_noise / out_unit)
    else:
        y = xu @ w_units.T
        if has_w_noise:
            if io.w_noise_type == "additive_constant":
                sigma = (io.w_noise * in_unit / out_unit) * xu.norm(dim=-1, keepdim=True)
            else:
                sigma = (io.w_noise * in_unit / out_unit) * ((xu * xu) @ w.abs().T).sqrt()
            y.add_(sigma * _randn(tuple(y.shape), y, generator))
        if io.out_noise > 0.0:
            y.add_(_randn(tuple(y.shape), y, generator), alpha=io.out_noise / out_unit)
    if out_step > 0:
        _quantise_(y, io.out_sto_round, generator)
    bound = io.out_bound / out_unit
    lo, hi = torch.aminmax(y, dim=-1)
    at_upper, at_lower = hi >= bound, lo <= -bound
    saturated = (at_upper | at_lower) if io.bm_test_negative_bound else at_upper
    touched = at_upper | at_lower
    clipped = torch.zeros_like(touched, dtype=torch.long)
    if bool(touched.any()):
        rows = touched.nonzero().squeeze(-1)
        clipped[rows] = (y[rows].abs() >= bound).sum(dim=-1)
        y.clamp_(-bound, bound)
    return y, saturated, clipped, out_unit


def analog_read(weights: Tensor, x: Tensor, io: IOParameters, generator: torch.Generator,
                stats: ReadStats | None = None, digital_scale: float = 1.0) -> Tensor:
    """y = x Wᵀ through the periphery `io` (W: (out, in) in device units, x: (..., in)).

    For the transposed read pass `weights.T`. Computes in x's dtype. Every random draw comes from
    `generator`. `stats` (optional) accumulates read counters. `digital_scale` multiplies the
    result after the ADC (the tile's mapping scale; folded into the final rescaling).
    """
    if x.shape[-1] != weights.shape[1]:
        raise ValueError(f"analog_read: input has last dimension {x.shape[-1]}, expected {weights.shape[1]}")
    w = weights.to(dtype=x.dtype, device=x.device)
    lead = x.shape[:-1]
    flat = x.reshape(-1, x.shape[-1])
    n_vec, n_out = flat.shape[0], w.shape[0]
    if io.is_perfect:
        if stats is not None:
            stats.mvm_reads += n_vec
        y = flat @ (w.T * digital_scale if digital_scale != 1.0 else w.T)
        return y.reshape(*lead, n_out)

    within = False
    if io.noise_management == "none":
        alpha = torch.ones(n_vec, 1, dtype=x.dtype, device=x.device)
    elif io.noise_management == "constant":
        alpha = torch.full((n_vec, 1), io.nm_thres, dtype=x.dtype, device=x.device)
    else:
        lo, hi = torch.aminmax(flat, dim=-1, keepdim=True)
        abs_max = torch.maximum(-lo, hi)
        if io.noise_management == "abs_max":
            alpha = abs_max
            # |x|/max|x| <= 1 = inp_bound: the DAC clip cannot act (rounding keeps ±1 on the grid)
            within = io.nm_thres == 0.0 and io.inp_bound >= 1.0
        else:  # "max": aihwkit MAX uses the signed maximum; fall back to abs max where it is <= 0
            alpha = torch.where(hi > 0, hi, abs_max)
        if io.nm_thres > 0.0:
            alpha = alpha.clamp_max(io.nm_thres)
        alpha = torch.where(alpha > 0, alpha, torch.ones_like(alpha))

    y, saturated, clipped, out_unit = _one_pass(w, flat, 1.0 / alpha, io, generator, within)
    reads = n_vec
    if io.bound_management == "iterative":
        res = effective_res(io.inp_res)
        factor = 1.0
        while bool(saturated.any()):
            nxt = factor * 2.0
            if nxt > io.max_bm_factor or (res > 0.0 and nxt * res > io.max_bm_res):
                break
            factor = nxt
            idx = saturated.nonzero().squeeze(-1)
            y_again, sat_again, clip_again, _ = _one_pass(w, flat[idx], 1.0 / (alpha[idx] * factor), io,
                                                          generator, within)
            reads += int(idx.numel())
            y[idx] = y_again * factor
            clipped[idx] = clip_again
            saturated = torch.zeros_like(saturated)
            saturated[idx] = sat_again
    if stats is not None:
        stats.mvm_reads += reads
        stats.adc_conversions += reads * n_out
        stats.adc_clipped += int(clipped.sum())
    y.mul_(alpha * (out_unit * io.out_scale * digital_scale))
    return y.reshape(*lead, n_out)
