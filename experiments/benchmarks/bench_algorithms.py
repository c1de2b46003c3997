"""Training algorithms for poor devices on the demo model (issue 13's benchmarks), run by hand.

    python -m experiments.benchmarks.bench_algorithms cost [--repeats 3]
    python -m experiments.benchmarks.bench_algorithms gap --out DIR [--steps 150] [--algorithms ...]
    python -m experiments.benchmarks.bench_algorithms retention RUN_DIR

- ``cost``: seconds per EP training step of the analog path for each algorithm on reram_sb with
  its preset periphery (the demo model: C 32, T 16, B 16), the algorithms alternating step by
  step on the same batches so the load of a shared machine hits them alike; median over
  `--repeats` steps, printed as a ratio to sgd measured side by side.
- ``gap``: one `compare` run per algorithm (same seed, same batches, same twin) on reram_sb (or
  `--device`) with its preset periphery, `--steps` steps; prints the final validation loss of the analog path,
  of the twin, and their difference (nats). c_ttv2 and agad run twice: at aihwkit's
  `build_config` defaults (fast_lr 0.1) and at a tuned fast_lr (0.5, `--tuned-fast-lr`).
- ``retention``: `trainer.evaluate.evaluate_retention` of a finished PCM run at
  1 s, 1 h, 1 day, 1 year, without and with global drift compensation.

Wall-clock figures depend on the machine and its load: quote them with the load.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from crossbar import save_tile_config, tile_for_device
from experiments.presets import load_run_config
from trainer.config import resolve_vocab
from trainer.data import sample_batch
from trainer.evaluate import evaluate_retention
from trainer.loop import build_paths

ALGOS = ("sgd", "mixed_precision", "ttv2", "c_ttv2", "agad")


def tile_file(directory: Path, algorithm: str, fast_lr: float | None = None, device: str = "reram_sb") -> Path:
    """A [tile] TOML: `device` with the preset periphery, update and mapping, and `algorithm`."""
    tile = tile_for_device(device, algorithm=algorithm)
    name = algorithm
    if fast_lr is not None:
        key = "chopped" if algorithm == "c_ttv2" else "dynamic"
        tile = tile.replace(**{key: dataclasses.replace(getattr(tile, key), fast_lr=fast_lr)})
        name = f"{algorithm}_fastlr{fast_lr:g}"
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{device}_{name}.toml"
    save_tile_config(path, tile)
    return path


def cost(repeats: int, seed: int, tmp: Path) -> dict[str, float]:
    paths = {}
    for algo in ALGOS:
        # the algorithm also in `analog.tile`: the demo preset's own `[analog.tile] algorithm` would override the file's
        cfg = load_run_config("demo", {"seed": seed, "analog": {"device": str(tile_file(tmp, algo)),
                                                               "tile": {"algorithm": algo}}})
        cfg = resolve_vocab(cfg, 65)
        paths[algo] = build_paths(cfg)["analog"]
    t = cfg.training
    gen = torch.Generator().manual_seed(seed)
    data = torch.randint(0, 65, (200_000,), generator=gen)
    batch = sample_batch(data, t.batch_size, t.seq_len, gen)
    for p in paths.values():  # warm-up
        p.train_step(*batch, t.lr, health=False)
    rows: dict[str, list[float]] = {a: [] for a in ALGOS}
    for _ in range(repeats):
        batch = sample_batch(data, t.batch_size, t.seq_len, gen)
        for algo, p in paths.items():
            start = time.perf_counter()
            p.train_step(*batch, t.lr, health=False)
            rows[algo].append(time.perf_counter() - start)
    return {a: statistics.median(r) for a, r in rows.items()}


def gap(out: Path, steps: int, algorithms: list[str], tuned: float, seed: int,
        only: list[str] | None = None, device: str = "reram_sb") -> list[dict]:
    """`ept-hw compare --model demo --device TILE.toml --steps N` per algorithm (a run directory
    that already has its summary.json is read, not re-run)."""
    runs: list[tuple[str, str, float | None]] = []
    for algo in algorithms:
        runs.append((algo, algo, None))
        if algo in ("c_ttv2", "agad"):
            runs.append((f"{algo}@fast_lr={tuned:g}", algo, tuned))
    if only:  # run these labels, in this order
        by_label = {r[0]: r for r in runs}
        runs = [by_label[label] for label in only]
    results = []
    for label, algo, fast_lr in runs:
        run_dir = out / label.replace("@", "_").replace("=", "")
        wall = float("nan")
        if not (run_dir / "summary.json").is_file():
            tile = tile_file(out / "tiles", algo, fast_lr, device)
            start = time.perf_counter()
            subprocess.run([sys.executable, "-m", "experiments.cli", "compare", "--model", "demo", "--device",
                            str(tile), "--steps", str(steps), "--seed", str(seed), "--out", str(run_dir),
                            "--set", f'analog.tile.algorithm="{algo}"',  # over the demo preset's own
                            "--no-progress"], check=True, stdout=subprocess.DEVNULL)
            wall = time.perf_counter() - start
        summary = json.loads((run_dir / "summary.json").read_text())
        final = summary["final_val_loss"]
        row = {"algorithm": label, "analog": final["analog"], "twin": final["twin"],
               "gap": final["analog"] - final["twin"], "wall_s": wall}
        results.append(row)
        print(f"{label:<22} analog {row['analog']:.4f}  twin {row['twin']:.4f}  gap {row['gap']:+.4f}  "
              f"({wall:.0f} s)", flush=True)
    return results


def retention(run_dir: Path, seeds: int) -> dict:
    times = [1.0, 3600.0, 86400.0, 31536000.0]
    out = {}
    for comp in (False, True):
        res = evaluate_retention(run_dir, times=times, seeds=seeds, drift_compensation=comp)
        out["compensated" if comp else "raw"] = res
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="what", required=True)
    c = sub.add_parser("cost")
    c.add_argument("--repeats", type=int, default=3)
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--tmp", default=None, help="folder for the tile files (default: a new temporary folder)")
    g = sub.add_parser("gap")
    g.add_argument("--out", required=True)
    g.add_argument("--steps", type=int, default=150)
    g.add_argument("--algorithms", default=",".join(ALGOS))
    g.add_argument("--tuned-fast-lr", type=float, default=0.5)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default="reram_sb", help="device preset (default: reram_sb, the issue's)")
    g.add_argument("--runs", default="", help="comma-separated labels to run, in this order (e.g. "
                   "'c_ttv2@fast_lr=0.5,agad'; default: every algorithm, tuned after default)")
    r = sub.add_parser("retention")
    r.add_argument("run_dir")
    r.add_argument("--seeds", type=int, default=3)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    if args.what == "cost":
        res = cost(args.repeats, args.seed, Path(args.tmp or tempfile.mkdtemp(prefix="bench_algorithms_")))
        print(f"reram_sb, preset periphery, demo model; median s/step over {args.repeats} steps, alternating")
        for algo, s in res.items():
            print(f"{algo:<16} {s:7.3f} s/step   x{s / res['sgd']:.2f} of sgd")
    elif args.what == "gap":
        gap(Path(args.out), args.steps, args.algorithms.split(","), args.tuned_fast_lr, args.seed,
            [r for r in args.runs.split(",") if r], args.device)
    else:
        res = retention(Path(args.run_dir), args.seeds)
        print(json.dumps(res, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
