"""The physics of each device model, one class per model: where a new device model goes.

A `DeviceRule` says, for the devices of one config type (aihwkit's names, SEMANTICS §1.3–1.4):

- `sample_model(...)`: the model's own hidden parameters, drawn once per device after the
  parameters every pulsed device shares (bounds, steps, decay, diffusion, reset bias;
  `sample_pulsed`);
- `step(cfg, h, w, up, xi)`: the signed Δw of one pulse per device before clipping (up where
  `up`, down elsewhere: a Python bool, a bool tensor, or a float 0/1 tensor), with the per-pulse
  standard normal `xi` (None: noise-free). Every rule is affine in `xi`. A per-device direction
  is selected arithmetically (`select`), not with `torch.where`;
- `noise_std(cfg, h, w, step, up)`: the std of one pulse's cycle-to-cycle noise at w, given the
  noise-free mean step there (used by the integrated n-pulse response);
- `clip(h, w)`: where a pulse leaves the weight when it crosses a bound;
- `pulse_range(h)`: the interval `clip` keeps the weight in.

`rule_for(config)` finds the rule registered for the config's type (`@register`). `DeviceArray`
holds one rule and never asks which model it simulates.

Programming (`DeviceArray.set_weights`) and reset clip to the device's own bounds
(`clip_to_bounds`), as aihwkit's `clipWeights` does, for every model; only a pulse of
SoftBoundsReference clips w + r (aihwkit's `doSparseUpdate` of that device).
"""

from __future__ import annotations

from typing import Any, Callable, ClassVar

import torch
from torch import Tensor

from .configs import (
    ConstantStepDevice, DeviceConfig, ExpStepDevice, IdealDevice, LinearStepDevice, PiecewiseStepDevice,
    PowStepDevice, PulsedDevice, SoftBoundsDevice, SoftBoundsReferenceDevice,
)

__all__ = ["DeviceRule", "register", "rule_for", "clip_to_bounds", "select", "as_mask", "RULES"]

Hidden = dict[str, Tensor]
Randn = Callable[[], Tensor]


def select(up: Tensor | bool, if_up: Any, if_down: Any) -> Any:
    """`torch.where(up, if_up, if_down)` for finite values; short-cut when `up` is one Python bool.

    A tensor `up` (bool, or float 0/1 from `as_mask`) selects arithmetically,
    if_up·u + if_down·(1 − u): exact for finite values (x·1 + y·0 = x), and on CPU ~10x faster
    than `torch.where`, whose branch per element mispredicts on a random mask (pulse directions
    are random). A non-finite if_up or if_down gives NaN where it is not selected.
    """
    if isinstance(up, bool):
        return if_up if up else if_down
    u = as_mask(up, if_up.dtype if isinstance(if_up, Tensor) else if_down.dtype)
    return torch.addcmul(if_down * (1.0 - u), if_up, u)


def as_mask(up: Tensor | bool, dtype: torch.dtype) -> Tensor | bool:
    """A bool direction tensor as a float 0/1 tensor of `dtype` (for `select`; convert once per step)."""
    if isinstance(up, bool) or up.dtype == dtype:
        return up
    return up.to(dtype)


def _signed(up: Tensor | bool, mag: Tensor) -> Tensor:
    """+mag where up, −mag elsewhere (exact: a product with ±1)."""
    if isinstance(up, bool):
        return mag if up else -mag
    return torch.addcmul(-mag, mag, up, value=2.0)  # −m + 2m·u: exact (2m − m = m)


def clip_to_bounds(w: Tensor, h: Hidden) -> Tensor:
    """w clipped to each device's own bounds [min_bound, max_bound] (the one copy of this clip)."""
    return torch.clamp(w, h["min_bound"], h["max_bound"])  # = minimum(maximum(w, min), max)


RULES: dict[type, "DeviceRule"] = {}


def register(config_type: type[DeviceConfig]):
    """Class decorator: the rule for devices of `config_type`."""
    def wrap(cls: type["DeviceRule"]) -> type["DeviceRule"]:
        cls.config_type = config_type
        RULES[config_type] = cls()
        return cls
    return wrap


def rule_for(config: DeviceConfig) -> "DeviceRule":
    """The rule registered for `type(config)` (or its nearest registered base class)."""
    for cls in type(config).__mro__:
        if cls in RULES:
            return RULES[cls]
    raise TypeError(f"no device rule for {type(config).__name__}")


class DeviceRule:
    """Physics of one device model (see the module docstring). Stateless: state lives in `DeviceArray`."""

    config_type: ClassVar[type]
    is_ideal: ClassVar[bool] = False

    # ------------------------------------------------------------------ sampling
    def sample(self, cfg: Any, randn: Randn, rand: Randn) -> Hidden:
        """Every hidden parameter of the devices: shared pulsed ones, then the model's own."""
        h = sample_pulsed(cfg, randn, rand)
        self.sample_model(cfg, h, randn)
        return h

    def sample_model(self, cfg: Any, h: Hidden, randn: Randn) -> None:
        """The model's own hidden parameters (added to `h`); none by default."""

    # ------------------------------------------------------------------ pulses
    def step(self, cfg: Any, h: Hidden, w: Tensor, up: Tensor | bool, xi: Tensor | None) -> Tensor:
        raise NotImplementedError

    def noise_std(self, cfg: Any, h: Hidden, w: Tensor, step: Tensor, up: bool) -> Tensor:
        """Std of one pulse's c2c noise at w: dw_min_std times the mean step (multiplicative noise)."""
        return cfg.dw_min_std * step

    def clip(self, h: Hidden, w: Tensor) -> Tensor:
        return clip_to_bounds(w, h)

    def pulse_range(self, h: Hidden) -> tuple[Tensor, Tensor]:
        return h["min_bound"], h["max_bound"]


def sample_pulsed(cfg: PulsedDevice, randn: Randn, rand: Randn) -> Hidden:
    """aihwkit `PulsedRPUDevice::populate` (SEMANTICS §1.3): bounds, steps, decay, diffusion, reset."""
    c = cfg
    b_max = c.w_max * (1.0 + c.w_max_dtod * randn())
    b_min = c.w_min * (1.0 + c.w_min_dtod * randn())
    xi_gain = randn()
    gain = torch.exp(c.dw_min_dtod * xi_gain) if c.dw_min_dtod_log_normal else 1.0 + c.dw_min_dtod * xi_gain
    r = c.up_down_dtod * randn()
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
        corrupt = rand() < c.corrupt_devices_prob
        lo = torch.minimum(b_max, b_min).clamp_min(-abs(c.corrupt_devices_range))
        hi = torch.maximum(b_max, b_min).clamp_max(abs(c.corrupt_devices_range))
        stuck = lo + (hi - lo) * rand()
        b_max, b_min = torch.where(corrupt, stuck, b_max), torch.where(corrupt, stuck, b_min)
        zero = torch.zeros_like(dw_up)
        dw_up, dw_down = torch.where(corrupt, zero, dw_up), torch.where(corrupt, zero, dw_down)
    diffusion = (c.diffusion * (1.0 + c.diffusion_dtod * randn())).abs()
    reset_bias = c.reset + c.reset_dtod * randn()
    life = c.lifetime * (1.0 + c.lifetime_dtod * randn())
    decay = torch.where(life > 1.0, 1.0 - 1.0 / life.clamp_min(1.0), torch.zeros_like(life))
    if c.lifetime <= 0:  # aihwkit: no lifetime means no decay (scale 1)
        decay = torch.ones_like(life)
    return {"max_bound": b_max, "min_bound": b_min, "dwmin_up": dw_up, "dwmin_down": dw_down,
            "decay_scales": decay, "diffusion_rates": diffusion, "reset_bias": reset_bias}


@register(IdealDevice)
class IdealRule(DeviceRule):
    """aihwkit `IdealDevice`: no hidden parameters, no pulses (float updates), no bounds."""

    is_ideal = True

    def sample(self, cfg: Any, randn: Randn, rand: Randn) -> Hidden:
        return {}

    def step(self, cfg, h, w, up, xi):
        raise TypeError("an ideal device takes float updates: use apply_delta")

    def clip(self, h: Hidden, w: Tensor) -> Tensor:
        return w


@register(ConstantStepDevice)
class ConstantStepRule(DeviceRule):
    """w ± Δ±(1 + σξ)."""

    def step(self, cfg, h, w, up, xi):
        up = as_mask(up, w.dtype)
        mag = select(up, h["dwmin_up"], h["dwmin_down"])
        if xi is not None:
            mag = mag * (1.0 + cfg.dw_min_std * xi)
        return _signed(up, mag)


def _set_linear_slopes(cfg: Any, h: Hidden, g_up: Tensor, g_down: Tensor, mean_ref: bool) -> None:
    """slope± = −γ±·Δ±/w_ref± (aihwkit LinearStep; `reverse_*` moves the reference to the other bound)."""
    b_max, b_min = h["max_bound"], h["min_bound"]
    rev_up, rev_down, offset = cfg.reverse_up, cfg.reverse_down, cfg.reverse_offset
    if mean_ref:
        ref_up = torch.full_like(b_max, (cfg.w_min - offset) if rev_up else cfg.w_max)
        ref_down = torch.full_like(b_max, (cfg.w_max + offset) if rev_down else cfg.w_min)
    else:
        ref_up = (b_min - offset) if rev_up else b_max
        ref_down = (b_max + offset) if rev_down else b_min
    zero = torch.zeros_like(b_max)
    h["slope_up"] = torch.where(ref_up != 0, -g_up * h["dwmin_up"] / ref_up, zero)
    h["slope_down"] = torch.where(ref_down != 0, -g_down * h["dwmin_down"] / ref_down, zero)


class _LinearFamilyRule(DeviceRule):
    """Step slope±·w + Δ±, multiplicative (1 + σξ) or additive (Δ±σξ) noise."""

    def step(self, cfg, h, w, up, xi):
        up = as_mask(up, w.dtype)
        slope = select(up, h["slope_up"], h["slope_down"])
        base = select(up, h["dwmin_up"], h["dwmin_down"])
        if xi is None:
            mag = slope * w + base
        elif cfg.mult_noise:
            mag = (slope * w + base) * (1.0 + cfg.dw_min_std * xi)
        else:
            mag = slope * w + base * (1.0 + cfg.dw_min_std * xi)
        return _signed(up, mag)

    def noise_std(self, cfg, h, w, step, up):
        if cfg.mult_noise:
            return cfg.dw_min_std * step
        return cfg.dw_min_std * h["dwmin_up" if up else "dwmin_down"]


@register(LinearStepDevice)
class LinearStepRule(_LinearFamilyRule):
    """aihwkit LinearStep: slopes γ'±Δ±/w_ref with per-device γ' = γ + γ_dtod·ξ."""

    def sample_model(self, cfg, h, randn):
        g_up = cfg.gamma_up + cfg.gamma_up_dtod * randn()
        g_down = cfg.gamma_down + cfg.gamma_down_dtod * randn()
        if not cfg.allow_increasing:
            g_up, g_down = g_up.abs(), g_down.abs()
        _set_linear_slopes(cfg, h, g_up, g_down, cfg.mean_bound_reference)


@register(SoftBoundsDevice)
class SoftBoundsRule(_LinearFamilyRule):
    """aihwkit SoftBounds = LinearStep with γ = 1, no γ spread, per-device bound references."""

    def sample_model(self, cfg, h, randn):
        one = torch.ones_like(h["max_bound"])
        _set_linear_slopes(cfg, h, one, one, False)


@register(SoftBoundsReferenceDevice)
class SoftBoundsReferenceRule(DeviceRule):
    """SoftBounds acting on w + r (per-device reference r); a pulse clips w + r to the bounds."""

    def sample_model(self, cfg, h, randn):
        b_max, b_min, dw_up, dw_down = h["max_bound"], h["min_bound"], h["dwmin_up"], h["dwmin_down"]
        consistent = (b_max > 0) & (b_min < 0)
        slope_down = -dw_down / b_min * (1.0 + cfg.slope_down_dtod * randn()).abs()
        slope_up = dw_up / b_max * (1.0 + cfg.slope_up_dtod * randn()).abs()
        h["max_bound"] = b_max = torch.where(consistent, dw_up / slope_up, b_max)
        h["min_bound"] = b_min = torch.where(consistent, -dw_down / slope_down, b_min)
        ref = cfg.reference_mean + cfg.reference_std * randn()
        if cfg.subtract_symmetry_point:
            sp = (dw_up - dw_down) / (dw_up / b_max - dw_down / b_min)
            sp = torch.where(consistent, sp, torch.zeros_like(sp))
            ref = ref + sp
            h["reset_bias"] = h["reset_bias"] + sp
        h["reference"] = ref

    def step(self, cfg, h, w, up, xi):
        b_max, b_min = h["max_bound"], h["min_bound"]
        wr = w + h["reference"]
        if isinstance(up, bool):
            bound = b_max if up else b_min
            usable = bound > 0 if up else bound < 0
        else:  # the bound each device's pulse heads for; usable: b_max > 0 (up), b_min < 0 (down)
            up = as_mask(up, w.dtype)
            bound = select(up, b_max, b_min)
            usable = bound * (up * 2.0 - 1.0) > 0
        shape_factor = 1.0 - torch.where(usable, wr / bound, 0.0)
        base = select(up, h["dwmin_up"], h["dwmin_down"])
        if xi is None:
            mag = base * shape_factor
        elif cfg.mult_noise:
            mag = base * shape_factor * (1.0 + cfg.dw_min_std * xi)
        else:
            mag = base * (shape_factor + cfg.dw_min_std * xi)
        return _signed(up, mag)

    def noise_std(self, cfg, h, w, step, up):
        if cfg.mult_noise:
            return cfg.dw_min_std * step
        return cfg.dw_min_std * h["dwmin_up" if up else "dwmin_down"]

    def clip(self, h, w):
        ref = h["reference"]
        return clip_to_bounds(w + ref, h) - ref

    def pulse_range(self, h):
        return h["min_bound"] - h["reference"], h["max_bound"] - h["reference"]


@register(ExpStepDevice)
class ExpStepRule(DeviceRule):
    """aihwkit ExpStep: y = max(1 − A·exp(±γ z), 0) with z = 2w/(b_max − b_min)·a + b."""

    @staticmethod
    def _extra_noise(cfg) -> bool:
        return cfg.dw_min_std > 0 and (cfg.dw_min_std_add != 0 or cfg.dw_min_std_slope != 0)

    def step(self, cfg, h, w, up, xi):
        c = cfg
        b_diff = h["max_bound"] - h["min_bound"]
        z = 2.0 * w / b_diff * c.a + c.b
        if isinstance(up, bool):
            if up:
                dw = (1.0 - c.A_up * torch.exp(c.gamma_up * z)).clamp_min(0.0) * h["dwmin_up"]
            else:
                dw = -(1.0 - c.A_down * torch.exp(-c.gamma_down * z)).clamp_min(0.0) * h["dwmin_down"]
        else:
            y_up = (1.0 - c.A_up * torch.exp(c.gamma_up * z)).clamp_min(0.0)
            y_down = (1.0 - c.A_down * torch.exp(-c.gamma_down * z)).clamp_min(0.0)
            dw = select(up, y_up * h["dwmin_up"], -y_down * h["dwmin_down"])
        if xi is not None:
            if self._extra_noise(c):
                dw = dw + c.dw_min_std * (dw.abs() + c.dw_min_std_add + c.dw_min_std_slope * w.abs()) * xi
            else:
                dw = dw * (1.0 + c.dw_min_std * xi)
        return torch.where(b_diff > 0, dw, torch.zeros_like(dw))

    def noise_std(self, cfg, h, w, step, up):
        if cfg.dw_min_std_add != 0 or cfg.dw_min_std_slope != 0:
            return cfg.dw_min_std * (step + cfg.dw_min_std_add + cfg.dw_min_std_slope * w.abs())
        return cfg.dw_min_std * step


@register(PowStepDevice)
class PowStepRule(DeviceRule):
    """aihwkit PowStep: up Δ⁺((b_max − w)/R)^γ⁺, down Δ⁻((w − b_min)/R)^γ⁻, per-device γ±."""

    def sample_model(self, cfg, h, randn):
        gain_p = 1.0 + cfg.pow_gamma_dtod * randn()
        r_p = cfg.pow_up_down_dtod * randn()
        up_b = min(cfg.pow_up_down, 0.0)
        down_b = -max(cfg.pow_up_down, 0.0)
        gam_up = (up_b + gain_p + r_p) * cfg.pow_gamma
        gam_down = (down_b + gain_p - r_p) * cfg.pow_gamma
        if cfg.enforce_consistency:
            gam_up, gam_down = gam_up.abs(), gam_down.abs()
        h["gamma_up"], h["gamma_down"] = gam_up, gam_down

    def step(self, cfg, h, w, up, xi):
        b_max, b_min = h["max_bound"], h["min_bound"]
        rng = b_max - b_min
        safe = torch.where(rng != 0, rng, torch.ones_like(rng))
        if isinstance(up, bool):
            frac = ((b_max - w) if up else (w - b_min)) / safe
            gamma = h["gamma_up"] if up else h["gamma_down"]
        else:
            up = as_mask(up, w.dtype)
            frac = select(up, b_max - w, w - b_min) / safe
            gamma = select(up, h["gamma_up"], h["gamma_down"])
        mag = select(up, h["dwmin_up"], h["dwmin_down"]) * frac.clamp_min(0.0).pow(gamma)
        if xi is not None:
            mag = mag * (1.0 + cfg.dw_min_std * xi)
        return torch.where(rng != 0, _signed(up, mag), torch.zeros_like(mag))


@register(PiecewiseStepDevice)
class PiecewiseStepRule(DeviceRule):
    """aihwkit PiecewiseStep: step scaled by linear interpolation of node lists over [b_min, b_max]."""

    def step(self, cfg, h, w, up, xi):
        up = as_mask(up, w.dtype)
        b_max, b_min = h["max_bound"], h["min_bound"]
        n_seg = len(cfg.piecewise_up) - 1
        if n_seg == 0:
            factor_up = torch.full_like(w, cfg.piecewise_up[0])
            factor_down = torch.full_like(w, cfg.piecewise_down[0])
        else:
            q = ((w - b_min) / (b_max - b_min) * n_seg).clamp_min(0.0)
            i = q.floor().clamp_max(n_seg - 1)
            t = (q - i).clamp_max(1.0)
            idx = i.long()
            nodes_up = torch.tensor(cfg.piecewise_up, dtype=w.dtype, device=w.device)
            nodes_down = torch.tensor(cfg.piecewise_down, dtype=w.dtype, device=w.device)
            factor_up = (1 - t) * nodes_up[idx] + t * nodes_up[idx + 1]
            factor_down = (1 - t) * nodes_down[idx] + t * nodes_down[idx + 1]
        mag = select(up, h["dwmin_up"] * factor_up, h["dwmin_down"] * factor_down)
        if xi is not None:
            mag = mag * (1.0 + cfg.dw_min_std * xi)
        return _signed(up, mag)
