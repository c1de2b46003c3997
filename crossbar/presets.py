"""Tile presets: a device preset with its own IO and update parameters, as aihwkit's presets.

aihwkit puts every device preset in a `SingleRPUConfig` with `forward = backward =
PresetIOParameters` and `update = PresetUpdateParameters` (SEMANTICS §1.5). Here:
- forward: `PresetIOParameters` (inp_res 1/126, out_res 1/510, out_bound 20, out_noise 0.1,
  BM iterative, NM abs_max);
- backward: the same with bound management off, as aihwkit runs the backward pass;
- update: `PresetUpdateParameters` (= aihwkit defaults: BL 31, UBLM, UM, stochastic compressed);
- one device per weight, a differential pair for one-sided devices (`pcm`, aihwkit's `PCMPreset`
  unit cell);
- mapping ω = 0.6·min(|w_min|, w_max) (leaves room for the device-to-device spread of the
  bounds; 0.5·w_max for a pair, below its refresh threshold) with the "max_fan_in" rule
  (`MappingParameters`): s = max(max|W|, 1.5/√fan_in)/ω. Full-size matrices map as aihwkit's
  "max" rule maps them (their maximum to ω); the residual-branch matrices initialised small
  (W_O, W_2 at `resinit`) map 1.5/√fan_in to ω instead of their small initial maximum, so their
  range is ±(w_bound/ω)·1.5/√fan_in (±2.5/√fan_in on ECRAM's negative side). κ = 1.5 is their
  trained size: the 400-step ECRAM demo twin ends at max|W|·√fan_in = 1.1 (W_O) and 1.5 (W_2)
  (3.3–5.7 for the others), so they get the headroom w_bound/ω that the max rule gives a
  full-size matrix. Measured on 60-step ECRAM demos (health probes every 10 steps): with the max
  rule W_O and W_2 fall to 0.53 and 0.35 of the twin's norm and 2 % of the twin's W_2 leaves
  the range; with "fan_in" at κ = 4 (10x coarser steps for W_O, W_2) pulse noise grows them to
  2.6x and 1.8x; with this rule they stay at 1.24x and 0.85x and nothing leaves the range. The
  short runs' losses do not separate the rules (train loss, last 20 steps: max 3.57, this rule
  3.88, fan_in 4.05; twin 3.15; validation on 4 batches is noisier still). Full 400-step demo
  (ECRAM preset, main of 1 Dec 19:12): max rule W_O/W_2 at 0.23/0.17 of the twin's norm with
  12.4 % of the twin's W_2 outside the range; this rule 0.77/0.57 and 0 % outside; the final
  validation gaps (+0.318 max, +0.341 this rule, 4 batches) do not separate them: the other
  projections' realised updates (cosine 0.07–0.33 with the request for W_Q/K/V/W_1) dominate.
A differential pair keeps aihwkit's "max" rule: with "max_fan_in" the PCM pair diverged (the
demo preset's free-phase residual passed the hard limit 0.1 at step 11 at lr 0.5 and at 0.25,
the tiny preset's loss exploded at step 16), with "max" 20 steps of both ran through (measured
1 Dec 20:10).
Names: `tile_preset(device_name, algorithm="sgd")` for any `devices` preset; "perfect_ideal" is
the ideal device with perfect periphery (reproduces `DigitalProjection`).
"""

from __future__ import annotations

from typing import Any

from devices import preset_names

from ept_hw.config import check_choice

from .config import ALGORITHMS, MappingParameters, TileConfig, _preset_io
from .io import IOParameters
from .update import UpdateParameters

__all__ = ["preset_io", "preset_update", "perfect_io", "tile_preset", "tile_preset_names", "tile_for_device"]


def preset_io() -> IOParameters:
    """aihwkit `PresetIOParameters`."""
    return _preset_io()


def perfect_io() -> IOParameters:
    return IOParameters(is_perfect=True)


def preset_update(mode: str = "fast") -> UpdateParameters:
    """aihwkit `PresetUpdateParameters` (its values are aihwkit's defaults) with our `mode`."""
    return UpdateParameters(desired_bl=31, update_bl_management=True, update_management=True, mode=mode)


def tile_preset_names() -> list[str]:
    return ["perfect_ideal"] + preset_names()


def tile_preset(name: str, algorithm: str = "sgd", mode: str = "fast") -> TileConfig:
    """The tile config of a device preset (module docstring)."""
    check_choice("tile_preset", name, tile_preset_names())
    check_choice("algorithm", algorithm, ALGORITHMS)
    if name in ("perfect_ideal", "ideal"):
        io = perfect_io() if name == "perfect_ideal" else preset_io()
        return TileConfig(device="ideal", forward=io,
                          backward=io if name == "perfect_ideal" else IOParameters(**{**io.__dict__, "bound_management": "none"}),
                          update=preset_update(mode), algorithm="sgd")
    return tile_for_device(name, algorithm=algorithm, mode=mode)


def tile_for_device(device: Any, algorithm: str = "sgd", mode: str = "fast") -> TileConfig:
    """A device (preset name, TOML path, mapping with `model`, or `DeviceConfig`) with the preset
    periphery, update and mapping rule of this module (use it for device files, too)."""
    probe = TileConfig(device=device)
    dev = probe.device_config()
    if dev.is_ideal:
        fwd = preset_io()
        return TileConfig(device=probe.device, forward=fwd, backward=IOParameters(**{**fwd.__dict__, "bound_management": "none"}),
                          update=preset_update(mode), algorithm="sgd")
    pair = probe.uses_pair
    # a pair's weight G⁺ − G⁻ within ±w_max/2 (refresh: crossbar.config.RefreshParameters)
    omega = 0.5 * dev.w_max if pair else 0.6 * min(abs(dev.w_min), abs(dev.w_max))
    fwd = preset_io()
    bwd = IOParameters(**{**fwd.__dict__, "bound_management": "none"})
    return TileConfig(device=probe.device, forward=fwd, backward=bwd, update=preset_update(mode), algorithm=algorithm,
                      mapping=MappingParameters(weight_scaling_omega=omega,
                                                weight_scaling_rule="max" if pair else "max_fan_in",
                                                weight_scaling_fan_in_max=1.5),
                      differential="auto")
