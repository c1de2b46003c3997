"""Compiled (numba) standard normals from a counter-based generator, keyed by a torch.Generator.

Where a hot loop needs many normals (the read noise of every analog read), torch's `randn`
(mt19937 and Box–Muller, about 5–6 ns a normal on one core here) costs as much as the product
itself. This module draws them at about 1.7 ns, vectorised, with every bit still owned by the
caller's seeded `torch.Generator`:

- **Key.** A draw of n normals takes one 64-bit key from the generator (`draw_key`: two 32-bit
  integers by one `random_` into an int64 tensor). So seeds, `manual_seed` resets, `get_state`/`set_state` and
  checkpoints of the generator reproduce the normals exactly, as they do torch's own draws;
  the generator advances by one key per draw whatever n is.
- **Bits.** Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC 2011;
  one of cuRAND's generators and the one behind torch's CUDA random numbers), counter = the
  draw's position, key = the draw's key. Checked
  against the paper's known-answer vectors in `tests/test_normals.py`.
- **Normals.** Box–Muller on each pair of 32-bit words: radius sqrt(−2 ln u), u = (2k + 1)·2⁻²⁴
  from the top 23 bits of one word (so u ∈ (0, 1), |z| ≤ 5.77), angle 2πv, v = the top 24 bits of
  the other over 2²⁴. ln, sin and cos are float32 minimax polynomials (the classic Cephes
  coefficients), about 1e-7 relative from float64 (3e-7 tested), so the loop vectorises without
  a vector math library. Box–Muller is exact in distribution; the only departures from N(0, 1)
  are the 2⁻²³ and 2⁻²⁴ grids of u and v, as in torch's float32 `randn` (which also truncates
  near 5.8σ).
- **Layout.** n normals use n4 = ⌈n/4⌉ counters; counter c gives the four normals at positions
  c, n4 + c, 2·n4 + c, 3·n4 + c (four planes, so that the loop writes contiguously and
  vectorises). A draw is a function of (key, n) alone.

`AVAILABLE` is False where numba does not import; callers then use torch's `randn`.
"""

from __future__ import annotations

import numpy as np
import torch

from .kernels import AVAILABLE, njit

__all__ = ["AVAILABLE", "draw_key", "philox4x32", "fill_normals", "fill", "normals", "padded"]

_F = np.float32


@njit(inline="always", cache=True)
def _philox(c0, c1, c2, c3, k0, k1):  # pragma: no cover - compiled
    """Philox4x32 with 10 rounds: four 32-bit words of counter (c0..c3) under key (k0, k1)."""
    for _ in range(10):
        p0 = np.uint64(0xD2511F53) * np.uint64(c0)
        p1 = np.uint64(0xCD9E8D57) * np.uint64(c2)
        n0 = np.uint32(p1 >> np.uint64(32)) ^ c1 ^ k0
        n2 = np.uint32(p0 >> np.uint64(32)) ^ c3 ^ k1
        c1 = np.uint32(p1)
        c3 = np.uint32(p0)
        c0 = n0
        c2 = n2
        k0 = np.uint32(k0 + np.uint32(0x9E3779B9))
        k1 = np.uint32(k1 + np.uint32(0xBB67AE85))
    return c0, c1, c2, c3


@njit(cache=True)
def philox4x32(c0, c1, c2, c3, k0, k1):  # pragma: no cover - compiled
    """The Philox4x32-10 block function (for the known-answer tests)."""
    return _philox(np.uint32(c0), np.uint32(c1), np.uint32(c2), np.uint32(c3), np.uint32(k0), np.uint32(k1))


@njit(inline="always", cache=True)
def _radius(r):  # pragma: no cover - compiled
    """sqrt(−2 ln u), u = (2k + 1)·2⁻²⁴ with k the top 23 bits of r; ln by frexp and a polynomial."""
    u = _F(np.int32((r >> np.uint32(9)) * np.uint32(2) + np.uint32(1))) * _F(5.9604645e-08)
    b = np.float32(u).view(np.int32)
    mant = b & np.int32(0x007FFFFF)
    m = np.int32(mant | np.int32(0x3F000000)).view(np.float32)  # u = m 2^e, m in [.5, 1)
    # m < float32(0.70710677) (bits 0x3F3504F3) as an integer test, and its two cases as exact
    # arithmetic (m·2 − 1 or m·1 − 1; e − 1 or e): no branches in the vectorised loop
    small = np.int32(mant < np.int32(0x003504F3))
    e = _F((b >> 23) - 126 - small)
    x = m * _F(1 + small) - _F(1.0)  # ln u = ln(1 + x) + e ln 2, x in [-0.29, 0.41)
    z = x * x
    y = ((((((((_F(7.0376836292e-2) * x - _F(1.1514610310e-1)) * x + _F(1.1676998740e-1)) * x
               - _F(1.2420140846e-1)) * x + _F(1.4249322787e-1)) * x - _F(1.6668057665e-1)) * x
            + _F(2.0000714765e-1)) * x - _F(2.4999993993e-1)) * x + _F(3.3333331174e-1)) * x * z
    y = y + _F(-2.12194440e-4) * e - _F(0.5) * z
    return np.float32(np.sqrt(_F(-2.0) * (x + y + _F(0.693359375) * e)))


@njit(inline="always", cache=True)
def _sincos(r):  # pragma: no cover - compiled
    """(sin, cos) of 2πv, v = the top 24 bits of r over 2²⁴: quadrant q from 4v, polynomials on
    the remainder θ ∈ [−π/4, π/4]."""
    w = _F(np.int32(r >> np.uint32(8))) * _F(2.3841858e-07)  # 4v in [0, 4), exact
    q = np.int32(w + _F(0.5))
    t = (w - _F(q)) * _F(1.5707964)
    z = t * t
    s = ((_F(-1.9515295891e-4) * z + _F(8.3321608736e-3)) * z - _F(1.6666654611e-1)) * z * t + t
    c = ((_F(2.443315711809948e-5) * z - _F(1.388731625493765e-3)) * z + _F(4.166664568298827e-2)) * z * z \
        - _F(0.5) * z + _F(1.0)
    odd = (q & 1) == 1  # q in 0..4 (4 is quadrant 0 again)
    sq = c if odd else s
    cq = s if odd else c
    # the quadrant's signs as factors ±1 (exact): no branches in the vectorised loop
    return sq * _F(1 - (q & 2)), cq * _F(1 - ((q + 1) & 2))  # sin < 0 for q in {2, 3}; cos < 0 for q in {1, 2}


@njit(cache=True)
def fill_normals(out, k0, k1):  # pragma: no cover - compiled
    """Fill the float32 array `out` (length a multiple of 4) with the draw of len(out) normals
    under key (k0, k1), two integers in [0, 2³²) (module docstring: four planes of
    n4 = len(out)/4)."""
    n4 = out.shape[0] // 4
    zero = np.uint32(0)
    k0 = np.uint32(k0)
    k1 = np.uint32(k1)
    # Two passes over `out`: the Philox words into the four planes as raw bits, then Box–Muller
    # in place. The same numbers as one fused loop, 10-15 % faster here (1.6-1.7 vs 1.8-2.0 ns a
    # normal): each loop is shorter and vectorises with more of its work in flight.
    bits = out.view(np.uint32)
    for j in range(n4):
        r0, r1, r2, r3 = _philox(np.uint32(j), zero, zero, zero, k0, k1)
        bits[j] = r0
        bits[n4 + j] = r1
        bits[2 * n4 + j] = r2
        bits[3 * n4 + j] = r3
    for j in range(n4):
        a = _radius(bits[j])
        s, c = _sincos(bits[n4 + j])
        b = _radius(bits[2 * n4 + j])
        s2, c2 = _sincos(bits[3 * n4 + j])
        out[j] = a * c
        out[n4 + j] = a * s
        out[2 * n4 + j] = b * c2
        out[3 * n4 + j] = b * s2


def draw_key(generator: torch.Generator, out: torch.Tensor | None = None) -> tuple[int, int]:
    """One 64-bit key (two 32-bit words, ints uniform in [0, 2³²) each) from `generator`: what a
    draw takes from it. `out`: an int64 tensor of two elements on the generator's device to draw
    into (a caller drawing often keeps one; the draw is the same)."""
    if out is None:
        out = torch.empty(2, dtype=torch.int64, device=generator.device)
    k0, k1 = out.random_(0, 2**32, generator=generator).tolist()
    return k0, k1


def padded(n: int) -> int:
    """Length of the buffer a draw of n normals fills (n rounded up to a multiple of 4)."""
    return 4 * ((n + 3) // 4)


def fill(out: np.ndarray, generator: torch.Generator) -> np.ndarray:
    """Fill the float32 array `out` (1-D, contiguous, length a multiple of 4) with the draw of
    len(out) normals under one key drawn from `generator`; returns `out`. Reusing `out` across
    draws matters for large draws: a fresh array of megabytes pays its page faults on first
    write, which cost several times the draw itself here."""
    if not AVAILABLE:
        raise RuntimeError("devices.normals needs numba")
    if out.dtype != np.float32 or out.ndim != 1 or out.shape[0] % 4 or not out.flags.c_contiguous:
        raise ValueError("normals.fill: out must be a contiguous 1-D float32 array whose length is a multiple of 4")
    if out.shape[0] >= 2**34:
        raise ValueError(f"normals.fill: at most 2**34 normals a draw, got {out.shape[0]}")
    k0, k1 = draw_key(generator)
    fill_normals(out, k0, k1)
    return out


def normals(n: int, generator: torch.Generator) -> torch.Tensor:
    """n standard normals (float32, CPU) under one key drawn from `generator`. Position e of the
    draw is plane e // n4 of counter e % n4, n4 = ⌈n/4⌉: the result is a function of the key and n."""
    if n < 0:
        raise ValueError(f"normals: n must be >= 0, got {n}")
    return torch.from_numpy(fill(np.empty(padded(n), dtype=np.float32), generator))[:n]
