"""`ept-hw evaluate RUN --times 1,3600,86400,31536000`: retention of the trained analog weights."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "evaluate",
        help="validation loss of a run's trained analog weights vs time after programming (PCM drift and noise)",
        description="Programs the analog path's trained weights onto fresh PCM pairs with aihwkit's PCM inference "
        "model (programming noise, conductance drift, 1/f read noise; g_max 25 uS) and writes the validation loss "
        "at each time after programming (t = 0 always included), mean and spread over noise seeds, to "
        "RUN/evaluation/evaluation.json and RUN/evaluation/retention.png. Accepted: runs with an analog path "
        "whose device is one-sided in a differential pair (PCM-like, e.g. the 'pcm' preset); --any-device "
        "applies the PCM statistics to any device's weights, as aihwkit does.",
    )
    p.add_argument("run_dir", help="runs/NAME (a compare run, or an ep run on the analog path)")
    p.add_argument("--times", default="1,3600,86400,31536000",
                   help="comma-separated seconds after programming (default: 1 s, 1 h, 1 day, 1 year)")
    p.add_argument("--seeds", type=int, default=3, help="noise seeds (chips) per time (default 3)")
    p.add_argument("--seed", type=int, default=0, help="base seed of the noise draws")
    p.add_argument("--drift-compensation", action="store_true",
                   help="aihwkit's global drift compensation (outputs rescaled by the mean |read| ratio)")
    p.add_argument("--any-device", action="store_true",
                   help="apply the PCM model to a device without a drift model (as aihwkit does)")
    p.set_defaults(func=_run)


def _parse_times(text: str) -> list[float]:
    from ept_hw.config import ConfigError

    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError("times", text, "comma-separated seconds, e.g. 1,3600,86400,31536000") from None


def _run(args: argparse.Namespace) -> int:
    from trainer.evaluate import EVALUATION_DIR, EVALUATION_FILE, evaluate_retention

    doc = evaluate_retention(args.run_dir, _parse_times(args.times), seeds=args.seeds, seed=args.seed,
                             drift_compensation=args.drift_compensation, any_device=args.any_device, progress=True)
    entry = doc["evaluations"]["global_drift_compensation" if args.drift_compensation else "no_compensation"]
    print(f"analog path as trained: {doc['trained_val_loss']:.4f} nats/token")
    for t, m, s in zip(entry["times_s"], entry["loss_mean"], entry["loss_std"]):
        print(f"t = {t:>12g} s: {m:.4f} ± {s:.4f}")
    print(f"wrote {args.run_dir}/{EVALUATION_DIR}/{EVALUATION_FILE}")
    return 0
