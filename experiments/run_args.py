"""Command-line options shared by `ept-hw compare`, `train` and `demo`, and their translation into a
`RunConfig` (preset < explicit options). Only options the user actually gave become overrides, so
`--resume` with no other option takes the saved configuration unchanged."""

from __future__ import annotations

import argparse
import tomllib
from pathlib import Path
from typing import Any

from ept_hw.config import ConfigError

from trainer.config import RunConfig, load_run_config, merge, preset_names

__all__ = ["add_run_arguments", "add_threads_argument", "apply_threads", "config_from_args", "print_result",
           "check_run_target", "execute_run"]


def add_run_arguments(p: argparse.ArgumentParser, *, device: bool = True) -> None:
    p.add_argument("--model", help=f"model preset ({', '.join(preset_names())})")
    if device:
        p.add_argument("--device", help="device preset name (devices.presets) or a device TOML file")
        p.add_argument("--periphery", choices=("default", "perfect"), help="the preset's periphery or ideal periphery")
        p.add_argument("--noise-mode", choices=("fresh", "common"), help="read noise per read, or common ± draws")
    p.add_argument("--data", help="UTF-8 text file (default: the embedded Shakespeare corpus)")
    p.add_argument("--tokenizer", choices=("char", "bpe"))
    p.add_argument("--vocab-size", type=int, help="BPE vocabulary size (default 4096)")
    p.add_argument("--steps", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--seq-len", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--beta", type=float, help="nudge strength β (or radius r)")
    p.add_argument("--seed", type=int)
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE",
        help="any config key, TOML value, e.g. --set training.eval_interval=10 --set stabilisers.gate=true",
    )
    p.add_argument("--out", help="run directory (runs/NAME)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--init-ckpt", help="start from this checkpoint's weights (programmed onto the arrays)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_threads_argument(p)


def add_threads_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--threads", type=int, default=1,
        help="torch CPU threads (default 1: at these sizes a second thread mostly spins; see README)",
    )


def apply_threads(args: argparse.Namespace) -> None:
    import torch

    threads = getattr(args, "threads", None)
    if threads is not None:
        if threads < 1:
            raise ValueError(f"--threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)


def _set_dotted(target: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = target
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(key, value, "a key inside a table")
    node[parts[-1]] = value


def _parse_set(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise ConfigError("--set", item, "KEY=VALUE")
    key, raw = item.split("=", 1)
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw  # a bare string
    return key.strip(), value


def overrides_from_args(args: argparse.Namespace, base: dict[str, Any] | None = None) -> dict[str, Any]:
    o: dict[str, Any] = dict(base or {})
    pairs = {
        "device": "analog.device", "periphery": "analog.periphery", "noise_mode": "analog.noise_mode",
        "tokenizer": "data.tokenizer", "vocab_size": "data.vocab_size", "steps": "training.steps",
        "batch_size": "training.batch_size", "seq_len": "training.seq_len", "lr": "training.lr",
        "beta": "estimator.beta", "seed": "seed",
    }
    for attr, key in pairs.items():
        value = getattr(args, attr, None)
        if value is not None:
            _set_dotted(o, key, value)
    if getattr(args, "data", None) is not None:
        _set_dotted(o, "data.source", str(Path(args.data)))
    for item in getattr(args, "set", []) or []:
        key, value = _parse_set(item)
        _set_dotted(o, key, value)
    return o


def config_from_args(args: argparse.Namespace, base: dict[str, Any]) -> RunConfig | None:
    """The run config, or None for a bare `--resume` (take the saved one)."""
    overrides = overrides_from_args(args)
    if args.resume and args.model is None and not overrides:
        return None
    return load_run_config(args.model, merge(base, overrides))


def check_run_target(args: argparse.Namespace) -> None:
    """`--out` is always needed; `--model` too unless the run is resumed."""
    if args.out is None:
        raise ValueError("--out runs/NAME is required")
    if not args.resume and args.model is None:
        raise ValueError("--model NAME is required for a new run")


def execute_run(args: argparse.Namespace, cfg: RunConfig | None) -> int:
    """Run `cfg` into `args.out`, print the outcome and, with `--report`, write the report."""
    from trainer.loop import run

    result = run(cfg, args.out, resume=args.resume, init_ckpt=args.init_ckpt, progress=not args.no_progress)
    print_result(result)
    if args.report:
        from experiments.report import write_report

        print(f"report: {write_report(result.run_dir)}")
    return result.exit_code


def print_result(result: Any) -> None:
    s = result.summary
    print(f"run directory: {result.run_dir}")
    print(f"steps completed: {result.steps_completed}")
    if "unigram_entropy" in s:
        print(f"unigram entropy of the validation tokens: {s['unigram_entropy']:.4f} nats")
    if "bigram_loss" in s:
        print(f"bigram table (add-0.05, training split) on the validation tokens: {s['bigram_loss']:.4f} nats")
    for path, v in (s.get("final_val_loss") or {}).items():
        print(f"final validation loss ({path}): {v:.4f} nats")
    if s.get("divergence"):
        d = s["divergence"]
        print(f"DIVERGED ({d['rule']}): {d['message']}; last good checkpoint at step {d['last_good_checkpoint_step']}")
    if s.get("interrupted"):
        print(f"interrupted at step {s['interrupted']['step']}: checkpoint saved, continue with --resume")
    print(f"wall time: {s.get('wall_time', float('nan')):.1f} s")
