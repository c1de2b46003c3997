"""The compiled periphery read (`PeripheryReader` with `crossbar.io_kernels` and
`devices.normals`) against the torch path: bit-equal without output noise, the same noise
statistics with it, and the fallbacks. Common-random-number blocks on both paths:
`tests/test_crossbar.py::test_common_noise_blocks_read_in_one_pass_equal_block_by_block`."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from scipy import stats

from crossbar import io_kernels
from crossbar.io import IOParameters, PeripheryReader, ReadStats
from crossbar.presets import preset_io

pytestmark = pytest.mark.skipif(not io_kernels.AVAILABLE, reason="numba is not importable")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _inputs(n: int, k: int, seed: int) -> torch.Tensor:
    """Inputs whose rows span three decades of abs max (noise management acts) with zero rows."""
    x = torch.randn(n, k, generator=_gen(seed)) * torch.logspace(-2, 1, n).unsqueeze(1)
    x[::17] = 0.0
    return x


NOISE_FREE = [
    {},                                                        # the preset (abs max, iterative BM)
    {"out_bound": 0.6},                                        # many saturate: bound-management re-reads
    {"out_bound": 0.6, "bm_test_negative_bound": False},
    {"noise_management": "none", "inp_bound": 2.0, "out_bound": 3.0},  # the DAC clip acts
    {"noise_management": "constant", "nm_thres": 3.0},
    {"nm_thres": 0.5, "out_bound": 1.0},                       # abs max capped by nm_thres
    {"inp_res": 0.0, "out_res": 0.0},                          # no converters
    {"bound_management": "none", "out_bound": 0.6},            # clipped, not re-read
]


@pytest.mark.parametrize("variant", NOISE_FREE)
def test_compiled_read_without_noise_equals_torch_path(variant):
    """Without output noise nothing random is drawn: the compiled read equals the torch path bit
    for bit (outputs, read counters), forward and transposed (non-contiguous weights), with a
    digital scale, including the bound-management re-reads. A scale applied twice or not at all,
    a rounding or clip in the wrong place, or a wrong count fails here."""
    io = replace(preset_io(), out_noise=0.0, **variant)
    fast, ref = PeripheryReader(io, compiled=True), PeripheryReader(io, compiled=False)
    assert fast.compiled and not ref.compiled
    w = 0.3 * torch.randn(24, 40, generator=_gen(1))
    for weights, x, scale in ((w, _inputs(300, 40, 2), 1.0), (w.T, _inputs(200, 24, 3), 0.37)):
        s_fast, s_ref = ReadStats(), ReadStats()
        got = fast(weights, x, _gen(4), s_fast, digital_scale=scale)
        want = ref(weights, x, _gen(4), s_ref, digital_scale=scale)
        assert torch.equal(got, want)
        assert s_fast.as_dict() == s_ref.as_dict()
    if "out_bound" in variant and variant.get("bound_management") != "none":
        assert s_ref.mvm_reads > x.shape[0]  # the case that matters: some vectors were re-read


def test_compiled_read_noise_has_the_torch_paths_statistics():
    """With output noise the two paths draw different numbers with the same statistics: the
    error against the exact product, per output, has the same mean and standard deviation (σ
    and the ADC's rounding error combined, α = 1), the same distribution (two-sample KS) and
    the same share of clipped outputs."""
    io = replace(preset_io(), out_noise=0.1, out_bound=1.5, bound_management="none")
    w = 0.25 * torch.randn(32, 48, generator=_gen(5))
    x = torch.rand(4000, 48, generator=_gen(6)) * 2 - 1
    x[:, 0] = 1.0  # α = 1: the noise in output units is σ
    exact = x @ w.T
    errs, clips = [], []
    for compiled in (True, False):
        st = ReadStats()
        y = PeripheryReader(io, compiled=compiled)(w, x, _gen(7), st)
        keep = exact.abs() < 1.0  # outputs away from the bound (clipped ones are not noise)
        errs.append((y - exact)[keep].numpy().astype(np.float64))
        clips.append(st.adc_clipped)
    fast, ref = errs
    sigma = 0.1  # the output noise in output units (α = 1)
    se = sigma / math.sqrt(fast.size)
    assert abs(fast.mean()) < 5 * se
    assert abs(fast.std() / ref.std() - 1) < 0.03
    assert abs(fast.std() / math.sqrt(sigma**2 + io.out_step**2 / 12) - 1) < 0.03
    assert stats.ks_2samp(fast, ref).pvalue > 1e-3
    assert abs(clips[0] - clips[1]) < 5 * math.sqrt(max(clips[1], 1)) + 5


def test_compiled_noise_scales_with_alpha_and_lands_before_the_adc():
    """The output noise is added in ADC units before rounding (outputs lie on the grid α·step)
    and so scales with the noise-management α of each input vector."""
    io = replace(preset_io(), out_noise=0.2, out_bound=5.0)
    w = torch.zeros(16, 8)
    x = torch.ones(6000, 8)
    x[3000:] *= 4.0  # α = 1 and α = 4
    y = PeripheryReader(io, compiled=True)(w, x, _gen(8))
    step = io.out_step
    for part, alpha in ((y[:3000], 1.0), (y[3000:], 4.0)):
        units = part / (alpha * step)
        assert torch.equal(units, units.round())
        assert abs(float(part.std()) / (alpha * math.sqrt(0.2**2 + step**2 / 12)) - 1) < 0.03


def test_compiled_read_reproduces_from_the_seed_and_advances_the_generator():
    """The same seed gives the same read; the next read differs; the compiled path takes one
    key (not a randn stream) from the generator per pass."""
    from devices.normals import draw_key

    read = PeripheryReader(preset_io(), compiled=True)
    w = 0.3 * torch.randn(16, 16, generator=_gen(0))
    x = torch.randn(10, 16, generator=_gen(1))
    g1, g2 = _gen(3), _gen(3)
    a, b = read(w, x, g1), read(w, x, g2)
    assert torch.equal(a, b) and not torch.equal(a, read(w, x, g1))
    ref = _gen(3)
    draw_key(ref)
    g = _gen(3)
    read(w, x, g)
    assert torch.equal(g.get_state(), ref.get_state())


@pytest.mark.parametrize("variant", [{"inp_sto_round": True}, {"out_sto_round": True}, {"inp_noise": 0.02},
                                     {"w_noise": 0.02, "w_noise_type": "pcm_read"}, {"noise_management": "max"}])
def test_peripheries_the_kernels_do_not_cover_use_the_torch_path(variant):
    io = replace(preset_io(), **variant)
    assert not PeripheryReader(io).compiled
    with pytest.raises(ValueError, match="does not cover"):
        PeripheryReader(io, compiled=True)


def test_float64_and_a_missing_numba_use_the_torch_path(monkeypatch):
    """A float64 read goes the torch path (bit-equal to it, same generator use); so does every
    read where numba is missing."""
    io = preset_io()
    w = 0.3 * torch.randn(8, 12, generator=_gen(0), dtype=torch.float64)
    x = torch.randn(20, 12, generator=_gen(1), dtype=torch.float64)
    assert torch.equal(PeripheryReader(io)(w, x, _gen(2)), PeripheryReader(io, compiled=False)(w, x, _gen(2)))
    monkeypatch.setattr(io_kernels, "AVAILABLE", False)
    assert not PeripheryReader(io).compiled
    assert PeripheryReader(IOParameters(is_perfect=True)).compiled is False


def test_tile_reads_use_the_compiled_path():
    """The tiles of the analog path read through the compiled path by default."""
    from crossbar import AnalogTile, tile_preset

    tile = AnalogTile(tile_preset("ecram"), 8, 8, _gen(0))
    tile.forward(torch.randn(3, 8, generator=_gen(1)))
    tile.transpose(torch.randn(3, 8, generator=_gen(2)))
    readers = list(tile._readers.values())
    assert readers and all(r.compiled for r in readers)


def test_non_finite_inputs_stay_visible_on_both_paths():
    """A NaN or infinite input makes its row's outputs NaN on both paths (the clip must not turn a
    diverged state into finite values); the other rows are read normally."""
    w = 0.3 * torch.randn(4, 6, generator=_gen(0))
    x = torch.randn(3, 6, generator=_gen(1))
    x[1, 2] = float("nan")
    x[2, 0] = float("inf")
    for compiled in (True, False):
        y = PeripheryReader(preset_io(), compiled=compiled)(w, x, _gen(2))
        assert torch.isfinite(y[0]).all()
        assert torch.isnan(y[1:]).all()


def test_kept_buffers_stay_bounded_over_many_read_sizes():
    """A reader keeps its working arrays between reads: one set, grown to its largest read, with
    views of it kept per main-pass shape (bound-management re-reads, whose sizes vary read to
    read, take fresh views). Reads of 40 different sizes, most with re-reads, must leave it
    holding about one read's worth of memory of the largest size, not one set per size seen."""
    io = replace(preset_io(), out_bound=0.6)  # many outputs saturate: re-reads of varying size
    reader = PeripheryReader(io, compiled=True)
    w = 0.3 * torch.randn(24, 40, generator=_gen(1))
    stats = ReadStats()
    sizes = range(20, 420, 10)
    for i, n in enumerate(sizes):
        reader(w, _inputs(n, 40, i), _gen(i), stats)
    assert stats.mvm_reads > sum(sizes)  # re-reads happened
    arrays = {id(a.base if a.base is not None else a): (a.base if a.base is not None else a)
              for b in reader._buffers.values() for a in (b.xu, b.noise, b.count_abs, b.count_pos, b.alpha)}
    arrays.update({id(a): a for a in reader._arena})
    held = sum(a.nbytes for a in arrays.values())
    largest = 410 * 40 * 4 + 410 * 24 * 4 + 410 * 3 * 8  # one read of the largest size
    assert held <= 1.5 * largest, (held, largest)
