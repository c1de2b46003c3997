"""Command-line options shared by `ept-hw compare`, `train` and `demo`, and their translation into a
`RunConfig` (preset < `--config` file < explicit options). Only options the user actually gave become
overrides, so `--resume` with no other option takes the saved configuration unchanged."""

from __future__ import annotations

import argparse
import json
import tomllib
from pathlib import Path
from typing import Any

import torch

from ept_hw.config import ConfigError
from experiments.presets import load_run_config, preset_names
from trainer.config import RunConfig, merge

__all__ = ["add_run_arguments", "add_serial_argument", "add_threads_argument", "apply_threads", "config_from_args", "print_result",
           "check_run_target", "execute_run", "load_config_file", "free_run_dir", "result_json", "overrides_from_args"]


PRESET_VALUE = "default: the model preset's, see experiments/presets/"


def add_run_arguments(p: argparse.ArgumentParser, *, device: bool = True) -> None:
    p.add_argument("--model", help=f"model preset ({', '.join(preset_names())}); required for a new run unless --config")
    p.add_argument("--config", metavar="FILE.toml",
                   help="a run configuration file (e.g. a previous run's config.toml), applied over --model's preset; "
                   "options given here override it")
    if device:
        p.add_argument("--device", help="device preset name (`ept-hw devices`) or a device TOML file; "
                       f"{PRESET_VALUE}")
        p.add_argument("--periphery", choices=("default", "perfect"),
                       help="the preset's periphery or ideal periphery (default: default)")
        p.add_argument("--noise-mode", choices=("fresh", "common"),
                       help=f"read noise per read, or common ± draws ({PRESET_VALUE})")
    p.add_argument("--data", help="UTF-8 text file (default: the embedded Shakespeare corpus)")
    p.add_argument("--tokenizer", choices=("char", "bpe"), help=f"tokenizer ({PRESET_VALUE})")
    p.add_argument("--vocab-size", type=int, help="BPE vocabulary size (default 4096)")
    p.add_argument("--steps", type=int, help=f"training steps ({PRESET_VALUE})")
    p.add_argument("--batch-size", type=int, help=f"sequences per batch ({PRESET_VALUE})")
    p.add_argument("--seq-len", type=int, help=f"tokens per sequence ({PRESET_VALUE})")
    p.add_argument("--lr", type=float, help=f"learning rate ({PRESET_VALUE})")
    p.add_argument("--beta", type=float, help=f"nudge strength β (or radius r) ({PRESET_VALUE})")
    p.add_argument("--seed", type=int, help=f"seed of every random draw ({PRESET_VALUE})")
    p.add_argument("--torch-device", metavar="cpu|cuda|cuda:N",
                   help="where the run's tensors live (default: cpu; a CUDA device must be available)")
    p.add_argument("--compile", metavar="none|inductor|aot_eager",
                   help="torch.compile the digital twin's plain force evaluations (default: none; inductor "
                        "compiles each new shape once, seconds to tens of seconds)")
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE",
        help="any config key, TOML value, e.g. --set training.eval_interval=10 --set stabilisers.gate=true "
        "(a key also given by its own option is refused)",
    )
    p.add_argument("--out", help="run directory: a new one, or the run to --resume (default: the first free "
                   "runs/COMMAND-N)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--init-ckpt", metavar="FILE.pt",
                   help="start from this checkpoint's weights (programmed onto the arrays)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print the outcome as one JSON object")
    add_threads_argument(p)
    add_serial_argument(p)


def add_serial_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--serial", action="store_true",
        help="train a compare run's paths one after the other in this process (default: the twin trains "
        "in a second process at the same time when the machine has 2+ CPUs; the results are the same)",
    )


def add_threads_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--threads", type=int, default=1,
        help="torch CPU threads (default 1: at these sizes a second thread mostly spins; see README)",
    )


def apply_threads(args: argparse.Namespace) -> None:
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


#: options that set a config key (attribute -> dotted key)
FLAG_KEYS = {
    "device": "analog.device", "periphery": "analog.periphery", "noise_mode": "analog.tile.noise_mode",
    "tokenizer": "data.tokenizer", "vocab_size": "data.vocab_size", "steps": "training.steps",
    "batch_size": "training.batch_size", "seq_len": "training.seq_len", "lr": "training.lr",
    "beta": "estimator.beta", "seed": "seed", "data": "data.source", "torch_device": "torch_device",
    "compile": "compile",
}


def overrides_from_args(args: argparse.Namespace, base: dict[str, Any] | None = None) -> dict[str, Any]:
    """Config overrides from the options the user gave; `--set` of a key that an option also sets
    is refused (one value per key, said once)."""
    o: dict[str, Any] = dict(base or {})
    given: dict[str, str] = {}
    for attr, key in FLAG_KEYS.items():
        value = getattr(args, attr, None)
        if value is not None:
            if attr == "data":
                value = str(Path(value))
            _set_dotted(o, key, value)
            given[key] = "--" + attr.replace("_", "-")
    for item in getattr(args, "set", []) or []:
        key, value = _parse_set(item)
        if key in given:
            raise ConfigError("--set", key, f"not also given as {given[key]} (say it once)")
        _set_dotted(o, key, value)
    return o


def load_config_file(path: str | Path) -> dict[str, Any]:
    """A run configuration file as overrides (`--config`). A previous run's own `config.toml` works:
    its analog device is taken from that run's saved tile (`tile.toml`), never from the file or
    path the run was started with."""
    from ept_hw.config import load_toml
    from trainer.rundir import RunDirectory

    path = Path(path)
    if path.is_dir():
        rd = RunDirectory(path)
        if not rd.config_path.is_file():
            raise FileNotFoundError(f"--config {path}: a directory without a {rd.CONFIG}; give a TOML file")
        path = rd.config_path
    if not path.is_file():
        raise FileNotFoundError(f"--config {path}: no such file")
    data = load_toml(path)
    rd = RunDirectory(path.parent)
    if path.name == rd.CONFIG and rd.tile_path.is_file() and isinstance(data.get("analog"), dict):
        data["analog"] = {**data["analog"], "device": str(rd.tile_path.resolve())}
    data.get("model", {}).pop("vocab_size", None)  # comes from the tokenizer
    return data


def config_from_args(args: argparse.Namespace, base: dict[str, Any]) -> RunConfig | None:
    """The run config, or None for a bare `--resume` (take the saved one). Precedence: defaults <
    `--model` preset < `--config` file < `base` (the command's own) < options < `--set`."""
    overrides = overrides_from_args(args)
    config_file = getattr(args, "config", None)
    if args.resume and args.model is None and config_file is None and not overrides:
        return None
    layered = merge(load_config_file(config_file), base) if config_file else dict(base)
    return load_run_config(args.model, merge(layered, overrides))


def free_run_dir(command: str, root: str | Path = "runs") -> Path:
    """The first of runs/COMMAND-1, runs/COMMAND-2, ... that does not exist."""
    i = 1
    while (Path(root) / f"{command}-{i}").exists() or (Path(root) / f".{command}-{i}.staging").exists():
        i += 1
    return Path(root) / f"{command}-{i}"


def check_run_target(args: argparse.Namespace) -> None:
    """`--out` is needed to resume (a new run without it gets runs/COMMAND-N); `--model` or
    `--config` for a new run."""
    if args.out is None:
        if args.resume:
            raise ValueError("--resume needs --out runs/NAME (the run to continue)")
        args.out = str(free_run_dir(args.command))
    if not args.resume and args.model is None and getattr(args, "config", None) is None:
        raise ValueError("--model NAME (or --config FILE.toml) is required for a new run")
    if args.resume and getattr(args, "init_ckpt", None):
        raise ValueError("--init-ckpt starts a new run; it cannot be combined with --resume")


def execute_run(args: argparse.Namespace, cfg: RunConfig | None) -> int:
    """Run `cfg` into `args.out`, print the outcome and, with `--report`, write the report."""
    from trainer.loop import run

    progress = not args.no_progress
    result = run(cfg, args.out, resume=args.resume, init_ckpt=args.init_ckpt, progress=progress,
                 parallel_paths=not getattr(args, "serial", False))
    report = None
    if args.report:
        from experiments.report import write_report

        report = write_report(result.run_dir)
    if getattr(args, "json", False):
        print(json.dumps(result_json(result, report), default=str))
    else:
        print_result(result)
        if report is not None:
            print(f"report: {report}")
    return result.exit_code


def result_json(result: Any, report: Path | None = None) -> dict[str, Any]:
    """The outcome of a run as one JSON-ready object (`--json`)."""
    s = result.summary
    return {
        "run_dir": str(result.run_dir),
        "exit_code": result.exit_code,
        "steps_completed": result.steps_completed,
        "final_val_loss": s.get("final_val_loss") or {},
        "unigram_entropy": s.get("unigram_entropy"),
        "divergence": s.get("divergence"),
        "interrupted": s.get("interrupted"),
        "analog_counters": s.get("analog_counters"),
        "wall_time": s.get("wall_time"),
        "report": None if report is None else str(report),
    }


def print_result(result: Any) -> None:
    s = result.summary
    print(f"run directory: {result.run_dir}")
    print(f"steps completed: {result.steps_completed}")
    fe = s.get("final_eval")
    if fe:  # the final figures and their baselines on the same fixed validation tokens
        where = f"the fixed validation set ({fe['tokens']} tokens)"
        print(f"unigram entropy on {where}: {fe['unigram_entropy']:.4f} nats")
        print(f"bigram table (add-0.05, training split) on {where}: {fe['bigram_loss']:.4f} nats")
        for path, v in fe["loss"].items():
            print(f"final validation loss ({path}): {v:.4f} ± {fe['stderr'][path]:.4f} nats")
        if fe.get("gap") is not None:
            print(f"gap (analog - twin, paired): {fe['gap']:+.4f} ± {fe['gap_stderr']:.4f} nats")
    else:
        if "unigram_entropy" in s:
            print(f"unigram entropy of the validation tokens: {s['unigram_entropy']:.4f} nats")
        if "bigram_loss" in s:
            print(f"bigram table (add-0.05, training split) on the validation tokens: {s['bigram_loss']:.4f} nats")
        for path, v in (s.get("final_val_loss") or {}).items():
            print(f"final validation loss ({path}): {v:.4f} nats")
    if s.get("divergence"):
        d = s["divergence"]
        step = d["last_good_checkpoint_step"]
        where = (f"the run's checkpoint at step {step} is the last good one" if step > 0 else
                 "it diverged before its first training step was saved (the checkpoint holds the initial weights)")
        print(f"DIVERGED ({d['rule']}): {d['message']}; {where}. {_divergence_hint(result)}")
    if s.get("interrupted"):
        print(f"interrupted at step {s['interrupted']['step']}: checkpoint saved, continue with --resume")
    print(f"wall time: {s.get('wall_time', float('nan')):.1f} s")


def _divergence_hint(result: Any) -> str:
    """What to change after a divergence: AdamW with an SGD-sized learning rate is the usual cause."""
    try:
        from trainer.rundir import RunDirectory

        t = RunDirectory(result.run_dir).config().training
    except Exception:  # noqa: BLE001 - a hint never fails the command
        return "Lower --lr and start a new run."
    if t.optimizer == "adamw" and t.lr >= 0.01:
        return (f"--optimizer adamw ran with lr {t.lr:g}, an SGD-sized step (the model presets' lr is for SGD): "
                "start a new run with --lr 1e-3 or so.")
    if t.schedule.warmup_steps == 0:
        return (f"Lower --lr (it was {t.lr:g}) or warm it up (--set training.schedule.warmup_steps=50) "
                "and start a new run.")
    return f"Lower --lr (it was {t.lr:g}) and start a new run."
