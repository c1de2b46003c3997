"""Force evaluations to reach res <= tol from x_in: Euler (eps = 0.1) vs Dormand-Prince vs Anderson.

Run by hand:  python -m experiments.benchmarks.bench_solvers [--C 64 --T 32 --B 8 ...]

Two blocks, measured side by side in one run:
- "random": the block at initialisation (c = 1, resinit).
- "partly trained": the same block with stronger residual branches and sharper attention,
  emulating what training does to it (SCIENCE §4): W_O and W_2 scaled by `--attn-gain` (10: the
  resinit factor 0.1 undone) and the qknorm gains by `--qk-gain` (1.5), so the leading eigenvalue
  moves toward the imaginary axis and the relaxation slows down (qk gain 2.5 already gives a limit
  cycle).
- with `--run runs/NAME`: instead of the emulation, the digital twin of a trained run (its last
  checkpoint, e.g. `runs/demo` after `ept-hw demo`) against the same model freshly initialised,
  both on the run's own validation text.

The block is `ept_hw.model.EquilibriumTransformer` with digital projections. The residual is the SCIENCE §2 one-step residual with
eps = 0.1 for every solver.
"""

from __future__ import annotations

import argparse
import logging
import time

import torch

from ept_hw.model import EquilibriumTransformer, ModelConfig
from ept_hw.projection import digital_factory
from ept_hw.relaxation import SolverConfig, relax
from trainer.data import sample_batch
from trainer.loop import build_paths, load_run


def _model_block(C, T, heads, vocab, gen, dtype):
    """The real block from ept_hw.model, adapted to (force, embed, make_trained)."""
    model = EquilibriumTransformer(ModelConfig(vocab_size=vocab, context=T, width=C, heads=heads),
                                   digital_factory, gen, dtype)

    def force(z, x_in):
        return model.force(z, x_in)

    def make_trained(gain: float, qk_gain: float):
        # resinit undone and then some (W_O, W_2 x gain) and sharper attention (qknorm gains x
        # qk_gain): what training does to the block's residual branches and its attention
        for name in ("W_O", "W_2"):
            proj = model.projections[name]
            proj.program(proj.weight * gain)
        for name in ("q_norm_g", "k_norm_g"):
            model.params[name] = model.params[name] * qk_gain

    return force, model.embed, make_trained, "ept_hw.model.EquilibriumTransformer (digital projections)"


def build_block(C, T, heads, vocab, seed, dtype):
    return _model_block(C, T, heads, vocab, torch.Generator().manual_seed(seed), dtype)


def emulated_blocks(args, dtype):
    """(label, force, x_in) for a random block and its emulated 'partly trained' version."""
    force, embed, make_trained, source = build_block(args.C, args.T, args.heads, args.vocab, args.seed, dtype)
    idx = torch.randint(0, args.vocab, (args.B, args.T), generator=torch.Generator().manual_seed(args.seed + 1))
    x_in = embed(idx)

    def blocks():
        yield "random", (lambda z: force(z, x_in)), x_in
        make_trained(args.attn_gain, args.qk_gain)  # after the random block has been measured
        yield (f"partly trained (W_O, W_2 x{args.attn_gain:g}; qknorm gains x{args.qk_gain:g})",
               (lambda z: force(z, x_in)), x_in)

    return blocks(), f"{source}; C={args.C} T={args.T} B={args.B} heads={args.heads} {args.dtype}"


def trained_run_blocks(run_dir: str, batch: int, seed: int):
    """(label, force, x_in) for a run's twin at initialisation and at its last checkpoint."""
    cfg, data, trained = load_run(run_dir)
    fresh = build_paths(cfg)
    idx, _ = sample_batch(data.val, batch, cfg.training.seq_len, torch.Generator().manual_seed(seed))
    blocks = []
    for label, paths in (("random (same config, initialisation)", fresh), (f"trained ({run_dir}, twin)", trained)):
        model = paths["twin"].model
        x_in = model.embed(idx)
        blocks.append((label, (lambda m, x: (lambda z: m.force(z, x)))(model, x_in), x_in))
    return blocks, f"{run_dir}: C={cfg.model.width} T={cfg.training.seq_len} B={batch} heads={cfg.model.heads}"


def measure(force, x_in, cfg: SolverConfig) -> dict:
    relax(force, x_in, SolverConfig(method=cfg.method, max_steps=3, tol=0.0))  # warm-up
    t0 = time.perf_counter()
    res = relax(force, x_in, cfg)
    return {
        "evals": res.n_force_evals, "converged": res.converged, "res": res.residual_max,
        "steps": res.n_steps, "sim_time": res.sim_time, "wall": time.perf_counter() - t0,
        "fallbacks": res.n_fallbacks,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--C", type=int, default=64)
    p.add_argument("--T", type=int, default=32)
    p.add_argument("--B", type=int, default=8)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=65)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tol", type=float, default=1e-4)
    p.add_argument("--max-steps", type=int, default=3000)
    p.add_argument("--attn-gain", type=float, default=10.0, help="W_O and W_2 scale for 'partly trained'")
    p.add_argument("--qk-gain", type=float, default=1.5, help="qknorm gain scale for 'partly trained'")
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    p.add_argument("--run", help="a trained run directory: measure its twin instead of the emulation")
    args = p.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    torch.set_grad_enabled(False)
    torch.set_num_threads(1)  # small block on a shared CPU: threads only add contention
    logging.getLogger("ept_hw.relaxation").setLevel(logging.ERROR)  # the table reports convergence

    solvers = {
        "euler eps=0.1": SolverConfig(method="euler", eps=0.1, tol=args.tol, max_steps=args.max_steps),
        "dopri5": SolverConfig(method="dopri5", tol=args.tol, max_steps=args.max_steps,
                               rtol=args.tol, atol=args.tol * 1e-2),
        "anderson m=5": SolverConfig(method="anderson", tol=args.tol, max_steps=args.max_steps),
        # beta > 1 over-relaxes the Euler map (a plain step of 1.5 eps); fine while 1.5 eps |mu| < 2
        "anderson b=1.5": SolverConfig(method="anderson", tol=args.tol, max_steps=args.max_steps,
                                       anderson_beta=1.5),
    }
    if args.run:
        blocks, source = trained_run_blocks(args.run, args.B, args.seed)
    else:
        blocks, source = emulated_blocks(args, dtype)
    print(f"block: {source}; tol={args.tol:g} (SCIENCE §2 residual, eps=0.1)")
    for label, force, x_in in blocks:
        rows = {name: measure(force, x_in, cfg) for name, cfg in solvers.items()}
        base = rows["euler eps=0.1"]["evals"]
        print(f"\n{label}")
        print(f"  {'solver':<16}{'evals':>7}{'ratio':>8}{'conv':>6}{'max res':>11}{'sim t':>9}{'wall s':>8}")
        for name, r in rows.items():
            print(f"  {name:<16}{r['evals']:>7d}{r['evals'] / base:>8.3f}{str(r['converged']):>6}"
                  f"{r['res']:>11.2e}{r['sim_time']:>9.2f}{r['wall']:>8.2f}")
        done = [(r["evals"], n) for n, r in rows.items() if r["converged"] and n != "euler eps=0.1"]
        if done:
            best = min(done)
            bound = "" if rows["euler eps=0.1"]["converged"] else (
                " - Euler did not converge within the cap, so this is an upper bound on the ratio")
            print(f"  best: {best[1]} at {best[0] / base:.3f} of Euler's evaluations (target <= 0.333){bound}")
        else:
            print("  best: no accelerated solver converged")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
