"""The classic pulse-response experiment and the figures derived from it.

Protocol (as aihwkit's `plot_response_overview` and `/work/shared/reference/README.md`): every
device starts at `w_init` (default: the nominal `w_min`, clipped by each device to its own bound,
with write noise on set where the device has it), then `n_steps` up pulses and `n_steps` down
pulses, repeated `n_loops` times; the read after each pulse is the apparent weight (write noise
included, as aihwkit's `get_weights()`), reduced over devices to mean, std, 5 % and 95 % quantiles.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ept_hw.config import ConfigError, check_positive_int, check_range

from .array import DeviceArray
from .configs import DeviceConfig

__all__ = ["PulseResponse", "default_n_steps", "protocol_directions", "run_pulse_response",
           "derived_figures", "symmetry_points", "response_to_json", "write_response", "plot_response"]


@dataclass
class PulseResponse:
    """Per-pulse statistics over devices; `traces` holds the first few devices' reads for plots."""

    config: DeviceConfig
    n_devices: int
    n_steps: int
    n_loops: int
    w_init: float | None
    seed: int
    direction: np.ndarray
    mean: np.ndarray
    std: np.ndarray
    p05: np.ndarray
    p95: np.ndarray
    w_start_mean: float
    w_start_std: float
    traces: np.ndarray                       # (n_pulses + 1, n_traces), first row = start
    c2c: dict[str, float] = field(default_factory=dict)
    array: DeviceArray | None = None         # the devices, for derived figures


def default_n_steps(config: DeviceConfig) -> int:
    """aihwkit's choice: round((w_max − w_min) / granularity) pulses per direction."""
    if config.is_ideal:
        raise ConfigError("device", config.model, "a pulsed device (ideal devices take no pulses)")
    return max(1, int(round((config.w_max - config.w_min) / config.granularity)))


def protocol_directions(n_steps: int, n_loops: int) -> np.ndarray:
    """+1 (up) n_steps times, then −1 (down) n_steps times, repeated n_loops times."""
    one = np.concatenate([np.ones(n_steps, dtype=np.int64), -np.ones(n_steps, dtype=np.int64)])
    return np.tile(one, n_loops)


def run_pulse_response(config: DeviceConfig, *, n_devices: int = 2000, n_steps: int | None = None,
                       n_loops: int = 2, w_init: float | None = None, seed: int = 0,
                       n_traces: int = 20, device: torch.device | str | None = None,
                       dtype: torch.dtype = torch.float32, chunk: int = 1024,
                       c2c_samples: int = 64, quantiles: bool = True) -> PulseResponse:
    """Run the pulse-response protocol on `n_devices` independent devices of `config`.

    `c2c_samples` pulses (spread over the run) are also used to measure the cycle-to-cycle noise:
    the spread of the realised step around the noise-free step of each device at its weight,
    over devices that stay inside their bounds (`c2c_std`; in units of the granularity, and
    relative to the mean noise-free step, which near soft bounds is smaller than dw_min). `quantiles=False` skips p05/p95 (left NaN): they
    cost more than the pulses themselves on CPU, and tests of mean and spread do not need them.
    """
    if config.is_ideal:
        raise ConfigError("device", config.model, "a pulsed device (ideal devices take no pulses)")
    check_positive_int("n_devices", n_devices)
    check_positive_int("n_loops", n_loops)
    n_steps = default_n_steps(config) if n_steps is None else n_steps
    check_positive_int("n_steps", n_steps)
    if w_init is not None:
        check_range("w_init", w_init)
    gen_device = torch.device(device) if device is not None else torch.device("cpu")
    g = torch.Generator(device=gen_device).manual_seed(seed)
    arr = DeviceArray(config, (n_devices,), g, device=gen_device, dtype=dtype)
    arr.set_weights(torch.full((n_devices,), config.w_min if w_init is None else w_init), g)

    directions = protocol_directions(n_steps, n_loops)
    n_pulses = len(directions)
    n_traces = min(n_traces, n_devices)
    stats = {k: np.empty(n_pulses) for k in ("mean", "std", "p05", "p95")}
    traces = np.empty((n_pulses + 1, n_traces))
    start = arr.weights
    traces[0] = start[:n_traces].cpu().numpy()
    c2c_every = max(1, n_pulses // max(c2c_samples, 1))
    residuals, expected = [], []

    buffer = torch.empty((min(chunk, n_pulses), n_devices), dtype=dtype, device=gen_device)
    has_write_noise = arr._apparent is not None
    filled, first = 0, 0
    for t, d in enumerate(directions):
        up = bool(d > 0)
        if filled == 0:  # draw the noise of a whole block of pulses at once (speed)
            block_len = min(buffer.shape[0], n_pulses - t)
            xi_block = torch.randn((block_len, n_devices), generator=g, device=gen_device, dtype=dtype)
            xw_block = (torch.randn((block_len, n_devices), generator=g, device=gen_device, dtype=dtype)
                        if has_write_noise else None)
        measure = c2c_samples > 0 and t % c2c_every == 0
        if measure:
            w_before = arr.persistent_weights
            mean_up, mean_down = arr.mean_step()
            step = mean_up if up else -mean_down
        arr.pulse_with_noise(up, xi_block[filled], None if xw_block is None else xw_block[filled])
        if measure:
            w_after = arr.persistent_weights
            lo, hi = arr.pulse_range()
            inside = (w_after > lo) & (w_after < hi) & (step != 0)
            residuals.append(((w_after - w_before) - step)[inside])
            expected.append(step.abs()[inside])
        buffer[filled] = arr.weights
        filled += 1
        if filled == buffer.shape[0] or t == n_pulses - 1:
            block = buffer[:filled]
            sl = slice(first, first + filled)
            var, mean = torch.var_mean(block, dim=1, unbiased=False)
            stats["mean"][sl] = mean.cpu().numpy()
            stats["std"][sl] = var.sqrt().cpu().numpy()
            if quantiles:  # numpy's selection-based quantile beats torch.quantile's full sort
                quant = np.quantile(block.cpu().numpy(), [0.05, 0.95], axis=1)
                stats["p05"][sl], stats["p95"][sl] = quant[0], quant[1]
            else:
                stats["p05"][sl] = stats["p95"][sl] = np.nan
            traces[1 + first:1 + first + filled] = block[:, :n_traces].cpu().numpy()
            first += filled
            filled = 0

    c2c: dict[str, float] = {}
    if residuals:
        res = torch.cat(residuals).double()
        exp = torch.cat(expected).double()
        if res.numel() > 1:
            c2c = {"c2c_std": float(res.std()), "c2c_in_granularity": float(res.std()) / config.granularity,
                   "c2c_relative": float(res.std() / exp.mean()), "c2c_samples": int(res.numel())}
    return PulseResponse(
        config=config, n_devices=n_devices, n_steps=n_steps, n_loops=n_loops, w_init=w_init,
        seed=seed, direction=directions, mean=stats["mean"], std=stats["std"], p05=stats["p05"],
        p95=stats["p95"], w_start_mean=float(start.double().mean()),
        w_start_std=float(start.double().std(unbiased=False)), traces=traces, c2c=c2c, array=arr)


def symmetry_points(arr: DeviceArray, iterations: int = 60) -> torch.Tensor:
    """Per device, the weight where the noise-free up and down steps are equal (bisection).

    Steps include clipping at the bounds, so a crossing always exists in [b_min, b_max]; for a
    device whose up step exceeds its down step everywhere it lies next to the upper bound (where
    repeated alternating pulses drive it, as in aihwkit's `plot_device_symmetry`).
    """
    lo, hi = (b.clone() for b in arr.pulse_range(torch.float64))
    for _ in range(iterations):
        mid = 0.5 * (lo + hi)
        up, down = arr.mean_step(mid.to(arr.dtype))
        above = (up - down) > 0   # net drift upwards: the crossing is above mid
        lo = torch.where(above, mid, lo)
        hi = torch.where(above, hi, mid)
    return (0.5 * (lo + hi)).to(arr.dtype)


def derived_figures(response: PulseResponse) -> dict[str, Any]:
    """Number of states, up/down asymmetry, symmetry point and cycle-to-cycle noise."""
    cfg, arr = response.config, response.array
    assert arr is not None
    w_ref = 0.0 if cfg.w_min < 0.0 < cfg.w_max else 0.5 * (cfg.w_min + cfg.w_max)
    up, down = arr.mean_step(torch.full(arr.shape, w_ref, dtype=arr.dtype))
    up_m, down_m = float(up.double().mean()), float(down.double().mean())
    sp = symmetry_points(arr).double()
    # measured from the protocol: mean change per pulse over the first quarter of each ramp
    q = max(1, response.n_steps // 4)
    rise = (response.mean[q - 1] - response.w_start_mean) / q
    fall_start = response.n_steps
    fall = (response.mean[fall_start + q - 1] - response.mean[fall_start - 1]) / q
    return {
        "granularity": cfg.granularity,
        "n_states": (cfg.w_max - cfg.w_min) / cfg.granularity,
        "asymmetry_at_w": w_ref,
        "mean_step_up": up_m,
        "mean_step_down": down_m,
        "up_down_asymmetry": (up_m - down_m) / (up_m + down_m) if up_m + down_m > 0 else 0.0,
        "symmetry_point_mean": float(sp.mean()),
        "symmetry_point_std": float(sp.std()),
        "measured_rate_up": float(rise),
        "measured_rate_down": float(-fall),
        **response.c2c,
    }


def response_to_json(response: PulseResponse, figures: dict[str, Any] | None = None,
                     name: str | None = None) -> dict[str, Any]:
    """The keys and meanings of the reference files, plus `device_params` and `derived`."""
    cfg = response.config
    return {
        "name": name or cfg.model,
        "device_class": type(cfg).__name__,
        "device_params": cfg.to_dict(),
        "n_devices": response.n_devices,
        "w_init_requested": response.w_init,
        "w_start_mean": response.w_start_mean,
        "w_start_std": response.w_start_std,
        "n_steps": response.n_steps,
        "n_loops": response.n_loops,
        "seed": response.seed,
        "protocol": ("start at w_init (default: w_min), then n_steps up pulses, n_steps down pulses, "
                     "repeated n_loops times; one pulse per step, apparent weight read after each pulse"),
        "direction": response.direction.tolist(),
        "mean": response.mean.tolist(),
        "std": response.std.tolist(),
        "p05": response.p05.tolist(),
        "p95": response.p95.tolist(),
        "derived": figures if figures is not None else derived_figures(response),
    }


def plot_response(path: str | Path, response: PulseResponse, title: str | None = None) -> None:
    """Traces of a few devices, the mean over all devices and the 5–95 % band."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pulses = np.arange(len(response.mean) + 1)
    mean = np.concatenate([[response.w_start_mean], response.mean])
    p05 = np.concatenate([[np.nan], response.p05])
    p95 = np.concatenate([[np.nan], response.p95])
    fig, ax = plt.subplots(figsize=(8, 4.5))
    n_show = min(5, response.traces.shape[1])
    ax.plot(pulses, response.traces[:, :n_show], lw=0.4, alpha=0.5)
    ax.plot([], [], lw=0.6, color="0.5", label=f"{n_show} single devices")
    ax.fill_between(pulses, p05, p95, color="tab:blue", alpha=0.15)
    ax.plot(pulses, p05, color="tab:blue", lw=1, ls="--", label="5 % and 95 % of devices")
    ax.plot(pulses, p95, color="tab:blue", lw=1, ls="--")
    ax.plot(pulses, mean, color="k", lw=2, label=f"mean of {response.n_devices} devices")
    ax.set_xlabel("pulse number")
    ax.set_ylabel("weight")
    ax.set_title(title or f"{response.config.model}: {response.n_steps} up / {response.n_steps} down × {response.n_loops}")
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_response(out_dir: str | Path, response: PulseResponse, title: str | None = None,
                   name: str | None = None) -> dict[str, Any]:
    """Write `response.json` and `response.png` into `out_dir`; returns the JSON mapping."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = response_to_json(response, name=name)
    (out / "response.json").write_text(json.dumps(data, indent=1))
    plot_response(out / "response.png", response, title=title)
    return data
