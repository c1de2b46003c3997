"""Data, training loops, the twin runner, controllers, checkpoints.

Public API (imported from the submodules; this package imports nothing eagerly):

- `trainer.config`: `RunConfig` (mode, path, seed, model, data, solver, estimator, training,
  stabilisers, analog, divergence), `load_run_config(preset, overrides)`, `preset_names()`.
- `trainer.loop`: `run(cfg, run_dir, resume=False, init_ckpt=None, progress=False) -> RunResult`,
  `build_paths(cfg)`, `load_run(run_dir)`, `physics_notes(cfg)`.
- `trainer.twin`: `EPPath` (analog or twin), `BPTTPath`, `BPPath`, `StepOutcome`.
- `trainer.physics`: `noise_aware_free_phase(force, z0, solver, window, patience)`.
- `trainer.analog`: `resolve_tile_config(AnalogConfig)`, `build_analog_factory`, `CommonNoise`.
- `trainer.data`: `DataConfig`, `prepare_data`, `sample_batch`, `unigram_entropy`, tokenizers.
- `trainer.checkpoint`, `trainer.metrics`, `trainer.divergence`, `trainer.controllers`,
  `trainer.sampling`.
"""
