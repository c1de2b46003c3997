"""The run directory (DESIGN §3): its layout, typed readers and writers, and the one atomic write.

```
runs/<name>/
  config.toml        the resolved `RunConfig`
  tokenizer.json     the tokenizer of the run (reloaded on resume and sampling)
  metrics.jsonl      one JSON object per logged step (`trainer.metrics`)
  checkpoints/       last.pt and previous.pt (the two latest), each written atomically
  summary.json       final figures, divergence/interruption, physics notes, analog pulse counters
  events.jsonl       divergence and interruption events
  conductances.pt    analog effective weights at start and end (the report's histograms)
  plots/, report.md  written by `ept-hw report`
  <command>/         a sub-folder per command that adds to a run (e.g. stability/)
```

Every file the project writes into a run goes through `atomic_write` (temporary file in the same
folder, flush, fsync, `os.replace`, fsync of the folder), so a reader sees the previous content or
the new one, never a torn file. The metrics log is the one exception: it is appended to line by
line (`trainer.metrics.MetricsLog`), and a torn last line (a crash mid-write) is dropped on read
with a warning naming the file.

`RunDirectory` knows the names; nothing else in the project spells them.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

__all__ = ["RunDirectory", "atomic_write", "atomic_write_json", "fsync_dir"]

logger = logging.getLogger(__name__)


def fsync_dir(path: str | Path) -> None:
    """fsync a directory so a rename inside it survives a crash (where the filesystem allows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some filesystems do not allow opening a directory
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | Path, data: str | bytes | Callable[[Any], None], *, binary: bool | None = None) -> Path:
    """Write `data` to `path` atomically: a temporary file in the same folder, flushed and fsynced,
    renamed over `path`, then the folder fsynced. `data` is text, bytes, or a callable that writes
    into the open file object (binary unless `binary=False`). The folder must exist. On any error
    the temporary file is removed and `path` is left as it was."""
    path = Path(path)
    if binary is None:
        binary = not isinstance(data, str)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8"})) as fh:
            if callable(data):
                data(fh)
            else:
                fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        try:
            os.unlink(tmp_name)
        except FileNotFoundError:
            pass
        raise
    fsync_dir(path.parent)
    return path


def atomic_write_json(path: str | Path, data: Any, **dumps: Any) -> Path:
    """`atomic_write` of `json.dumps(data, **dumps)` (indent 2 and `default=str` unless given)."""
    dumps = {"indent": 2, "default": str, **dumps}
    return atomic_write(path, json.dumps(data, **dumps))


class RunDirectory:
    """One run directory: the names of its files and typed access to them.

    Construction touches nothing on disk. Writers create the folder they write into; readers raise
    `FileNotFoundError` naming the file when it is missing (`read_summary` returns {} instead:
    a run that stopped early has none).
    """

    CONFIG = "config.toml"
    TOKENIZER = "tokenizer.json"
    METRICS = "metrics.jsonl"
    CHECKPOINTS = "checkpoints"
    CHECKPOINT_LATEST = "last.pt"
    CHECKPOINT_PREVIOUS = "previous.pt"
    SUMMARY = "summary.json"
    EVENTS = "events.jsonl"
    CONDUCTANCES = "conductances.pt"
    PLOTS = "plots"
    REPORT = "report.md"
    #: files whose presence marks a folder as a run
    MARKERS = (CONFIG, METRICS, CHECKPOINTS)

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDirectory({str(self.path)!r})"

    def __fspath__(self) -> str:
        return str(self.path)

    # ------------------------------------------------------------------ layout
    @property
    def config_path(self) -> Path:
        return self.path / self.CONFIG

    @property
    def tokenizer_path(self) -> Path:
        return self.path / self.TOKENIZER

    @property
    def metrics_path(self) -> Path:
        return self.path / self.METRICS

    @property
    def checkpoint_dir(self) -> Path:
        return self.path / self.CHECKPOINTS

    @property
    def summary_path(self) -> Path:
        return self.path / self.SUMMARY

    @property
    def events_path(self) -> Path:
        return self.path / self.EVENTS

    @property
    def conductances_path(self) -> Path:
        return self.path / self.CONDUCTANCES

    @property
    def plots_dir(self) -> Path:
        return self.path / self.PLOTS

    @property
    def report_path(self) -> Path:
        return self.path / self.REPORT

    def subdir(self, name: str, *, create: bool = True) -> Path:
        """The sub-folder of a command that adds to the run (`stability`, ...)."""
        if not name or "/" in name or name.startswith("."):
            raise ValueError(f"not a sub-folder name: {name!r}")
        d = self.path / name
        if create:
            d.mkdir(parents=True, exist_ok=True)
        return d

    def is_run(self) -> bool:
        """True if the folder holds (part of) a run."""
        return self.path.is_dir() and any((self.path / n).exists() for n in self.MARKERS)

    def require_run(self) -> "RunDirectory":
        """Raise `FileNotFoundError` unless the folder holds a run with a configuration."""
        if not self.path.is_dir():
            raise FileNotFoundError(f"run directory {self.path} does not exist")
        if not self.config_path.is_file():
            raise FileNotFoundError(f"{self.path} is not a run directory (no {self.CONFIG})")
        return self

    # ------------------------------------------------------------------ config and tokenizer
    def read_config_dict(self) -> dict[str, Any]:
        from ept_hw.config import load_toml

        if not self.config_path.is_file():
            raise FileNotFoundError(f"{self.path} holds no run (no {self.CONFIG})")
        return load_toml(self.config_path)

    def config(self):
        """The saved `RunConfig`."""
        from ept_hw.config import from_dict

        from .config import RunConfig

        return from_dict(RunConfig, self.read_config_dict())

    def write_config(self, cfg: Any) -> Path:
        import tomli_w

        from ept_hw.config import to_dict

        self.path.mkdir(parents=True, exist_ok=True)
        mapping = to_dict(cfg) if not isinstance(cfg, Mapping) else to_dict(dict(cfg))
        return atomic_write(self.config_path, tomli_w.dumps(mapping))

    def write_tokenizer(self, tokenizer: Any) -> Path:
        self.path.mkdir(parents=True, exist_ok=True)
        return atomic_write(self.tokenizer_path, lambda fh: _save_via_path(tokenizer, fh), binary=True)

    # ------------------------------------------------------------------ summary and events
    def read_summary(self) -> dict[str, Any]:
        if not self.summary_path.is_file():
            return {}
        try:
            return json.loads(self.summary_path.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{self.summary_path} is not valid JSON ({exc})") from exc

    def write_summary(self, summary: Mapping[str, Any]) -> Path:
        self.path.mkdir(parents=True, exist_ok=True)
        return atomic_write_json(self.summary_path, dict(summary))

    def append_event(self, event: Mapping[str, Any]) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        with self.events_path.open("a") as fh:
            fh.write(json.dumps(dict(event)) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def write_json(self, relative: str | Path, data: Any, **dumps: Any) -> Path:
        """An extra JSON file inside the run (its folder is created)."""
        target = self.path / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        return atomic_write_json(target, data, **dumps)

    def write_text(self, relative: str | Path, text: str) -> Path:
        target = self.path / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        return atomic_write(target, text)

    # ------------------------------------------------------------------ metrics
    def read_metrics(self) -> list[dict[str, Any]]:
        from .metrics import read_metrics

        return read_metrics(self.metrics_path)

    def metrics_log(self, resume_step: int | None = None):
        from .metrics import MetricsLog

        return MetricsLog(self.metrics_path, resume_step=resume_step)

    def final_val_losses(self) -> dict[str, float | None]:
        """Each path's last logged validation loss."""
        from .metrics import PATHS

        rows = self.read_metrics()
        out: dict[str, float | None] = {}
        for p in PATHS:
            vals = [r[f"{p}_val_loss"] for r in rows if r.get(f"{p}_val_loss") is not None]
            if vals:
                out[p] = vals[-1]
        return out

    # ------------------------------------------------------------------ checkpoints
    @property
    def latest_checkpoint_path(self) -> Path:
        return self.checkpoint_dir / self.CHECKPOINT_LATEST

    @property
    def previous_checkpoint_path(self) -> Path:
        return self.checkpoint_dir / self.CHECKPOINT_PREVIOUS

    def checkpoints(self) -> list[Path]:
        """The kept checkpoint files, newest first."""
        return [p for p in (self.latest_checkpoint_path, self.previous_checkpoint_path) if p.is_file()]

    def has_checkpoint(self) -> bool:
        return bool(self.checkpoints())

    def save_checkpoint(self, payload: Mapping[str, Any]) -> Path:
        """Write `payload` as the latest checkpoint; the one it replaces becomes `previous.pt`
        (the two latest are kept)."""
        from .checkpoint import save_checkpoint

        self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        latest = self.latest_checkpoint_path
        if latest.is_file():
            os.replace(latest, self.previous_checkpoint_path)
        return save_checkpoint(latest, payload)

    def load_checkpoint(self, *, fallback: bool = True) -> tuple[dict[str, Any], Path]:
        """(payload, file) of the latest readable checkpoint. A corrupt latest file is reported
        (a warning naming it) and, with `fallback`, the previous one is used; with no readable
        checkpoint a `FileNotFoundError` or `ValueError` names the files."""
        from .checkpoint import CorruptCheckpointError, load_checkpoint

        files = self.checkpoints()
        if not files:
            raise FileNotFoundError(f"{self.path} has no checkpoint ({self.latest_checkpoint_path} does not exist)")
        errors: list[str] = []
        for i, f in enumerate(files):
            try:
                payload = load_checkpoint(f)
            except CorruptCheckpointError as exc:
                errors.append(str(exc))
                if not fallback:
                    raise ValueError(f"{exc}; the previous checkpoint "
                                     + (f"{files[1]} may be used instead" if len(files) > 1 else "does not exist")) from exc
                if i + 1 < len(files):
                    logger.warning("%s; using the previous checkpoint %s", exc, files[i + 1])
                continue
            return payload, f
        raise ValueError("no readable checkpoint: " + "; ".join(errors))

    # ------------------------------------------------------------------ conductances
    def read_conductances(self) -> dict[str, Any] | None:
        import torch

        if not self.conductances_path.is_file():
            return None
        return torch.load(self.conductances_path, map_location="cpu", weights_only=False)

    def save_conductances(self, when: str, weights: Mapping[str, Any]) -> Path:
        """Add the analog weights at `when` ("start", "end") to `conductances.pt`."""
        import torch

        data = self.read_conductances() or {"quantity": "effective weight"}
        data[when] = dict(weights)
        self.path.mkdir(parents=True, exist_ok=True)
        return atomic_write(self.conductances_path, lambda fh: torch.save(data, fh))

    # ------------------------------------------------------------------ report
    def write_report(self, text: str) -> Path:
        self.path.mkdir(parents=True, exist_ok=True)
        return atomic_write(self.report_path, text)

    def iter_files(self) -> Iterator[Path]:
        return (p for p in sorted(self.path.rglob("*")) if p.is_file())


def _save_via_path(obj: Any, fh: Any) -> None:
    """Objects that save themselves to a path (the tokenizers): save to a temporary path, copy."""
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "obj"
        obj.save(p)
        fh.write(p.read_bytes())
