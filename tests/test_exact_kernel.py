"""The exact mode's compiled walk (`devices.kernels`, used by `crossbar.update.apply_per_sample`)
against its torch path: same order, same distribution, and a clean fallback."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import crossbar.update as update_module
from crossbar import AnalogTile, TileConfig, UpdateParameters, perfect_io, plan_pulses
from crossbar.update import apply_per_sample, deterministic_events, sample_trains
from devices import (ConstantStepDevice, DeviceArray, ExpStepDevice, LinearStepDevice, PiecewiseStepDevice,
                     PowStepDevice, SoftBoundsDevice, SoftBoundsReferenceDevice)
from devices import kernels

NO_SPREAD = dict(dw_min_dtod=0.0, up_down_dtod=0.0, w_max_dtod=0.0, w_min_dtod=0.0)
# Noise-free devices, one per rule with a kernel, nonlinear where the rule is.
NOISE_FREE = {
    "constant_step": ConstantStepDevice(dw_min=0.05, dw_min_std=0.0, w_max=0.6, w_min=-0.6),
    "linear_step": LinearStepDevice(dw_min=0.03, gamma_up=0.5, gamma_down=0.8, dw_min_std=0.0),
    "soft_bounds": SoftBoundsDevice(dw_min=0.03, dw_min_std=0.0),
    "soft_bounds_reference": SoftBoundsReferenceDevice(dw_min=0.03, dw_min_std=0.0, reference_std=0.1),
    "exp_step": ExpStepDevice(dw_min=0.03, dw_min_std=0.0),
    "pow_step": PowStepDevice(dw_min=0.03, dw_min_std=0.0, pow_gamma=1.5),
}


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _tile(device, up: UpdateParameters, pair: bool, shape=(7, 10), seed=21) -> AnalogTile:
    cfg = TileConfig(device=device.to_dict(), forward=perfect_io(), backward=perfect_io(), update=up,
                     differential="pair" if pair else "single")
    g = _gen(seed)
    tile = AnalogTile(cfg, *shape, g)
    tile.program((0.4 if pair else 1.0) * (torch.rand(*shape, generator=g) - 0.5))
    return tile


def _both_paths(tile: AnalogTile, x, d, lr, seed: int, pulses: str):
    """(weights, pulses per device) after apply_per_sample through the kernel and through torch,
    from the same state and the same trains (drawn first with one seed and replayed)."""
    up = tile.config.update
    plan = plan_pulses(x, d, lr, tile.slot.granularity, up)
    state = tile.slot.state_dict()
    out = []
    for compiled in (True, False):
        tile.slot.load_state_dict(state)
        g = _gen(seed)
        if pulses == "deterministic":
            pulses_of = lambda sl: deterministic_events(plan, up, sl)  # noqa: E731
        else:
            pulses_of = lambda sl: sample_trains(plan, g, sl)  # noqa: E731
        counts = apply_per_sample(tile.slot.arrays, tile.slot.pair, pulses_of, plan, g, compiled=compiled)
        out.append((tile.slot.persistent.clone(), counts))
    return out


@pytest.mark.parametrize("pair", [False, True])
@pytest.mark.parametrize("name", list(NOISE_FREE))
def test_deterministic_trains_kernel_equals_torch_path(name, pair, monkeypatch):
    """pulse_type deterministic_implicit, dw_min_std = 0: no randomness at all, so the compiled walk
    and the torch path must agree to float tolerance (they do bit for bit except where the rule
    calls exp/pow), on every rule with a kernel, over several chunks; this pins the order of the
    pulses (a nonlinear device's result depends on it: the summed counts at once differ)."""
    monkeypatch.setattr(update_module, "_EXACT_ENTRIES", 300)  # several chunks
    device = NOISE_FREE[name].replace(**NO_SPREAD)
    if pair:
        device = device.replace(w_min=-0.01 if name != "constant_step" else -0.6)
    up = UpdateParameters(pulse_type="deterministic_implicit", mode="exact")
    tile = _tile(device, up, pair)
    g = _gen(3)
    x, d = torch.randn(40, 10, generator=g), torch.randn(40, 7, generator=g)
    (w_k, n_k), (w_t, n_t) = _both_paths(tile, x, d, 0.3, 0, "deterministic")
    start = tile.slot.state_dict()
    assert float(n_k.max()) >= 10
    torch.testing.assert_close(n_k, n_t, rtol=0, atol=0)
    torch.testing.assert_close(w_k, w_t, rtol=0, atol=2e-7)
    ref = DeviceArray(tile.slot.config, (7, 10), _gen(0)) if not pair else None
    if ref is not None and name != "constant_step":  # order matters on a nonlinear device
        ref.load_state_dict(start["arrays"][0])
        plan = plan_pulses(x, d, 0.3, tile.slot.granularity, up)
        signed = deterministic_events(plan, up).dense((7, 10), torch.float32).sum(0)
        ref.apply_pulses((-signed).clamp(min=0).long(), signed.clamp(min=0).long(), g)
        assert float((ref.persistent_weights - w_k).abs().max()) > 1e-3


@pytest.mark.parametrize("pair", [False, True])
def test_stochastic_trains_kernel_equals_torch_path_without_noise(pair, monkeypatch):
    """The same stochastic slot trains (same seed) on a noise-free soft-bounds device: both paths
    give the same weights and counts (the slot order, rows times columns, the signs)."""
    monkeypatch.setattr(update_module, "_EXACT_ENTRIES", 200)
    device = SoftBoundsDevice(dw_min=0.02, dw_min_std=0.0, w_min=-0.01 if pair else -0.6, **NO_SPREAD)
    tile = _tile(device, UpdateParameters(mode="exact", desired_bl=8), pair)
    g = _gen(4)
    x, d = torch.randn(30, 10, generator=g), torch.randn(30, 7, generator=g)
    (w_k, n_k), (w_t, n_t) = _both_paths(tile, x, d, 0.5, 9, "stochastic")
    assert float(n_k.max()) >= 5
    torch.testing.assert_close(n_k, n_t, rtol=0, atol=0)
    torch.testing.assert_close(w_k, w_t, rtol=0, atol=2e-7)


def test_kernel_and_torch_path_agree_in_distribution_on_a_noisy_soft_bounds_device():
    """Soft bounds with additive cycle-to-cycle noise (steps that overshoot the bound, so the clip
    acts), devices near their upper bound, more pulses up than down: over 300 updates from one
    state, the compiled walk and the torch path (each its own draws) give the same mean and spread
    of every device's new weight. A flipped direction, a missing clip, a reused or misplaced
    normal or a wrong order would move the means by many standard errors or the spreads."""
    device = SoftBoundsDevice(dw_min=0.05, dw_min_std=1.0, mult_noise=False, w_max=0.5, w_min=-0.5, **NO_SPREAD)
    up = UpdateParameters(mode="exact", desired_bl=10)
    tile = _tile(device, up, pair=False, shape=(4, 5), seed=1)
    tile.program(0.42 + 0.05 * torch.rand(4, 5, generator=_gen(2)))
    g = _gen(5)
    x = torch.randn(12, 5, generator=g).abs() + 0.3
    d = -torch.randn(12, 4, generator=g).abs() - 0.2  # mostly up pulses (−lr·d·x > 0)
    d[::3] *= -0.5  # and some down
    plan = plan_pulses(x, d, 0.15, tile.slot.granularity, up)
    state = tile.slot.state_dict()
    results = {True: [], False: []}
    for compiled in (True, False):
        for r in range(300):
            tile.slot.load_state_dict(state)
            gr = _gen(100 + r + (0 if compiled else 10_000))
            apply_per_sample(tile.slot.arrays, False, lambda sl: sample_trains(plan, gr, sl), plan, gr,
                             compiled=compiled)
            results[compiled].append(tile.slot.persistent.clone())
    k, t = (torch.stack(results[c]).double().numpy() for c in (True, False))
    bmax = state["arrays"][0]["hidden"]["max_bound"].double().numpy()
    assert (k >= bmax - 1e-7).mean() > 0.02  # the clip acts (some updates end at the bound)
    se = np.sqrt((k.var(0) + t.var(0)) / len(k))
    assert (np.abs(k.mean(0) - t.mean(0)) / se).max() < 4.0
    assert 0.85 < float(np.median(k.std(0) / t.std(0))) < 1.15
    assert float(np.abs(k.mean(0) - state["arrays"][0]["persistent_weights"].double().numpy()).mean()) > 0.02


def test_the_tile_uses_the_kernel_by_default(monkeypatch):
    """numba imports here (a dependency: no silent fallback on CI), and a tile's exact update on a
    rule with a kernel never enters the torch path."""
    assert kernels.AVAILABLE
    monkeypatch.setattr(update_module, "_apply_ranked", lambda *a, **k: pytest.fail("torch path used"))
    from crossbar import tile_preset

    tile = AnalogTile(tile_preset("reram_sb", mode="exact"), 6, 8, _gen(0))
    tile.program(0.1 * torch.randn(6, 8, generator=_gen(1)))
    before = tile.weight.clone()
    tile.apply_update(torch.randn(16, 8, generator=_gen(2)), torch.randn(16, 6, generator=_gen(3)), 0.1)
    assert float((tile.weight - before).abs().max()) > 0 and float(tile.pulse_count.sum()) > 0


def test_fallback_to_torch_where_no_kernel_applies(monkeypatch):
    """A rule without a kernel (PiecewiseStep), a float64 array, a non-CPU array and a missing numba
    all take the torch path (`compiled=True` refuses them); with numba 'missing' the update still
    runs and equals the torch path's."""
    piecewise = PiecewiseStepDevice(dw_min=0.02, dw_min_std=0.0, piecewise_up=(1.0, 0.5, 0.2),
                                    piecewise_down=(0.2, 0.5, 1.0), **NO_SPREAD)
    up = UpdateParameters(mode="exact", desired_bl=8)
    tile = _tile(piecewise, up, pair=False)
    assert not update_module._kernels_apply(tile.slot.arrays)
    x, d = torch.randn(10, 10, generator=_gen(1)), torch.randn(10, 7, generator=_gen(2))
    plan = plan_pulses(x, d, 0.5, tile.slot.granularity, up)
    with pytest.raises(ValueError, match="no compiled kernel"):
        apply_per_sample(tile.slot.arrays, False, lambda sl: sample_trains(plan, _gen(0), sl), plan, _gen(0),
                         compiled=True)
    tile.apply_update(x, d, 0.5)  # the torch path, through the tile
    assert float(tile.pulse_count.sum()) > 0

    soft = SoftBoundsDevice(dw_min=0.02, dw_min_std=0.0, **NO_SPREAD)
    arr64 = DeviceArray(soft, (3, 4), _gen(0), dtype=torch.float64)
    assert not update_module._kernels_apply([arr64])
    arr32 = DeviceArray(soft, (3, 4), _gen(0))
    assert update_module._kernels_apply([arr32])
    arr32.device = torch.device("cuda")  # (only the attribute: the check reads the array's device)
    assert not update_module._kernels_apply([arr32])

    tile = _tile(soft, up, pair=False)
    state = tile.slot.state_dict()
    (w_k, _), (w_t, _) = _both_paths(tile, x, d, 0.5, 7, "stochastic")
    monkeypatch.setattr(kernels, "AVAILABLE", False)
    assert not update_module._kernels_apply(tile.slot.arrays)
    tile.slot.load_state_dict(state)
    g = _gen(7)
    plan = plan_pulses(x, d, 0.5, tile.slot.granularity, up)
    apply_per_sample(tile.slot.arrays, False, lambda sl: sample_trains(plan, g, sl), plan, g)
    torch.testing.assert_close(tile.slot.persistent, w_t, rtol=0, atol=0)
    torch.testing.assert_close(w_k, w_t, rtol=0, atol=2e-7)
