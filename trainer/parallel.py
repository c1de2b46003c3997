"""A training path served by a forked worker process, so that a compare run's two paths train at once.

A compare run trains the analog path and the twin on the same batch; the two are independent until
the metrics row compares them. At the sizes this tool runs on CPU one EP step is mostly per-call
work on small tensors on one core, so the second core of a 2-core machine is idle. `RemotePath`
moves one path (the twin) into a child process made by ``fork`` (the child starts with the exact
state of the path: weights, generators, optimiser, monitor), and the loop `submit`s the twin's
step before it runs the analog step in its own process, then `collect`s the result.

Results are bit-identical to the serial loop: the child runs the same operations on the same state
with the same number of torch threads (tested in ``tests/test_parallel_paths.py``). The parent's own
copy of the path is stale while the worker runs; `RemotePath.close` loads the worker's final state
into it (`state_dict` / `load_state_dict`, the checkpoint's round trip) and ends the worker.

Used when `trainer.loop.run(parallel_paths=True)` (the default; the CLI's `--serial` turns it off),
the run has more than one path, the tensors live on the CPU, the platform can ``fork``, this
machine has at least 2 CPUs and the run is not already inside a daemonic worker (a sweep or
attribution worker: those use the cores already); otherwise the loop is serial (`parallel_reason`
says why).
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import signal
import traceback
from types import SimpleNamespace
from typing import Any, Callable

import torch

__all__ = ["RemotePath", "WorkerDied", "parallel_reason"]


class WorkerDied(RuntimeError):
    """The worker process of a path ended unexpectedly (killed, out of memory)."""


def parallel_reason(enabled: bool, n_paths: int, torch_device: torch.device | str) -> str | None:
    """None when a run may train its paths in parallel worker processes, else why not."""
    if not enabled:
        return "parallel paths are off (--serial)"
    if n_paths < 2:
        return "one path"
    if torch.device(torch_device).type != "cpu":
        return f"tensors on {torch_device}"
    if "fork" not in multiprocessing.get_all_start_methods():
        return "this platform cannot fork"
    if _cpus() < 2:
        return "one CPU"
    if multiprocessing.current_process().daemon:
        return "inside a daemonic worker process (its pool uses the cores)"
    return None


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _send(conn: Any, obj: Any) -> None:
    """Plain pickle over the pipe: tensors travel as bytes. (`Connection.send` would use torch's
    shared-memory reductions, a shared segment and a file descriptor per tensor: measured ~18 ms
    for one step's outcome and weights at the demo size.)"""
    conn.send_bytes(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL))


def _recv(conn: Any) -> Any:
    return pickle.loads(conn.recv_bytes())


def _serve(path: Any, conn: Any, threads: int) -> None:
    """The worker's loop: receive (fn, args), send (True, fn(path, *args)) or (False, exception)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent defers Ctrl-C to the end of a step
    torch.set_num_threads(threads)
    while True:
        try:
            msg = _recv(conn)
        except EOFError:
            return
        if msg is None:
            conn.close()
            return
        fn, args = msg
        try:
            reply = (True, fn(path, *args))
        except BaseException as exc:  # noqa: BLE001 - every failure goes back to the parent
            reply = (False, _portable(exc))
        try:
            _send(conn, reply)
        except Exception as exc:  # noqa: BLE001 - a result that cannot be pickled
            _send(conn, (False, _portable(exc)))


def _portable(exc: BaseException) -> BaseException:
    """`exc` if it survives pickling, else an exception of the nearest built-in type with its text
    and the worker's traceback (a custom exception with extra constructor arguments does not)."""
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:  # noqa: BLE001
        base = next(c for c in type(exc).__mro__ if c.__module__ == "builtins")
        text = f"{type(exc).__name__}: {exc}\n(in the worker process)\n{''.join(traceback.format_exception(exc))}"
        try:
            return base(text)
        except Exception:  # noqa: BLE001
            return RuntimeError(text)


def _call(path: Any, method: str, args: tuple, kwargs: dict) -> Any:
    obj = path
    for part in method.split("."):
        obj = getattr(obj, part)
    return obj(*args, **kwargs)


def _weights(path: Any) -> dict[str, torch.Tensor]:
    return {name: proj.weight.detach().clone() for name, proj in path.model.projections.items()}


class _RemoteMonitor:
    """`path.monitor` of a remote path: `check` runs on the worker's monitor (it keeps state)."""

    def __init__(self, remote: "RemotePath") -> None:
        self._remote = remote

    def check(self, *args: Any, **kwargs: Any) -> Any:
        return self._remote.call("monitor.check", *args, **kwargs)


class RemotePath:
    """A path living in a forked worker. `submit(fn, *args)` runs ``fn(path, *args)`` there (fn a
    module-level function) and returns at once; `collect()` waits for its result (re-raising the
    worker's exception). The methods the run loop calls on a path are forwarded (each waits);
    `model` is a view of copies of the worker's projection weights (changing it changes nothing there)."""

    def __init__(self, path: Any) -> None:
        self.local = path
        self.name = path.name
        self.analog = getattr(path, "analog", False)
        self.cfg = path.cfg
        ctx = multiprocessing.get_context("fork")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_serve, args=(path, child, torch.get_num_threads()), daemon=True,
                                 name=f"ept-hw {path.name} path")
        self._proc.start()
        child.close()
        self._pending = False
        self._dead = False

    # ------------------------------------------------------------------ transport
    def submit(self, fn: Callable[..., Any], *args: Any) -> None:
        if self._pending:
            raise RuntimeError(f"{self.name}: a result is still to be collected")
        try:
            _send(self._conn, (fn, args))
        except (BrokenPipeError, OSError) as exc:
            self._dead = True
            raise WorkerDied(f"the {self.name} path's worker process is gone ({exc})") from exc
        self._pending = True

    def collect(self) -> Any:
        if not self._pending:
            raise RuntimeError(f"{self.name}: nothing submitted")
        self._pending = False
        try:
            ok, value = _recv(self._conn)
        except (EOFError, OSError) as exc:
            self._dead = True
            raise WorkerDied(f"the {self.name} path's worker process ended (exit code {self._proc.exitcode})") from exc
        if not ok:
            raise value
        return value

    def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        self.submit(fn, *args)
        return self.collect()

    def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return self.run(_call, method, args, kwargs)

    # ------------------------------------------------------------------ the path's interface
    @property
    def model(self) -> SimpleNamespace:
        """The worker's projection weights (copies) as ``model.projections[name].weight``: what the
        metrics row compares between the paths each step (the whole model would cost a pickle of
        every module per step)."""
        return SimpleNamespace(projections={n: SimpleNamespace(weight=w) for n, w in self.run(_weights).items()})

    @property
    def monitor(self) -> _RemoteMonitor:
        return _RemoteMonitor(self)

    def evaluate(self, *args: Any, **kwargs: Any) -> Any:
        return self.call("evaluate", *args, **kwargs)

    def stability(self, *args: Any, **kwargs: Any) -> Any:
        return self.call("stability", *args, **kwargs)

    def free_phase(self, *args: Any, **kwargs: Any) -> Any:
        return self.call("free_phase", *args, **kwargs)

    def readout_model(self) -> Any:
        return self.call("readout_model")

    def state_dict(self) -> Any:
        return self.call("state_dict")

    def load_state_dict(self, *args: Any, **kwargs: Any) -> Any:
        return self.call("load_state_dict", *args, **kwargs)

    # ------------------------------------------------------------------ end
    def close(self, *, sync: bool = True) -> Any:
        """End the worker; with `sync`, first load its state into the parent's copy of the path
        (returned). A worker that already died leaves the parent's copy as it was."""
        try:
            if sync and not self._dead and not self._pending:
                self.local.load_state_dict(self.state_dict())
        finally:
            try:
                _send(self._conn, None)
            except (BrokenPipeError, OSError):
                pass
            self._proc.join(timeout=10)
            if self._proc.is_alive():
                self._proc.kill()
                self._proc.join()
            self._conn.close()
        return self.local
