"""Physics of one resistive device, vectorised: configs with aihwkit's names, pulse responses, presets.

Public API (the contract `crossbar` builds on)::

    load_device(name_or_path) -> DeviceConfig     # preset name or TOML file with a [device] table
    device_from_dict({"model": "soft_bounds", ...}) -> DeviceConfig
    save_device(path, cfg)                        # TOML with a [device] table
    preset_names() -> list[str]
    DeviceArray(config, shape, generator, device=None, dtype=torch.float32)
        .hidden, .weights, .persistent_weights, .set_weights(w, generator=None)
        .apply_pulses(n_up, n_down, generator)        # exact, pulse by pulse
        .apply_pulses_integrated(n_up, n_down, generator) # integrated n-pulse response (approximation)
        .apply_delta(dw)                              # ideal devices only
        .mean_step(w=None) -> (up, down)              # noise-free expected |Δw| per pulse
        .max_bound, .pulse_range(), .near_bounds(tol) # per-device bounds, without the hidden keys
        .pulse_once(up, generator), .decay(), .diffuse(generator), .reset(mask, generator)
        .state_dict(), .load_state_dict(state), DeviceArray.from_state_dict(state)

The physics of each device model (step rule, noise rule, clip, hidden-parameter sampling) is
one class per model in `devices.physics`, registered by config type: a new model goes there.

Characterisation and fitting live in `devices.response` (`run_pulse_response`,
`derived_figures`, `write_response`) and `devices.fit` (`read_traces`, `fit_device`);
`devices.aihwkit_compat` converts to and from aihwkit when it is installed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from ept_hw.config import ConfigError, load_toml, save_toml

from .array import DeviceArray
from .configs import (
    DEVICE_MODELS, ConstantStepDevice, DeviceConfig, ExpStepDevice, IdealDevice, LinearStepDevice,
    PiecewiseStepDevice, PowStepDevice, PulsedDevice, SoftBoundsDevice, SoftBoundsReferenceDevice,
    device_from_dict,
)
from .presets import preset, preset_names

__all__ = [
    "DeviceArray", "DeviceConfig", "PulsedDevice", "IdealDevice", "ConstantStepDevice",
    "LinearStepDevice", "SoftBoundsDevice", "SoftBoundsReferenceDevice", "ExpStepDevice",
    "PowStepDevice", "PiecewiseStepDevice", "DEVICE_MODELS", "device_from_dict", "load_device",
    "save_device", "preset", "preset_names",
]


def device_from_toml_mapping(data: Mapping[str, Any], source: str = "device file") -> DeviceConfig:
    """The config of a parsed TOML document holding a `[device]` table."""
    if "device" not in data or not isinstance(data["device"], Mapping):
        raise ConfigError("device", source, "a TOML file with a [device] table")
    return device_from_dict(data["device"])


def load_device(name_or_path: str | Path) -> DeviceConfig:
    """A preset by name, or a TOML file whose `[device]` table has `model` and aihwkit keys."""
    text = str(name_or_path)
    if text in preset_names():
        return preset(text)
    path = Path(text)
    if path.suffix == ".toml" or path.exists():
        return device_from_toml_mapping(load_toml(path), source=text)
    raise ConfigError("device", text, "a preset (" + ", ".join(preset_names()) + ") or a .toml device file")


def save_device(path: str | Path, config: DeviceConfig) -> None:
    """Write `config` as a TOML file with a `[device]` table (loads back with `load_device`)."""
    save_toml(path, {"device": config.to_dict()})
