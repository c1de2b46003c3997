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

import dataclasses
import math

import torch
from torch import Tensor

from devices.response import symmetry_points

if TYPE_CHECKING:  # pragma: no cover
    from .tile import AnalogTile, DeviceSlot

__all__ = ["UpdateAlgorithm", "SGD", "MixedPrecision", "TikiTakaV2", "ChoppedTransfer", "DynamicTransfer",
           "ALGORITHM_CLASSES", "register",
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

    def update(self, x: Tensor, d: Tensor, lr: float, n_vectors: int) -> None:
        """W_dev ← W_dev − lr·Σₙ dₙ xₙᵀ as this algorithm realises it (x (N, in), d (N, out)).

        `n_vectors`: how many of the N rows are input vectors of the task (what aihwkit's
        `transfer_every` counts); the others (e.g. stabiliser rows) update but do not count."""
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

    def update(self, x: Tensor, d: Tensor, lr: float, n_vectors: int) -> None:
        self.tile.pulsed_update(self.tile.slot, x, d, lr, self.tile.config.update)


@register("mixed_precision")
class MixedPrecision(UpdateAlgorithm):
    """aihwkit `MixedPrecisionCompound`: a digital accumulator χ gets −lr·Σ d xᵀ exactly; every
    `transfer_every` updates, whole multiples of the granularity (device granularity when 0) are
    sent to the devices as pulses and removed from χ (`crossbar.config.MixedPrecisionParameters`)."""

    def __init__(self, tile: "AnalogTile", generator: torch.Generator):
        super().__init__(tile, generator)
        self.accumulator = torch.zeros(tile.shape, device=tile.device)

    def _quantise(self, v: Tensor, n_bins: int, stochastic: bool) -> Tensor:
        """aihwkit's per-vector binning: width max|v|/floor(n/2), round half away from zero
        (after adding U − ½ when stochastic), clipped to ±floor(n/2) bins."""
        half = float(n_bins // 2)
        amax = v.abs().amax(dim=1, keepdim=True)
        width = torch.where(amax > 0, amax / half, torch.ones_like(amax))
        q = v / width
        if stochastic:
            gen = self.tile.update_generator
            q = q + torch.rand(q.shape, generator=gen, device=gen.device).to(q.device) - 0.5
        q = torch.sign(q) * torch.floor(q.abs() + 0.5)
        return q.clamp(-half, half) * width

    def update(self, x: Tensor, d: Tensor, lr: float, n_vectors: int) -> None:
        tile = self.tile
        mp = tile.config.mixed_precision
        if mp.n_x_bins > 0:
            x = self._quantise(x, mp.n_x_bins, mp.stoc_round_x)
        if mp.n_d_bins > 0:
            d = self._quantise(d, mp.n_d_bins, mp.stoc_round_d)
        self.accumulator -= lr * (d.T @ x)
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

    def update(self, x: Tensor, d: Tensor, lr: float, n_vectors: int) -> None:
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


@register("c_ttv2")
class ChoppedTransfer(UpdateAlgorithm):
    """Chopped Tiki-Taka v2: aihwkit `ChoppedTransferCompound` (`crossbar.config.ChoppedTransferParameters`).

    A fast array A (the tile's device and unit cell) and the slow array C that the model reads
    (aihwkit gamma = 0). Per update, with choppers c_in (per input column, initially all set) and
    c_out (per output row, initially all clear) and s_ij = −1 where c_in[j] ≠ c_out[i]:

    1. A ← A − count_lr·Σₙ s ⊙ dₙ xₙᵀ as pulse trains (the tile's `[tile.update]`), with
       count_lr = fast_lr·desired_bl·g_A/(m_x·m_d) under `auto_scale` (m_x, m_d: running
       averages of max|x| and max|d| with weight (1 − auto_momentum)/N per vector), else fast_lr
       (times lr with `scale_fast_lr`);
    2. every `transfer_every` input vectors (mini-batches with `units_in_mbatch`) one column j of
       A (cyclically) is read through the transfer periphery (the tile's forward IO with noise
       and bound management off, as aihwkit's `build_config`) and accumulated into the digital
       buffer H (a pulse count): H_j += s_·j ⊙ read·|transfer_lr·lr|/b with the buffer
       granularity b = buffer_granularity·g_A (× auto_granularity/(in·transfer_every) when
       `auto_granularity` > 0; × g_C/g_A and ÷ count_lr with `correct_gradient_magnitudes`);
    3. where |H_ij| ≥ 1: n = trunc(H_ij) clamped to ±`transfer_desired_bl` pulses go to C_ij
       (C += n·g_C in expectation); H_ij ← momentum·H_ij (`forget_buffer`) or
       H_ij − (1 − momentum)·n;
    4. after each read c_in[j] flips with probability `in_chop_prob` (`in_chop_random`) or
       every max(ceil(1/in_chop_prob), 2) passes over the columns; after a full pass each
       c_out[i] flips with probability `out_chop_prob`.

    `algorithm = "c_ttv2"` uses these parameters as given (aihwkit's "ttv2" is the same class
    with in_chop_prob 0, auto_scale off and fast_lr 1: set them in `[tile.chopped]`).

    Where this differs from aihwkit
    -------------------------------
    - The update of A is applied for the whole batch at once (the tile's update mode), then the
      transfers due in it; aihwkit interleaves them vector by vector. count_lr uses m_x, m_d
      after the batch (aihwkit: updated before each vector).
    - Transfers that fall in one batch read their columns in one batched read (same noise
      distribution; the columns are distinct within a pass, as aihwkit's cyclic order).
    - The transfer periphery is not configurable separately: the tile's forward IO with
      noise_management and bound_management "none" (what aihwkit's `build_config` sets).
    - The pulses onto C are applied exactly (`transfer_desired_bl` pulses at most, no update
      management), which is what aihwkit's transfer update with desired_bl 1 and UM off does.
    - `auto_scale`'s EMA starts from the first batch's value (aihwkit: the first vector's).
    - Only `transfer_columns = True` (columns are read with forward reads).
    """

    def __init__(self, tile: "AnalogTile", generator: torch.Generator):
        super().__init__(tile, generator)
        self.fast = tile.new_slot(generator)
        self.buffer = torch.zeros(tile.shape, device=tile.device)
        self.in_chopper = torch.ones(tile.in_features, dtype=torch.bool, device=tile.device)
        self.out_chopper = torch.zeros(tile.out_features, dtype=torch.bool, device=tile.device)
        self.m_x = 0.0
        self.m_d = 0.0
        self.vectors = 0.0          # input vectors (or mini-batches) counted for transfer_every
        self.transfer_column = 0
        self.transfer_counter = 0   # full passes over the columns
        self.count_lr = 0.0

    @property
    def params(self):
        return self.tile.config.chopped

    def extra_slots(self) -> list["DeviceSlot"]:
        return [self.fast]

    def program(self, w_dev: Tensor) -> None:
        self.fast.set_weights(torch.zeros_like(w_dev), self.tile.update_generator)
        self.buffer.zero_()
        self.in_chopper.fill_(True)
        self.out_chopper.fill_(False)
        self.m_x = self.m_d = 0.0
        self.vectors = 0.0
        self.transfer_column = self.transfer_counter = 0

    def _auto_scale(self, x: Tensor, d: Tensor) -> None:
        p = self.params
        n = x.shape[0]
        tau = (1.0 - p.auto_momentum) / max(n, 1)
        for attr, rows in (("m_x", x), ("m_d", d)):
            m = getattr(self, attr)
            for v in rows.abs().amax(dim=1).tolist():
                if m <= 0.0:
                    m = v
                elif v > 0.0:
                    m = (1.0 - tau) * m + tau * v
            setattr(self, attr, m)

    def _count_lr(self, lr: float) -> float:
        p, tile = self.params, self.tile
        if p.auto_scale and p.fast_lr > 0.0:
            count_lr = p.fast_lr * tile.config.update.desired_bl * self.fast.granularity
            if self.m_x > 0.0 and self.m_d > 0.0:
                count_lr /= self.m_x * self.m_d
            return count_lr
        if p.fast_lr > 0.0:
            return p.fast_lr * lr if p.scale_fast_lr else p.fast_lr
        return lr

    def _signs(self) -> Tensor:
        """s_ij = −1 where the output chopper of row i differs from the input chopper of column j."""
        flip = self.out_chopper.unsqueeze(1) != self.in_chopper.unsqueeze(0)
        return 1.0 - 2.0 * flip.float()

    def update(self, x: Tensor, d: Tensor, lr: float, n_vectors: int) -> None:
        p, tile = self.params, self.tile
        if p.auto_scale and x.shape[0]:
            self._auto_scale(x, d)
        self.count_lr = self._count_lr(lr)
        # chopper signs on the update of A: x_j by c_in, d_i by c_out (their product is s_ij)
        cx = 1.0 - 2.0 * self.in_chopper.float()
        cd = 1.0 - 2.0 * self.out_chopper.float()
        tile.pulsed_update(self.fast, x * cx, d * cd, self.count_lr, tile.config.update)
        before = math.floor(self.vectors / p.transfer_every + 1e-9)
        self.vectors += 1.0 if p.units_in_mbatch else float(n_vectors)
        due = math.floor(self.vectors / p.transfer_every + 1e-9) - before
        if due > 0 and lr != 0.0:
            self._transfer(due, lr)

    def _buffer_granularity(self) -> float:
        p, tile = self.params, self.tile
        bg = (p.buffer_granularity if p.buffer_granularity > 0.0 else 1.0) * self.fast.granularity
        if p.correct_gradient_magnitudes:
            return bg * tile.slot.granularity / self.fast.granularity
        if p.auto_granularity > 0.0:
            bg *= p.auto_granularity / (tile.in_features * p.transfer_every)
        return bg

    def _transfer_lr_scale(self, lr: float) -> float:
        """Buffer units per unit of A's read: |transfer_lr| (times the SGD lr with
        `scale_transfer_lr`) over the buffer granularity, over count_lr with
        `correct_gradient_magnitudes`."""
        p = self.params
        transfer_lr = p.transfer_lr * lr if p.scale_transfer_lr else p.transfer_lr
        lr_scale = abs(transfer_lr) / self._buffer_granularity()
        if p.correct_gradient_magnitudes:
            lr_scale /= self.count_lr
        return lr_scale

    def _read_columns(self, j0: int, k: int, io) -> tuple[Tensor, Tensor]:
        """Columns j0 .. j0+k−1 of the fast array A, read with one-hot inputs through `io`: (cols, (out, k))."""
        tile = self.tile
        cols = torch.arange(j0, j0 + k, device=tile.device)
        one_hot = torch.zeros(k, tile.in_features, device=tile.device)
        one_hot[torch.arange(k, device=tile.device), cols] = 1.0
        return cols, tile.read(self.fast.weights, one_hot, io).T

    def _fire(self, omega: Tensor, max_steps: float, cap: float = 0.0) -> tuple[Tensor, Tensor, Tensor]:
        """The buffer's threshold step on a block of columns: where |ω| ≥ 1 it fires trunc(ω)
        pulses (clamped to ±`max_steps`); the buffer then keeps momentum·ω (`forget_buffer`) or
        ω − (1 − momentum)·n, clamped to ±`cap` when `cap` > 0 (AGAD's `buffer_cap`).
        Returns (fire, n, the new buffer)."""
        p = self.params
        fire = omega.abs() >= 1.0
        n = torch.where(fire, torch.trunc(omega).clamp(-max_steps, max_steps), torch.zeros_like(omega))
        if p.forget_buffer:
            omega = torch.where(fire, omega * p.momentum, omega)
        else:
            omega = omega - (1.0 - p.momentum) * n
            if cap > 0.0:
                omega = omega.clamp(-cap, cap)
        return fire, n, omega

    def _write_columns(self, cols: Tensor, n: Tensor) -> None:
        """Signed pulse counts n (out, k) onto columns `cols` of the slow array, pulse by pulse."""
        tile = self.tile
        n_up = torch.zeros(tile.shape, device=tile.device)
        n_down = torch.zeros_like(n_up)
        n_up[:, cols] = n.clamp_min(0.0)
        n_down[:, cols] = (-n).clamp_min(0.0)
        tile.apply_counts(tile.slot, n_up, n_down, pulse_by_pulse=True)

    def _transfer_io(self):
        """aihwkit's `build_config("c-ttv2")`: the forward IO with noise and bound management off."""
        return dataclasses.replace(self.tile.config.forward, noise_management="none", bound_management="none")

    def _transfer(self, n_transfers: int, lr: float) -> None:
        p, tile = self.params, self.tile
        io = self._transfer_io()
        lr_scale = self._transfer_lr_scale(lr)
        max_steps = float(p.transfer_desired_bl)
        gen = tile.update_generator
        left = n_transfers
        while left > 0:
            j0 = self.transfer_column
            k = min(left, tile.in_features - j0)
            cols, read = self._read_columns(j0, k, io)                   # (out, k): columns of A
            signs = self._signs()[:, cols]
            omega = (torch.zeros_like(read) if p.no_buffer else self.buffer[:, cols]) + signs * read * lr_scale
            fire, n, omega = self._fire(omega, max_steps)
            self.buffer[:, cols] = omega
            if bool(fire.any()):
                self._write_columns(cols, n)
            if p.in_chop_prob > 0.0:
                if p.in_chop_random:
                    flip = torch.rand(k, generator=gen, device=gen.device).to(tile.device) < p.in_chop_prob
                else:
                    period = max(math.ceil(1.0 / p.in_chop_prob), 2)
                    flip = torch.full((k,), self.transfer_counter % period + 1 == period, device=tile.device)
                self.in_chopper[cols] ^= flip
            self.n_transfers += k
            left -= k
            self.transfer_column = (j0 + k) % tile.in_features
            if self.transfer_column == 0:
                if p.out_chop_prob > 0.0:
                    flip = torch.rand(tile.out_features, generator=gen, device=gen.device).to(tile.device)
                    self.out_chopper ^= flip < p.out_chop_prob
                self.transfer_counter += 1

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "fast": self.fast.state_dict(), "buffer": self.buffer.clone(),
                "in_chopper": self.in_chopper.clone(), "out_chopper": self.out_chopper.clone(),
                "m_x": self.m_x, "m_d": self.m_d, "vectors": self.vectors, "count_lr": self.count_lr,
                "transfer_column": self.transfer_column, "transfer_counter": self.transfer_counter}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        device = self.tile.device
        self.fast.load_state_dict(state["fast"])
        self.buffer = state["buffer"].to(device).clone()
        self.in_chopper = state["in_chopper"].to(device).clone()
        self.out_chopper = state["out_chopper"].to(device).clone()
        self.m_x, self.m_d = float(state["m_x"]), float(state["m_d"])
        self.vectors, self.count_lr = float(state["vectors"]), float(state["count_lr"])
        self.transfer_column = int(state["transfer_column"])
        self.transfer_counter = int(state["transfer_counter"])


@register("agad")
class DynamicTransfer(ChoppedTransfer):
    """AGAD: aihwkit `DynamicTransferCompound` (`crossbar.config.DynamicTransferParameters`).

    As `ChoppedTransfer` (fast array A, auto-scaled count_lr, choppers on A's update, transfer
    timing, ±`transfer_desired_bl` clamp), but the buffer integrates the read *relative to a
    dynamic reference*: per element a running mean m of the reads (weight
    ω = min(tail_weightening/n_s, 1) per read, n_s = max(ceil(1/in_chop_prob), 2) reads per
    chopper period) and the mean μ of the previous chopper period (set to m when column j's
    chopper has just switched). Per read: H += s·(read − μ)·lr_scale, then the threshold and
    clamp of c-TTv2, then m ← (1 − ω)·m + ω·read. Choppers switch regularly every n_s passes
    over the columns (and, with `in_chop_random`, also with probability in_chop_prob per read);
    no pulses reach C during the first n_s passes. A's fixed offsets (its symmetry point) cancel
    in read − μ without waiting for the chopper to average them out.

    Where this differs from aihwkit: as `ChoppedTransfer` (batch first, then the transfers due;
    one batched read per pass), except the transfer read, which here as in aihwkit's
    `build_config("agad")` uses the tile's forward IO unchanged; aihwkit's experimental
    options (`experimental_correct_accumulation`, count-lr feedback) are not implemented.
    """

    def __init__(self, tile: "AnalogTile", generator: torch.Generator):
        super().__init__(tile, generator)
        self.running_mean = torch.zeros(tile.shape, device=tile.device)
        self.past_mean = torch.zeros(tile.shape, device=tile.device)
        self.switched = torch.zeros(tile.in_features, dtype=torch.bool, device=tile.device)

    @property
    def params(self):
        return self.tile.config.dynamic

    def program(self, w_dev: Tensor) -> None:
        super().program(w_dev)
        self.running_mean.zero_()
        self.past_mean.zero_()
        self.switched.fill_(False)

    def _transfer_io(self):
        return self.tile.config.forward

    def _transfer(self, n_transfers: int, lr: float) -> None:
        p, tile = self.params, self.tile
        io = self._transfer_io()
        lr_scale = self._transfer_lr_scale(lr)
        max_steps = float(p.transfer_desired_bl)
        cap = max_steps * p.buffer_cap
        n_samples = max(math.ceil(1.0 / p.in_chop_prob), 2)
        weight = min(p.tail_weightening / n_samples, 1.0)
        gen = tile.update_generator
        left = n_transfers
        while left > 0:
            j0 = self.transfer_column
            k = min(left, tile.in_features - j0)
            cols, read = self._read_columns(j0, k, io)                   # (out, k)
            current_sample = self.transfer_counter % n_samples + 1
            switched = self.switched[cols].unsqueeze(0)
            past = torch.where(switched, self.running_mean[:, cols], self.past_mean[:, cols])
            self.past_mean[:, cols] = past
            self.switched[cols] = False
            omega = self.buffer[:, cols] + self._signs()[:, cols] * (read - past) * lr_scale
            fire, n, self.buffer[:, cols] = self._fire(omega, max_steps, cap)
            self.running_mean[:, cols] = self.running_mean[:, cols] * (1.0 - weight) + read * weight
            if bool(fire.any()) and self.transfer_counter > n_samples:
                self._write_columns(cols, n)
            switch = torch.full((k,), current_sample == n_samples, device=tile.device)
            if p.in_chop_random:
                switch |= torch.rand(k, generator=gen, device=gen.device).to(tile.device) < p.in_chop_prob
            self.in_chopper[cols] ^= switch
            self.switched[cols] = switch
            self.n_transfers += k
            left -= k
            self.transfer_column = (j0 + k) % tile.in_features
            if self.transfer_column == 0:
                self.transfer_counter += 1

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "running_mean": self.running_mean.clone(),
                "past_mean": self.past_mean.clone(), "switched": self.switched.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        device = self.tile.device
        self.running_mean = state["running_mean"].to(device).clone()
        self.past_mean = state["past_mean"].to(device).clone()
        self.switched = state["switched"].to(device).clone()
