"""Device-spec export: schema validation, derived figures, sweep requirements, clear errors."""

from __future__ import annotations

import copy
import json
import math
import shutil
from pathlib import Path

import pytest

from ept_hw.config import save_toml
from experiments.spec import (
    IncompleteRunError, SpecValidationError, build_spec, check_run_dir, device_source, export_spec, load_schema,
    validate_spec,
)
from experiments.sweep import sweep_rows, write_tables
from trainer.metrics import empty_row

STEPS = 10
BATCH, SEQ = 4, 16
N_WEIGHTS = 1000
SEEDS = 3


def _write_run(run_dir: Path, device: str = "reram_sb", gap: float = 0.1, pulses_per_step: float = 500.0,
               adc_per_step: float = 6400.0, free_steps: int = 40, steps: int = STEPS) -> Path:
    """A `compare` run directory as the trainer writes it (config.toml, metrics.jsonl, summary.json)."""
    run_dir.mkdir(parents=True)
    save_toml(run_dir / "config.toml", {
        "mode": "compare", "seed": 0,
        "training": {"steps": steps, "batch_size": BATCH, "seq_len": SEQ, "lr": 0.3},
        "solver": {"method": "euler", "eps": 0.1},
        "analog": {"device": device, "periphery": "default", "tile": {"noise_mode": "common", "n_reads": 2}},
    })
    lines = []
    for step in range(steps):
        row = empty_row(step)
        row["twin_loss"] = 3.0 - 0.05 * step
        row["analog_loss"] = row["twin_loss"] + gap * step / steps
        row["analog_pulses"] = pulses_per_step * (step + 1)
        row["analog_adc_conversions"] = adc_per_step * (step + 1)
        row["analog_free_steps"] = free_steps + (step % 2) * 10  # mean free_steps + 5
        if step % 5 == 4:
            row["twin_val_loss"] = 2.9 - 0.05 * step
            row["analog_val_loss"] = row["twin_val_loss"] + gap
        lines.append(json.dumps(row))
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    (run_dir / "summary.json").write_text(json.dumps({
        "mode": "compare", "steps_completed": steps, "unigram_entropy": 3.1,
        "analog_counters": {"n_weights": N_WEIGHTS, "max_pulses_per_device": 37},
    }))
    return run_dir


def test_run_export_validates_and_derives_figures(tmp_path):
    run = _write_run(tmp_path / "runs" / "demo")
    result = export_spec(run, tmp_path / "out", pdf=True, pulse_response=True)
    spec = json.loads(result.spec_path.read_text())
    validate_spec(spec)
    assert spec["schema_version"] == "1.1.0"
    assert spec["device"]["model"] == "soft_bounds_reference"
    assert spec["device"]["parameters"]["dw_min"] == {"value": 0.002, "unit": "weight units per pulse"}
    assert spec["device"]["source"]["kind"] == "preset" and spec["device"]["source"]["stand_in"] is True
    d = spec["derived"]
    assert d["number_of_states"]["value"] == pytest.approx(2.0 / 0.002)  # (1.25 + 0.75)/dw_min
    assert d["endurance"]["value"] == 37
    assert d["pulses_per_device_per_step"]["value"] == pytest.approx(500.0 / N_WEIGHTS)
    assert d["adc_conversions_per_token"]["value"] == pytest.approx(6400.0 / (BATCH * SEQ))
    assert d["settling_time"]["value"] == pytest.approx(45 * 0.1) and d["settling_time"]["unit"] == "tau"
    # reram_sb is symmetric (up_down = 0): the measured asymmetry of the mean device is small
    assert abs(d["asymmetry"]["value"]) < 0.05
    assert spec["training"]["gap"]["value"] == pytest.approx(0.1)
    per = spec["periphery"]
    assert per["read"]["read_average"]["value"] == 2 and per["read"]["noise_mode"]["value"] == "common"
    # reram_sb's tile preset: aihwkit PresetIOParameters (ADC 1/510 = 9 bits, DAC 1/126 = 7 bits, out_noise 0.1)
    assert per["adc"]["forward.out_res"]["value"] == pytest.approx(1 / 510)
    assert per["adc"]["forward.out_res"]["meaning"].startswith("9.00 bits")
    assert per["dac"]["backward.inp_res"]["meaning"].startswith("7.00 bits")
    assert per["read"]["forward.out_noise"]["value"] == pytest.approx(0.1)
    assert per["update"]["update.desired_bl"]["value"] == 31 and per["algorithm"]["name"] == "sgd"
    assert spec["requirements"]["rows"] == [] and spec["requirements"]["tolerance"] is None
    assert spec["provenance"]["runs"][0]["run_id"] == "demo"
    assert len(spec["provenance"]["runs"][0]["config_hash"]) == 16
    names = sorted(p.name for p in result.plots)
    assert names == ["loss_curves.png", "pulse_response.png"]
    md = result.markdown_path.read_text()
    assert "stand-in" in md and "plots/pulse_response.png" in md and "plots/loss_curves.png" in md
    assert result.pdf_path.read_bytes()[:4] == b"%PDF" and result.pdf_path.stat().st_size > 20_000


def test_broken_spec_fails_validation(tmp_path):
    spec = build_spec(_write_run(tmp_path / "r"))
    validate_spec(spec)
    cases = []
    bad = copy.deepcopy(spec); del bad["device"]["source"]; cases.append(("device", bad))
    bad = copy.deepcopy(spec); bad["schema_version"] = "0.9"; cases.append(("schema_version", bad))
    bad = copy.deepcopy(spec); bad["derived"]["endurance"]["value"] = "many"; cases.append(("endurance", bad))
    bad = copy.deepcopy(spec); bad["device"]["source"]["stand_in"] = False; cases.append(("source", bad))  # a preset is a stand-in
    bad = copy.deepcopy(spec); bad["device"]["source"]["kind"] = "fit"; cases.append(("source", bad))  # a fit needs its error
    bad = copy.deepcopy(spec); bad["provenance"]["runs"][0]["config_hash"] = "xyz"; cases.append(("config_hash", bad))
    bad = copy.deepcopy(spec); bad["surprise"] = 1; cases.append(("top level", bad))
    for where, broken in cases:
        with pytest.raises(SpecValidationError, match=where):
            validate_spec(broken)


def test_schema_is_package_data():
    schema = load_schema()
    assert schema["properties"]["schema_version"]["const"] == "1.1.0"
    import importlib.resources

    assert importlib.resources.files("experiments").joinpath("spec_schema.json").is_file()


def test_missing_pieces_are_named(tmp_path):
    run = _write_run(tmp_path / "r")
    (run / "summary.json").unlink()
    (run / "config.toml").unlink()
    with pytest.raises(IncompleteRunError) as info:
        check_run_dir(run)
    msg = str(info.value)
    assert "config.toml" in msg and "summary.json" in msg and "metrics.jsonl" not in msg
    # a corrupted log and a log without the analog path's validation loss
    run2 = _write_run(tmp_path / "r2")
    rows = [json.loads(l) for l in (run2 / "metrics.jsonl").read_text().splitlines()]
    for r in rows:
        r["analog_val_loss"] = None
    # a torn last line is dropped (the trainer's reader warns, naming the file); the missing loss is named
    (run2 / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n{truncated")
    with pytest.raises(IncompleteRunError, match="analog_val_loss"):
        check_run_dir(run2)
    # a corrupted line before the last is named with its line
    (run2 / "metrics.jsonl").write_text("{truncated\n" + "\n".join(json.dumps(r) for r in rows) + "\n")
    with pytest.raises(IncompleteRunError, match="corrupted metrics.jsonl.*line 1"):
        check_run_dir(run2)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        export_spec(tmp_path / "nowhere", tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing written for a bad source


def test_device_source_kinds(tmp_path):
    fit = tmp_path / "fitted.toml"
    save_toml(fit, {"device": {"model": "soft_bounds", "dw_min": 0.01}, "fit": {"trace": "sample_7", "rmse": 0.012}})
    user = tmp_path / "mine.toml"
    save_toml(user, {"device": {"model": "constant_step", "dw_min": 0.01}})
    s = device_source(str(fit))
    assert s["kind"] == "fit" and s["fit_error"]["value"] == pytest.approx(0.012) and not s["stand_in"]
    assert device_source(str(user))["kind"] == "user_file"
    # the [fit] table that `ept-hw device fit` writes
    fitted = tmp_path / "from_cli.toml"
    save_toml(fitted, {"device": {"model": "soft_bounds", "dw_min": 0.01},
                       "fit": {"source": "trace.csv", "step_rms": 0.3, "trajectory_rms": 0.021}})
    s2 = device_source(str(fitted))
    assert s2["name"] == "trace.csv" and s2["fit_error"]["value"] == pytest.approx(0.021)
    assert s2["fit_error"]["step_rms"] == pytest.approx(0.3)
    assert device_source("ecram")["kind"] == "preset"
    # a run on a fitted device file carries its fit error into the spec
    spec = build_spec(_write_run(tmp_path / "run_fit", device=str(fit)))
    assert spec["device"]["source"]["fit_error"]["value"] == pytest.approx(0.012)
    assert spec["derived"]["number_of_states"]["value"] == pytest.approx(1.2 / 0.01)


def test_ideal_device_has_no_finite_states_and_still_validates(tmp_path):
    result = export_spec(_write_run(tmp_path / "r", device="ideal"), tmp_path / "o")
    d = result.spec["derived"]
    assert d["number_of_states"]["value"] is None and "continuous" in d["number_of_states"]["note"]
    assert [p.name for p in result.plots] == ["loss_curves.png"]  # no pulse response for an ideal device


def _write_sweep(root: Path) -> Path:
    """A sweep directory as `ept-hw sweep` writes it, over ADC bits, with a run per point."""
    root.mkdir(parents=True)
    (root / "sweep_manifest.json").write_text(json.dumps({"context": {"device": "reram_sb"}}))
    gaps = {None: 0.01, 2: 0.8, 4: 0.2, 6: 0.03, 8: 0.02}
    records = []
    for bits, gap in gaps.items():
        pid = "base" if bits is None else f"adc{bits}"
        for k in range(SEEDS):  # three seeds, paired gaps within +-0.002 of the point's gap
            g = gap + 0.002 * (k - 1)
            run = _write_run(root / "runs" / f"{pid}-s{k}", gap=g)
            records.append({"point_id": pid, "seed_index": k, "overrides": {} if bits is None else {"adc_bits": bits},
                            "status": "ok", "analog_val_loss": 2.45 + g, "twin_val_loss": 2.45, "gap": g,
                            "unigram_entropy": 3.1, "steps": STEPS, "run_dir": f"runs/{pid}-s{k}"})
    records.append({"point_id": "adc3", "overrides": {"adc_bits": 3}, "status": "failed", "error": "boom", "gap": None})
    rows = sweep_rows(records, ["adc_bits"], {"adc_bits": 9})
    write_tables(rows, root, {"axes": {"adc_bits": [2, 3, 4, 6, 8]}, "tolerance": 0.05, "base_values": {"adc_bits": 9},
                              "seeds": SEEDS})
    return root


def test_sweep_export_has_requirements_and_gap_plot(tmp_path):
    sweep = _write_sweep(tmp_path / "sweep")
    result = export_spec(sweep, tmp_path / "out", pulse_response=False)
    req = result.spec["requirements"]
    assert req["tolerance"] == {"value": 0.05, "unit": "nats"}
    (row,) = req["rows"]
    assert row["axis"] == "adc_bits" and row["required"] == 6 and row["status"] == "met"
    assert [t["value"] for t in row["tested"]] == [2, 4, 6, 8, 9] and row["failed_values"] == [3]
    assert row["base_value"] == 9 and row["seeds"] == SEEDS and row["steps"] == STEPS
    assert row["interval"]["lo"] < 0.03 < row["interval"]["hi"] and row["how"].startswith("Met at 6")
    roles = sorted(r["role"] for r in result.spec["provenance"]["runs"])
    assert roles == ["sweep_base"] + ["sweep_point"] * 4  # one run (seed 0) per point
    assert result.spec["provenance"]["sweep"]["seeds"] == SEEDS
    assert result.spec["provenance"]["sweep"]["failed_points"] == 1
    assert "gap_vs_adc_bits.png" in [p.name for p in result.plots]
    assert "**6**" in result.markdown_path.read_text()
    # A different tolerance moves the requirement: 0.25 admits 4 bits.
    assert build_spec(sweep, tolerance=0.25)["requirements"]["rows"][0]["required"] == 4


def test_sweep_dir_missing_pieces_are_named(tmp_path):
    sweep = _write_sweep(tmp_path / "sweep")
    shutil.rmtree(sweep / "runs" / "base-s0")
    with pytest.raises(IncompleteRunError, match="base") as info:
        build_spec(sweep)
    assert "does not exist" in str(info.value)
    (sweep / "sweep.json").unlink()
    (sweep / "sweep_manifest.json").unlink()
    with pytest.raises(IncompleteRunError) as info:
        build_spec(sweep)
    assert "sweep.json" in str(info.value) and "sweep_manifest.json" in str(info.value)


def test_endurance_and_device_count_from_the_checkpoint_counters(tmp_path):
    import torch

    run = _write_run(tmp_path / "r")
    summary = json.loads((run / "summary.json").read_text())
    del summary["analog_counters"]
    (run / "summary.json").write_text(json.dumps(summary))
    counts_q = torch.zeros(10, 20, dtype=torch.float64)
    counts_q[3, 4] = 123.0
    counts_o = torch.full((20, 10), 2.0, dtype=torch.float64)
    (run / "checkpoints").mkdir()
    torch.save({"step": STEPS, "paths": {
        "analog": {"model": {"q": {"tile": {"pulse_count": counts_q}}, "o": {"tile": {"pulse_count": counts_o}}}},
        "twin": {"model": {"q": {"pulse_count": torch.full((10, 20), 1e9)}}},  # not the analog path: ignored
    }}, run / "checkpoints" / "last.pt")
    d = build_spec(run)["derived"]
    assert d["endurance"]["value"] == 123.0 and "note" not in d["endurance"]
    # 400 unit cells; all pulses of the last metrics row (500 * STEPS) over cells and steps
    assert d["pulses_per_device_per_step"]["value"] == pytest.approx(500.0 * STEPS / (400 * STEPS))


def test_the_summary_counters_are_read_and_the_checkpoint_only_for_older_runs(tmp_path):
    """A run with the trainer's `analog_counters` summary figure is read from it; the checkpoint
    (here with other counts) is read only when the summary predates that figure."""
    import torch

    run = _write_run(tmp_path / "r")
    (run / "checkpoints").mkdir()
    torch.save({"step": STEPS, "paths": {"analog": {"q": {"pulse_count": torch.full((10, 20), 999.0)}}}},
               run / "checkpoints" / "last.pt")
    assert build_spec(run)["derived"]["endurance"]["value"] == 37  # the summary's, not the checkpoint's 999
    summary = json.loads((run / "summary.json").read_text())
    del summary["analog_counters"]
    (run / "summary.json").write_text(json.dumps(summary))
    assert build_spec(run)["derived"]["endurance"]["value"] == 999.0


def test_cli_export_validate_and_clear_errors(tmp_path, capsys):
    from experiments.cli import main

    run = _write_run(tmp_path / "runs" / "demo")
    assert main(["spec", "export", str(run), "--out", str(tmp_path / "o"), "--no-pulse-response"]) == 0
    assert main(["spec", "validate", str(tmp_path / "o" / "device_spec.json")]) == 0
    assert "valid device spec" in capsys.readouterr().out
    broken = json.loads((tmp_path / "o" / "device_spec.json").read_text())
    broken["derived"]["settling_time"]["unit"] = ""
    (tmp_path / "bad.json").write_text(json.dumps(broken))
    assert main(["spec", "validate", str(tmp_path / "bad.json")]) == 2
    assert "derived/settling_time/unit" in capsys.readouterr().err
    (run / "metrics.jsonl").unlink()
    assert main(["spec", "export", str(run), "--out", str(tmp_path / "o2")]) == 2
    err = capsys.readouterr().err
    assert "metrics.jsonl" in err and "incomplete" in err
    assert not (tmp_path / "o2").exists()


def test_markdown_tables_survive_a_markdown_parser(tmp_path):
    """A `|` in a cell (here in the run's name) stays inside its cell when rendered."""
    markdown_it = pytest.importorskip("markdown_it")  # the dev extra

    run = _write_run(tmp_path / "runs" / "demo|a")
    result = export_spec(run, tmp_path / "out", pulse_response=False)
    md = markdown_it.MarkdownIt("commonmark").enable("table")
    tokens = md.parse(result.markdown_path.read_text())
    tables, cells, current = 0, [], None
    for tok in tokens:
        if tok.type == "table_open":
            tables += 1
        elif tok.type in ("thead_open", "tbody_open"):
            pass
        elif tok.type == "tr_open":
            current = []
        elif tok.type == "inline" and current is not None:
            current.append(tok.content)
        elif tok.type == "tr_close":
            cells.append(current)
            current = None
        elif tok.type == "table_close":
            widths = {len(r) for r in cells}
            assert len(widths) == 1, cells  # every row as wide as the header
            cells = []
    assert tables >= 5
    runs = [t for t in tokens if t.type == "inline" and "demo|a" in t.content]
    assert runs, "the run name with its | is in one cell"


def test_pdf_is_a_document_with_tables_not_monospace_text(tmp_path):
    run = _write_run(tmp_path / "r")
    result = export_spec(run, tmp_path / "out", pdf=True, pulse_response=False)
    data = result.pdf_path.read_bytes()
    import re

    assert data[:4] == b"%PDF" and len(re.findall(rb"/Type\s*/Page[^s]", data)) >= 2
    assert b"Mono" not in data  # the old --pdf was the markdown source in a monospace font


def test_spec_cli_path_errors_and_json(tmp_path, capsys):
    from experiments.cli import main

    run = _write_run(tmp_path / "runs" / "demo")
    (tmp_path / "afile").write_text("x")
    assert main(["spec", "export", str(run), "--out", str(tmp_path / "afile"), "--no-pulse-response"]) == 2
    assert "is a file" in capsys.readouterr().err
    assert main(["spec", "export", str(run), "--out", str(tmp_path / "afile" / "sub"), "--no-pulse-response"]) == 2
    assert "is a file" in capsys.readouterr().err
    assert main(["spec", "validate", str(tmp_path)]) == 2
    assert "is a directory" in capsys.readouterr().err
    assert main(["spec", "export", str(run), "--out", str(tmp_path / "o"), "--no-pulse-response", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["spec"].endswith("device_spec.json") and summary["requirements"] == []
    # a compare run that a sweep was written into: refused, not exported without its requirements
    (run / "sweep.json").write_text("{}")
    assert main(["spec", "export", str(run), "--out", str(tmp_path / "o2"), "--no-pulse-response"]) == 2
    err = capsys.readouterr().err
    assert "both a run" in err and "sweep.json" in err and not (tmp_path / "o2").exists()


def test_spec_carries_the_fixed_set_final_figure(tmp_path):
    """A run with a fixed-set final evaluation: the spec states it (with standard errors and the
    baselines on the same tokens) beside the last logged figures; a run without one gets none."""
    run = _write_run(tmp_path / "runs" / "demo")
    assert not any("fixed_set" in k for k in build_spec(run)["training"])
    summary = json.loads((run / "summary.json").read_text())
    summary["final_eval"] = {"tokens": 32768, "windows": 2048, "chunks": 16, "seq_len": 16,
                             "loss": {"analog": 2.3685, "twin": 2.3191}, "stderr": {"analog": 0.0104, "twin": 0.0116},
                             "gap": 0.0494, "gap_stderr": 0.0022, "bigram_loss": 2.53, "unigram_entropy": 3.2473}
    (run / "summary.json").write_text(json.dumps(summary))
    result = export_spec(run, tmp_path / "out")
    spec = json.loads(result.spec_path.read_text())
    validate_spec(spec)
    tr = spec["training"]
    assert tr["analog_fixed_set_loss"]["value"] == pytest.approx(2.3685)
    assert tr["twin_fixed_set_loss"]["note"] == "standard error 0.0116"
    assert tr["fixed_set_gap"]["value"] == pytest.approx(0.0494) and "32768 tokens" in tr["fixed_set_gap"]["how"]
    assert tr["fixed_set_bigram"]["value"] == pytest.approx(2.53)
    assert tr["fixed_set_unigram_entropy"]["value"] == pytest.approx(3.2473)
    assert tr["gap"]["value"] == pytest.approx(0.1)  # the last logged figure is still there, as labelled
    md = result.markdown_path.read_text()
    assert "| fixed set gap | 0.0494 (standard error 0.0022) | nats |" in md
