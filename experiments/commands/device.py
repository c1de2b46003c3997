"""`ept-hw device response|fit`: characterise a device model, or fit one to measured traces."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import tomli_w

from devices import load_device
from devices.fit import FIT_MODELS, fit_device, read_traces
from devices.response import run_pulse_response, write_response


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("device", help="device characterisation (response) and fitting (fit)",
                              description="Pulse-response characterisation of a device model, and fitting "
                              "of a device model to measured up/down pulse traces.")
    sub = p.add_subparsers(dest="device_command", metavar="ACTION")

    r = sub.add_parser("response", help="the classic pulse-response experiment",
                       description="Start every device at w_min (or --w-init), then n-steps up pulses and "
                       "n-steps down pulses, repeated n-loops times; writes response.json and response.png.")
    r.add_argument("--device", required=True, help="preset name or device TOML file ([device] table)")
    r.add_argument("--n-devices", type=int, default=2000, help="independent devices (default 2000)")
    r.add_argument("--n-steps", type=int, default=None,
                   help="pulses per direction (default: round((w_max - w_min) / granularity), as aihwkit)")
    r.add_argument("--n-loops", type=int, default=2, help="up/down cycles (default 2)")
    r.add_argument("--w-init", type=float, default=None, help="start weight (default w_min)")
    r.add_argument("--seed", type=int, default=0, help="seed of the device samples and pulse noise")
    r.add_argument("--out", required=True, help="output directory")
    r.set_defaults(func=_response)

    f = sub.add_parser("fit", help="fit a device model to measured pulse traces",
                       description="Fit soft_bounds, linear_step, exp_step or pow_step to up/down pulse traces "
                       "(CSV header trace,pulse,direction,value) with scipy.optimize; prints the parameters, the "
                       "fit error and the NeuroSim-style nonlinearity labels, and writes a device TOML.")
    f.add_argument("trace", help="trace CSV file")
    f.add_argument("--model", required=True, choices=FIT_MODELS)
    f.add_argument("--out", required=True, help="device TOML to write")
    f.add_argument("--g-min", type=float, default=None,
                   help="conductance mapped to weight -1 (values are weights when neither is given)")
    f.add_argument("--g-max", type=float, default=None, help="conductance mapped to weight +1")
    f.set_defaults(func=_fit)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def _response(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out}: exists and is not a directory (response.json and response.png go into a directory)")
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ValueError(f"--out {out}: {parent} is a file, not a directory")
            break
    cfg = load_device(args.device)
    resp = run_pulse_response(cfg, n_devices=args.n_devices, n_steps=args.n_steps, n_loops=args.n_loops,
                              w_init=args.w_init, seed=args.seed)
    data = write_response(args.out, resp, title=f"{args.device} ({cfg.model})", name=Path(args.device).stem)
    d = data["derived"]
    print(f"device {args.device} ({cfg.model}), {resp.n_devices} devices, {resp.n_steps} up/down x {resp.n_loops}")
    print(f"  granularity {d['granularity']:.4g}, states (w_max - w_min)/granularity = {d['n_states']:.1f}")
    print(f"  mean step at w = {d['asymmetry_at_w']:g}: up {d['mean_step_up']:.4g}, down {d['mean_step_down']:.4g}, "
          f"asymmetry (up - down)/(up + down) = {d['up_down_asymmetry']:+.3f}")
    print(f"  symmetry point {d['symmetry_point_mean']:+.4f} +/- {d['symmetry_point_std']:.4f} (over devices)")
    if "c2c_relative" in d:
        print(f"  cycle-to-cycle noise: {d['c2c_std']:.3g} per pulse = {d['c2c_in_granularity']:.3f} granularities "
              f"= {d['c2c_relative']:.3f} of the mean step")
    print(f"  wrote {Path(args.out) / 'response.json'} and response.png")
    return 0


def _fmt_label(x: float) -> str:
    return "n/a" if math.isnan(x) else f"{x:+.2f}"


def _fit(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if out.is_dir():
        raise ValueError(f"--out {out}: is a directory; give the device TOML file to write (e.g. {out / 'device.toml'})")
    if not out.parent.is_dir():
        raise ValueError(f"--out {out}: the folder {out.parent} does not exist")
    traces = read_traces(args.trace, args.g_min, args.g_max)
    result = fit_device(traces, args.model)
    print(f"fit {args.model} to {len(traces)} trace(s), {result.n_pulses} pulses")
    for name, value in result.params.items():
        print(f"  {name:10s} = {value:.6g}")
    if result.read_noise is not None:
        print(f"  dw_min_std = {result.dw_min_std:.4g} (cycle-to-cycle, from the residuals less the read noise)")
        print(f"  read noise = {result.read_noise:.4g} per read (weight units), from {result.extra['repeated_reads']} "
              "repeated reads (not a device parameter: see the tile's forward IO out_noise / w_noise)")
    else:
        print(f"  dw_min_std = {result.dw_min_std:.4g} (from the residuals; the traces hold no repeated reads, so any "
              "read noise is folded in: an upper bound on the cycle-to-cycle noise)")
    print(f"fit error: one-step RMS {result.step_rms:.3f} of the mean step; "
          f"trajectory RMS {result.trajectory_rms:.4f} of (w_max - w_min)")
    seen = result.extra["bounds_seen"]
    for bound, ok in seen.items():
        if not ok:
            print(f"  note: the traces never saturate at {bound}; its value is a fit, weakly determined")
    print(f"NeuroSim-style nonlinearity: LTP {_fmt_label(result.nonlinearity_ltp)}, "
          f"LTD {_fmt_label(result.nonlinearity_ltd)}")
    cfg = result.config
    doc = {"device": cfg.to_dict(),
           "fit": {"source": str(args.trace), "step_rms": result.step_rms, "trajectory_rms": result.trajectory_rms,
                   **({} if result.read_noise is None else {"read_noise_std": result.read_noise}),
                   "nonlinearity_ltp": result.nonlinearity_ltp, "nonlinearity_ltd": result.nonlinearity_ltd,
                   **{f"raw_{k}": v for k, v in result.params.items()}}}
    doc["fit"] = {k: v for k, v in doc["fit"].items() if not (isinstance(v, float) and math.isnan(v))}
    from trainer.rundir import atomic_write

    atomic_write(out, tomli_w.dumps(doc))
    print(f"wrote {args.out} (device-to-device spreads set to 0: one nominal device)")
    return 0
