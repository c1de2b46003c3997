"""Cost of one EP step (free phase + nudges + ports) in units of one force evaluation F and in seconds.

Run by hand: `python -m experiments.benchmarks.bench_corrections [--width 64 --heads 4 --context 64 --batch 16]`.
Measures side by side in one run, float32, at the reference recipe (holomorphic N = 2, r = 0.02,
T2 20, t2sel 40, T1 150 capped at 300, tol 1e-4): the AsymEP correction none vs frozen vs tracking
with J v by dual numbers vs tracking with the secant J v (from the nudged forces), the unit costs of
F, J v (dual numbers), F + Jᵀ v (backward) and (J − Jᵀ) v, and F at 1 vs the default torch threads.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.autograd.forward_ad as fwAD

from ept_hw.estimators import EPEstimator, EstimatorConfig, _antisym_dual, compare_gradients
from ept_hw.model import EquilibriumTransformer, ModelConfig
from ept_hw.projection import digital_factory
from ept_hw.relaxation import SolverConfig, relax


def _time(fn, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(repeats):
            fn()
        best = min(best, (time.perf_counter() - t0) / repeats)
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--context", type=int, default=64)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--vocab", type=int, default=65)
    ap.add_argument("--repeats", type=int, default=2, help="EP steps timed per variant (best is kept)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads for the timed runs (the trainer's default is 1)")
    args = ap.parse_args()
    default_threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)

    gen = torch.Generator().manual_seed(0)
    cfg = ModelConfig(vocab_size=args.vocab, context=args.context, width=args.width, heads=args.heads)
    model = EquilibriumTransformer(cfg, digital_factory, gen, torch.float32)
    idx = torch.randint(0, args.vocab, (args.batch, args.context), generator=gen)
    tg = torch.randint(0, args.vocab, (args.batch, args.context), generator=gen)
    x = model.embed(idx)
    v = torch.randn(x.shape, generator=gen)
    print(f"C={args.width} H={args.heads} T={args.context} B={args.batch} float32, torch threads {torch.get_num_threads()}")

    with torch.no_grad():
        t_f = _time(lambda: model.force(x, x), 20)

        def dual() -> None:
            with fwAD.dual_level():
                fwAD.unpack_dual(model.force(fwAD.make_dual(x, v), x))

        t_jv = _time(dual, 10)

    def f_vjp() -> None:
        z = x.clone().requires_grad_(True)
        torch.autograd.grad(model.force(z, x), z, v)

    t_vjp = _time(f_vjp, 10)
    t_anti = _time(lambda: _antisym_dual(model, x, x, v), 10)
    print(f"F                      {t_f * 1e3:8.2f} ms  (1.00 F)")
    print(f"J v (dual numbers)     {t_jv * 1e3:8.2f} ms  ({t_jv / t_f:.2f} F)")
    print(f"F + Jᵀ v (backward)    {t_vjp * 1e3:8.2f} ms  ({t_vjp / t_f:.2f} F)")
    print(f"(J − Jᵀ) v, dual+bwd  {t_anti * 1e3:8.2f} ms  ({t_anti / t_f:.2f} F)")

    solver = SolverConfig(min_steps=150, tol=1e-4, max_steps=300)
    with torch.no_grad():
        free = relax(lambda z: model.force(z, x), x, solver)
    t_free = _time(lambda: relax(lambda z: model.force(z, x), x, solver), 1)
    print(f"free phase: {free.n_steps} steps, residual {free.residual_max:.2e}, {t_free:.2f} s ({t_free / t_f:.0f} F)")
    # On a shared machine the load drifts: F is re-timed right before each variant (best of both).
    print(f"{'correction':<10} {'F ms':>6} {'nudge s':>8} {'ports s':>8} {'step s':>8} {'step / F':>9}   "
          "(step = free + nudge + ports; free phase at the F of this row)")
    results = {}
    for label, correction, jvp in (("none", "none", "dual"), ("frozen", "frozen", "dual"),
                                   ("track-dual", "tracking", "dual"), ("track-sec", "tracking", "secant")):
        with torch.no_grad():
            t_f_row = min(t_f, _time(lambda: model.force(x, x), 20))
        est = EPEstimator(EstimatorConfig(correction=correction, jvp=jvp), solver)
        best = None
        for _ in range(args.repeats):
            r = est.compute(model, idx, tg, free=free)
            d = r.diagnostics
            if best is None or d["seconds_nudge"] < best["seconds_nudge"]:
                best = d
        results[label] = r
        step = free.n_force_evals * t_f_row + best["seconds_nudge"] + best["seconds_ports"]
        print(f"{label:<10} {t_f_row * 1e3:6.2f} {best['seconds_nudge']:8.2f} {best['seconds_ports']:8.3f} "
              f"{step:8.2f} {step / t_f_row:9.0f}")
    cmp = compare_gradients(results["track-sec"], results["track-dual"])
    worst = min(cmp.items(), key=lambda kv: kv[1][0])
    print(f"secant vs dual gradient (float32, same free phase): cos all {cmp['all'][0]:.6f}, "
          f"worst group {worst[0]} {worst[1][0]:.6f}, norm ratio {cmp['all'][1]:.5f}")

    threads = args.threads
    with torch.no_grad():
        per_threads = {}
        for n in sorted({1, threads, default_threads}):
            torch.set_num_threads(n)
            per_threads[n] = _time(lambda: model.force(x, x), 20)
    torch.set_num_threads(threads)
    print("F by torch threads: " + ", ".join(f"{n}: {t * 1e3:.2f} ms" for n, t in per_threads.items())
          + f"  (ratio {default_threads}/1 threads: {per_threads[default_threads] / per_threads[1]:.2f})")


if __name__ == "__main__":
    main()
