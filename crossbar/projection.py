"""`AnalogProjection`: the analog implementation of the `Projection` seam (DESIGN.md).

Satisfies `ept_hw.projection.Projection` structurally (this module does not import it). Beyond
the protocol it offers `counters()`, `representable_range()`, `set_noise_seed(seed)` and the `noise_mode` property
("fresh" | "common" | "frozen", see `crossbar.tile`).

Complex inputs (holomorphic EP) are read as two real reads, real and imaginary parts, through
the same periphery (an analog array only takes real voltages).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor

from .config import NOISE_MODES, TileConfig, tile_config_from_dict
from .tile import AnalogTile

__all__ = ["AnalogProjection", "analog_factory"]


class AnalogProjection:
    """A weight matrix (out, in) held by an `AnalogTile`, programmed with `weight` at construction."""

    def __init__(self, weight: Tensor, config: TileConfig, generator: torch.Generator, name: str = "W"):
        if weight.dim() != 2:
            raise ValueError(f"{name}: weight must be 2-D (out, in), got shape {tuple(weight.shape)}")
        self.name = name
        self.config = config
        self.tile = AnalogTile(config, weight.shape[0], weight.shape[1], generator, device=weight.device)
        self.tile.program(weight)

    @property
    def in_features(self) -> int:
        return self.tile.in_features

    @property
    def out_features(self) -> int:
        return self.tile.out_features

    def _real_read(self, read: Callable[[Tensor], Tensor], v: Tensor) -> Tensor:
        if torch.is_grad_enabled():  # (EP's reads come with grad mode off: skip the context there)
            with torch.no_grad():
                return self._real_read(read, v)
        if v.is_complex():
            return torch.complex(read(v.real.contiguous()), read(v.imag.contiguous()))
        return read(v)

    def forward(self, u: Tensor) -> Tensor:
        if u.shape[-1] != self.in_features:
            raise ValueError(f"{self.name}.forward: input has last dimension {u.shape[-1]}, expected {self.in_features}")
        return self._real_read(self.tile.forward, u.detach())

    def transpose(self, d: Tensor) -> Tensor:
        if d.shape[-1] != self.out_features:
            raise ValueError(f"{self.name}.transpose: input has last dimension {d.shape[-1]}, expected {self.out_features}")
        return self._real_read(self.tile.transpose, d.detach())

    def read_common(self, v: Tensor, seed: int, blocks: int, transpose: bool = False) -> Tensor:
        """`forward` (or `transpose`) of `blocks` stacked equal blocks of v, each read as if
        `set_noise_seed(seed)` came just before it (`AnalogTile.read_common`): common read noise
        across the blocks in "common" mode."""
        n = self.out_features if transpose else self.in_features
        if v.shape[-1] != n:
            raise ValueError(f"{self.name}.read_common: input has last dimension {v.shape[-1]}, expected {n}")
        if v.is_complex():
            raise ValueError(f"{self.name}.read_common: real inputs only")
        return self._real_read(lambda x: self.tile.read_common(x, seed, blocks, transpose), v.detach())

    def apply_update(self, u: Tensor, delta: Tensor, lr: float, task_rows: int | None = None) -> None:
        """W ← W − lr·Σ δuᵀ by pulses; `task_rows` as `AnalogTile.apply_update` (what transfer_every counts)."""
        if u.shape[-1] != self.in_features or delta.shape[-1] != self.out_features or u.shape[:-1] != delta.shape[:-1]:
            raise ValueError(f"{self.name}: u {tuple(u.shape)} and delta {tuple(delta.shape)} do not fit "
                             f"({self.out_features}, {self.in_features}) with shared leading dimensions")
        if torch.is_complex(u) or torch.is_complex(delta):
            raise ValueError(f"{self.name}: the analog update takes real u and delta")
        self.tile.apply_update(u, delta, float(lr), task_rows)

    def program(self, weight: Tensor) -> None:
        self.tile.program(weight)

    @property
    def weight(self) -> Tensor:
        return self.tile.weight

    # ---------------------------------------------------------------- analog extras
    @property
    def noise_mode(self) -> str:
        return self.tile.noise_mode

    @noise_mode.setter
    def noise_mode(self, mode: str) -> None:
        if mode not in NOISE_MODES:
            raise ValueError(f"{self.name}: noise_mode must be one of {NOISE_MODES}, got {mode!r}")
        self.tile.noise_mode = mode

    def set_noise_seed(self, seed: int) -> None:
        self.tile.set_noise_seed(seed)

    def counters(self) -> dict[str, float]:
        return self.tile.counters()

    def representable_range(self) -> tuple[Tensor, Tensor]:
        """Per weight, [lo, hi] of the model weights the arrays can hold (`AnalogTile.representable_range`)."""
        return self.tile.representable_range()

    def state_dict(self) -> dict[str, Any]:
        return {"kind": "analog", "name": self.name, "config": self.config.to_dict(), "tile": self.tile.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("kind") != "analog":
            raise ValueError(f"{self.name}: not an analog projection state (kind={state.get('kind')!r})")
        if tile_config_from_dict(state["config"]) != self.config:
            raise ValueError(f"{self.name}: state was saved with a different tile config")
        self.tile.load_state_dict(state["tile"])


def analog_factory(tile_config: TileConfig, generator: torch.Generator) -> Callable[[str, Tensor], AnalogProjection]:
    """A `ProjectionFactory`: each projection draws its own seeds from `generator` in call order."""

    def build(name: str, weight: Tensor) -> AnalogProjection:
        return AnalogProjection(weight, tile_config, generator, name=name)

    return build
