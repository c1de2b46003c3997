"""Run configuration: model preset + data + solver + estimator + training + stabilisers + analog
path + divergence rules + seed, as one dataclass saved to `runs/NAME/config.toml`.

A preset is a TOML file holding any subset of these tables; `run_config_from(file, overrides)`
merges dataclass defaults < preset file < explicit overrides. The named model presets live with
the experiments (`experiments.presets`: `load_run_config(name, overrides)`), which pass the file
in. The model's `vocab_size` is not part of a preset: it is set from the tokenizer (`resolve_vocab`).

Modes:
- "compare": analog and digital twin side by side (the main job);
- "ep": one EP path (`path` = "twin" digital or "analog"); with `training.optimizer = "adamw"` on
  the digital path it is the best-digital reference of SCIENCE §5;
- "bptt": BPTT through the unrolled Euler free phase of the same block, same stabilisers;
- "bp": a standard (non-equilibrium) pre-LN transformer of matched width, trained by backprop.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch

from crossbar.config import TileConfig
from ept_hw.config import (
    ConfigError, check_choice, check_partial, check_positive_int, check_range, check_torch_device, from_dict,
    load_toml, merge, to_dict,
)
from ept_hw.estimators import EstimatorConfig
from ept_hw.model import COMPILE_BACKENDS, ModelConfig
from ept_hw.relaxation import SolverConfig
from ept_hw.stability import EigRegConfig

from .controllers import ControllerConfig, ScheduleConfig
from .data import DataConfig
from .divergence import DivergenceConfig

__all__ = [
    "TrainingConfig",
    "StabiliserConfig",
    "AnalogConfig",
    "RunConfig",
    "run_config_from",
    "run_config_from_dict",
    "migrate_legacy_keys",
    "resolve_vocab",
    "merge",
]

logger = logging.getLogger(__name__)

MODES = ("compare", "ep", "bptt", "bp")


@dataclass(frozen=True)
class TrainingConfig:
    """Optimisation and logging.

    `lr` is the step of plain SGD on the mean-CE gradient (the twin rule, both paths): every
    projection gets W ← W − lr·Σ δuᵀ through `apply_update`, the digital periphery
    p ← p − lr·periphery_lr_scale·g. With `optimizer = "adamw"` (digital paths only) `lr` is
    AdamW's learning rate for every parameter.
    """

    steps: int = 200
    batch_size: int = 16
    seq_len: int = 64
    lr: float = 0.3
    periphery_lr_scale: float = 1.0
    optimizer: str = "sgd"  # "sgd" | "adamw"
    beta1: float = 0.9
    beta2: float = 0.95
    weight_decay: float = 0.0
    ema: float = 0.0  # parameter EMA decay for evaluation (0 = off)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    eval_interval: int = 50
    eval_batches: int = 4
    # The final figure: at the last step every path is evaluated on a fixed validation set of at
    # least this many target tokens (`trainer.data.fixed_windows`: non-overlapping windows spread
    # evenly over the validation split, the same for every run), with standard errors and the
    # bigram table scored on the same tokens; 0 = off (the final figure is the last logged
    # evaluation of `eval_batches` random windows).
    final_eval_tokens: int = 0
    health_interval: int = 0  # every k steps: estimator health (twin), adjoint SNR (analog); 0 = off
    # Leading eigenvalues of the relaxation (Re mu, |Im mu| of J, largest |lambda| of I + eps J)
    # every k steps, on one validation sequence (the worst of the first validation batch);
    # -1 = at every evaluation (and at step 0), 0 = off. On the analog path they are taken on the
    # arrays' read-out weights (a digital copy), not through noisy reads.
    stability_every: int = -1
    stability_k: int = 1  # eigenvalues per ARPACK run (1 is enough for the leading one; measured 52 matvecs at the demo size)
    stability_tol: float = 1e-3  # ARPACK tolerance (Re mu to ~1e-3; 1e-4 costs 1.6x the matvecs at the demo size)
    checkpoint_interval: int = 50
    bptt_steps: int = 60  # unrolled Euler steps in mode "bptt"
    # Digital-parameter groups left untrained on every path ("embeddings", "layernorm", "ffn_bias",
    # "qknorm"). On the analog path the LayerNorm gradient is a sum over tokens of transposed reads
    # whose true value nearly cancels, so read noise dominates it (measured at the demo preset:
    # 700x the twin's norm, cosine 0.04).
    frozen: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        check_positive_int("training.steps", self.steps)
        check_positive_int("training.batch_size", self.batch_size)
        check_positive_int("training.seq_len", self.seq_len)
        check_range("training.lr", self.lr, 0.0, None, lo_open=True)
        check_range("training.periphery_lr_scale", self.periphery_lr_scale, 0.0)
        check_choice("training.optimizer", self.optimizer, ("sgd", "adamw"))
        check_range("training.beta1", self.beta1, 0.0, 1.0, hi_open=True)
        check_range("training.beta2", self.beta2, 0.0, 1.0, hi_open=True)
        check_range("training.weight_decay", self.weight_decay, 0.0)
        check_range("training.ema", self.ema, 0.0, 1.0, hi_open=True)
        check_positive_int("training.eval_interval", self.eval_interval)
        check_positive_int("training.eval_batches", self.eval_batches)
        check_positive_int("training.final_eval_tokens", self.final_eval_tokens, minimum=0)
        check_positive_int("training.health_interval", self.health_interval, minimum=0)
        check_positive_int("training.stability_every", self.stability_every, minimum=-1)
        check_positive_int("training.stability_k", self.stability_k)
        check_range("training.stability_tol", self.stability_tol, 0.0, None)
        check_positive_int("training.checkpoint_interval", self.checkpoint_interval)
        check_positive_int("training.bptt_steps", self.bptt_steps)
        for group in self.frozen:
            check_choice("training.frozen", group, ("embeddings", "layernorm", "ffn_bias", "qknorm"))


@dataclass(frozen=True)
class StabiliserConfig:
    """Stabilisers (SCIENCE §4). Default recipe: resreg 0.2, jacreg frozen at 0.1, gate off.

    - resreg (its gradient has the port form δuᵀ and goes through the pulses): the update of
      ‖εF(z*)‖²/(‖z*‖² + δ), rescaled so that its norm is `resreg` times the norm of the task (EP)
      update (`resreg_relative`; the scalar is computed digitally), or `resreg` times the plain
      gradient otherwise. `resreg_source`: "readout" (default; exact weights on both paths: on the
      analog path a digital assist on the read-out weights, like jacreg) or "arrays" (on-chip: the
      path's own reads at the window-mean state with the window-averaged force; see
      `trainer.stabilisers.Resreg` for why it is not the default).
    - jacreg (digital assist on the analog path: computed on a digital copy programmed from the
      arrays' read-out weights, then applied through the pulses): λ·‖J_nc v‖²/‖v‖² on a Gaussian
      probe v, J_nc v by a central difference of F with step `jacreg_fd_step`; λ from the
      controller (`jacreg`, frozen unless enabled).
    - eigreg (digital assist on the analog path, like jacreg: computed on the read-out weights):
      the `[stabilisers.eigreg]` table (`ept_hw.stability.EigRegConfig`; ε is the solver's):
      `weight`·relu(x − `margin`)² on the leading eigenvalue pair of I + εJ at the free-phase
      state of the worst sample of the batch, x = |λ| (`on = "abs_lambda"`) or Re μ
      (`"re_mu"`: set the margin on Re μ then, e.g. −0.05), by subspace iteration
      (`ept_hw.stability.model_eigreg`, `iters` iterations of a `block` basis, warm started from
      the previous step's). Its dense projection gradients go through `apply_update` in port form
      (u = identity rows, δ = gradient columns), pulsed on the analog path. Off by default
      (`weight = 0`).
    - the validity gate skips the EP nudge when the noise-aware residual exceeds `gate_level`;
      the stabilisers are still applied on a gated step.
    """

    resreg: float = 0.2
    resreg_relative: bool = True
    resreg_delta: float = 1e-8
    resreg_source: str = "readout"  # "readout" (exact weights, both paths) | "arrays" (on-chip reads)
    jacreg: ControllerConfig = field(default_factory=ControllerConfig)
    jacreg_on: bool = True
    jacreg_fd_step: float = 1e-2
    gate: bool = False
    gate_level: float = 1e-2
    eigreg: EigRegConfig = field(default_factory=lambda: EigRegConfig(weight=0.0, iters=10, block=6))

    def __post_init__(self) -> None:
        check_range("stabilisers.resreg", self.resreg, 0.0)
        check_choice("stabilisers.resreg_source", self.resreg_source, ("readout", "arrays"))
        check_range("stabilisers.resreg_delta", self.resreg_delta, 0.0, None, lo_open=True)
        check_range("stabilisers.jacreg_fd_step", self.jacreg_fd_step, 0.0, 1.0, lo_open=True)
        check_range("stabilisers.gate_level", self.gate_level, 0.0, None, lo_open=True)
        for key in ("resreg_relative", "jacreg_on", "gate"):
            if not isinstance(getattr(self, key), bool):
                raise ConfigError(f"stabilisers.{key}", getattr(self, key), "true or false")


@dataclass(frozen=True)
class AnalogConfig:
    """The analog path: device, periphery and the physics choices of the relaxation.

    `device` is a device preset name (`devices.presets`) or a TOML file. `periphery = "perfect"`
    replaces the preset's IO (DAC/ADC, noise, bounds) by ideal periphery; "default" keeps the
    preset's own. `tile` overrides the resolved tile's own settings (`crossbar.config.TileConfig`,
    declared there, e.g. `noise_mode = "common"`: the ± nudged phases read the same noise draws;
    `n_reads`: reads averaged per MVM; `[analog.tile.update] mode = "exact"`); it is applied
    after `periphery`, and `device` is set by `analog.device`, not here. The free phase stops on
    a noise-aware criterion: the drift of the state over a window of `noise_window` Euler steps
    (‖z_t − z_{t−W}‖/(W‖z̄‖), the residual of the time-averaged dynamics), or when it has not
    improved for `stop_patience` steps (at the floor), or, with `stop_floor_factor` κ > 0, as soon
    as that drift is within κ of the read-noise level of a W-step mean estimated from the window
    itself (`ept_hw.relaxation.WindowStop`); 0 turns that rule off.
    """

    device: str = "ideal"
    periphery: str = "default"  # "default" | "perfect"
    noise_window: int = 10
    stop_patience: int = 30
    stop_floor_factor: float = 1.0
    tile: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.device, str) or not self.device:
            raise ConfigError("analog.device", self.device, "a device preset name or a TOML file")
        check_choice("analog.periphery", self.periphery, ("default", "perfect"))
        check_positive_int("analog.noise_window", self.noise_window)
        check_positive_int("analog.stop_patience", self.stop_patience)
        check_range("analog.stop_floor_factor", self.stop_floor_factor, 0.0)
        check_partial(TileConfig, self.tile, "analog.tile.")
        if "device" in self.tile:
            raise ConfigError("analog.tile.device", self.tile["device"], "not set here (set analog.device)")


@dataclass(frozen=True)
class RunConfig:
    mode: str = "compare"
    path: str = "twin"  # mode "ep": which path ("twin" = digital, "analog")
    seed: int = 0
    # The data order (training batches, evaluation batches) is drawn from `data_seed` when set,
    # else from `seed`; a multi-seed sweep changes `seed` (initial weights, device samples, noise
    # streams) on the same data order. None (the default) is dropped from config.toml.
    data_seed: int | None = None
    dtype: str = "float32"
    # Where the run's tensors live: "cpu", "cuda" or "cuda:N" (`--torch-device`); checked against
    # the machine when a run starts (`ept_hw.config.resolve_torch_device`), not when a config loads.
    torch_device: str = "cpu"
    # torch.compile for the digital (twin) path's plain force evaluations (free and nudged phases,
    # the nudge's Jᵀv):
    # "none", "inductor" (faster per evaluation, seconds to compile each new shape) or "aot_eager"
    # (bit-identical, for tests); see `EquilibriumTransformer.compile_force`. The analog path's
    # force, whose reads draw from the tiles' generators, always runs eager.
    compile: str = "none"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    solver: SolverConfig = field(default_factory=lambda: SolverConfig(min_steps=0, tol=1e-4, max_steps=300))
    estimator: EstimatorConfig = field(default_factory=lambda: EstimatorConfig(nudge="centered", t2sel=0))
    training: TrainingConfig = field(default_factory=TrainingConfig)
    stabilisers: StabiliserConfig = field(default_factory=StabiliserConfig)
    analog: AnalogConfig = field(default_factory=AnalogConfig)
    divergence: DivergenceConfig = field(default_factory=DivergenceConfig)

    def __post_init__(self) -> None:
        check_choice("mode", self.mode, MODES)
        check_choice("path", self.path, ("twin", "analog"))
        check_positive_int("seed", self.seed, minimum=0)
        if self.data_seed is not None:
            check_positive_int("data_seed", self.data_seed, minimum=0)
        check_choice("dtype", self.dtype, ("float32", "float64"))
        check_torch_device("torch_device", self.torch_device)
        check_choice("compile", self.compile, COMPILE_BACKENDS)
        if self.training.seq_len > self.model.context:
            raise ConfigError(
                "training.seq_len", self.training.seq_len, f"at most model.context = {self.model.context}"
            )
        if self.uses_analog:
            if self.training.optimizer != "sgd":
                raise ConfigError(
                    "training.optimizer", self.training.optimizer,
                    "'sgd' on the analog path (an array learns only by pulsed port updates; AdamW is a digital reference)",
                )
            if self.solver.method != "euler":
                raise ConfigError(
                    "solver.method", self.solver.method,
                    "'euler' on the analog path (the circuit integrates its ODE: Anderson can land on a root the "
                    "circuit never reaches, adaptive steps chase noise)",
                )
            if self.estimator.nudge == "holomorphic" and self.estimator.points >= 3:
                raise ConfigError(
                    "estimator.points", self.estimator.points,
                    "2 on the analog path (holomorphic EP with N >= 3 needs complex arithmetic that a crossbar "
                    "does not have; N = 2 is the real centered pair)",
                )
        if self.mode in ("bptt", "bp") and self.path != "twin":
            raise ConfigError("path", self.path, f"'twin' in mode {self.mode!r} (digital only)")

    @property
    def order_seed(self) -> int:
        """The seed of the data order: `data_seed` when set, else `seed`."""
        return self.seed if self.data_seed is None else self.data_seed

    @property
    def uses_analog(self) -> bool:
        return self.mode == "compare" or (self.mode == "ep" and self.path == "analog")

    @property
    def torch_dtype(self):
        return {"float32": torch.float32, "float64": torch.float64}[self.dtype]

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)


#: Keys that moved (older config files and `--set` lines): old dotted key -> its one home now.
#: `stabilisers.eigreg` as a number is the weight of the `[stabilisers.eigreg]` table.
LEGACY_KEYS = {
    "analog.noise_mode": "analog.tile.noise_mode",
    "analog.read_average": "analog.tile.n_reads",
    "analog.update_mode": "analog.tile.update.mode",
    "stabilisers.eigreg": "stabilisers.eigreg.weight",
    "stabilisers.eigreg_margin": "stabilisers.eigreg.margin",
    "stabilisers.eigreg_on": "stabilisers.eigreg.on",
    "stabilisers.eigreg_iters": "stabilisers.eigreg.iters",
    "stabilisers.eigreg_block": "stabilisers.eigreg.block",
}


def migrate_legacy_keys(data: Mapping[str, Any]) -> dict[str, Any]:
    """`data` (nested tables of `RunConfig`) with the keys of `LEGACY_KEYS` moved to their home;
    a value given under both names is refused. Runs written before the move (their
    `config.toml`) and `--set analog.update_mode=exact` keep working."""
    out = copy.deepcopy(dict(data))
    for old, new in LEGACY_KEYS.items():
        table_key, _, leaf = old.rpartition(".")
        table = out.get(table_key)
        if not isinstance(table, dict) or leaf not in table:
            continue
        value = table[leaf]
        if old == "stabilisers.eigreg" and isinstance(value, Mapping):
            continue  # already the new table
        del table[leaf]
        logger.info("config key %s is now %s", old, new)
        node = out
        *heads, last = new.split(".")
        for head in heads:
            node = node.setdefault(head, {})
            if not isinstance(node, dict):
                raise ConfigError(old, value, f"moved to {new}, which is not a table here")
        if last in node and node[last] != value:
            raise ConfigError(old, value, f"one value: it moved to {new}, which is also given ({node[last]!r})")
        node[last] = value
    return out


def run_config_from_dict(data: Mapping[str, Any]) -> RunConfig:
    """`RunConfig` from nested tables (a `config.toml`), keys of older files migrated."""
    return from_dict(RunConfig, migrate_legacy_keys(data))


def run_config_from(preset_file: str | Path | None = None, overrides: Mapping[str, Any] | None = None) -> RunConfig:
    """Defaults < preset file (a TOML file of `RunConfig` tables) < overrides (nested tables)."""
    data: dict[str, Any] = {}
    if preset_file is not None:
        data = migrate_legacy_keys(load_toml(preset_file))
        if "vocab_size" in data.get("model", {}):
            raise ConfigError("model.vocab_size", data["model"]["vocab_size"], "not set in a preset (it comes from the tokenizer)")
    if overrides:
        data = merge(data, migrate_legacy_keys(overrides))
    return run_config_from_dict(data)


def resolve_vocab(cfg: RunConfig, vocab_size: int) -> RunConfig:
    """The config with `model.vocab_size` set from the tokenizer."""
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=vocab_size))
