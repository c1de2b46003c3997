"""Atomic checkpoints and the resume check.

A checkpoint is one `torch.save` payload (a dict) written to a temporary file in the same
directory, fsynced, then renamed over the target (`os.replace` is atomic on POSIX), then the
directory is fsynced so the rename itself survives a crash. A reader therefore sees either the
previous checkpoint or the new one, never a torn file.

What goes in is the trainer's business (`trainer.twin`): weights and device states of every
projection (including device-to-device samples), digital parameters, optimiser states, schedule
position, controller and monitor states, and every RNG state (torch generators and the data
sampler's), plus the resolved config. `config_differences` names the keys in which a resume
config differs from the saved one.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Mapping

import torch

__all__ = ["save_checkpoint", "load_checkpoint", "config_differences", "latest_checkpoint", "CHECKPOINT_NAME"]

CHECKPOINT_NAME = "last.pt"


def _fsync_dir(path: Path) -> None:
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


def save_checkpoint(path: str | Path, payload: Mapping[str, Any]) -> Path:
    """Write `payload` atomically to `path` (temp file, fsync, rename, fsync of the directory)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(dict(payload), fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        try:
            os.unlink(tmp_name)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(path.parent)
    return path


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    # Our own files hold generator states and config dicts besides tensors: full unpickling.
    return torch.load(path, map_location="cpu", weights_only=False)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    path = Path(run_dir) / "checkpoints" / CHECKPOINT_NAME
    return path if path.is_file() else None


def config_differences(saved: Mapping[str, Any], current: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested config mappings (sorted)."""
    keys = set(saved) | set(current)
    diffs: list[str] = []
    for key in sorted(keys):
        name = f"{prefix}{key}"
        a, b = saved.get(key, _MISSING), current.get(key, _MISSING)
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            diffs.extend(config_differences(a, b, name + "."))
        elif _normal(a) != _normal(b):
            diffs.append(name)
    return diffs


_MISSING = object()


def _normal(v: Any) -> Any:
    if isinstance(v, tuple):
        return [_normal(x) for x in v]
    if isinstance(v, list):
        return [_normal(x) for x in v]
    return v
