"""`AnalogTile`: a weight matrix held by devices, read through the periphery, trained by pulses.

Model weight W (out, in) = s · W_dev, with s the digital output scale of the mapping rule
(`MappingParameters`: fixed at programming, refit by a remap when `remap_every` > 0) and W_dev
the devices' weights (one device per weight, or G⁺ − G⁻ of a differential pair).

Noise modes (`TileConfig.noise_mode`; the read generator is the tile's own):
- ``"fresh"``: every read draws new noise; `set_noise_seed` is ignored.
- ``"common"``: `set_noise_seed(seed)` resets the read generator, so two phases that each start
  with the same seed and issue the same sequence of reads see the same noise, read by read
  (common random numbers for the + and − nudged phases of EP).
- ``"frozen"``: the read generator is reset to the last seed before *every* read, so each read
  of a given shape sees the same noise sample (a static circuit offset within a phase).

Pulsed updates: see `crossbar.update` (modes exact / fast / expected). A differential pair is
updated as aihwkit's one-sided unit cell: up pulses potentiate G⁺, down pulses potentiate G⁻;
after every `refresh_every` updates (`TileConfig.refresh`, aihwkit's `OneSidedUnitCell`) the
pair is read column by column through the refresh periphery, and pairs whose devices both
carry conductance (aihwkit's thresholds) are reset and rewritten with pulses
(`DeviceSlot.refresh`), in every update mode.

Time during training: after every `apply_update` (aihwkit's mini-batch update) each device
decays toward its reset bias by its `lifetime` and diffuses by its `diffusion`, as aihwkit's
post-update step does; both are counted in updates, not seconds.

Update algorithms ("sgd", "mixed_precision", "ttv2"): one class each in `crossbar.algorithms`;
the tile holds one (`self.algorithm`) and offers it the services listed there.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import Tensor

from devices import DeviceArray, DeviceConfig

from .algorithms import UpdateAlgorithm, make_algorithm
from .config import RefreshParameters, TileConfig
from .io import IOParameters, PeripheryReader, ReadStats
from .update import (PulsePlan, UpdateParameters, apply_per_sample, deterministic_coincidences,
                     deterministic_counts_per_sample, deterministic_events, expected_counts, fast_counts, plan_pulses,
                     sample_coincidences, sample_trains, _chunks)

__all__ = ["AnalogTile", "DeviceSlot"]


def _derive_seed(generator: torch.Generator) -> int:
    return int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device).item())


class DeviceSlot:
    """One device per weight, or a differential pair G⁺ − G⁻ (same interface).

    A pair is refreshed as aihwkit's `OneSidedUnitCell` (`refresh`, `RefreshParameters`): the
    tile calls `finish_update` once after each update."""

    def __init__(self, config: DeviceConfig, shape: tuple[int, int], generator: torch.Generator, pair: bool,
                 device: torch.device | None = None, refresh: RefreshParameters | None = None):
        self.config = config
        self.pair = pair
        self.arrays = [DeviceArray(config, shape, generator, device=device)]
        if pair:
            self.arrays.append(DeviceArray(config, shape, generator, device=device))
        self.refreshes = 0
        self.refresh_params = refresh if refresh is not None else RefreshParameters()
        self.update_count = 0  # aihwkit's current_update_idx_: updates or vectors (units_in_mbatch)
        # The refresh read of one array's device weights (out, in) -> (out, in), given a generator:
        # set by the tile (one-hot column reads through `refresh_forward`); None reads exactly.
        self.reader: Callable[[Tensor, torch.Generator], Tensor] | None = None
        self._difference: tuple | None = None  # a pair's (G⁺, G⁻, their versions, G⁺ − G⁻, its version)

    @property
    def is_ideal(self) -> bool:
        return self.config.is_ideal

    @property
    def granularity(self) -> float:
        return float(self.config.granularity)

    @property
    def weights(self) -> Tensor:
        """The weights a read sees: the device's, or for a pair G⁺ − G⁻. A pair's difference is
        kept while neither array's weights nor the difference itself changed (each read would
        otherwise form it again, and its readers' weight caches would miss)."""
        if not self.pair:
            return self.arrays[0].weights
        a, b = self.arrays[0].weights, self.arrays[1].weights
        held = self._difference
        if (held is None or held[0] is not a or held[1] is not b or held[2] != a._version
                or held[3] != b._version or held[4]._version != held[5]):
            w = a - b
            held = self._difference = (a, b, a._version, b._version, w, w._version)
        return held[4]

    @property
    def persistent(self) -> Tensor:
        if self.pair:
            return self.arrays[0].persistent_weights - self.arrays[1].persistent_weights
        return self.arrays[0].persistent_weights

    def set_weights(self, w: Tensor, generator: torch.Generator) -> None:
        if self.pair:
            self.arrays[0].set_weights(w.clamp_min(0.0), generator)
            self.arrays[1].set_weights((-w).clamp_min(0.0), generator)
        else:
            self.arrays[0].set_weights(w, generator)

    def apply_delta(self, dw: Tensor, generator: torch.Generator) -> None:
        """Float update (ideal devices; pulse_type "none" clips to the bounds)."""
        if self.is_ideal:
            self.arrays[0].apply_delta(dw)
        else:
            self.set_weights(self.persistent + dw, generator)

    def apply_pulses(self, n_up: Tensor, n_down: Tensor, generator: torch.Generator) -> None:
        if self.pair:
            zero = torch.zeros_like(n_up)
            self.arrays[0].apply_pulses(n_up, zero, generator)
            self.arrays[1].apply_pulses(n_down, zero, generator)
        else:
            self.arrays[0].apply_pulses(n_up, n_down, generator)

    def apply_counts(self, n_up: Tensor, n_down: Tensor, generator: torch.Generator, up: UpdateParameters) -> None:
        """Pulse by pulse when counts are small, else the devices' integrated n-pulse response
        (`DeviceArray.apply_pulses_integrated`; `crossbar.update` module docstring, fast mode)."""
        n_max = int((n_up + n_down).max()) if n_up.numel() else 0
        if n_max == 0:
            return
        if n_max <= up.fast_exact_max_pulses:
            self.apply_pulses(n_up.long(), n_down.long(), generator)
            return
        if self.pair:
            zero = torch.zeros_like(n_up)
            self.arrays[0].apply_pulses_integrated(n_up, zero, generator, up.fast_substeps)
            self.arrays[1].apply_pulses_integrated(n_down, zero, generator, up.fast_substeps)
        else:
            self.arrays[0].apply_pulses_integrated(n_up, n_down, generator, up.fast_substeps)

    def apply_expected(self, mu_up: Tensor, mu_down: Tensor, generator: torch.Generator) -> None:
        """Expected-value update with the noise-free mean step at the current weights."""
        if self.pair:
            for arr, mu in zip(self.arrays, (mu_up, mu_down)):
                step_up, _ = arr.mean_step()
                arr.set_weights(arr.persistent_weights + mu.to(step_up.dtype) * step_up, generator)
        else:
            arr = self.arrays[0]
            step_up, step_down = arr.mean_step()
            dw = mu_up.to(step_up.dtype) * step_up - mu_down.to(step_up.dtype) * step_down
            arr.set_weights(arr.persistent_weights + dw, generator)

    def finish_update(self, n_vectors: int, generator: torch.Generator) -> Tensor | None:
        """After one update of `n_vectors` input vectors: count it, and run `refresh` when
        aihwkit's `refresh_every` says so (every `refresh_every` updates with `units_in_mbatch`,
        else when the vector count passes a multiple of `refresh_every`: once per update at
        most). Returns the refresh's pulses per device, or None."""
        par = self.refresh_params
        if not self.pair or par.refresh_every == 0:
            return None
        before = self.update_count
        self.update_count += 1 if par.units_in_mbatch else max(0, int(n_vectors))
        if self.update_count // par.refresh_every > before // par.refresh_every:
            return self.refresh(generator)
        return None

    def read_arrays(self, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """(G⁺, G⁻) as a refresh reads them: through `reader`, or exactly without one."""
        if self.reader is None:
            return tuple(arr.weights.clone() for arr in self.arrays)  # type: ignore[return-value]
        return self.reader(self.arrays[0].weights, generator), self.reader(self.arrays[1].weights, generator)

    def refresh(self, generator: torch.Generator) -> Tensor:
        """aihwkit's `OneSidedRPUDevice::refreshWeights`: read G⁺ and G⁻ (`read_arrays`); where the
        larger read over |w_max| exceeds `refresh_upper_thres` and the smaller one exceeds
        `refresh_lower_thres`, reset both devices (reset bias + reset_std noise) and write the
        read difference back onto the device of its sign as a pulsed update with
        `refresh_update` (one vector update per column, x the one-hot column, so UBLM/UM see
        that column's differences). Returns the pulses per device (out, in)."""
        par = self.refresh_params
        plus, minus = self.arrays
        wp, wm = self.read_arrays(generator)
        w_max = abs(float(self.config.w_max))
        hi, lo = torch.maximum(wp, wm) / w_max, torch.minimum(wp, wm) / w_max
        full = (hi > par.refresh_upper_thres) & (lo > par.refresh_lower_thres)
        pulses = torch.zeros(plus.shape, dtype=torch.float32, device=plus.persistent_weights.device)
        if not bool(full.any()):
            return pulses
        plus.reset(full, generator)
        minus.reset(full, generator)
        diff = torch.where(full, wp - wm, torch.zeros_like(wp))
        for arr, target in ((plus, diff.clamp_min(0.0)), (minus, (-diff).clamp_min(0.0))):
            cols = (target > 0).any(dim=0).nonzero().squeeze(1)
            if cols.numel() == 0:
                continue
            n_up = self._refresh_counts(arr, target, cols, generator)
            if n_up is None:
                continue
            arr.apply_pulses(n_up, torch.zeros_like(n_up), generator)
            pulses += n_up.to(pulses.dtype)
        self.refreshes += int(full.sum())
        return pulses

    def _refresh_counts(self, arr: DeviceArray, target: Tensor, cols: Tensor,
                        generator: torch.Generator) -> Tensor | None:
        """Up-pulse counts (out, in) writing `target` (>= 0) onto `arr` in columns `cols`: one
        vector update per column (x = its one-hot, d = −target, lr 1: W −= lr·d xᵀ) with
        `refresh_update`; pulse_type "none" writes exactly instead (returns None)."""
        up = self.refresh_params.refresh_update
        n_in = target.shape[1]
        if up.pulse_type == "none":
            arr.set_weights(arr.persistent_weights + target, generator)
            return None
        x = torch.zeros(cols.numel(), n_in, dtype=torch.float32, device=target.device)
        x[torch.arange(cols.numel(), device=target.device), cols] = 1.0
        d = -target.T.index_select(0, cols).to(torch.float32)  # (columns, out)
        plan = plan_pulses(x, d, 1.0, self.granularity, up)
        if up.pulse_type == "deterministic_implicit":
            counts = deterministic_coincidences(plan, up)
        else:
            counts = sample_coincidences(plan, generator)
        return counts.sum(0).round().long()  # columns are disjoint: one device, one vector

    def saturation_fraction(self) -> float:
        """Fraction of devices within half a granularity of one of their own bounds."""
        if self.is_ideal:
            return 0.0
        tol = 0.5 * self.granularity
        total, at = 0, 0
        for arr in self.arrays:
            at += int(arr.near_bounds(tol).sum())
            total += arr.persistent_weights.numel()
        return at / total

    def state_dict(self) -> dict[str, Any]:
        return {"arrays": [a.state_dict() for a in self.arrays], "refreshes": self.refreshes,
                "update_count": self.update_count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if len(state["arrays"]) != len(self.arrays):
            raise ValueError("state is for a different unit cell (single vs differential pair)")
        for arr, s in zip(self.arrays, state["arrays"]):
            arr.load_state_dict(s)
        self.refreshes = int(state["refreshes"])
        self.update_count = int(state.get("update_count", 0))  # absent in checkpoints before the refresh count


class AnalogTile:
    """An (out, in) analog weight matrix: reads with periphery, pulsed updates, algorithms, counters."""

    def __init__(self, config: TileConfig, out_features: int, in_features: int, generator: torch.Generator,
                 device: torch.device | str | None = None):
        if out_features < 1 or in_features < 1:
            raise ValueError(f"tile shape must be positive, got ({out_features}, {in_features})")
        self.config = config
        self.out_features, self.in_features = int(out_features), int(in_features)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        shape = (self.out_features, self.in_features)
        self.shape = shape
        self.slot = DeviceSlot(config.device_config(), shape, generator, config.uses_pair, self.device, config.refresh)
        self.slot.reader = self._refresh_read
        self.algorithm: UpdateAlgorithm = make_algorithm(self, generator)
        gen_device = self.device  # read/update noise drawn where the tile lives
        self.read_generator = torch.Generator(device=gen_device)
        self.read_generator.manual_seed(_derive_seed(generator))
        self.update_generator = torch.Generator(device=gen_device)
        self.update_generator.manual_seed(_derive_seed(generator))
        self.scale = torch.ones(self.out_features, 1, device=self.device)
        self.noise_mode = config.noise_mode
        self.noise_seed = _derive_seed(generator)
        self.read_stats = ReadStats()
        self._readers: dict[int, PeripheryReader] = {}  # by id of the config's IOParameters
        self._scale_ref: Tensor | None = None  # the scale tensor `_scale_value` was worked out from
        self._scale_version = -1
        self._scale_value: float | None = None
        self._wt_of: tuple[Tensor, Tensor] | None = None  # (slot.weights, its transposed view)
        self.pulse_count = torch.zeros(shape, dtype=torch.float64, device=self.device)
        self.n_updates = 0
        self.n_remaps = 0

    def new_slot(self, generator: torch.Generator) -> DeviceSlot:
        """Another array of this tile's device and unit cell (for algorithms with several arrays)."""
        slot = DeviceSlot(self.slot.config, self.shape, generator, self.slot.pair, self.device, self.config.refresh)
        slot.reader = self._refresh_read
        return slot

    def _refresh_read(self, w_dev: Tensor, generator: torch.Generator) -> Tensor:
        """One array's device weights (out, in) as a refresh reads them: one-hot column reads
        through `config.refresh.refresh_forward` (aihwkit's `refresh_forward`), counted in the
        tile's read statistics, drawn from `generator` (the update generator)."""
        io = self.config.refresh.refresh_forward
        read = self._readers.get(id(io))
        if read is None:
            read = self._readers[id(io)] = PeripheryReader(io)
        eye = torch.eye(self.in_features, device=self.device)
        return read(w_dev, eye, generator, self.read_stats).T

    # ------------------------------------------------------------------ programming
    def program(self, weight: Tensor) -> None:
        """Set the model weights W (out, in): choose the mapping scale, program the devices."""
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise ValueError(f"program: shape {tuple(weight.shape)}, expected {(self.out_features, self.in_features)}")
        w = weight.detach().to(device=self.device, dtype=torch.float32)
        self._write(w, self.mapping_scale(w))

    def mapping_scale(self, w: Tensor, rule: str | None = None) -> Tensor:
        """The digital output scale s (out, 1) for the model weight `w` by the mapping rule
        (`MappingParameters`; `rule` overrides the configured one, as a remap does)."""
        m = self.config.mapping
        omega = m.weight_scaling_omega
        if omega <= 0.0:
            return torch.ones(self.out_features, 1, device=self.device)
        rule = m.weight_scaling_rule if rule is None else rule
        fan_in_max = m.weight_scaling_fan_in_max / math.sqrt(self.in_features)
        if rule == "fan_in":
            return torch.full((self.out_features, 1), fan_in_max / omega, device=self.device)
        if m.weight_scaling_columnwise:
            amax = w.abs().amax(dim=1, keepdim=True)
        else:
            amax = w.abs().amax().expand(self.out_features, 1)
        if rule == "max_fan_in":
            return (amax.clamp_min(fan_in_max) / omega).clone()
        return torch.where(amax > 0, amax / omega, torch.ones_like(amax)).clone()

    def _write(self, w: Tensor, scale: Tensor) -> None:
        """Program W/s onto the devices (with programming noise) and hand it to the algorithm."""
        self.scale = scale
        w_dev = w / self.scale
        if self.config.programming_noise > 0.0:
            xi = torch.randn(w_dev.shape, generator=self.update_generator, device=self.update_generator.device)
            w_dev = w_dev + self.config.programming_noise * xi.to(self.device)
        self.slot.set_weights(w_dev, self.update_generator)
        self.algorithm.program(w_dev)

    def remap(self) -> None:
        """aihwkit's `remap_weights`: refit s by the mapping rule to the current weights (read
        exactly from the simulator state) and reprogram the devices to W/s; counted in `remaps`."""
        w = self.weight.clone()
        self._write(w, self.mapping_scale(w))
        self.n_remaps += 1

    def representable_range(self) -> tuple[Tensor, Tensor]:
        """Per weight (out, in), the interval [lo, hi] of model weights the unit cell can hold:
        s times the devices' own pulse range (a pair: G⁺ − G⁻ over both devices' ranges);
        ±inf for an ideal device."""
        if self.slot.is_ideal:
            inf = torch.full(self.shape, math.inf, device=self.device)
            return -inf, inf
        lo, hi = self.slot.arrays[0].pulse_range(torch.float32)
        if self.slot.pair:
            lo2, hi2 = self.slot.arrays[1].pulse_range(torch.float32)
            lo, hi = lo - hi2, hi - lo2
        return lo * self.scale, hi * self.scale

    @property
    def weight(self) -> Tensor:
        """The effective model weight s·W_dev (apparent device weights), detached."""
        return (self.slot.weights * self.scale).detach()

    # ------------------------------------------------------------------ reads
    def set_noise_seed(self, seed: int) -> None:
        """Remember `seed`; in "common" and "frozen" modes reset the read generator to it."""
        self.noise_seed = int(seed)
        if self.noise_mode in ("common", "frozen"):
            self.read_generator.manual_seed(self.noise_seed)

    def read(self, w_dev: Tensor, x: Tensor, io: IOParameters, digital_scale: float = 1.0, blocks: int = 1) -> Tensor:
        """An analog read of the device weights `w_dev` through periphery `io` (n_reads averaged).
        `blocks` > 1: x holds that many equal blocks read with common random numbers
        (`PeripheryReader.__call__`; only with n_reads = 1 and outside "frozen" mode)."""
        if self.noise_mode == "frozen":
            self.read_generator.manual_seed(self.noise_seed)
        # one PeripheryReader per periphery, built on first use (constants and scaled weights cached)
        read = self._readers.get(id(io))
        if read is None:
            read = self._readers[id(io)] = PeripheryReader(io)
        if blocks > 1 and (self.config.n_reads > 1 or self.noise_mode == "frozen"):
            raise ValueError("a read of common-noise blocks needs n_reads = 1 and a noise mode other than 'frozen'")
        y = read(w_dev, x, self.read_generator, self.read_stats, digital_scale, blocks)
        n_reads = self.config.n_reads
        if n_reads > 1:
            for _ in range(n_reads - 1):
                y = y + read(w_dev, x, self.read_generator, self.read_stats, digital_scale)
            y = y / n_reads
        return y

    def read_common(self, v: Tensor, seed: int, blocks: int, transpose: bool = False) -> Tensor:
        """`forward` (or `transpose`) of `blocks` equal blocks stacked along v's first dimension,
        each read as if `set_noise_seed(seed)` came just before it: in "common" mode the blocks see
        the same read noise (common random numbers across the nudged phases of EP). One read of
        the stack where the periphery allows it (`PeripheryReader`'s `blocks`), else block by block;
        both give the same numbers and leave the read generator in the same state."""
        if blocks < 1 or v.dim() < 2 or v.shape[0] % blocks:
            raise ValueError(f"read_common: {blocks} blocks do not divide the leading dimension of {tuple(v.shape)}")
        read = self.transpose if transpose else self.forward
        self.set_noise_seed(seed)
        if blocks == 1:
            return read(v)
        if self.noise_mode == "common" and self.config.n_reads == 1:
            return read(v, blocks=blocks)
        outs = []
        for i, chunk in enumerate(v.split(v.shape[0] // blocks, dim=0)):
            if i:
                self.set_noise_seed(seed)
            outs.append(read(chunk))
        return torch.cat(outs, dim=0)

    def _uniform_scale(self) -> float | None:
        """The digital scale when every row shares it, else None; worked out again only when
        `scale` is another tensor (program, load, remap replace it) or was edited in place."""
        scale = self.scale
        if scale is not self._scale_ref or scale._version != self._scale_version:
            lo, hi = torch.aminmax(scale)
            self._scale_value = float(hi) if float(lo) == float(hi) else None
            self._scale_ref, self._scale_version = scale, scale._version
        return self._scale_value

    def forward(self, u: Tensor, blocks: int = 1) -> Tensor:
        """y = W u through the forward periphery; u (..., in) -> (..., out), in u's dtype
        (`blocks`: see `read`)."""
        if u.shape[-1] != self.in_features:
            raise ValueError(f"forward: input has last dimension {u.shape[-1]}, expected {self.in_features}")
        uniform = self._uniform_scale()
        if uniform is not None:
            return self.read(self.slot.weights, u, self.config.forward, uniform, blocks)
        y = self.read(self.slot.weights, u, self.config.forward, blocks=blocks)
        return y * self.scale.squeeze(1).to(y.dtype)

    def transpose(self, d: Tensor, blocks: int = 1) -> Tensor:
        """Wᵀ d through the backward periphery; d (..., out) -> (..., in), in d's dtype
        (`blocks`: see `read`)."""
        if d.shape[-1] != self.out_features:
            raise ValueError(f"transpose: input has last dimension {d.shape[-1]}, expected {self.out_features}")
        uniform = self._uniform_scale()
        if uniform is not None:
            return self.read(self._weights_t(), d, self.config.backward, uniform, blocks)
        # a per-row digital scale acts on the rows of W, i.e. on the inputs of the transposed read
        ds = d * self.scale.squeeze(1).to(d.dtype)
        return self.read(self._weights_t(), ds, self.config.backward, blocks=blocks)

    def _weights_t(self) -> Tensor:
        """slot.weights.T as one view object for as long as slot.weights is the same tensor, so
        that the backward reader's cache of scaled weights finds it by identity."""
        w = self.slot.weights
        if self._wt_of is None or self._wt_of[0] is not w:
            self._wt_of = (w, w.T)
        return self._wt_of[1]

    # ------------------------------------------------------------------ updates
    def apply_update(self, u: Tensor, delta: Tensor, lr: float, task_rows: int | None = None) -> None:
        """W <- W − lr·Σ delta uᵀ over every leading dimension (in expectation for pulsed devices).

        `task_rows`: how many of the leading rows (after flattening) are the task's input vectors,
        which is what aihwkit's `transfer_every` counts (EP: the tokens of the task ports;
        stabiliser rows appended after them update the weights but do not change the transfer
        rate). Default: every row."""
        if u.shape[-1] != self.in_features or delta.shape[-1] != self.out_features or u.shape[:-1] != delta.shape[:-1]:
            raise ValueError(f"apply_update: u {tuple(u.shape)} and delta {tuple(delta.shape)} do not fit a "
                             f"({self.out_features}, {self.in_features}) tile with shared leading dimensions")
        if not (lr >= 0.0) or math.isinf(lr):
            raise ValueError(f"apply_update: lr must be finite and >= 0, got {lr}")
        x = u.detach().reshape(-1, self.in_features).to(device=self.device, dtype=torch.float32)
        # the mapping scale s: ΔW_dev = ΔW / s, row by row -> fold 1/s into delta
        d = (delta.detach().reshape(-1, self.out_features).to(device=self.device, dtype=torch.float32)
             / self.scale.squeeze(1))
        n_vectors = x.shape[0] if task_rows is None else max(0, min(int(task_rows), x.shape[0]))
        self.algorithm.update(x, d, lr, n_vectors)
        self.n_updates += 1
        self._after_update(n_vectors)
        every = self.config.mapping.remap_every
        if every > 0 and self.n_updates % every == 0:
            self.remap()

    def _after_update(self, n_vectors: int) -> None:
        """Once per `apply_update` (aihwkit's mini-batch update): a differential pair's refresh
        check (`DeviceSlot.finish_update`, aihwkit's `finishUpdateCycle`), then aihwkit's
        post-update step: every array of the tile decays by its `lifetime` and diffuses by its
        `diffusion` (no-ops when 0)."""
        for slot in (self.slot, *self.algorithm.extra_slots()):
            pulses = slot.finish_update(n_vectors, self.update_generator)
            if pulses is not None:
                self.pulse_count += pulses.to(self.pulse_count.dtype)
            for arr in slot.arrays:
                arr.decay()
                arr.diffuse(self.update_generator)

    def pulsed_update(self, slot: DeviceSlot, x: Tensor, d: Tensor, lr: float, up: UpdateParameters) -> None:
        """slot's W −= lr·Σ d xᵀ as pulse trains (`crossbar.update`), or a float update for ideal
        devices and pulse_type "none"."""
        if lr == 0.0 or x.shape[0] == 0:
            return
        gen = self.update_generator
        if slot.is_ideal or up.pulse_type == "none":
            slot.apply_delta(-lr * (d.T @ x), gen)
            return
        plan = plan_pulses(x, d, lr, slot.granularity, up)
        if up.mode == "exact":  # sample by sample, only the devices each sample pulses (crossbar.update)
            if up.pulse_type == "deterministic_implicit":
                counts = lambda sl: deterministic_events(plan, up, sl)  # noqa: E731
            else:
                counts = lambda sl: sample_trains(plan, gen, sl)  # noqa: E731
            # a pair's refresh runs after the update (`_after_update`), as in the other modes
            pulses = apply_per_sample(slot.arrays, slot.pair, counts, plan, gen)
            self.pulse_count += pulses.to(self.pulse_count.dtype)
            return
        if up.pulse_type == "deterministic_implicit":
            self._apply_per_sample(slot, plan, lambda sl: deterministic_counts_per_sample(plan, up, sl), aggregate=True)
            return
        if up.mode == "fast":
            n_up, n_down = fast_counts(plan, gen)
            slot.apply_counts(n_up, n_down, gen, up)
            self.pulse_count += (n_up + n_down).to(self.pulse_count.dtype)
        else:
            mu_up, mu_down = expected_counts(plan)
            slot.apply_expected(mu_up, mu_down, gen)
            self.pulse_count += (mu_up + mu_down).to(self.pulse_count.dtype)

    def apply_counts(self, slot: DeviceSlot, n_up: Tensor, n_down: Tensor, pulse_by_pulse: bool = False) -> None:
        """Given (rounded) up/down pulse counts per device on `slot`, counted for endurance."""
        if pulse_by_pulse:
            slot.apply_pulses(n_up.round().long(), n_down.round().long(), self.update_generator)
        else:
            slot.apply_counts(n_up.round(), n_down.round(), self.update_generator, self.config.update)
        self.pulse_count += (n_up + n_down).to(self.pulse_count.dtype)

    def _apply_per_sample(self, slot: DeviceSlot, plan: PulsePlan, counts_of, aggregate: bool) -> None:
        n = plan.bl.shape[0]
        total_up = total_down = None
        for sl in _chunks(n, self.out_features * self.in_features):
            n_up, n_down = counts_of(sl)
            if aggregate:
                total_up = n_up.sum(0) if total_up is None else total_up + n_up.sum(0)
                total_down = n_down.sum(0) if total_down is None else total_down + n_down.sum(0)
            else:
                for i in range(n_up.shape[0]):
                    if bool((n_up[i] > 0).any()) or bool((n_down[i] > 0).any()):
                        self.apply_counts(slot, n_up[i], n_down[i], pulse_by_pulse=True)
        if aggregate and total_up is not None:
            self.apply_counts(slot, total_up, total_down)

    # ------------------------------------------------------------------ counters & state
    def counters(self) -> dict[str, float]:
        """Endurance, read and saturation counters (plain numbers, for metrics logs)."""
        stats = self.read_stats.as_dict()
        conv = stats["adc_conversions"]
        algo = self.algorithm.counters()
        return {
            "pulses_max": float(self.pulse_count.max()),
            "pulses_mean": float(self.pulse_count.mean()),
            "mvm_reads": stats["mvm_reads"],
            "adc_conversions": conv,
            "adc_clip_fraction": stats["adc_clipped"] / conv if conv else 0.0,
            "device_saturation_fraction": self.slot.saturation_fraction(),
            "updates": self.n_updates,
            "transfers": algo["transfers"],
            "refreshes": self.slot.refreshes + algo["refreshes"],
            "remaps": self.n_remaps,
        }

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "shape": [self.out_features, self.in_features],
            "slot": self.slot.state_dict(),
            "scale": self.scale.clone(),
            "read_generator": self.read_generator.get_state(),
            "update_generator": self.update_generator.get_state(),
            "noise_mode": self.noise_mode,
            "noise_seed": self.noise_seed,
            "read_stats": self.read_stats.as_dict(),
            "pulse_count": self.pulse_count.clone(),
            "n_updates": self.n_updates,
            "n_remaps": self.n_remaps,
            "algorithm": self.algorithm.state_dict(),
        }
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if list(state["shape"]) != [self.out_features, self.in_features]:
            raise ValueError(f"state is for a {tuple(state['shape'])} tile, this one is "
                             f"{(self.out_features, self.in_features)}")
        self.slot.load_state_dict(state["slot"])
        self.scale = state["scale"].to(self.device).clone()
        self.read_generator.set_state(state["read_generator"])
        self.update_generator.set_state(state["update_generator"])
        self.noise_mode = state["noise_mode"]
        self.noise_seed = int(state["noise_seed"])
        self.read_stats.load(state["read_stats"])
        self.pulse_count = state["pulse_count"].to(self.device).clone()
        self.n_updates = int(state["n_updates"])
        self.n_remaps = int(state.get("n_remaps", 0))  # absent in checkpoints written before remaps
        self.algorithm.load_state_dict(state["algorithm"])
