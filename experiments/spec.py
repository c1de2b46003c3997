"""Device-specification export: `device_spec.json` (schema-validated), `device_spec.md`, optional PDF.

The source is either a `compare` run directory (``runs/NAME``: `config.toml`, `metrics.jsonl`,
`summary.json`, optionally `conductances.pt`) or a sweep directory written by `ept-hw sweep`
(`sweep.json`, `sweep_manifest.json`, `points/`, `runs/<point id>/`). From a sweep the device,
periphery, derived figures and training figures are those of the base point (every axis at the
base) and the requirements table is derived from every point (`experiments.sweep.derive_requirements`);
from a single run the requirements table is empty and says so.

Units (stated in the file as well): weights in aihwkit's normalised weight units (the device's
conductance range mapped onto [w_min, w_max]); inputs and outputs of an MVM in the tile's
normalised units (aihwkit: an input of 1 is the full DAC range `inp_bound`); time in units of τ,
the time constant of the relaxation circuit (τ dz/dt = F(z), one Euler step is ε τ); losses in
nats per token.

Derived figures and where this differs from aihwkit's vocabulary:
- number of states = (w_max − w_min)/granularity, with aihwkit's `calcWeightGranularity` (the
  devices package's `granularity`, ExpStep typo included);
- asymmetry = (Δw⁺ − Δw⁻)/(Δw⁺ + Δw⁻) of the mean device at w = 0 (equal to aihwkit's `up_down`
  for step-constant devices), measured by the pulse-response protocol when it runs;
- endurance = the largest number of pulses any single device received over the run (as counted by
  the arrays); pulses per device per training step = all pulses / (devices · steps);
- ADC conversions per token = ADC conversions of the training run / (steps · batch · sequence);
- settling time = mean number of free-phase Euler steps · ε, in τ.
"""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import importlib.resources
import json
import logging
import math
import os
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from crossbar.io import bits_from_res
from ept_hw.config import ConfigError, config_hash, load_toml

from .sweep import Requirement, derive_requirements, plot_gaps

__all__ = [
    "SCHEMA_VERSION",
    "IncompleteRunError",
    "SpecValidationError",
    "load_schema",
    "validate_spec",
    "RunFacts",
    "read_run",
    "check_run_dir",
    "check_sweep_dir",
    "device_source",
    "build_spec",
    "ExportResult",
    "export_spec",
    "PARAMETER_UNITS",
    "checkpoint_pulse_counts",
    "periphery_section",
    "resolve_tile",
    "is_sweep_dir",
]

logger = logging.getLogger(__name__)

SCHEMA_VERSION = "1.0.0"
SCHEMA_FILE = "spec_schema.json"

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


class IncompleteRunError(FileNotFoundError):
    """A run or sweep directory lacks something the export needs; the message names every missing piece."""

    def __init__(self, path: str | Path, missing: Sequence[str]):
        self.path = Path(path)
        self.missing = list(missing)
        super().__init__(f"{self.path} is incomplete or corrupted: " + "; ".join(self.missing))


class SpecValidationError(ValueError):
    """An export that does not satisfy `spec_schema.json`; the message gives the JSON path."""


# --------------------------------------------------------------------------------------------
# Schema
# --------------------------------------------------------------------------------------------


def load_schema() -> dict[str, Any]:
    """The JSON Schema shipped with the package (`experiments/spec_schema.json`)."""
    text = importlib.resources.files("experiments").joinpath(SCHEMA_FILE).read_text()
    return json.loads(text)


def validate_spec(spec: Mapping[str, Any]) -> None:
    """Raise `SpecValidationError` (naming the JSON path and the rule) unless `spec` fits the schema."""
    import jsonschema

    schema = load_schema()
    validator_cls = jsonschema.validators.validator_for(schema)
    validator = validator_cls(schema, format_checker=validator_cls.FORMAT_CHECKER)
    errors = sorted(validator.iter_errors(spec), key=lambda e: list(e.absolute_path))
    if errors:
        first = errors[0]
        where = "/".join(str(p) for p in first.absolute_path) or "(top level)"
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        raise SpecValidationError(f"device spec does not match schema {SCHEMA_VERSION} at {where}: {first.message}{more}")


# --------------------------------------------------------------------------------------------
# Reading a run
# --------------------------------------------------------------------------------------------


@dataclass
class RunFacts:
    """What the export reads from one `compare` run directory."""

    path: Path
    config: dict[str, Any]
    rows: list[dict[str, Any]]
    summary: dict[str, Any]
    counters: dict[str, Any] = field(default_factory=dict)
    n_weights: int | None = None

    @property
    def run_id(self) -> str:
        return self.path.name

    @property
    def config_hash(self) -> str:
        return config_hash(self.config)

    def last(self, key: str) -> float | None:
        for r in reversed(self.rows):
            v = r.get(key)
            if v is not None:
                return v
        return None

    def column(self, key: str) -> list[float]:
        return [r[key] for r in self.rows if r.get(key) is not None]


def _read_json(path: Path, missing: list[str], what: str) -> Any:
    if not path.is_file():
        missing.append(f"missing {path.name} ({what})")
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        missing.append(f"unreadable {path.name} ({exc})")
        return None


def check_run_dir(run_dir: str | Path) -> RunFacts:
    """Read a `compare` run directory; raise `IncompleteRunError` naming everything missing."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise IncompleteRunError(run_dir, ["the directory does not exist"])
    missing: list[str] = []
    if not any((run_dir / n).exists() for n in ("config.toml", "metrics.jsonl", "summary.json", "checkpoints")):
        missing.append("neither a run directory (config.toml, metrics.jsonl, summary.json) nor a sweep directory "
                       "(sweep.json, sweep_manifest.json, points/, runs/)")
    config: dict[str, Any] | None = None
    cfg_path = run_dir / "config.toml"
    if not cfg_path.is_file():
        missing.append("missing config.toml (the resolved run configuration)")
    else:
        try:
            config = load_toml(cfg_path)
        except ConfigError as exc:
            missing.append(f"unreadable config.toml ({exc.allowed})")
    rows: list[dict[str, Any]] = []
    m_path = run_dir / "metrics.jsonl"
    if not m_path.is_file():
        missing.append("missing metrics.jsonl (the per-step metrics log)")
    else:
        for i, line in enumerate(m_path.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                missing.append(f"metrics.jsonl line {i} is not JSON (corrupted log)")
                break
        if not rows:
            missing.append("metrics.jsonl has no rows (the run logged no step)")
    summary = _read_json(run_dir / "summary.json", missing, "final figures written at the end of a run")
    if config is not None:
        mode = config.get("mode", "compare")
        if mode != "compare" and not (mode == "ep" and config.get("path") == "analog"):
            missing.append(f"config.toml mode is {mode!r}: a device spec needs an analog run (mode 'compare')")
    if rows:
        for key, what in (("analog_val_loss", "validation loss of the analog path"),
                          ("twin_val_loss", "validation loss of the digital twin")):
            if not any(r.get(key) is not None for r in rows):
                missing.append(f"metrics.jsonl has no {key} ({what})")
    if missing:
        raise IncompleteRunError(run_dir, missing)
    facts = RunFacts(run_dir, config or {}, rows, summary or {})
    facts.counters = dict(facts.summary.get("analog_counters") or {})
    facts.counters.update({k: v for k, v in checkpoint_pulse_counts(run_dir).items() if k not in facts.counters})
    facts.n_weights = _count_weights(run_dir, facts)
    return facts


def checkpoint_pulse_counts(run_dir: Path) -> dict[str, Any]:
    """Per-device pulse counters of the analog path found in the last checkpoint.

    The crossbar keeps a `pulse_count` tensor per tile (one entry per unit cell: the device of a
    weight, or the pair G+/G- of a differential cell); every such tensor in the analog path's state
    counts. Returns {} when the run has no checkpoint or the checkpoint no counters.
    """
    path = run_dir / "checkpoints" / "last.pt"
    if not path.is_file():
        return {}
    try:
        import torch

        ck = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - the export goes on without the counters, and says so
        logger.warning("cannot read checkpoint %s: %s", path, exc)
        return {}
    counts: list[Any] = []

    def walk(node: Any) -> None:
        if isinstance(node, Mapping):
            for k, v in node.items():
                if k == "pulse_count" and hasattr(v, "numel"):
                    counts.append(v)
                else:
                    walk(v)
        elif isinstance(node, (list, tuple)):
            for v in node:
                walk(v)

    paths = ck.get("paths", ck) if isinstance(ck, Mapping) else {}
    walk(paths.get("analog", paths) if isinstance(paths, Mapping) else paths)
    if not counts:
        return {}
    return {
        "max_pulses_per_device": float(max(float(c.max()) for c in counts)),
        "total_pulses": float(sum(float(c.double().sum()) for c in counts)),
        "n_weights": int(sum(int(c.numel()) for c in counts)),
        "checkpoint_step": ck.get("step") if isinstance(ck, Mapping) else None,
    }


def read_run(run_dir: str | Path) -> RunFacts:
    return check_run_dir(run_dir)


def _count_weights(run_dir: Path, facts: RunFacts) -> int | None:
    """Number of analog weights (cross-points): from the counters, else from `conductances.pt`."""
    n = facts.counters.get("n_weights") or facts.summary.get("n_analog_weights")
    if n:
        return int(n)
    path = run_dir / "conductances.pt"
    if path.is_file():
        try:
            import torch

            data = torch.load(path, weights_only=False, map_location="cpu")
            weights = data.get("start") or data.get("end") or {}
            total = sum(int(w.numel()) for w in weights.values())
            return total or None
        except Exception as exc:  # noqa: BLE001 - a figure we can do without
            logger.warning("cannot read %s: %s", path, exc)
    return None


# --------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------


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


def device_source(device: str, run_dir: Path | None = None) -> dict[str, Any]:
    """Where the device description came from: a library preset (a stand-in for a real device), a
    fit to a measured trace (with its fit error, from the file's ``[fit]`` table) or a user file."""
    from devices import preset_names

    if device in preset_names():
        return {"kind": "preset", "name": device, "stand_in": True, "path": None, "fit_error": None,
                "note": "library preset with aihwkit's published numbers: a stand-in for a real device, "
                        "not a measurement of yours"}
    path = Path(device)
    if not path.is_absolute() and run_dir is not None and not path.exists():
        path = run_dir / path
    data = load_toml(path) if path.is_file() else {}
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
_ALGORITHM_TABLES = {"mixed_precision": "mixed_precision", "ttv2": "transfer"}


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
        if table in ("mixed_precision", "transfer"):
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
    groups["read"]["read_average"] = _parameter("read_average", analog.get("read_average", 1))
    groups["read"]["noise_mode"] = {"value": analog.get("noise_mode", tile.get("noise_mode", "fresh")), "unit": "-",
                                    "meaning": "fresh: new read noise at every read; common: the same draws in the ± nudged phases"}
    groups["read"].pop("n_reads", None)  # the trainer sets it from read_average
    return {"mode": analog.get("periphery", "default"), "dac": groups["dac"], "adc": groups["adc"],
            "read": groups["read"], "update": groups["update"], "algorithm": algorithm, "other": groups["other"]}


def resolve_tile(config: Mapping[str, Any]) -> Any:
    """The run's `TileConfig`, resolved by the trainer exactly as the run resolved it."""
    from ept_hw.config import from_dict
    from trainer.analog import resolve_tile_config
    from trainer.config import AnalogConfig

    return resolve_tile_config(from_dict(AnalogConfig, dict(config.get("analog", {}))))


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
                 "simpler algorithm) such that v and every more demanding tested value keep the analog - digital "
                 "final validation-loss gap <= tolerance, every other axis at the base")
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


# --------------------------------------------------------------------------------------------
# Sweep directories
# --------------------------------------------------------------------------------------------


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
    table = _read_json(sweep_dir / "sweep.json", missing, "the sweep table written by `ept-hw sweep`")
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
    if base_rows[0].get("status") != "ok" or not base_rows[0].get("run_dir"):
        raise IncompleteRunError(sweep_dir, [f"the base point failed: {base_rows[0].get('error')}"])
    base = check_run_dir(_resolve(sweep_dir, base_rows[0]["run_dir"]))
    points = []
    for row in table["rows"]:
        run = None
        if row.get("status") == "ok" and row.get("run_dir") and row is not base_rows[0]:
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


def is_sweep_dir(path: str | Path) -> bool:
    path = Path(path)
    markers = ("sweep.json", "sweep_manifest.json", "points", "runs")
    return any((path / m).exists() for m in markers) and not (path / "config.toml").is_file()


# --------------------------------------------------------------------------------------------
# Build and export
# --------------------------------------------------------------------------------------------


def _read_source(source: Path) -> tuple[SweepFacts | None, RunFacts]:
    sweep = check_sweep_dir(source) if is_sweep_dir(source) else None
    return sweep, (sweep.base if sweep is not None else check_run_dir(source))


def build_spec(source: str | Path, *, tolerance: float | None = None,
               response_figures: Mapping[str, Any] | None = None,
               _facts: tuple[SweepFacts | None, RunFacts] | None = None) -> dict[str, Any]:
    """The `device_spec.json` mapping of a run or sweep directory (validated against the schema)."""
    source = Path(source)
    sweep, run = _facts if _facts is not None else _read_source(source)
    tile = resolve_tile(run.config)
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
                failed += row.get("status") != "ok"
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
                      "points": len(sweep.points), "failed_points": failed}
    spec["provenance"] = {"software": _software(), "runs": runs, "sweep": sweep_info}
    validate_spec(spec)
    return spec


@dataclass
class ExportResult:
    spec_path: Path
    markdown_path: Path
    pdf_path: Path | None
    plots: list[Path]
    spec: dict[str, Any]


def _pulse_response(device_cfg: Any, plot_path: Path, n_devices: int = 256, seed: int = 0) -> dict[str, Any] | None:
    """Run the devices package's pulse-response protocol, plot it, return its derived figures."""
    if getattr(device_cfg, "is_ideal", False):
        return None
    from devices.response import derived_figures, plot_response, run_pulse_response

    response = run_pulse_response(device_cfg, n_devices=n_devices, seed=seed, n_traces=12)
    plot_response(plot_path, response, title=f"pulse response: {device_cfg.model} ({n_devices} sampled devices)")
    return derived_figures(response)


def _plot_losses(run: RunFacts, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.0, 3.6))
    for p, color, label in (("analog", "tab:red", "analog"), ("twin", "tab:blue", "digital twin")):
        tr = [(r["step"], r[f"{p}_loss"]) for r in run.rows if r.get(f"{p}_loss") is not None]
        va = [(r["step"], r[f"{p}_val_loss"]) for r in run.rows if r.get(f"{p}_val_loss") is not None]
        if tr:
            ax.plot(*zip(*tr), color=color, alpha=0.35, lw=0.8, label=f"{label} train")
        if va:
            ax.plot(*zip(*va), "o-", color=color, lw=1.6, label=f"{label} validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss [nats/token]")
    ax.set_title(f"loss curves: {run.run_id}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _fmt(v: Any) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _markdown(spec: Mapping[str, Any], plots: Sequence[Path], out_dir: Path) -> str:
    dev, per, der, tr, req, prov = (spec[k] for k in ("device", "periphery", "derived", "training", "requirements", "provenance"))
    src = dev["source"]
    lines = [
        f"# Device specification — {dev['model']} ({dev['class']})",
        "",
        f"Schema {spec['schema_version']}, created {spec['created']} by ept-hw {prov['software']['version']}"
        + (f" (commit {prov['software']['git_commit'][:10]})" if prov["software"].get("git_commit") else "") + ".",
        "",
        "## Where the device description comes from",
        "",
    ]
    if src["kind"] == "preset":
        lines.append(f"Library preset `{src['name']}`: **a stand-in** with aihwkit's published numbers, not a measured device.")
    elif src["kind"] == "fit":
        fe = src.get("fit_error")
        lines.append(f"Fit to the measured trace `{src['name']}` (file `{src['path']}`); fit error: "
                     + (f"{fe['value']:.4g} {fe.get('unit', '')} ({fe['metric']})" if fe else "not stated")
                     + (f"; one-step RMS {fe['step_rms']:.3g} of the mean step" if fe and "step_rms" in fe else "") + ".")
    else:
        lines.append(f"User file `{src['path']}`.")
    lines += ["", "## Training result (base configuration)", "",
              "| figure | value | unit |", "|---|---|---|",
              f"| steps | {tr['steps']} | |"]
    for key in ("analog_final_val_loss", "twin_final_val_loss", "gap", "unigram_entropy"):
        if key in tr:
            lines.append(f"| {key.replace('_', ' ')} | {_fmt(tr[key]['value'])} | {tr[key]['unit']} |")
    lines += ["", "## Requirements", ""]
    if req["rows"]:
        lines += [f"Tolerance: analog − digital validation-loss gap ≤ **{req['tolerance']['value']:g} nats**. "
                  f"Criterion: {req['criterion']}.", "",
                  "| axis | required (weakest passing) | status | base | unit | weaker means | tested (value: gap) |",
                  "|---|---|---|---|---|---|---|"]
        for r in req["rows"]:
            tested = ", ".join(f"{t['value']}: {'diverged' if t['gap'] is None else _fmt(t['gap'])}" for t in r["tested"])
            flag = " (non-monotone)" if r.get("non_monotone") else ""
            lines.append(f"| `{r['axis']}` | **{_fmt(r['required'])}**{flag} | {r['status']} | {_fmt(r.get('base_value'))} "
                         f"| {r['unit']} | {r['weaker_means']} | {tested} |")
    else:
        lines.append(req.get("note", "no requirements"))
    lines += ["", "## Derived figures", "", "| figure | value | unit | how |", "|---|---|---|---|"]
    for name, f in der.items():
        note = f" ({f['note']})" if f.get("note") else ""
        lines.append(f"| {name.replace('_', ' ')} | {_fmt(f['value'])} | {f['unit']} | {f['how']}{note} |")
    lines += ["", "## Device parameters (aihwkit names)", "", "| parameter | value | unit |", "|---|---|---|"]
    for name, p in dev["parameters"].items():
        lines.append(f"| `{name}` | {_fmt(p['value'])} | {p['unit']} |")
    lines += ["", f"## Periphery (mode `{per['mode']}`, update algorithm `{per['algorithm']['name']}`)", "",
              "| group | parameter | value | unit |", "|---|---|---|---|"]
    for group in ("dac", "adc", "read", "update", "other"):
        for name, p in per.get(group, {}).items():
            meaning = f" ({p['meaning']})" if p.get("meaning") else ""
            lines.append(f"| {group} | `{name}` | {_fmt(p['value'])}{meaning} | {p['unit']} |")
    if plots:
        lines += ["", "## Plots", ""]
        for p in plots:
            lines += [f"![{p.stem}]({p.relative_to(out_dir).as_posix()})", ""]
    lines += ["## Provenance", "", "| run | role | config hash |", "|---|---|---|"]
    for r in prov["runs"]:
        lines.append(f"| `{r['run_id']}` | {r['role']} | `{r['config_hash']}` |")
    if prov.get("sweep"):
        s = prov["sweep"]
        lines.append(f"\nSweep `{s['path']}`: {s['points']} points, {s['failed_points']} failed.")
    lines += ["", "Units: " + "; ".join(f"{k}: {v}" for k, v in spec["units_convention"].items()) + "."]
    return "\n".join(lines) + "\n"


def _write_pdf(spec: Mapping[str, Any], markdown: str, plots: Sequence[Path], path: Path) -> Path:
    """The datasheet as a PDF: the text pages of the Markdown, then one page per plot."""
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.backends.backend_pdf import PdfPages

    text_lines: list[str] = []
    for line in markdown.splitlines():
        if line.startswith("!["):
            continue
        text_lines.extend(textwrap.wrap(line, 118) or [""])
    per_page = 70
    with PdfPages(path) as pdf:
        for start in range(0, len(text_lines), per_page):
            fig = plt.figure(figsize=(8.27, 11.69))
            fig.text(0.04, 0.98, "\n".join(text_lines[start:start + per_page]), va="top", ha="left",
                     family="monospace", fontsize=6.2)
            pdf.savefig(fig)
            plt.close(fig)
        for p in plots:
            fig = plt.figure(figsize=(8.27, 5.8))
            ax = fig.add_axes((0.02, 0.02, 0.96, 0.96))
            ax.imshow(plt.imread(p))
            ax.axis("off")
            pdf.savefig(fig)
            plt.close(fig)
        info = pdf.infodict()
        info["Title"] = f"ept-hw device specification: {spec['device']['model']}"
        info["Creator"] = "ept-hw"
    return path


def export_spec(source: str | Path, out_dir: str | Path, *, pdf: bool = False, tolerance: float | None = None,
                pulse_response: bool = True) -> ExportResult:
    """Write `device_spec.json`, `device_spec.md`, `plots/*.png` (and `device_spec.pdf`) into `out_dir`.

    Nothing is written unless the source reads completely and the spec validates.
    """
    source = Path(source)
    facts = _read_source(source)
    sweep, run = facts
    device_cfg = resolve_tile(run.config).device_config()
    out = Path(out_dir)
    plot_dir = out / "plots"
    plot_dir.mkdir(parents=True, exist_ok=True)
    plots: list[Path] = []
    figures = None
    if pulse_response:
        figures = _pulse_response(device_cfg, plot_dir / "pulse_response.png")
        if figures is not None:
            plots.append(plot_dir / "pulse_response.png")
    spec = build_spec(source, tolerance=tolerance, response_figures=figures, _facts=facts)
    plots.append(_plot_losses(run, plot_dir / "loss_curves.png"))
    if sweep is not None:
        table = sweep.table
        tol = spec["requirements"]["tolerance"]["value"]
        plots += plot_gaps(table["rows"], list(table["axes"]), tol, out, table.get("base_values") or {})
    spec_path = out / "device_spec.json"
    tmp = spec_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(spec, indent=2, allow_nan=False))
    os.replace(tmp, spec_path)
    markdown = _markdown(spec, plots, out)
    md_path = out / "device_spec.md"
    md_path.write_text(markdown)
    pdf_path = _write_pdf(spec, markdown, plots, out / "device_spec.pdf") if pdf else None
    return ExportResult(spec_path, md_path, pdf_path, plots, spec)
