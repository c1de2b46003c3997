"""The one atomic write of the project (`atomic_write`): a temporary file in the same folder,
flush, fsync, `os.replace`, fsync of the folder, so a reader sees the previous content or the new
one, never a torn file. A leaf module (it imports nothing of the project), so that every writer
(`trainer.rundir.RunDirectory`, `trainer.checkpoint`, `trainer.metrics`) can import it at module
level; `trainer.rundir` re-exports it.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

__all__ = ["atomic_write", "atomic_write_json", "fsync_dir"]


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
