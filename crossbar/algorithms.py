"""Update algorithms of an analog tile, one class per algorithm: where a new algorithm goes.

An `UpdateAlgorithm` turns the tile's requested update W ← W − lr·Σ d xᵀ (device units, rows x
of the inputs, d of the errors) into what the hardware does: plain pulses on the array the model
reads ("sgd"), a digital accumulator that sends whole steps ("mixed_precision"), or a fast array
whose content is transferred to the slow one ("ttv2"). Each algorithm owns its state (extra
device arrays, digital buffers, counters) and its checkpoint; the tile holds one and never
branches on its name. Register a new one with `@register("name")` and add the name to
`crossbar.config.ALGORITHMS`.

The tile offers its algorithm a few services (`AnalogTile` methods): `pulsed_update(slot, x, d,
lr, up)` (the pulse trains of `crossbar.update` applied to a `DeviceSlot`), `apply_counts(slot,
n_up, n_down)` (given pulse counts), `read(w, x, io)` (an analog read through a periphery), and
`new_slot(generator)` (another array of the tile's device and unit cell), `update_generator`,
`slot`, `n_updates`, `config`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, ClassVar

import torch
from torch import Tensor

from devices.response import symmetry_points

if TYPE_CHECKING:  # pragma: no cover
    from .tile import AnalogTile, DeviceSlot

__all__ = ["UpdateAlgorithm", "SGD", "MixedPrecision", "TikiTakaV2", "ALGORITHM_CLASSES", "register",
           "make_algorithm"]

ALGORITHM_CLASSES: dict[str, type["UpdateAlgorithm"]] = {}


def register(name: str) -> Callable[[type["UpdateAlgorithm"]], type["UpdateAlgorithm"]]:
    def wrap(cls: type["UpdateAlgorithm"]) -> type["UpdateAlgorithm"]:
        cls.name = name
        ALGORITHM_CLASSES[name] = cls
        return cls
    return wrap


def make_algorithm(tile: "AnalogTile", generator: torch.Generator) -> "UpdateAlgorithm":
    """The algorithm named by `tile.config.algorithm`, built for `tile` (extra arrays sampled from
    `generator`, after the tile's own array)."""
    return ALGORITHM_CLASSES[tile.config.algorithm](tile, generator)


class UpdateAlgorithm:
    """Shared interface: `update(x, d, lr)`, `program(w_dev)`, `counters()`, `state_dict()`,
    `load_state_dict(state)`."""

    name: ClassVar[str] = ""

    def __init__(self, tile: "AnalogTile", generator: torch.Generator):
        self.tile = tile
        self.n_transfers = 0

    def update(self, x: Tensor, d: Tensor, lr: float) -> None:
        """W_dev ← W_dev − lr·Σₙ dₙ xₙᵀ as this algorithm realises it (x (N, in), d (N, out))."""
        raise NotImplementedError

    def program(self, w_dev: Tensor) -> None:
        """The tile's array was just programmed to `w_dev`: reset this algorithm's state."""

    def extra_slots(self) -> list["DeviceSlot"]:
        """Device arrays this algorithm holds besides the tile's (for counters)."""
        return []

    def counters(self) -> dict[str, float]:
        return {"transfers": self.n_transfers,
                "refreshes": sum(slot.refreshes for slot in self.extra_slots())}

    def state_dict(self) -> dict[str, Any]:
        return {"name": self.name, "n_transfers": self.n_transfers}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("name") != self.name:
            raise ValueError(f"state is for algorithm {state.get('name')!r}, this tile runs {self.name!r}")
        self.n_transfers = int(state["n_transfers"])


@register("sgd")
class SGD(UpdateAlgorithm):
    """Plain pulsed SGD (aihwkit's `SingleRPUConfig`): the pulse trains go to the array the model reads."""

    def update(self, x: Tensor, d: Tensor, lr: float) -> None:
        self.tile.pulsed_update(self.tile.slot, x, d, lr, self.tile.config.update)


@register("mixed_precision")
class MixedPrecision(UpdateAlgorithm):
    """aihwkit `MixedPrecisionCompound`: a digital accumulator χ gets −lr·Σ d xᵀ exactly; every
    `transfer_every` updates, whole multiples of the granularity (device granularity when 0) are
    sent to the devices as pulses and removed from χ (`crossbar.config.MixedPrecisionParameters`)."""

    def __init__(self, tile: "AnalogTile", generator: torch.Generator):
        super().__init__(tile, generator)
        self.accumulator = torch.zeros(tile.shape, device=tile.device)

    def update(self, x: Tensor, d: Tensor, lr: float) -> None:
        tile = self.tile
        self.accumulator -= lr * (d.T @ x)
        mp = tile.config.mixed_precision
        if tile.n_updates % mp.transfer_every == mp.transfer_every - 1:
            gran = mp.granularity if mp.granularity > 0 else tile.slot.granularity
            n = torch.trunc(self.accumulator / gran)
            tile.apply_counts(tile.slot, n.clamp_min(0.0), (-n).clamp_min(0.0))
            self.accumulator -= n * gran
            self.n_transfers += 1

    def program(self, w_dev: Tensor) -> None:
        self.accumulator.zero_()

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "accumulator": self.accumulator.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.accumulator = state["accumulator"].to(self.tile.device).clone()


@register("ttv2")
class TikiTakaV2(UpdateAlgorithm):
    """Tiki-Taka v2 as `crossbar.config.TransferParameters` describes it: a fast array A (same
    device and unit cell as the tile's) takes the pulsed update; every `transfer_every` updates
    columns of A are read and accumulated in a digital buffer H, whose whole steps go to the slow
    array C (the tile's) as pulses."""

    def __init__(self, tile: "AnalogTile", generator: torch.Generator):
        super().__init__(tile, generator)
        self.fast = tile.new_slot(generator)
        self.buffer = torch.zeros(tile.shape, device=tile.device)
        self.fast_reference = torch.zeros(tile.shape, device=tile.device)
        self.transfer_column = 0

    def extra_slots(self) -> list["DeviceSlot"]:
        return [self.fast]

    def program(self, w_dev: Tensor) -> None:
        tile = self.tile
        if tile.config.transfer.fast_reference == "symmetry_point" and not self.fast.pair:
            self.fast_reference = symmetry_points(self.fast.arrays[0])
        else:
            self.fast_reference = torch.zeros_like(w_dev)
        self.fast.set_weights(self.fast_reference, tile.update_generator)
        self.buffer.zero_()

    def update(self, x: Tensor, d: Tensor, lr: float) -> None:
        tile = self.tile
        tr = tile.config.transfer
        tile.pulsed_update(self.fast, x, d, lr * tr.fast_lr, tile.config.update)
        if tile.n_updates % tr.transfer_every != tr.transfer_every - 1:
            return
        gran = tr.buffer_granularity * tile.slot.granularity
        for _ in range(tr.n_reads_per_transfer):
            j = self.transfer_column
            one_hot = torch.zeros(1, tile.in_features, device=tile.device)
            one_hot[0, j] = 1.0
            column = tile.read(self.fast.weights - self.fast_reference, one_hot, tile.config.forward)[0]
            self.buffer[:, j] += (tr.transfer_lr * lr if tr.scale_transfer_lr else tr.transfer_lr) * column
            sent = self._transfer_column(j, gran)
            if tr.forget_buffer:
                self.buffer[:, j] = torch.where(sent != 0, torch.zeros_like(sent), self.buffer[:, j])
            else:
                self.buffer[:, j] -= sent
            self.transfer_column = (j + 1) % tile.in_features
        self.n_transfers += 1

    def _transfer_column(self, j: int, granularity: float) -> Tensor:
        tile = self.tile
        n = torch.trunc(self.buffer[:, j] / granularity)
        n_up = torch.zeros(tile.out_features, tile.in_features, device=tile.device)
        n_down = torch.zeros_like(n_up)
        n_up[:, j] = n.clamp_min(0.0)
        n_down[:, j] = (-n).clamp_min(0.0)
        tile.apply_counts(tile.slot, n_up, n_down)
        return n * granularity

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "fast": self.fast.state_dict(), "buffer": self.buffer.clone(),
                "fast_reference": self.fast_reference.clone(), "transfer_column": self.transfer_column}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        device = self.tile.device
        self.fast.load_state_dict(state["fast"])
        self.buffer = state["buffer"].to(device).clone()
        self.fast_reference = state["fast_reference"].to(device).clone()
        self.transfer_column = int(state["transfer_column"])
