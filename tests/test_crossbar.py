"""crossbar: periphery reads, noise modes, configs, AnalogProjection vs DigitalProjection."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from crossbar import (AnalogProjection, AnalogTile, IOParameters, TileConfig, UpdateParameters, analog_factory, tile_for_device,
                      analog_read, load_tile_config, perfect_io, save_tile_config, tile_config_from_dict,
                      tile_preset, tile_preset_names)
from crossbar.io import ReadStats
from ept_hw.config import ConfigError
from ept_hw.projection import DigitalProjection, Projection


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_quantisation_error_within_resolution_bound():
    g = _gen(1)
    w = 0.3 * torch.randn(16, 32, generator=g, dtype=torch.float64)
    x = torch.randn(200, 32, generator=g, dtype=torch.float64)
    io = IOParameters(inp_res=1 / 126, out_res=1 / 510, out_bound=40.0, out_noise=0.0,
                      bound_management="none", noise_management="abs_max")
    y = analog_read(w, x, io, g)
    alpha = x.abs().amax(dim=1, keepdim=True)
    # DAC error ≤ step/2 per input, ADC error ≤ step/2 per output, both in the α-scaled domain
    bound = alpha * (w.abs().sum(dim=1) * io.inp_step / 2 + io.out_step / 2)
    err = (y - x @ w.T).abs()
    assert bool((err <= bound * (1 + 1e-9)).all())
    assert float((err / bound).max()) > 0.2  # quantisation happened (an unquantised read gives ~0)
    # res > 1 means a number of steps: the same read
    io_steps = IOParameters(inp_res=126.0, out_res=510.0, out_bound=40.0, out_noise=0.0,
                            bound_management="none", noise_management="abs_max")
    assert torch.equal(analog_read(w, x, io_steps, _gen(2)), y)
    from crossbar import res_from_bits
    assert res_from_bits(7) == io.inp_res and res_from_bits(9) == io.out_res


def test_read_noise_std_matches_config():
    g = _gen(3)
    w = 0.2 * torch.randn(64, 16, generator=g, dtype=torch.float64)
    x = torch.rand(4000, 16, generator=g, dtype=torch.float64) * 0.5
    x[:, 0] = 2.0  # abs max 2: noise management scales the output noise by 2
    io = IOParameters(inp_res=0.0, out_res=0.0, out_bound=100.0, out_noise=0.1,
                      bound_management="none", noise_management="abs_max")
    err = analog_read(w, x, io, g) - x @ w.T
    assert abs(float(err.std()) / 0.2 - 1) < 0.02
    assert abs(float(err.mean())) < 0.005
    # additive-constant weight noise: σ = w_noise·‖x̃‖₂ (x̃ the noise-managed input)
    io_w = IOParameters(inp_res=0.0, out_res=0.0, out_bound=100.0, out_noise=0.0, w_noise=0.05,
                        w_noise_type="additive_constant", bound_management="none", noise_management="none")
    xh = x / 2  # within inp_bound: without noise management larger inputs clip
    err_w = analog_read(w, xh, io_w, g) - xh @ w.T
    expected = 0.05 * xh.norm(dim=1, keepdim=True)
    assert abs(float((err_w / expected).std()) - 1) < 0.02


def test_bound_management_removes_clipping():
    w = torch.full((8, 64), 0.5, dtype=torch.float64)
    x = torch.ones(10, 64, dtype=torch.float64)  # y = 32 > out_bound 12
    exact = x @ w.T
    no_bm = IOParameters(out_noise=0.0, bound_management="none")
    stats = ReadStats()
    clipped = analog_read(w, x, no_bm, _gen(), stats)
    assert float(clipped.max()) == pytest.approx(12.0)
    assert stats.adc_clipped == 80
    bm = IOParameters(out_noise=0.0, bound_management="iterative")
    stats_bm = ReadStats()
    y = analog_read(w, x, bm, _gen(), stats_bm)
    # kept read at factor 4 (32/2 = 16 still saturates, 32/4 = 8 does not): quantisation bound
    bound = 4 * (64 * 0.5 * bm.inp_step / 2 + bm.out_step / 2)
    assert float((y - exact).abs().max()) < bound < 2.0  # clipped: 20 off
    assert stats_bm.adc_clipped == 0
    assert stats_bm.mvm_reads == 30  # the read, and re-reads at factors 2 and 4


def test_noise_modes_fresh_common_frozen():
    cfg = tile_preset("idealized")
    w = 0.1 * torch.randn(6, 5, generator=_gen(4))
    x = torch.randn(7, 5, generator=_gen(5))
    proj = AnalogProjection(w, cfg, _gen(6))
    a, b = proj.forward(x), proj.forward(x)
    assert float((a - b).abs().max()) > 1e-4  # fresh: new draws
    proj.noise_mode = "common"
    proj.set_noise_seed(11)
    plus = [proj.forward(x), proj.transpose(torch.ones(2, 6))]
    proj.set_noise_seed(11)
    minus = [proj.forward(x), proj.transpose(torch.ones(2, 6))]
    assert all(torch.equal(p, m) for p, m in zip(plus, minus))
    assert float((plus[0] - proj.forward(x)).abs().max()) > 1e-4  # within a phase the stream moves on
    proj.noise_mode = "frozen"
    assert torch.equal(proj.forward(x), proj.forward(x))
    with pytest.raises(ValueError):
        proj.noise_mode = "sometimes"


def test_n_reads_averaging_reduces_noise():
    w = torch.zeros(32, 8)
    x = torch.ones(500, 8)
    noisy = IOParameters(inp_res=0.0, out_res=0.0, out_noise=0.1, bound_management="none")
    one = TileConfig(device="ideal", forward=noisy, backward=noisy)
    four = one.replace(n_reads=4)
    t1, t4 = AnalogTile(one, 32, 8, _gen()), AnalogTile(four, 32, 8, _gen())
    t1.program(w)
    t4.program(w)
    assert abs(float(t1.forward(x).std()) / 0.1 - 1) < 0.03
    assert abs(float(t4.forward(x).std()) / 0.05 - 1) < 0.03


def test_ideal_perfect_reproduces_digital_projection():
    cfg = tile_preset("perfect_ideal")
    w = torch.randn(12, 9, generator=_gen(7))
    analog = AnalogProjection(w, cfg, _gen(8), name="W_Q")
    digital = DigitalProjection(w, name="W_Q")
    assert isinstance(analog, Projection)
    u = torch.randn(3, 5, 9, generator=_gen(9))
    d = torch.randn(3, 5, 12, generator=_gen(10))
    torch.testing.assert_close(analog.forward(u), digital.forward(u), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(analog.transpose(d), digital.transpose(d), rtol=1e-6, atol=1e-6)
    u64 = u.double()
    assert analog.forward(u64).dtype == torch.float64
    torch.testing.assert_close(analog.forward(u64), u64 @ w.double().T, rtol=1e-6, atol=1e-6)
    for _ in range(3):
        analog.apply_update(u, d, 0.01)
        digital.apply_update(u, d, 0.01)
    torch.testing.assert_close(analog.weight, digital.weight, rtol=1e-5, atol=1e-6)
    assert float((analog.weight - w).abs().max()) > 0.01  # the update did something
    zc = torch.complex(u, 0.5 * u)
    torch.testing.assert_close(analog.forward(zc), digital.forward(zc), rtol=1e-5, atol=1e-5)


def test_mapping_scale_fills_device_range_and_reads_model_weights():
    cfg = tile_preset("gokmen_vlasov")
    cfg = cfg.replace(mapping=dataclasses.replace(cfg.mapping, weight_scaling_rule="max"))  # aihwkit's rule
    w = 3.0 * torch.randn(10, 20, generator=_gen(11))  # far beyond the device range ±1
    tile = AnalogTile(cfg, 10, 20, _gen(12))
    tile.program(w)
    omega = cfg.mapping.weight_scaling_omega
    scale = float(w.abs().max()) / omega
    assert float(tile.scale.max()) == pytest.approx(scale, rel=1e-6)
    h = tile.slot.arrays[0].hidden
    # each device holds W/s, clipped only by its own (d2d-varied) bounds
    expected = scale * torch.minimum(torch.maximum(w / scale, h["min_bound"]), h["max_bound"])
    torch.testing.assert_close(tile.weight, expected, rtol=1e-5, atol=1e-5)
    assert float((tile.weight - w).abs().lt(1e-4).float().mean()) > 0.95
    x = torch.randn(400, 20, generator=_gen(13))
    ref = x @ tile.weight.T
    alpha = x.abs().amax(dim=1, keepdim=True)
    # in device units the read error is out_noise (0.1) plus small quantisation noise
    normalised = (tile.forward(x) - ref) / (alpha * scale)
    assert 0.1 <= float(normalised.std()) < 0.11


def test_pcm_preset_uses_differential_pair():
    cfg = tile_preset("pcm")
    assert cfg.uses_pair
    w = 0.2 * torch.randn(6, 6, generator=_gen(14))
    proj = AnalogProjection(w, cfg, _gen(15))
    assert float((proj.weight - w).abs().max()) < 0.05 * float(w.abs().max())
    plus, minus = proj.tile.slot.arrays
    assert float(plus.weights.min()) >= 0.0 and float(minus.weights.min()) >= 0.0


def test_tile_config_toml_round_trip_and_errors(tmp_path):
    for name in tile_preset_names():
        cfg = tile_preset(name)
        save_tile_config(tmp_path / f"{name}.toml", cfg)
        assert load_tile_config(tmp_path / f"{name}.toml") == cfg
    cfg = TileConfig(device={"model": "soft_bounds", "dw_min": 0.002}, algorithm="ttv2", noise_mode="common")
    save_tile_config(tmp_path / "sb.toml", cfg)
    assert load_tile_config(tmp_path / "sb.toml") == cfg
    bad = [
        lambda: IOParameters(inp_bound=-1.0),
        lambda: IOParameters(noise_management="bogus"),
        lambda: IOParameters(inp_bound=2.0),  # noise management needs inp_bound 1
        lambda: UpdateParameters(desired_bl=0),
        lambda: UpdateParameters(mode="approximately"),
        lambda: TileConfig(device="no_such_device"),
        lambda: TileConfig(algorithm="mixed_precision"),  # ideal device
        lambda: TileConfig(n_reads=0),
        lambda: tile_config_from_dict({"forward": {"out_bound": 0.0}}),
        lambda: tile_config_from_dict({"update": {"desired_bl": 31, "bl": 3}}),
    ]
    for make in bad:
        with pytest.raises(ConfigError):
            make()


def test_clear_shape_errors():
    proj = AnalogProjection(torch.zeros(4, 3), tile_preset("idealized"), _gen())
    with pytest.raises(ValueError, match="last dimension"):
        proj.forward(torch.zeros(2, 4))
    with pytest.raises(ValueError, match="last dimension"):
        proj.transpose(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="do not fit"):
        proj.apply_update(torch.zeros(2, 3), torch.zeros(3, 4), 0.1)
    with pytest.raises(ValueError):
        proj.program(torch.zeros(3, 4))
    with pytest.raises(ValueError):
        proj.apply_update(torch.zeros(2, 3), torch.zeros(2, 4), -0.1)


@pytest.mark.parametrize("algorithm", ["sgd", "mixed_precision", "ttv2", "c_ttv2", "agad"])
def test_state_dict_resumes_exactly(algorithm):
    cfg = tile_preset("reram_sb", algorithm=algorithm)
    factory = analog_factory(cfg, _gen(20))
    w = 0.3 * torch.randn(5, 7, generator=_gen(21))
    a = factory("W", w)
    u = torch.randn(4, 7, generator=_gen(22))
    d = torch.randn(4, 5, generator=_gen(23))
    a.apply_update(u, d, 0.05)
    state = a.state_dict()
    b = analog_factory(cfg, _gen(99))("W", torch.zeros(5, 7))
    b.load_state_dict(state)
    assert torch.equal(a.weight, b.weight)
    for proj in (a, b):
        proj.apply_update(u, d, 0.05)
    assert torch.equal(a.weight, b.weight)
    assert torch.equal(a.forward(u), b.forward(u))
    assert a.counters() == b.counters()
    assert a.counters()["pulses_max"] > 0 and a.counters()["mvm_reads"] > 0


def test_analog_factory_inside_the_model_matches_digital_twin():
    """The model's autograd plumbing (forward read, transposed read for the VJP) through analog
    projections with an ideal device and perfect periphery equals the digital twin."""
    from ept_hw.model import EquilibriumTransformer, ModelConfig
    from ept_hw.projection import digital_factory

    cfg = ModelConfig(vocab_size=11, context=6, width=8, heads=2)
    analog = EquilibriumTransformer(cfg, analog_factory(tile_preset("perfect_ideal"), _gen(1)), _gen(2))
    digital = EquilibriumTransformer(cfg, digital_factory, _gen(2))
    idx = torch.randint(0, 11, (2, 6), generator=_gen(3))
    z = 0.5 * torch.randn(2, 6, 8, generator=_gen(4))
    forces = []
    for model in (analog, digital):
        zz = z.clone().requires_grad_(True)
        f = model.force(zz, model.embed(idx))
        (vjp,) = torch.autograd.grad(f, zz, torch.ones_like(f))
        forces.append((f.detach(), vjp))
    torch.testing.assert_close(forces[0][0], forces[1][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(forces[0][1], forces[1][1], rtol=1e-5, atol=1e-5)
    assert float(forces[0][1].abs().max()) > 0.1


def test_tile_for_device_applies_the_preset_rules():
    cfg = tile_for_device({"model": "soft_bounds", "dw_min": 0.01, "w_max": 1.0, "w_min": -0.5})
    assert cfg.mapping.weight_scaling_omega == pytest.approx(0.3)  # 0.6·min(|w_min|, w_max)
    # the preset rule: a small programmed matrix maps by the fan-in floor, not by its own maximum
    assert cfg.mapping.weight_scaling_rule == "max_fan_in" and cfg.mapping.weight_scaling_fan_in_max == 1.5
    assert cfg.forward.out_bound == 20.0 and cfg.backward.bound_management == "none"
    assert tile_for_device("reram_sb", algorithm="ttv2") == tile_preset("reram_sb", algorithm="ttv2")
    pcm = tile_for_device("pcm")
    assert pcm.uses_pair and pcm.mapping.weight_scaling_omega == pytest.approx(1.0)
    assert pcm.mapping.weight_scaling_rule == "max"  # a pair keeps aihwkit's rule (max_fan_in diverged on PCM)


def test_bits_and_resolution_convert_both_ways():
    """aihwkit's convention: b bits <-> 2^b − 2 steps, as a resolution 1/steps or as steps > 1."""
    from crossbar.io import bits_from_res, res_from_bits

    for bits in range(2, 13):
        assert bits_from_res(res_from_bits(bits)) == pytest.approx(bits, abs=1e-12)
    assert res_from_bits(7) == pytest.approx(1 / 126)
    assert bits_from_res(126.0) == pytest.approx(7.0)      # a res > 1 is a number of steps
    assert bits_from_res(0.0) is None


@pytest.mark.parametrize("table, key", [
    ("forward", "inp_bound"), ("forward", "out_bound"), ("forward", "out_noise"), ("backward", "inp_res"),
    ("backward", "w_noise"), ("update", "um_grad_scale"), ("update", "x_res_implicit"),
    ("mapping", "weight_scaling_omega"), ("mixed_precision", "granularity"), ("transfer", "fast_lr"),
    ("transfer", "transfer_lr"), ("transfer", "buffer_granularity"), (None, "programming_noise"),
])
def test_tile_parameters_refuse_non_finite_values(table, key):
    """Every float of a tile is a finite number: inf used to pass wherever the range was open above."""
    from crossbar.config import tile_config_from_dict
    from ept_hw.config import ConfigError

    for value in (math.inf, math.nan):
        data = {"device": "reram_sb", **({table: {key: value}} if table else {key: value})}
        with pytest.raises(ConfigError) as err:
            tile_config_from_dict(data)
        assert key in str(err.value) and "allowed" in str(err.value)


def test_periphery_reader_rescales_weights_that_changed():
    """A `PeripheryReader` caches the scaled weights: a read after the weights changed (in place,
    or a new tensor) equals a fresh `analog_read` with the same draws."""
    from crossbar.io import PeripheryReader
    from crossbar.presets import preset_io

    io = preset_io()
    read = PeripheryReader(io)
    w = 0.2 * torch.randn(12, 20, generator=_gen(0))
    x = torch.randn(30, 20, generator=_gen(1))
    assert torch.equal(read(w, x, _gen(2)), analog_read(w, x, io, _gen(2)))
    w.mul_(-1.5)  # in place
    assert torch.equal(read(w, x, _gen(3)), analog_read(w, x, io, _gen(3)))
    w2 = w + 0.05  # a new tensor; and the transposed read of it
    assert torch.equal(read(w2, x, _gen(4)), analog_read(w2, x, io, _gen(4)))
    d = torch.randn(30, 12, generator=_gen(5))
    wt = w2.T  # one view object, read again after its base changed in place
    assert torch.equal(read(wt, d, _gen(6)), analog_read(wt, d, io, _gen(6)))
    w2.add_(0.1)
    assert torch.equal(read(wt, d, _gen(7)), analog_read(wt, d, io, _gen(7)))


@pytest.mark.parametrize("preset", ["ecram", "pcm"])
def test_tile_reads_see_weights_changed_in_place_or_replaced(preset):
    """The tile hands its readers the same weight tensor (and one transposed view of it) from read
    to read, which their caches find by identity; a pair's G⁺ − G⁻ is kept between reads, and the
    tile's uniform digital scale between changes of `scale`. Reads after a device array's weights
    changed in place or were replaced by an update, after reprogramming (a new scale) and after
    the scale was edited in place, equal reads of the present weights and scale through fresh
    readers."""
    from crossbar.io import PeripheryReader

    tile = AnalogTile(tile_preset(preset), 6, 10, _gen(0))
    tile.program(0.1 * torch.randn(6, 10, generator=_gen(1)))
    x, d = torch.randn(8, 10, generator=_gen(2)), torch.randn(8, 6, generator=_gen(3))

    def fresh(transpose: bool, seed: int) -> torch.Tensor:
        arrays = tile.slot.arrays
        w = arrays[0].weights - arrays[1].weights if tile.slot.pair else arrays[0].weights.clone()
        io = tile.config.backward if transpose else tile.config.forward
        scale = float(tile.scale.max())
        assert torch.all(tile.scale == scale)  # a uniform scale: the readers apply it
        return PeripheryReader(io)(w.T if transpose else w, d if transpose else x, _gen(seed), None, scale)

    for step in range(5):
        for transpose in (False, True):
            tile.read_generator.manual_seed(10 + step)
            got = tile.transpose(d) if transpose else tile.forward(x)
            assert torch.equal(got, fresh(transpose, 10 + step)), (step, transpose)
        if step == 0:
            tile.slot.arrays[0].weights.mul_(0.5)  # in place
        elif step == 1:
            tile.apply_update(x, 0.5 * d, lr=0.1)  # new device weights
        elif step == 2:
            tile.program(0.3 * torch.randn(6, 10, generator=_gen(4)))  # a new scale
        else:
            tile.scale.mul_(1.5)  # the scale edited in place


@pytest.mark.parametrize("variant", [{}, {"out_bound": 0.6}, {"out_bound": 0.6, "bm_test_negative_bound": False},
                                     {"inp_sto_round": True, "out_sto_round": True, "inp_noise": 0.02},
                                     {"w_noise": 0.02, "w_noise_type": "pcm_read", "out_bound": 0.6}])
@pytest.mark.parametrize("compiled", [None, False])
def test_common_noise_blocks_read_in_one_pass_equal_block_by_block(variant, compiled):
    """`PeripheryReader(blocks=k)` (one product for the k stacked nudge phases, noise drawn once)
    gives, draw for draw, what k reads with the generator reset before each give: outputs, read
    counters (bound-management re-reads included) and the generator's final state; and blocks
    of equal inputs read alike. Both implementations: the compiled read (`compiled=None` takes
    it for the first three peripheries) and the torch path."""
    from dataclasses import replace

    from crossbar.io import PeripheryReader, ReadStats
    from crossbar.presets import preset_io

    io = replace(preset_io(), **variant)
    read = PeripheryReader(io, compiled)
    covered = not ({"inp_sto_round", "w_noise"} & set(variant))
    assert read.compiled == (compiled is None and covered)
    w = 0.3 * torch.randn(7, 9, generator=_gen(0))
    for k, b in ((2, 3), (3, 2)):
        base = torch.randn(b, 4, 9, generator=_gen(k)) * (1 + 3 * torch.rand(b, 4, 1, generator=_gen(k + 1)))
        x = torch.cat([base * (1 + 0.2 * i) for i in range(k)])
        ref_gen, ref_stats, outs = _gen(7), ReadStats(), []
        start = ref_gen.get_state()
        for chunk in x.split(b):
            ref_gen.set_state(start)
            outs.append(read(w, chunk, ref_gen, ref_stats))
        gen, stats = _gen(7), ReadStats()
        got = read(w, x, gen, stats, blocks=k)
        assert torch.equal(got, torch.cat(outs))
        assert torch.equal(gen.get_state(), ref_gen.get_state())
        assert stats.as_dict() == ref_stats.as_dict()
        if "out_bound" in variant:  # the case that matters: some vectors were re-read
            assert stats.mvm_reads > x.shape[0] * x.shape[1]
        assert not torch.equal(got[:b], got[b:2 * b])  # different inputs, different reads
        same = read(w, torch.cat([base, base]), _gen(9), blocks=2)
        assert torch.equal(same[:b], same[b:])


def test_tile_read_common_matches_seeded_block_reads():
    """`AnalogTile.read_common` in "common" mode (one fused read) equals the block-by-block reads
    after `set_noise_seed`, forward and transposed; in "fresh" mode it reads block by block."""
    from crossbar import AnalogProjection, tile_preset

    weight = torch.randn(6, 5, generator=_gen(0)) / 3
    x = torch.randn(4, 3, 5, generator=_gen(1)).repeat(2, 1, 1)  # two equal blocks
    d = torch.randn(4, 3, 6, generator=_gen(2)).repeat(2, 1, 1)
    for mode in ("common", "fresh"):
        cfg = tile_preset("ecram").replace(noise_mode=mode)
        a, b = AnalogProjection(weight, cfg, _gen(3)), AnalogProjection(weight, cfg, _gen(3))
        for v, transpose in ((x, False), (d, True)):
            got = a.read_common(v, 11, 2, transpose)
            outs = []
            for chunk in v.split(4):
                b.set_noise_seed(11)
                outs.append(b.transpose(chunk) if transpose else b.forward(chunk))
            assert torch.equal(got, torch.cat(outs))
            assert torch.equal(got[:4], got[4:]) == (mode == "common")  # common noise: equal blocks read alike
