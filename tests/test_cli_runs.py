"""Runs a collaborator can trust (issue 12): self-contained run directories, `--out` rules and the
lock, atomic creation and Ctrl-C, checkpoint fallback, escaped report tables, path errors and the
CLI conventions. Bad-input tests assert the exit code, that the message names the file or key,
and that nothing outside the run's own folder changed."""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import signal
import sys
import tomllib

import pytest

from experiments.cli import build_parser, main
from experiments.presets import load_run_config
from trainer.data import embedded_works
from trainer.loop import EXIT_INTERRUPTED, run
from trainer.rundir import RunDirectory, RunLock

SMALL = ["--set", "model.context=8", "--set", "model.width=16", "--seq-len", "8", "--batch-size", "4",
         "--set", "training.eval_interval=2", "--set", "training.eval_batches=1", "--set", "solver.max_steps=60",
         "--set", "estimator.t2=6", "--set", "training.stability_every=0", "--no-progress"]
SMALL_CFG = {"model": {"context": 8, "width": 16},
             "training": {"seq_len": 8, "batch_size": 4, "eval_interval": 2, "eval_batches": 1, "stability_every": 0,
                          "checkpoint_interval": 2},
             "solver": {"max_steps": 60}, "estimator": {"t2": 6}}
DEVICE = '[device]\nmodel = "soft_bounds"\ndw_min = 0.002\nup_down = 0.0\n'


def snapshot(folder):
    """Every file under `folder` with its modification time and size."""
    return {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in folder.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def text_file():
    return str(embedded_works()["macbeth"][0])


@pytest.fixture(scope="module")
def dev_run(tmp_path_factory, text_file):
    """A compare run from a user device file named with a `|`, interrupted after 2 of 4 steps;
    the device file is then edited and moved away."""
    root = tmp_path_factory.mktemp("selfcontained")
    dev = root / "src" / "dev|x.toml"
    dev.parent.mkdir()
    dev.write_text(DEVICE)
    cfg = load_run_config("tiny", {**SMALL_CFG, "mode": "compare", "training": {**SMALL_CFG["training"], "steps": 4},
                                   "analog": {"device": str(dev)}, "data": {"source": text_file}})
    out = root / "run"
    result = run(cfg, out, stop_after=2)
    assert result.steps_completed == 2
    dev.write_text(DEVICE.replace("0.002", "0.05").replace("0.0\n", "0.6\n"))  # edited ...
    shutil.move(str(dev), str(root / "elsewhere.toml"))  # ... and moved
    return out


# ------------------------------------------------------------------ 1. self-contained runs


def test_run_keeps_its_own_device_and_provenance_and_resumes_without_the_file(dev_run, tmp_path, monkeypatch, capsys):
    rd = RunDirectory(dev_run)
    tile = rd.tile_config()
    assert tile is not None and isinstance(tile.device, dict)  # a table, not a path
    assert tile.device_config().dw_min == 0.002 and tile.device_config().up_down == 0.0
    prov = rd.read_provenance()
    for key in ("package_version", "git_commit", "torch_version", "command_line", "seed", "start_time", "config_hash",
                "tile_hash"):
        assert key in prov
    from ept_hw.config import config_hash

    assert prov["tile_hash"] == config_hash(tile)
    assert prov["device_source"]["as_given"].endswith("dev|x.toml") and len(prov["device_source"]["sha256"]) == 64
    monkeypatch.chdir(tmp_path)  # another folder; the device file is gone and was edited
    assert main(["compare", "--resume", "--out", str(dev_run), "--no-progress"]) == 0
    assert "steps completed: 4" in capsys.readouterr().out
    assert rd.tile_config() == tile
    assert main(["sample", str(dev_run), "--prompt", "Th", "--length", "5", "--path", "analog", "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("Th") and "analog path" in captured.err and "step 4" in captured.err
    events = [json.loads(line) for line in rd.events_path.read_text().splitlines()]
    assert events[-1]["event"] == "resumed" and events[-1]["step"] == 2


def test_spec_export_reports_the_device_the_run_trained_with(dev_run, tmp_path):
    """The device file was edited (dw_min 0.002 -> 0.05, up_down 0 -> 0.6) and moved after the run
    started: the spec must carry the parameters the run trained with, from the run's own copy."""
    from experiments.spec import export_spec

    spec = export_spec(dev_run, tmp_path / "spec", pulse_response=False).spec
    params = spec["device"]["parameters"]
    assert params["dw_min"]["value"] == 0.002 and params["up_down"]["value"] == 0.0


def test_spec_ignores_a_device_file_edited_in_place(tmp_path, text_file):
    """Same path, new content: the fit details of the edited file must not enter the spec."""
    from experiments.spec import export_spec

    dev = tmp_path / "dev.toml"
    dev.write_text(DEVICE + "[fit]\ntrajectory_rms = 0.01\n")
    cfg = load_run_config("tiny", {**SMALL_CFG, "mode": "compare", "training": {**SMALL_CFG["training"], "steps": 2},
                                   "analog": {"device": str(dev)}, "data": {"source": text_file}})
    out = tmp_path / "run"
    run(cfg, out)
    before = export_spec(out, tmp_path / "spec0", pulse_response=False).spec
    assert before["device"]["source"]["fit_error"]["value"] == 0.01
    dev.write_text(DEVICE.replace("0.002", "0.05") + "[fit]\ntrajectory_rms = 0.5\n")
    after = export_spec(out, tmp_path / "spec1", pulse_response=False).spec
    assert after["device"]["parameters"]["dw_min"]["value"] == 0.002
    assert after["device"]["source"]["fit_error"] is None


# ------------------------------------------------------------------ 2. --out rules and the lock


def test_out_into_a_directory_with_other_files_is_refused_and_nothing_written(tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    before = snapshot(tmp_path)
    assert main(["train", "--model", "tiny", "--out", str(mine), *SMALL]) == 2
    err = capsys.readouterr().err
    assert str(mine) in err and "other files" in err
    assert snapshot(tmp_path) == before and sorted(p.name for p in tmp_path.iterdir()) == ["mine"]


def test_out_under_a_file_is_a_clear_error(tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    before = snapshot(tmp_path)
    assert main(["train", "--model", "tiny", "--out", str(f / "sub"), *SMALL]) == 2
    err = capsys.readouterr().err
    assert "is a file, not a directory" in err and str(f) in err and "Traceback" not in err
    assert snapshot(tmp_path) == before


def test_out_root_is_refused(capsys):
    assert main(["train", "--model", "tiny", "--out", "/", *SMALL]) == 2
    assert "other files" in capsys.readouterr().err


def test_omitted_out_picks_runs_command_n_and_a_stale_staging_folder_is_cleared(tmp_path, monkeypatch, text_file, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "train-1").mkdir(parents=True)  # taken
    (tmp_path / "runs" / ".train-2.staging").mkdir()  # left by a killed process: skipped by the name picker
    assert main(["train", "--model", "tiny", "--data", text_file, "--steps", "1", *SMALL]) == 0
    assert "run directory: runs/train-3" in capsys.readouterr().out
    assert RunDirectory(tmp_path / "runs" / "train-3").has_checkpoint()
    assert not (tmp_path / "runs" / ".train-3.staging").exists()


def test_a_second_process_on_the_same_run_is_refused_naming_the_holder(dev_run, capsys):
    before = snapshot(dev_run)
    with RunLock(dev_run):
        assert main(["compare", "--resume", "--out", str(dev_run), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"in use by process {os.getpid()}" in err and str(dev_run) in err
    assert snapshot(dev_run) == before
    assert not (dev_run / ".lock").exists()


# ------------------------------------------------------------------ 3. atomic creation, Ctrl-C


@pytest.mark.parametrize("exc,code", [(ValueError("dw_min = 0 found when the arrays are built"), 2),
                                      (KeyboardInterrupt(), 130)])
def test_a_failed_start_leaves_nothing(tmp_path, text_file, monkeypatch, capsys, exc, code):
    import trainer.loop as loop

    def fail(*a, **k):  # called inside the staging folder, after config.toml and tokenizer.json were written
        raise exc

    monkeypatch.setattr(loop, "physics_notes", fail)
    out = tmp_path / "runs" / "new"
    assert main(["train", "--model", "tiny", "--data", text_file, "--out", str(out), *SMALL]) == code
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert list(tmp_path.iterdir()) == []  # not even runs/ (created for the run, removed with it)


def test_ctrl_c_during_setup_ends_after_the_first_step_with_a_checkpoint(tmp_path, text_file, monkeypatch, capsys):
    import trainer.loop as loop

    real = loop.prepare_data

    def prepare_and_interrupt(*a, **k):
        signal.raise_signal(signal.SIGINT)  # Ctrl-C while the data is being prepared
        return real(*a, **k)

    monkeypatch.setattr(loop, "prepare_data", prepare_and_interrupt)
    out = tmp_path / "int"
    assert main(["train", "--model", "tiny", "--data", text_file, "--steps", "50", "--out", str(out), *SMALL]) \
        == EXIT_INTERRUPTED
    assert "interrupted at step 1" in capsys.readouterr().out
    ck, path = RunDirectory(out).load_checkpoint()
    assert ck["step"] == 1 and path.name == "last.pt"


# ------------------------------------------------------------------ 4. corrupt files


def test_corrupt_latest_checkpoint_and_torn_metrics_are_named_and_survived(dev_run, tmp_path, capsys, caplog):
    run_copy = tmp_path / "copy"
    shutil.copytree(dev_run, run_copy)
    rd = RunDirectory(run_copy)
    from trainer.checkpoint import load_checkpoint

    prev_step = load_checkpoint(rd.previous_checkpoint_path)["step"]
    data = rd.latest_checkpoint_path.read_bytes()
    rd.latest_checkpoint_path.write_bytes(data[: len(data) // 3])
    with rd.metrics_path.open("a") as fh:
        fh.write('{"step": 4, "lr": 0.3, "wall_ti')
    with caplog.at_level(logging.WARNING):
        assert main(["sample", str(run_copy), "--prompt", "Th", "--length", "3", "--no-progress"]) == 0
        assert f"step {prev_step} (previous.pt)" in capsys.readouterr().err
        assert main(["report", str(run_copy)]) == 0
    assert "last.pt" in caplog.text and "corrupt" in caplog.text
    assert "metrics.jsonl" in caplog.text and "torn" in caplog.text


def test_init_ckpt_directory_is_not_called_missing(dev_run, tmp_path, capsys):
    assert main(["train", "--model", "tiny", "--init-ckpt", str(dev_run), "--out", str(tmp_path / "x"), *SMALL]) == 2
    err = capsys.readouterr().err
    assert "is a directory" in err and "does not exist" not in err
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------ 7. the report's tables


def test_report_tables_survive_a_pipe_and_list_device_and_periphery(dev_run):
    from markdown_it import MarkdownIt

    report = RunDirectory(dev_run).path / "report.md"
    assert main(["report", str(dev_run)]) == 0
    tokens = MarkdownIt("commonmark").enable("table").parse(report.read_text())
    tables, cells, row = [], [], None
    for tok in tokens:
        if tok.type == "table_open":
            tables.append([])
        elif tok.type == "tr_open":
            row = []
        elif tok.type == "inline" and row is not None:
            row.append(tok.content)
        elif tok.type == "tr_close":
            tables[-1].append(row)
            cells += row
            row = None
    assert len(tables) >= 2
    for t in tables:
        assert len({len(r) for r in t}) == 1  # every row as wide as the header: no cell lost to a `|`
    device = next(t for t in tables if t[0] == ["parameter", "value"])
    values = {r[0]: r[1] for r in device[1:]}
    assert values["source (as given to --device)"].endswith("dev|x.toml")  # the `|` is in the cell, unescaped
    assert values["device.dw_min"] == "0.002" and values["device model"] == "soft_bounds"
    assert "forward.out_noise" in values and "update.desired_bl" in values


# ------------------------------------------------------------------ 8. path errors, broken pipe


def test_broken_pipe_exits_quietly(monkeypatch):
    class ClosedPipe(io.StringIO):
        def write(self, s):
            raise BrokenPipeError(32, "Broken pipe")

        def fileno(self):
            return os.open(os.devnull, os.O_WRONLY)

    monkeypatch.setattr(sys, "stdout", ClosedPipe())
    assert main(["devices"]) == 141


# ------------------------------------------------------------------ 9. conventions


def test_version_and_defaults_in_every_help(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0 and capsys.readouterr().out.startswith("ept-hw ")
    import argparse

    parser = build_parser()
    subparsers = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)][0]
    missing = []
    # sweep and spec are another engineer's commands (issue 14): their numeric flags' help is theirs
    todo = [(n, p) for n, p in subparsers.choices.items() if n not in ("sweep", "spec")]
    while todo:
        name, sub = todo.pop()
        for action in sub._actions:
            if isinstance(action, argparse._SubParsersAction):
                todo += [(f"{name} {n}", p) for n, p in action.choices.items()]
                continue
            if not action.option_strings or action.dest == "help":
                continue
            text = sub.formatter_class(prog="x")._get_help_string(action) or ""
            if action.type in (int, float) and not action.help:
                missing.append(f"{name} {action.option_strings[0]}: no help")
            if action.default not in (None, False, [], argparse.SUPPRESS) and "default" not in text:
                missing.append(f"{name} {action.option_strings[0]}: default not shown")
    assert not missing, missing


def test_devices_lists_presets_with_key_figures_and_models(capsys):
    assert main(["devices", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    presets = {p["name"]: p for p in data["presets"]}
    assert "perfect_ideal" in presets and presets["perfect_ideal"]["adc_bits"] is None
    assert presets["reram_sb"]["states"] == pytest.approx(1000.0)
    assert presets["reram_sb"]["adc_bits"] == pytest.approx(9.0)
    assert {m["model"] for m in data["models"]} >= {"soft_bounds", "linear_step", "exp_step", "pow_step"}


def test_set_of_a_key_given_by_its_own_option_is_refused(tmp_path, capsys):
    assert main(["train", "--model", "tiny", "--steps", "3", "--set", "training.steps=5", "--out",
                 str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "training.steps" in err and "--steps" in err
    assert list(tmp_path.iterdir()) == []


def test_config_file_of_a_previous_run_starts_a_new_run_with_json(dev_run, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "again"
    assert main(["compare", "--config", str(dev_run / "config.toml"), "--steps", "1", "--out", str(out), "--json",
                 "--no-progress"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["run_dir"] == str(out) and summary["steps_completed"] == 1
    assert set(summary["final_val_loss"]) == {"analog", "twin"}
    assert summary["analog_counters"]["n_weights"] > 0
    assert RunDirectory(out).tile_config() == RunDirectory(dev_run).tile_config()  # not the moved file
    saved = tomllib.loads((out / "config.toml").read_text())
    assert saved["training"]["steps"] == 1 and saved["model"]["width"] == 16


def test_divergence_at_the_first_step_points_to_a_checkpoint_that_exists(tmp_path, text_file, capsys):
    out = tmp_path / "div"
    rc = main(["train", "--model", "tiny", "--optimizer", "adamw", "--lr", "1000", "--data", text_file, "--steps", "20",
               "--set", "divergence.window=2", "--out", str(out), *SMALL])
    printed = capsys.readouterr().out
    assert rc == 3 and "DIVERGED" in printed
    ck, _ = RunDirectory(out).load_checkpoint()
    step = json.loads((out / "summary.json").read_text())["divergence"]["last_good_checkpoint_step"]
    assert ck["step"] == step  # the checkpoint the message refers to is on disk
    if step == 0:
        assert "initial weights" in printed
    assert "--optimizer adamw ran with lr 1000" in printed and "--lr 1e-3" in printed


@pytest.mark.parametrize("warmup", [0, 5])
def test_sgd_divergence_hint_suggests_a_warmup_only_without_one(tmp_path, text_file, capsys, warmup):
    out = tmp_path / "div"
    rc = main(["train", "--model", "tiny", "--lr", "1000", "--data", text_file, "--steps", "20",
               "--set", "divergence.window=2", "--set", f"training.schedule.warmup_steps={warmup}",
               "--out", str(out), *SMALL])
    printed = capsys.readouterr().out
    assert rc == 3 and "Lower --lr (it was 1000)" in printed
    assert ("training.schedule.warmup_steps=50" in printed) == (warmup == 0)
