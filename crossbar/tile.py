"""`AnalogTile`: a weight matrix held by devices, read through the periphery, trained by pulses.

Model weight W (out, in) = s · W_dev, with s the fixed mapping scale (`MappingParameters`) and
W_dev the devices' weights (one device per weight, or G⁺ − G⁻ of a differential pair).

Noise modes (`TileConfig.noise_mode`; the read generator is the tile's own):
- ``"fresh"``: every read draws new noise; `set_noise_seed` is ignored.
- ``"common"``: `set_noise_seed(seed)` resets the read generator, so two phases that each start
  with the same seed and issue the same sequence of reads see the same noise, read by read
  (common random numbers for the + and − nudged phases of EP).
- ``"frozen"``: the read generator is reset to the last seed before *every* read, so each read
  of a given shape sees the same noise sample (a static circuit offset within a phase).

Pulsed updates: see `crossbar.update` (modes exact / fast / expected). A differential pair is
updated as aihwkit's one-sided unit cell: up pulses potentiate G⁺, down pulses potentiate G⁻;
when either device of a pair passes `REFRESH_THRESHOLD` of its upper bound, the pair is
reprogrammed to (max(W,0), max(−W,0)) (aihwkit `refresh_every=1`, our threshold rule).

Time during training: after every `apply_update` (aihwkit's mini-batch update) each device
decays toward its reset bias by its `lifetime` and diffuses by its `diffusion`, as aihwkit's
post-update step does; both are counted in updates, not seconds.

Update algorithms ("sgd", "mixed_precision", "ttv2"): one class each in `crossbar.algorithms`;
the tile holds one (`self.algorithm`) and offers it the services listed there.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from devices import DeviceArray, DeviceConfig

from .algorithms import UpdateAlgorithm, make_algorithm
from .config import TileConfig
from .io import IOParameters, PeripheryReader, ReadStats
from .update import (PulsePlan, UpdateParameters, apply_per_sample, deterministic_counts_per_sample,
                     deterministic_events, expected_counts, fast_counts, plan_pulses, sample_events, _chunks)

__all__ = ["AnalogTile", "DeviceSlot", "REFRESH_THRESHOLD"]

REFRESH_THRESHOLD = 0.75


def _derive_seed(generator: torch.Generator) -> int:
    return int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device).item())


class DeviceSlot:
    """One device per weight, or a differential pair G⁺ − G⁻ (same interface)."""

    def __init__(self, config: DeviceConfig, shape: tuple[int, int], generator: torch.Generator, pair: bool,
                 device: torch.device | None = None):
        self.config = config
        self.pair = pair
        self.arrays = [DeviceArray(config, shape, generator, device=device)]
        if pair:
            self.arrays.append(DeviceArray(config, shape, generator, device=device))
        self.refreshes = 0

    @property
    def is_ideal(self) -> bool:
        return self.config.is_ideal

    @property
    def granularity(self) -> float:
        return float(self.config.granularity)

    @property
    def weights(self) -> Tensor:
        if self.pair:
            return self.arrays[0].weights - self.arrays[1].weights
        return self.arrays[0].weights

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
            self._maybe_refresh(generator)
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
            self._maybe_refresh(generator)
        else:
            self.arrays[0].apply_pulses_integrated(n_up, n_down, generator, up.fast_substeps)

    def apply_expected(self, mu_up: Tensor, mu_down: Tensor, generator: torch.Generator) -> None:
        """Expected-value update with the noise-free mean step at the current weights."""
        if self.pair:
            for arr, mu in zip(self.arrays, (mu_up, mu_down)):
                step_up, _ = arr.mean_step()
                arr.set_weights(arr.persistent_weights + mu.to(step_up.dtype) * step_up, generator)
            self._maybe_refresh(generator)
        else:
            arr = self.arrays[0]
            step_up, step_down = arr.mean_step()
            dw = mu_up.to(step_up.dtype) * step_up - mu_down.to(step_up.dtype) * step_down
            arr.set_weights(arr.persistent_weights + dw, generator)

    def _maybe_refresh(self, generator: torch.Generator) -> None:
        plus, minus = self.arrays
        limit = REFRESH_THRESHOLD * plus.max_bound
        full = (plus.persistent_weights > limit) | (minus.persistent_weights > limit)
        if bool(full.any()):
            w = plus.persistent_weights - minus.persistent_weights
            new_plus = torch.where(full, w.clamp_min(0.0), plus.persistent_weights)
            new_minus = torch.where(full, (-w).clamp_min(0.0), minus.persistent_weights)
            plus.set_weights(new_plus, generator)
            minus.set_weights(new_minus, generator)
            self.refreshes += int(full.sum())

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
        return {"arrays": [a.state_dict() for a in self.arrays], "refreshes": self.refreshes}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if len(state["arrays"]) != len(self.arrays):
            raise ValueError("state is for a different unit cell (single vs differential pair)")
        for arr, s in zip(self.arrays, state["arrays"]):
            arr.load_state_dict(s)
        self.refreshes = int(state["refreshes"])


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
        self.slot = DeviceSlot(config.device_config(), shape, generator, config.uses_pair, self.device)
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
        self._scale_key: tuple[int, int] | None = None
        self._scale_value: float | None = None
        self._scale_ref: Tensor | None = None
        self.pulse_count = torch.zeros(shape, dtype=torch.float64, device=self.device)
        self.n_updates = 0

    def new_slot(self, generator: torch.Generator) -> DeviceSlot:
        """Another array of this tile's device and unit cell (for algorithms with several arrays)."""
        return DeviceSlot(self.slot.config, self.shape, generator, self.slot.pair, self.device)

    # ------------------------------------------------------------------ programming
    def program(self, weight: Tensor) -> None:
        """Set the model weights W (out, in): choose the mapping scale, program the devices."""
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise ValueError(f"program: shape {tuple(weight.shape)}, expected {(self.out_features, self.in_features)}")
        w = weight.detach().to(device=self.device, dtype=torch.float32)
        omega = self.config.mapping.weight_scaling_omega
        if omega > 0.0:
            if self.config.mapping.weight_scaling_columnwise:
                amax = w.abs().amax(dim=1, keepdim=True)
            else:
                amax = w.abs().amax().expand(self.out_features, 1)
            self.scale = torch.where(amax > 0, amax / omega, torch.ones_like(amax)).clone()
        else:
            self.scale = torch.ones(self.out_features, 1, device=self.device)
        w_dev = w / self.scale
        if self.config.programming_noise > 0.0:
            xi = torch.randn(w_dev.shape, generator=self.update_generator, device=self.update_generator.device)
            w_dev = w_dev + self.config.programming_noise * xi.to(self.device)
        self.slot.set_weights(w_dev, self.update_generator)
        self.algorithm.program(w_dev)

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

    def read(self, w_dev: Tensor, x: Tensor, io: IOParameters, digital_scale: float = 1.0) -> Tensor:
        """An analog read of the device weights `w_dev` through periphery `io` (n_reads averaged)."""
        if self.noise_mode == "frozen":
            self.read_generator.manual_seed(self.noise_seed)
        # one PeripheryReader per periphery, built on first use (constants and scaled weights cached)
        read = self._readers.get(id(io))
        if read is None:
            read = self._readers[id(io)] = PeripheryReader(io)
        y = read(w_dev, x, self.read_generator, self.read_stats, digital_scale)
        for _ in range(self.config.n_reads - 1):
            y = y + read(w_dev, x, self.read_generator, self.read_stats, digital_scale)
        if self.config.n_reads > 1:
            y = y / self.config.n_reads
        return y

    def _uniform_scale(self) -> float | None:
        key = (id(self.scale), self.scale._version)
        if self._scale_key != key:  # `scale` is replaced (program, load), never edited in place
            lo, hi = torch.aminmax(self.scale)
            self._scale_key, self._scale_value = key, (float(hi) if float(lo) == float(hi) else None)
            self._scale_ref = self.scale
        return self._scale_value

    def forward(self, u: Tensor) -> Tensor:
        """y = W u through the forward periphery; u (..., in) -> (..., out), in u's dtype."""
        if u.shape[-1] != self.in_features:
            raise ValueError(f"forward: input has last dimension {u.shape[-1]}, expected {self.in_features}")
        uniform = self._uniform_scale()
        if uniform is not None:
            return self.read(self.slot.weights, u, self.config.forward, uniform)
        y = self.read(self.slot.weights, u, self.config.forward)
        return y * self.scale.squeeze(1).to(y.dtype)

    def transpose(self, d: Tensor) -> Tensor:
        """Wᵀ d through the backward periphery; d (..., out) -> (..., in), in d's dtype."""
        if d.shape[-1] != self.out_features:
            raise ValueError(f"transpose: input has last dimension {d.shape[-1]}, expected {self.out_features}")
        uniform = self._uniform_scale()
        if uniform is not None:
            return self.read(self.slot.weights.T, d, self.config.backward, uniform)
        # a per-row digital scale acts on the rows of W, i.e. on the inputs of the transposed read
        ds = d * self.scale.squeeze(1).to(d.dtype)
        return self.read(self.slot.weights.T, ds, self.config.backward)

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
        self._after_update()

    def _after_update(self) -> None:
        """aihwkit's post-update step, once per `apply_update` (its mini-batch update): every array
        of the tile decays by its `lifetime` and diffuses by its `diffusion` (no-ops when 0)."""
        for slot in (self.slot, *self.algorithm.extra_slots()):
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
                counts = lambda sl: sample_events(plan, gen, sl)  # noqa: E731
            def refresh() -> int:  # the unit cell's own refresh (DeviceSlot._maybe_refresh), counted
                before = slot.refreshes
                slot._maybe_refresh(gen)
                return slot.refreshes - before

            pulses = apply_per_sample(slot.arrays, slot.pair, counts, plan, gen, refresh if slot.pair else None)
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
        self.algorithm.load_state_dict(state["algorithm"])
