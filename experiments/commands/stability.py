"""`ept-hw stability runs/NAME`: leading eigenvalues and limit-cycle verdict of a run's paths."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "stability",
        help="leading relaxation eigenvalues and limit-cycle verdict of a run's last checkpoint",
        description="For each path of the run (the analog one on its arrays' read-out weights), relax one "
        "validation sequence, then report the leading continuous eigenvalue Re μ of J at the operating point, "
        "the largest |λ| of I + εJ, and the verdict of a long relaxation (SCIENCE §4). Writes "
        "RUN/stability.json.",
    )
    p.add_argument("run_dir", help="runs/NAME")
    p.add_argument("--samples", type=int, default=1, help="validation sequences (the worst one leads)")
    p.add_argument("--steps", type=int, default=2000, help="Euler steps of the limit-cycle run")
    from experiments.run_args import add_threads_argument

    add_threads_argument(p)
    p.set_defaults(func=_run)


def stability_of_run(run_dir: str | Path, samples: int = 1, steps: int = 2000) -> dict:
    import torch

    from ept_hw.stability import detect_limit_cycle, find_operating_point, leading_eigenvalues
    from trainer.data import sample_batch
    from trainer.loop import load_run

    if samples < 1:
        raise ValueError(f"--samples must be >= 1, got {samples}")
    cfg, data, paths = load_run(run_dir)
    if cfg.mode == "bp":
        raise ValueError("a BP transformer has no relaxation to analyse")
    idx, _ = sample_batch(data.val, samples, cfg.training.seq_len, torch.Generator().manual_seed(cfg.seed + 3))
    out = {}
    for name, path in paths.items():
        model = path._shadow_model()
        x_in = model.embed(idx)
        force = lambda z: model.force(z, x_in)  # noqa: E731
        op = find_operating_point(force, x_in, cfg.solver)
        eig = leading_eigenvalues(force, op.z, cfg.solver.eps, k=4, tol=1e-6,
                                 generator=torch.Generator().manual_seed(0))
        cyc = detect_limit_cycle(force, x_in, eps=cfg.solver.eps, n_steps=steps, tol=cfg.solver.tol)
        out[name] = {
            "operating_point": op.label, "residual": op.residual_max,
            "lead_re_mu": eig.lead_re_mu, "lead_im_mu": eig.lead_im_mu, "lead_abs_lambda": eig.lead_abs_lambda,
            "euler_artefact": eig.euler_artefact, "verdict": cyc.verdict, "residual_floor": cyc.residual_floor,
            "period": cyc.period,
        }
    (Path(run_dir) / "stability.json").write_text(json.dumps(out, indent=2, default=float))
    return out


def _run(args: argparse.Namespace) -> int:
    from experiments.run_args import apply_threads

    apply_threads(args)
    result = stability_of_run(args.run_dir, args.samples, args.steps)
    for name, r in result.items():
        print(f"{name}: verdict {r['verdict']}, lead Re mu {r['lead_re_mu']:+.4f} (Im {r['lead_im_mu']:.4f}), "
              f"max |lambda| {r['lead_abs_lambda']:.5f}, operating point {r['operating_point']} "
              f"(residual {r['residual']:.2e})")
    return 0
