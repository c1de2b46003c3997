"""Gap attribution (`ept-hw attribute`): the symmetric device rule, each factor's tile edit, the
table's arithmetic, resume through the sweep engine's records, bad input, and (slow) a real run."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch

from crossbar.presets import perfect_io, tile_preset
from devices import preset
from devices.configs import (
    ConstantStepDevice, ExpStepDevice, LinearStepDevice, PiecewiseStepDevice, PowStepDevice, SoftBoundsDevice,
)
from devices.physics import rule_for
from devices.symmetric import symmetric_device
from ept_hw.config import ConfigError
from experiments import attribution as attr

TEXT = ("To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n"
        "The slings and arrows of outrageous fortune,\nOr to take arms against a sea of troubles\n") * 12

ASYMMETRIC = {
    "ecram": preset("ecram"),
    "reram_sb": preset("reram_sb"),
    "capacitor_like": LinearStepDevice(gamma_up=0.05, gamma_down=0.3, up_down=0.1, w_max=1.2, w_min=-0.8),
    "reverse_linear": LinearStepDevice(gamma_up=0.2, gamma_down=0.2, reverse_up=True, w_max=1.0, w_min=-1.0),
    "constant": ConstantStepDevice(up_down=0.2, w_max=1.0, w_min=-0.6),
    "soft_bounds": SoftBoundsDevice(w_max=1.3, w_min=-0.7),
    "exp_step": ExpStepDevice(),
    "pow_step": PowStepDevice(pow_up_down=0.3, w_max=1.0, w_min=-1.0),
    "piecewise": PiecewiseStepDevice(piecewise_up=(1.0, 0.8, 0.3), piecewise_down=(0.9, 0.7, 0.6)),
}


def _nominal_steps(cfg, w):
    """(up step at w, down step magnitude at −w) of the nominal device (every spread draw = 0)."""
    n = w.numel()
    rule = rule_for(cfg)
    h = rule.sample(cfg, lambda: torch.zeros(n, dtype=torch.float64), lambda: torch.full((n,), 0.5, dtype=torch.float64))
    up = rule.step(cfg, h, w, True, None)
    down = -rule.step(cfg, h, -w, False, None)
    return up, down


@pytest.mark.parametrize("name", list(ASYMMETRIC))
def test_symmetric_device_has_mirror_steps_and_the_original_does_not(name):
    cfg = ASYMMETRIC[name]
    sym = symmetric_device(cfg)
    assert sym.model == cfg.model and sym.up_down == 0.0 and sym.w_max == -sym.w_min
    assert sym.w_max - sym.w_min == pytest.approx(cfg.w_max - cfg.w_min)  # the range is kept
    b = sym.w_max
    w = torch.linspace(-0.9 * b, 0.9 * b, 37, dtype=torch.float64)
    up, down = _nominal_steps(sym, w)
    assert up.max() > 0 and torch.all(up >= 0)
    assert torch.allclose(up, down, rtol=1e-9, atol=1e-15), (up - down).abs().max()
    # the test can fail: the original device's steps are not mirror images
    w0 = torch.linspace(0.9 * cfg.w_min, 0.9 * min(cfg.w_max, -cfg.w_min), 37, dtype=torch.float64)
    up0, down0 = _nominal_steps(cfg, w0)
    assert (up0 - down0).abs().max() > 1e-3 * up0.abs().max()
    # everything but the asymmetry stays: spreads and noise
    assert sym.dw_min == cfg.dw_min and sym.dw_min_std == cfg.dw_min_std and sym.dw_min_dtod == cfg.dw_min_dtod


def test_symmetric_device_refuses_an_ideal_device():
    with pytest.raises(ConfigError, match="ideal"):
        symmetric_device(preset("ideal"))


def _other_fields_equal(a, b, skip):
    for f in dataclasses.fields(a):
        if f.name not in skip:
            assert getattr(a, f.name) == getattr(b, f.name), f.name


def test_each_factor_edits_what_it_says_and_nothing_else():
    tile = tile_preset("reram_sb")
    dev = tile.device_config()
    assert attr.factor_tile(tile, []) == tile
    p = attr.factor_tile(tile, ["periphery"])
    assert p.forward == perfect_io() and p.backward == perfect_io() and p.device == tile.device
    q = attr.factor_tile(tile, ["quantisation"])
    for new, old in ((q.forward, tile.forward), (q.backward, tile.backward)):
        assert old.inp_res > 0 and old.out_res > 0 and new.inp_res == 0.0 and new.out_res == 0.0
        _other_fields_equal(new, old, {"inp_res", "out_res"})
    r = attr.factor_tile(tile, ["read_noise"])
    assert tile.forward.out_noise > 0
    for new, old in ((r.forward, tile.forward), (r.backward, tile.backward)):
        assert new.out_noise == new.w_noise == new.inp_noise == 0.0
        _other_fields_equal(new, old, {"out_noise", "w_noise", "inp_noise"})
    c = attr.factor_tile(tile, ["c2c"]).device_config()
    assert dev.dw_min_std > 0 and dev.write_noise_std > 0 and c.dw_min_std == 0.0 and c.write_noise_std == 0.0
    _other_fields_equal(c, dev, {"dw_min_std", "write_noise_std"})
    d = attr.factor_tile(tile, ["d2d"]).device_config()
    dtod = {f.name for f in dataclasses.fields(dev) if f.name.endswith("_dtod")} | {"reference_std"}
    assert dev.dw_min_dtod > 0 and all(getattr(d, k) == 0.0 for k in dtod)
    _other_fields_equal(d, dev, dtod)
    s = attr.factor_tile(tile, ["symmetric"])
    assert s.device_config() == symmetric_device(dev) and s.forward == tile.forward
    i = attr.factor_tile(tile, ["ideal_device"])
    assert i.device_config().is_ideal and i.algorithm == "sgd" and i.forward == tile.forward
    every_device = attr.factor_tile(tile, [f for f in attr.FACTORS if f != "ideal_device"])
    e = every_device.device_config()
    assert every_device.forward.is_perfect and e.dw_min_std == 0 and e.dw_min_dtod == 0 and e.w_max == -e.w_min
    every = attr.factor_tile(tile, list(attr.FACTORS))
    assert every.forward.is_perfect and every.device_config().is_ideal
    with pytest.raises(ConfigError, match="one of"):
        attr.factor_tile(tile, ["stabilisers"])


def test_factors_that_do_not_apply_are_named_with_a_reason():
    ideal = tile_preset("perfect_ideal")
    for f in attr.FACTORS:  # an ideal device with perfect periphery: nothing to remove
        assert attr.FACTORS[f].not_applicable(None if attr.FACTORS[f].target == "config" else ideal), f
    pcm = tile_preset("pcm")
    assert pcm.uses_pair and "pair" in attr.FACTORS["symmetric"].not_applicable(pcm)
    with pytest.raises(ConfigError, match="ideal device has no up and down"):
        attr.choose_factors(tile_preset("ideal"), ["symmetric"])
    chosen, skipped = attr.choose_factors(tile_preset("ideal"), None)
    assert chosen == ["periphery", "quantisation", "read_noise"]
    assert set(skipped) == {"symmetric", "c2c", "d2d", "ideal_device", "exact_stabilisers"}
    # programming noise on an ideal device is still something to remove
    noisy_writes = tile_preset("ideal").replace(programming_noise=0.01)
    assert attr.FACTORS["ideal_device"].not_applicable(noisy_writes) is None
    assert attr.factor_tile(noisy_writes, ["ideal_device"]).programming_noise == 0.0


@pytest.mark.parametrize("name", ["ecram", "pcm", "reram_sb"])
@pytest.mark.parametrize("algorithm", ["sgd", "mixed_precision", "ttv2"])
def test_every_factor_removed_leaves_the_twins_tile(name, algorithm):
    """With every tile factor removed the tile is the ideal one the twin stands for: an ideal
    device (never a pair) updated by plain SGD with perfect periphery on both reads, whatever
    the device, the algorithm or a differential pair's refresh. If something were left (a pair,
    a transfer algorithm, a noisy read), "all removed" would not measure what the table says."""
    tile = tile_preset(name, algorithm)
    every = attr.factor_tile(tile, list(attr.FACTORS))
    assert every.device_config().is_ideal and not every.uses_pair and every.algorithm == "sgd"
    assert every.forward == perfect_io() and every.backward == perfect_io() and every.programming_noise == 0.0
    for f in attr.FACTORS:
        target = None if attr.FACTORS[f].target == "config" else every
        assert attr.FACTORS[f].not_applicable(target), f  # nothing left to remove


def test_exact_stabilisers_factor_edits_the_configuration_not_the_tile():
    """`exact_stabilisers` applies to a run whose resreg was on-chip ("arrays") and switches it to
    the read-out weights; with the default ("readout") it does not apply and is refused by name."""
    import dataclasses

    from ept_hw.config import to_dict

    from experiments.presets import load_run_config

    tile = tile_preset("ecram")
    default = load_run_config("tiny", {"mode": "compare"})
    assert default.stabilisers.resreg_source == "readout"
    chosen, skipped = attr.choose_factors(tile, None, default)
    assert "exact_stabilisers" not in chosen and "exact weights" in skipped["exact_stabilisers"]
    with pytest.raises(ConfigError, match="already use exact weights"):
        attr.choose_factors(tile, ["exact_stabilisers"], default)
    on_chip = dataclasses.replace(default, stabilisers=dataclasses.replace(default.stabilisers, resreg_source="arrays"))
    chosen, _ = attr.choose_factors(tile, None, on_chip)
    assert chosen[-1] == "exact_stabilisers"
    assert attr.factor_tile(tile, ["exact_stabilisers"]) == tile
    assert attr.factor_config(on_chip, ["exact_stabilisers"]).stabilisers.resreg_source == "readout"
    assert attr.factor_config(on_chip, ["c2c"]).stabilisers.resreg_source == "arrays"
    # the task configurations: the factor run switches, the full run and the twin keep the run's setting
    context = {"config": to_dict(on_chip)}
    assert attr._task_config(context, "analog", None, ["exact_stabilisers"]).stabilisers.resreg_source == "readout"
    assert attr._task_config(context, "analog", None, []).stabilisers.resreg_source == "arrays"
    assert attr._task_config(context, "twin", None).stabilisers.resreg_source == "arrays"


def _record(overrides, seed, loss, key="analog_val_loss"):
    return {"overrides": overrides, "seed_index": seed, "status": "ok", key: loss, "seed": 100 + seed}


def test_table_arithmetic_shares_and_interaction():
    # seed k: twin 2, full 2.5 + 0.1k, without a: 2.3 + 0.1k, without b: 2.4, all removed 2.1
    recs = []
    for k in range(2):
        recs += [_record({"twin": True}, k, 2.0, "twin_val_loss"), _record({"remove": []}, k, 2.5 + 0.1 * k),
                 _record({"remove": ["a"]}, k, 2.3 + 0.1 * k), _record({"remove": ["b"]}, k, 2.4),
                 _record({"remove": ["a", "b"]}, k, 2.1)]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(attr, "FACTORS", {"a": attr.Factor("a", "A", lambda t: None, lambda t: t),
                                     "b": attr.Factor("b", "B", lambda t: None, lambda t: t)})
        t = attr.attribution_table(recs, ["a", "b"], {}, 2)
        md = attr.markdown(t)
    assert t["gap_full"]["mean"] == pytest.approx(0.55) and t["gap_full"]["n"] == 2
    rows = {r["factor"]: r for r in t["rows"]}
    assert rows["a"]["explained"]["mean"] == pytest.approx(0.2)
    assert rows["b"]["explained"]["mean"] == pytest.approx(0.15)  # (0.1 + 0.2) / 2
    assert rows["a"]["share"] == pytest.approx(0.2 / 0.55)
    assert t["gap_all_removed"]["mean"] == pytest.approx(0.1)
    # interaction = full − Σ explained − all removed, per seed: 0.5−0.2−0.1−0.1 = 0.1, 0.6−0.2−0.2−0.1 = 0.1
    assert t["interaction"]["mean"] == pytest.approx(0.1)
    assert "`a`" in md and "interaction" in md and "seeds (a run failed" not in md
    # a factor run that diverged on seed 1: the interaction rests on seed 0 alone, and says so
    recs[-2] = {**recs[-2], "status": "diverged", "analog_val_loss": None}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(attr, "FACTORS", {"a": attr.Factor("a", "A", lambda t: None, lambda t: t),
                                     "b": attr.Factor("b", "B", lambda t: None, lambda t: t)})
        t = attr.attribution_table(recs, ["a", "b"], {}, 2)
        md = attr.markdown(t)
    assert t["interaction"]["n"] == 1
    assert "from 1 of 2 seeds (a run failed on the others)" in md


# ------------------------------------------------------------------------------ with a real run
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A finished 2-step tiny compare run on ECRAM."""
    from experiments.cli import main

    root = tmp_path_factory.mktemp("attr")
    (root / "small.txt").write_text(TEXT)
    assert main(["compare", "--model", "tiny", "--device", "ecram", "--data", str(root / "small.txt"), "--steps", "2",
                 "--batch-size", "2", "--seq-len", "16", "--set", "training.eval_interval=2",
                 "--set", "training.eval_batches=1", "--set", "training.final_eval_tokens=128",
                 "--out", str(root / "run"), "--no-progress"]) == 0
    return root / "run"


def _copy(run: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(run, dst, ignore=shutil.ignore_patterns("attribution"))
    return dst


def fake_point(overrides, context):
    """Point function with a known answer; counts its calls."""
    calls = Path(context["_out_dir"]).parent / "calls.txt"
    with calls.open("a") as fh:
        fh.write(json.dumps(overrides) + "\n")
    k = int(context.get("point_seed") or 0)
    if overrides.get("twin"):
        return {"twin_val_loss": 3.0 + 0.01 * k}
    return {"analog_val_loss": 3.5 + 0.01 * k - 0.1 * len(overrides.get("remove", []))}


def test_resume_never_redoes_finished_runs(tiny_run, tmp_path, monkeypatch):
    run = _copy(tiny_run, tmp_path)
    monkeypatch.setattr(attr, "attribution_point", fake_point)
    res = attr.attribute_run(run, seeds=2, factors=["c2c", "d2d"])
    calls = (run / "calls.txt").read_text().splitlines()
    assert len(calls) == 5 * 2  # twin, full, c2c, d2d, all removed; two seeds
    assert res.table["gap_full"]["mean"] == pytest.approx(0.5)
    assert all(r["explained"]["mean"] == pytest.approx(0.1) for r in res.table["rows"])
    assert res.table["interaction"]["mean"] == pytest.approx(0.5 - 0.2 - 0.3)
    for name in (attr.TABLE_JSON, attr.TABLE_MD, attr.PLOT):
        assert (run / "attribution" / name).is_file()
    # while another process attributes the same run, a second attribution is refused
    from trainer.rundir import RunLock, RunLockedError

    with RunLock(run / "attribution"), pytest.raises(RunLockedError):
        attr.attribute_run(run, seeds=2, factors=["c2c", "d2d"])
    # a second call: nothing rerun; a third with one more seed runs that seed only
    attr.attribute_run(run, seeds=2, factors=["c2c", "d2d"])
    assert len((run / "calls.txt").read_text().splitlines()) == 10
    attr.attribute_run(run, seeds=3, factors=["c2c", "d2d"])
    assert len((run / "calls.txt").read_text().splitlines()) == 15
    # the run report includes the table and the chart
    from experiments.report import write_report

    report = write_report(run).read_text()
    assert "## Gap attribution" in report and "attribution/attribution.png" in report and "`c2c`" in report


def _snapshot(run: Path) -> dict[str, float]:
    return {str(p.relative_to(run)): p.stat().st_mtime_ns for p in run.rglob("*")}


@pytest.mark.parametrize("case", ["incomplete", "diverged", "not_applicable", "unknown", "one_seed", "not_compare"])
def test_bad_input_exit_2_and_nothing_written(tiny_run, tmp_path, capsys, case):
    from experiments.cli import main
    from trainer.rundir import RunDirectory

    run = _copy(tiny_run, tmp_path)
    rd = RunDirectory(run)
    summary = rd.read_summary()
    args = ["attribute", str(run), "--no-progress"]
    if case == "incomplete":
        summary["steps_completed"] = 1
        rd.write_summary(summary)
    elif case == "diverged":
        summary["divergence"] = {"step": 1, "message": "analog: loss is NaN", "rule": "non_finite"}
        rd.write_summary(summary)
    elif case == "not_applicable":  # the run's own tile is an ideal device: nothing symmetric to make
        rd.write_tile_config(tile_preset("ideal"))
        args += ["--factors", "symmetric"]
    elif case == "unknown":
        args += ["--factors", "c2c,stabilisers"]
    elif case == "one_seed":
        args += ["--seeds", "1"]
    elif case == "not_compare":
        cfg = rd.read_config_dict()
        cfg["mode"], cfg["path"] = "ep", "analog"
        rd.write_config(cfg)
    before = _snapshot(run)
    assert main(args) == 2
    err = capsys.readouterr().err
    expected = {"incomplete": "incomplete", "diverged": "diverged", "not_applicable": "ideal device",
                "unknown": "stabilisers", "one_seed": ">= 2", "not_compare": "compare"}[case]
    assert expected in err and "Traceback" not in err
    assert _snapshot(run) == before and not (run / "attribution").exists()


def test_a_task_reports_its_runs_final_figure(tiny_run, tmp_path):
    """A task's loss is its run's final figure, on the fixed validation set when the run has one
    (as the original run's gap is): not the last in-loop evaluation, a smaller and different sample."""
    from trainer.rundir import RunDirectory

    cfg, tile, summary = attr.check_run(tiny_run)
    assert summary["final_eval"]["tokens"] > 0  # the fixture's run has a fixed-set figure
    context = {**attr.task_context(cfg, tile, tmp_path / "attribution"), "point_seed": 0}
    rec = attr.attribution_point({"twin": True}, context)
    task = json.loads((tmp_path / "attribution" / rec["run_dir"] / "summary.json").read_text())
    assert rec["twin_val_loss"] == task["final_eval"]["loss"]["twin"] == summary["final_eval"]["loss"]["twin"]
    logged = RunDirectory(tmp_path / "attribution" / rec["run_dir"]).final_val_losses()["twin"]
    assert logged != rec["twin_val_loss"]  # the two figures differ: the test tells them apart


@pytest.mark.slow
def test_real_attribution_reproduces_the_run_and_shares_the_twin(tiny_run, tmp_path):
    """Seed 0's full re-run (analog path alone) reproduces the original compare run's gap exactly
    (its analog path does not depend on the twin's), every analog run of a seed is compared to one
    twin, and a second call resumes without running anything."""
    from experiments.cli import main

    run = _copy(tiny_run, tmp_path)
    assert main(["attribute", str(run), "--factors", "c2c", "--seeds", "2", "--workers", "2", "--no-progress"]) == 0
    table = json.loads((run / "attribution" / attr.TABLE_JSON).read_text())
    s0 = table["per_seed"][0]
    assert s0["gap_full"] == table["original_run_gap"]  # bit-identical re-run of seed 0
    assert table["per_seed"][1]["twin_val_loss"] != s0["twin_val_loss"]  # a second seed is another run
    assert len(list((run / "attribution" / "runs").iterdir())) == 3 * 2  # twin, full, c2c per seed: no second twin
    row = table["rows"][0]
    assert row["factor"] == "c2c" and row["status"] == "ok" and row["explained"]["n"] == 2
    before = _snapshot(run / "attribution" / "runs")
    assert main(["attribute", str(run), "--factors", "c2c", "--seeds", "2", "--no-progress"]) == 0
    assert _snapshot(run / "attribution" / "runs") == before
