"""Fitting: traces generated from a known config give back its identifiable parameters."""

from __future__ import annotations

import math

import numpy as np
import pytest

from devices import device_from_dict
from devices.fit import fit_device, fit_nonlinearity, generate_traces, neurosim_label, read_traces, write_traces
from devices.response import run_pulse_response


NO_D2D = {"dw_min_dtod": 0.0, "up_down_dtod": 0.0, "w_max_dtod": 0.0, "w_min_dtod": 0.0}


def rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


def mean_response_gap(true_cfg, fitted_cfg, n_steps: int) -> float:
    """Max |mean(fitted) − mean(true)| over the protocol, relative to the true range."""
    a = run_pulse_response(true_cfg, n_devices=400, n_steps=n_steps, c2c_samples=0, quantiles=False, seed=3)
    b = run_pulse_response(fitted_cfg, n_devices=400, n_steps=n_steps, c2c_samples=0, quantiles=False, seed=4)
    return float(np.abs(a.mean - b.mean).max()) / (true_cfg.w_max - true_cfg.w_min)


def test_fit_soft_bounds_recovers_parameters():
    true = device_from_dict({"model": "soft_bounds", "dw_min": 0.01, "up_down": 0.2, "w_max": 0.8, "w_min": -0.5,
                             "dw_min_std": 0.3, **NO_D2D})
    res = fit_device(generate_traces(true, n_traces=4, n_steps=150, seed=1), "soft_bounds")
    fit = res.config
    assert rel(fit.dw_min, 0.01) < 0.05 and abs(fit.up_down - 0.2) < 0.03
    assert rel(fit.w_max, 0.8) < 0.05 and rel(fit.w_min, -0.5) < 0.05
    assert rel(res.dw_min_std, 0.3) < 0.1
    assert res.step_rms == pytest.approx(0.3, abs=0.1)   # the residual is the c2c noise, nothing more
    assert mean_response_gap(true, fit, 150) < 0.03


def test_fit_linear_step_recovers_slopes_and_bounds():
    true = device_from_dict({"model": "linear_step", "dw_min": 0.01, "up_down": -0.1, "gamma_up": 0.4,
                             "gamma_down": 0.7, "gamma_up_dtod": 0.0, "gamma_down_dtod": 0.0, "dw_min_std": 0.3,
                             **NO_D2D})
    res = fit_device(generate_traces(true, n_traces=4, n_steps=300, seed=1), "linear_step")
    fit = res.config
    assert res.extra["bounds_seen"] == {"w_max": True, "w_min": True}
    assert fit.w_max == pytest.approx(0.6) and fit.w_min == pytest.approx(-0.6)
    assert rel(fit.gamma_up, 0.4) < 0.1 and rel(fit.gamma_down, 0.7) < 0.1
    assert rel(fit.dw_min, 0.01) < 0.05 and abs(fit.up_down - (-0.1)) < 0.03
    assert mean_response_gap(true, fit, 300) < 0.03


def test_fit_exp_step_recovers_identifiable_combinations():
    # b ≠ 0 and a ≠ 1: only A·e^{±γb} and γ·a/(w_max − w_min) are identifiable
    true = device_from_dict({"model": "exp_step", "dw_min": 0.01, "up_down": 0.1, "dw_min_std": 0.1, "a": 0.5,
                             "b": 0.2, "gamma_up": 6.0, "A_up": 0.2 * math.exp(-1.2), "gamma_down": 5.0,
                             "A_down": 0.1 * math.exp(1.0), **NO_D2D})
    res = fit_device(generate_traces(true, n_traces=6, n_steps=200, seed=1), "exp_step")
    fit = res.config
    span_t, span_f = true.w_max - true.w_min, fit.w_max - fit.w_min
    assert rel(fit.A_up * math.exp(fit.gamma_up * fit.b), 0.2) < 0.1
    assert rel(fit.A_down * math.exp(-fit.gamma_down * fit.b), 0.1) < 0.2
    assert rel(fit.gamma_up * fit.a / span_f, true.gamma_up * true.a / span_t) < 0.05
    assert rel(fit.gamma_down * fit.a / span_f, true.gamma_down * true.a / span_t) < 0.1
    assert rel(fit.dw_min, 0.01) < 0.05 and abs(fit.up_down - 0.1) < 0.03
    assert mean_response_gap(true, fit, 200) < 0.03


def test_fit_pow_step_recovers_exponents():
    true = device_from_dict({"model": "pow_step", "dw_min": 0.01, "pow_gamma": 1.5, "pow_up_down": 0.2,
                             "pow_gamma_dtod": 0.0, "dw_min_std": 0.2, **NO_D2D})
    res = fit_device(generate_traces(true, n_traces=4, n_steps=400, seed=2), "pow_step")
    fit = res.config
    assert rel(fit.pow_gamma, 1.5) < 0.1 and abs(fit.pow_up_down - 0.2) < 0.05
    assert rel(fit.dw_min, 0.01) < 0.08
    assert mean_response_gap(true, fit, 400) < 0.03


def test_neurosim_label_matches_its_table():
    # NeuroSim V3 "Nonlinearity-NormA" table: label -> A / P_max
    for label, a_norm in ((0.01, 126.269), (1.51, 0.8195), (3.01, 0.3853), (4.51, 0.2266), (6.01, 0.1351)):
        assert neurosim_label(1 / a_norm) == pytest.approx(label, rel=0.01, abs=1e-3)
    assert neurosim_label(0.0) == 0.0


def test_nonlinearity_labels_of_linear_and_saturating_devices():
    linear = device_from_dict({"model": "constant_step", "dw_min": 0.01, "dw_min_std": 0.0, **NO_D2D})
    ltp, ltd = fit_nonlinearity(generate_traces(linear, n_traces=1, n_steps=100))
    assert abs(ltp) < 0.05 and abs(ltd) < 0.05
    soft = device_from_dict({"model": "soft_bounds", "dw_min": 0.03, "dw_min_std": 0.0, **NO_D2D})
    ltp, ltd = fit_nonlinearity(generate_traces(soft, n_traces=1, n_steps=60))
    assert ltp > 1.0 and ltd < -1.0  # both saturate; LTD carries the minus sign


def test_csv_round_trip_and_conductance_mapping(tmp_path):
    cfg = device_from_dict({"model": "soft_bounds", "dw_min": 0.02, **NO_D2D})
    traces = generate_traces(cfg, n_traces=2, n_steps=20, seed=0)
    path = tmp_path / "t.csv"
    write_traces(path, traces)
    back = read_traces(path)
    assert len(back) == 2 and np.allclose(back[0].values, traces[0].values)
    assert np.array_equal(back[1].direction, traces[1].direction)
    lines = path.read_text().splitlines()
    g = tmp_path / "g.csv"
    # conductances 10..30 µS: w = 2 (G − 10)/20 − 1
    g.write_text("trace,pulse,direction,value\nA,0,0,10e-6\nA,1,up,20e-6\nA,2,down,30e-6\n")
    gt = read_traces(g, g_min=10e-6, g_max=30e-6)
    assert np.allclose(gt[0].values, [-1.0, 0.0, 1.0])
    assert len(lines) == 1 + 2 * (1 + 20 * 2 * 2)  # header; 2 traces of start + 2 loops of 20 up, 20 down


@pytest.mark.parametrize("content, message", [
    ("", "empty file"),
    ("trace,pulse,value\nA,0,1\n", "header"),
    ("trace,pulse,direction,value\nA,0,0,0.1\nA,1,sideways,0.2\nA,2,up,0.3\n", "direction 'sideways'"),
    ("trace,pulse,direction,value\nA,0,0,0.1\nA,1,up,abc\nA,2,up,0.3\n", "value 'abc'"),
    ("trace,pulse,direction,value\nA,0,0,0.1\nA,2,up,0.2\nA,3,up,0.3\n", "not consecutive"),
    ("trace,pulse,direction,value\nA,0,0,0.1\nA,1,up\n", "columns"),
    ("trace,pulse,direction,value\nA,0,0,0.1\nA,1,up,0.2\n", "at least 3"),
    ("trace,pulse,direction,value\nA,x,0,0.1\n", "pulse 'x'"),
])
def test_bad_csv_files_give_clear_errors(tmp_path, content, message):
    path = tmp_path / "bad.csv"
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        read_traces(path)


def test_fit_needs_both_directions(tmp_path):
    path = tmp_path / "up.csv"
    path.write_text("trace,pulse,direction,value\n" + "".join(f"A,{k},up,{0.01 * k}\n" for k in range(10)))
    with pytest.raises(ValueError, match="both up and down"):
        fit_device(read_traces(path), "soft_bounds")
    with pytest.raises(FileNotFoundError):
        read_traces(tmp_path / "missing.csv")
    with pytest.raises(ValueError, match="g-min"):
        read_traces(path, g_min=1.0)
