"""`trainer.rundir`: the one atomic write, the run layout, two kept checkpoints with fallback, a
torn metrics line."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from trainer.checkpoint import CorruptCheckpointError, load_checkpoint
from trainer.metrics import MetricsLog, empty_row, read_metrics
from trainer.rundir import RunDirectory, atomic_write, atomic_write_json


def test_atomic_write_replaces_whole_and_leaves_no_temp_file(tmp_path):
    target = tmp_path / "a.json"
    atomic_write_json(target, {"x": 1})
    assert json.loads(target.read_text()) == {"x": 1}
    atomic_write(target, "new text")
    assert target.read_text() == "new text"

    def boom(fh):
        fh.write(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(target, boom)
    assert target.read_text() == "new text"  # the old content, not "half"
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_two_latest_checkpoints_kept_and_corrupt_latest_falls_back(tmp_path, caplog):
    rd = RunDirectory(tmp_path / "run")
    for step in (1, 2, 3):
        rd.save_checkpoint({"step": step, "paths": {}})
    assert sorted(p.name for p in rd.checkpoint_dir.iterdir()) == ["last.pt", "previous.pt"]
    ck, path = rd.load_checkpoint()
    assert ck["step"] == 3 and path.name == "last.pt"
    # tear the latest one: the previous is used, and the warning names the torn file
    data = rd.latest_checkpoint_path.read_bytes()
    rd.latest_checkpoint_path.write_bytes(data[: len(data) // 2])
    with caplog.at_level(logging.WARNING):
        ck, path = rd.load_checkpoint()
    assert ck["step"] == 2 and path.name == "previous.pt"
    assert "last.pt" in caplog.text and "previous" in caplog.text
    with pytest.raises(CorruptCheckpointError, match="last.pt"):
        load_checkpoint(rd.latest_checkpoint_path)
    # resuming from the previous one: the next save replaces the corrupt file, the good one stays
    rd.save_checkpoint({"step": 4, "paths": {}})
    assert load_checkpoint(rd.latest_checkpoint_path)["step"] == 4
    assert load_checkpoint(rd.previous_checkpoint_path)["step"] == 2
    rd.latest_checkpoint_path.write_bytes(data[: len(data) // 2])
    rd = RunDirectory(rd.path)
    with pytest.raises(ValueError, match="previous.pt may be used"):
        rd.load_checkpoint(fallback=False)
    rd.previous_checkpoint_path.write_bytes(b"garbage")
    with pytest.raises(ValueError, match="no readable checkpoint"):
        rd.load_checkpoint()


def test_checkpoint_of_a_directory_is_not_called_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="is a directory"):
        load_checkpoint(tmp_path)


def test_torn_last_metrics_line_is_dropped_with_a_warning_naming_the_file(tmp_path, caplog):
    path = tmp_path / "metrics.jsonl"
    with MetricsLog(path) as log:
        for step in range(3):
            log.append(empty_row(step))
    text = path.read_text()
    path.write_text(text + text.splitlines()[0][:40])  # a crash in the middle of a row
    with caplog.at_level(logging.WARNING):
        rows = read_metrics(path)
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert str(path) in caplog.text and "torn" in caplog.text
    # a bad line before the last is corruption, named by file and line
    lines = text.splitlines()
    path.write_text("\n".join([lines[0], "{oops", lines[2]]) + "\n")
    with pytest.raises(ValueError, match=r"metrics.jsonl line 2"):
        read_metrics(path)


def test_summary_config_and_conductances_round_trip(tmp_path):
    rd = RunDirectory(tmp_path / "r")
    assert not rd.is_run() and rd.read_summary() == {}
    rd.write_config({"mode": "compare", "seed": 3})
    assert rd.is_run() and rd.read_config_dict() == {"mode": "compare", "seed": 3}
    rd.write_summary({"a": 1.5})
    assert rd.read_summary() == {"a": 1.5}
    rd.save_conductances("start", {"W": torch.ones(2)})
    rd.save_conductances("end", {"W": torch.zeros(2)})
    c = rd.read_conductances()
    assert torch.equal(c["start"]["W"], torch.ones(2)) and torch.equal(c["end"]["W"], torch.zeros(2))
    sub = rd.subdir("stability")
    assert sub.parent == rd.path
    with pytest.raises(ValueError):
        rd.subdir("../escape")
    assert sorted(p.name for p in rd.path.iterdir()) == ["conductances.pt", "config.toml", "stability", "summary.json"]
