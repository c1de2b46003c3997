"""trainer.evaluate / `ept-hw evaluate`: retention of a tiny trained PCM run end to end, the
evaluation's own files only, and bad input (no analog weights, no drift model) with exit 2."""

from __future__ import annotations

import hashlib
import json
import math

import pytest

from ept_hw.config import ConfigError
from experiments.cli import main
from experiments.presets import load_run_config
from trainer.config import merge
from trainer.data import embedded_works
from trainer.evaluate import evaluate_retention, read_evaluation, retention_line
from trainer.loop import run

SMALL = {
    "model": {"context": 8, "width": 16, "heads": 2, "ffn_mult": 2},
    "training": {"steps": 2, "batch_size": 4, "seq_len": 8, "eval_interval": 2, "eval_batches": 1,
                 "checkpoint_interval": 2, "stability_every": 0},
    "solver": {"max_steps": 60},
    "estimator": {"t2": 6, "beta": 3.2},
}


def _config(**overrides):
    return load_run_config("tiny", merge(merge(SMALL, {"data": {"source": str(embedded_works()["hamlet"][0])}}),
                                         overrides))


def _hashes(run_dir):
    return {str(p.relative_to(run_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in run_dir.rglob("*") if p.is_file() and "evaluation" not in p.parts}


@pytest.fixture(scope="module")
def pcm_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "pcm"
    run(_config(mode="compare", analog={"device": "pcm"}), out)
    return out


def test_evaluate_writes_loss_vs_time_and_nothing_else(pcm_run, tmp_path):
    from experiments.spec import export_spec

    assert "## Retention" not in export_spec(pcm_run, tmp_path / "spec0", pulse_response=False).markdown_path.read_text()
    before = _hashes(pcm_run)
    doc = evaluate_retention(pcm_run, [1, 3600, 31536000], seeds=2)
    assert _hashes(pcm_run) == before  # the run's own files are untouched
    assert (pcm_run / "evaluation" / "evaluation.json").is_file()
    assert (pcm_run / "evaluation" / "retention.png").stat().st_size > 1000
    entry = doc["evaluations"]["no_compensation"]
    assert entry["times_s"] == [0.0, 1.0, 3600.0, 31536000.0]
    assert len(entry["loss_per_seed"]) == 2 and all(len(r) == 4 for r in entry["loss_per_seed"])
    assert all(math.isfinite(v) and 2.0 < v < 8.0 for v in entry["loss_mean"])
    # the chips are noisy: two seeds do not give the same losses
    assert entry["loss_per_seed"][0] != entry["loss_per_seed"][1]
    assert doc["noise_model_applies_to"] == "pcm_pair"
    # the second setting adds its entry beside the first
    evaluate_retention(pcm_run, [31536000], seeds=1, drift_compensation=True)
    saved = read_evaluation(pcm_run)
    assert set(saved["evaluations"]) == {"no_compensation", "global_drift_compensation"}
    assert saved["evaluations"]["no_compensation"] == json.loads(json.dumps(entry))
    line = retention_line(saved)
    assert "after 1 year with global drift compensation" in line and "without drift compensation" in line
    md = export_spec(pcm_run, tmp_path / "spec1", pulse_response=False).markdown_path.read_text()
    assert "## Retention" in md and line in md


def test_cli_evaluate_and_bad_input(pcm_run, tmp_path, capsys):
    assert main(["evaluate", str(pcm_run), "--times", "1,86400", "--seeds", "1"]) == 0
    assert "t =        86400 s" in capsys.readouterr().out
    assert main(["evaluate", str(pcm_run), "--times", "1,-5"]) == 2
    assert "times" in capsys.readouterr().err
    assert main(["evaluate", str(tmp_path / "missing")]) == 2

    ideal = tmp_path / "ideal"
    run(_config(mode="compare", analog={"device": "ideal", "periphery": "perfect"}, training={"steps": 1}), ideal)
    before = _hashes(ideal)
    assert main(["evaluate", str(ideal), "--times", "1"]) == 2
    err = capsys.readouterr().err
    assert "analog.device" in err and "drift model" in err
    assert not (ideal / "evaluation").exists() and _hashes(ideal) == before

    twin = tmp_path / "twin"
    run(_config(mode="ep", path="twin", training={"steps": 1}), twin)
    with pytest.raises(ConfigError, match="mode"):
        evaluate_retention(twin, [1])
    assert main(["evaluate", str(twin)]) == 2 and "analog weights" in capsys.readouterr().err
    assert not (twin / "evaluation").exists()


def test_retention_line_without_evaluation():
    assert retention_line(None) is None
