"""Device-pulses per second of every device model on a 512×512 array, against a plain torch floor.

Run by hand:  python -m experiments.benchmarks.bench_devices [--n 512 --repeats 5 --pulses 4 --threads 0]

For each model (the basic classes at aihwkit defaults and every preset) it times, in one run:
- `apply_pulses` with one up pulse per device (the exact per-pulse rule, c2c noise, bounds);
- `apply_pulses` with random counts 0..2·pulses up and down per device (mixed directions, loop
  over the pulse index with masks), reported per device-pulse actually applied;
- `apply_pulses_integrated` with the same counts (closed-form approximation, cost independent of n);
and the floor: a plain torch elementwise update `w.add_(dw)` of the same (n, n) tensor (timed
first and again last; the faster is used). Ratios are
(seconds per device-pulse) / (seconds per element of the floor), measured side by side.
"""

from __future__ import annotations

import argparse
import time

import torch

from devices import DEVICE_MODELS, DeviceArray, load_device, preset_names


def _best(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return min(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--pulses", type=int, default=4, help="mean pulses per direction in the mixed test")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave torch's default)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    shape = (args.n, args.n)
    g = torch.Generator(device=dev).manual_seed(0)

    w = torch.zeros(shape, device=dev)
    dw = torch.randn(shape, device=dev, generator=g) * 1e-3
    floor = _best(lambda: w.add_(dw), 4 * args.repeats) / w.numel()

    ones = torch.ones(shape, dtype=torch.long, device=dev)
    zeros = torch.zeros_like(ones)
    n_up = torch.randint(0, 2 * args.pulses + 1, shape, generator=g, device=dev)
    n_down = torch.randint(0, 2 * args.pulses + 1, shape, generator=g, device=dev)
    mixed_total = int((n_up + n_down).sum())

    draw = _best(lambda: torch.randn(shape, device=dev, generator=g), args.repeats) / w.numel()
    print(f"{args.n}x{args.n} array on {dev}, torch threads {torch.get_num_threads()}; "
          f"floor (w.add_(dw)): {1 / floor / 1e9:.2f} G elements/s; one normal draw per element "
          f"(the c2c noise alone): {1 / draw / 1e6:.1f} M/s = {draw / floor:.1f}x floor")
    print(f"{'device':24s} {'1 pulse: Mpulse/s':>18s} {'x floor':>8s}   {'mixed: Mpulse/s':>16s} {'x floor':>8s}"
          f"   {'approx: Mpulse/s':>16s} {'x floor':>8s}")
    names = [(m, DEVICE_MODELS[m]()) for m in DEVICE_MODELS if m != "ideal"]
    names += [(p, load_device(p)) for p in preset_names() if p != "ideal"]
    for name, cfg in names:
        arr = DeviceArray(cfg, shape, g, device=dev)
        arr.set_weights(torch.zeros(shape, device=dev), g)
        t1 = _best(lambda: arr.apply_pulses(ones, zeros, g), args.repeats) / ones.numel()
        arr.set_weights(torch.zeros(shape, device=dev), g)
        tm = _best(lambda: arr.apply_pulses(n_up, n_down, g), args.repeats) / mixed_total
        arr.set_weights(torch.zeros(shape, device=dev), g)
        ta = _best(lambda: arr.apply_pulses_integrated(n_up, n_down, g), args.repeats) / mixed_total
        print(f"{name:24s} {1 / t1 / 1e6:18.1f} {t1 / floor:8.1f}   {1 / tm / 1e6:16.1f} {tm / floor:8.1f}"
              f"   {1 / ta / 1e6:16.1f} {ta / floor:8.1f}")
    floor = min(floor, _best(lambda: w.add_(dw), 4 * args.repeats) / w.numel())
    print(f"floor again at the end: {1 / floor / 1e9:.2f} G elements/s (ratios above use the first)")
    ideal = DeviceArray(load_device("ideal"), shape, g, device=dev)
    ti = _best(lambda: ideal.apply_delta(dw), args.repeats) / w.numel()
    print(f"{'ideal (apply_delta)':24s} {1 / ti / 1e6:18.1f} {ti / floor:8.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
