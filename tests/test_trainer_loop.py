"""trainer.loop / trainer.twin end to end on tiny runs: exact resume, the ideal-device gap, bad
input, divergence, interruption, reference modes. Tiny runs are shared through session fixtures."""

from __future__ import annotations

import hashlib
import json
import math
import os
import signal
import threading
import time

import pytest
import torch

from ept_hw.config import ConfigError
from trainer.checkpoint import load_checkpoint
from experiments.presets import load_run_config
from trainer.config import merge
from trainer.data import embedded_works
from trainer.loop import EXIT_DIVERGED, EXIT_INTERRUPTED, run
from trainer.metrics import read_metrics

SMALL = {
    "model": {"context": 8, "width": 16, "heads": 2, "ffn_mult": 2},
    "training": {"steps": 4, "batch_size": 4, "seq_len": 8, "eval_interval": 2, "eval_batches": 1,
                 "checkpoint_interval": 2},
    "solver": {"max_steps": 60},
    "estimator": {"t2": 6, "beta": 3.2},
}



@pytest.fixture(scope="module")
def text_file():
    """A real play (UTF-8, ~180k characters): quicker to load than the whole embedded corpus."""
    return str(embedded_works()["hamlet"][0])


def small_config(text_file, **overrides):
    return load_run_config("tiny", merge(merge(SMALL, {"data": {"source": text_file}}), overrides))


@pytest.fixture(scope="module")
def noisy_full_run(tmp_path_factory, text_file):
    """compare on a noisy, pulsed device: 4 uninterrupted steps."""
    out = tmp_path_factory.mktemp("runs") / "full"
    cfg = small_config(text_file, mode="compare", analog={"device": "ecram", "tile": {"noise_mode": "common"}})
    result = run(cfg, out)
    return cfg, out, result


@pytest.fixture(scope="module")
def ideal_run(tmp_path_factory, text_file):
    out = tmp_path_factory.mktemp("runs") / "ideal"
    cfg = small_config(
        text_file, mode="compare", analog={"device": "ideal", "periphery": "perfect"},
        training={"steps": 8, "eval_interval": 2, "lr": 0.5},
    )
    return run(cfg, out)


def _strip_wall(rows):
    return [{k: v for k, v in r.items() if k != "wall_time"} for r in rows]


def test_resumed_run_equals_uninterrupted_run(noisy_full_run, tmp_path):
    cfg, full_dir, full = noisy_full_run
    assert full.exit_code == 0 and full.steps_completed == 4
    out = tmp_path / "resumed"
    first = run(cfg, out, stop_after=1)  # stops after step 0 with a checkpoint (not at an interval)
    assert first.steps_completed == 1
    assert load_checkpoint(out / "checkpoints" / "last.pt")["step"] == 1
    # The interrupted run had logged one extra row past the checkpoint in a real crash: simulate it.
    with (out / "metrics.jsonl").open("a") as fh:
        fh.write(json.dumps({**read_metrics(out / "metrics.jsonl")[-1], "step": 1, "analog_loss": -1.0}) + "\n")
    second = run(None, out, resume=True)
    assert second.steps_completed == 4
    rows_full = _strip_wall(read_metrics(full_dir / "metrics.jsonl"))
    rows_resumed = _strip_wall(read_metrics(out / "metrics.jsonl"))
    assert [r["step"] for r in rows_resumed] == [0, 1, 2, 3]
    assert rows_resumed == rows_full  # every field, every path, bit for bit (noise, pulses, probes)
    # the device really is noisy and pulsed: the comparison is not between two deterministic runs
    assert rows_full[-1]["analog_residual_floor"] > 0 and rows_full[-1]["analog_pulses"] > 0


def test_resume_refuses_a_different_config(noisy_full_run, tmp_path, text_file):
    cfg, full_dir, _ = noisy_full_run
    before = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in full_dir.rglob("*") if p.is_file()}
    other = small_config(text_file, mode="compare", analog={"device": "ecram", "tile": {"noise_mode": "fresh"}},
                         training={"lr": 0.1})
    with pytest.raises(ConfigError) as err:
        run(other, full_dir, resume=True)
    assert "analog.tile.noise_mode" in str(err.value) and "training.lr" in str(err.value)
    after = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in full_dir.rglob("*") if p.is_file()}
    assert after == before  # nothing touched


def test_ideal_device_tracks_the_twin(ideal_run):
    rows = read_metrics(ideal_run.run_dir / "metrics.jsonl")
    vals = [(r["analog_val_loss"], r["twin_val_loss"]) for r in rows if r["twin_val_loss"] is not None]
    assert len(vals) == 4
    assert max(abs(a - t) for a, t in vals) <= 0.01
    initial = ideal_run.summary["initial_val_loss"]["twin"]
    assert vals[-1][1] < initial - 0.1  # the run did learn: the agreement is not between two idle models
    assert min(min(c for c in r["update_cos"].values()) for r in rows) > 0.999
    assert max(r["weight_gap"] for r in rows) < 1e-4


def test_existing_run_is_never_overwritten(noisy_full_run):
    cfg, full_dir, _ = noisy_full_run
    before = (full_dir / "metrics.jsonl").read_bytes()
    with pytest.raises(ValueError, match="already holds a run"):
        run(cfg, full_dir)
    assert (full_dir / "metrics.jsonl").read_bytes() == before


def test_bad_input_errors_write_nothing(tmp_path, text_file):
    out = tmp_path / "never"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        run(small_config(str(tmp_path / "missing.txt")), out)
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(ValueError, match="empty"):
        run(small_config(str(empty)), out)
    with pytest.raises(ConfigError, match="analog.device"):
        run(small_config(text_file, mode="compare", analog={"device": "unobtainium"}), out)
    with pytest.raises(ConfigError, match="model"):
        load_run_config("no_such_preset")
    with pytest.raises(ConfigError, match="training.seq_len"):
        small_config(text_file, training={"seq_len": 64})
    with pytest.raises(ConfigError, match="training.optimizer"):
        small_config(text_file, mode="compare", training={"optimizer": "adamw"})
    with pytest.raises(ConfigError, match="estimator.points"):
        small_config(text_file, mode="ep", path="analog", estimator={"nudge": "holomorphic", "points": 3})
    with pytest.raises(ConfigError, match="bogus"):
        small_config(text_file, training={"bogus": 1})
    assert not out.exists()


def test_divergence_stops_and_keeps_the_last_good_checkpoint(tmp_path, text_file):
    cfg = small_config(text_file, mode="ep", path="twin",
                       training={"steps": 30, "lr": 300.0, "checkpoint_interval": 1, "eval_interval": 50},
                       divergence={"window": 3})
    result = run(cfg, tmp_path / "div")
    assert result.exit_code == EXIT_DIVERGED
    event = result.summary["divergence"]
    assert event["rule"] in ("non_finite", "residual_hard_limit", "residual_window", "stall", "loss_explosion")
    ck = load_checkpoint(tmp_path / "div" / "checkpoints" / "last.pt")
    assert ck["step"] == event["step"] == event["last_good_checkpoint_step"]  # the diverged step was not saved
    assert result.steps_completed == event["step"] + 1 < 30
    events = [json.loads(line) for line in (tmp_path / "div" / "events.jsonl").read_text().splitlines()]
    assert events[-1]["event"] == "divergence" and events[-1]["rule"] == event["rule"]
    rows = read_metrics(tmp_path / "div" / "metrics.jsonl")
    assert rows[-1]["step"] == event["step"]  # the diverged step is recorded


def test_ctrl_c_saves_and_exits(tmp_path, text_file):
    cfg = small_config(text_file, mode="ep", path="twin", training={"steps": 200, "checkpoint_interval": 100})
    timer = threading.Timer(2.0, lambda: os.kill(os.getpid(), signal.SIGINT))
    timer.start()
    try:
        result = run(cfg, tmp_path / "int")
    finally:
        timer.cancel()
    assert result.exit_code == EXIT_INTERRUPTED
    assert 0 < result.steps_completed < 200
    ck = load_checkpoint(tmp_path / "int" / "checkpoints" / "last.pt")
    assert ck["step"] == result.steps_completed
    assert len(read_metrics(tmp_path / "int" / "metrics.jsonl")) == result.steps_completed


@pytest.mark.parametrize("mode,optimizer", [("bptt", "sgd"), ("bp", "adamw"), ("ep", "adamw")])
def test_reference_modes_learn(tmp_path, text_file, mode, optimizer):
    lr = 0.5 if optimizer == "sgd" else 1e-2
    cfg = small_config(text_file, mode=mode, training={"steps": 6, "optimizer": optimizer, "lr": lr, "eval_interval": 6,
                                                        "ema": 0.0, "bptt_steps": 30})
    result = run(cfg, tmp_path / mode)
    rows = read_metrics(tmp_path / mode / "metrics.jsonl")
    assert all(math.isfinite(r["twin_loss"]) for r in rows)
    assert rows[-1]["twin_val_loss"] < result.summary["initial_val_loss"]["twin"] - 0.1


def test_init_ckpt_programs_the_arrays_and_reports_a_verdict(ideal_run, tmp_path, text_file):
    ck = load_checkpoint(ideal_run.run_dir / "checkpoints" / "last.pt")
    source = ck["paths"]["twin"]["model"]["projections"]["W_Q"]["weight"]
    cfg = small_config(text_file, mode="compare", analog={"device": "ecram"}, training={"steps": 1})
    result = run(cfg, tmp_path / "init", init_ckpt=ideal_run.run_dir / "checkpoints" / "last.pt")
    info = result.summary["init_ckpt"]
    assert info["source_path"] == "twin"
    assert info["verdict"]["twin"]["verdict"] == "converged" and info["verdict"]["twin"]["residual"] < 1e-3
    assert info["verdict"]["analog"]["floor"] > 0  # the arrays read with noise
    start = torch.load(tmp_path / "init" / "conductances.pt", weights_only=False)["start"]["W_Q"]
    # programmed onto ECRAM devices: close to the digital weights, not equal (device granularity)
    rel = float((start - source).norm() / source.norm())
    assert 0 < rel < 0.05
    with pytest.raises(ConfigError, match="init_ckpt"):
        run(small_config(text_file, model={"width": 32}), tmp_path / "bad", init_ckpt=ideal_run.run_dir / "checkpoints" / "last.pt")
    assert not (tmp_path / "bad").exists()


def test_summary_splits_the_wall_time_between_training_and_instruments(noisy_full_run):
    """summary.json `time_split`: seconds of training, of each instrument and of checkpoints, the
    rest, their total (set-up included) and the instruments' share of it (issue 15 item 2)."""
    from trainer.loop import INSTRUMENT_PARTS, TIME_PARTS

    _, out, result = noisy_full_run
    split = json.loads((out / "summary.json").read_text())["time_split"]
    assert set(split) == {*TIME_PARTS, "other", "total", "instruments_share"}
    assert all(split[k] >= 0.0 for k in (*TIME_PARTS, "other"))
    assert split["train"] > 0 and split["evaluation"] > 0 and split["stability"] > 0  # evaluated at steps 1, 3
    assert split["health_probe"] == 0.0  # no probe at this config's interval
    assert sum(split[k] for k in (*TIME_PARTS, "other")) == pytest.approx(split["total"], rel=1e-9)
    assert split["total"] >= result.summary["wall_time"]  # set-up and the initial evaluation included
    assert split["instruments_share"] == pytest.approx(sum(split[k] for k in INSTRUMENT_PARTS) / split["total"])


def test_health_probe_seconds_are_the_probe_alone():
    """`EPPath.last_probe_seconds`: the probe's own time inside a health step, 0 on other steps."""
    from ept_hw.model import EquilibriumTransformer
    from ept_hw.projection import digital_factory
    from trainer.twin import build_ep_path

    cfg = load_run_config("tiny", {"mode": "ep", "model": {"vocab_size": 20, "width": 16, "heads": 2, "context": 8},
                                   "training": {"seq_len": 8}})
    model = EquilibriumTransformer(cfg.model, digital_factory, torch.Generator().manual_seed(0))
    path = build_ep_path("twin", model, cfg, analog=False, probe_seed=5)
    idx = torch.randint(0, 20, (4, 8), generator=torch.Generator().manual_seed(1))
    start = time.perf_counter()
    out = path.train_step(idx, idx, 0.01, health=True)
    whole = time.perf_counter() - start
    assert out.health and 0.0 < path.last_probe_seconds < whole
    path.train_step(idx, idx, 0.01, health=False)
    assert path.last_probe_seconds == 0.0


def test_final_evaluation_on_the_fixed_validation_set(tmp_path, text_file):
    """The final figure is every path on the same fixed windows: the twin's equals one evaluation of
    all windows at once, the gap is analog − twin, and the bigram is scored on exactly those pairs."""
    from trainer.data import bigram_log_probs, fixed_windows
    from trainer.loop import load_run

    cfg = small_config(text_file, mode="compare", analog={"device": "ideal", "periphery": "perfect"},
                       training={"steps": 2, "eval_interval": 2, "final_eval_tokens": 300})
    result = run(cfg, tmp_path / "fe")
    fe = result.summary["final_eval"]
    assert result.summary["time_split"]["final_evaluation"] > 0  # an instrument in the time split
    assert fe["tokens"] == 304 and fe["windows"] == 38 and fe["chunks"] == 16  # ceil(300 / 8) windows of 8
    assert result.summary["final_val_loss"] == fe["loss"]
    assert fe["gap"] == pytest.approx(fe["loss"]["analog"] - fe["loss"]["twin"], abs=1e-9)
    assert fe["stderr"]["twin"] > 0 and fe["gap_stderr"] >= 0
    cfg2, data, paths = load_run(tmp_path / "fe")
    idx, tgt = fixed_windows(data.val, 8, 300)
    assert paths["twin"].evaluate([(idx, tgt)]) == pytest.approx(fe["loss"]["twin"], abs=1e-5)
    log_p = bigram_log_probs(data.train, data.vocab_size)
    assert fe["bigram_loss"] == pytest.approx(float(-log_p[idx.reshape(-1), tgt.reshape(-1)].mean()), rel=1e-12)
    # off by default: the final figure is the last logged evaluation
    assert "final_eval" not in run(small_config(text_file, mode="ep", training={"steps": 2, "eval_interval": 2}),
                                   tmp_path / "off").summary


def test_evaluation_stacks_batches_of_one_shape():
    """`EPPath.evaluate` relaxes equal-shape batches as one stack: on the twin the loss equals the
    mean of the batches' own evaluations (to the relaxation's tolerance), and it is not any one of them."""
    from ept_hw.model import EquilibriumTransformer
    from ept_hw.projection import digital_factory
    from trainer.twin import build_ep_path

    cfg = load_run_config("tiny", {"mode": "ep", "model": {"vocab_size": 20, "width": 16, "heads": 2, "context": 8},
                                   "training": {"seq_len": 8}})
    model = EquilibriumTransformer(cfg.model, digital_factory, torch.Generator().manual_seed(0))
    path = build_ep_path("twin", model, cfg, analog=False, probe_seed=5)
    gen = torch.Generator().manual_seed(3)
    batches = [(torch.randint(0, 20, (4, 8), generator=gen), torch.randint(0, 20, (4, 8), generator=gen))
               for _ in range(3)]
    each = [path.evaluate([b]) for b in batches]
    stacked = path.evaluate(batches)
    assert stacked == pytest.approx(sum(each) / 3, abs=1e-4)
    assert min(abs(stacked - e) for e in each) > 1e-3
