"""devices.normals: Philox4x32-10 against its known answers, Box–Muller's polynomials against
float64 math, and the normals' distribution, independence and reproducibility."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from devices import normals as N

pytestmark = pytest.mark.skipif(not N.AVAILABLE, reason="numba is not importable")


def test_philox4x32_10_known_answers():
    """The known-answer vectors of Salmon et al.'s Random123 (philox4x32, 10 rounds)."""
    m = 0xFFFFFFFF
    cases = [((0, 0, 0, 0, 0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
             ((m, m, m, m, m, m), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
             ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344, 0xA4093822, 0x299F31D0),
              (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1))]
    for args, want in cases:
        assert tuple(int(v) for v in N.philox4x32(*args)) == want


def test_box_muller_polynomials_match_float64():
    """The radius sqrt(−2 ln u) and (sin, cos)(2πv) the kernel computes from 32-bit words agree
    with float64 math to a few float32 ulps over random words and the extremes."""
    from numba import njit

    @njit
    def evaluate(words):
        out = np.empty((words.shape[0], 3), np.float64)
        for i in range(words.shape[0]):
            out[i, 0] = N._radius(words[i])
            s, c = N._sincos(words[i])
            out[i, 1] = s
            out[i, 2] = c
        return out

    rng = np.random.default_rng(0)
    words = np.concatenate([rng.integers(0, 2**32, 200_000, dtype=np.uint64),
                            np.array([0, 1, 511, 512, 2**31, 2**32 - 1], dtype=np.uint64)]).astype(np.uint32)
    got = evaluate(words)
    u = ((words >> 9).astype(np.float64) * 2 + 1) * 2.0**-24
    v = (words >> 8).astype(np.float64) * 2.0**-24
    radius = np.sqrt(-2 * np.log(u))
    assert np.max(np.abs(got[:, 0] - radius) / radius) < 3e-7
    assert np.max(np.abs(got[:, 1] - np.sin(2 * np.pi * v))) < 3e-7
    assert np.max(np.abs(got[:, 2] - np.cos(2 * np.pi * v))) < 3e-7


def _draw(n: int, seed: int) -> np.ndarray:
    return N.normals(n, torch.Generator().manual_seed(seed)).numpy().astype(np.float64)


def test_normals_are_standard_normal():
    """2²¹ normals of one key: mean, variance, kurtosis, tail masses and the KS distance agree
    with N(0, 1) within bounds a wrong scale, offset or angle (e.g. 2πv → πv) would miss."""
    n = 2**21
    z = _draw(n, 1)
    se = 1 / math.sqrt(n)
    assert abs(z.mean()) < 5 * se
    assert abs(z.var() - 1) < 5 * math.sqrt(2) * se
    assert abs(stats.kurtosis(z, fisher=False) - 3) < 5 * math.sqrt(24) * se
    assert abs(stats.skew(z)) < 5 * math.sqrt(6) * se
    for k in (1.0, 2.0, 3.0, 4.0):
        p = 2 * stats.norm.sf(k)
        assert abs(np.mean(np.abs(z) > k) - p) < 5 * math.sqrt(p * (1 - p) / n) + 1e-7
    assert stats.kstest(z, "norm").statistic < 1.63 / math.sqrt(n)  # the 1 % critical value
    assert np.abs(z).max() < 5.8  # u >= 2^-24: |z| <= 5.77


def test_normals_are_independent():
    """Neighbours in a plane, the four planes of one counter (the cos and sin of one radius, and
    the two pairs) and two keys: uncorrelated, also in z² (a shared radius would show there)."""
    n = 2**20
    z = _draw(n, 2)
    n4 = n // 4
    planes = z.reshape(4, n4)
    bound = 5 / math.sqrt(n4)
    pairs = [(planes[0][:-1], planes[0][1:])]
    pairs += [(planes[i], planes[j]) for i in range(4) for j in range(i + 1, 4)]
    pairs.append((z, _draw(n, 3)))
    for a, b in pairs:
        assert abs(np.corrcoef(a, b)[0, 1]) < bound
        assert abs(np.corrcoef(a * a, b * b)[0, 1]) < bound


def test_draws_follow_the_generator():
    """A draw takes one key from the generator: the same seed gives the same normals and leaves
    the generator where one `draw_key` leaves it; the layout is a function of (key, n); n not
    a multiple of 4 is the prefix of its padded draw; different seeds give different normals."""
    a, b = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert torch.equal(N.normals(1001, a), N.normals(1001, b))
    ref = torch.Generator().manual_seed(5)
    N.draw_key(ref)
    assert torch.equal(a.get_state(), ref.get_state())
    full = N.normals(1004, torch.Generator().manual_seed(9))
    part = N.normals(1001, torch.Generator().manual_seed(9))
    assert torch.equal(part, full[:1001])
    assert not torch.equal(N.normals(64, torch.Generator().manual_seed(1)), N.normals(64, torch.Generator().manual_seed(2)))
    k0, k1 = N.draw_key(torch.Generator().manual_seed(9))
    buf = np.empty(1004, np.float32)
    N.fill_normals(buf, k0, k1)
    assert np.array_equal(buf, full.numpy())
    with pytest.raises(ValueError):
        N.fill(np.empty(6, np.float32), a)
    with pytest.raises(ValueError):
        N.fill(np.empty(8, np.float64), a)
