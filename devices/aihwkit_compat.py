"""Conversion between our configs and aihwkit's device classes (optional: aihwkit is never required).

`config_from_aihwkit_params(class_name, params)` needs no aihwkit: it reads a class name and a
parameter mapping, as in `/work/shared/reference/device_response/*.json`. `to_aihwkit()` and
`from_aihwkit()` import aihwkit lazily and raise `ImportError` when it is absent.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from ept_hw.config import ConfigError

from .configs import DEVICE_MODELS, DeviceConfig, device_from_dict

__all__ = ["AIHWKIT_CLASSES", "AIHWKIT_PRESET_CLASSES", "config_from_aihwkit_params", "to_aihwkit",
           "from_aihwkit", "aihwkit_class_name"]

# aihwkit class name -> our model name
AIHWKIT_CLASSES: dict[str, str] = {cls.__name__: model for model, cls in DEVICE_MODELS.items()}

# aihwkit preset class -> (our preset name, the aihwkit 1.2 base class it derives from)
AIHWKIT_PRESET_CLASSES: dict[str, tuple[str, str]] = {
    "ReRamESPresetDevice": ("reram_es", "ExpStepDevice"),
    "ReRamSBPresetDevice": ("reram_sb", "SoftBoundsReferenceDevice"),
    "CapacitorPresetDevice": ("capacitor", "LinearStepDevice"),
    "EcRamPresetDevice": ("ecram", "LinearStepDevice"),
    "EcRamMOPresetDevice": ("ecram_mo", "LinearStepDevice"),
    "IdealizedPresetDevice": ("idealized", "ConstantStepDevice"),
    "GokmenVlasovPresetDevice": ("gokmen_vlasov", "ConstantStepDevice"),
    "PCMPresetDevice": ("pcm", "ExpStepDevice"),
    "ReRamArrayOMPresetDevice": ("reram_array_om", "SoftBoundsReferenceDevice"),
    "ReRamArrayHfO2PresetDevice": ("reram_array_hfo2", "SoftBoundsReferenceDevice"),
}


def aihwkit_class_name(config: DeviceConfig) -> str:
    """The aihwkit class with the same parameters (our class names are aihwkit's)."""
    return type(config).__name__


def config_from_aihwkit_params(class_name: str, params: Mapping[str, Any]) -> DeviceConfig:
    """Our config for an aihwkit class name (basic or preset) and its full parameter mapping."""
    base = AIHWKIT_PRESET_CLASSES[class_name][1] if class_name in AIHWKIT_PRESET_CLASSES else class_name
    if base not in AIHWKIT_CLASSES:
        raise ConfigError("device_class", class_name,
                          "one of " + ", ".join(sorted([*AIHWKIT_CLASSES, *AIHWKIT_PRESET_CLASSES])))
    return device_from_dict({"model": AIHWKIT_CLASSES[base], **params})


def _import_devices_module() -> Any:
    try:
        from aihwkit.simulator.configs import devices as aihwkit_devices  # type: ignore
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("aihwkit is not installed: to_aihwkit/from_aihwkit need it "
                          "(pip install aihwkit; an optional extra of this project)") from exc
    return aihwkit_devices


def to_aihwkit(config: DeviceConfig) -> Any:
    """An aihwkit device object with the same parameters (needs aihwkit)."""
    module = _import_devices_module()
    cls = getattr(module, aihwkit_class_name(config))
    kwargs = {k: v for k, v in config.to_dict().items() if k not in ("model", "drift")}
    names = {f.name for f in dataclasses.fields(cls)}
    missing = sorted(set(kwargs) - names)
    if missing:
        raise ConfigError(missing[0], kwargs[missing[0]], f"a parameter of aihwkit's {cls.__name__}")
    return cls(**kwargs)


def from_aihwkit(device: Any) -> DeviceConfig:
    """Our config for an aihwkit device object (a basic class or a preset; needs aihwkit)."""
    _import_devices_module()
    name = type(device).__name__
    if name not in AIHWKIT_CLASSES and name not in AIHWKIT_PRESET_CLASSES:
        for parent in type(device).__mro__[1:]:
            if parent.__name__ in AIHWKIT_CLASSES:
                name = parent.__name__
                break
    params = {}
    for f in dataclasses.fields(device):
        value = getattr(device, f.name)
        if f.name == "drift":
            if value != type(value)():
                raise ConfigError("drift", repr(value), "the default DriftParameter() (drift is not simulated)")
            value = "DriftParameter()"
        elif isinstance(value, list):
            value = tuple(value)
        params[f.name] = value
    return config_from_aihwkit_params(name, params)
