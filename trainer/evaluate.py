"""Retention of a trained chip: validation loss of the analog path vs time after programming.

`evaluate_retention(run_dir, times)` is the library function behind `ept-hw evaluate`. It takes
the analog path's trained weights from the run's last checkpoint (the read-out weights s·W_dev
of every projection), programs them onto fresh PCM pairs with aihwkit's PCM inference model
(`crossbar.inference`: programming noise, drift, 1/f read noise), and for each time t_inf
(seconds after programming; t = 0 is always included: programming noise and the read noise at
t_0, no drift) evaluates the run's own validation batches through the run's analog tiles (the
drifted weights are programmed onto them, so reads keep the run's periphery). Each noise seed is
one chip: programming noise and drift exponents drawn once, then read at every time. With
`drift_compensation`, outputs are rescaled by aihwkit's global drift compensation.

Which runs: a run with an analog path (mode "compare", or "ep" with path "analog") whose device
has a drift model. The only drift model here is aihwkit's PCM model, fitted on PCM; it is
accepted for runs whose device is one-sided in a differential pair (w_min >= 0: the `pcm` preset
and any PCM-like device file), the unit cell the model describes. aihwkit applies the PCM model
to any weights; `any_device=True` (`--any-device`) does the same here, and the result says so.

Output: `RUN/evaluation/evaluation.json` (one entry per compensation setting; a later call with
the other setting adds its entry, the same setting replaces its own) and
`RUN/evaluation/retention.png`. Nothing else in the run directory is written.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path
from typing import Any, Sequence

import torch
from tqdm import tqdm

from crossbar.inference import PCMInferenceModel, PCMInferenceParameters, ProgrammedWeights
from ept_hw.config import ConfigError

from .analog import resolve_tile_config
from .loop import _eval_batches, load_run
from .rundir import RunDirectory, atomic_write

__all__ = ["evaluate_retention", "EVALUATION_DIR", "EVALUATION_FILE", "DEFAULT_TIMES", "read_evaluation",
           "retention_line"]

EVALUATION_DIR = "evaluation"
EVALUATION_FILE = "evaluation.json"
PLOT_FILE = "retention.png"
DEFAULT_TIMES = (1.0, 3600.0, 86400.0, 31536000.0)


def _check_times(times: Sequence[float]) -> list[float]:
    out = []
    for t in times:
        try:
            value = float(t)
        except (TypeError, ValueError):
            raise ConfigError("times", t, "seconds after programming (numbers >= 0)") from None
        if not (value >= 0.0) or math.isinf(value):
            raise ConfigError("times", t, "seconds after programming (finite numbers >= 0)")
        out.append(value)
    if not out:
        raise ConfigError("times", list(times), "at least one time in seconds")
    return sorted(set(out) | {0.0})


def _check_run(rd: RunDirectory, any_device: bool) -> tuple[Any, str]:
    """The saved config, after checking the run has analog weights and an accepted device."""
    rd.require_run()
    if not rd.has_checkpoint():
        raise FileNotFoundError(f"{rd.path} has no checkpoint to evaluate (in {rd.checkpoint_dir})")
    cfg = rd.config()
    if not cfg.uses_analog:
        raise ConfigError("mode", cfg.mode if cfg.mode != "ep" else f"ep (path = {cfg.path})",
                          "a run with analog weights: mode 'compare', or 'ep' with path 'analog'")

    tile = resolve_tile_config(cfg.analog)
    if tile.uses_pair:
        return cfg, "pcm_pair"
    if any_device:
        return cfg, "assumed_pcm"
    raise ConfigError(
        "analog.device", cfg.analog.device,
        "a device with a drift model: the PCM inference model applies to one-sided devices in a differential "
        "pair (w_min >= 0, e.g. the 'pcm' preset); pass --any-device to apply aihwkit's PCM statistics to "
        "these weights anyway, as aihwkit does",
    )


def read_evaluation(run_dir: str | Path) -> dict[str, Any] | None:
    """The run's evaluation file, or None when the run has none."""
    path = RunDirectory(run_dir).path / EVALUATION_DIR / EVALUATION_FILE
    if not path.is_file():
        return None

    return json.loads(path.read_text())


def _key(drift_compensation: bool) -> str:
    return "global_drift_compensation" if drift_compensation else "no_compensation"


def evaluate_retention(run_dir: str | Path, times: Sequence[float] = DEFAULT_TIMES, *, seeds: int = 3,
                       seed: int = 0, drift_compensation: bool = False, any_device: bool = False,
                       params: Any = None, progress: bool = False) -> dict[str, Any]:
    """Validation loss of the analog path at each time (module docstring); returns the entry
    written under its compensation key in `RUN/evaluation/evaluation.json`."""
    rd = RunDirectory(run_dir)
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise ConfigError("seeds", seeds, "a number of noise seeds >= 1")
    t_list = _check_times(times)
    _, device_kind = _check_run(rd, any_device)
    cfg, data, paths = load_run(rd.path)
    analog = paths["analog"]
    projections = analog.model.projections
    trained = {name: proj.weight.detach().clone() for name, proj in projections.items()}
    batches = _eval_batches(data, cfg)
    model = PCMInferenceModel(params or PCMInferenceParameters())
    trained_loss = analog.evaluate(batches)

    bar = None
    if progress:
        bar = tqdm(total=seeds * len(t_list), desc="evaluate", unit="eval")
    losses: list[list[float]] = []
    for k in range(seeds):
        gen = torch.Generator().manual_seed(seed * 1_000_003 + k)
        chip = {name: ProgrammedWeights(w, model, gen) for name, w in trained.items()}
        row = []
        for t in t_list:
            for name, proj in projections.items():
                proj.program(chip[name].at(t, gen, drift_compensation))
            row.append(analog.evaluate(batches))
            if bar is not None:
                bar.update(1)
        losses.append(row)
    if bar is not None:
        bar.close()
    loss_t = torch.tensor(losses, dtype=torch.float64)  # (seeds, times)
    mean = loss_t.mean(0)
    std = loss_t.std(0, unbiased=True) if seeds > 1 else torch.zeros_like(mean)
    entry = {
        "times_s": t_list,
        "loss_mean": [float(v) for v in mean],
        "loss_std": [float(v) for v in std],
        "loss_per_seed": losses,
        "seeds": seeds,
        "seed": seed,
        "drift_compensation": "global" if drift_compensation else "none",
    }
    existing = read_evaluation(rd.path) or {}
    doc = {
        "run": str(rd.path),
        "path": "analog",
        "device": cfg.analog.device,
        "noise_model": "PCMLikeNoiseModel (aihwkit 1.2 semantics)",
        "noise_model_applies_to": device_kind,
        "noise_model_parameters": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(model.params).items()},
        "trained_val_loss": trained_loss,
        "eval_batches": len(batches),
        "eval_tokens": int(sum(idx.numel() for idx, _ in batches)),
        "evaluations": {**existing.get("evaluations", {}), _key(drift_compensation): entry},
    }
    rd.write_json(f"{EVALUATION_DIR}/{EVALUATION_FILE}", doc, indent=2, allow_nan=False)
    _plot(doc, rd.subdir(EVALUATION_DIR) / PLOT_FILE)
    return doc


def _plot(doc: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for key, entry in sorted(doc["evaluations"].items()):
        t = [max(v, 0.1) for v in entry["times_s"]]  # t = 0 drawn at 0.1 s on the log axis
        m, s = entry["loss_mean"], entry["loss_std"]
        label = "global drift compensation" if entry["drift_compensation"] == "global" else "no compensation"
        ax.errorbar(t, m, yerr=s, marker="o", capsize=3, label=f"{label} ({entry['seeds']} seeds)")
    ax.axhline(doc["trained_val_loss"], color="grey", ls="--", lw=1, label="as trained (no inference noise)")
    ax.set_xscale("log")
    ax.set_xlabel("time after programming t_inf [s] (t = 0 at 0.1 s)")
    ax.set_ylabel("validation loss [nats/token]")
    ax.set_title(f"Retention, analog path, {doc['device']}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda fh: fig.savefig(fh, format="png", dpi=110))
    plt.close(fig)


def retention_line(evaluation: dict[str, Any] | None) -> str | None:
    """The device specification's retention sentence, from an evaluation file's content:
    "loss within X nats of t = 0 after T" for the longest time, per compensation setting (mean
    over seeds; X = |mean(T) − mean(0)|, with the direction stated). None without an evaluation.

    Kept free of the spec's layout so that `experiments.spec` can call it wherever its export puts
    the retention figure."""
    if not evaluation or not evaluation.get("evaluations"):
        return None
    parts = []
    for key, entry in sorted(evaluation["evaluations"].items()):
        times, mean = entry["times_s"], entry["loss_mean"]
        i0, i_last = times.index(0.0), len(times) - 1
        delta = mean[i_last] - mean[i0]
        label = "with global drift compensation" if entry["drift_compensation"] == "global" else "without drift compensation"
        parts.append(f"loss within {abs(delta):.3f} nats of t = 0 after {_human_time(times[i_last])} {label} "
                     f"({'a rise' if delta > 0 else 'a fall'}; {entry['seeds']} seeds, std {entry['loss_std'][i_last]:.3f})")
    return "Retention (aihwkit PCM inference model): " + "; ".join(parts) + "."


def _human_time(seconds: float) -> str:
    for unit, size in (("year", 31536000.0), ("day", 86400.0), ("h", 3600.0), ("min", 60.0)):
        if seconds >= size:
            value = seconds / size
            text = f"{value:g}"
            return f"{text} {unit}" + ("s" if unit in ("year", "day") and value != 1 else "")
    return f"{seconds:g} s"
