"""Measure aihwkit's statistics for the parity tests (`tests/test_parity.py`); run by hand.

    OMP_NUM_THREADS=1 PYTHONPATH=. python tests/reference/make_parity.py [--seeds 8]

Needs aihwkit 1.2.0 (its CPU simulator). Writes `tests/reference/parity/*.json` (see
`tests/reference/README.md`). The protocol (weights, inputs, the update stream) comes from the
functions below, which the tests call too: a change here is a change of the reference, so the
JSON keeps a checksum of the protocol tensors that the tests check.

aihwkit cannot be seeded from Python, so every "seed" is a fresh aihwkit tile (its own device
samples and noise streams); per seed the script stores a few statistics of each measured
distribution, and the tests compare their mean over seeds with ours.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import torch

OUT = Path(__file__).resolve().parent / "parity"

SHAPE = (16, 24)           # (out, in) of every tile
N_READ = 32                # input vectors per read
READ_REPEATS = 10          # reads of the same inputs per seed
STEPS, BATCH, LR = 200, 4, 0.05   # the open-loop regression stream
PRESETS = ("ecram", "reram_sb", "pcm", "capacitor", "idealized")
ALGORITHMS = ("sgd", "mixed_precision", "ttv2", "c_ttv2", "agad")   # on reram_sb
QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)
STATS = ("mean", "std") + tuple(f"q{int(round(q * 100)):02d}" for q in QUANTILES)
# PCM pair refresh: G⁺ (aihwkit's hidden_weights_1) and G⁻ (hidden_weights_0) set, one update
REFRESH_SHAPE = (20, 30)
# closed-loop PCM-pair regression (final loss)
PCM_REG_STEPS, PCM_REG_BATCH, PCM_REG_LR = 300, 8, 0.1


def protocol(seed: int = 1234) -> dict[str, torch.Tensor]:
    """Fixed weights W, read inputs X (forward) and D (transposed), a target W* and an open-loop
    update stream: x_t (STEPS, BATCH, in) and the errors d_t = (W_t − W*) x_t of an exact digital
    SGD regression W_{t+1} = W_t − LR·Σ d xᵀ from W (so every simulator gets the same inputs and
    errors whatever its own weights do); `w_digital` is that regression's final W."""
    out_f, in_f = SHAPE
    g = torch.Generator().manual_seed(seed)
    w = 0.4 * (2 * torch.rand(out_f, in_f, generator=g) - 1)
    x_read = 2 * torch.rand(N_READ, in_f, generator=g) - 1
    d_read = 2 * torch.rand(N_READ, out_f, generator=g) - 1
    w_star = 0.4 * (2 * torch.rand(out_f, in_f, generator=g) - 1)
    xs = 2 * torch.rand(STEPS, BATCH, in_f, generator=g) - 1
    wd = w.clone()
    ds = torch.empty(STEPS, BATCH, out_f)
    for t in range(STEPS):
        ds[t] = xs[t] @ (wd - w_star).T
        wd = wd - LR * ds[t].T @ xs[t]
    return {"w": w, "x_read": x_read, "d_read": d_read, "w_star": w_star, "xs": xs, "ds": ds, "w_digital": wd}


def refresh_protocol(seed: int = 77) -> dict[str, torch.Tensor]:
    """G⁺ in [1.65, 1.85], G⁻ = 1.0: every pair above aihwkit's thresholds (0.75, 0.25 of w_max 2)."""
    g = torch.Generator().manual_seed(seed)
    plus = 1.65 + 0.2 * torch.rand(*REFRESH_SHAPE, generator=g)
    return {"plus": plus, "minus": torch.full(REFRESH_SHAPE, 1.0)}


def pcm_regression_protocol(seed: int = 99) -> dict[str, torch.Tensor]:
    """Closed loop: W starts at 0, target W* in ±0.5, x_t uniform in ±1; d_t = (W_t − W*) x_t
    from the tile's own (exact, get_weights) weights; loss = mean((W − W*)²) at the end."""
    out_f, in_f = SHAPE
    g = torch.Generator().manual_seed(seed)
    w_star = 0.5 * (2 * torch.rand(out_f, in_f, generator=g) - 1)
    xs = 2 * torch.rand(PCM_REG_STEPS, PCM_REG_BATCH, in_f, generator=g) - 1
    return {"w_star": w_star, "xs": xs}


def checksum(tensors: dict[str, torch.Tensor]) -> float:
    return float(sum(float(t.double().abs().sum()) for t in tensors.values()))


def stats(values: torch.Tensor) -> dict[str, float]:
    v = values.detach().double().reshape(-1)
    out = {"mean": float(v.mean()), "std": float(v.std())}
    qs = torch.quantile(v, torch.tensor(QUANTILES, dtype=torch.float64))
    for name, q in zip(STATS[2:], qs):
        out[name] = float(q)
    return out


# ---------------------------------------------------------------------------------- aihwkit side
def _aihwkit_config(preset: str | None, algorithm: str = "sgd") -> Any:
    from aihwkit.simulator import presets as P
    from aihwkit.simulator.configs import build_config
    from aihwkit.simulator.presets.utils import PresetIOParameters, PresetUpdateParameters

    if preset is not None:
        cls = {"ecram": P.EcRamPreset, "reram_sb": P.ReRamSBPreset, "pcm": P.PCMPreset,
               "capacitor": P.CapacitorPreset, "idealized": P.IdealizedPreset}[preset]
        return cls()
    name = {"sgd": "sgd", "mixed_precision": "mp", "ttv2": "ttv2", "c_ttv2": "c-ttv2", "agad": "agad"}[algorithm]
    return build_config(name, P.ReRamSBPresetDevice(), io_parameters=PresetIOParameters,
                        up_parameters=PresetUpdateParameters)


def _aihwkit_tile(config: Any, shape: tuple[int, int]) -> Any:
    from aihwkit.simulator.tiles import AnalogTile

    return AnalogTile(shape[0], shape[1], config)


def measure_reads(config: Any, proto: dict[str, torch.Tensor]) -> dict[str, dict[str, float]]:
    tile = _aihwkit_tile(config, SHAPE)
    tile.set_weights(proto["w"])
    w_set = tile.get_weights()[0]
    fwd = torch.stack([tile.forward(proto["x_read"]) for _ in range(READ_REPEATS)])
    bwd = torch.stack([tile.backward(proto["d_read"]) for _ in range(READ_REPEATS)])
    return {"forward": stats(fwd - proto["x_read"] @ proto["w"].T),
            "transpose": stats(bwd - proto["d_read"] @ proto["w"]),
            "programmed": stats(w_set - proto["w"])}


def measure_updates(config: Any, proto: dict[str, torch.Tensor]) -> dict[str, dict[str, float]]:
    tile = _aihwkit_tile(config, SHAPE)
    tile.set_weights(proto["w"])
    tile.set_learning_rate(LR)
    for t in range(STEPS):
        tile.update(proto["xs"][t], proto["ds"][t])
    w = tile.get_weights()[0]
    return {"weights": stats(w - proto["w_digital"])}


def measure_refresh() -> dict[str, float]:
    """One PCMPreset tile: hidden weights set, one update with x = 0 (no pulses), so only the
    refresh acts; the weight G⁺ − G⁻ before and after."""
    from aihwkit.simulator.presets import PCMPreset

    proto = refresh_protocol()
    tile = _aihwkit_tile(PCMPreset(), REFRESH_SHAPE)
    hidden = tile.get_hidden_parameters()
    hidden["hidden_weights_1"] = proto["plus"].clone()   # aihwkit's g_plus_ is device 1
    hidden["hidden_weights_0"] = proto["minus"].clone()
    tile.set_hidden_parameters(hidden)
    before = tile.get_weights()[0].clone()
    tile.set_learning_rate(1e-9)
    tile.update(torch.zeros(1, REFRESH_SHAPE[1]), torch.zeros(1, REFRESH_SHAPE[0]))
    after = tile.get_weights()[0]
    h = tile.get_hidden_parameters()
    err = after - before
    return {"before_mean": float(before.mean()), "after_mean": float(after.mean()),
            "err_mean": float(err.mean()), "err_std": float(err.std()),
            "minus_after_mean": float(h["hidden_weights_0"].mean()),
            "plus_after_mean": float(h["hidden_weights_1"].mean())}


def measure_pcm_regression() -> float:
    from aihwkit.simulator.presets import PCMPreset

    proto = pcm_regression_protocol()
    tile = _aihwkit_tile(PCMPreset(), SHAPE)
    tile.set_weights(torch.zeros(SHAPE))
    tile.set_learning_rate(PCM_REG_LR)
    for t in range(PCM_REG_STEPS):
        w = tile.get_weights()[0]
        x = proto["xs"][t]
        tile.update(x, x @ (w - proto["w_star"]).T)
    return float(((tile.get_weights()[0] - proto["w_star"]) ** 2).mean())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=10)
    args = ap.parse_args(argv)
    import aihwkit

    torch.set_num_threads(1)
    proto = protocol()
    OUT.mkdir(exist_ok=True)
    common = {"aihwkit_version": aihwkit.__version__, "torch_version": torch.__version__, "seeds": args.seeds,
              "shape": list(SHAPE), "n_read": N_READ, "read_repeats": READ_REPEATS, "steps": STEPS,
              "batch": BATCH, "lr": LR, "stats": list(STATS), "protocol_checksum": checksum(proto)}
    presets = {}
    for name in PRESETS:
        runs = []
        for _ in range(args.seeds):
            cfg = _aihwkit_config(name)
            runs.append({**measure_reads(cfg, proto), **measure_updates(cfg, proto)})
        presets[name] = runs
        print(name, "done", flush=True)
    (OUT / "presets.json").write_text(json.dumps({**common, "measured": presets}, indent=1))
    algos = {}
    for name in ALGORITHMS:
        algos[name] = [measure_updates(_aihwkit_config(None, name), proto) for _ in range(args.seeds)]
        print(name, "done", flush=True)
    (OUT / "algorithms.json").write_text(json.dumps({**common, "device": "reram_sb", "measured": algos}, indent=1))
    refresh = [measure_refresh() for _ in range(args.seeds)]
    reg = [measure_pcm_regression() for _ in range(args.seeds)]
    (OUT / "pcm_pair.json").write_text(json.dumps({
        "aihwkit_version": aihwkit.__version__, "seeds": args.seeds,
        "refresh_shape": list(REFRESH_SHAPE), "refresh_checksum": checksum(refresh_protocol()), "refresh": refresh,
        "regression": {"steps": PCM_REG_STEPS, "batch": PCM_REG_BATCH, "lr": PCM_REG_LR,
                       "checksum": checksum(pcm_regression_protocol()), "final_loss": reg,
                       "final_loss_geomean": math.exp(sum(math.log(v) for v in reg) / len(reg))}}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
