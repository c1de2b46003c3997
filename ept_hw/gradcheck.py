"""The gradient check behind `ept-hw gradcheck`: EP against the implicit and BPTT references.

A random block (seeded), a random batch, the free phase relaxed to a tight tolerance, then the EP
estimate compared per parameter group with the IFT gradient at z* and with BPTT through the
unrolled Euler free phase. Defaults: a small float64 block that converges, and the reference EP
recipe of SCIENCE §5 (holomorphic N = 2, r = 0.02, tracking AsymEP, T2 20, t2sel 40).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from .config import check_choice, check_positive_int
from .estimators import EPEstimator, EstimatorConfig, compare_gradients
from .model import EquilibriumTransformer, ModelConfig
from .projection import digital_factory
from .references import bptt_gradient, implicit_gradient
from .relaxation import SolverConfig

__all__ = ["GradcheckConfig", "run_gradcheck"]


@dataclass(frozen=True)
class GradcheckConfig:
    """The block (`model`), the EP recipe (`estimator`) and the free phase (`solver`) of a gradient
    check, each the project's own config, plus the batch, seed, dtype and BPTT length."""

    model: ModelConfig = field(default_factory=lambda: ModelConfig(vocab_size=16, context=8, width=16, heads=2))
    estimator: EstimatorConfig = field(default_factory=EstimatorConfig)  # holomorphic N = 2, r 0.02, tracking, T2 20, t2sel 40
    solver: SolverConfig = field(default_factory=lambda: SolverConfig(tol=1e-11, max_steps=2000))  # eps 0.1
    batch: int = 3
    seed: int = 0
    dtype: str = "float64"
    bptt_steps: int = 0  # 0: as many steps as the free phase took, plus 100

    def __post_init__(self) -> None:
        check_positive_int("batch", self.batch)
        check_positive_int("seed", self.seed, 0)
        check_positive_int("bptt_steps", self.bptt_steps, 0)
        check_choice("dtype", self.dtype, ("float64", "float32"))


def run_gradcheck(cfg: GradcheckConfig) -> dict[str, Any]:
    """Returns {"residual", "converged", "groups": {group: {cos_implicit, cos_bptt, norm_ratio_implicit, norm_ratio_bptt}}}.

    When the free phase does not converge, the references are still computed at the final state
    (the numbers then say how wrong EP is there) and "converged" is false.
    """
    dtype = {"float64": torch.float64, "float32": torch.float32}[cfg.dtype]
    gen = torch.Generator().manual_seed(cfg.seed)
    m = cfg.model
    model = EquilibriumTransformer(m, digital_factory, gen, dtype)
    idx = torch.randint(0, m.vocab_size, (cfg.batch, m.context), generator=gen)
    targets = torch.randint(0, m.vocab_size, (cfg.batch, m.context), generator=gen)
    solver, est_cfg = cfg.solver, cfg.estimator
    estimate = EPEstimator(est_cfg, solver).compute(model, idx, targets)
    free = estimate.free
    implicit = implicit_gradient(model, idx, targets, solver, free=free)
    steps = cfg.bptt_steps or free.n_steps + 100
    bptt = bptt_gradient(model, idx, targets, steps, solver.eps)
    vs_implicit = compare_gradients(estimate, implicit)
    vs_bptt = compare_gradients(estimate, bptt)
    groups = {
        name: {
            "cos_implicit": vs_implicit[name][0],
            "cos_bptt": vs_bptt[name][0],
            "norm_ratio_implicit": vs_implicit[name][1],
            "norm_ratio_bptt": vs_bptt[name][1],
        }
        for name in vs_implicit
    }
    return {
        "residual": free.residual_max,
        "converged": bool(free.converged),
        "loss": estimate.loss,
        "bptt_steps": steps,
        "groups": groups,
    }
