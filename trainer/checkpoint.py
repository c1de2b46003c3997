"""Atomic checkpoints and the resume check.

A checkpoint is one `torch.save` payload (a dict) written with the project's one atomic write
(`trainer.files.atomic_write`: temporary file in the same directory, fsync, rename, fsync of the
directory). A reader therefore sees either the previous checkpoint or the new one, never a torn
file; a file torn by other means (a copy cut short) raises `CorruptCheckpointError` naming it. A run
keeps its two latest checkpoints (`RunDirectory.save_checkpoint`).

What goes in is the trainer's business (`trainer.twin`): weights and device states of every
projection (including device-to-device samples), digital parameters, optimiser states, schedule
position, controller and monitor states, and every RNG state (torch generators and the data
sampler's), plus the resolved config. `config_differences` names the keys in which a resume
config differs from the saved one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch

from .files import atomic_write

__all__ = ["save_checkpoint", "load_checkpoint", "config_differences", "CHECKPOINT_NAME",
           "CorruptCheckpointError"]

CHECKPOINT_NAME = "last.pt"


class CorruptCheckpointError(ValueError):
    """A checkpoint file that exists but cannot be read (truncated, not a checkpoint)."""


def save_checkpoint(path: str | Path, payload: Mapping[str, Any]) -> Path:
    """Write `payload` atomically to `path` (`trainer.files.atomic_write`: temp file, fsync,
    rename, fsync of the directory)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(path, lambda fh: torch.save(dict(payload), fh))


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """The payload of a checkpoint file. A missing file raises `FileNotFoundError`, an unreadable
    one `CorruptCheckpointError`; both name the file."""
    path = Path(path)
    if path.is_dir():
        raise FileNotFoundError(f"checkpoint {path} is a directory, not a checkpoint file")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    # Our own files hold generator states and config dicts besides tensors: full unpickling.
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for a torn or foreign file
        raise CorruptCheckpointError(f"checkpoint {path} is corrupt or not a checkpoint ({type(exc).__name__}: {exc})") from exc
    if not isinstance(payload, dict):
        raise CorruptCheckpointError(f"checkpoint {path} is not an ept-hw checkpoint (not a dict)")
    return payload


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
