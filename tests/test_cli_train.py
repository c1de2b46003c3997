"""End-to-end CLI: train, compare, report, sample, and clear errors with exit code 2."""

from __future__ import annotations

import json

import pytest

from experiments.cli import main
from trainer.data import embedded_works

SMALL = ["--set", "model.context=8", "--set", "model.width=16", "--seq-len", "8", "--batch-size", "4",
         "--set", "training.eval_interval=2", "--set", "training.eval_batches=1", "--set", "solver.max_steps=60",
         "--set", "estimator.t2=6", "--no-progress"]



@pytest.fixture(scope="module")
def text_file():
    return str(embedded_works()["macbeth"][0])


@pytest.fixture(scope="module")
def trained(tmp_path_factory, text_file):
    out = tmp_path_factory.mktemp("cli") / "run"
    rc = main(["train", "--model", "tiny", "--data", text_file, "--steps", "3", "--out", str(out), *SMALL])
    return rc, out


def test_train_report_sample(trained, capsys):
    rc, out = trained
    assert rc == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert rc == 0 and main(["report", str(out)]) == 0
    report = (out / "report.md").read_text()
    summary = json.loads((out / "summary.json").read_text())
    assert f"{summary['unigram_entropy']:.4f}" in report
    assert (out / "plots" / "loss.png").stat().st_size > 1000
    capsys.readouterr()
    assert main(["sample", str(out), "--prompt", "Thane", "--length", "20", "--top-k", "5"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("Thane") and len(text.rstrip("\n")) >= 25 - 1


def test_compare_with_ideal_device_cli(tmp_path, text_file, capsys):
    out = tmp_path / "cmp"
    rc = main(["compare", "--model", "tiny", "--device", "ideal", "--periphery", "perfect", "--data", text_file,
               "--steps", "2", "--out", str(out), "--report", *SMALL])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "final validation loss (analog)" in printed and "final validation loss (twin)" in printed
    assert (out / "report.md").is_file() and (out / "plots" / "update_cosine.png").is_file()


def test_compare_prints_the_fixed_set_figures(tmp_path, text_file, capsys):
    """With a fixed validation set the printed losses, baselines and gap are those of that set
    (the summary's `final_eval`), not the whole-split unigram/bigram of the run's data."""
    out = tmp_path / "cmp"
    rc = main(["compare", "--model", "tiny", "--device", "ideal", "--periphery", "perfect", "--data", text_file,
               "--steps", "2", "--out", str(out), "--set", "training.final_eval_tokens=512", *SMALL])
    assert rc == 0
    printed = capsys.readouterr().out
    fe = json.loads((out / "summary.json").read_text())["final_eval"]
    assert f"unigram entropy on the fixed validation set ({fe['tokens']} tokens): {fe['unigram_entropy']:.4f}" in printed
    assert f"bigram table (add-0.05, training split) on the fixed validation set ({fe['tokens']} tokens): " \
           f"{fe['bigram_loss']:.4f}" in printed
    for path in ("analog", "twin"):
        assert f"final validation loss ({path}): {fe['loss'][path]:.4f} ± {fe['stderr'][path]:.4f} nats" in printed
    assert f"gap (analog - twin, paired): {fe['gap']:+.4f} ± {fe['gap_stderr']:.4f} nats" in printed
    # the report leads with the same figures; the logged (interim, whole-split) ones follow, labelled
    assert main(["report", str(out)]) == 0
    report = (out / "report.md").read_text()
    fixed = report.index(f"### On the fixed validation set ({fe['tokens']} tokens")
    logs = report.index("### From the run's logs")
    assert fixed < logs < report.index("| validation loss (nats/token) |")
    assert f"**{fe['gap']:+.4f} ± {fe['gap_stderr']:.4f} nats**" in report[fixed:logs]
    assert "Gap analog − twin in the last logged validation loss" in report[logs:]


@pytest.mark.parametrize(
    "argv,message",
    [
        (["train", "--model", "nope", "--out", "{out}"], "model = 'nope'"),
        (["compare", "--model", "tiny", "--device", "unobtainium", "--data", "{data}", "--out", "{out}"], "analog.device"),
        (["train", "--model", "tiny", "--data", "{missing}", "--out", "{out}"], "does not exist"),
        (["train", "--model", "tiny", "--data", "{empty}", "--out", "{out}"], "empty"),
        (["train", "--model", "tiny", "--seq-len", "999", "--data", "{data}", "--out", "{out}"], "training.seq_len"),
        (["train", "--model", "tiny", "--set", "training.nope=1", "--out", "{out}"], "training.nope"),
        (["compare", "--model", "tiny", "--set", "training.optimizer='adamw'", "--out", "{out}"], "training.optimizer"),
    ],
)
def test_bad_input_exits_2_with_a_clear_message(tmp_path, text_file, capsys, argv, message):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    out = tmp_path / "out"
    subs = {"{out}": str(out), "{data}": text_file, "{missing}": str(tmp_path / "missing.txt"), "{empty}": str(empty)}
    rc = main([subs.get(a, a) for a in argv])
    assert rc == 2
    err = capsys.readouterr().err
    assert message in err
    assert not out.exists()  # nothing written


def test_existing_run_dir_is_refused(trained, text_file, capsys):
    _, out = trained
    before = (out / "metrics.jsonl").read_bytes()
    rc = main(["train", "--model", "tiny", "--data", text_file, "--steps", "3", "--out", str(out), *SMALL])
    assert rc == 2 and "already holds a run" in capsys.readouterr().err
    assert (out / "metrics.jsonl").read_bytes() == before


def test_demo_command_prints_the_fixed_set_figures(tmp_path, capsys, monkeypatch):
    """`ept-hw demo` end to end on a shrunk preset: the run, the report, and the learned-vs-unigram
    lines taken on the same fixed validation tokens as the final losses."""
    import experiments.presets as presets

    real = presets.load_run_config

    def shrunk(name, overrides=None):
        assert name == "demo"
        small = {"model": {"width": 16, "context": 8},
                 "training": {"batch_size": 4, "seq_len": 8, "eval_interval": 2, "eval_batches": 1,
                              "final_eval_tokens": 256, "health_interval": 0},
                 "solver": {"max_steps": 40}, "estimator": {"t2": 6, "beta": 9.6}}
        for key, value in (overrides or {}).items():
            small[key] = {**small.get(key, {}), **value} if isinstance(value, dict) else value
        return real(name, small)

    monkeypatch.setattr(presets, "load_run_config", shrunk)
    out = tmp_path / "demo"
    assert main(["demo", "--steps", "2", "--out", str(out), "--no-progress", "--serial"]) == 0
    printed = capsys.readouterr().out
    fe = json.loads((out / "summary.json").read_text())["final_eval"]
    u = fe["unigram_entropy"]
    for path in ("analog", "twin"):
        v = fe["loss"][path]
        assert f"{path}: validation loss {v:.4f} = unigram entropy {u:.4f} - {u - v:.4f} nats" in printed
    assert (out / "report.md").is_file()
