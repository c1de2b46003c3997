"""Sweep engine (resume, failures, workers), axes, requirement derivation."""

from __future__ import annotations

import json
import math
import os
import uuid
from pathlib import Path

import pytest

from ept_hw.config import ConfigError
from experiments.sweep import (
    AXES, axis_slice, derive_requirements, load_records, parse_axis, plot_gaps, point_id, run_sweep,
    sweep_points, sweep_rows, write_tables,
)


# A cheap point function with a known answer: the gap halves with every ADC bit and grows with
# read noise; `up_down = 0.9` raises; `up_down = 0.99` interrupts (KeyboardInterrupt, as Ctrl-C).
def synthetic_point(overrides, context):
    calls = Path(context["calls_dir"])
    (calls / f"{point_id(overrides)}-{uuid.uuid4().hex}").write_text(str(os.getpid()))
    if overrides.get("up_down") == 0.9:
        raise RuntimeError("device model refused up_down = 0.9")
    if overrides.get("up_down") == 0.99:
        raise KeyboardInterrupt
    bits = overrides.get("adc_bits", 9)
    noise = overrides.get("read_noise", 0.06)
    twin = 2.0
    return {"analog_val_loss": twin + 4.0 * 2.0 ** -bits + noise, "twin_val_loss": twin, "pid": os.getpid()}


def _calls(tmp_path):
    d = tmp_path / "calls"
    d.mkdir(exist_ok=True)
    return d


def _n_calls(calls_dir):
    return len(list(Path(calls_dir).iterdir()))


def test_parse_axis_types_and_errors():
    assert parse_axis("adc_bits=2, 8,8") == ("adc_bits", (2, 8))
    assert parse_axis("read_noise=0.01,0.1") == ("read_noise", (0.01, 0.1))
    assert parse_axis("algorithm=plain,tiki_taka_v2,ttv2") == ("algorithm", ("sgd", "ttv2"))
    with pytest.raises(ConfigError, match="adc_bits"):
        parse_axis("adc_bits=two")
    with pytest.raises(ConfigError, match="one of"):
        parse_axis("nonsense=1")
    with pytest.raises(ConfigError, match="mixed_precision"):
        parse_axis("algorithm=adam")
    with pytest.raises(ConfigError):
        parse_axis("dac_bits=1")  # below the minimum of 2 bits


def test_points_one_at_a_time_and_grid_with_stable_ids():
    axes = {"adc_bits": (2, 8), "read_noise": (0.0, 0.1, 0.2)}
    one = sweep_points(axes)
    assert len(one) == 1 + 2 + 3 and one[0] == {}
    grid = sweep_points(axes, grid=True)
    assert len(grid) == 6 and all(set(p) == set(axes) for p in grid)
    assert point_id({"a": 1, "b": 2}) == point_id({"b": 2, "a": 1})
    assert len({point_id(p) for p in grid}) == 6
    assert point_id({"adc_bits": 2}) != point_id({"adc_bits": 3})


def test_resume_does_not_recompute_and_failure_is_recorded(tmp_path):
    calls = _calls(tmp_path)
    ctx = {"calls_dir": str(calls)}
    points = sweep_points({"adc_bits": (2, 4, 8), "up_down": (0.9, 0.99, 0.1)})
    out = tmp_path / "sweep"
    # The interrupt comes at the 6th point: the first five (one of them failed) are on disk.
    with pytest.raises(KeyboardInterrupt):
        run_sweep(synthetic_point, points, out, context=ctx, workers=1)
    assert _n_calls(calls) == 6
    finished = load_records(out)
    assert len(finished) == 5
    failed = [r for r in finished.values() if r["status"] == "failed"]
    assert len(failed) == 1 and "up_down = 0.9" in failed[0]["error"] and failed[0]["gap"] is None
    # Resume without the interrupting point: only the one remaining point runs.
    points = [p for p in points if p.get("up_down") != 0.99]
    records = run_sweep(synthetic_point, points, out, context=ctx, workers=1)
    assert _n_calls(calls) == 7
    assert len(records) == 6
    ok = {r["overrides"].get("adc_bits"): r["gap"] for r in records if r["status"] == "ok" and "up_down" not in r["overrides"]}
    assert ok[2] == pytest.approx(1.0 + 0.06) and ok[8] == pytest.approx(4 / 256 + 0.06)
    # A second resume recomputes nothing; retry_failed reruns exactly the failed point.
    run_sweep(synthetic_point, points, out, context=ctx, workers=1)
    assert _n_calls(calls) == 7
    run_sweep(synthetic_point, points, out, context=ctx, workers=1, retry_failed=True)
    assert _n_calls(calls) == 8


def test_resume_with_a_different_base_is_refused(tmp_path):
    calls = _calls(tmp_path)
    run_sweep(synthetic_point, [{}], tmp_path / "s", context={"calls_dir": str(calls), "device": "reram_sb"})
    with pytest.raises(ValueError, match="device"):
        run_sweep(synthetic_point, [{}], tmp_path / "s", context={"calls_dir": str(calls), "device": "ecram"})
    # run mechanics ("_" keys) may change between resumes; nothing is recomputed
    run_sweep(synthetic_point, [{}], tmp_path / "s", context={"calls_dir": str(calls), "device": "reram_sb", "_threads": 4})
    assert _n_calls(calls) == 1


def test_parallel_workers_run_in_other_processes(tmp_path):
    calls = _calls(tmp_path)
    points = sweep_points({"adc_bits": (2, 3, 4)})
    records = run_sweep(synthetic_point, points, tmp_path / "p", context={"calls_dir": str(calls)}, workers=2)
    assert len(records) == 4 and all(r["status"] == "ok" for r in records)
    pids = {r["pid"] for r in records}
    assert os.getpid() not in pids and 1 <= len(pids) <= 2
    assert _n_calls(calls) == 4
    # Records come back in point order whatever order the workers finished in.
    assert [r["point_id"] for r in records] == [point_id(p) for p in points]


def test_tables_and_plots(tmp_path):
    calls = _calls(tmp_path)
    axes = {"adc_bits": (2, 4, 8), "read_noise": (0.0, 0.3)}
    base = {"adc_bits": 9, "read_noise": 0.06}
    records = run_sweep(synthetic_point, sweep_points(axes), tmp_path / "t", context={"calls_dir": str(calls)})
    rows = sweep_rows(records, list(axes), base)
    csv_path, json_path = write_tables(rows, tmp_path / "t", {"tolerance": 0.1})
    lines = csv_path.read_text().splitlines()
    assert len(lines) == 1 + 6 and "gap" in lines[0].split(",")
    data = json.loads(json_path.read_text())
    assert data["tolerance"] == 0.1 and len(data["rows"]) == 6
    plots = plot_gaps(rows, list(axes), 0.1, tmp_path / "t", base)
    assert sorted(p.name for p in plots) == ["gap_vs_adc_bits.png", "gap_vs_read_noise.png"]
    assert all(p.stat().st_size > 5000 for p in plots)
    # The base point belongs to both one-axis slices, at the base values.
    assert sorted(r["adc_bits"] for r in axis_slice(rows, "adc_bits", list(axes), base)) == [2, 4, 8, 9]


def _row(status="ok", gap=None, **values):
    return {"status": status, "gap": gap, **values}


def test_requirement_is_the_weakest_value_with_all_stronger_passing():
    names = ["adc_bits", "read_noise", "up_down", "algorithm"]
    rows = [
        _row(gap=0.9, adc_bits=2), _row(gap=0.2, adc_bits=4), _row(gap=0.04, adc_bits=6),
        _row(gap=0.01, adc_bits=8), _row(gap=0.011, adc_bits=10),
        # noise: more is weaker; 0.3 passes on its own but 0.2 fails -> requirement 0.1, non-monotone
        _row(gap=0.0, read_noise=0.0), _row(gap=0.03, read_noise=0.1), _row(gap=0.2, read_noise=0.2),
        _row(gap=0.04, read_noise=0.3),
        # asymmetry: larger |up_down| is weaker; a failed (raised) point neither passes nor fails
        _row(gap=0.01, up_down=0.0), _row(gap=0.02, up_down=-0.2), _row(gap=0.3, up_down=0.5),
        _row(status="failed", up_down=0.4),
        # algorithm: plain SGD is the weakest
        _row(gap=0.5, algorithm="sgd"), _row(gap=0.02, algorithm="ttv2"),
        _row(gap=0.01, algorithm="mixed_precision"),
    ]
    reqs = {r.axis: r for r in derive_requirements(rows, names, 0.05)}
    assert reqs["adc_bits"].required == 6 and reqs["adc_bits"].status == "met"
    assert [v for v, _ in reqs["adc_bits"].tested] == [2, 4, 6, 8, 10]
    assert reqs["read_noise"].required == 0.1 and reqs["read_noise"].non_monotone
    assert reqs["up_down"].required == -0.2 and reqs["up_down"].failed_values == (0.4,)
    assert reqs["algorithm"].required == "ttv2"
    # Tighter tolerance: nothing at 2..6 bits passes 0.005; even 8 and 10 fail -> not met.
    tight = {r.axis: r for r in derive_requirements(rows, names, 0.005)}
    assert tight["adc_bits"].required is None and tight["adc_bits"].status == "not_met"
    assert tight["read_noise"].required == 0.0


def test_requirement_diverged_point_fails_and_other_axes_must_be_at_base():
    names = ["adc_bits", "read_noise"]
    base = {"adc_bits": 9, "read_noise": 0.06}
    rows = [
        _row(gap=math.nan, adc_bits=8, read_noise=0.06),  # diverged: fails
        _row(gap=0.0, adc_bits=9, read_noise=0.06),  # the base point
        _row(gap=0.0, adc_bits=4, read_noise=0.0),  # grid point off the slice: ignored
        _row(gap=0.01, adc_bits=12, read_noise=0.06),
    ]
    req = derive_requirements(rows, names, 0.05, base)[0]
    assert req.required == 9
    assert [v for v, _ in req.tested] == [8, 9, 12] and req.tested[0][1] is None
    assert derive_requirements([], names, 0.05)[0].status == "no_data"


def test_every_issue_axis_is_defined():
    assert set(AXES) == {"n_states", "up_down", "c2c", "d2d", "dac_bits", "adc_bits", "read_noise",
                         "reads_averaged", "pulse_length", "algorithm"}
    assert AXES["adc_bits"].strength(8) > AXES["adc_bits"].strength(2)
    assert AXES["c2c"].strength(0.1) > AXES["c2c"].strength(1.0)
    assert AXES["up_down"].strength(-0.1) > AXES["up_down"].strength(0.3)


def test_axis_overrides_land_on_the_tile_fields():
    from crossbar.config import TileConfig

    from experiments.sweep import apply_overrides, base_values, bits_to_res

    base = TileConfig(device="reram_sb")
    bv = base_values(base)
    assert bv["n_states"] == 1000 and bv["dac_bits"] == 7 and bv["adc_bits"] == 9
    assert bv["read_noise"] == pytest.approx(0.06) and bv["pulse_length"] == 31 and bv["algorithm"] == "sgd"
    tile = apply_overrides(base, {"n_states": 250, "adc_bits": 4, "dac_bits": 5, "read_noise": 0.2, "d2d": 0.1,
                                  "up_down": -0.1, "c2c": 0.5, "reads_averaged": 3, "pulse_length": 7,
                                  "algorithm": "ttv2"})
    dev = tile.device_config()
    assert (dev.w_max - dev.w_min) / dev.granularity == pytest.approx(250)
    assert (dev.up_down, dev.dw_min_std, dev.dw_min_dtod, dev.w_max_dtod) == (-0.1, 0.5, 0.1, 0.1)
    assert tile.forward.out_res == tile.backward.out_res == pytest.approx(1 / 14)
    assert tile.forward.inp_res == tile.backward.inp_res == pytest.approx(bits_to_res(5))
    assert tile.forward.out_noise == tile.backward.out_noise == 0.2
    assert (tile.n_reads, tile.update.desired_bl, tile.algorithm) == (3, 7, "ttv2")
    back = base_values(tile)
    assert (back["n_states"], back["adc_bits"], back["dac_bits"]) == (250, 4, 5)
    # ExpStep's granularity is not dw_min: n_states still lands on the requested number
    exp = apply_overrides(TileConfig(device="reram_es"), {"n_states": 100}).device_config()
    assert (exp.w_max - exp.w_min) / exp.granularity == pytest.approx(100)
    # the untouched base is left alone, and an ideal device refuses device axes
    assert base_values(base)["n_states"] == 1000
    with pytest.raises(ConfigError, match="ideal"):
        apply_overrides(TileConfig(device="ideal"), {"n_states": 10})


# ---------------------------------------------------------------------------------------------
# A real sweep: each point a short `compare` of the tiny model (shared by the tests below).

ADC_TOLERANCE = 0.05
SMALL_TEXT = ("To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n"
              "The slings and arrows of outrageous fortune,\nOr to take arms against a sea of troubles\n"
              "And by opposing end them.\n") * 40


def _adc_sweep_args(root: Path) -> list[str]:
    return ["sweep", "--model", "tiny", "--device", str(root / "tile_base.toml"), "--axis", "adc_bits=2,8",
            "--axis", "algorithm=ttv2",  # refused for an ideal device: a failed point, recorded
            "--tolerance", str(ADC_TOLERANCE), "--data", str(root / "small.txt"), "--steps", "10", "--batch-size", "4",
            "--set", "training.eval_interval=10", "--set", "training.eval_batches=1", "--set", "estimator.beta=0.5",
            "--workers", "2", "--out", str(root / "sweep"), "--no-progress"]


@pytest.fixture(scope="module")
def adc_sweep(tmp_path_factory):
    """ADC bits 2 against 8 on an ideal device with noise-free reads (so quantisation is the only
    analog effect), every point from the same seed and data (common random numbers)."""
    import dataclasses

    from crossbar.config import save_tile_config
    from crossbar.presets import tile_preset
    from experiments.cli import main

    root = tmp_path_factory.mktemp("adc_sweep")
    (root / "small.txt").write_text(SMALL_TEXT)
    tile = tile_preset("ideal")
    io = dataclasses.replace(tile.forward, out_noise=0.0, out_bound=4.0)
    tile = tile.replace(forward=io, backward=dataclasses.replace(io, bound_management="none"))
    save_tile_config(root / "tile_base.toml", tile)
    assert main(_adc_sweep_args(root)) == 0
    return root


def test_real_adc_sweep_orders_gaps_and_derives_the_smallest_passing_value(adc_sweep):
    data = json.loads((adc_sweep / "sweep" / "sweep.json").read_text())
    rows = {r["overrides"]: r for r in data["rows"]}
    failed = rows.pop("algorithm=ttv2")
    assert failed["status"] == "failed" and "algorithm" in failed["error"] and "ideal" in failed["error"]
    assert set(rows) == {"base", "adc_bits=2", "adc_bits=8"} and all(r["status"] == "ok" for r in rows.values())
    # same seed and data for every point: the twins are identical runs
    twins = {r["twin_val_loss"] for r in rows.values()}
    assert len(twins) == 1
    gap2, gap8 = rows["adc_bits=2"]["gap"], rows["adc_bits=8"]["gap"]
    assert gap2 > gap8 + 0.1  # 2 bits: 3 output levels, the readout is flat; 8 bits tracks the twin
    assert gap2 > ADC_TOLERANCE >= gap8
    assert data["base_values"]["adc_bits"] == 9
    req = next(r for r in data["requirements"] if r["axis"] == "adc_bits")
    passing = sorted(t["value"] for t in req["tested"] if t["gap"] is not None and t["gap"] <= ADC_TOLERANCE)
    assert req["required"] == passing[0] == 8 and req["status"] == "met"
    assert all(math.isfinite(r["re_mu"]) for r in rows.values())
    assert all(r["pulses_per_device"] is not None and r["pulses_per_device"] >= 0 for r in rows.values())
    assert (adc_sweep / "sweep" / "plots" / "gap_vs_adc_bits.png").stat().st_size > 5000


def test_real_sweep_rerun_recomputes_nothing(adc_sweep, capsys):
    from experiments.cli import main

    points = sorted((adc_sweep / "sweep" / "points").glob("*.json"))
    before = {p.name: p.stat().st_mtime_ns for p in points}
    runs_before = {p.name: p.stat().st_mtime_ns for p in (adc_sweep / "sweep" / "runs").iterdir()}
    assert main(_adc_sweep_args(adc_sweep)) == 0
    assert {p.name: p.stat().st_mtime_ns for p in points} == before
    assert {p.name: p.stat().st_mtime_ns for p in (adc_sweep / "sweep" / "runs").iterdir()} == runs_before
    out = capsys.readouterr().out
    assert "adc_bits:" in out and "1 failed" in out


def test_real_sweep_exports_a_valid_spec(adc_sweep):
    from experiments.spec import export_spec, validate_spec

    result = export_spec(adc_sweep / "sweep", adc_sweep / "spec")
    spec = json.loads(result.spec_path.read_text())
    validate_spec(spec)
    rows = {r["axis"]: r for r in spec["requirements"]["rows"]}
    assert rows["adc_bits"]["required"] == 8
    # the base point (plain SGD) passes; the refused ttv2 point neither passes nor fails
    assert rows["algorithm"]["required"] == "sgd" and rows["algorithm"]["failed_values"] == ["ttv2"]
    source = spec["device"]["source"]
    assert source["kind"] == "preset" and source["path"].endswith("tile_base.toml")  # preset device in a tile file
    assert spec["periphery"]["adc"]["forward.out_bound"]["value"] == 4.0
    assert spec["derived"]["settling_time"]["value"] > 0
    assert sorted(r["role"] for r in spec["provenance"]["runs"]) == ["sweep_base", "sweep_point", "sweep_point"]
    assert {p.name for p in result.plots} == {"loss_curves.png", "gap_vs_adc_bits.png", "gap_vs_algorithm.png"}
