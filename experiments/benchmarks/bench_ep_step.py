"""Cost of one training step of the analog path and of the digital twin, side by side.

Run by hand:  python -m experiments.benchmarks.bench_ep_step [--widths 32,64,128 --repeats 3]

For each width C (other settings: the `demo` preset, i.e. T 16, B 16, H 2, ECRAM (`--device`: another
preset or device file) with its preset
periphery, common read noise, the demo's estimator and stabilisers), both paths of
`trainer.loop.build_paths` are built from the same seed and trained on the same random batches,
the two paths alternating step by step so that the load of a shared machine hits them alike.
Per path it reports, as the median over `--repeats` steps:

- s/step of `EPPath.train_step` (health probe off) and tokens/s = B·T / (s/step);
- force evaluations per step (calls of `model.force`, J v by dual numbers and backward graphs
  included: each is one pass through the block);
- the split: free phase, nudge (the EP estimate: nudged phases and port reads), update
  (`apply_update` on every projection and the digital periphery), the rest of the step
  (stabilisers: resreg, jacreg), and the instruments amortised per step at the preset's
  intervals: (evaluation + stability monitor)/eval_interval + health probe/health_interval;
- the analog/digital ratio of s/step (training step alone, and with instruments), and the
  median and quartiles of the step-by-step ratios (each analog step over the twin's step on the
  same batch just before it; `paired_summary`).

With `--compile inductor` a third path, the twin whose plain force evaluations are compiled
(`RunConfig.compile`, `EquilibriumTransformer.compile_force`), is timed beside them (row
`twin+c`; its ratio columns are compiled/eager twin), and a line gives analog/compiled twin. The
compilation itself happens in the warm-up and is not timed (the first step of each new shape).

Timings are wall-clock on whatever machine runs it; say how loaded it was when quoting them.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import replace
from typing import Any, Callable

import torch

from experiments.presets import load_run_config
from trainer.config import resolve_vocab
from trainer.data import sample_batch
from trainer.loop import _stability, build_paths

PARTS = ("free", "nudge", "update", "rest", "instruments")


def _timed(record: dict[str, float], key: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            record[key] = record.get(key, 0.0) + time.perf_counter() - start
    return wrapper


class _Instrumented:
    """One path with timing wrappers on its step's parts and a counter on `model.force`."""

    def __init__(self, path: Any) -> None:
        self.path = path
        self.record: dict[str, float] = {}
        self.forces = 0
        model = path.model
        force = model.force

        def counted(*args: Any, **kwargs: Any) -> Any:
            self.forces += 1
            return force(*args, **kwargs)

        model.force = counted  # instance attribute: every `model.force(...)` goes through it
        for attr, key in (("free_phase", "free"), ("estimate", "nudge"), ("_apply", "update")):
            setattr(path, attr, _timed(self.record, key, getattr(path, attr)))
        if path.health_probe is not None:
            # the probe's own nudges go through `estimate` too: its total is timed on its own key
            probe = path.health_probe
            probe.probe = _timed(self.record, "probe", probe.probe)

    def step(self, idx: torch.Tensor, targets: torch.Tensor, lr: float) -> dict[str, float]:
        self.record.clear()
        self.forces = 0
        start = time.perf_counter()
        self.path.train_step(idx, targets, lr, health=False)
        total = time.perf_counter() - start
        parts = {k: self.record.get(k, 0.0) for k in ("free", "nudge", "update")}
        parts["rest"] = total - sum(parts.values())
        parts["step"] = total
        parts["forces"] = float(self.forces)
        return parts

    def instruments(self, idx: torch.Tensor, targets: torch.Tensor, lr: float,
                    eval_batches: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, float]:
        """Seconds of one evaluation, one stability run and one health probe (the probe's own
        time inside a health step: the step it rides on is not counted)."""
        start = time.perf_counter()
        self.path.evaluate(eval_batches)
        t_eval = time.perf_counter() - start
        start = time.perf_counter()
        _stability(self.path, eval_batches[0])
        t_stab = time.perf_counter() - start
        self.record.clear()
        self.path.train_step(idx, targets, lr, health=True)
        return {"eval": t_eval, "stability": t_stab, "probe": self.record.get("probe", 0.0)}


def bench_width(width: int, heads: int, repeats: int, seed: int, compile_backend: str = "none", device: str = "ecram"
                ) -> dict[str, dict[str, float]]:
    cfg = load_run_config("demo", {"model": {"width": width, "heads": heads}, "analog": {"device": device}, "seed": seed})
    cfg = resolve_vocab(cfg, 65)
    t = cfg.training
    paths = {name: _Instrumented(p) for name, p in build_paths(cfg).items()}
    if compile_backend != "none":  # a third path: the twin with its plain force evaluations compiled
        torch._dynamo.reset()  # compiled code is cached per code object: each width starts afresh
        paths["twin+c"] = _Instrumented(build_paths(replace(cfg, compile=compile_backend))["twin"])
    gen = torch.Generator().manual_seed(seed)
    data = torch.randint(0, 65, (200_000,), generator=gen)
    eval_batches = [sample_batch(data, t.batch_size, t.seq_len, gen) for _ in range(t.eval_batches)]
    rows: dict[str, list[dict[str, float]]] = {n: [] for n in paths}
    batch = sample_batch(data, t.batch_size, t.seq_len, gen)
    for p in paths.values():  # warm-up (first-call allocations, lazy caches, compilation of the shapes)
        p.step(*batch, t.lr)
        p.instruments(*batch, t.lr, eval_batches)
    for _ in range(repeats):
        batch = sample_batch(data, t.batch_size, t.seq_len, gen)
        for name, p in paths.items():
            rows[name].append(p.step(*batch, t.lr))
    inst: dict[str, list[dict[str, float]]] = {n: [] for n in paths}
    for _ in range(max(1, repeats // 2)):
        batch = sample_batch(data, t.batch_size, t.seq_len, gen)
        for name, p in paths.items():
            inst[name].append(p.instruments(*batch, t.lr, eval_batches))
    out: dict[str, dict[str, float]] = {}
    for name in paths:
        med = {k: statistics.median(r[k] for r in rows[name]) for k in rows[name][0]}
        ins = {k: statistics.median(r[k] for r in inst[name]) for k in inst[name][0]}
        per_step = (ins["eval"] + (ins["stability"] if t.stability_every == -1 else 0.0)) / t.eval_interval
        if t.stability_every > 0:
            per_step += ins["stability"] / t.stability_every
        if t.health_interval > 0:
            per_step += ins["probe"] / t.health_interval
        med["instruments"] = per_step
        med["tokens_per_s"] = t.batch_size * t.seq_len / med["step"]
        if name != "twin":  # the step's ratio to the twin's on the same batch, measured right after it
            med["paired"] = [r["step"] / d["step"] for r, d in zip(rows[name], rows["twin"])]
        out[name] = med
    return out


def paired_summary(ratios: list[float]) -> str:
    """Median and quartiles of per-step ratios (each a step over the twin's step on the same batch,
    the two timed one after the other): a load change on a shared machine that lasts longer than
    a step moves both sides of a ratio alike, so these spread less than a ratio of medians."""
    q = statistics.quantiles(ratios, n=4, method="inclusive") if len(ratios) > 1 else [ratios[0]] * 3
    return f"{q[1]:.2f} (quartiles {q[0]:.2f}-{q[2]:.2f}, {len(ratios)} steps)"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--widths", default="32,64,128", help="comma-separated widths C")
    ap.add_argument("--heads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5, help="timed steps per path and width (median kept)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="ecram", help="the analog path's device: a preset name or a device file")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the trainer's default is 1)")
    ap.add_argument("--compile", default="none", choices=("none", "inductor", "aot_eager"),
                    help="also time the twin with this torch.compile backend (row twin+c; compile time excluded)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"demo preset (T 16, B 16, H {args.heads}, {args.device}, common noise), torch threads {torch.get_num_threads()}, "
          f"median of {args.repeats} steps, paths alternating")
    head = (f"{'C':>4} {'path':<7} {'s/step':>7} {'F/step':>6} {'tok/s':>7} "
            + " ".join(f"{p:>11}" for p in PARTS) + f" {'a/d step':>8} {'a/d +instr':>10}")
    print(head)
    for width in (int(w) for w in args.widths.split(",")):
        res = bench_width(width, args.heads, args.repeats, args.seed, args.compile, args.device)
        for name in [n for n in ("twin", "twin+c", "analog") if n in res]:
            r = res[name]
            ratio = ratio_i = ""
            if name != "twin":  # analog: analog/twin; twin+c: compiled twin/eager twin
                d = res["twin"]
                ratio = f"{r['step'] / d['step']:8.2f}"
                ratio_i = f"{(r['step'] + r['instruments']) / (d['step'] + d['instruments']):10.2f}"
            print(f"{width:>4} {name:<7} {r['step']:7.3f} {r['forces']:6.0f} {r['tokens_per_s']:7.0f} "
                  + " ".join(f"{r[p]:11.4f}" for p in PARTS) + f" {ratio:>8} {ratio_i:>10}")
        print(f"{width:>4} analog/twin step by step: {paired_summary(res['analog']['paired'])}")
        if "twin+c" in res:
            a, c = res["analog"], res["twin+c"]
            print(f"{width:>4} analog / compiled twin: {a['step'] / c['step']:.2f} (step), "
                  f"{(a['step'] + a['instruments']) / (c['step'] + c['instruments']):.2f} (+instr)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
