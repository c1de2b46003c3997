"""Named model presets: `NAME.toml` files beside this module, each any subset of the `RunConfig`
tables (`trainer.config`). The trainer never reads them itself: `load_run_config` resolves the name
here and hands the file to `trainer.config.run_config_from`."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from ept_hw.config import ConfigError
from trainer.config import RunConfig, run_config_from

__all__ = ["PRESET_DIR", "preset_names", "preset_path", "load_run_config"]

PRESET_DIR = Path(__file__).resolve().parent


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.toml"))


def preset_path(name: str) -> Path:
    path = PRESET_DIR / f"{name}.toml"
    if not path.is_file():
        raise ConfigError("model", name, "a model preset: " + ", ".join(preset_names()))
    return path


def load_run_config(preset: str | None = None, overrides: Mapping[str, Any] | None = None) -> RunConfig:
    """Defaults < preset `NAME` (`experiments/presets/NAME.toml`) < overrides (nested tables)."""
    return run_config_from(None if preset is None else preset_path(preset), overrides)
