"""`DeviceArray`: the state of a tensor of devices of one config, with aihwkit's pulse response.

Per-device (d2d) parameters are sampled once from an explicit generator at construction and live
in `hidden` (aihwkit's hidden-parameter names); cycle-to-cycle noise is drawn per pulse.

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

from typing import Any

import torch
from torch import Tensor

from .configs import (
    ConstantStepDevice, DeviceConfig, ExpStepDevice, LinearStepDevice,
    PiecewiseStepDevice, PowStepDevice, PulsedDevice, SoftBoundsDevice, SoftBoundsReferenceDevice,
    device_from_dict,
)

__all__ = ["DeviceArray"]


def _sel(up: Tensor | bool, if_up: Any, if_down: Any) -> Any:
    """`torch.where(up, if_up, if_down)`, short-cut when the direction is one Python bool."""
    if isinstance(up, bool):
        return if_up if up else if_down
    return torch.where(up, if_up, if_down)


class DeviceArray:
    """State of a tensor of devices of one config (any shape, CPU or CUDA)."""

    def __init__(self, config: DeviceConfig, shape: tuple[int, ...], generator: torch.Generator,
                 *, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32):
        self.config = config
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
        c = self.config
        assert isinstance(c, PulsedDevice)
        b_max = c.w_max * (1.0 + c.w_max_dtod * self._randn(g))
        b_min = c.w_min * (1.0 + c.w_min_dtod * self._randn(g))
        xi_gain = self._randn(g)
        gain = torch.exp(c.dw_min_dtod * xi_gain) if c.dw_min_dtod_log_normal else 1.0 + c.dw_min_dtod * xi_gain
        r = c.up_down_dtod * self._randn(g)
        up_bias = min(c.up_down, 0.0)
        down_bias = -max(c.up_down, 0.0)
        dw_up = (up_bias + gain + r) * c.dw_min
        dw_down = (down_bias + gain - r) * c.dw_min
        crossed = b_min > b_max
        if c.enforce_consistency:
            dw_up, dw_down = dw_up.abs(), dw_down.abs()
            b_max, b_min = torch.where(crossed, b_min, b_max), torch.where(crossed, b_max, b_min)
            b_max, b_min = b_max.abs(), -b_min.abs()
        else:  # aihwkit "turns off" a device whose bounds crossed: both bounds at their midpoint
            mid = 0.5 * (b_max + b_min)
            b_max, b_min = torch.where(crossed, mid, b_max), torch.where(crossed, mid, b_min)
        if c.corrupt_devices_prob > 0:  # stuck at a uniform value inside its range, no steps
            corrupt = self._rand(g) < c.corrupt_devices_prob
            lo = torch.minimum(b_max, b_min).clamp_min(-abs(c.corrupt_devices_range))
            hi = torch.maximum(b_max, b_min).clamp_max(abs(c.corrupt_devices_range))
            stuck = lo + (hi - lo) * self._rand(g)
            b_max, b_min = torch.where(corrupt, stuck, b_max), torch.where(corrupt, stuck, b_min)
            zero = torch.zeros_like(dw_up)
            dw_up, dw_down = torch.where(corrupt, zero, dw_up), torch.where(corrupt, zero, dw_down)
        diffusion = (c.diffusion * (1.0 + c.diffusion_dtod * self._randn(g))).abs()
        reset_bias = c.reset + c.reset_dtod * self._randn(g)
        life = c.lifetime * (1.0 + c.lifetime_dtod * self._randn(g))
        decay = torch.where(life > 1.0, 1.0 - 1.0 / life.clamp_min(1.0), torch.zeros_like(life))
        if c.lifetime <= 0:  # aihwkit: no lifetime means no decay (scale 1)
            decay = torch.ones_like(life)
        h = self.hidden
        h["max_bound"], h["min_bound"] = b_max, b_min
        h["dwmin_up"], h["dwmin_down"] = dw_up, dw_down
        h["decay_scales"] = decay
        h["diffusion_rates"] = diffusion
        h["reset_bias"] = reset_bias

        if isinstance(c, LinearStepDevice):
            g_up = c.gamma_up + c.gamma_up_dtod * self._randn(g)
            g_down = c.gamma_down + c.gamma_down_dtod * self._randn(g)
            if not c.allow_increasing:
                g_up, g_down = g_up.abs(), g_down.abs()
            self._set_linear_slopes(g_up, g_down, c.mean_bound_reference, c.reverse_up, c.reverse_down,
                                    c.reverse_offset)
        elif isinstance(c, SoftBoundsDevice):
            one = torch.ones_like(b_max)
            self._set_linear_slopes(one, one, False, c.reverse_up, c.reverse_down, c.reverse_offset)
        elif isinstance(c, SoftBoundsReferenceDevice):
            consistent = (b_max > 0) & (b_min < 0)
            slope_down = -dw_down / b_min * (1.0 + c.slope_down_dtod * self._randn(g)).abs()
            slope_up = dw_up / b_max * (1.0 + c.slope_up_dtod * self._randn(g)).abs()
            h["max_bound"] = b_max = torch.where(consistent, dw_up / slope_up, b_max)
            h["min_bound"] = b_min = torch.where(consistent, -dw_down / slope_down, b_min)
            ref = c.reference_mean + c.reference_std * self._randn(g)
            if c.subtract_symmetry_point:
                sp = (dw_up - dw_down) / (dw_up / b_max - dw_down / b_min)
                sp = torch.where(consistent, sp, torch.zeros_like(sp))
                ref = ref + sp
                h["reset_bias"] = h["reset_bias"] + sp
            h["reference"] = ref
        elif isinstance(c, PowStepDevice):
            gain_p = 1.0 + c.pow_gamma_dtod * self._randn(g)
            r_p = c.pow_up_down_dtod * self._randn(g)
            up_b = min(c.pow_up_down, 0.0)
            down_b = -max(c.pow_up_down, 0.0)
            gam_up = (up_b + gain_p + r_p) * c.pow_gamma
            gam_down = (down_b + gain_p - r_p) * c.pow_gamma
            if c.enforce_consistency:
                gam_up, gam_down = gam_up.abs(), gam_down.abs()
            h["gamma_up"], h["gamma_down"] = gam_up, gam_down

        if getattr(c, "write_noise_std", 0.0) > 0:
            self._apparent = self._persistent.clone()

    def _set_linear_slopes(self, g_up: Tensor, g_down: Tensor, mean_ref: bool, rev_up: bool,
                           rev_down: bool, offset: float) -> None:
        c, h = self.config, self.hidden
        b_max, b_min = h["max_bound"], h["min_bound"]
        if mean_ref:
            ref_up = torch.full_like(b_max, (c.w_min - offset) if rev_up else c.w_max)
            ref_down = torch.full_like(b_max, (c.w_max + offset) if rev_down else c.w_min)
        else:
            ref_up = (b_min - offset) if rev_up else b_max
            ref_down = (b_max + offset) if rev_down else b_min
        zero = torch.zeros_like(b_max)
        h["slope_up"] = torch.where(ref_up != 0, -g_up * h["dwmin_up"] / ref_up, zero)
        h["slope_down"] = torch.where(ref_down != 0, -g_down * h["dwmin_down"] / ref_down, zero)

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
        self._persistent = torch.minimum(torch.maximum(w, self.hidden["min_bound"]), self.hidden["max_bound"]).clone()
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
        arr.config, arr.shape = cfg, tuple(state["shape"])
        arr.device = torch.device(device) if device is not None else torch.device("cpu")
        arr.dtype, arr.hidden, arr._apparent = dtype, {}, None
        arr._persistent = torch.zeros(arr.shape, device=arr.device, dtype=dtype)
        arr.load_state_dict(state)
        return arr

    # ------------------------------------------------------------------ update rules
    def _step(self, w: Tensor, up: Tensor | bool, xi: Tensor | None,
              h: dict[str, Tensor] | None = None) -> Tensor:
        """Signed Δw of one pulse per device (up where `up`, down elsewhere), before clipping.

        `up` is a bool tensor, or a Python bool when every device gets the same direction.

        `xi` is the per-pulse standard normal (None: noise-free). Returns Δw on the persistent
        weight; SoftBoundsReference's reference shift is handled inside. `h`: the hidden
        parameters of the devices in `w` (default: all of them).
        """
        c = self.config
        h = self.hidden if h is None else h
        sigma = c.dw_min_std
        noise = None if xi is None else sigma * xi
        dw_up, dw_down = h["dwmin_up"], h["dwmin_down"]

        if isinstance(c, ConstantStepDevice):
            mag = _sel(up, dw_up, dw_down)
            if noise is not None:
                mag = mag * (1.0 + noise)
            return _sel(up, mag, -mag)

        if isinstance(c, (LinearStepDevice, SoftBoundsDevice)):
            slope = _sel(up, h["slope_up"], h["slope_down"])
            base = _sel(up, dw_up, dw_down)
            if noise is None:
                mag = slope * w + base
            elif c.mult_noise:
                mag = (slope * w + base) * (1.0 + noise)
            else:
                mag = slope * w + base * (1.0 + noise)
            return _sel(up, mag, -mag)

        if isinstance(c, SoftBoundsReferenceDevice):
            b_max, b_min = h["max_bound"], h["min_bound"]
            wr = w + h["reference"]
            if isinstance(up, bool):
                bound = b_max if up else b_min
                usable = bound > 0 if up else bound < 0
                shape_factor = 1.0 - torch.where(usable, wr / bound, torch.zeros_like(w))
            else:
                a_up = torch.where(b_max > 0, wr / b_max, torch.zeros_like(w))
                a_down = torch.where(b_min < 0, wr / b_min, torch.zeros_like(w))
                shape_factor = 1.0 - torch.where(up, a_up, a_down)
            base = _sel(up, dw_up, dw_down)
            if noise is None:
                mag = base * shape_factor
            elif c.mult_noise:
                mag = base * shape_factor * (1.0 + noise)
            else:
                mag = base * (shape_factor + noise)
            return _sel(up, mag, -mag)

        if isinstance(c, ExpStepDevice):
            b_diff = h["max_bound"] - h["min_bound"]
            z = 2.0 * w / b_diff * c.a + c.b
            if isinstance(up, bool):
                if up:
                    dw = (1.0 - c.A_up * torch.exp(c.gamma_up * z)).clamp_min(0.0) * dw_up
                else:
                    dw = -(1.0 - c.A_down * torch.exp(-c.gamma_down * z)).clamp_min(0.0) * dw_down
            else:
                y_up = (1.0 - c.A_up * torch.exp(c.gamma_up * z)).clamp_min(0.0)
                y_down = (1.0 - c.A_down * torch.exp(-c.gamma_down * z)).clamp_min(0.0)
                dw = torch.where(up, y_up * dw_up, -y_down * dw_down)
            if noise is not None:
                if sigma > 0 and (c.dw_min_std_add != 0 or c.dw_min_std_slope != 0):
                    dw = dw + sigma * (dw.abs() + c.dw_min_std_add + c.dw_min_std_slope * w.abs()) * xi
                else:
                    dw = dw * (1.0 + noise)
            return torch.where(b_diff > 0, dw, torch.zeros_like(dw))

        if isinstance(c, PowStepDevice):
            b_max, b_min = h["max_bound"], h["min_bound"]
            rng = b_max - b_min
            safe = torch.where(rng != 0, rng, torch.ones_like(rng))
            if isinstance(up, bool):
                frac = ((b_max - w) if up else (w - b_min)) / safe
                gamma = h["gamma_up"] if up else h["gamma_down"]
            else:
                frac = torch.where(up, b_max - w, w - b_min) / safe
                gamma = torch.where(up, h["gamma_up"], h["gamma_down"])
            mag = _sel(up, dw_up, dw_down) * frac.clamp_min(0.0).pow(gamma)
            if noise is not None:
                mag = mag * (1.0 + noise)
            return torch.where(rng != 0, _sel(up, mag, -mag), torch.zeros_like(mag))

        if isinstance(c, PiecewiseStepDevice):
            b_max, b_min = h["max_bound"], h["min_bound"]
            n_seg = len(c.piecewise_up) - 1
            if n_seg == 0:
                factor_up = torch.full_like(w, c.piecewise_up[0])
                factor_down = torch.full_like(w, c.piecewise_down[0])
            else:
                q = ((w - b_min) / (b_max - b_min) * n_seg).clamp_min(0.0)
                i = q.floor().clamp_max(n_seg - 1)
                t = (q - i).clamp_max(1.0)
                idx = i.long()
                nodes_up = torch.tensor(c.piecewise_up, dtype=w.dtype, device=w.device)
                nodes_down = torch.tensor(c.piecewise_down, dtype=w.dtype, device=w.device)
                factor_up = (1 - t) * nodes_up[idx] + t * nodes_up[idx + 1]
                factor_down = (1 - t) * nodes_down[idx] + t * nodes_down[idx + 1]
            mag = _sel(up, dw_up * factor_up, dw_down * factor_down)
            if noise is not None:
                mag = mag * (1.0 + noise)
            return _sel(up, mag, -mag)

        raise TypeError(f"no update rule for {type(c).__name__}")

    def _clip(self, w: Tensor, h: dict[str, Tensor] | None = None) -> Tensor:
        h = self.hidden if h is None else h
        if isinstance(self.config, SoftBoundsReferenceDevice):
            ref = h["reference"]
            return torch.minimum(torch.maximum(w + ref, h["min_bound"]), h["max_bound"]) - ref
        return torch.minimum(torch.maximum(w, h["min_bound"]), h["max_bound"])

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

    def apply_pulses_approx(self, n_up: Tensor, n_down: Tensor, generator: torch.Generator,
                            substeps: int = 4) -> None:
        """Closed-form approximation of `apply_pulses` for large counts (cost independent of n).

        Approximation, not the model: the mean trajectory is the ODE dw/dk = mean step, integrated
        with `substeps` midpoint steps per phase, in the order of `apply_pulses` (min(u, d)
        alternating pairs, drift = up step − down step; then the surplus pulses); the c2c noise is
        one Gaussian with the summed per-pulse variance at the phase's midpoint weight; bounds are
        applied after each substep and at the end. It is accurate while the step changes little
        over the pulses of one call (`tests/test_devices_rules.py` checks it against the exact
        loop); write noise is redrawn as in `apply_pulses`.
        """
        if self.config.is_ideal:
            raise TypeError("an ideal device takes float updates: use apply_delta")
        n_up = torch.as_tensor(n_up, device=self.device).to(self.dtype)
        n_down = torch.as_tensor(n_down, device=self.device).to(self.dtype)
        if n_up.shape != self.shape or n_down.shape != self.shape:
            raise ValueError(f"pulse counts must have shape {self.shape}")
        if bool((n_up < 0).any()) or bool((n_down < 0).any()):
            raise ValueError("pulse counts must be non-negative")
        pairs = torch.minimum(n_up, n_down)
        surplus = (n_up - n_down).abs()
        surplus_up = n_up > n_down
        w = self._persistent

        def noise_var(w: Tensor, up: bool | Tensor) -> Tensor:
            # every update rule is affine in the per-pulse normal draw ξ
            ones = torch.ones_like(w)
            return (self._step(w, up, ones) - self._step(w, up, None)) ** 2

        def pair_drift(w: Tensor) -> Tensor:
            return self._step(w, True, None) + self._step(w, False, None)

        def surplus_drift(w: Tensor) -> Tensor:
            return self._step(w, surplus_up, None)

        for count, drift, var_of in (
            (pairs, pair_drift, lambda w: noise_var(w, True) + noise_var(w, False)),
            (surplus, surplus_drift, lambda w: noise_var(w, surplus_up)),
        ):
            if not bool((count > 0).any()):
                continue
            h = count / substeps
            w_start = w
            for _ in range(substeps):
                half = self._clip(w + 0.5 * h * drift(w))
                w = self._clip(w + h * drift(half))
            mid = self._clip(0.5 * (w_start + w))
            w = self._clip(w + (count * var_of(mid)).sqrt() * self._randn(generator))
        self._persistent = w
        if self._apparent is not None:
            touched = (n_up + n_down) > 0
            noisy = w + self._write_noise_scale() * self._randn(generator)
            self._apparent = torch.where(touched, noisy, self._apparent)

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
        value = self._clip_to_bounds(h["reset_bias"] + self.config.reset_std * self._randn(generator))
        self._persistent = torch.where(mask, value, self._persistent)
        if self._apparent is not None:
            noisy = self._persistent + self._write_noise_scale() * self._randn(generator)
            self._apparent = torch.where(mask, noisy, self._apparent)

    def _clip_to_bounds(self, w: Tensor) -> Tensor:
        return torch.minimum(torch.maximum(w, self.hidden["min_bound"]), self.hidden["max_bound"])

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
