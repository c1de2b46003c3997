"""Core device API: configs, TOML, DeviceArray sampling, pulses, ideal updates, checkpoints."""

from __future__ import annotations

import math

import pytest
import torch

import devices
from devices import (ConstantStepDevice, DeviceArray, ExpStepDevice, IdealDevice, LinearStepDevice,
                     SoftBoundsDevice, device_from_dict, load_device, preset_names, save_device)
from ept_hw.config import ConfigError



def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------- configs
@pytest.mark.parametrize("data, key", [
    ({"model": "soft_bounds", "dw_min": -0.001}, "dw_min"),
    ({"model": "constant_step", "w_min": 0.5, "w_max": 0.4}, "w_min"),
    ({"model": "constant_step", "w_min": -0.5, "w_max": -0.6}, "w_min"),
    ({"model": "constant_step", "w_min": -0.5, "w_max": -0.1}, "w_max"),
    ({"model": "linear_step", "corrupt_devices_prob": 1.5}, "corrupt_devices_prob"),
    ({"model": "soft_bounds", "dw_min_sdt": 0.3}, "dw_min_sdt"),
    ({"model": "softbounds"}, "model"),
    ({"dw_min": 0.1}, "model"),
    ({"model": "exp_step", "write_noise_std": -1.0}, "write_noise_std"),
    ({"model": "piecewise_step", "piecewise_up": [1, 2], "piecewise_down": [1]}, "piecewise_down"),
])
def test_bad_configs_name_key_value_and_range(data, key):
    with pytest.raises(ConfigError) as err:
        device_from_dict(data)
    assert err.value.key == key
    assert "allowed" in str(err.value) and key in str(err.value)


def test_w_min_equal_w_max_refused():
    with pytest.raises(ConfigError) as err:
        device_from_dict({"model": "constant_step", "w_min": 0.0, "w_max": 0.0})
    assert err.value.key == "w_min"


def test_unset_keys_take_aihwkit_defaults_and_toml_round_trips(tmp_path):
    path = tmp_path / "dev.toml"
    path.write_text('[device]\nmodel = "soft_bounds"\ndw_min = 0.002\nup_down = 0.3\n')
    cfg = load_device(path)
    assert isinstance(cfg, SoftBoundsDevice)
    assert (cfg.dw_min, cfg.up_down, cfg.w_max, cfg.dw_min_std, cfg.dw_min_dtod) == (0.002, 0.3, 0.6, 0.3, 0.3)
    for name in preset_names():
        cfg = load_device(name)
        save_device(tmp_path / f"{name}.toml", cfg)
        again = load_device(tmp_path / f"{name}.toml")
        assert again == cfg and again.model == cfg.model


def test_granularity_matches_aihwkit_values():
    assert load_device("reram_es").granularity == pytest.approx(0.0019914, rel=1e-4)
    assert load_device("pcm").granularity == pytest.approx(0.03235, rel=1e-4)
    assert load_device("ecram_mo").granularity == pytest.approx(2.8214e-4)
    assert device_from_dict({"model": "pow_step", "pow_gamma": 2.0}).granularity == pytest.approx(0.00025)
    assert load_device("ideal").is_ideal and math.isinf(load_device("ideal").w_max)


def test_unknown_preset_or_missing_file(tmp_path):
    with pytest.raises(ConfigError):
        load_device("reram_xx")
    with pytest.raises(ConfigError):
        load_device(str(tmp_path / "nonexistent" / "dev.toml"))


# ---------------------------------------------------------------- sampling
def test_d2d_sampling_statistics_and_consistency():
    cfg = ConstantStepDevice(up_down=0.2, up_down_dtod=0.05, dw_min_dtod=0.3)
    arr = DeviceArray(cfg, (200, 200), gen(1))
    h = arr.hidden
    # up_down > 0 shrinks only the down step: E[dwmin_up] = dw_min, E[dwmin_down] = 0.8 dw_min.
    assert h["dwmin_up"].mean().item() == pytest.approx(0.001, rel=0.01)
    assert h["dwmin_down"].mean().item() == pytest.approx(0.0008, rel=0.015)
    std_gain = (h["dwmin_up"] + h["dwmin_down"]).std().item() / 2 / 0.001
    assert std_gain == pytest.approx(0.3, rel=0.05)
    diff_std = (h["dwmin_up"] - h["dwmin_down"]).std().item() / 2 / 0.001
    assert diff_std == pytest.approx(0.05, rel=0.05)
    assert (h["max_bound"] >= 0).all() and (h["min_bound"] <= 0).all()
    assert (h["dwmin_up"] >= 0).all() and (h["dwmin_down"] >= 0).all()
    assert h["max_bound"].std().item() == pytest.approx(0.18, rel=0.15)  # |0.6 (1 + 0.3 ξ)| ≈ 0.6·0.3


def test_log_normal_gain():
    cfg = ConstantStepDevice(dw_min_dtod=0.5, dw_min_dtod_log_normal=True, up_down_dtod=0.0)
    up = DeviceArray(cfg, (100000,), gen(2)).hidden["dwmin_up"] / 0.001
    assert (up > 0).all()
    assert torch.log(up).std().item() == pytest.approx(0.5, rel=0.02)


def test_same_seed_same_devices_different_seed_different():
    a = DeviceArray(load_device("reram_sb"), (30, 40), gen(5))
    b = DeviceArray(load_device("reram_sb"), (30, 40), gen(5))
    c = DeviceArray(load_device("reram_sb"), (30, 40), gen(6))
    assert torch.equal(a.hidden["max_bound"], b.hidden["max_bound"])
    assert not torch.equal(a.hidden["max_bound"], c.hidden["max_bound"])


# ---------------------------------------------------------------- pulses
def test_pulses_saturate_one_by_one_at_each_devices_bound():
    cfg = ConstantStepDevice(dw_min=0.1, dw_min_std=0.0, dw_min_dtod=0.0, up_down_dtod=0.0,
                             w_max=0.25, w_min=-0.25, w_max_dtod=0.0, w_min_dtod=0.0)
    arr = DeviceArray(cfg, (3,), gen())
    arr.set_weights(torch.zeros(3))
    arr.apply_pulses(torch.tensor([1, 2, 5]), torch.tensor([0, 0, 1]), gen())
    # third device: one (up, down) pair, then 4 ups: 0.1, 0.0, 0.1, 0.2, 0.25 (clipped), 0.25
    assert torch.allclose(arr.weights, torch.tensor([0.1, 0.2, 0.25]))
    # Net counts (0) would be wrong for a bounded device: 5 alternating pairs from 0.2 saturate
    # at 0.25 on every up and end one step below, at 0.15.
    arr.set_weights(torch.full((3,), 0.2))
    arr.apply_pulses(torch.tensor([0, 0, 5]), torch.tensor([0, 1, 5]), gen())
    assert torch.allclose(arr.weights, torch.tensor([0.2, 0.1, 0.15]), atol=1e-6)


def test_apply_pulses_rejects_bad_counts():
    arr = DeviceArray(ConstantStepDevice(), (2, 2), gen())
    with pytest.raises(ValueError):
        arr.apply_pulses(-torch.ones(2, 2, dtype=torch.long), torch.zeros(2, 2, dtype=torch.long), gen())
    with pytest.raises(ValueError):
        arr.apply_pulses(torch.ones(3, dtype=torch.long), torch.zeros(3, dtype=torch.long), gen())
    with pytest.raises(TypeError):
        arr.apply_delta(torch.ones(2, 2))


def test_ideal_is_exact_float_update():
    arr = DeviceArray(IdealDevice(), (4, 3), gen())
    w0 = torch.randn(4, 3, generator=gen(1)) * 10
    arr.set_weights(w0)
    dw = torch.randn(4, 3, generator=gen(2)) * 1e-7
    arr.apply_delta(dw)
    assert torch.equal(arr.weights, w0 + dw)
    with pytest.raises(TypeError):
        arr.apply_pulses(torch.ones(4, 3, dtype=torch.long), torch.zeros(4, 3, dtype=torch.long), gen())


def test_set_weights_clips_to_each_devices_bounds():
    arr = DeviceArray(SoftBoundsDevice(), (1000,), gen(3))
    arr.set_weights(torch.full((1000,), 5.0))
    assert torch.equal(arr.weights, arr.hidden["max_bound"])
    arr.set_weights(torch.full((1000,), -5.0))
    assert torch.equal(arr.weights, arr.hidden["min_bound"])


def test_mean_step_soft_bounds_equation():
    arr = DeviceArray(SoftBoundsDevice(), (500,), gen(4))
    h = arr.hidden
    w = torch.full((500,), 0.1)
    up, down = arr.mean_step(w)
    w = torch.minimum(torch.maximum(w, h["min_bound"]), h["max_bound"])  # each device's reachable w
    expect_up = torch.minimum(h["dwmin_up"] * (1 - w / h["max_bound"]), h["max_bound"] - w).clamp_min(0)
    expect_down = torch.minimum(h["dwmin_down"] * (1 - w / h["min_bound"]), w - h["min_bound"])
    assert torch.allclose(up, expect_up, rtol=1e-5, atol=3e-8)
    assert torch.allclose(down, expect_down, rtol=1e-5, atol=3e-8)
    at_bound_up, _ = arr.mean_step(h["max_bound"])
    assert at_bound_up.abs().max().item() < 1e-9


def test_write_noise_on_apparent_weights_only():
    cfg = ConstantStepDevice()
    assert not hasattr(cfg, "write_noise_std")
    cfg = LinearStepDevice(write_noise_std=10.0, dw_min_std=0.0, w_max_dtod=0.0)
    arr = DeviceArray(cfg, (20000,), gen(7))
    arr.set_weights(torch.zeros(20000), gen(8))
    noise = arr.weights - arr.persistent_weights
    assert noise.std().item() == pytest.approx(10.0 * 0.001, rel=0.03)
    before = arr.persistent_weights.clone()
    arr.apply_pulses(torch.ones(20000, dtype=torch.long), torch.zeros(20000, dtype=torch.long), gen(9))
    # the update acted on the persistent weight (noise-free step), the read sees fresh noise
    assert torch.allclose(arr.persistent_weights - before, arr.hidden["dwmin_up"], rtol=1e-4, atol=1e-9)
    fresh = arr.weights - arr.persistent_weights
    assert abs(torch.corrcoef(torch.stack([fresh, noise]))[0, 1].item()) < 0.03


def test_state_dict_round_trip_keeps_d2d_samples():
    arr = DeviceArray(load_device("reram_es"), (8, 9), gen(11))
    arr.set_weights(torch.zeros(8, 9), gen(12))
    arr.apply_pulses(torch.full((8, 9), 3), torch.full((8, 9), 1), gen(13))
    state = arr.state_dict()
    other = DeviceArray(load_device("reram_es"), (8, 9), gen(99))
    other.load_state_dict(state)
    for k, v in arr.hidden.items():
        assert torch.equal(other.hidden[k], v), k
    assert torch.equal(other.weights, arr.weights)
    g1, g2 = gen(14), gen(14)
    arr.apply_pulses(torch.full((8, 9), 2), torch.zeros(8, 9, dtype=torch.long), g1)
    other.apply_pulses(torch.full((8, 9), 2), torch.zeros(8, 9, dtype=torch.long), g2)
    assert torch.equal(other.weights, arr.weights)
    restored = DeviceArray.from_state_dict(state)
    assert torch.equal(restored.hidden["dwmin_up"], state["hidden"]["dwmin_up"])
    with pytest.raises(ValueError):
        DeviceArray(load_device("reram_sb"), (8, 9), gen()).load_state_dict(state)


def test_any_shape_and_float64():
    arr = DeviceArray(ExpStepDevice(), (2, 3, 4), gen(), dtype=torch.float64)
    arr.set_weights(torch.zeros(2, 3, 4, dtype=torch.float64))
    arr.apply_pulses(torch.ones(2, 3, 4, dtype=torch.long), torch.zeros(2, 3, 4, dtype=torch.long), gen())
    assert arr.weights.dtype == torch.float64 and arr.weights.shape == (2, 3, 4)
    assert (arr.weights > 0).all()


# ---------------------------------------------------------------- aihwkit names, decay, corrupt devices
def test_config_from_aihwkit_params_and_class_names():
    from devices.aihwkit_compat import config_from_aihwkit_params

    params = {k: v for k, v in load_device("reram_es").to_dict().items() if k != "model"}
    cfg = config_from_aihwkit_params("ReRamESPresetDevice", params)
    assert cfg == load_device("reram_es")
    assert config_from_aihwkit_params("PowStepDevice", {"pow_gamma": 2.0}).granularity == pytest.approx(0.00025)
    with pytest.raises(ConfigError) as err:
        config_from_aihwkit_params("JARTv1bDevice", {})
    assert err.value.key == "device_class"


def test_to_and_from_aihwkit_round_trip():
    pytest.importorskip("aihwkit.simulator.configs", exc_type=ImportError)  # its C++ core may not load
    from devices.aihwkit_compat import from_aihwkit, to_aihwkit

    for name in preset_names():
        cfg = load_device(name)
        assert from_aihwkit(to_aihwkit(cfg)) == cfg


def test_decay_towards_reset_bias_with_per_device_lifetime():
    cfg = ConstantStepDevice(lifetime=100.0, lifetime_dtod=0.0, reset=0.1, reset_dtod=0.0, w_max_dtod=0.0)
    arr = DeviceArray(cfg, (10,), gen())
    arr.set_weights(torch.full((10,), 0.5))
    arr.decay()
    assert torch.allclose(arr.weights, torch.full((10,), 0.1 + 0.4 * (1 - 1 / 100)))
    still = DeviceArray(ConstantStepDevice(), (10,), gen())
    assert torch.equal(still.hidden["decay_scales"], torch.ones(10))  # aihwkit's "no decay"
    still.set_weights(torch.full((10,), 0.05))
    still.decay()
    assert torch.equal(still.weights, torch.full((10,), 0.05))


def test_corrupt_devices_are_stuck():
    cfg = ConstantStepDevice(corrupt_devices_prob=0.3, corrupt_devices_range=0.05)
    arr = DeviceArray(cfg, (20000,), gen(21))
    h = arr.hidden
    stuck = h["dwmin_up"] == 0
    assert stuck.float().mean().item() == pytest.approx(0.3, abs=0.015)
    assert torch.equal(h["max_bound"][stuck], h["min_bound"][stuck])
    assert h["max_bound"][stuck].abs().max().item() <= 0.05
    arr.set_weights(torch.zeros(20000))
    arr.apply_pulses(torch.full((20000,), 3), torch.zeros(20000, dtype=torch.long), gen(22))
    assert torch.equal(arr.weights[stuck], h["max_bound"][stuck])
    assert (arr.weights[~stuck] > 0).all()


def test_reset_draws_around_reset_bias():
    cfg = ConstantStepDevice(reset=0.1, reset_dtod=0.0, reset_std=0.01, w_max_dtod=0.0, w_min_dtod=0.0)
    arr = DeviceArray(cfg, (20000,), gen(31))
    arr.set_weights(torch.full((20000,), -0.4))
    mask = torch.arange(20000) % 2 == 0
    arr.reset(mask, gen(32))
    assert arr.weights[mask].mean().item() == pytest.approx(0.1, abs=3e-4)
    assert arr.weights[mask].std().item() == pytest.approx(0.01, rel=0.05)
    assert torch.equal(arr.weights[~mask], torch.full((10000,), -0.4))


def test_enforce_consistency_off_turns_crossed_devices_off():
    cfg = ConstantStepDevice(enforce_consistency=False, w_max_dtod=2.0, w_min_dtod=2.0, dw_min_dtod=1.0)
    arr = DeviceArray(cfg, (5000,), gen(33))
    h = arr.hidden
    crossed = h["min_bound"] == h["max_bound"]
    # w_max(1 + 2ξ1) < w_min(1 + 2ξ2) happens for a sizeable fraction; those sit at the midpoint
    assert 0.05 < crossed.float().mean().item() < 0.6
    assert (h["min_bound"] <= h["max_bound"]).all()
    assert (h["dwmin_up"] < 0).any()   # no |.|: aihwkit keeps negative steps without consistency


# ---------------------------------------------------------------- validation holes (issue 12 item 5)
@pytest.mark.parametrize("model", ["constant_step", "soft_bounds", "exp_step", "pow_step", "linear_step",
                                   "soft_bounds_reference", "piecewise_step"])
@pytest.mark.parametrize("key, value", [("dw_min", 0.0), ("dw_min", math.inf), ("dw_min", math.nan),
                                        ("w_max", math.inf), ("w_min", -math.inf), ("dw_min_std", math.inf),
                                        ("lifetime", math.inf), ("reset_std", math.inf), ("up_down", 1.0),
                                        ("up_down", -1.0)])
def test_non_finite_and_step_free_parameters_are_refused(model, key, value):
    with pytest.raises(ConfigError) as err:
        device_from_dict({"model": model, key: value})
    assert err.value.key == key and "allowed" in str(err.value)


def test_model_parameters_refuse_non_finite_values():
    for model, key in (("exp_step", "A_up"), ("exp_step", "gamma_down"), ("linear_step", "gamma_up"),
                       ("pow_step", "pow_gamma"), ("soft_bounds_reference", "reference_mean"),
                       ("soft_bounds", "write_noise_std")):
        with pytest.raises(ConfigError, match=key):
            device_from_dict({"model": model, key: math.inf})
    with pytest.raises(ConfigError, match="piecewise_up"):
        device_from_dict({"model": "piecewise_step", "piecewise_up": [0.0, 0.0], "piecewise_down": [1.0, 1.0]})


def test_sign_flipping_up_down_warns_with_enforce_consistency_and_is_refused_without():
    with pytest.warns(UserWarning, match="up_down = 7"):
        cfg = device_from_dict({"model": "soft_bounds", "up_down": 7.0})
    arr = DeviceArray(cfg, (1000,), torch.Generator().manual_seed(0))
    assert bool((arr.hidden["dwmin_down"] > 0).all())   # |Δ⁻| = |1 − 7|·gain·dw_min: still a down step
    with pytest.warns(UserWarning, match="up step"):
        device_from_dict({"model": "constant_step", "up_down": -1.5})
    with pytest.raises(ConfigError, match="enforce_consistency"):
        device_from_dict({"model": "soft_bounds", "up_down": 7.0, "enforce_consistency": False})
    with pytest.raises(ConfigError, match="enforce_consistency"):
        device_from_dict({"model": "soft_bounds", "up_down": -2.0, "enforce_consistency": False})
    device_from_dict({"model": "soft_bounds", "up_down": 0.9, "enforce_consistency": False})  # fine
