"""`ept-hw stability` on a tiny run: sane numbers at init-like weights, files written, clear errors."""

from __future__ import annotations

import json

import pytest

from experiments.cli import main
from experiments.commands.stability import stability_of_run
from experiments.presets import load_run_config
from trainer.config import merge
from trainer.data import embedded_works
from trainer.loop import run

SMALL = {
    "model": {"context": 8, "width": 16, "heads": 2, "ffn_mult": 2},
    "training": {"steps": 2, "batch_size": 4, "seq_len": 8, "eval_interval": 2, "eval_batches": 1,
                 "checkpoint_interval": 2, "stability_every": 0},
    "solver": {"max_steps": 60},
    "estimator": {"t2": 6, "beta": 3.2},
}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    text = str(embedded_works()["hamlet"][0])
    cfg = load_run_config("tiny", merge(SMALL, {"data": {"source": text}, "mode": "compare",
                                                "analog": {"device": "ideal", "periphery": "perfect"}}))
    out = tmp_path_factory.mktemp("runs") / "tiny"
    assert run(cfg, out).exit_code == 0
    return out


def test_stability_of_a_tiny_run(tiny_run):
    res = stability_of_run(tiny_run, samples=2, steps=200, alphas=(1.0, 0.0))
    assert res["checkpoint_step"] == 2
    assert res["seconds"] < 30  # measured ~1.5 s for both paths
    for name in ("analog", "twin"):
        r = res["paths"][name]
        op = r["operating_point"]
        assert op["label"] == "z*" and op["converged"] and op["residual_max"] <= 1e-4
        assert r["verdict"] == "converged"
        assert -5.0 < r["re_mu"] < -0.5  # a damped block after 2 steps: strongly attracting
        assert 1 + 0.1 * r["re_mu"] - 1e-4 <= r["abs_lambda"] < 1.0
        assert [k["alpha"] for k in r["knockout"]] == [1.0, 0.0]
        assert all(k["verdict"] == "converged" for k in r["knockout"])
    assert "read-out" in res["paths"]["analog"]["weights"]
    saved = json.loads((tiny_run / "stability" / "stability.json").read_text())
    assert saved["paths"]["twin"]["re_mu"] == pytest.approx(res["paths"]["twin"]["re_mu"])
    assert "verdict converged" in (tiny_run / "stability" / "stability.txt").read_text()


def test_cli_checkpoint_and_errors(tiny_run, tmp_path, capsys):
    assert main(["stability", str(tiny_run), "--checkpoint", "2", "--samples", "1", "--steps", "100",
                 "--alphas", "1"]) == 0
    assert "Re mu" in capsys.readouterr().out
    assert main(["stability", str(tiny_run), "--checkpoint", "7"]) == 2
    assert "keeps its two latest checkpoints (steps 0, 2)" in capsys.readouterr().err
    assert main(["stability", str(tmp_path / "nope")]) == 2
    assert "is not a run directory" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="not a run directory"):
        stability_of_run(tmp_path / "nope")
