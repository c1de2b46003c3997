"""`ept-hw sample runs/NAME --prompt TEXT`: generate text from a trained path."""

from __future__ import annotations

import argparse
import sys

from tqdm import tqdm


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "sample",
        help="generate text from a run's last checkpoint",
        description="Autoregressive sampling: each new token is read out at the free-phase fixed point of the "
        "context (on the analog path: through the arrays, with their noise).",
    )
    p.add_argument("run_dir", help="runs/NAME")
    p.add_argument("--prompt", default="\n", help="text to continue")
    p.add_argument("--path", choices=("analog", "twin"), help="which path (default: twin if present)")
    p.add_argument("--length", type=int, default=200, help="tokens to generate")
    p.add_argument("--temperature", type=float, default=1.0, help="softmax temperature (> 0)")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0: all)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling generator")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from trainer.sampling import sample_run

    if args.length < 0:
        raise ValueError(f"--length must be >= 0, got {args.length}")
    bar = None if args.no_progress else tqdm(total=args.length, desc="sampling", unit="token", file=sys.stderr,
                                             dynamic_ncols=True, leave=False)
    try:
        result = sample_run(args.run_dir, args.prompt, path=args.path, length=args.length,
                            temperature=args.temperature, top_k=args.top_k, seed=args.seed,
                            on_token=None if bar is None else (lambda _tok: bar.update(1)))
    finally:
        if bar is not None:
            bar.close()
    print(f"sampled {args.length} tokens from the {result.path} path "
          f"({'analog arrays, noisy reads' if result.path == 'analog' else 'digital weights'}) of {args.run_dir} "
          f"at checkpoint step {result.step} ({result.checkpoint.name})", file=sys.stderr)
    print(result.text)
    return 0
