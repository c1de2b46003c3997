"""The `device_spec.json` mapping: sections from a run (device, periphery, derived figures,
training) and, from a sweep, the requirements table; `build_spec` validates it."""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import json
import logging
import math
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from crossbar.io import bits_from_res
from devices import preset_names
from ept_hw.config import ConfigError, config_hash, load_toml
from experiments.runfacts import IncompleteRunError, RunFacts, check_run_dir, read_json
from experiments.sweep.requirements import Requirement, TWIN_MARGIN, derive_requirements
from trainer.analog import resolve_tile_config
from trainer.config import run_config_from_dict
from trainer.rundir import RunDirectory, file_sha256

from .schema import SCHEMA_VERSION, validate_spec

logger = logging.getLogger(__name__)

UNITS_CONVENTION = {
    "weight": "aihwkit normalised weight units (the device's conductance range mapped onto [w_min, w_max])",
    "io": "tile-normalised MVM units (an input of 1 is the full DAC range inp_bound; outputs in weight x input units)",
    "time": "tau, the time constant of the relaxation circuit (tau dz/dt = F(z); one Euler step is eps tau)",
    "loss": "nats per token (mean cross-entropy)",
    "noise": "standard deviations, relative to the quantity named in each parameter's unit",
}

#: Units of aihwkit's parameter names (device, IO, update); anything else is dimensionless ("1").
PARAMETER_UNITS: dict[str, str] = {
    "dw_min": "weight units per pulse",
    "w_max": "weight units",
    "w_min": "weight units",
    "reset": "weight units",
    "reset_std": "weight units",
    "reference_mean": "weight units",
    "reference_std": "weight units",
    "reverse_offset": "weight units",
    "dw_min_std": "fraction of dw_min (per pulse)",
    "dw_min_std_add": "weight units per pulse",
    "dw_min_std_slope": "fraction of |w| per pulse",
    "write_noise_std": "fraction of dw_min",
    "dw_min_dtod": "fraction of dw_min (device-to-device std)",
    "w_max_dtod": "fraction of w_max (device-to-device std)",
    "w_min_dtod": "fraction of |w_min| (device-to-device std)",
    "up_down": "1 (up step dw_min(1+up_down), down step dw_min(1-up_down))",
    "up_down_dtod": "1 (device-to-device std of up_down)",
    "lifetime": "mini-batches",
    "lifetime_dtod": "fraction of lifetime",
    "diffusion": "fraction of dw_min",
    "diffusion_dtod": "fraction of diffusion",
    "inp_res": "fraction of the input range 2*inp_bound (quantisation step)",
    "out_res": "fraction of the output range 2*out_bound (quantisation step)",
    "inp_bound": "tile input units",
    "out_bound": "tile output units",
    "inp_noise": "tile input units (std)",
    "out_noise": "tile output units (std)",
    "out_noise_std": "fraction of out_noise (device-to-device std)",
    "w_noise": "weight units (std)",
    "desired_bl": "pulses (pulse-train length BL)",
    "dac_bits": "bits",
    "adc_bits": "bits",
    "read_average": "reads per MVM",
    "construction_seed": "-",
}



def _parameter(name: str, value: Any) -> dict[str, Any]:
    if isinstance(value, tuple):
        value = list(value)
    if isinstance(value, float) and not math.isfinite(value):
        value = None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    unit = PARAMETER_UNITS.get(name, "-" if isinstance(value, (bool, str)) else "1")
    return {"value": value, "unit": unit}


def _figure(value: Any, unit: str, how: str, note: str | None = None) -> dict[str, Any]:
    if value is not None:
        value = float(value)
        if not math.isfinite(value):
            note = (note + "; " if note else "") + f"non-finite value {value}"
            value = None
    out = {"value": value, "unit": unit, "how": how}
    if note:
        out["note"] = note
    return out


def _unchanged_since_run(path: Path, run_dir: Path | None) -> bool:
    """Whether the device file at `path` is still the one the run was started from (its sha256 in
    the run's `provenance.json`); a run without a recorded hash (older runs) trusts the file."""
    if run_dir is None:
        return True
    recorded = RunDirectory(run_dir).read_provenance().get("device_source", {}).get("sha256")
    return recorded is None or recorded == file_sha256(path)


def device_source(device: str, run_dir: Path | None = None) -> dict[str, Any]:
    """Where the device description came from: a library preset (a stand-in for a real device), a
    fit to a measured trace (with its fit error, from the file's ``[fit]`` table) or a user file."""
    if device in preset_names():
        return {"kind": "preset", "name": device, "stand_in": True, "path": None, "fit_error": None,
                "note": "library preset with aihwkit's published numbers: a stand-in for a real device, "
                        "not a measurement of yours"}
    path = Path(device)
    if not path.is_absolute() and run_dir is not None and not path.exists():
        path = run_dir / path
    data = load_toml(path) if path.is_file() and _unchanged_since_run(path, run_dir) else {}
    fit = data.get("fit") if isinstance(data.get("fit"), Mapping) else None
    tile_device = data.get("tile", {}).get("device") if isinstance(data.get("tile"), Mapping) else None
    if fit is None and isinstance(tile_device, str) and tile_device in preset_names():
        return {"kind": "preset", "name": tile_device, "stand_in": True, "path": str(path), "fit_error": None,
                "note": f"library preset in the tile file {path.name}: a stand-in for a real device"}
    if fit is not None:
        # `ept-hw device fit` writes trajectory_rms (of w_max - w_min) and step_rms (of the mean step)
        fit_error = None
        if "trajectory_rms" in fit:
            fit_error = {"value": float(fit["trajectory_rms"]), "metric": "trajectory RMS of the fitted model's "
                         "pulse trajectory against the measured trace", "unit": "fraction of (w_max - w_min)"}
            if "step_rms" in fit:
                fit_error["step_rms"] = float(fit["step_rms"])
        else:
            error_key = next((k for k in ("rmse", "error", "fit_error", "nrmse", "step_rms") if k in fit), None)
            if error_key is not None:
                fit_error = {"value": float(fit[error_key]), "metric": str(fit.get("metric", error_key)),
                             "unit": str(fit.get("unit", "weight units"))}
        out = {"kind": "fit", "name": str(fit.get("trace", fit.get("source", path.stem))), "stand_in": False,
               "path": str(path), "fit_error": fit_error}
        if fit_error is None:
            out["note"] = "the device file's [fit] table states no fit error"
        return out
    return {"kind": "user_file", "name": path.stem, "stand_in": False, "path": str(path), "fit_error": None}


def _device_section(config: Mapping[str, Any], run_dir: Path, device_cfg: Any) -> dict[str, Any]:
    params = device_cfg.to_dict()
    model = params.pop("model")
    return {
        "model": model,
        "class": type(device_cfg).__name__,
        "parameters": {k: _parameter(k, v) for k, v in params.items()} or {"granularity": _parameter("dw_min", 0.0)},
        "source": device_source(config.get("analog", {}).get("device", "ideal"), run_dir),
    }


def _flatten(mapping: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in mapping.items():
        if isinstance(v, Mapping):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


_DAC_KEYS = ("inp_res", "inp_bound", "inp_noise", "inp_sto_round")
_ADC_KEYS = ("out_res", "out_bound", "out_sto_round", "out_scale", "bound_management", "max_bm_factor", "max_bm_res",
             "bm_test_negative_bound")
_ALGORITHM_TABLES = {"mixed_precision": "mixed_precision", "ttv2": "transfer", "c_ttv2": "chopped", "agad": "dynamic"}


def periphery_section(tile: Mapping[str, Any], analog: Mapping[str, Any]) -> dict[str, Any]:
    """Group a `crossbar.config.TileConfig` (as a dict) into DAC, ADC, read, update and algorithm.

    The forward and the transposed (backward) read keep their own entries (``forward.out_res``,
    ``backward.out_res``); resolutions also state their number of bits.
    """
    groups: dict[str, dict[str, Any]] = {"dac": {}, "adc": {}, "read": {}, "update": {}, "other": {}}
    name = str(tile.get("algorithm", "sgd"))
    algorithm: dict[str, Any] = {"name": name, "parameters": {}}
    active_table = _ALGORITHM_TABLES.get(name)
    for key, value in _flatten({k: v for k, v in tile.items() if k not in ("device", "algorithm")}).items():
        head, _, leaf = key.rpartition(".")
        leaf = leaf or key
        table = key.split(".", 1)[0]
        if table in _ALGORITHM_TABLES.values():
            if table == active_table:
                algorithm["parameters"][key.split(".", 1)[1]] = _parameter(leaf, value)
            continue
        if table in ("forward", "backward"):
            group = "dac" if leaf in _DAC_KEYS else "adc" if leaf in _ADC_KEYS else "read"
        elif table == "update":
            group = "update"
        elif key in ("n_reads", "noise_mode"):
            group = "read"
        else:
            group = "other"
        entry = _parameter(leaf, value)
        if leaf.endswith("_res") and isinstance(value, (int, float)) and not isinstance(value, bool):
            steps = value if value > 1 else (1.0 / value if value > 0 else 0.0)
            bits = bits_from_res(value)
            entry["meaning"] = (f"{bits:.2f} bits (2^bits - 2 = {steps:.0f} steps)" if bits is not None
                                else "no quantisation")
        groups[group][key] = entry
    groups["read"]["read_average"] = _parameter("read_average", tile.get("n_reads", 1))
    groups["read"]["noise_mode"] = {"value": tile.get("noise_mode", "fresh"), "unit": "-",
                                    "meaning": "fresh: new read noise at every read; common: the same draws in the ± nudged phases"}
    groups["read"].pop("n_reads", None)  # stated once, as read_average
    return {"mode": analog.get("periphery", "default"), "dac": groups["dac"], "adc": groups["adc"],
            "read": groups["read"], "update": groups["update"], "algorithm": algorithm, "other": groups["other"]}


def resolve_tile(run: RunFacts) -> Any:
    """The `TileConfig` the run trained with: its own copy (`tile.toml`, written when the run
    started), never the device file or preset it was started from, which may have been edited or
    moved since. Runs written before runs kept their copy are resolved from their config as they
    were (the file as it is now)."""
    own = RunDirectory(run.path).tile_config()
    if own is not None:
        return own
    return resolve_tile_config(run_config_from_dict({"analog": dict(run.config.get("analog", {}))}).analog)


def derived_section(run: RunFacts, device_cfg: Any, response_figures: Mapping[str, Any] | None) -> dict[str, Any]:
    """Number of states, asymmetry, endurance, pulses per device per step, ADC conversions per token, settling time."""
    cfg = run.config
    steps = int(run.summary.get("steps_completed") or (run.rows[-1].get("step", 0) + 1 if run.rows else 0))
    training = cfg.get("training", {})
    tokens_per_step = int(training.get("batch_size", 16)) * int(training.get("seq_len", 64))
    eps = float(cfg.get("solver", {}).get("eps", 0.1))

    if getattr(device_cfg, "is_ideal", False):
        states = _figure(None, "states", "(w_max - w_min)/granularity", "ideal device: continuous weights, no finite number of states")
        asym = _figure(0.0, "1", "ideal device: exact float update", None)
    else:
        g = float(device_cfg.granularity)
        states = _figure((device_cfg.w_max - device_cfg.w_min) / g if g > 0 else None, "states",
                         "(w_max - w_min)/granularity, aihwkit's calcWeightGranularity")
        if response_figures and response_figures.get("up_down_asymmetry") is not None:
            asym = _figure(response_figures["up_down_asymmetry"], "1",
                           "(dw_up - dw_down)/(dw_up + dw_down) of the mean device at w = "
                           f"{response_figures.get('asymmetry_at_w', 0.0):g}, pulse-response protocol")
        else:
            asym = _figure(getattr(device_cfg, "up_down", 0.0), "1", "nominal up_down of the device config")

    max_pulses = run.counters.get("max_pulses_per_device", run.summary.get("max_pulses_per_device"))
    ck_step = run.counters.get("checkpoint_step")
    endurance_note = None if max_pulses is not None else "not recorded by this run"
    if max_pulses is not None and ck_step is not None and int(ck_step) != steps:
        endurance_note = f"counted at the last checkpoint (step {ck_step} of {steps})"
    endurance = _figure(max_pulses, "pulses",
                        "largest number of pulses any single device (unit cell) received over the run (array counters)",
                        endurance_note)
    pulses = run.last("analog_pulses")
    if pulses is None and run.counters.get("total_pulses") is not None:
        pulses = run.counters["total_pulses"]
    if pulses is not None and run.n_weights and steps:
        ppd = _figure(pulses / (run.n_weights * steps), "pulses per device per step",
                      f"all pulses ({pulses:.4g}) / (devices ({run.n_weights}) x training steps ({steps}))")
    else:
        ppd = _figure(None, "pulses per device per step", "all pulses / (devices x training steps)",
                      "pulse count or device count not recorded by this run")
    adc = run.last("analog_adc_conversions")
    if adc is not None and steps:
        adc_fig = _figure(adc / (steps * tokens_per_step), "ADC conversions per token",
                          f"ADC conversions of the run ({adc:.4g}) / (steps ({steps}) x batch x sequence ({tokens_per_step}))")
    else:
        adc_fig = _figure(None, "ADC conversions per token", "ADC conversions / training tokens", "not recorded by this run")
    free_steps = run.column("analog_free_steps")
    if free_steps:
        ordered = sorted(free_steps)
        p95 = ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))]
        settle = _figure(sum(free_steps) / len(free_steps) * eps, "tau",
                         f"mean free-phase Euler steps x eps ({eps:g})",
                         f"95th percentile {p95 * eps:.3g} tau, over {len(free_steps)} steps")
    else:
        settle = _figure(None, "tau", "mean free-phase Euler steps x eps", "free-phase steps not logged")
    return {"number_of_states": states, "asymmetry": asym, "endurance": endurance,
            "pulses_per_device_per_step": ppd, "adc_conversions_per_token": adc_fig, "settling_time": settle}


def _fixed_set_figures(final: dict[str, Any] | None) -> dict[str, Any]:
    """The run's final figure on its fixed validation set (`final_eval` of the summary), with
    standard errors and the baselines on the same tokens; {} when the run has none."""
    if not final or not final.get("loss"):
        return {}
    where = f"on the fixed validation set ({final['tokens']} tokens)"

    def se(x: Any) -> str:
        return f"standard error {x:.4f}"

    out: dict[str, Any] = {}
    for path in ("analog", "twin"):
        if path in final["loss"]:
            out[f"{path}_fixed_set_loss"] = _figure(final["loss"][path], "nats", f"validation loss {where}",
                                                   se(final["stderr"][path]))
    if final.get("gap") is not None:
        out["fixed_set_gap"] = _figure(final["gap"], "nats", f"analog - twin {where}, paired by chunk",
                                       se(final["gap_stderr"]))
    out["fixed_set_bigram"] = _figure(final["bigram_loss"], "nats", f"add-0.05 bigram table {where}")
    out["fixed_set_unigram_entropy"] = _figure(final["unigram_entropy"], "nats", f"unigram entropy {where}")
    return out


def training_section(run: RunFacts) -> dict[str, Any]:
    a, t = run.last("analog_val_loss"), run.last("twin_val_loss")
    gap = None if a is None or t is None else a - t
    steps = int(run.summary.get("steps_completed") or (run.rows[-1].get("step", 0) + 1 if run.rows else 0))
    out = {
        "steps": steps,
        "analog_final_val_loss": _figure(a, "nats", "last logged validation loss of the analog path"),
        "twin_final_val_loss": _figure(t, "nats", "last logged validation loss of the digital twin"),
        "gap": _figure(gap, "nats", "analog - twin final validation loss"),
    }
    if run.summary.get("unigram_entropy") is not None:
        out["unigram_entropy"] = _figure(run.summary["unigram_entropy"], "nats", "unigram entropy of the validation text")
    out.update(_fixed_set_figures(run.summary.get("final_eval")))
    if run.summary.get("divergence"):
        out["divergence"] = run.summary["divergence"]
    for key in ("analog_residual", "analog_residual_floor", "analog_saturation", "analog_adjoint_snr"):
        v = run.last(key)
        if v is not None:
            out[key] = v
    return out


def requirements_section(reqs: Sequence[Requirement] | None, tolerance: float | None,
                         base_values: Mapping[str, Any] | None = None) -> dict[str, Any]:
    criterion = ("weakest tested value v (fewer bits or states, more noise or variation, larger asymmetry, "
                 "simpler algorithm) such that the one-sided upper 95 % bound (Student t over seeds) of the paired "
                 "analog - digital final validation-loss gap of v, and of every more demanding tested value, is "
                 "<= tolerance, every other axis at the base; degenerate or diverged points never pass; "
                 f"undetermined when the twin does not end at least {TWIN_MARGIN:g} nats below the unigram entropy "
                 "or when the most demanding value's interval contains the tolerance")
    if reqs is None:
        return {"tolerance": None, "criterion": criterion, "rows": [],
                "note": "exported from a single run: no sweep, no requirements (run `ept-hw sweep` and export its directory)"}
    rows = []
    for r in reqs:
        d = r.to_dict()
        if base_values and r.axis in base_values:
            d["base_value"] = base_values[r.axis]
        rows.append(d)
    return {"tolerance": {"value": float(tolerance), "unit": "nats"}, "criterion": criterion, "rows": rows}


def _git_commit() -> str | None:
    root = Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def _software() -> dict[str, Any]:
    try:
        version = importlib.metadata.version("ept-hw")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    return {"name": "ept-hw", "version": version, "git_commit": _git_commit()}



@dataclass
class SweepFacts:
    path: Path
    table: dict[str, Any]
    base: RunFacts
    points: list[tuple[dict[str, Any], RunFacts | None]]  # (row, run) per point


def check_sweep_dir(sweep_dir: str | Path) -> SweepFacts:
    """Read a sweep directory; raise `IncompleteRunError` naming everything missing."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise IncompleteRunError(sweep_dir, ["the directory does not exist"])
    missing: list[str] = []
    table = read_json(sweep_dir / "sweep.json", missing, "the sweep table written by `ept-hw sweep`")
    if not (sweep_dir / "sweep_manifest.json").is_file():
        missing.append("missing sweep_manifest.json (the sweep's base settings)")
    if table is not None:
        for key in ("axes", "tolerance", "rows"):
            if key not in table:
                missing.append(f"sweep.json has no '{key}'")
    if missing:
        raise IncompleteRunError(sweep_dir, missing)
    base_rows = [r for r in table["rows"] if r.get("overrides") == "base"]
    if not base_rows:
        raise IncompleteRunError(sweep_dir, ["sweep.json has no base point (every axis at the base); "
                                             "run the sweep one axis at a time, which includes it"])
    if base_rows[0].get("status") not in ("ok", "degenerate") or not base_rows[0].get("run_dir"):
        raise IncompleteRunError(sweep_dir, [f"the base point failed: {base_rows[0].get('error')}"])
    base = check_run_dir(_resolve(sweep_dir, base_rows[0]["run_dir"]))
    points = []
    for row in table["rows"]:
        run = None
        if row.get("status") in ("ok", "degenerate", "diverged") and row.get("run_dir") and row is not base_rows[0]:
            # provenance needs only the configuration: a point whose analog path diverged before its
            # first evaluation is still evidence (it fails the tolerance)
            point_dir = _resolve(sweep_dir, row["run_dir"])
            try:
                run = RunFacts(point_dir, load_toml(point_dir / "config.toml"), [], {})
            except ConfigError as exc:
                logger.warning("sweep point %s: no readable config.toml in %s (%s)", row.get("point_id"), point_dir, exc)
        points.append((row, base if row is base_rows[0] else run))
    return SweepFacts(sweep_dir, table, base, points)


def _resolve(root: Path, path: str) -> Path:
    p = Path(path)
    return p if p.is_absolute() else root / p


SWEEP_MARKERS = ("sweep.json", "sweep_manifest.json", "points")


def is_sweep_dir(path: str | Path) -> bool:
    """A directory that `ept-hw sweep` wrote into (any of its markers, and no run of its own)."""
    path = Path(path)
    return any((path / m).exists() for m in SWEEP_MARKERS + ("runs",)) and not (path / "config.toml").is_file()


def _check_not_mixed(path: Path) -> None:
    """A run directory that a sweep also wrote into is refused: its requirements would be dropped silently."""
    if (path / "config.toml").is_file():
        found = [m for m in SWEEP_MARKERS if (path / m).exists()]
        if found:
            raise IncompleteRunError(path, [
                "it holds both a run (config.toml) and a sweep (" + ", ".join(found) + "); the spec would "
                "silently drop the sweep's requirements: export the run and the sweep from separate directories"])



def _read_source(source: Path) -> tuple[SweepFacts | None, RunFacts]:
    if not source.exists():
        raise IncompleteRunError(source, ["the directory does not exist"])
    if not source.is_dir():
        raise IncompleteRunError(source, ["it is a file, not a run or sweep directory"])
    _check_not_mixed(source)
    sweep = check_sweep_dir(source) if is_sweep_dir(source) else None
    return sweep, (sweep.base if sweep is not None else check_run_dir(source))


def build_spec(source: str | Path, *, tolerance: float | None = None,
               response_figures: Mapping[str, Any] | None = None,
               _facts: tuple[SweepFacts | None, RunFacts] | None = None) -> dict[str, Any]:
    """The `device_spec.json` mapping of a run or sweep directory (validated against the schema)."""
    source = Path(source)
    sweep, run = _facts if _facts is not None else _read_source(source)
    tile = resolve_tile(run)
    device_cfg = tile.device_config()
    spec: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "kind": "ept-hw device specification",
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "units_convention": dict(UNITS_CONVENTION),
        "device": _device_section(run.config, run.path, device_cfg),
        "periphery": periphery_section(tile.to_dict(), run.config.get("analog", {})),
        "derived": derived_section(run, device_cfg, response_figures),
        "training": training_section(run),
    }
    if response_figures:
        spec["pulse_response"] = {k: v for k, v in response_figures.items()
                                  if isinstance(v, (str, bool)) or (isinstance(v, (int, float)) and math.isfinite(v))}
    runs = []
    if sweep is None:
        spec["requirements"] = requirements_section(None, None)
        runs.append({"run_id": run.run_id, "role": "run", "config_hash": run.config_hash, "path": str(run.path)})
        sweep_info = None
    else:
        table = sweep.table
        tol = float(table["tolerance"] if tolerance is None else tolerance)
        axis_names = list(table["axes"])
        base_values = table.get("base_values") or {}
        reqs = derive_requirements(table["rows"], axis_names, tol, base_values)
        spec["requirements"] = requirements_section(reqs, tol, base_values)
        failed = 0
        for row, prun in sweep.points:
            if prun is None:
                failed += row.get("status") in ("failed", "invalid")
                continue
            role = "sweep_base" if prun is run else "sweep_point"
            overrides = {a: row.get(a) for a in axis_names if row.get(a) is not None and row.get(a) != base_values.get(a)}
            runs.append({"run_id": prun.run_id, "role": role, "config_hash": prun.config_hash,
                         "path": str(prun.path), "overrides": overrides})
        manifest = json.loads((sweep.path / "sweep_manifest.json").read_text())
        base_device = manifest.get("context", {}).get("device")
        if base_device:  # the points run on generated tile files: the description came from the sweep's base device
            spec["device"]["source"] = device_source(str(base_device), sweep.path)
        sweep_info = {"path": str(sweep.path), "context_hash": config_hash(manifest.get("context", {})),
                      "points": len(sweep.points), "failed_points": failed,
                      "degenerate_points": sum(r.get("status") in ("degenerate", "diverged") for r, _ in sweep.points),
                      "seeds": int(table.get("seeds") or max((r.get("n_seeds") or 1 for r in table["rows"]), default=1))}
    spec["provenance"] = {"software": _software(), "runs": runs, "sweep": sweep_info}
    validate_spec(spec)
    return spec

