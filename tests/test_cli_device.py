"""`ept-hw device response|fit` write what they promise."""

from __future__ import annotations

import json
import tomllib

import numpy as np
import pytest

from devices import device_from_dict, load_device
from devices.fit import Trace, generate_traces, write_traces
from experiments.cli import main


def test_device_response_writes_json_and_png(tmp_path, capsys):
    out = tmp_path / "resp"
    rc = main(["device", "response", "--device", "gokmen_vlasov", "--n-devices", "300", "--n-steps", "200",
               "--n-loops", "1", "--seed", "3", "--out", str(out)])
    assert rc == 0
    data = json.loads((out / "response.json").read_text())
    n = 2 * 200
    for key in ("direction", "mean", "std", "p05", "p95"):
        assert len(data[key]) == n, key
    assert data["direction"][:200] == [1] * 200 and data["direction"][200:] == [-1] * 200
    assert data["name"] == "gokmen_vlasov" and data["n_devices"] == 300
    assert data["device_params"]["dw_min"] == 0.0016
    mean, p05, p95 = map(np.array, (data["mean"], data["p05"], data["p95"]))
    assert np.all(p05 <= mean + 1e-6) and np.all(mean <= p95 + 1e-6)
    # 200 pulses of ~dw_min from w_min: the mean rises by about 200·0.0016 = 0.32 (less where saturated)
    assert 0.2 < mean[199] - data["w_start_mean"] < 0.34
    d = data["derived"]
    assert d["n_states"] == pytest.approx(2.0 / 0.0016)
    assert abs(d["up_down_asymmetry"]) < 0.02                 # up_down = 0, dtod 0.01
    assert d["c2c_in_granularity"] == pytest.approx(0.3, rel=0.15)   # dw_min_std = 0.3
    assert (out / "response.png").stat().st_size > 10_000
    assert "symmetry point" in capsys.readouterr().out


def test_device_response_from_toml_and_w_init(tmp_path):
    dev = tmp_path / "mine.toml"
    dev.write_text('[device]\nmodel = "soft_bounds"\ndw_min = 0.01\nup_down = 0.3\n')
    out = tmp_path / "r2"
    assert main(["device", "response", "--device", str(dev), "--n-devices", "200", "--n-loops", "1",
                 "--w-init", "0.0", "--out", str(out)]) == 0
    data = json.loads((out / "response.json").read_text())
    assert data["n_steps"] == 120 and data["w_start_mean"] == pytest.approx(0.0, abs=1e-6)
    # up_down = 0.3 shrinks the down step: the symmetry point sits above 0
    assert data["derived"]["up_down_asymmetry"] > 0.1 and data["derived"]["symmetry_point_mean"] > 0.05


def test_device_response_bad_device_is_a_clean_error(tmp_path, capsys):
    assert main(["device", "response", "--device", "no_such_device", "--out", str(tmp_path)]) == 2
    assert "no_such_device" in capsys.readouterr().err
    bad = tmp_path / "bad.toml"
    bad.write_text('[device]\nmodel = "soft_bounds"\ndw_min = -0.01\n')
    assert main(["device", "response", "--device", str(bad), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "dw_min" in err and "-0.01" in err


def test_device_fit_writes_a_loadable_toml(tmp_path, capsys):
    true = device_from_dict({"model": "soft_bounds", "dw_min": 0.01, "up_down": 0.1, "dw_min_std": 0.2,
                             "dw_min_dtod": 0.0, "up_down_dtod": 0.0, "w_max_dtod": 0.0, "w_min_dtod": 0.0})
    csv_path = tmp_path / "trace.csv"
    write_traces(csv_path, generate_traces(true, n_traces=3, n_steps=120, seed=5))
    out = tmp_path / "fitted.toml"
    assert main(["device", "fit", str(csv_path), "--model", "soft_bounds", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "dw_up" in text and "fit error" in text and "NeuroSim-style nonlinearity: LTP +" in text
    fitted = load_device(out)
    assert fitted.model == "soft_bounds"
    assert fitted.dw_min == pytest.approx(0.01, rel=0.06) and fitted.up_down == pytest.approx(0.1, abs=0.04)


def test_device_fit_conductances_and_bad_csv(tmp_path, capsys):
    g = tmp_path / "g.csv"
    rows = ["trace,pulse,direction,value"]
    cond = 1e-6 * np.concatenate([[10.0], 10 + 20 * (1 - np.exp(-np.arange(1, 41) / 15)),
                                  30 - 20 * (1 - np.exp(-np.arange(1, 41) / 15))])
    dirs = [0] + [1] * 40 + [-1] * 40
    rows += [f"A,{k},{d},{float(c)!r}" for k, (d, c) in enumerate(zip(dirs, cond))]
    g.write_text("\n".join(rows) + "\n")
    out = tmp_path / "g.toml"
    assert main(["device", "fit", str(g), "--model", "soft_bounds", "--g-min", "10e-6", "--g-max", "30e-6",
                 "--out", str(out)]) == 0
    cfg = load_device(out)
    assert -1.3 < cfg.w_min < -0.9 and 0.9 < cfg.w_max < 1.6   # mapped onto about [-1, 1]
    bad = tmp_path / "bad.csv"
    bad.write_text("trace;pulse;direction;value\n")
    assert main(["device", "fit", str(bad), "--model", "soft_bounds", "--out", str(out)]) == 2
    assert "header" in capsys.readouterr().err


# ------------------------------------------------------------------ issue 12 item 6: fits it cannot make


def _snapshot(folder):
    return {p: p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


def _fit_refused(tmp_path, capsys, csv_path, *extra):
    before = _snapshot(tmp_path)
    out = tmp_path / "refused.toml"
    rc = main(["device", "fit", str(csv_path), "--model", "soft_bounds", "--out", str(out), *extra])
    err = capsys.readouterr().err
    assert rc == 2 and not out.exists() and _snapshot(tmp_path) == before  # nothing written
    return err


def test_device_fit_refuses_a_flat_trace_and_pure_noise(tmp_path, capsys):
    flat = tmp_path / "flat.csv"
    dirs = [0] + [1] * 50 + [-1] * 50
    flat.write_text("trace,pulse,direction,value\n" + "".join(f"A,{k},{d},0.25\n" for k, d in enumerate(dirs)))
    assert "no pulse response" in _fit_refused(tmp_path, capsys, flat)
    noise = tmp_path / "noise.csv"
    rng = np.random.default_rng(0)
    rows = ["trace,pulse,direction,value"] + [f"A,{k},{d},{rng.normal(0, 0.5)!r}" for k, d in enumerate(dirs * 4)]
    noise.write_text("\n".join(rows) + "\n")
    assert "no pulse response" in _fit_refused(tmp_path, capsys, noise)


def test_device_fit_refuses_a_fit_error_above_its_bound(tmp_path, capsys):
    # a real response (significant over 6000 pulses) buried in read noise 0.4 on a range of 1.3
    true = device_from_dict({"model": "soft_bounds", "dw_min": 0.05, "up_down": 0.0, "w_max": 0.8, "w_min": -0.5,
                             "dw_min_std": 0.1, "dw_min_dtod": 0.0, "up_down_dtod": 0.0, "w_max_dtod": 0.0,
                             "w_min_dtod": 0.0})
    traces = generate_traces(true, n_traces=100, n_steps=30, seed=1)
    rng = np.random.default_rng(0)
    for t in traces:
        t.values = t.values + rng.normal(0, 0.4, len(t.values))
    csv_path = tmp_path / "buried.csv"
    write_traces(csv_path, traces)
    err = _fit_refused(tmp_path, capsys, csv_path)
    assert "trajectory error" in err and "above the bound 0.25" in err


def test_device_fit_refuses_conductances_without_range_and_outside_it(tmp_path, capsys):
    g = tmp_path / "siemens.csv"
    dirs = [0] + [1] * 40 + [-1] * 40
    cond = 1e-6 * np.concatenate([[10.0], 10 + 20 * (1 - np.exp(-np.arange(1, 41) / 15)),
                                  30 - 20 * (1 - np.exp(-np.arange(1, 41) / 15))])
    g.write_text("trace,pulse,direction,value\n" + "".join(f"A,{k},{d},{float(c)!r}\n" for k, (d, c) in enumerate(zip(dirs, cond))))
    err = _fit_refused(tmp_path, capsys, g)
    assert "look like conductances" in err and "--g-min" in err and "siemens.csv" in err
    err = _fit_refused(tmp_path, capsys, g, "--g-min", "10e-6", "--g-max", "20e-6")  # the trace reaches 28.6 µS
    assert "outside --g-min/--g-max" in err and "trace 'A'" in err


def test_device_fit_reads_a_csv_with_a_bom(tmp_path, capsys):
    true = device_from_dict({"model": "soft_bounds", "dw_min": 0.01, "up_down": 0.1, "dw_min_std": 0.2,
                             "dw_min_dtod": 0.0, "up_down_dtod": 0.0, "w_max_dtod": 0.0, "w_min_dtod": 0.0})
    plain = tmp_path / "plain.csv"
    write_traces(plain, generate_traces(true, n_traces=3, n_steps=120, seed=5))
    bom = tmp_path / "bom.csv"
    bom.write_bytes(b"\xef\xbb\xbf" + plain.read_bytes())
    assert main(["device", "fit", str(bom), "--model", "soft_bounds", "--out", str(tmp_path / "b.toml")]) == 0
    assert load_device(tmp_path / "b.toml").dw_min == pytest.approx(0.01, rel=0.06)


def test_device_fit_separates_read_noise_when_reads_repeat(tmp_path, capsys):
    true = device_from_dict({"model": "soft_bounds", "dw_min": 0.01, "up_down": 0.1, "w_max": 1.0, "w_min": -1.0,
                             "dw_min_std": 0.3, "dw_min_dtod": 0.0, "up_down_dtod": 0.0, "w_max_dtod": 0.0,
                             "w_min_dtod": 0.0})
    rng = np.random.default_rng(1)
    sigma_read = 0.004  # per read; it adds 2·σ² to each step's variance: 0.57 of the step, twice the c2c part
    repeated, single = [], []
    for t in generate_traces(true, n_traces=4, n_steps=200, seed=1):
        d = np.repeat(t.direction, 2)
        d[1::2] = 0  # each state read twice
        repeated.append(Trace(t.name, d, np.repeat(t.values, 2) + rng.normal(0, sigma_read, 2 * len(t.values))))
        single.append(Trace(t.name, t.direction, t.values + rng.normal(0, sigma_read, len(t.values))))
    a, b = tmp_path / "repeated.csv", tmp_path / "single.csv"
    write_traces(a, repeated)
    write_traces(b, single)
    assert main(["device", "fit", str(a), "--model", "soft_bounds", "--out", str(tmp_path / "a.toml")]) == 0
    text = capsys.readouterr().out
    assert "read noise" in text and "repeated reads" in text
    doc = tomllib.loads((tmp_path / "a.toml").read_text())
    assert doc["fit"]["read_noise_std"] == pytest.approx(sigma_read, rel=0.15)
    assert doc["device"]["dw_min_std"] == pytest.approx(0.3, rel=0.25)  # c2c alone
    assert main(["device", "fit", str(b), "--model", "soft_bounds", "--out", str(tmp_path / "b.toml")]) == 0
    text = capsys.readouterr().out
    assert "no repeated reads" in text
    folded = tomllib.loads((tmp_path / "b.toml").read_text())["device"]["dw_min_std"]
    assert folded > 0.5  # read noise folded into c2c, and the output says so


@pytest.mark.parametrize("line, key", [("dw_min = 0.0", "dw_min"), ("dw_min = inf", "dw_min"),
                                       ("up_down = 1.0", "up_down"), ("dw_min_std = nan", "dw_min_std")])
def test_device_response_refuses_a_device_without_a_step(tmp_path, capsys, line, key):
    """dw_min = 0 used to pass validation and end in ZeroDivisionError; inf ran."""
    dev = tmp_path / "dev.toml"
    dev.write_text(f'[device]\nmodel = "soft_bounds"\n{line}\n')
    out = tmp_path / "resp"
    assert main(["device", "response", "--device", str(dev), "--n-devices", "10", "--n-steps", "5",
                 "--n-loops", "1", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert key in err and "allowed" in err
    assert not (out / "response.json").exists()
