"""The sweep engine: run a point function over points (and seeds), one atomic record per task, resume.

Generic over a *point function* ``point_fn(overrides, context) -> dict`` (a module-level
function, so that spawned worker processes and Ray workers can import it). A *task* is one point
(its overrides) and, optionally, one seed index; its record is written atomically (temp file,
fsync, rename) to ``points/<point id>.json`` (no seed) or ``points/<point id>-s<k>.json`` (seed
index k, passed to the point function as ``context["point_seed"]``) as soon as it finishes, so an
interrupted sweep resumes without recomputing finished tasks, whichever backend ran them. A task
that raises is recorded with its error (status "failed") while the rest go on.

Backends: ``local`` (the default, no extra dependency) runs tasks inline (``workers = 1``) or in a
`concurrent.futures.ProcessPoolExecutor` with the spawn context; ``ray`` submits each task as a
Ray task (`pip install .[ray]`), to a local Ray instance or to ``ray_address``. A Ray worker
writes the same record file as a local worker, so the sweep directory must be on a file system
that every Ray node sees (a shared or local file system).

The sweep's context (JSON-able) is pinned in ``sweep_manifest.json``: resuming a directory with a
different context raises `ValueError` naming the differing keys. Keys starting with "_" are run
mechanics (threads, where, which backend) and are passed but not pinned, so a sweep may be resumed
on another backend with the same settings.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import logging
import multiprocessing
import os
import socket
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from ept_hw.config import ConfigError
from trainer.rundir import atomic_write_json as _atomic_write_json

from .axes import point_id

__all__ = ["PointFn", "RESULT_KEYS", "POINTS_DIR", "MANIFEST", "Task", "run_sweep", "load_records", "check_backend",
           "atomic_write_json", "check_manifest", "BACKENDS", "SweepBackendError"]

logger = logging.getLogger(__name__)

PointFn = Callable[[Mapping[str, Any], Mapping[str, Any]], Mapping[str, Any]]

#: Figures a point function may return (missing ones are recorded as null).
RESULT_KEYS = (
    "analog_val_loss",
    "twin_val_loss",
    "gap",
    "analog_residual",
    "twin_residual",
    "re_mu",
    "pulses_per_device",
    "analog_diverged",
    "run_dir",
)

POINTS_DIR = "points"
MANIFEST = "sweep_manifest.json"
BACKENDS = ("local", "ray")


class SweepBackendError(ValueError):
    """A backend that cannot run (Ray not installed, no Ray cluster at the address): nothing ran."""


@dataclass(frozen=True)
class Task:
    """One unit of work: a point's overrides and its seed index (None: a single-seed sweep)."""

    overrides: Mapping[str, Any]
    seed: int | None = None

    @property
    def point_id(self) -> str:
        return point_id(self.overrides)

    @property
    def task_id(self) -> str:
        return self.point_id if self.seed is None else f"{self.point_id}-s{self.seed}"


def atomic_write_json(path: Path, data: Any) -> None:
    """A sweep record, manifest or table as JSON, through the project's one atomic write
    (`trainer.rundir.atomic_write_json`: temp file, fsync, rename, folder fsync)."""
    _atomic_write_json(path, data, indent=1, sort_keys=True, allow_nan=True, default=str)


def _failed_record(task: Task, error: str, tb: str | None = None) -> dict[str, Any]:
    record: dict[str, Any] = {"point_id": task.point_id, "overrides": dict(task.overrides), "status": "failed",
                              "error": error, "wall_time": None, **{k: None for k in RESULT_KEYS}}
    if task.seed is not None:
        record["seed_index"] = task.seed
        record["task_id"] = task.task_id
    if tb:
        record["traceback"] = tb
    return record


def _run_task(point_fn: PointFn, overrides: dict[str, Any], seed: int | None, context: dict[str, Any],
              path: str) -> dict[str, Any]:
    """Run one task (in a worker, a Ray task or inline), write its record atomically, return it."""
    task = Task(overrides, seed)
    start = time.perf_counter()
    record: dict[str, Any] = {"point_id": task.point_id, "overrides": overrides}
    if seed is not None:
        record["seed_index"] = seed
        record["task_id"] = task.task_id
        context = {**context, "point_seed": seed}
    try:
        result = dict(point_fn(overrides, context))
        record.update({k: result.get(k) for k in RESULT_KEYS})
        record.update({k: v for k, v in result.items() if k not in RESULT_KEYS})
        if "gap" not in result and record.get("analog_val_loss") is not None and record.get("twin_val_loss") is not None:
            record["gap"] = float(record["analog_val_loss"]) - float(record["twin_val_loss"])
        record["status"] = "ok"
        record["error"] = None
    except Exception as exc:  # noqa: BLE001 - a failed point is data: record it, the sweep goes on
        record.update({k: None for k in RESULT_KEYS})
        record["status"] = "failed"
        record["error"] = f"{type(exc).__name__}: {exc}"
        record["traceback"] = traceback.format_exc()
    record["wall_time"] = time.perf_counter() - start
    atomic_write_json(Path(path), record)
    return record


def load_records(out_dir: str | Path) -> dict[str, dict[str, Any]]:
    """Every finished record under ``out_dir/points``, by task id (unreadable files skipped)."""
    points_dir = Path(out_dir) / POINTS_DIR
    records: dict[str, dict[str, Any]] = {}
    if not points_dir.is_dir():
        return records
    for path in sorted(points_dir.glob("*.json")):
        try:
            record = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            logger.warning("ignoring unreadable point record %s (it will be recomputed)", path)
            continue
        if isinstance(record, dict) and record.get("task_id", record.get("point_id")) == path.stem:
            records[path.stem] = record
    return records


def _pinned(context: Mapping[str, Any]) -> dict[str, Any]:
    # keys starting with "_" are run mechanics (where, how many threads), not the physics of a point
    return json.loads(json.dumps({k: v for k, v in context.items() if not k.startswith("_")}, sort_keys=True, default=str))


def check_manifest(out_dir: Path, context: Mapping[str, Any]) -> bool:
    """A sweep directory belongs to one base (context); resuming with another base is refused
    (`ValueError` naming the differing keys). Returns whether a manifest is still to be written."""
    path = out_dir / MANIFEST
    if not path.is_file():
        return True
    old = json.loads(path.read_text()).get("context", {})
    fresh = _pinned(context)
    differing = sorted(k for k in set(old) | set(fresh) if old.get(k) != fresh.get(k))
    if differing:
        raise ValueError(
            f"sweep directory {out_dir} holds points of a different base; differing keys: "
            + ", ".join(differing) + " (use another --out, or the same settings to resume)"
        )
    return False


def _check_reachable(address: str, timeout: float = 5.0) -> None:
    """A TCP connection to the Ray address's host and port within `timeout` seconds, else
    `SweepBackendError` (ray.init would otherwise wait a long time on a dead address)."""
    hostport = address.split("://", 1)[-1].rstrip("/")
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise SweepBackendError(f"--ray-address {address!r}: expected HOST:PORT or ray://HOST:PORT (or 'auto')")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            pass
    except OSError as exc:
        raise SweepBackendError(f"no Ray cluster answers at {address} ({exc}); start one with `ray start --head` "
                                "or use --backend local") from None


def _ray_module(address: str | None) -> Any:
    """Import Ray and connect (an existing connection is reused); `SweepBackendError` when it cannot."""
    try:
        import ray
    except ImportError:
        raise SweepBackendError("--backend ray needs Ray: pip install 'ept-hw[ray]' (or pip install ray)") from None
    if not ray.is_initialized():
        if address and address != "auto":
            _check_reachable(address)
        try:
            if address:
                ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
            else:
                ray.init(num_cpus=max(1, os.cpu_count() or 1), include_dashboard=False,
                         logging_level=logging.WARNING, log_to_driver=False)
        except Exception as exc:  # noqa: BLE001 - ConnectionError, RuntimeError, ...: all mean "no cluster"
            raise SweepBackendError(f"cannot connect to a Ray cluster at {address or '(local)'}: "
                                    f"{type(exc).__name__}: {exc}") from None
    return ray


def check_backend(backend: str, ray_address: str | None = None) -> None:
    """Refuse an unknown backend, a Ray backend without Ray, or a Ray address that does not answer."""
    if backend not in BACKENDS:
        raise ConfigError("backend", backend, "one of " + ", ".join(BACKENDS))
    if ray_address and backend != "ray":
        raise ConfigError("ray_address", ray_address, "only with --backend ray")
    if backend == "ray":
        _ray_module(ray_address)


def run_sweep(
    point_fn: PointFn,
    points: Iterable[Mapping[str, Any]],
    out_dir: str | Path,
    *,
    context: Mapping[str, Any] | None = None,
    workers: int = 1,
    retry_failed: bool = False,
    on_record: Callable[[dict[str, Any]], None] | None = None,
    seeds: Sequence[int] | None = None,
    backend: str = "local",
    ray_address: str | None = None,
    precomputed: Mapping[str, Mapping[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """Run every task not already finished under `out_dir`; return all records in task order.

    Tasks are every point times every seed index in `seeds` (None: one task per point, no seed).
    Tasks with a record on disk are not recomputed (failed ones only with `retry_failed`).
    `precomputed` maps task ids to records written without running (e.g. points refused before
    running); they are written if absent. `workers > 1` runs tasks in spawned worker processes
    (local backend) or caps nothing (Ray schedules by its own CPUs).
    """
    if workers < 1:
        raise ConfigError("workers", workers, "an integer >= 1")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"sweep directory {out} is a file")
    ctx = dict(context or {})
    write_manifest = check_manifest(out, ctx)  # before the backend starts: a mismatch costs nothing
    check_backend(backend, ray_address)
    (out / POINTS_DIR).mkdir(parents=True, exist_ok=True)
    if write_manifest:
        atomic_write_json(out / MANIFEST, {"context": _pinned(ctx)})
    seed_list: list[int | None] = list(seeds) if seeds is not None else [None]
    ordered: list[Task] = []
    seen: set[str] = set()
    for p in points:
        for s in seed_list:
            task = Task(dict(p), s)
            if task.task_id not in seen:
                seen.add(task.task_id)
                ordered.append(task)
    done = load_records(out)

    def record_path(task: Task) -> str:
        return str(out / POINTS_DIR / f"{task.task_id}.json")

    for tid, rec in (precomputed or {}).items():
        if tid in seen and (tid not in done or (retry_failed and done[tid].get("status") not in ("ok", "invalid"))):
            atomic_write_json(Path(out / POINTS_DIR / f"{tid}.json"), dict(rec))
            done[tid] = dict(rec)
    todo = [t for t in ordered
            if t.task_id not in done or (retry_failed and done[t.task_id].get("status") not in ("ok", "invalid"))]
    logger.info("sweep %s: %d tasks, %d finished, %d to run (%s backend)", out, len(ordered),
                len(ordered) - len(todo), len(todo), backend)

    def finish(record: dict[str, Any]) -> None:
        done[record.get("task_id", record["point_id"])] = record
        if on_record is not None:
            on_record(record)

    if backend == "ray" and todo:
        _run_ray(point_fn, todo, ctx, record_path, finish, ray_address)
    elif workers == 1 or len(todo) <= 1:
        for t in todo:
            finish(_run_task(point_fn, dict(t.overrides), t.seed, ctx, record_path(t)))
    else:
        mp = multiprocessing.get_context("spawn")
        with cf.ProcessPoolExecutor(max_workers=min(workers, len(todo)), mp_context=mp) as pool:
            futures = {pool.submit(_run_task, point_fn, dict(t.overrides), t.seed, ctx, record_path(t)): t for t in todo}
            try:
                for fut in cf.as_completed(futures):
                    t = futures[fut]
                    try:
                        record = fut.result()
                    except Exception as exc:  # noqa: BLE001 - the worker process itself died
                        record = _failed_record(t, f"worker process failed: {type(exc).__name__}: {exc}")
                        atomic_write_json(Path(record_path(t)), record)
                    finish(record)
            except BaseException:
                for fut in futures:
                    fut.cancel()
                raise
    return [done[t.task_id] for t in ordered if t.task_id in done]


def _run_ray(point_fn: PointFn, todo: Sequence[Task], ctx: dict[str, Any], record_path: Callable[[Task], str],
             finish: Callable[[dict[str, Any]], None], address: str | None) -> None:
    """Every task a Ray task (one CPU each); a task that dies is recorded as failed, the rest go on."""
    ray = _ray_module(address)
    remote = ray.remote(num_cpus=1, max_retries=0)(_run_task)
    refs = {remote.remote(point_fn, dict(t.overrides), t.seed, ctx, record_path(t)): t for t in todo}
    pending = list(refs)
    try:
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            for ref in ready:
                t = refs[ref]
                try:
                    record = ray.get(ref)
                except Exception as exc:  # noqa: BLE001 - the Ray worker died or the task was lost
                    record = _failed_record(t, f"ray task failed: {type(exc).__name__}: {exc}")
                    atomic_write_json(Path(record_path(t)), record)
                finish(record)
    except BaseException:
        for ref in pending:
            ray.cancel(ref, force=True)
        raise
