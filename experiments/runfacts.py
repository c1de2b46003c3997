"""What the device spec and the sweep read from a finished `compare` run (config, metrics, summary,
pulse counters), through the trainer's `RunDirectory` (which owns the layout), with every missing
piece named at once (`IncompleteRunError`). `spec` and `sweep` both import it (neither imports the
other's reader).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from ept_hw.config import ConfigError, config_hash
from trainer.rundir import RunDirectory

__all__ = ["IncompleteRunError", "RunFacts", "check_run_dir", "read_run", "read_json"]

logger = logging.getLogger(__name__)


class IncompleteRunError(FileNotFoundError):
    """A run or sweep directory lacks something the export needs; the message names every missing piece."""

    def __init__(self, path: str | Path, missing: Sequence[str]):
        self.path = Path(path)
        self.missing = list(missing)
        super().__init__(f"{self.path} is incomplete or corrupted: " + "; ".join(self.missing))


@dataclass
class RunFacts:
    """What the export reads from one `compare` run directory."""

    path: Path
    config: dict[str, Any]
    rows: list[dict[str, Any]]
    summary: dict[str, Any]
    counters: dict[str, Any] = field(default_factory=dict)
    n_weights: int | None = None

    @property
    def run_id(self) -> str:
        return self.path.name

    @property
    def config_hash(self) -> str:
        return config_hash(self.config)

    def last(self, key: str) -> float | None:
        for r in reversed(self.rows):
            v = r.get(key)
            if v is not None:
                return v
        return None

    def column(self, key: str) -> list[float]:
        return [r[key] for r in self.rows if r.get(key) is not None]


def read_json(path: Path, missing: list[str], what: str) -> Any:
    if not path.is_file():
        missing.append(f"missing {path.name} ({what})")
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        missing.append(f"unreadable {path.name} ({exc})")
        return None


def check_run_dir(run_dir: str | Path) -> RunFacts:
    """Read a `compare` run directory; raise `IncompleteRunError` naming everything missing."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise IncompleteRunError(run_dir, ["the directory does not exist"])
    missing: list[str] = []
    if not any((run_dir / n).exists() for n in ("config.toml", "metrics.jsonl", "summary.json", "checkpoints")):
        missing.append("neither a run directory (config.toml, metrics.jsonl, summary.json) nor a sweep directory "
                       "(sweep.json, sweep_manifest.json, points/, runs/)")
    rd = RunDirectory(run_dir)
    config: dict[str, Any] | None = None
    if not rd.config_path.is_file():
        missing.append("missing config.toml (the resolved run configuration)")
    else:
        try:
            config = rd.read_config_dict()
        except ConfigError as exc:
            missing.append(f"unreadable config.toml ({exc.allowed})")
    rows: list[dict[str, Any]] = []
    if not rd.metrics_path.is_file():
        missing.append("missing metrics.jsonl (the per-step metrics log)")
    else:
        try:
            rows = rd.read_metrics()  # a torn last line is dropped with a warning naming the file
        except ValueError as exc:
            missing.append(f"corrupted metrics.jsonl: {exc}")
        else:
            if not rows:
                missing.append("metrics.jsonl has no rows (the run logged no step)")
    summary = read_json(rd.summary_path, missing, "final figures written at the end of a run")
    if config is not None:
        mode = config.get("mode", "compare")
        if mode != "compare" and not (mode == "ep" and config.get("path") == "analog"):
            missing.append(f"config.toml mode is {mode!r}: a device spec needs an analog run (mode 'compare')")
    if rows:
        for key, what in (("analog_val_loss", "validation loss of the analog path"),
                          ("twin_val_loss", "validation loss of the digital twin")):
            if not any(r.get(key) is not None for r in rows):
                missing.append(f"metrics.jsonl has no {key} ({what})")
    if missing:
        raise IncompleteRunError(run_dir, missing)
    facts = RunFacts(run_dir, config or {}, rows, summary or {})
    # the trainer writes the pulse counters into summary.json (`trainer.loop.pulse_counters`); only
    # runs written before it did are read from their last checkpoint
    facts.counters = dict(facts.summary.get("analog_counters") or {}) or _legacy_checkpoint_pulse_counts(run_dir)
    facts.n_weights = _count_weights(run_dir, facts)
    return facts


def _legacy_checkpoint_pulse_counts(run_dir: Path) -> dict[str, Any]:
    """Per-device pulse counters of the analog path found in the last checkpoint, for runs whose
    `summary.json` predates the `analog_counters` figure.

    The crossbar keeps a `pulse_count` tensor per tile (one entry per unit cell: the device of a
    weight, or the pair G+/G- of a differential cell); every such tensor in the analog path's state
    counts. Returns {} when the run has no checkpoint or the checkpoint no counters.
    """
    path = RunDirectory(run_dir).latest_checkpoint_path
    if not path.is_file():
        return {}
    try:
        ck = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - the export goes on without the counters, and says so
        logger.warning("cannot read checkpoint %s: %s", path, exc)
        return {}
    counts: list[Any] = []

    def walk(node: Any) -> None:
        if isinstance(node, Mapping):
            for k, v in node.items():
                if k == "pulse_count" and hasattr(v, "numel"):
                    counts.append(v)
                else:
                    walk(v)
        elif isinstance(node, (list, tuple)):
            for v in node:
                walk(v)

    paths = ck.get("paths", ck) if isinstance(ck, Mapping) else {}
    walk(paths.get("analog", paths) if isinstance(paths, Mapping) else paths)
    if not counts:
        return {}
    return {
        "max_pulses_per_device": float(max(float(c.max()) for c in counts)),
        "total_pulses": float(sum(float(c.double().sum()) for c in counts)),
        "n_weights": int(sum(int(c.numel()) for c in counts)),
        "checkpoint_step": ck.get("step") if isinstance(ck, Mapping) else None,
    }


def read_run(run_dir: str | Path) -> RunFacts:
    return check_run_dir(run_dir)


def _count_weights(run_dir: Path, facts: RunFacts) -> int | None:
    """Number of analog weights (cross-points): from the counters, else from `conductances.pt`."""
    n = facts.counters.get("n_weights") or facts.summary.get("n_analog_weights")
    if n:
        return int(n)
    path = run_dir / "conductances.pt"
    if path.is_file():
        try:
            data = torch.load(path, weights_only=False, map_location="cpu")
            weights = data.get("start") or data.get("end") or {}
            total = sum(int(w.numel()) for w in weights.values())
            return total or None
        except Exception as exc:  # noqa: BLE001 - a figure we can do without
            logger.warning("cannot read %s: %s", path, exc)
    return None

