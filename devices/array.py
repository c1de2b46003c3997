"""`DeviceArray`: the state of a tensor of devices of one config, with aihwkit's pulse response.

Per-device (d2d) parameters are sampled once from an explicit generator at construction and live
in `hidden` (aihwkit's hidden-parameter names); cycle-to-cycle noise is drawn per pulse. What a
pulse does is the device model's rule (`devices.physics`, one class per model); this class holds
the state and the pulse protocols (pulse by pulse, integrated n-pulse response, expected step).

Order of pulses within one `apply_pulses` call: a device that gets u ups and d downs receives
min(u, d) alternating (up, down) pairs first, then the |u − d| remaining pulses of the majority
direction. Alternation keeps a bounded device from saturating on one side before the opposite
pulses arrive (in aihwkit the pulses of different batch samples are applied sample by sample, so
their order is data dependent; alternation is the unbiased choice).

Where we differ from aihwkit
----------------------------
- Write noise (`write_noise_std`, units of dw_min) is redrawn once per call for every device that
  received at least one pulse (aihwkit's CPU redraws after every pulse, its GPU once per
  coincidence train: the weight a read sees is the same in distribution).
- Random draws come from torch generators, so values differ from aihwkit's RNG stream; only the
  distributions match.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from .configs import DeviceConfig, device_from_dict
from .physics import DeviceRule, clip_to_bounds, rule_for

__all__ = ["DeviceArray", "MAX_SUBSTEPS"]

MAX_SUBSTEPS = 64


class DeviceArray:
    """State of a tensor of devices of one config (any shape, CPU or CUDA)."""

    def __init__(self, config: DeviceConfig, shape: tuple[int, ...], generator: torch.Generator,
                 *, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32):
        self.config = config
        self.rule: DeviceRule = rule_for(config)
        self.shape = tuple(int(s) for s in shape)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.dtype = dtype
        self.hidden: dict[str, Tensor] = {}
        self._persistent = torch.zeros(self.shape, device=self.device, dtype=dtype)
        self._apparent: Tensor | None = None
        if not config.is_ideal:
            self._populate(generator)

    # ------------------------------------------------------------------ sampling
    def _randn(self, generator: torch.Generator) -> Tensor:
        xi = torch.randn(self.shape, generator=generator, device=generator.device, dtype=self.dtype)
        return xi.to(self.device)

    def _randn_flat(self, n: int, generator: torch.Generator) -> Tensor:
        xi = torch.randn((n,), generator=generator, device=generator.device, dtype=self.dtype)
        return xi.to(self.device)

    def _rand(self, generator: torch.Generator) -> Tensor:
        u = torch.rand(self.shape, generator=generator, device=generator.device, dtype=self.dtype)
        return u.to(self.device)

    def _populate(self, g: torch.Generator) -> None:
        self.hidden = self.rule.sample(self.config, lambda: self._randn(g), lambda: self._rand(g))
        if getattr(self.config, "write_noise_std", 0.0) > 0:
            self._apparent = self._persistent.clone()

    # ------------------------------------------------------------------ state
    @property
    def weights(self) -> Tensor:
        """The weight a read sees: persistent weight plus the current write-noise sample, if any."""
        return self._apparent if self._apparent is not None else self._persistent

    @property
    def persistent_weights(self) -> Tensor:
        """The weight the update acts on (equal to `weights` without write noise)."""
        return self._persistent

    def _write_noise_scale(self) -> float:
        c = self.config
        return getattr(c, "write_noise_std", 0.0) * (c.dw_min if c.dw_min != 0 else 1.0)

    def set_weights(self, w: Tensor, generator: torch.Generator | None = None) -> None:
        """Program the weights; each device is clipped to its own bounds.

        With write noise and `apply_write_noise_on_set` (aihwkit default), the apparent weight gets
        a fresh write-noise sample, which needs `generator`.
        """
        w = torch.as_tensor(w, dtype=self.dtype, device=self.device).expand(self.shape)
        if self.config.is_ideal:
            self._persistent = w.clone()
            return
        self._persistent = clip_to_bounds(w, self.hidden).clone()
        if self._apparent is not None:
            if getattr(self.config, "apply_write_noise_on_set", True):
                if generator is None:
                    raise ValueError("set_weights needs a generator: this device has write noise on set")
                self._apparent = self._persistent + self._write_noise_scale() * self._randn(generator)
            else:
                self._apparent = self._persistent.clone()

    def state_dict(self) -> dict[str, Any]:
        """Config, weights and every per-device sample (they must survive a checkpoint)."""
        state: dict[str, Any] = {
            "config": self.config.to_dict(),
            "shape": list(self.shape),
            "persistent_weights": self._persistent.clone(),
            "hidden": {k: v.clone() for k, v in self.hidden.items()},
        }
        if self._apparent is not None:
            state["apparent_weights"] = self._apparent.clone()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        cfg = device_from_dict(state["config"])
        if cfg != self.config or tuple(state["shape"]) != self.shape:
            raise ValueError(f"state is for {cfg.model} {tuple(state['shape'])}, "
                             f"this array is {self.config.model} {self.shape}")
        def conv(t: Tensor) -> Tensor:
            return t.to(device=self.device, dtype=self.dtype).clone()
        self._persistent = conv(state["persistent_weights"])
        self.hidden = {k: conv(v) for k, v in state["hidden"].items()}
        self._apparent = conv(state["apparent_weights"]) if "apparent_weights" in state else None

    @classmethod
    def from_state_dict(cls, state: dict[str, Any], *, device=None, dtype=torch.float32) -> "DeviceArray":
        cfg = device_from_dict(state["config"])
        arr = cls.__new__(cls)
        arr.config, arr.rule, arr.shape = cfg, rule_for(cfg), tuple(state["shape"])
        arr.device = torch.device(device) if device is not None else torch.device("cpu")
        arr.dtype, arr.hidden, arr._apparent = dtype, {}, None
        arr._persistent = torch.zeros(arr.shape, device=arr.device, dtype=dtype)
        arr.load_state_dict(state)
        return arr

    # ------------------------------------------------------------------ update rules
    def _step(self, w: Tensor, up: Tensor | bool, xi: Tensor | None,
              h: dict[str, Tensor] | None = None) -> Tensor:
        """Signed Δw of one pulse per device (up where `up`, down elsewhere), before clipping.

        `up` is a bool tensor, or a Python bool when every device gets the same direction;
        `xi` the per-pulse standard normal (None: noise-free); `h` the hidden parameters of the
        devices in `w` (default: all of them). The model's rule (`devices.physics`) decides.
        """
        return self.rule.step(self.config, self.hidden if h is None else h, w, up, xi)

    def _clip(self, w: Tensor, h: dict[str, Tensor] | None = None) -> Tensor:
        """Where a pulse leaves w (the model's clip, e.g. SoftBoundsReference clips w + r)."""
        return self.rule.clip(self.hidden if h is None else h, w)

    @property
    def max_bound(self) -> Tensor:
        """Each device's upper bound b_max (aihwkit `max_bound`)."""
        return self.hidden["max_bound"]

    def pulse_range(self, dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
        """Per device, the interval a pulse keeps the weight in (bounds, shifted by a reference),
        computed in `dtype` (default: the array's)."""
        h = self.hidden if dtype is None else {k: v.to(dtype) for k, v in self.hidden.items()}
        return self.rule.pulse_range(h)

    def near_bounds(self, tol: float) -> Tensor:
        """Bool mask: persistent weight within `tol` of one of the device's own bounds."""
        w, h = self._persistent, self.hidden
        return (w >= h["max_bound"] - tol) | (w <= h["min_bound"] + tol)

    def apply_pulses(self, n_up: Tensor, n_down: Tensor, generator: torch.Generator) -> None:
        """Apply `n_up` up pulses and `n_down` down pulses per device (non-negative integer tensors).

        Pulse by pulse: bounded devices saturate as they go, c2c noise is drawn per pulse. Order:
        see the module docstring (alternating pairs first, then the surplus direction).
        """
        if self.config.is_ideal:
            raise TypeError("an ideal device takes float updates: use apply_delta")
        n_up = torch.as_tensor(n_up, device=self.device)
        n_down = torch.as_tensor(n_down, device=self.device)
        if n_up.shape != self.shape or n_down.shape != self.shape:
            raise ValueError(f"pulse counts must have shape {self.shape}, got {tuple(n_up.shape)} and {tuple(n_down.shape)}")
        if torch.is_floating_point(n_up) or torch.is_floating_point(n_down):
            if not (torch.equal(n_up, n_up.round()) and torch.equal(n_down, n_down.round())):
                raise ValueError("pulse counts must be integers")
        n_up, n_down = n_up.to(torch.int32), n_down.to(torch.int32)
        if bool((torch.minimum(n_up, n_down) < 0).any()):
            raise ValueError("pulse counts must be non-negative")
        total = n_up + n_down
        n_max = int(total.max()) if total.numel() else 0
        if n_max == 0:
            return
        n_min = int(total.min())
        only_up = not bool(n_down.any())
        only_down = not only_up and not bool(n_up.any())
        pairs2 = 2 * torch.minimum(n_up, n_down).reshape(-1)
        surplus_up = (n_up > n_down).reshape(-1)
        total = total.reshape(-1)
        # Work on the devices still receiving pulses: when fewer than half of the current set
        # remain, gather them (weights, hidden parameters, counts) and go on with the subset.
        w_all = self._persistent.reshape(-1)
        hidden = {k: v.reshape(-1) for k, v in self.hidden.items()}
        index: Tensor | None = None
        w = w_all
        for t in range(n_max):
            if t >= n_min:
                active = total > t
                n_active = int(active.sum())
                if 2 * n_active <= active.numel():
                    keep = active.nonzero().squeeze(1)
                    if index is None:
                        w_all = w.clone()      # the full, current weights
                    else:
                        w_all[index] = w
                    index = keep if index is None else index[keep]
                    w, total, pairs2, surplus_up = w[keep], total[keep], pairs2[keep], surplus_up[keep]
                    hidden = {k: v[keep] for k, v in hidden.items()}
                    active = None
            else:
                active = None
            if only_up or only_down:
                up: Tensor | bool = only_up
            elif t % 2 == 0:   # inside the alternating pairs an even pulse is up, then the surplus
                up = (pairs2 > t) | surplus_up
            else:
                up = (pairs2 <= t) & surplus_up
            xi = self._randn_flat(w.numel(), generator)
            new = self._clip(w + self._step(w, up, xi, hidden), hidden)
            w = new if active is None else torch.where(active, new, w)
        if index is not None:
            w_all[index] = w
            w = w_all
        self._persistent = w.reshape(self.shape)
        if self._apparent is not None:
            touched = (n_up + n_down) > 0
            noisy = self._persistent + self._write_noise_scale() * self._randn(generator)
            self._apparent = noisy if n_min > 0 else torch.where(touched, noisy, self._apparent)

    def pulse_once(self, up: Tensor | bool, generator: torch.Generator, active: Tensor | None = None) -> None:
        """One pulse on every device (or where `active`): up where `up` (bool tensor or one bool).

        The fast path of characterisation protocols; `apply_pulses` is the general call.
        """
        xi = self._randn(generator)
        xi_write = self._randn(generator) if self._apparent is not None else None
        self.pulse_with_noise(up, xi, xi_write, active)

    def pulse_with_noise(self, up: Tensor | bool, xi: Tensor, xi_write: Tensor | None = None,
                         active: Tensor | None = None) -> None:
        """`pulse_once` with the standard-normal draws given (c2c `xi`, write noise `xi_write`),
        so that a protocol can draw them for many pulses at once."""
        if self.config.is_ideal:
            raise TypeError("an ideal device takes float updates: use apply_delta")
        w = self._persistent
        new = self._clip(w + self._step(w, up, xi))
        self._persistent = new if active is None else torch.where(active, new, w)
        if self._apparent is not None:
            if xi_write is None:
                raise ValueError("this device has write noise: xi_write is needed")
            noisy = self._persistent + self._write_noise_scale() * xi_write
            self._apparent = noisy if active is None else torch.where(active, noisy, self._apparent)

    def apply_pulses_integrated(self, n_up: Tensor, n_down: Tensor, generator: torch.Generator,
                                substeps: int = 8, max_substeps: int = MAX_SUBSTEPS) -> None:
        """The integrated n-pulse response: cost independent of the counts (an approximation).

        Euler steps of the mean drift dw/dn = n_up·Δ⁺(w) − n_down·Δ⁻(w) (noise-free mean steps at
        the current weight, `mean_step`), each with Gaussian cycle-to-cycle noise of the summed
        per-pulse variance (the rule's `noise_std`), clipped as a pulse clips after every step;
        the result is programmed with `set_weights` (which redraws write noise, if any).

        The up and down pulses are spread evenly over the steps: the path follows a random
        interleaving of the pulses, not `apply_pulses`'s pairs-first order. At least `substeps`
        steps, more when a device would otherwise move more than 5 % of the nominal range
        (w_max − w_min) in one step, but at most `max_substeps` and at most one per pulse.
        Accurate while the step changes little over one Euler step (`tests/test_devices_rules.py`
        and `tests/test_crossbar_update.py` check it against pulses applied one by one).
        """
        if self.config.is_ideal:
            raise TypeError("an ideal device takes float updates: use apply_delta")
        cfg, h, rule = self.config, self.hidden, self.rule
        n_up = torch.as_tensor(n_up, device=self.device).to(self.dtype)
        n_down = torch.as_tensor(n_down, device=self.device).to(self.dtype)
        if n_up.shape != self.shape or n_down.shape != self.shape:
            raise ValueError(f"pulse counts must have shape {self.shape}")
        if bool((n_up < 0).any()) or bool((n_down < 0).any()):
            raise ValueError("pulse counts must be non-negative")
        w = self.persistent_weights
        step_up, step_down = self.mean_step(w)
        span = cfg.w_max - cfg.w_min
        travel = float((n_up * step_up + n_down * step_down).max()) / span
        n_max = int((n_up + n_down).max())
        substeps = max(1, min(n_max, max_substeps, max(substeps, math.ceil(travel / 0.05))))
        for i in range(substeps):
            if i > 0:
                step_up, step_down = self.mean_step(w)
            w = w + (n_up * step_up - n_down * step_down) / substeps
            if cfg.dw_min_std > 0:
                sd_up = rule.noise_std(cfg, h, w, step_up, True)
                sd_down = rule.noise_std(cfg, h, w, step_down, False)
                var = (n_up * sd_up * sd_up + n_down * sd_down * sd_down) / substeps
                xi = torch.randn(w.shape, generator=generator, device=generator.device, dtype=w.dtype).to(w.device)
                w = w + var.sqrt() * xi
            w = rule.clip(h, w)
        self.set_weights(w, generator)

    def apply_delta(self, dw: Tensor) -> None:
        """Exact float update, only for ideal devices (w += dw)."""
        if not self.config.is_ideal:
            raise TypeError(f"apply_delta is only for ideal devices, this is {self.config.model}: use apply_pulses")
        self._persistent = self._persistent + torch.as_tensor(dw, dtype=self.dtype, device=self.device)

    def mean_step(self, w: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Expected |Δw| of one up and one down pulse at w (default: current persistent weights).

        Noise-free per-device step, including clipping at the device's bounds (a device at its
        upper bound has mean up step 0; a given w beyond a device's bound is first clipped to it).
        For multiplicative noise this is the exact mean away from the bounds; ideal devices raise.
        """
        if self.config.is_ideal:
            raise TypeError("an ideal device has no pulse step")
        if w is None:
            w = self._persistent
        else:  # a weight outside a device's range is read as the bound it would be clipped to
            w = self._clip(torch.as_tensor(w, dtype=self.dtype, device=self.device).expand(self.shape))
        up = self._clip(w + self._step(w, True, None)) - w
        down = w - self._clip(w + self._step(w, False, None))
        return up, down

    def reset(self, mask: Tensor, generator: torch.Generator) -> None:
        """aihwkit's device reset where `mask`: w ← clip(reset_bias + reset_std·ξ) (e.g. a refresh)."""
        if self.config.is_ideal:
            self._persistent = torch.where(mask, torch.zeros_like(self._persistent), self._persistent)
            return
        h = self.hidden
        value = clip_to_bounds(h["reset_bias"] + self.config.reset_std * self._randn(generator), h)
        self._persistent = torch.where(mask, value, self._persistent)
        if self._apparent is not None:
            noisy = self._persistent + self._write_noise_scale() * self._randn(generator)
            self._apparent = torch.where(mask, noisy, self._apparent)

    def decay(self) -> None:
        """aihwkit's lifetime decay, once: w ← b + (w − b)·decay_scale with b the reset bias.

        aihwkit calls it once per mini-batch in `post_update_step`; the pulse protocol never does.
        A no-op when `lifetime` is 0.
        """
        if self.config.is_ideal or self.config.lifetime <= 0:
            return
        h = self.hidden
        self._persistent = self._clip(h["reset_bias"] + (self._persistent - h["reset_bias"]) * h["decay_scales"])
        if self._apparent is not None:
            self._apparent = self._persistent.clone()

    def diffuse(self, generator: torch.Generator) -> None:
        """aihwkit's diffusion, once: w ← clip(w + diffusion_rate·ξ). A no-op when `diffusion` is 0."""
        if self.config.is_ideal or self.config.diffusion == 0:
            return
        self._persistent = self._clip(self._persistent + self.hidden["diffusion_rates"] * self._randn(generator))
        if self._apparent is not None:
            self._apparent = self._persistent + self._write_noise_scale() * self._randn(generator)
