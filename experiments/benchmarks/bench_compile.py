"""Does `torch.compile` speed up the analog read or the force at this project's sizes on CPU?

Run by hand:  python -m experiments.benchmarks.bench_compile [--rows 256 --width 32 --backend inductor]

Measures, side by side in one process (candidates alternating, best of `--repeats`), eager vs
compiled (`dynamic=False`, so one specialised graph):
- the read periphery's data-independent stages of `crossbar.io.PeripheryReader` at the preset
  periphery: the input stage (abs-max noise management, DAC quantisation) and the output stage
  (ADC quantisation, saturation test); the noise draw and the product stay outside (a compiled
  graph cannot take the explicit `torch.Generator` every draw uses);
- the digital force F(z) of the demo block (C = `--width`, T 16, B 16) with `torch.no_grad`.
It prints the compile time, both timings, their ratio and whether the outputs are bit-identical.
Measured on the shared 2-core machine (inductor, rows 256, C = 32, heavily loaded): the periphery's
input and output stages ran 1.5x and 3.0x slower compiled (bit-identical); the digital force ran
0.60x eager, but took 51 s to compile for one input shape, and differs from eager by up to
4.8e-7. Again on 2 Dec at C = 128 (loaded): input stage 1.11x, output stage 2.34x, force 0.76x
(max |diff| 4.8e-7). Hence the library never hands the periphery to torch.compile (its compiled
read path is two numba passes, `crossbar/io_kernels.py`, measured by `bench_ep_step`), and
torch.compiles only the digital twin's force, on request (`RunConfig.compile` / `--compile inductor`,
`EquilibriumTransformer.compile_force`, where the whole training step is measured by
`bench_ep_step --compile inductor`); the analog path's reads (explicit generators, custom autograd
Function) would break its graph. Rerun this to check elsewhere.
"""

from __future__ import annotations

import argparse
import time

import torch

from crossbar.io import PeripheryReader
from crossbar.presets import preset_io
from ept_hw.model import EquilibriumTransformer, ModelConfig
from ept_hw.projection import digital_factory


def _best(fns: dict, repeats: int, inner: int) -> dict:
    best = {name: float("inf") for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            for _ in range(inner):
                fn()
            best[name] = min(best[name], (time.perf_counter() - start) / inner)
    return best


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=256, help="vectors per read (B·T)")
    ap.add_argument("--width", type=int, default=32)
    ap.add_argument("--backend", default="inductor")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    reader = PeripheryReader(preset_io())
    in_unit, bound = reader.in_unit, reader.bound

    def input_stage(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        alpha = x.abs().amax(dim=-1, keepdim=True)
        alpha = torch.where(alpha > 0, alpha, 1.0)
        return (x * (alpha.reciprocal() / in_unit)).round_(), alpha

    def output_stage(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = y.round()
        return y, y.abs().amax(dim=-1) >= bound

    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.rows, args.width, generator=g)
    y = 40.0 * torch.randn(args.rows, args.width, generator=g)
    print(f"rows {args.rows}, width {args.width}, backend {args.backend}, torch threads {torch.get_num_threads()}")
    for name, fn, arg in (("input stage", input_stage, x), ("output stage", output_stage, y)):
        start = time.perf_counter()
        compiled = torch.compile(fn, backend=args.backend, dynamic=False)
        out_c = compiled(arg.clone())
        t_compile = time.perf_counter() - start
        out_e = fn(arg.clone())
        same = all(torch.equal(a, b) for a, b in zip(out_e, out_c))
        t = _best({"eager": lambda: fn(arg.clone()), "compiled": lambda: compiled(arg.clone())}, args.repeats, 200)
        print(f"{name:<13} compile {t_compile:7.1f} s   eager {t['eager'] * 1e6:8.1f} us   compiled "
              f"{t['compiled'] * 1e6:8.1f} us   compiled/eager {t['compiled'] / t['eager']:5.2f}   bit-identical {same}")


    model = EquilibriumTransformer(ModelConfig(width=args.width, heads=2, context=16, ffn_mult=2), digital_factory,
                                   torch.Generator().manual_seed(0))
    idx = torch.randint(0, 65, (16, 16), generator=g)
    z = model.embed(idx)
    force = lambda z: model.force(z, z)  # noqa: E731
    start = time.perf_counter()
    compiled = torch.compile(force, backend=args.backend, dynamic=False)
    with torch.no_grad():
        f_c = compiled(z)
        t_compile = time.perf_counter() - start
        f_e = force(z)
        t = _best({"eager": lambda: force(z), "compiled": lambda: compiled(z)}, args.repeats, 20)
    err = float((f_c - f_e).abs().max())
    print(f"{'force F(z)':<13} compile {t_compile:7.1f} s   eager {t['eager'] * 1e6:8.1f} us   compiled "
          f"{t['compiled'] * 1e6:8.1f} us   compiled/eager {t['compiled'] / t['eager']:5.2f}   max |diff| {err:.1e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
