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
    ALGORITHMS, AXES, axis_slice, derive_requirements, load_records, parse_axis, plot_gaps, point_id, run_sweep,
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
    # every algorithm the crossbar has is a value of the axis (issue 13 item 5)
    from crossbar.config import ALGORITHMS as TILE_ALGORITHMS

    assert parse_axis("algorithm=sgd,c-ttv2,agad") == ("algorithm", ("sgd", "c_ttv2", "agad"))
    assert set(ALGORITHMS) == set(TILE_ALGORITHMS)
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


ENTROPY = 3.0  # unigram entropy of the synthetic rows; their twin ends at 2.5 (learned: 0.5 nats below)


def _row(status="ok", gaps=(), twin=2.5, **values):
    """A point row as `sweep_rows` makes it, from per-seed paired gaps."""
    from experiments.sweep import gap_stats

    row = {"status": status, "unigram_entropy": ENTROPY, "twin_val_loss": twin, "steps": 100, **values}
    row.update(gap_stats([g for g in gaps if g is not None and math.isfinite(g)]).to_dict())
    if status == "ok" and gaps and not any(g is not None and math.isfinite(g) for g in gaps):
        row["gap"] = None  # diverged on every seed
    return row


def _tight(mean, n=3, spread=0.002):
    """n paired gaps around `mean` with a small spread (a decisive interval)."""
    return [mean + spread * (i - (n - 1) / 2) for i in range(n)]


def test_gap_statistics_use_student_t():
    from experiments.sweep import gap_stats

    s = gap_stats([0.01, 0.03, 0.05])
    assert s.n == 3 and s.mean == pytest.approx(0.03)
    assert s.se == pytest.approx(0.02 / math.sqrt(3))
    assert s.hi - s.mean == pytest.approx(4.302653 * s.se, rel=1e-5)  # t(0.975, 2)
    assert s.upper - s.mean == pytest.approx(2.919986 * s.se, rel=1e-5)  # t(0.95, 2), one-sided
    assert s.mean - s.lower == pytest.approx(2.919986 * s.se, rel=1e-5)
    one = gap_stats([0.01])
    assert one.n == 1 and one.mean == 0.01 and one.se is None and one.upper is None
    assert gap_stats([math.nan, None]).n == 0


def test_requirement_is_the_weakest_value_with_all_stronger_passing():
    names = ["adc_bits", "read_noise", "up_down", "algorithm"]
    rows = [
        _row(gaps=_tight(0.9), adc_bits=2), _row(gaps=_tight(0.2), adc_bits=4), _row(gaps=_tight(0.03), adc_bits=6),
        _row(gaps=_tight(0.01), adc_bits=8), _row(gaps=_tight(0.011), adc_bits=10),
        # noise: more is weaker; 0.3 passes on its own but 0.2 fails -> requirement 0.1, non-monotone
        _row(gaps=_tight(0.0), read_noise=0.0), _row(gaps=_tight(0.03), read_noise=0.1),
        _row(gaps=_tight(0.2), read_noise=0.2), _row(gaps=_tight(0.03), read_noise=0.3),
        # asymmetry: larger |up_down| is weaker; a failed (raised) point neither passes nor fails
        _row(gaps=_tight(0.01), up_down=0.0), _row(gaps=_tight(0.02), up_down=-0.2), _row(gaps=_tight(0.3), up_down=0.5),
        _row(status="failed", up_down=0.4),
        # algorithm: plain SGD is the weakest
        _row(gaps=_tight(0.5), algorithm="sgd"), _row(gaps=_tight(0.02), algorithm="ttv2"),
        _row(gaps=_tight(0.01), algorithm="mixed_precision"),
    ]
    reqs = {r.axis: r for r in derive_requirements(rows, names, 0.05)}
    adc = reqs["adc_bits"]
    assert adc.required == 6 and adc.status == "met" and adc.seeds == 3 and adc.steps == 100
    assert [t.value for t in adc.tested] == [2, 4, 6, 8, 10]
    assert adc.interval[0] < 0.03 < adc.interval[1]
    assert "Met at 6" in adc.how and "next weaker value 4 fails" in adc.how
    assert reqs["read_noise"].required == 0.1 and reqs["read_noise"].non_monotone
    assert reqs["up_down"].required == -0.2 and reqs["up_down"].failed_values == (0.4,)
    assert reqs["algorithm"].required == "ttv2"
    # Tighter tolerance: 8 and 10 bits are confidently above 0.005 -> not met
    tight = {r.axis: r for r in derive_requirements(rows, names, 0.005)}
    assert tight["adc_bits"].required is None and tight["adc_bits"].status == "not_met"
    assert "lower 95 % bound" in tight["adc_bits"].how
    assert tight["read_noise"].required == 0.0


def test_requirement_needs_the_upper_bound_not_the_mean():
    # mean 0.03 is inside 0.05, but three seeds spread by 0.04: upper bound 0.03 + 2.92 * 0.0231 > 0.05
    wide = [0.03 - 0.04, 0.03, 0.03 + 0.04]
    rows = [_row(gaps=_tight(0.5), adc_bits=4), _row(gaps=wide, adc_bits=8)]
    (req,) = derive_requirements(rows, ["adc_bits"], 0.05)
    assert req.status == "undetermined" and req.required is None
    assert "contains the tolerance" in req.how and req.tested[-1].verdict == "undecided"
    # one seed: no interval, never met
    (one,) = derive_requirements([_row(gaps=[0.001], adc_bits=8)], ["adc_bits"], 0.05)
    assert one.status == "undetermined" and "one seed" in one.how
    # the same spread with more seeds decides it: 12 seeds around 0.03
    many = [0.03 + 0.04 * ((i % 3) - 1) for i in range(12)]
    (req12,) = derive_requirements([_row(gaps=many, adc_bits=8)], ["adc_bits"], 0.05)
    assert req12.status == "met" and req12.required == 8


def test_requirement_is_undetermined_when_the_twin_has_not_learned():
    rows = [_row(gaps=_tight(0.01), twin=2.8, adc_bits=8), _row(gaps=_tight(0.01), twin=2.8, adc_bits=6)]
    (req,) = derive_requirements(rows, ["adc_bits"], 0.05)  # 2.8 > 3.0 - 0.3
    assert req.status == "undetermined" and req.required is None and "unigram entropy" in req.how
    rows = [_row(gaps=_tight(0.01), twin=2.69, adc_bits=8)]  # 0.31 below: learned
    assert derive_requirements(rows, ["adc_bits"], 0.05)[0].status == "met"


def test_degenerate_points_never_pass():
    names = ["adc_bits"]
    # 4 bits: the smallest gap of all, but degenerate (dead arrays); it cannot be the requirement
    rows = [_row(status="degenerate", gaps=_tight(0.001), adc_bits=4), _row(gaps=_tight(0.2), adc_bits=6),
            _row(gaps=_tight(0.01), adc_bits=8)]
    (req,) = derive_requirements(rows, names, 0.05)
    assert req.required == 8 and [t.verdict for t in req.tested] == ["fail", "fail", "pass"]
    # the most demanding value degenerate: not met, whatever its gap
    rows = [_row(gaps=_tight(0.01), adc_bits=4), _row(status="degenerate", gaps=_tight(0.0), adc_bits=8)]
    (req,) = derive_requirements(rows, names, 0.05)
    assert req.status == "not_met" and req.required is None and "degenerate" in req.how


def test_requirement_diverged_point_fails_and_other_axes_must_be_at_base():
    names = ["adc_bits", "read_noise"]
    base = {"adc_bits": 9, "read_noise": 0.06}
    rows = [
        _row(status="diverged", gaps=[None, None, None], adc_bits=8, read_noise=0.06),  # diverged: fails
        _row(gaps=_tight(0.0), adc_bits=9, read_noise=0.06),  # the base point
        _row(gaps=_tight(0.0), adc_bits=4, read_noise=0.0),  # grid point off the slice: ignored
        _row(gaps=_tight(0.01), adc_bits=12, read_noise=0.06),
    ]
    req = derive_requirements(rows, names, 0.05, base)[0]
    assert req.required == 9
    assert [t.value for t in req.tested] == [8, 9, 12] and req.tested[0].gap is None
    assert req.tested[0].verdict == "fail"
    assert derive_requirements([], names, 0.05)[0].status == "no_data"


def test_degenerate_rules_on_records():
    from experiments.sweep import COSINE_FLOOR, degenerate_reasons, point_status

    healthy = {"status": "ok", "gap": 0.01, "output_zero_fraction": 0.1, "output_clipped_fraction": 0.001,
               "update_cos_mean": 0.8, "analog_initial_val_loss": 3.0, "analog_val_loss": 2.6,
               "twin_initial_val_loss": 3.0, "twin_val_loss": 2.5, "analog_diverged": False}
    assert degenerate_reasons(healthy) == []
    cases = {
        "zero": {"output_zero_fraction": 0.995},
        "clipped": {"output_clipped_fraction": 1.0},
        "cosine": {"update_cos_mean": COSINE_FLOOR / 2},
        "not moving": {"analog_val_loss": 2.99},
        "diverged": {"analog_diverged": True},
    }
    for word, change in cases.items():
        reasons = degenerate_reasons({**healthy, **change})
        assert len(reasons) == 1 and word in reasons[0], (word, reasons)
    # the twin that hardly moved does not make the analog "not moving"
    assert degenerate_reasons({**healthy, "analog_val_loss": 2.99, "twin_val_loss": 2.97}) == []
    # one degenerate seed makes the point degenerate; invalid and failed come first
    assert point_status([healthy, {**healthy, "output_zero_fraction": 1.0}])[0] == "degenerate"
    assert point_status([healthy, {**healthy, "analog_diverged": True}])[0] == "diverged"
    assert point_status([healthy, {"status": "failed", "error": "x"}]) == ("failed", ["x"])
    assert point_status([{"status": "invalid", "error": "up_down"}])[0] == "invalid"
    assert point_status([healthy, healthy]) == ("ok", [])


def test_rows_aggregate_seeds_into_paired_statistics():
    recs = []
    for k, (a, t) in enumerate([(2.6, 2.5), (2.65, 2.52), (2.58, 2.5)]):
        recs.append({"point_id": "p", "seed_index": k, "overrides": {"adc_bits": 8}, "status": "ok",
                     "analog_val_loss": a, "twin_val_loss": t, "gap": a - t, "steps": 10, "wall_time": 1.0})
    (row,) = sweep_rows(recs, ["adc_bits"], {"adc_bits": 9})
    assert row["n_seeds"] == 3 and row["gaps"] == pytest.approx([0.1, 0.13, 0.08])
    assert row["gap"] == pytest.approx(0.31 / 3) and row["gap_lo"] < row["gap"] < row["gap_hi"]
    assert row["twin_val_loss"] == pytest.approx(7.52 / 3) and row["wall_time"] == 3.0 and row["status"] == "ok"


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
REAL_SEEDS = 2
SMALL_TEXT = ("To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n"
              "The slings and arrows of outrageous fortune,\nOr to take arms against a sea of troubles\n"
              "And by opposing end them.\n") * 40


def _adc_sweep_args(root: Path) -> list[str]:
    return ["sweep", "--model", "tiny", "--device", str(root / "tile_base.toml"), "--axis", "adc_bits=2,8",
            "--axis", "algorithm=ttv2",  # refused for an ideal device: a failed point, recorded
            "--tolerance", str(ADC_TOLERANCE), "--data", str(root / "small.txt"), "--steps", "10", "--batch-size", "4",
            "--set", "training.eval_interval=10", "--set", "training.eval_batches=1", "--set", "estimator.beta=0.5",
            "--seeds", str(REAL_SEEDS), "--workers", "2", "--out", str(root / "sweep"), "--no-progress"]


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


def test_real_adc_sweep_pairs_seeds_and_marks_what_cannot_pass(adc_sweep):
    data = json.loads((adc_sweep / "sweep" / "sweep.json").read_text())
    rows = {r["overrides"]: r for r in data["rows"]}
    invalid = rows.pop("algorithm=ttv2")
    # refused before running: recorded, never run
    assert invalid["status"] == "invalid" and "algorithm" in invalid["error"] and "ideal" in invalid["error"]
    assert not any(p.name.startswith(invalid["point_id"]) for p in (adc_sweep / "sweep" / "runs").iterdir())
    assert set(rows) == {"base", "adc_bits=2", "adc_bits=8"}
    assert all(r["n_seeds"] == REAL_SEEDS and len(r["gaps"]) == REAL_SEEDS for r in rows.values())
    # each seed's twin is the same run in every point (common random numbers); seeds differ
    records = [r for r in load_records(adc_sweep / "sweep").values() if r["status"] == "ok"]
    twins = {}
    for r in records:
        twins.setdefault(r["seed_index"], set()).add(r["twin_val_loss"])
    assert sorted(twins) == list(range(REAL_SEEDS)) and all(len(t) == 1 for t in twins.values())
    assert len({next(iter(t)) for t in twins.values()}) == REAL_SEEDS
    assert len({r["seed"] for r in records}) == REAL_SEEDS
    gap2, gap8 = rows["adc_bits=2"]["gap"], rows["adc_bits=8"]["gap"]
    assert gap2 > gap8 + 0.1  # 2 bits: 3 output levels, the readout is flat; 8 bits tracks the twin
    assert rows["adc_bits=8"]["gap_lo"] <= gap8 <= rows["adc_bits=8"]["gap_hi"]
    assert data["base_values"]["adc_bits"] == 9 and data["seeds"] == REAL_SEEDS
    # 10 steps: the twin has not learned 0.3 nats below the unigram entropy -> undetermined, never "met"
    req = next(r for r in data["requirements"] if r["axis"] == "adc_bits")
    assert req["status"] == "undetermined" and req["required"] is None and "unigram entropy" in req["how"]
    assert req["seeds"] == REAL_SEEDS and req["steps"] == 10
    ok = [r for r in rows.values() if r["status"] == "ok"]
    assert ok and all(math.isfinite(r["re_mu"]) for r in ok)
    assert all(r["pulses_per_device"] is not None and r["pulses_per_device"] >= 0 for r in rows.values())
    assert all(0.0 <= r["output_zero_fraction"] <= 1.0 for r in records)
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
    assert "adc_bits:" in out and "1 failed or invalid" in out and "Undetermined" in out


def test_real_sweep_exports_a_valid_spec(adc_sweep):
    from experiments.spec import export_spec, validate_spec

    result = export_spec(adc_sweep / "sweep", adc_sweep / "spec")
    spec = json.loads(result.spec_path.read_text())
    validate_spec(spec)
    rows = {r["axis"]: r for r in spec["requirements"]["rows"]}
    assert rows["adc_bits"]["status"] == "undetermined" and rows["adc_bits"]["seeds"] == REAL_SEEDS
    # the refused ttv2 point neither passes nor fails
    assert rows["algorithm"]["failed_values"] == ["ttv2"]
    assert spec["provenance"]["sweep"]["seeds"] == REAL_SEEDS
    source = spec["device"]["source"]
    assert source["kind"] == "preset" and source["path"].endswith("tile_base.toml")  # preset device in a tile file
    assert spec["periphery"]["adc"]["forward.out_bound"]["value"] == 4.0
    assert spec["derived"]["settling_time"]["value"] > 0
    assert sorted(r["role"] for r in spec["provenance"]["runs"]) == ["sweep_base", "sweep_point", "sweep_point"]
    assert {p.name for p in result.plots} == {"loss_curves.png", "gap_vs_adc_bits.png", "gap_vs_algorithm.png"}


# ---------------------------------------------------------------------------------------------
# Seeds, refused points, backends and bad input (no real run: everything here fails or is synthetic).

def seeded_point(overrides, context):
    calls = Path(context["calls_dir"])
    (calls / f"{point_id(overrides)}-{uuid.uuid4().hex}").write_text(str(os.getpid()))
    k = context["point_seed"]
    bits = overrides.get("adc_bits", 9)
    return {"analog_val_loss": 2.0 + 4.0 * 2.0 ** -bits + 0.01 * k, "twin_val_loss": 2.0 + 0.001 * k,
            "pid": os.getpid()}


def test_seeds_are_separate_tasks_with_their_own_records(tmp_path):
    calls = _calls(tmp_path)
    points = sweep_points({"adc_bits": (2, 8)})
    pid2 = point_id({"adc_bits": 2})
    refused = {f"{pid2}-s{k}": {"point_id": pid2, "seed_index": k, "task_id": f"{pid2}-s{k}",
                                "overrides": {"adc_bits": 2}, "status": "invalid", "error": "refused"} for k in range(4)}
    out = tmp_path / "s"
    records = run_sweep(seeded_point, points, out, context={"calls_dir": str(calls)}, seeds=[0, 1, 2],
                        precomputed=refused)
    assert len(records) == 9 and _n_calls(calls) == 6  # the refused point never ran
    names = sorted(p.name for p in (out / "points").glob("*.json"))
    assert names == sorted(f"{point_id(p)}-s{k}.json" for p in points for k in range(3))
    rows = {r["overrides"]: r for r in sweep_rows(records, ["adc_bits"], {"adc_bits": 9})}
    assert rows["adc_bits=2"]["status"] == "invalid" and rows["adc_bits=2"]["gap"] is None
    assert rows["adc_bits=8"]["gaps"] == pytest.approx([4 / 256 + 0.009 * k for k in range(3)])
    # resume with more seeds runs only the new seed of the points that run
    run_sweep(seeded_point, points, out, context={"calls_dir": str(calls)}, seeds=[0, 1, 2, 3], precomputed=refused)
    assert _n_calls(calls) == 6 + 2


def _sweep_cli(root, *extra):
    return ["sweep", "--model", "tiny", "--device", "reram_sb", "--axis", "adc_bits=4,8", "--steps", "2",
            "--out", str(root / "sw"), "--no-progress", *extra]


def test_bad_sweep_input_exits_2_and_writes_nothing(tmp_path, capsys, monkeypatch):
    import sys

    from experiments.cli import main

    assert main(_sweep_cli(tmp_path, "--seeds", "0")) == 2
    assert "--seeds" in capsys.readouterr().err and not (tmp_path / "sw").exists()
    assert main(_sweep_cli(tmp_path, "--ray-address", "127.0.0.1:1")) == 2
    assert "--backend ray" in capsys.readouterr().err and not (tmp_path / "sw").exists()
    assert main(_sweep_cli(tmp_path, "--backend", "ray", "--ray-address", "127.0.0.1:1")) == 2
    err = capsys.readouterr().err
    assert ("no Ray cluster answers at 127.0.0.1:1" in err or "needs Ray" in err) and not (tmp_path / "sw").exists()
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    assert main(_sweep_cli(tmp_path, "--backend", "ray")) == 2
    assert "pip install" in capsys.readouterr().err and not (tmp_path / "sw").exists()
    assert main(_sweep_cli(tmp_path, "--config", str(tmp_path / "nowhere.toml"))) == 2
    assert "nowhere.toml" in capsys.readouterr().err
    assert main(_sweep_cli(tmp_path, "--init-ckpt", str(tmp_path))) == 2  # a directory, not a checkpoint
    assert "no such checkpoint file" in capsys.readouterr().err and not (tmp_path / "sw").exists()


def test_resuming_with_other_settings_on_another_backend_is_refused(tmp_path, capsys):
    from experiments.cli import main
    from experiments.sweep.engine import MANIFEST, atomic_write_json

    from experiments.sweep import SweepOptions

    opts = SweepOptions(model="tiny", device="reram_sb", axes={"adc_bits": (4, 8)},
                        run_overrides={"training": {"steps": 2}})
    out = tmp_path / "sw"
    out.mkdir()
    atomic_write_json(out / MANIFEST, {"context": {k: v for k, v in opts.context(out.resolve()).items()
                                                   if not k.startswith("_")}})
    (out / "points").mkdir()
    (out / "points" / "keep.json").write_text("{}")
    # the same sweep with 3 steps, on Ray: refused before Ray starts, nothing lost
    assert main(_sweep_cli(tmp_path, "--steps", "3", "--backend", "ray")) == 2
    err = capsys.readouterr().err
    assert "differing keys: run_overrides" in err
    assert (out / "points" / "keep.json").read_text() == "{}"


def test_sweep_config_file_is_the_base_and_out_rules(tmp_path, capsys, monkeypatch):
    import experiments.sweep as sweep_pkg
    from ept_hw.config import save_toml
    from experiments.cli import main

    cfg = tmp_path / "config.toml"
    save_toml(cfg, {"mode": "ep", "seed": 4, "training": {"steps": 7}, "analog": {"device": "ecram"}})
    seen = {}

    def fake(out, options, **kw):
        seen["out"], seen["options"] = out, options
        raise KeyboardInterrupt  # stop here: nothing runs

    monkeypatch.setattr(sweep_pkg, "run_device_sweep", fake)
    assert main(["sweep", "--config", str(cfg), "--axis", "adc_bits=8", "--steps", "3", "--out",
                 str(tmp_path / "sw"), "--no-progress"]) == 130
    o = seen["options"]
    assert o.device == "ecram" and o.model is None and o.seeds == 3
    assert o.run_overrides["seed"] == 4 and o.run_overrides["training"]["steps"] == 3  # the flag wins
    assert "mode" not in o.run_overrides and "device" not in o.run_overrides.get("analog", {})
    (tmp_path / "bad.toml").write_text("not = [toml")
    assert main(["sweep", "--config", str(tmp_path / "bad.toml"), "--axis", "adc_bits=8", "--no-progress"]) == 2
    assert "bad.toml" in capsys.readouterr().err
    monkeypatch.undo()
    # --out: an existing folder with someone's files, or a run, is refused before anything is written
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    assert main(_sweep_cli(tmp_path, "--out", str(mine))) == 2
    assert "other files" in capsys.readouterr().err and sorted(p.name for p in mine.iterdir()) == ["notes.txt"]


def _ray_available():
    try:
        import ray  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.slow
@pytest.mark.skipif(not _ray_available(), reason="Ray is not installed (pip install 'ept-hw[ray]')")
def test_ray_backend_records_equal_the_local_backend(tmp_path):
    """2 points x 2 seeds of real tiny `compare` runs on a local Ray instance and on the local pool."""
    import ray

    from experiments.sweep import SweepOptions, run_device_sweep

    (tmp_path / "small.txt").write_text(SMALL_TEXT)
    common = dict(model="tiny", device="reram_sb", axes={"adc_bits": (8,)}, seeds=2, re_mu=False,
                  run_overrides={"data": {"source": str(tmp_path / "small.txt")},
                                 "training": {"steps": 3, "batch_size": 4, "eval_interval": 3, "eval_batches": 1}})
    try:
        ray_result = run_device_sweep(tmp_path / "ray", SweepOptions(**common, backend="ray"))
    finally:
        ray.shutdown()
    local_result = run_device_sweep(tmp_path / "local", SweepOptions(**common, workers=2))
    keys = ("analog_val_loss", "twin_val_loss", "gap", "seed", "steps", "status", "output_zero_fraction",
            "pulses_per_device")
    ray_recs, local_recs = load_records(tmp_path / "ray"), load_records(tmp_path / "local")
    assert sorted(ray_recs) == sorted(local_recs) and len(ray_recs) == 4
    for tid in ray_recs:
        assert {k: ray_recs[tid].get(k) for k in keys} == {k: local_recs[tid].get(k) for k in keys}, tid
    assert [r["gap"] for r in ray_result.rows] == [r["gap"] for r in local_result.rows]
    # a sweep run on Ray resumes locally without recomputing anything
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "ray" / "points").iterdir()}
    run_device_sweep(tmp_path / "ray", SweepOptions(**common))
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "ray" / "points").iterdir()} == before


def test_seed_k_changes_weights_and_noise_on_the_same_data_order(tmp_path, monkeypatch):
    """Seed index k: seed + SEED_STRIDE k, data order (training and evaluation batches) of the base seed."""
    import dataclasses

    import torch

    import trainer.loop as loop
    from experiments.sweep import SEED_STRIDE
    from experiments.sweep.device import point_config

    (tmp_path / "small.txt").write_text(SMALL_TEXT)
    ctx = {"model": "tiny", "device": "ideal", "periphery": "default",
           "run_overrides": {"seed": 5, "data": {"source": str(tmp_path / "small.txt")},
                             "training": {"steps": 1, "batch_size": 2, "eval_batches": 1, "stability_every": 0}}}
    tile = tmp_path / "t.toml"
    from crossbar.config import save_tile_config
    from crossbar.presets import tile_preset

    save_tile_config(tile, tile_preset("ideal"))
    c0 = point_config({}, ctx, tile)
    c2 = point_config({}, {**ctx, "point_seed": 2}, tile)
    assert (c0.seed, c0.data_seed) == (5, None)  # seed index 0 is the base configuration, unchanged
    assert (c2.seed, c2.data_seed, c2.order_seed) == (5 + 2 * SEED_STRIDE, 5, 5)
    seen = []
    real = loop.sample_batch

    def spy(*a, **kw):
        out = real(*a, **kw)
        seen[-1].append(out[0].clone())
        return out

    monkeypatch.setattr(loop, "sample_batch", spy)
    weights = []
    for i, cfg in enumerate((c0, c2, dataclasses.replace(c2, data_seed=None))):
        seen.append([])
        result = loop.run(cfg, tmp_path / f"r{i}")
        weights.append(result.paths["twin"].model.projections["W_h"].weight.clone())
    assert len(seen[0]) == len(seen[1]) >= 2
    assert all(torch.equal(a, b) for a, b in zip(seen[0], seen[1]))  # same batches
    assert not all(torch.equal(a, b) for a, b in zip(seen[0], seen[2]))  # without data_seed: another order
    assert not torch.equal(weights[0], weights[1])  # other initial weights
