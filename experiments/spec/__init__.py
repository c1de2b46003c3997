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

Split by job: `schema` (the shipped JSON Schema and validation), `build` (the spec mapping from a
run or a sweep), `render` (Markdown, PDF and plots), `export` (writing the files). Runs are read
by `experiments.runfacts`.
"""

from __future__ import annotations

from experiments.runfacts import IncompleteRunError, RunFacts, check_run_dir, read_run

from .build import (
    PARAMETER_UNITS, UNITS_CONVENTION, SweepFacts, build_spec, check_sweep_dir, derived_section, device_source,
    is_sweep_dir, periphery_section, requirements_section, resolve_tile, training_section,
)
from .export import ExportResult, export_spec
from .schema import SCHEMA_VERSION, SpecValidationError, load_schema, validate_spec

__all__ = [
    "SCHEMA_VERSION", "IncompleteRunError", "SpecValidationError", "load_schema", "validate_spec", "RunFacts",
    "read_run", "check_run_dir", "check_sweep_dir", "device_source", "build_spec", "ExportResult", "export_spec",
    "PARAMETER_UNITS", "periphery_section", "resolve_tile", "is_sweep_dir",
    "UNITS_CONVENTION", "SweepFacts", "derived_section", "requirements_section", "training_section",
]
