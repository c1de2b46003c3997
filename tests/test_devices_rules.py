"""Statistical tests of each model's update rule: mean and variance of Δw for one pulse.

Device-to-device variation is switched off (every *_dtod = 0) so that every device has the
nominal parameters and the equations of SEMANTICS §1.4 can be written from the config alone.
N devices, one pulse each: the sample mean must be within 5 standard errors of the equation and
the sample std within 3 % of the equation's std (its own relative error is ~0.3 %).
"""

from __future__ import annotations

import math

import pytest
import torch

from devices import DeviceArray, device_from_dict


N = 40000
NO_D2D = {"dw_min_dtod": 0.0, "up_down_dtod": 0.0, "w_max_dtod": 0.0, "w_min_dtod": 0.0}


def one_pulse(cfg, w0: float, up: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    arr = DeviceArray(cfg, (N,), g, dtype=torch.float64)
    arr.set_weights(torch.full((N,), w0, dtype=torch.float64), g)
    before = arr.persistent_weights.clone()
    arr.apply_pulses(torch.full((N,), int(up)), torch.full((N,), int(not up)), g)
    return arr.persistent_weights - before


def check(dw: torch.Tensor, mean: float, std: float):
    assert abs(dw.mean().item() - mean) < 5 * std / math.sqrt(N) + 1e-12, (dw.mean().item(), mean)
    if std > 0:
        assert dw.std().item() == pytest.approx(std, rel=0.03)
    else:
        assert dw.std().item() < 1e-12


def sb(w, dw, bound):
    return dw * (1 - w / bound)


CASES = []
# (id, config dict, w0, up, expected mean, expected std); dw_min = 0.001 unless set; sigma = dw_min_std
CASES += [
    ("constant_up", {"model": "constant_step", "up_down": 0.0, **NO_D2D}, 0.1, True, 0.001, 0.3 * 0.001),
    # up_down > 0: only the down step shrinks, Δ⁻ = (1 − up_down)·dw_min
    ("constant_down_asym", {"model": "constant_step", "up_down": 0.2, **NO_D2D}, 0.1, False, -0.0008, 0.3 * 0.0008),
    # up_down < 0: only the up step shrinks, Δ⁺ = (1 + up_down)·dw_min
    ("constant_up_asym", {"model": "constant_step", "up_down": -0.25, **NO_D2D}, 0.1, True, 0.00075, 0.3 * 0.00075),
    ("constant_at_upper_bound", {"model": "constant_step", "dw_min_std": 0.0, **NO_D2D}, 0.6, True, 0.0, 0.0),
]
# LinearStep, mean bound reference: slope_up = −γ⁺Δ⁺/w_max, slope_down = −γ⁻Δ⁻/w_min
_ls = {"model": "linear_step", "gamma_up": 0.5, "gamma_down": 0.8, "gamma_up_dtod": 0.0, "gamma_down_dtod": 0.0,
       "dw_min": 0.01, **NO_D2D}
_m_up = 0.01 * (1 - 0.5 * 0.3 / 0.6)
_m_down = 0.01 * (1 - 0.8 * 0.3 / -0.6)
CASES += [
    ("linear_up_mult", _ls, 0.3, True, _m_up, 0.3 * _m_up),
    ("linear_down_mult", _ls, 0.3, False, -_m_down, 0.3 * _m_down),
    # additive noise: only the constant part is noisy
    ("linear_up_add", {**_ls, "mult_noise": False}, 0.3, True, _m_up, 0.3 * 0.01),
]
# SoftBounds: up Δ(1 − w/b_max), down Δ(1 − w/b_min)
_sb = {"model": "soft_bounds", "dw_min": 0.01, "dw_min_std": 0.2, "w_max": 1.0, "w_min": -0.5, **NO_D2D}
CASES += [
    ("softbounds_up", _sb, 0.5, True, sb(0.5, 0.01, 1.0), 0.2 * sb(0.5, 0.01, 1.0)),
    ("softbounds_down", _sb, 0.5, False, -sb(0.5, 0.01, -0.5), 0.2 * sb(0.5, 0.01, -0.5)),
    ("softbounds_down_near_lower", _sb, -0.4, False, -sb(-0.4, 0.01, -0.5), 0.2 * sb(-0.4, 0.01, -0.5)),
]
# SoftBoundsReference, additive: Δ(1 − (w + r)/b + σξ), r = reference_mean here (reference_std = 0)
_sbr = {"model": "soft_bounds_reference", "dw_min": 0.01, "dw_min_std": 0.5, "w_max": 1.0, "w_min": -1.0,
        "reference_mean": 0.2, **NO_D2D}
CASES += [
    ("sbref_up_add", _sbr, 0.3, True, sb(0.5, 0.01, 1.0), 0.5 * 0.01),
    ("sbref_down_mult", {**_sbr, "mult_noise": True}, 0.3, False, -sb(0.5, 0.01, -1.0), 0.5 * sb(0.5, 0.01, -1.0)),
]
# ExpStep: z = 2w/(b_max − b_min)·a + b; up y = max(1 − A_up e^{γ_up z}, 0), down y = max(1 − A_down e^{−γ_down z}, 0)
_es = {"model": "exp_step", **NO_D2D}
def _exp_y(w, up, A_up=0.00081, A_down=0.36833, g_up=12.44625, g_down=12.78785, a=0.244, b=0.2425, span=1.2):
    z = 2 * w / span * a + b
    return max(1 - A_up * math.exp(g_up * z), 0) if up else max(1 - A_down * math.exp(-g_down * z), 0)
CASES += [
    ("exp_up", _es, 0.4, True, 0.001 * _exp_y(0.4, True), 0.3 * 0.001 * _exp_y(0.4, True)),
    ("exp_down", _es, -0.4, False, -0.001 * _exp_y(-0.4, False), 0.3 * 0.001 * _exp_y(-0.4, False)),
]
# ExpStep complex noise: std = σ(|dw| + std_add + std_slope·|w|)
_pcm_like = {"model": "exp_step", "dw_min": 0.01, "dw_min_std": 0.6, "dw_min_std_add": 0.042,
             "dw_min_std_slope": 0.108, "w_min": 0.0, "w_max": 2.0, "a": -1.0, "b": 0.0, "gamma_up": 2.5,
             "gamma_down": 2.5, "A_up": -27.235, "A_down": -2.235, **NO_D2D}
_y = _exp_y(1.0, True, A_up=-27.235, A_down=-2.235, g_up=2.5, g_down=2.5, a=-1.0, b=0.0, span=2.0)
CASES += [
    ("exp_complex_noise", _pcm_like, 1.0, True, 0.01 * _y, 0.6 * (0.01 * _y + 0.042 + 0.108 * 1.0)),
]
# PowStep: up Δ((b_max − w)/R)^γ, down Δ((w − b_min)/R)^γ
_ps = {"model": "pow_step", "pow_gamma": 2.0, "pow_gamma_dtod": 0.0, "dw_min": 0.01, **NO_D2D}
CASES += [
    ("pow_up", _ps, 0.0, True, 0.01 * 0.5 ** 2, 0.3 * 0.01 * 0.25),
    ("pow_down", _ps, 0.3, False, -0.01 * (0.9 / 1.2) ** 2, 0.3 * 0.01 * (0.9 / 1.2) ** 2),
    ("pow_asym", {**_ps, "pow_up_down": 0.5}, 0.0, False, -0.01 * 0.5 ** 1.0, 0.3 * 0.01 * 0.5),
]
# PiecewiseStep: linear interpolation of nodes over [b_min, b_max]
_pw = {"model": "piecewise_step", "piecewise_up": [1.0, 0.5, 0.2], "piecewise_down": [0.2, 0.6, 1.0],
       "dw_min": 0.01, **NO_D2D}
# w = 0.3: q = (0.9/1.2)·2 = 1.5 → up 0.5·0.5 + 0.5·0.2 = 0.35, down 0.5·0.6 + 0.5·1.0 = 0.8
CASES += [
    ("piecewise_up", _pw, 0.3, True, 0.01 * 0.35, 0.3 * 0.01 * 0.35),
    ("piecewise_down", _pw, 0.3, False, -0.01 * 0.8, 0.3 * 0.01 * 0.8),
]


@pytest.mark.parametrize("data, w0, up, mean, std", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_one_pulse_mean_and_variance(data, w0, up, mean, std):
    check(one_pulse(device_from_dict(data), w0, up), mean, std)


def test_linear_step_slopes_sampled_per_device():
    cfg = device_from_dict({"model": "linear_step", "gamma_up": 0.5, "gamma_up_dtod": 0.05,
                            "gamma_down": 0.3, "gamma_down_dtod": 0.05})
    arr = DeviceArray(cfg, (N,), torch.Generator().manual_seed(3), dtype=torch.float64)
    h = arr.hidden
    g_up = -h["slope_up"] * cfg.w_max / h["dwmin_up"]      # mean_bound_reference: nominal w_max
    g_down = -h["slope_down"] * cfg.w_min / h["dwmin_down"]
    assert g_up.mean().item() == pytest.approx(0.5, abs=0.002)
    assert g_up.std().item() == pytest.approx(0.05, rel=0.03)
    assert g_down.mean().item() == pytest.approx(0.3, abs=0.002)
    ref_dev = device_from_dict({"model": "linear_step", "gamma_up": 0.5, "gamma_up_dtod": 0.0,
                                "mean_bound_reference": False})
    arr = DeviceArray(ref_dev, (1000,), torch.Generator().manual_seed(4), dtype=torch.float64)
    h = arr.hidden
    assert torch.allclose(-h["slope_up"] * h["max_bound"] / h["dwmin_up"], torch.full((1000,), 0.5, dtype=torch.float64))


def test_soft_bounds_reference_symmetry_point_is_subtracted():
    cfg = device_from_dict({"model": "soft_bounds_reference", "up_down": 0.3, "up_down_dtod": 0.0,
                            "dw_min_dtod": 0.0, "subtract_symmetry_point": True, "dw_min_std": 0.0})
    arr = DeviceArray(cfg, (2000,), torch.Generator().manual_seed(5), dtype=torch.float64)
    h = arr.hidden
    sp = (h["dwmin_up"] - h["dwmin_down"]) / (h["dwmin_up"] / h["max_bound"] - h["dwmin_down"] / h["min_bound"])
    assert torch.allclose(h["reference"], sp)
    # at w = 0 (the shifted symmetry point) the noise-free up and down steps are equal
    up, down = arr.mean_step(torch.zeros(2000, dtype=torch.float64))
    assert torch.allclose(up, down, rtol=1e-9)
    assert (up - down).abs().max().item() < 1e-12


def test_multi_pulse_call_equals_pulse_by_pulse():
    cfg = device_from_dict({"model": "soft_bounds", "dw_min": 0.05, "dw_min_std": 0.0})
    g = torch.Generator().manual_seed(6)
    a = DeviceArray(cfg, (500,), g, dtype=torch.float64)
    b = DeviceArray.from_state_dict(a.state_dict(), dtype=torch.float64)
    a.set_weights(torch.zeros(500, dtype=torch.float64))
    b.set_weights(torch.zeros(500, dtype=torch.float64))
    a.apply_pulses(torch.full((500,), 30), torch.zeros(500, dtype=torch.long), g)
    for _ in range(30):
        b.pulse_once(True, g)
    assert torch.allclose(a.weights, b.weights, rtol=0, atol=1e-12)
    # 30 steps of 0.05 would overshoot every bound; soft bounds approach it geometrically instead
    h = b.hidden
    regular = h["dwmin_up"] < h["max_bound"]  # a step larger than the range overshoots and clips
    expect = h["max_bound"] * (1 - (1 - h["dwmin_up"] / h["max_bound"]) ** 30)
    assert regular.sum() > 450
    assert torch.allclose(a.weights[regular], expect[regular], atol=1e-12)


@pytest.mark.parametrize("data, w0, n_up, n_down", [
    ({"model": "soft_bounds"}, 0.2, 40, 10),
    ({"model": "linear_step", "gamma_up": 0.5, "gamma_down": 0.5}, 0.0, 30, 3),
    ({"model": "exp_step"}, 0.3, 15, 2),
    ({"model": "pow_step", "pow_gamma": 2.0}, -0.3, 8, 25),
    ({"model": "soft_bounds_reference", "mult_noise": False, "dw_min_std": 2.0, "write_noise_std": 5.0}, 0.1, 20, 20),
    # without device-to-device spread the spread of Δw is the cycle-to-cycle noise alone
    ({"model": "constant_step", "up_down": 0.2, **NO_D2D}, 0.0, 30, 12),
    ({"model": "soft_bounds", "dw_min": 0.002, **NO_D2D}, 0.0, 40, 10),
    ({"model": "pow_step", "pow_gamma": 2.0, "pow_gamma_dtod": 0.0, **NO_D2D}, -0.3, 8, 25),
    ({"model": "exp_step", "dw_min_std_add": 0.0005, "dw_min_std_slope": 0.002, **NO_D2D}, 0.1, 30, 30),
], ids=["soft_bounds", "linear_step", "exp_step", "pow_step", "sbref_additive", "constant_c2c", "soft_bounds_c2c",
        "pow_step_c2c", "exp_step_add_slope_c2c"])
def test_integrated_n_pulse_response_matches_interleaved_pulses(data, w0, n_up, n_down):
    """`apply_pulses_integrated` (what the crossbar's fast mode uses for large counts) against the
    same pulses applied one by one in a random interleaving per device, which it follows."""
    cfg = device_from_dict(data)
    g = torch.Generator().manual_seed(7)
    exact = DeviceArray(cfg, (N,), g, dtype=torch.float64)
    approx = DeviceArray.from_state_dict(exact.state_dict(), dtype=torch.float64)
    start = torch.full((N,), w0, dtype=torch.float64)
    exact.set_weights(start, g)
    approx.set_weights(start, g)
    w_start = exact.persistent_weights.clone()
    order = torch.rand(N, n_up + n_down, generator=g).argsort(dim=1) < n_up  # True: up
    for t in range(n_up + n_down):
        exact.pulse_once(order[:, t], g)
    approx.apply_pulses_integrated(torch.full((N,), n_up), torch.full((N,), n_down), g)
    d_exact = exact.persistent_weights - w_start
    d_approx = approx.persistent_weights - w_start
    scale = d_exact.abs().mean().item()
    assert abs(d_exact.mean().item() - d_approx.mean().item()) < 0.03 * scale + 5 * d_exact.std().item() / math.sqrt(N)
    assert d_approx.std().item() == pytest.approx(d_exact.std().item(), rel=0.1)


@pytest.mark.parametrize("model", ["soft_bounds", "exp_step", "soft_bounds_reference", "piecewise_step", "pow_step"])
def test_mixed_counts_follow_the_documented_order(model):
    """Noise-free: apply_pulses (which gathers the still-active devices as counts run out) equals
    a plain masked loop over pulse index with min(u, d) alternating pairs, then the surplus."""
    data = {"model": model, "dw_min_std": 0.0, "dw_min": 0.02}
    if model == "piecewise_step":
        data.update(piecewise_up=[1.0, 0.5, 0.2], piecewise_down=[0.3, 0.6, 1.0])
    if model == "soft_bounds_reference":
        data.update(reference_std=0.1)
    g = torch.Generator().manual_seed(0)
    arr = DeviceArray(device_from_dict(data), (37, 41), g, dtype=torch.float64)
    arr.set_weights(torch.rand(37, 41, generator=g, dtype=torch.float64) - 0.5)
    w = arr.persistent_weights.clone()
    n_up = torch.randint(0, 30, (37, 41), generator=g) ** 2 // 30   # heavy tail: most counts small
    n_down = torch.randint(0, 30, (37, 41), generator=g) ** 2 // 30
    arr.apply_pulses(n_up, n_down, g)
    pairs2, surplus_up, total = 2 * torch.minimum(n_up, n_down), n_up > n_down, n_up + n_down
    for t in range(int(total.max())):
        up = torch.where(t < pairs2, torch.tensor(t % 2 == 0), surplus_up)
        w = torch.where(total > t, arr._clip(w + arr._step(w, up, None)), w)
    assert (arr.persistent_weights - w).abs().max().item() == 0.0
    assert (w != arr.persistent_weights.new_zeros(())).any()
