"""`metrics.jsonl`: one JSON object per logged step, the same keys for both paths.

Every row has exactly the keys of `empty_row()`; a figure that does not exist at that step (the
validation loss between evaluations, the estimator health between probes, the analog figures of a
single digital run) is `null`. Per-path figures carry the path as a prefix (`analog_`, `twin_`);
figures that compare the paths are per projection (`update_cos`, `weight_gap_per_projection`).
Non-finite floats are written as JSON's `NaN`/`Infinity` tokens (Python's `json` reads them), so a
diverged step is recorded as it was.

On resume the log is cut back to the checkpoint's step (rows logged after the last checkpoint by
the interrupted run are dropped), so the resumed rows follow on without duplicates. A torn last
line is dropped on read, with a warning naming the file.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Iterable, Mapping

__all__ = ["PATHS", "PATH_KEYS", "empty_row", "MetricsLog", "read_metrics", "ROW_KEYS"]

PATHS = ("analog", "twin")

#: Figures logged for each path (prefixed by the path name).
PATH_KEYS = (
    "loss",  # training loss of the batch at the free-phase state (mean CE over tokens)
    "val_loss",  # at intervals
    "residual",  # free-phase residual used by the gate/controller (noise-aware on the analog path)
    "residual_raw",  # last one-step residual (analog: includes the read noise)
    "residual_floor",  # the noise floor of the residual (0 on the digital path)
    "free_steps",  # integrator steps of the free phase
    "nudge_steps",
    "gated",  # the validity gate skipped the nudge at this step
    "saturation",  # fraction of devices at a bound (analog)
    "pulses",  # pulses applied so far, all arrays (analog)
    "adc_conversions",  # ADC conversions so far (analog)
    "adjoint_snr",  # ||a|| / spread of a over repeated reads (analog)
    "jacreg_lambda",
    "eigreg_penalty",  # eigreg penalty at this step's free-phase state (before the update)
    "eigreg_abs_lambda",  # eigreg's leading |lambda| of I + eps J (subspace iteration, worst sample)
    # Leading eigenvalues at a validation operating point (ARPACK, `training.stability_every`); on
    # the analog path on the arrays' read-out weights (a digital copy), not through noisy reads.
    "re_mu",  # largest Re mu of J (mu < 0: the fixed point attracts)
    "im_mu",  # |Im mu| of that eigenvalue (a pair crossing Re mu = 0 with Im != 0: Hopf)
    "abs_lambda",  # largest |lambda| of the Euler map I + eps J
    "update_norm",  # Frobenius norm of the applied projection updates lr*delta u^T, all projections
)

COMMON_KEYS = ("step", "lr", "wall_time")
CROSS_KEYS = ("update_cos", "weight_gap", "weight_gap_per_projection")
HEALTH_KEYS = ("health_cos", "health_norm_ratio", "health_self_coherence")

logger = logging.getLogger(__name__)

ROW_KEYS = COMMON_KEYS + tuple(f"{p}_{k}" for p in PATHS for k in PATH_KEYS) + CROSS_KEYS + HEALTH_KEYS


def empty_row(step: int) -> dict[str, Any]:
    row: dict[str, Any] = {k: None for k in ROW_KEYS}
    row["step"] = int(step)
    return row


class MetricsLog:
    """Appends rows to `path`; `resume_step` cuts rows with step > resume_step first."""

    def __init__(self, path: str | Path, resume_step: int | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            self.path.write_text("")
        else:
            from .rundir import atomic_write

            kept = [r for r in read_metrics(self.path) if r["step"] <= resume_step] if self.path.exists() else []
            atomic_write(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        self._fh = self.path.open("a")

    def append(self, row: Mapping[str, Any]) -> None:
        extra = set(row) - set(ROW_KEYS)
        missing = set(ROW_KEYS) - set(row)
        if extra or missing:
            raise KeyError(f"metrics row keys differ from the schema: extra {sorted(extra)}, missing {sorted(missing)}")
        self._fh.write(json.dumps({k: row[k] for k in ROW_KEYS}) + "\n")
        self._fh.flush()

    def close(self) -> None:
        if not self._fh.closed:
            self._fh.flush()
            os.fsync(self._fh.fileno())
            self._fh.close()

    def __enter__(self) -> "MetricsLog":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a metrics log. A torn last line (a crash while it was written) is dropped with a
    warning naming the file; an unreadable line before the last raises `ValueError` naming the
    file and the line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"metrics file {path} does not exist")
    lines = [(i, line) for i, line in enumerate(path.read_text().splitlines(), start=1) if line.strip()]
    rows = []
    for k, (i, line) in enumerate(lines):
        try:
            row = json.loads(line)
            if not isinstance(row, dict):
                raise ValueError("not a JSON object")
        except ValueError as exc:  # json.JSONDecodeError is a ValueError
            if k == len(lines) - 1:
                logger.warning("%s: dropped a torn last line (line %d: %s)", path, i, exc)
                break
            raise ValueError(f"{path} line {i} is not a metrics row ({exc})") from exc
        rows.append(row)
    return rows


def column(rows: Iterable[Mapping[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of the rows where `key` is not null."""
    steps, values = [], []
    for r in rows:
        v = r.get(key)
        if v is not None:
            steps.append(r["step"])
            values.append(v)
    return steps, values
