"""A compare run whose twin trains in a forked worker (`trainer.parallel`) equals the serial run."""

from __future__ import annotations

import json
import math
import multiprocessing

import pytest
import torch

from experiments.presets import load_run_config
from trainer.config import merge
from trainer.data import embedded_works
from trainer.loop import run
from trainer.parallel import RemotePath, WorkerDied, parallel_reason

pytestmark = pytest.mark.skipif(parallel_reason(True, 2, "cpu") is not None,
                                reason=f"no parallel paths here: {parallel_reason(True, 2, 'cpu')}")


def _cfg(steps: int = 6):
    """A noisy pulsed device (ECRAM, preset periphery), so the analog path draws from its generators."""
    return load_run_config("tiny", merge({
        "model": {"context": 8, "width": 16, "heads": 2, "ffn_mult": 2},
        "training": {"batch_size": 4, "seq_len": 8, "eval_batches": 1},
        "solver": {"max_steps": 60},
        "estimator": {"t2": 6, "beta": 3.2},
    }, {
        "mode": "compare", "data": {"source": str(embedded_works()["hamlet"][0])},
        "analog": {"device": "ecram"},
        "training": {"steps": steps, "eval_interval": 3, "health_interval": 2, "checkpoint_interval": 3,
                     "final_eval_tokens": 256},
    }))


def _rows(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for r in rows:
        r.pop("wall_time", None)
    return rows


def test_parallel_compare_is_bit_identical_to_serial(tmp_path):
    cfg = _cfg()
    serial = run(cfg, tmp_path / "serial", parallel_paths=False)
    par = run(cfg, tmp_path / "par", parallel_paths=True)
    assert _rows(tmp_path / "serial") == _rows(tmp_path / "par")
    assert serial.summary["final_eval"] == par.summary["final_eval"]
    # the parent's twin got the worker's final state back
    for name in ("analog", "twin"):
        ws, wp = serial.paths[name].model, par.paths[name].model
        assert not isinstance(par.paths[name], RemotePath)
        for k, proj in ws.projections.items():
            assert torch.equal(proj.weight, wp.projections[k].weight), (name, k)
    # a resumed parallel run continues exactly as the uninterrupted one
    cut = run(cfg, tmp_path / "cut", stop_after=4, parallel_paths=True)
    assert cut.steps_completed == 4
    run(None, tmp_path / "cut", resume=True, parallel_paths=True)
    assert _rows(tmp_path / "cut") == _rows(tmp_path / "serial")


def test_parallel_time_split_adds_up(tmp_path):
    res = run(_cfg(4), tmp_path / "r", parallel_paths=True)
    split = res.summary["time_split"]
    parts = sum(v for k, v in split.items() if k not in ("total", "instruments_share"))
    assert parts == pytest.approx(split["total"], rel=1e-6)
    assert split["train"] > 0 and split["evaluation"] > 0 and split["health_probe"] > 0


class _Boom:
    name, cfg, analog = "boom", None, False

    def fail(self):
        raise FloatingPointError("non-finite state")

    def state_dict(self):
        return {}


def _fail(path):
    return path.fail()


def _die(path):
    import os
    os._exit(3)


def test_worker_errors_reach_the_parent():
    p = RemotePath(_Boom())
    with pytest.raises(FloatingPointError, match="non-finite"):
        p.run(_fail)
    with pytest.raises(WorkerDied, match="ended"):
        p.run(_die)
    p.close()


def test_parallel_reason_names_why_not():
    assert parallel_reason(False, 2, "cpu") == "parallel paths are off (--serial)"
    assert parallel_reason(True, 1, "cpu") == "one path"
    assert "meta" in parallel_reason(True, 2, "meta")
