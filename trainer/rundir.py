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

import datetime
import errno
import fcntl
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterator, Mapping

import tomli_w
import torch

from crossbar import load_tile_config
from ept_hw.config import config_hash, load_toml, to_dict

from .checkpoint import CorruptCheckpointError, load_checkpoint, save_checkpoint
from .config import run_config_from_dict
from .files import atomic_write, atomic_write_json, fsync_dir
from .metrics import MetricsLog, PATHS, read_metrics

__all__ = ["RunDirectory", "RunLock", "RunLockedError", "atomic_write", "atomic_write_json", "fsync_dir", "provenance",
           "check_out_dir"]

logger = logging.getLogger(__name__)


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
    TILE = "tile.toml"
    PROVENANCE = "provenance.json"
    LOCK = ".lock"
    #: files whose presence marks a folder as a run
    MARKERS = (CONFIG, METRICS, CHECKPOINTS)

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._unreadable: set[Path] = set()  # checkpoint files found corrupt by `load_checkpoint`

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
    def tile_path(self) -> Path:
        return self.path / self.TILE

    @property
    def provenance_path(self) -> Path:
        return self.path / self.PROVENANCE

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
        if not self.config_path.is_file():
            raise FileNotFoundError(f"{self.path} holds no run (no {self.CONFIG})")
        return load_toml(self.config_path)

    def config(self):
        """The saved `RunConfig` (keys of older runs migrated)."""
        return run_config_from_dict(self.read_config_dict())

    def write_config(self, cfg: Any) -> Path:
        self.path.mkdir(parents=True, exist_ok=True)
        mapping = to_dict(cfg) if not isinstance(cfg, Mapping) else to_dict(dict(cfg))
        return atomic_write(self.config_path, tomli_w.dumps(mapping))

    def write_tokenizer(self, tokenizer: Any) -> Path:
        self.path.mkdir(parents=True, exist_ok=True)
        return atomic_write(self.tokenizer_path, lambda fh: _save_via_path(tokenizer, fh), binary=True)

    # ------------------------------------------------------------------ the run's own device
    def write_tile_config(self, tile: Any) -> Path:
        """Save the resolved tile configuration (device, periphery, update, algorithm) the run
        trains with, so that the run never depends on the file or preset it came from. The
        round trip is checked: what is read back equals `tile`."""
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write(self.tile_path, tomli_w.dumps({"tile": tile.to_dict()}))
        if self.tile_config() != tile:
            raise RuntimeError(f"{self.tile_path}: the saved tile configuration does not read back equal")
        return self.tile_path

    def tile_config(self):
        """The run's own resolved `TileConfig` (`tile.toml`), or None for a run without an analog
        path (or one written before runs kept their own copy)."""
        if not self.tile_path.is_file():
            return None
        return load_tile_config(self.tile_path)

    def read_provenance(self) -> dict[str, Any]:
        if not self.provenance_path.is_file():
            return {}
        return json.loads(self.provenance_path.read_text())

    def write_provenance(self, data: Mapping[str, Any]) -> Path:
        self.path.mkdir(parents=True, exist_ok=True)
        return atomic_write_json(self.provenance_path, dict(data))

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
        return read_metrics(self.metrics_path)

    def metrics_log(self, resume_step: int | None = None):
        return MetricsLog(self.metrics_path, resume_step=resume_step)

    def final_val_losses(self) -> dict[str, float | None]:
        """Each path's last logged validation loss."""
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
        self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        latest = self.latest_checkpoint_path
        if latest.is_file() and latest not in self._unreadable:  # a corrupt latest never displaces a good previous
            os.replace(latest, self.previous_checkpoint_path)
        self._unreadable.discard(latest)
        return save_checkpoint(latest, payload)

    def load_checkpoint(self, *, fallback: bool = True) -> tuple[dict[str, Any], Path]:
        """(payload, file) of the latest readable checkpoint. A corrupt latest file is reported
        (a warning naming it) and, with `fallback`, the previous one is used; with no readable
        checkpoint a `FileNotFoundError` or `ValueError` names the files."""
        files = self.checkpoints()
        if not files:
            raise FileNotFoundError(f"{self.path} has no checkpoint ({self.latest_checkpoint_path} does not exist)")
        errors: list[str] = []
        for i, f in enumerate(files):
            try:
                payload = load_checkpoint(f)
            except CorruptCheckpointError as exc:
                errors.append(str(exc))
                self._unreadable.add(f)
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
        if not self.conductances_path.is_file():
            return None
        return torch.load(self.conductances_path, map_location="cpu", weights_only=False)

    def save_conductances(self, when: str, weights: Mapping[str, Any]) -> Path:
        """Add the analog weights at `when` ("start", "end") to `conductances.pt`."""
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


# ---------------------------------------------------------------------------------- locking
class RunLockedError(RuntimeError):
    """Another live process holds the run's lock."""


class RunLock:
    """An exclusive lock on a run folder: `<folder>/.lock` holding the holder's pid, locked with
    `fcntl.flock` (released by the kernel when the holder dies, so a stale file never blocks)."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self._fd: int | None = None

    @property
    def path(self) -> Path:
        return self.folder / RunDirectory.LOCK

    def acquire(self) -> "RunLock":
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise RunLockedError(f"{self.folder} is in use by process {holder_pid(self.folder) or '?'} "
                                     f"(lock file {self.path}); wait for it to finish or stop it") from None
            raise
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return self

    def moved_to(self, folder: str | Path) -> None:
        """The locked folder was renamed (the open lock stays held)."""
        self.folder = Path(folder)

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


def holder_pid(folder: str | Path) -> int | None:
    try:
        return int((Path(folder) / RunDirectory.LOCK).read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def is_locked(folder: str | Path) -> bool:
    path = Path(folder) / RunDirectory.LOCK
    if not path.is_file():
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)
    return False


# ---------------------------------------------------------------------------------- creation
def check_out_dir(path: str | Path, *, flag: str = "--out") -> Path:
    """Check that `path` can become a new output folder: it does not exist (or is an empty
    folder) and its nearest existing ancestor is a folder. Raises `ValueError` saying why not;
    writes nothing."""
    path = Path(path)
    if path.exists() or path.is_symlink():
        if not path.is_dir():
            raise ValueError(f"{flag} {path}: exists and is not a directory")
        if any(path.iterdir()):
            if RunDirectory(path).is_run():
                raise ValueError(f"{flag} {path}: already holds a run: resume it with --resume, or choose another {flag}")
            raise ValueError(f"{flag} {path}: is an existing directory with other files in it; "
                             f"choose a new directory (nothing was written)")
        return path
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ValueError(f"{flag} {path}: {parent} is a file, not a directory")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise ValueError(f"{flag} {path}: cannot write into {parent} (permission denied)")
            break
    return path


class Staging:
    """A new run is built in a hidden sibling folder `.<name>.staging` (locked) and renamed to its
    name once it is valid (`commit`); `discard` removes it and any parent folders it created. A
    second process staging the same name is refused naming the holder's pid; a stale staging
    folder (its process gone) is removed."""

    def __init__(self, target: str | Path):
        self.target = Path(target)
        self.folder = self.target.parent / f".{self.target.name}.staging"
        self.lock = RunLock(self.folder)
        self._created: Path | None = None  # the topmost parent folder this object created

    def __enter__(self) -> "Staging":
        missing = [p for p in self.target.parents if not p.exists()]
        self.target.parent.mkdir(parents=True, exist_ok=True)
        self._created = missing[-1] if missing else None
        for _ in range(2):
            try:
                self.folder.mkdir()
                break
            except FileExistsError:
                if is_locked(self.folder):
                    raise RunLockedError(f"{self.target} is being created by process {holder_pid(self.folder) or '?'} "
                                         f"(staging folder {self.folder})") from None
                logger.warning("removing a stale staging folder %s (its process is gone)", self.folder)
                shutil.rmtree(self.folder, ignore_errors=True)
        else:
            raise RunLockedError(f"cannot create the staging folder {self.folder}")
        self.lock.acquire()
        return self

    def commit(self) -> Path:
        """Rename the staging folder to the target (an empty target folder is replaced)."""
        if self.target.exists():
            if not self.target.is_dir() or any(self.target.iterdir()):
                raise ValueError(f"{self.target} appeared while the run was being created; the run is in {self.folder}")
            self.target.rmdir()
        os.rename(self.folder, self.target)
        fsync_dir(self.target.parent)
        self.lock.moved_to(self.target)
        self.folder = self.target
        self._created = None
        return self.target

    def discard(self) -> None:
        self.lock.release()
        if self.folder != self.target:
            shutil.rmtree(self.folder, ignore_errors=True)
        if self._created is not None:
            shutil.rmtree(self._created, ignore_errors=True)
            self._created = None

    def __exit__(self, *exc: Any) -> None:
        self.lock.release()


# ---------------------------------------------------------------------------------- provenance
def _git_commit(root: Path) -> tuple[str | None, bool | None]:
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip() != ""
        return commit or None, dirty
    except (OSError, subprocess.SubprocessError):
        return None, None


def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("ept-hw")
    except PackageNotFoundError:
        return "unknown (not installed)"


def file_sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def provenance(cfg: Any, *, tile: Any = None, argv: list[str] | None = None) -> dict[str, Any]:
    """Where a run came from: package version, git commit (if the code is a git checkout), torch
    and Python versions, the command line, the seed, the start time (UTC), the hash of the
    resolved configuration and, on an analog run, of the resolved tile and the device file's."""
    commit, dirty = _git_commit(Path(__file__).resolve().parents[1])
    out: dict[str, Any] = {
        "package": "ept-hw",
        "package_version": package_version(),
        "git_commit": commit,
        "git_dirty": dirty,
        "torch_version": torch.__version__,
        "python_version": sys.version.split()[0],
        "command_line": list(sys.argv if argv is None else argv),
        "working_directory": os.getcwd(),
        "seed": getattr(cfg, "seed", None),
        "start_time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "config_hash": config_hash(cfg),
    }
    if tile is not None:
        out["tile_hash"] = config_hash(tile)
        device = getattr(getattr(cfg, "analog", None), "device", None)
        source: dict[str, Any] = {"as_given": device}
        if device is not None and Path(device).is_file():
            source.update(path=str(Path(device).resolve()), sha256=file_sha256(device))
        else:
            source["preset"] = device
        out["device_source"] = source
    return out
