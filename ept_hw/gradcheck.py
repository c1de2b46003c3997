"""The gradient check behind `ept-hw gradcheck`: EP against the implicit and BPTT references.

A random block (seeded), a random batch, the free phase relaxed to a tight tolerance, then the EP
estimate compared per parameter group with the IFT gradient at z* and with BPTT through the
unrolled Euler free phase. Defaults: a small float64 block that converges, and the reference EP
recipe of SCIENCE §5 (holomorphic N = 2, r = 0.02, tracking AsymEP, T2 20, t2sel 40).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .config import check_choice, check_positive_int, check_range
from .estimators import CORRECTIONS, NUDGES, EPEstimator, EstimatorConfig, compare_gradients
from .model import EquilibriumTransformer, ModelConfig
from .projection import digital_factory
from .references import bptt_gradient, implicit_gradient
from .relaxation import SolverConfig

__all__ = ["GradcheckConfig", "run_gradcheck"]


@dataclass(frozen=True)
class GradcheckConfig:
    vocab_size: int = 16
    context: int = 8
    width: int = 16
    heads: int = 2
    batch: int = 3
    seed: int = 0
    resinit: float = 0.1
    dtype: str = "float64"
    nudge: str = "holomorphic"
    beta: float = 0.02
    points: int = 2
    correction: str = "tracking"
    t2: int = 20
    t2sel: int = 40
    eps: float = 0.1
    tol: float = 1e-11  # free-phase residual tolerance
    max_steps: int = 2000
    bptt_steps: int = 0  # 0: as many steps as the free phase took, plus 100

    def __post_init__(self) -> None:
        for key in ("vocab_size", "context", "width", "heads", "batch", "t2", "max_steps"):
            check_positive_int(key, getattr(self, key))
        check_positive_int("seed", self.seed, 0)
        check_positive_int("t2sel", self.t2sel, 0)
        check_positive_int("bptt_steps", self.bptt_steps, 0)
        check_choice("dtype", self.dtype, ("float64", "float32"))
        check_choice("nudge", self.nudge, NUDGES)
        check_choice("correction", self.correction, CORRECTIONS)
        check_range("beta", self.beta, 0.0, lo_open=True)
        check_range("eps", self.eps, 0.0, 1.0, lo_open=True)
        check_range("tol", self.tol, 0.0, lo_open=True)
        check_range("resinit", self.resinit, 0.0)


def run_gradcheck(cfg: GradcheckConfig) -> dict[str, Any]:
    """Returns {"residual", "converged", "groups": {group: {cos_implicit, cos_bptt, norm_ratio_implicit, norm_ratio_bptt}}}.

    When the free phase does not converge, the references are still computed at the final state
    (the numbers then say how wrong EP is there) and "converged" is false.
    """
    dtype = {"float64": torch.float64, "float32": torch.float32}[cfg.dtype]
    gen = torch.Generator().manual_seed(cfg.seed)
    model_cfg = ModelConfig(
        vocab_size=cfg.vocab_size, context=cfg.context, width=cfg.width, heads=cfg.heads, resinit=cfg.resinit
    )
    model = EquilibriumTransformer(model_cfg, digital_factory, gen, dtype)
    idx = torch.randint(0, cfg.vocab_size, (cfg.batch, cfg.context), generator=gen)
    targets = torch.randint(0, cfg.vocab_size, (cfg.batch, cfg.context), generator=gen)
    solver = SolverConfig(eps=cfg.eps, tol=cfg.tol, max_steps=cfg.max_steps)
    est_cfg = EstimatorConfig(
        nudge=cfg.nudge,
        beta=cfg.beta,
        points=cfg.points if cfg.nudge == "holomorphic" else 2,
        correction=cfg.correction,
        t2=cfg.t2,
        t2sel=cfg.t2sel,
    )
    estimate = EPEstimator(est_cfg, solver).compute(model, idx, targets)
    free = estimate.free
    implicit = implicit_gradient(model, idx, targets, solver, free=free)
    steps = cfg.bptt_steps or free.n_steps + 100
    bptt = bptt_gradient(model, idx, targets, steps, cfg.eps)
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
