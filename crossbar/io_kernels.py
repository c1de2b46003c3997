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


@njit(cache=True)
def prepare(x, alpha, mode, thres, in_unit, quantise, in_bound, clamp, xu):  # pragma: no cover - compiled
    """xu[i] = clip(round(x[i]·(1/α_i)/in_unit)) for the (N, K) float32 inputs x; α_i into
    `alpha` (N,) by `mode` (NM_*; NM_GIVEN reads it from `alpha`). thres: nm_thres (float32)."""
    n, k = x.shape
    one = np.float32(1.0)
    xb = x.view(np.int32)
    for i in range(n):
        if mode == NM_GIVEN:
            a = alpha[i]
        elif mode == NM_ABS_MAX:
            # max |x| as the integer max of the bit patterns with the sign bit cleared: for
            # floats >= 0 the order is the same, and the integer max vectorises (a float max
            # reduction does not, without fast-math). A NaN sorts above +inf, so it propagates
            # as in torch's amax (then α = 1 below, as on the torch path).
            bits = xb[i]
            ib = np.int32(0)
            for j in range(k):
                ib = max(ib, bits[j] & np.int32(0x7FFFFFFF))
            a = np.int32(ib).view(np.float32)
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
def _finish_row(yr, nz, sigma, quantise, bound, scale):  # pragma: no cover - compiled
    """One row of `finish`; nz is None for no noise. Returns (count |y| >= bound, count y >= bound)."""
    ca = 0
    cp = 0
    for j in range(yr.shape[0]):
        v = yr[j]
        if nz is not None:
            v = v + sigma * nz[j]
        if quantise:
            v = np.rint(v)
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
    clip). Returns the total of count_abs. σ = 0 adds nothing (and reads no noise)."""
    n, m = y.shape
    total = 0
    for i in range(n):
        scale = np.float32(alpha[i] * factor)
        if sigma != 0.0:
            base = (i % rows) * m
            ca, cp = _finish_row(y[i], noise[base:base + m], sigma, quantise, bound, scale)
        else:
            ca, cp = _finish_row(y[i], None, sigma, quantise, bound, scale)
        count_abs[i] = ca
        count_pos[i] = cp
        total += ca
    return total
