"""Compiled (numba) stages of a periphery read (`crossbar.io.PeripheryReader`, compiled path).

A read's elementwise stages cost more in torch-op overhead and passes over memory than in
arithmetic (about 15 small ops a read). Here they are two passes, one on each side of the product
(which stays a torch matmul):

- `prepare`: per input vector the noise-management scale α (abs max, constant or given), then
  x/α in DAC steps, rounded (DAC) and clipped to ±inp_bound, in the torch path's float32 order
  (1/α, then divided by the step, then the product).
- `finish`: per output y + σ·ξ (ξ the read's normals, a `devices.normals` draw made just
  before by the caller), rounded (ADC), the
  counts of outputs at ±out_bound (both signs, and the upper one alone, for bound management and
  the ADC statistics), the clip, and the final rescaling by α·step·out_scale·digital scale.

Rounding is half to even, as `torch.round`. What is not here stays in torch: the product and
bound management's choice of vectors to re-read. The stages the compiled path
does not cover (stochastic rounding, input noise, weight noise, noise management "max") send
the whole read to the torch path (`PeripheryReader`).

The normals are drawn by a separate call (`devices.normals.fill_normals`), not from inside
`finish`: numba's on-disk cache is keyed on each function's own file, so a cached `finish` that
called into `devices/normals.py` could keep running an older version of it after that file
changed. (Fusing the two saved nothing measurable.)
"""

from __future__ import annotations

import numpy as np

from devices.kernels import AVAILABLE, njit

__all__ = ["AVAILABLE", "NM_NONE", "NM_ABS_MAX", "NM_CONSTANT", "NM_GIVEN", "prepare", "finish"]

# how `prepare` finds α
NM_NONE, NM_ABS_MAX, NM_CONSTANT, NM_GIVEN = 0, 1, 2, 3


@njit(inline="always", cache=True)
def _abs_bits_max(bits):  # pragma: no cover - compiled
    """The largest |v| of a float32 row, as the bit pattern of |v| (a uint32), from the row's bits.

    The max of the patterns shifted left by one (the sign bit dropped), shifted back: for floats
    >= 0 the integer order is the float order, and an unsigned 32-bit max vectorises (a float max
    reduction does not, without fast-math; a signed one widens to 64 bits in numba). A NaN sorts
    above +inf, so it propagates, as in torch's amax."""
    top = np.uint32(0)
    for j in range(bits.shape[0]):
        b = np.uint32(bits[j] << np.uint32(1))
        top = b if b > top else top
    return np.uint32(top >> np.uint32(1))


@njit(cache=True)
def prepare(x, alpha, mode, thres, in_unit, quantise, in_bound, clamp, xu):  # pragma: no cover - compiled
    """xu[i] = clip(round(x[i]·(1/α_i)/in_unit)) for the (N, K) float32 inputs x; α_i into
    `alpha` (N,) by `mode` (NM_*; NM_GIVEN reads it from `alpha`). thres: nm_thres (float32)."""
    n, k = x.shape
    one = np.float32(1.0)
    xb = x.view(np.uint32)
    for i in range(n):
        if mode == NM_GIVEN:
            a = alpha[i]
        elif mode == NM_ABS_MAX:
            a = np.uint32(_abs_bits_max(xb[i])).view(np.float32)
            if thres > 0.0 and a > thres:
                a = thres
            if not a > 0.0:
                a = one
        elif mode == NM_CONSTANT:
            a = thres
        else:
            a = one
        alpha[i] = a
        s = (one / a) / in_unit
        for j in range(k):
            v = x[i, j] * s
            if quantise:
                v = np.rint(v)
            if clamp:
                v = min(max(v, -in_bound), in_bound)
            xu[i, j] = v


@njit(inline="always", cache=True)
def _sum_row(yr, nz, sigma, quantise):  # pragma: no cover - compiled
    """yr[j] = y + σ·ξ (ξ = nz[j]; nz None: no noise), rounded if `quantise`, in place. Returns
    the largest |yr[j]| as `_abs_bits_max` gives it (the same loop, so the max costs no pass)."""
    top = np.uint32(0)
    for j in range(yr.shape[0]):
        v = yr[j]
        if nz is not None:
            v = v + sigma * nz[j]
        if quantise:
            v = np.rint(v)
        yr[j] = v
        b = np.uint32(np.float32(v).view(np.uint32) << np.uint32(1))
        top = b if b > top else top
    return np.uint32(top >> np.uint32(1))


@njit(inline="always", cache=True)
def _clip_row(yr, bound, scale):  # pragma: no cover - compiled
    """Counts (|y| >= bound, y >= bound) of the row, then y clipped to ±bound times scale, in place."""
    ca = 0
    cp = 0
    for j in range(yr.shape[0]):
        v = yr[j]
        ca += abs(v) >= bound
        cp += v >= bound
        yr[j] = min(max(v, -bound), bound) * scale
    return ca, cp


@njit(cache=True)
def finish(y, noise, sigma, rows, quantise, bound, alpha, factor, count_abs, count_pos):  # pragma: no cover
    """In place on the (N, M) products y (ADC units): y + σ·noise, rounded, clipped to ±bound,
    times the row's output scale float32(α_i·factor) (α from `prepare`; factor: the ADC step
    times out_scale and the digital scale, float32). Row i takes the noise of row i mod `rows`
    (noise: at least rows·M normals, row-major), so N/rows equal blocks see the same noise.
    count_abs[i] / count_pos[i]: outputs of row i with |y| >= bound / y >= bound (before the
    clip). Returns the total of count_abs. σ = 0 adds nothing (and reads no noise).

    Per row: one pass adds the noise, rounds and takes the row's max |y|; a row whose max is
    below the bound (the usual case, and no NaN) is only scaled (the clip cannot act, the counts
    are 0: the same numbers as clipping it), any other goes through the clip-and-count pass.
    (Counting in the first pass would stop it vectorising: 2.5x the time of this.)"""
    n, m = y.shape
    total = 0
    bound_bits = np.float32(bound).view(np.uint32)
    for i in range(n):
        yr = y[i]
        scale = np.float32(alpha[i] * factor)
        if sigma != 0.0:
            base = (i % rows) * m
            top = _sum_row(yr, noise[base:base + m], sigma, quantise)
        else:
            top = _sum_row(yr, None, sigma, quantise)
        if top < bound_bits:
            for j in range(m):
                yr[j] = yr[j] * scale
            count_abs[i] = 0
            count_pos[i] = 0
        else:
            ca, cp = _clip_row(yr, bound, scale)
            count_abs[i] = ca
            count_pos[i] = cp
            total += ca
    return total
