"""crossbar mapping (issue 11 item 2): the "max" and "fan_in" scale rules, the representable range,
and the remap (aihwkit's `remap_weights`)."""

from __future__ import annotations

import math

import pytest
import torch

from crossbar import AnalogTile, MappingParameters, TileConfig, UpdateParameters, perfect_io, tile_for_device
from ept_hw.config import ConfigError


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _device(w_min: float = -1.0, w_max: float = 1.0) -> dict:
    return {"model": "constant_step", "dw_min": 1e-3, "dw_min_dtod": 0.0, "dw_min_std": 0.0, "up_down": 0.0,
            "up_down_dtod": 0.0, "w_max": w_max, "w_min": w_min, "w_max_dtod": 0.0, "w_min_dtod": 0.0}


def _tile(rule: str, *, omega: float = 0.6, remap_every: int = 0, w_min: float = -1.0, w_max: float = 1.0,
          out_f: int = 8, in_f: int = 16, differential: str = "auto", bl: int = 1000) -> AnalogTile:
    cfg = TileConfig(device=_device(w_min, w_max), forward=perfect_io(), backward=perfect_io(),
                     update=UpdateParameters(desired_bl=bl, mode="expected"), differential=differential,
                     mapping=MappingParameters(weight_scaling_omega=omega, weight_scaling_rule=rule,
                                               remap_every=remap_every))
    return AnalogTile(cfg, out_f, in_f, _gen(1))


def _init(scale: float, out_f: int = 8, in_f: int = 16, seed: int = 3) -> torch.Tensor:
    """N(0, scale²/fan_in), as the model draws its projections (scale = resinit for W_O, W_2)."""
    return scale * torch.randn(out_f, in_f, generator=_gen(seed)) / math.sqrt(in_f)


def test_fan_in_rule_ignores_the_programmed_weight_and_states_its_range():
    kappa, omega, in_f = 4.0, 0.6, 16
    expected = kappa / (omega * math.sqrt(in_f))
    for scale in (0.1, 1.0):  # a resinit-shrunk and an unshrunk matrix get the same scale
        tile = _tile("fan_in")
        tile.program(_init(scale))
        assert torch.allclose(tile.scale, torch.full_like(tile.scale, expected), rtol=1e-6)
        lo, hi = tile.representable_range()
        # device bounds ±1 -> model range ±(1/ω)·κ/√fan_in
        assert torch.allclose(hi, torch.full_like(hi, expected)) and torch.allclose(lo, -hi)
    # the old rule: the scale follows the programmed maximum, so a shrunk matrix gets a 10x smaller range
    small, big = _tile("max"), _tile("max")
    small.program(_init(0.1))
    big.program(_init(1.0))
    assert float(small.scale.max()) == pytest.approx(float(_init(0.1).abs().max()) / omega, rel=1e-6)
    assert float(big.scale.max()) / float(small.scale.max()) == pytest.approx(10.0, rel=1e-5)


def test_fan_in_rule_lets_a_shrunk_matrix_grow_where_the_max_rule_clips():
    """Program a resinit-shrunk matrix, then request by pulses the change that grows it 5x (as a
    trained residual branch does): the "max" rule's range caps it, the "fan_in" rule's does not."""
    w0 = _init(0.1)
    grown = 5.0 * w0
    for rule in ("max", "fan_in"):
        tile = _tile(rule, bl=20_000)
        tile.program(w0)
        lo, hi = tile.representable_range()
        outside = float(((grown < lo) | (grown > hi)).float().mean())
        # Σ δuᵀ with u = identity rows: W ← W − lr·(w0 − grown)ᵀᵀ = grown
        tile.apply_update(torch.eye(16), (w0 - grown).T.contiguous(), 1.0)
        err = float((tile.weight - grown).norm() / grown.norm())
        if rule == "max":
            assert outside > 0.3 and err > 0.2, (rule, outside, err)
        else:
            # expected-value pulses of a constant-step device: exact up to the granularity
            assert outside == 0.0 and err < 2e-3, (rule, outside, err)


def test_representable_range_of_a_differential_pair():
    tile = _tile("fan_in", omega=0.5, w_min=0.0, w_max=2.0)
    assert tile.slot.pair
    tile.program(_init(1.0))
    lo, hi = tile.representable_range()
    s = 4.0 / (0.5 * math.sqrt(16))
    assert torch.allclose(hi, torch.full_like(hi, 2.0 * s)) and torch.allclose(lo, -hi)


def test_ideal_device_range_is_unbounded():
    tile = AnalogTile(tile_for_device("ideal"), 4, 4, _gen(2))
    lo, hi = tile.representable_range()
    assert bool(torch.isinf(lo).all() and torch.isinf(hi).all() and (lo < 0).all())


def test_remap_refits_the_scale_keeps_the_weights_and_is_counted():
    tile = _tile("max", remap_every=2)
    w0 = _init(0.1)
    tile.program(w0)
    s0 = float(tile.scale.max())
    lo0, hi0 = tile.representable_range()
    g = _gen(5)
    u = torch.rand(32, 16, generator=g)
    d = torch.rand(32, 8, generator=g)  # one sign: every weight moves down, past the initial range
    lr = 0.01
    tile.apply_update(u, d, lr)
    assert tile.counters()["remaps"] == 0
    before = tile.weight.clone()
    tile.apply_update(u, d, lr)  # the 2nd update triggers a remap
    after_update = before - lr * d.T @ u
    assert tile.counters()["remaps"] == 1
    # the devices were clipped at the old range before the remap; the remap keeps what they held
    held = torch.maximum(torch.minimum(after_update, hi0), lo0)
    torch.testing.assert_close(tile.weight, held, rtol=1e-5, atol=1e-6)
    # the scale is refit to the current maximum (the old range was full: the new scale is larger)
    assert float(tile.scale.max()) == pytest.approx(float(held.abs().max()) / 0.6, rel=1e-5)
    assert float(tile.scale.max()) > 1.5 * s0
    # after the remap the next update is no longer clipped at the old range (the new one is
    # 1/ω times the current maximum)
    tile.apply_update(u, d, lr / 4)
    expected = held - lr / 4 * d.T @ u
    assert float((expected < lo0).float().mean()) > 0.5  # they would have been
    torch.testing.assert_close(tile.weight, expected, rtol=1e-4, atol=1e-5)
    # the remap count is saved and restored
    other = _tile("max", remap_every=2)
    other.load_state_dict(tile.state_dict())
    assert other.counters()["remaps"] == 1


def test_mapping_parameters_refuse_bad_values():
    with pytest.raises(ConfigError, match="weight_scaling_rule"):
        MappingParameters(weight_scaling_omega=0.6, weight_scaling_rule="mean")
    with pytest.raises(ConfigError, match="weight_scaling_fan_in_max"):
        MappingParameters(weight_scaling_omega=0.6, weight_scaling_fan_in_max=0.0)
    with pytest.raises(ConfigError, match="remap_every"):
        MappingParameters(weight_scaling_omega=0.0, remap_every=5)
    with pytest.raises(ConfigError, match="remap_every"):
        TileConfig(device="reram_sb", algorithm="mixed_precision",
                   mapping=MappingParameters(weight_scaling_omega=0.6, remap_every=5))


def test_max_fan_in_rule_floors_the_max_rule_at_the_fan_in_scale():
    kappa, omega = 1.5, 0.6
    floor = kappa / (omega * math.sqrt(16))
    cfg = TileConfig(device=_device(), forward=perfect_io(), backward=perfect_io(),
                     mapping=MappingParameters(weight_scaling_omega=omega, weight_scaling_rule="max_fan_in",
                                               weight_scaling_fan_in_max=kappa))
    small, big = AnalogTile(cfg, 8, 16, _gen(1)), AnalogTile(cfg, 8, 16, _gen(1))
    small.program(_init(0.1))  # max|W|·√16 ≈ 0.25 < κ: the floor
    big.program(_init(1.0))  # max|W|·√16 ≈ 2.5 > κ: aihwkit's max rule
    assert torch.allclose(small.scale, torch.full_like(small.scale, floor), rtol=1e-6)
    assert float(big.scale.max()) == pytest.approx(float(_init(1.0).abs().max()) / omega, rel=1e-6)
    assert float(big.scale.max()) > 1.2 * floor
    with pytest.raises(ConfigError, match="remap_every"):
        MappingParameters(weight_scaling_omega=0.6, weight_scaling_rule="fan_in", remap_every=5)
