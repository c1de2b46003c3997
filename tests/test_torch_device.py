"""`--torch-device` (`RunConfig.torch_device`): the run's tensors on the CPU or a CUDA device.

CPU tests check that `--torch-device cpu` runs and is recorded, and that a malformed or
unavailable device is refused with exit code 2 and a message naming the key. The `gpu` test runs
the tiny compare on CUDA (skipped, never deselected, where torch sees no CUDA device)."""

from __future__ import annotations

import json
import math
import tomllib

import pytest
import torch

from ept_hw.config import ConfigError, resolve_torch_device
from experiments.cli import main
from experiments.presets import load_run_config
from trainer.loop import run

TINY = ["--set", "model.context=8", "--set", "model.width=16", "--seq-len", "8", "--batch-size", "4",
        "--set", "training.eval_interval=2", "--set", "training.eval_batches=1", "--set", "solver.max_steps=60",
        "--set", "estimator.t2=6", "--set", "training.stability_every=0", "--no-progress", "--steps", "2"]
TINY_CFG = {"model": {"context": 8, "width": 16},
            "training": {"seq_len": 8, "batch_size": 4, "eval_interval": 2, "eval_batches": 1, "stability_every": 0,
                         "steps": 2, "checkpoint_interval": 2},
            "solver": {"max_steps": 60}, "estimator": {"t2": 6}}


def test_cpu_device_runs_and_is_recorded(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["compare", "--model", "tiny", "--device", "reram_sb", "--torch-device", "cpu", "--out", str(out),
                 "--json", *TINY])
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    cfg = tomllib.loads((out / "config.toml").read_text())
    assert cfg["torch_device"] == "cpu"
    assert summary["steps_completed"] == 2
    losses = summary["final_val_loss"]
    assert set(losses) == {"analog", "twin"} and all(math.isfinite(v) for v in losses.values())


@pytest.mark.parametrize("bad", ["gpu", "cuda:x", "CPU", "cuda:-1", ""])
def test_malformed_device_is_refused(tmp_path, capsys, bad):
    out = tmp_path / "run"
    code = main(["compare", "--model", "tiny", "--torch-device", bad, "--out", str(out), *TINY])
    err = capsys.readouterr().err
    assert code == 2
    assert "torch_device" in err and "'cpu', 'cuda' or 'cuda:N'" in err
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the refusal cannot be shown here")
@pytest.mark.parametrize("name", ["cuda", "cuda:0", "cuda:3"])
def test_cuda_without_a_cuda_device_is_refused(tmp_path, capsys, name):
    with pytest.raises(ConfigError, match="CUDA is not available"):
        resolve_torch_device("torch_device", name)
    out = tmp_path / "run"
    code = main(["compare", "--model", "tiny", "--torch-device", name, "--out", str(out), *TINY])
    err = capsys.readouterr().err
    assert code == 2 and "torch_device" in err and "CUDA is not available" in err
    assert not out.exists()  # refused before anything was written


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_tiny_compare_on_cuda(tmp_path):
    """The tiny compare on CUDA: both paths train, their tensors live on the GPU, and the digital
    twin's losses match the same run on the CPU (same initial weights and batches; only the
    floating-point order of the kernels differs)."""
    results = {}
    for device in ("cpu", "cuda"):
        cfg = load_run_config("tiny", {**TINY_CFG, "mode": "compare", "torch_device": device,
                                       "analog": {"device": "reram_sb"}})
        result = run(cfg, tmp_path / device)
        assert result.exit_code == 0 and result.steps_completed == 2
        results[device] = result
    paths = results["cuda"].paths
    assert paths["twin"].model.params["tok_emb"].is_cuda
    assert paths["analog"].model.projections["W_Q"].weight.is_cuda
    rows = {d: [json.loads(line) for line in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
            for d in results}
    for key in ("twin_loss", "twin_val_loss"):
        cpu = [r[key] for r in rows["cpu"] if r.get(key) is not None]
        gpu = [r[key] for r in rows["cuda"] if r.get(key) is not None]
        assert cpu and len(cpu) == len(gpu)
        assert max(abs(a - b) for a, b in zip(cpu, gpu)) < 1e-3
    analog = [r["analog_loss"] for r in rows["cuda"] if r.get("analog_loss") is not None]
    assert analog and all(math.isfinite(v) for v in analog)
