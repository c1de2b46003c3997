"""`ept-hw stability runs/NAME`: leading eigenvalues, limit-cycle verdict and attention knockout
of a run's paths at a checkpoint. Writes RUN/stability/stability.json and RUN/stability/stability.txt."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any, Sequence

import torch

DEFAULT_ALPHAS = (1.0, 0.5, 0.0)
SUBDIR = "stability"  # the command's own sub-folder of the run


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "stability",
        help="leading relaxation eigenvalues, limit-cycle verdict and attention knockout of a run's checkpoint",
        description="For each path of the run (the analog one on its arrays' read-out weights: a digital copy, "
        "not noisy reads), relax the validation sequences, then report at the operating point of the worst one "
        "the leading continuous eigenvalue Re μ (and |Im μ|) of J, the largest |λ| of I + εJ, the verdict of a "
        "longer relaxation and the same verdict with W_O scaled by each α (SCIENCE §4). Writes RUN/stability/stability.json "
        "and RUN/stability/stability.txt.",
    )
    p.add_argument("run_dir", help="runs/NAME")
    p.add_argument("--checkpoint", default=None,
                   help="a checkpoint step (one of the two kept) or a .pt file (default: the latest)")
    p.add_argument("--samples", type=int, default=4, help="validation sequences (the worst one gives the eigenvalues)")
    p.add_argument("--steps", type=int, default=500, help="Euler steps of the limit-cycle and knockout runs")
    p.add_argument("--alphas", type=float, nargs="+", default=list(DEFAULT_ALPHAS), help="W_O scales of the knockout")
    p.add_argument("--search", action="store_true",
                   help="if the relaxation does not converge, look for an unstable fixed point by Newton-Krylov (slow)")
    from experiments.run_args import add_threads_argument

    add_threads_argument(p)
    p.set_defaults(func=_run)


def _load(run_dir: Path, checkpoint: str | None):
    from trainer.checkpoint import load_checkpoint
    from trainer.loop import load_run
    from trainer.rundir import RunDirectory

    rd = RunDirectory(run_dir)
    if not rd.path.is_dir() or not rd.config_path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a run directory (no {rd.CONFIG}): train one with `ept-hw train`")
    if not rd.has_checkpoint():
        raise FileNotFoundError(f"{run_dir} has no checkpoint ({rd.latest_checkpoint_path})")
    if checkpoint is None:
        ck, ck_path = rd.load_checkpoint()
    elif checkpoint.isdigit():
        kept = {}
        for f in rd.checkpoints():
            try:
                kept[int(load_checkpoint(f)["step"])] = f
            except ValueError:
                continue
        if int(checkpoint) not in kept:
            raise ValueError(f"--checkpoint {checkpoint}: {run_dir} keeps its two latest checkpoints "
                             f"(steps {', '.join(str(k) for k in sorted(kept)) or 'none readable'})")
        ck_path = kept[int(checkpoint)]
        ck = load_checkpoint(ck_path)
    else:
        ck_path = Path(checkpoint)
        if not ck_path.is_file():
            raise FileNotFoundError(f"--checkpoint {checkpoint}: no such file")
        ck = load_checkpoint(ck_path)
    cfg, data, paths = load_run(run_dir, ck_path)
    return cfg, data, paths, int(ck["step"])


def stability_of_run(
    run_dir: str | Path,
    checkpoint: str | None = None,
    *,
    samples: int = 4,
    steps: int = 500,
    alphas: Sequence[float] = DEFAULT_ALPHAS,
    search: bool = False,
) -> dict[str, Any]:
    """Stability figures of every EP path of a run (library function behind the command)."""
    from ept_hw.stability import attention_knockout, detect_limit_cycle, eigenvalues_at_worst, find_operating_point
    from trainer.data import sample_batch

    if samples < 1:
        raise ValueError(f"--samples must be >= 1, got {samples}")
    if steps < 10:
        raise ValueError(f"--steps must be >= 10, got {steps}")
    run_dir = Path(run_dir)
    t0 = time.perf_counter()
    cfg, data, paths, step = _load(run_dir, None if checkpoint is None else str(checkpoint))
    if cfg.mode == "bp":
        raise ValueError("a BP transformer has no relaxation to analyse")
    idx, _ = sample_batch(data.val, samples, cfg.training.seq_len, torch.Generator().manual_seed(cfg.seed + 3))
    solver = cfg.solver
    out: dict[str, Any] = {"run_dir": str(run_dir), "checkpoint_step": step, "samples": samples, "paths": {}}
    for name, path in paths.items():
        tp = time.perf_counter()
        model = path.readout_model()  # analog: a digital copy programmed from the read-out weights
        with torch.no_grad():
            x_in = model.embed(idx)
        force = lambda z, x=x_in: model.force(z, x)  # noqa: E731
        op = find_operating_point(force, x_in, solver, long_steps=max(solver.max_steps, steps),
                                  search_unstable=search)
        b, res, eig = eigenvalues_at_worst(model, x_in, op.z, solver.eps, k=2, tol=1e-4, ncv=12, maxiter=1000,
                                           generator=torch.Generator().manual_seed(cfg.seed + 11))
        cyc = detect_limit_cycle(force, x_in, eps=solver.eps, n_steps=steps, tol=solver.tol)
        knock = attention_knockout(model, idx, tuple(alphas), eps=solver.eps, n_steps=steps, tol=solver.tol)
        out["paths"][name] = {
            "weights": "read-out weights of the arrays (digital copy)" if path.analog else "digital weights",
            "operating_point": {"label": op.label, "converged": op.converged, "residual_max": op.residual_max,
                                "n_steps": op.n_steps, "sample": b, "sample_residual": float(res[b])},
            "re_mu": eig.lead_re_mu, "im_mu": eig.lead_im_mu, "abs_lambda": eig.lead_abs_lambda,
            "abs_lambda_mu": [eig.lead_abs_lambda_mu.real, eig.lead_abs_lambda_mu.imag],
            "euler_artefact": eig.euler_artefact, "arpack_converged": eig.converged, "n_matvecs": eig.n_matvecs,
            "verdict": cyc.verdict, "verdict_reason": cyc.reason, "residual_floor": cyc.residual_floor,
            "period": cyc.period, "knockout": knock, "seconds": time.perf_counter() - tp,
        }
    out["seconds"] = time.perf_counter() - t0
    from trainer.rundir import RunDirectory

    rd = RunDirectory(run_dir)
    rd.write_json(f"{SUBDIR}/stability.json", out, default=float)
    rd.write_text(f"{SUBDIR}/stability.txt", summary_text(out))
    return out


def summary_text(result: dict[str, Any]) -> str:
    lines = [f"stability of {result['run_dir']} at checkpoint step {result['checkpoint_step']} "
             f"({result['samples']} validation sequences, {result['seconds']:.1f} s)"]
    for name, r in result["paths"].items():
        op = r["operating_point"]
        lines.append(
            f"{name} ({r['weights']}): verdict {r['verdict']}; lead Re mu {r['re_mu']:+.4f} (|Im| {r['im_mu']:.4f}), "
            f"max |lambda| {r['abs_lambda']:.5f}{' (Euler artefact)' if r['euler_artefact'] else ''}; operating point "
            f"{op['label']} (residual {op['residual_max']:.2e}, sample {op['sample']})"
        )
        lines.append("  knockout W_O x alpha: " + ", ".join(
            f"{k['alpha']:g} -> {k['verdict']} (floor {k['residual_floor']:.1e})" for k in r["knockout"]))
    return "\n".join(lines) + "\n"


def _run(args: argparse.Namespace) -> int:
    from experiments.run_args import apply_threads

    apply_threads(args)
    result = stability_of_run(args.run_dir, args.checkpoint, samples=args.samples, steps=args.steps,
                              alphas=args.alphas, search=args.search)
    print(summary_text(result), end="")
    return 0
