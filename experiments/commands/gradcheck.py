"""`ept-hw gradcheck`: EP against the implicit-function and BPTT gradients, per parameter group."""

from __future__ import annotations

import argparse
import json
import sys

from ept_hw.estimators import EstimatorConfig
from ept_hw.gradcheck import GradcheckConfig, run_gradcheck
from ept_hw.model import ModelConfig
from ept_hw.relaxation import SolverConfig

_DEFAULTS = GradcheckConfig()
_M, _E, _S = _DEFAULTS.model, _DEFAULTS.estimator, _DEFAULTS.solver


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "gradcheck",
        help="compare the EP gradient with the implicit (IFT) and BPTT gradients",
        description="Relax a small random block, estimate the gradient by EP and compare it per parameter "
        "group with the implicit-function-theorem gradient at z* and with BPTT. Exits 1 if the free "
        "phase did not converge.",
    )
    p.add_argument("--vocab", type=int, default=_M.vocab_size, help="vocabulary size")
    p.add_argument("-T", "--context", type=int, default=_M.context, help="tokens per sequence")
    p.add_argument("-C", "--width", type=int, default=_M.width, help="model width")
    p.add_argument("-H", "--heads", type=int, default=_M.heads, help="attention heads")
    p.add_argument("-B", "--batch", type=int, default=_DEFAULTS.batch, help="batch size")
    p.add_argument("--seed", type=int, default=_DEFAULTS.seed, help="seed of the random block and data")
    p.add_argument("--resinit", type=float, default=_M.resinit, help="scale of W_O, W_2 at init")
    p.add_argument("--dtype", choices=("float64", "float32"), default=_DEFAULTS.dtype,
                   help="precision of the model and of every gradient")
    p.add_argument("--estimator", choices=("one_sided", "centered", "holomorphic"), default=_E.nudge,
                   help="nudging scheme")
    p.add_argument("--beta", type=float, default=_E.beta, help="β, or the radius r for holomorphic")
    p.add_argument("--points", type=int, default=_E.points, help="holomorphic points N")
    p.add_argument("--correction", choices=("none", "frozen", "tracking"), default=_E.correction,
                   help="AsymEP correction")
    p.add_argument("--t2", type=int, default=_E.t2, help="nudge length (Euler steps)")
    p.add_argument("--t2sel", type=int, default=_E.t2sel, help="snapshot-selection horizon (0: off)")
    p.add_argument("--eps", type=float, default=_S.eps, help="Euler step (units of tau)")
    p.add_argument("--tol", type=float, default=_S.tol, help="free-phase residual tolerance")
    p.add_argument("--max-steps", type=int, default=_S.max_steps, help="free-phase step cap")
    p.add_argument("--bptt-steps", type=int, default=_DEFAULTS.bptt_steps,
                   help="BPTT unroll length (0: free-phase steps + 100)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    cfg = GradcheckConfig(
        model=ModelConfig(vocab_size=args.vocab, context=args.context, width=args.width, heads=args.heads,
                          resinit=args.resinit),
        estimator=EstimatorConfig(nudge=args.estimator, beta=args.beta,
                                  points=args.points if args.estimator == "holomorphic" else 2,
                                  correction=args.correction, t2=args.t2, t2sel=args.t2sel),
        solver=SolverConfig(eps=args.eps, tol=args.tol, max_steps=args.max_steps),
        batch=args.batch,
        seed=args.seed,
        dtype=args.dtype,
        bptt_steps=args.bptt_steps,
    )
    report = run_gradcheck(cfg)
    if args.json:
        print(json.dumps(report))
    else:
        status = "converged" if report["converged"] else "NOT CONVERGED"
        print(f"free phase: residual {report['residual']:.3e} ({status}); loss {report['loss']:.4f}; "
              f"BPTT through {report['bptt_steps']} steps")
        print(f"{'group':<12} {'cos_implicit':>13} {'cos_bptt':>10} {'ratio_impl':>11} {'ratio_bptt':>11}")
        for name, g in report["groups"].items():
            print(f"{name:<12} {g['cos_implicit']:>13.6f} {g['cos_bptt']:>10.6f} "
                  f"{g['norm_ratio_implicit']:>11.6f} {g['norm_ratio_bptt']:>11.6f}")
    if not report["converged"]:
        print("gradcheck: the free phase did not converge; the comparison is not meaningful", file=sys.stderr)
        return 1
    return 0
