"""trainer.controllers, trainer.divergence, trainer.checkpoint, trainer.metrics, tested alone."""

from __future__ import annotations

import json
import math

import pytest
import torch

from ept_hw.config import ConfigError
from trainer.checkpoint import config_differences, load_checkpoint, save_checkpoint
from trainer.controllers import (
    ControllerConfig,
    JacregController,
    LRSchedule,
    ParameterEMA,
    ScheduleConfig,
    ValidityGate,
)
from trainer.divergence import (
    DivergenceConfig,
    DivergenceMonitor,
    check_loss_explosion,
    check_non_finite,
    check_residual_hard_limit,
    check_stall,
)
from trainer.metrics import ROW_KEYS, MetricsLog, empty_row, read_metrics

# ------------------------------------------------------------------ controllers


def test_jacreg_controller_follows_the_law_and_never_reaches_zero():
    cfg = ControllerConfig(enabled=True, initial=1.0, floor=0.1, max=16.0, res_target=1e-3, res_ema=0.0, exponent=0.3)
    ctl = JacregController(cfg)
    lam = ctl.update(8e-3)  # EMA weight 0: res_ema = residual
    assert lam == pytest.approx(1.0 * 8.0**0.3, rel=1e-12)
    for _ in range(200):
        lam = ctl.update(0.0)  # a "perfect" residual (the absorption failure) must not anneal to 0
    assert lam == pytest.approx(0.1, rel=1e-12)
    for _ in range(200):
        lam = ctl.update(1.0)
    assert lam == pytest.approx(16.0)


def test_jacreg_controller_ema_and_frozen_mode():
    ctl = JacregController(ControllerConfig(enabled=True, initial=1.0, res_target=1e-3, res_ema=0.9, floor=0.1))
    ctl.update(1e-3)
    lam = ctl.update(2e-3)
    assert ctl.res_ema == pytest.approx(0.9e-3 + 0.2e-3)
    assert lam == pytest.approx(1.1**0.3, rel=1e-9)
    frozen = JacregController(ControllerConfig())  # the default recipe: frozen at 0.1
    for r in (1e-1, 1e-6, 0.0):
        assert frozen.update(r) == 0.1
    state = ctl.state_dict()
    other = JacregController(ControllerConfig(enabled=True, initial=1.0, res_target=1e-3, res_ema=0.9, floor=0.1))
    other.load_state_dict(state)
    assert other.update(5e-3) == ctl.update(5e-3)


def test_controller_config_refuses_zero_floor():
    with pytest.raises(ConfigError, match="controller.floor"):
        ControllerConfig(floor=0.0)
    with pytest.raises(ConfigError, match="controller.initial"):
        ControllerConfig(initial=100.0, max=16.0)


def test_validity_gate():
    assert ValidityGate(False, 1e-3).is_open(1.0)
    gate = ValidityGate(True, 1e-3)
    assert gate.is_open(9e-4) and not gate.is_open(2e-3) and not gate.is_open(math.nan)


def test_wsd_schedule():
    sched = LRSchedule(ScheduleConfig(kind="wsd", warmup_steps=10, decay_fraction=0.2, final_ratio=0.1), 100)
    f = [sched.factor(s) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert all(x == 1.0 for x in f[10:80])
    assert f[80] == pytest.approx(1 - 0.9 / 20) and f[99] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(f[80:], f[81:]))
    const = LRSchedule(ScheduleConfig(), 100)
    assert {const.factor(s) for s in range(100)} == {1.0}


def test_parameter_ema():
    p = {"w": torch.zeros(3)}
    ema = ParameterEMA(0.9, p)
    for _ in range(10):
        ema.update({"w": torch.ones(3)})
    assert torch.allclose(ema.shadow["w"], torch.full((3,), 1 - 0.9**10))


# ------------------------------------------------------------------ divergence


def test_each_divergence_rule_alone():
    assert check_non_finite(1.0, 1e-4) is None
    assert "loss" in check_non_finite(math.nan, 1e-4)
    assert "residual" in check_non_finite(1.0, math.inf)
    assert check_residual_hard_limit(0.09, 0.1) is None
    assert check_residual_hard_limit(0.11, 0.1) is not None
    # stall: the residual at the float resolution only counts while the loss is high
    assert check_stall(0.0, 60.0, 8.0) is not None
    assert check_stall(5e-8, 60.0, 8.0) is not None  # below fp32 eps (1.19e-7)
    assert check_stall(5e-8, 60.0, 8.0, torch.float64) is None  # fine in float64
    assert check_stall(0.0, 2.0, 8.0) is None
    assert check_stall(1e-5, 60.0, 8.0) is None
    assert check_loss_explosion(7.0, 2.0, 3.0, 4.0) is not None
    assert check_loss_explosion(5.9, 2.0, 3.0, 4.0) is None
    assert check_loss_explosion(3.5, 1.0, 3.0, 4.0) is None  # not worse than uniform guessing


def test_divergence_monitor_rules_and_window():
    cfg = DivergenceConfig(residual_hard_limit=0.1, validity_level=1e-2, window=5)
    mon = DivergenceMonitor(cfg, vocab_size=65, path="analog")
    for step in range(4):
        assert mon.check(step, 3.0, 0.05) is None  # above validity, below the fuse
    assert mon.check(4, 3.0, 1e-3) is None  # a good step resets the window
    for step in range(5, 9):
        assert mon.check(step, 3.0, 0.05) is None
    ev = mon.check(9, 3.0, 0.05)
    assert ev is not None and ev.rule == "residual_window" and ev.step == 9 and ev.path == "analog"
    mon = DivergenceMonitor(cfg, 65, "twin")
    assert mon.check(0, 3.0, 0.2).rule == "residual_hard_limit"
    assert mon.check(1, math.nan, 1e-4).rule == "non_finite"
    assert mon.check(2, 60.0, 0.0).rule == "stall"
    mon = DivergenceMonitor(cfg, 65, "twin")
    assert mon.check(0, 2.0, 1e-4) is None
    assert mon.check(1, 7.0, 1e-4).rule == "loss_explosion"
    # state round trip keeps the window count
    mon = DivergenceMonitor(cfg, 65, "twin")
    for step in range(4):
        mon.check(step, 3.0, 0.05)
    again = DivergenceMonitor(cfg, 65, "twin")
    again.load_state_dict(mon.state_dict())
    assert again.check(4, 3.0, 0.05).rule == "residual_window"


def test_divergence_config_validation():
    with pytest.raises(ConfigError, match="divergence.validity_level"):
        DivergenceConfig(residual_hard_limit=0.1, validity_level=0.2)


# ------------------------------------------------------------------ checkpoints and metrics


def test_checkpoint_is_atomic_and_round_trips(tmp_path):
    g = torch.Generator().manual_seed(7)
    torch.rand(5, generator=g)
    payload = {"w": torch.randn(3, 3), "rng": g.get_state(), "config": {"a": 1}}
    path = save_checkpoint(tmp_path / "ck" / "last.pt", payload)
    back = load_checkpoint(path)
    g2 = torch.Generator()
    g2.set_state(back["rng"])
    assert torch.equal(torch.rand(4, generator=g2), torch.rand(4, generator=g))
    assert torch.equal(back["w"], payload["w"])
    assert [p.name for p in path.parent.iterdir()] == ["last.pt"]  # no temp file left behind

    class Boom:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        save_checkpoint(path, {"w": torch.zeros(1), "bad": Boom()})
    assert torch.equal(load_checkpoint(path)["w"], payload["w"])  # old checkpoint intact
    assert [p.name for p in path.parent.iterdir()] == ["last.pt"]


def test_config_differences_names_nested_keys():
    a = {"model": {"width": 64, "heads": 4}, "seed": 0, "steps": [1, 2]}
    b = {"model": {"width": 32, "heads": 4}, "seed": 0, "steps": (1, 2), "extra": 1}
    assert config_differences(a, b) == ["extra", "model.width"]
    assert config_differences(a, a) == []


def test_metrics_log_fixed_keys_and_resume_cut(tmp_path):
    path = tmp_path / "metrics.jsonl"
    with MetricsLog(path) as log:
        for step in range(5):
            row = empty_row(step)
            row["twin_loss"] = 1.0 / (step + 1)
            log.append(row)
        with pytest.raises(KeyError, match="extra"):
            log.append({**empty_row(5), "bogus": 1})
    rows = read_metrics(path)
    assert [r["step"] for r in rows] == list(range(5))
    assert all(list(r) == list(ROW_KEYS) for r in rows)
    with MetricsLog(path, resume_step=2) as log:
        log.append(empty_row(3))
    assert [r["step"] for r in read_metrics(path)] == [0, 1, 2, 3]
    nan_row = empty_row(9)
    nan_row["analog_loss"] = math.nan
    with MetricsLog(path, resume_step=3) as log:
        log.append(nan_row)
    assert math.isnan(json.loads(path.read_text().splitlines()[-1])["analog_loss"])


def test_metrics_are_declared_once_and_everything_derives_from_the_declaration():
    from trainer.metrics import METRICS, PATH_KEYS, figure_rows, final_figures
    from trainer.twin import StepOutcome

    keys = [m.key for m in METRICS]
    assert len(keys) == len(set(keys))  # one declaration per metric
    assert all(m.meaning and m.label for m in METRICS)
    # the row schema is the declaration: common, every path's keys, cross, health
    assert set(ROW_KEYS) == {k for m in METRICS for k in m.row_keys()}
    assert ROW_KEYS[:3] == ("step", "lr", "wall_time") and "twin_loss" in ROW_KEYS and "analog_re_mu" in ROW_KEYS
    # every per-path figure a training step reports is declared (the loop copies them by name)
    outcome_figures = {k for k in StepOutcome.__dataclass_fields__ if k not in ("updates", "health", "figures")} | {"update_norm"}
    assert outcome_figures <= set(PATH_KEYS)
    # aggregation as declared: last value, mean of the last 20 finite, count of true rows
    rows = [empty_row(s) for s in range(30)]
    for s, r in enumerate(rows):
        r["twin_loss"] = float(s)  # mean of the last 20: mean(10..29) = 19.5
        r["twin_gated"] = s % 3 == 0  # 10 true rows
        r["twin_val_loss"] = float(s) if s % 10 == 9 else None  # last logged: 29
    rows[-1]["twin_residual"] = math.nan  # non-finite values are left out of a mean
    rows[-2]["twin_residual"] = 2.0
    fig = final_figures(rows)
    assert list(fig) == ["twin"]
    assert fig["twin"]["train_loss_last20"] == pytest.approx(19.5)
    assert fig["twin"]["gated_steps"] == 10
    assert fig["twin"]["val_loss"] == 29.0
    assert fig["twin"]["residual_last20"] == 2.0
    assert [name for name, _ in figure_rows()] == list(fig["twin"])


def test_sgd_sink_tells_each_projection_how_many_leading_rows_are_the_tasks():
    """aihwkit's transfer_every counts the task's input vectors: the EP estimate's rows lead the
    merged ports and are counted; stabiliser rows follow and are not; a gated step has none."""
    from types import SimpleNamespace

    from trainer.optimisers import SGDSink
    from trainer.stabilisers import PortUpdates

    calls = []

    class Recorder:
        def apply_update(self, u, d, lr, task_rows=None):
            calls.append((u.shape[0], task_rows, u[:, 0].tolist()))

    model = SimpleNamespace(projections={"W_Q": Recorder()}, params={})
    stab = (torch.full((2, 3), 2.0), torch.zeros(2, 4))
    task = (torch.ones(5, 3), torch.zeros(5, 4))
    ups = PortUpdates()
    ups.add({"W_Q": stab}, {})               # a stabiliser part added first ...
    ups.add({"W_Q": task}, {}, task=True)    # ... the task's rows still lead
    SGDSink(model, 1.0, ()).apply(ups, {}, 0.1)
    assert calls == [(7, 5, [1.0] * 5 + [2.0] * 2)]
    gated = PortUpdates()
    gated.add({"W_Q": stab}, {})
    calls.clear()
    SGDSink(model, 1.0, ()).apply(gated, {}, 0.1)
    assert calls == [(2, 0, [2.0, 2.0])]
