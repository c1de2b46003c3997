"""Data, training loops, the twin runner, controllers, checkpoints.

Public API (imported from the submodules; this package imports nothing eagerly):

- `trainer.config`: `RunConfig` (mode, path, seed, model, data, solver, estimator, training,
  stabilisers, analog, divergence), `run_config_from(preset_file, overrides)` (named presets:
  `experiments.presets.load_run_config`).
- `trainer.loop`: `run(cfg, run_dir, resume=False, init_ckpt=None, progress=False) -> RunResult`,
  `build_paths(cfg)`, `load_run(run_dir)`, `physics_notes(cfg)`.
- `trainer.twin`: the `TrainingPath` protocol, `EPPath` (EP on the analog arrays or the twin, or
  BPTT; built by `build_ep_path`), `BPPath`, `StepOutcome`, `readout_copy`.
- `trainer.stabilisers`: `Resreg`, `Jacreg`, `Eigreg` (each returns a `PortUpdate`), `PortUpdates`.
- `trainer.optimisers`: `SGDSink`, `AdamWSink` (where a step's port updates go).
- `trainer.analog`: `resolve_tile_config(AnalogConfig)`, `build_analog_factory`, `CommonNoise`.
- `trainer.data`: `DataConfig`, `prepare_data`, `sample_batch`, `unigram_entropy`, tokenizers.
- `trainer.checkpoint`, `trainer.metrics`, `trainer.divergence`, `trainer.controllers`,
  `trainer.sampling`.
"""
