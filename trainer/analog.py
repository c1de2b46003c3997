"""The analog path's projections: tile configuration from `AnalogConfig`, and common random numbers.

`build_analog_factory(cfg, seed)` resolves `cfg.device`:
- a name of `crossbar.tile_preset_names()` (a device preset with its own IO and update
  parameters, as aihwkit's presets);
- a TOML file with a `[tile]` table (a whole tile: device, periphery, update, algorithm);
- a TOML file with a `[device]` table (a device alone: it gets the preset periphery and update,
  and the mapping rule of `crossbar.tile_preset`).
Then `periphery = "perfect"` replaces both read peripheries by ideal ones, and the run's
`analog.tile` overrides (any of the tile's own settings: `noise_mode`, `n_reads`, `update.mode`,
...) are applied.

Common random numbers ("common" noise mode): the EP estimator runs the K nudged phases in
lockstep as one stacked batch of K·B states, so one array read serves all phases. `CommonNoise`
wraps each `AnalogProjection`: while `blocks = (K, B)` is set (during the estimate) a read of K·B
rows is split into its K phase blocks and each block is read after resetting the tile's read
generator to the same fresh seed (`set_noise_seed`), so the + and − phases see the same noise
draws, read by read, and the ± contrast cancels them to first order. Other reads (free phase,
port reads) pass through and draw fresh noise. The seeds come from the wrapper's own generator,
saved in its `state_dict`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import Tensor

from crossbar import analog_factory, perfect_io, tile_config_from_dict, tile_for_device, tile_preset, tile_preset_names
from ept_hw.config import ConfigError, load_toml

from .config import AnalogConfig

logger = logging.getLogger(__name__)

__all__ = ["resolve_tile_config", "self_contained_tile", "build_analog_factory", "CommonNoise", "set_common_blocks"]


def _overridden(file_table: Mapping[str, Any], overrides: Mapping[str, Any], prefix: str = "analog.tile.") -> list[str]:
    """The settings a `[tile]` file states that `overrides` change, as 'key = new (the file: old)'."""
    out: list[str] = []
    for key, value in overrides.items():
        old = file_table.get(key)
        if isinstance(value, Mapping) and isinstance(old, Mapping):
            out += _overridden(old, value, f"{prefix}{key}.")
        elif key in file_table and old != value:
            out.append(f"{prefix}{key} = {value!r} (the file: {old!r})")
    return out


def resolve_tile_config(cfg: AnalogConfig):
    name = cfg.device
    if name in tile_preset_names():
        tile = tile_preset(name)
    else:
        path = Path(name)
        if not path.is_file():
            raise ConfigError(
                "analog.device", name,
                "a device preset (" + ", ".join(tile_preset_names()) + ") or an existing TOML file with a [tile] or [device] table",
            )
        data = load_toml(path)
        if "tile" in data:
            tile = tile_config_from_dict(data["tile"])
            changed = _overridden(data["tile"], cfg.tile)
            if changed:  # e.g. a preset's own [analog.tile] algorithm over a tile file's
                logger.warning("analog.tile overrides the tile file %s: %s", name, "; ".join(changed))
        elif "device" in data:
            # the crossbar's preset rules (periphery, update, mapping omega, pair handling) for any device
            tile = tile_for_device(dict(data["device"]), "sgd")
        else:
            raise ConfigError("analog.device", name, "a TOML file with a [tile] or a [device] table")
    if cfg.periphery == "perfect":
        tile = tile.replace(forward=perfect_io(), backward=perfect_io())
    return tile.with_overrides(cfg.tile, prefix="analog.tile.")


def self_contained_tile(tile):
    """The same tile with its device written out as a table of every parameter (a preset name or
    a device-file path replaced by what it resolves to now), so a run's saved copy never depends
    on a file or on the preset's definition in a later version of the code."""
    return tile.replace(device=tile.device_config().to_dict())


class CommonNoise:
    """`AnalogProjection` wrapper giving the K stacked nudged phases common read noise."""

    def __init__(self, inner: Any, seed: int):
        self.inner = inner
        self.name = inner.name
        self.seed_generator = torch.Generator().manual_seed(seed)
        self.blocks: tuple[int, int] | None = None
        self._seed_buf = torch.empty(1, dtype=torch.int64)  # what torch.randint would allocate per draw

    in_features = property(lambda self: self.inner.in_features)
    out_features = property(lambda self: self.inner.out_features)
    weight = property(lambda self: self.inner.weight)

    def _read(self, v: Tensor, transpose: bool) -> Tensor:
        if self.blocks is not None:
            k, b = self.blocks
            if k >= 2 and v.shape[0] == k * b:
                seed = self._seed_buf.random_(0, 2**62, generator=self.seed_generator).item()
                if not torch.is_complex(v):
                    return self.inner.read_common(v, seed, k, transpose)
                outs = []  # complex: two real reads per block (AnalogProjection), block by block
                for chunk in v.split(b, dim=0):
                    self.inner.set_noise_seed(seed)
                    outs.append(self.inner.transpose(chunk) if transpose else self.inner.forward(chunk))
                return torch.cat(outs, dim=0)
        return self.inner.transpose(v) if transpose else self.inner.forward(v)

    def forward(self, u: Tensor) -> Tensor:
        return self._read(u, False)

    def transpose(self, d: Tensor) -> Tensor:
        return self._read(d, True)

    def apply_update(self, u: Tensor, delta: Tensor, lr: float, task_rows: int | None = None) -> None:
        self.inner.apply_update(u, delta, lr, task_rows)

    def program(self, weight: Tensor) -> None:
        self.inner.program(weight)

    def counters(self) -> dict[str, float]:
        return self.inner.counters()

    def representable_range(self) -> tuple[Tensor, Tensor]:
        return self.inner.representable_range()

    def state_dict(self) -> dict[str, Any]:
        return {**self.inner.state_dict(), "common_noise_generator": self.seed_generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        state = dict(state)
        gen = state.pop("common_noise_generator", None)
        self.inner.load_state_dict(state)
        if gen is not None:
            self.seed_generator.set_state(gen)


def set_common_blocks(projections: dict[str, Any], blocks: tuple[int, int] | None) -> None:
    for proj in projections.values():
        if isinstance(proj, CommonNoise):
            proj.blocks = blocks


def build_analog_factory(cfg: AnalogConfig, seed: int, tile: Any = None) -> tuple[Callable[[str, Tensor], Any], dict[str, torch.Generator]]:
    """(projection factory, generators owned by the trainer). The device generator (device-to-device
    samples, the tiles' read and update seeds) is seeded from the run seed; the tiles keep their
    own read/update generators in their state_dicts. `tile`: an already resolved `TileConfig`
    (a run's own copy, `RunDirectory.tile_config()`); default: resolved from `cfg`."""
    if tile is None:
        tile = resolve_tile_config(cfg)
    device_generator = torch.Generator().manual_seed(seed + 1000)
    inner = analog_factory(tile, device_generator)
    if tile.noise_mode != "common":
        return inner, {}
    counter = [0]

    def build(name: str, weight: Tensor) -> Any:
        counter[0] += 1
        return CommonNoise(inner(name, weight), seed + 2000 + counter[0])

    return build, {}
