"""`ept-hw devices`: the device presets (with their tiles' periphery) and the device models."""

from __future__ import annotations

import argparse
import json
import math
from typing import Any


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "devices",
        help="list the device presets (key figures) and device models",
        description="Every name `--device` accepts, with the device model, its step dw_min, bounds, number of "
        "states (w_max - w_min)/granularity, asymmetry up_down, cycle-to-cycle noise dw_min_std and the "
        "tile's periphery (DAC/ADC resolution, output noise); then the device models a [device] table can use.",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_run)


def preset_table() -> list[dict[str, Any]]:
    """Key figures of every tile preset (`crossbar.tile_preset_names()`)."""
    from crossbar import tile_preset, tile_preset_names

    rows = []
    for name in tile_preset_names():
        tile = tile_preset(name)
        d = tile.device_config()
        g = float(d.granularity)
        w_min, w_max = float(getattr(d, "w_min", -math.inf)), float(getattr(d, "w_max", math.inf))
        fwd = tile.forward
        rows.append({
            "name": name,
            "model": d.model,
            "dw_min": getattr(d, "dw_min", None),
            "w_min": w_min if math.isfinite(w_min) else None,
            "w_max": w_max if math.isfinite(w_max) else None,
            "states": (w_max - w_min) / g if g > 0 and math.isfinite(w_max - w_min) else None,
            "up_down": getattr(d, "up_down", None),
            "dw_min_std": getattr(d, "dw_min_std", None),
            "pair": tile.uses_pair,
            "dac_bits": None if fwd.is_perfect else _bits(fwd.inp_res),
            "adc_bits": None if fwd.is_perfect else _bits(fwd.out_res),
            "out_noise": 0.0 if fwd.is_perfect else fwd.out_noise,
        })
    return rows


def _bits(res: float) -> float | None:
    """Resolution step -> bits (aihwkit: res = 1/(2^bits - 2)); None for unquantised (res <= 0)."""
    if res is None or res <= 0:
        return None
    return round(math.log2(1.0 / res + 2.0), 2)


def model_table() -> list[dict[str, str]]:
    from devices.configs import DEVICE_MODELS

    return [{"model": name, "class": cls.__name__, "about": (cls.__doc__ or "").strip().splitlines()[0]}
            for name, cls in DEVICE_MODELS.items()]


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _run(args: argparse.Namespace) -> int:
    presets, models = preset_table(), model_table()
    if args.json:
        print(json.dumps({"presets": presets, "models": models}))
        return 0
    cols = ["name", "model", "dw_min", "w_min", "w_max", "states", "up_down", "dw_min_std", "pair",
            "dac_bits", "adc_bits", "out_noise"]
    cells = [[_fmt(r[c]) for c in cols] for r in presets]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    print("device presets (--device NAME; tile periphery as aihwkit's presets; '-': not applicable, "
          "unquantised or unbounded; pair: a differential pair per weight):")
    print("  " + "  ".join(c.ljust(w) for c, w in zip(cols, widths)))
    for row in cells:
        print("  " + "  ".join(v.ljust(w) for v, w in zip(row, widths)))
    print("\ndevice models ([device] model = ... in a TOML file; unset keys take aihwkit's defaults):")
    for m in models:
        print(f"  {m['model']:<22} {m['class']:<28} {m['about']}")
    return 0
