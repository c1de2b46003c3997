"""The symmetric variant of a device: up and down steps made mirror images of each other.

A device is *symmetric* here when, at nominal parameters (no device-to-device spread, no
cycle-to-cycle noise), the up step at weight w equals the down step at −w for every w in its
range: Δ⁺(w) = Δ⁻(−w). Then Δ⁺(0) = Δ⁻(0), the symmetry point is w = 0 and many nearly
cancelling ± pulses leave a weight where it is on average (no drift towards an off-centre
symmetry point). This is the gap-attribution factor "symmetric device"
(`experiments.attribution`): it removes the nominal up/down asymmetry and nothing else (the
spreads and noise are the "d2d" and "c2c" factors).

The rule per model (the range is kept: b = (w_max − w_min)/2, then w_max = b, w_min = −b;
`up_down` = 0, so Δ⁺ = Δ⁻ = dw_min, in every model):

- constant_step: up_down 0 and symmetric bounds.
- linear_step: equal slopes γ⁺ = γ⁻ = (γ⁺ + γ⁻)/2; `reverse_down` = `reverse_up` (the mirror of
  the up reference is the down reference).
- soft_bounds: symmetric bounds (the slopes −Δ/b_max and −Δ/b_min are then mirror images).
- soft_bounds_reference: as soft_bounds, and `reference_mean` 0 (a reference offset moves the
  symmetry point; its spread `reference_std` is device-to-device, left to the "d2d" factor).
- exp_step: A⁺ = A⁻ = (A⁺ + A⁻)/2, γ⁺ = γ⁻ = (γ⁺ + γ⁻)/2 and b = 0 (so z(−w) = −z(w)).
- pow_step: pow_up_down 0 (γ⁺ = γ⁻ = pow_gamma).
- piecewise_step: the up nodes become v = (v⁺ + reversed(v⁻))/2 and the down nodes reversed(v),
  so the down step at −w reads the node the up step reads at w.
- ideal: refused (`ConfigError`): an ideal device has no steps.
"""

from __future__ import annotations

from typing import Any

from ept_hw.config import ConfigError

from .configs import (
    ConstantStepDevice, DeviceConfig, ExpStepDevice, LinearStepDevice, PiecewiseStepDevice, PowStepDevice,
    SoftBoundsDevice, SoftBoundsReferenceDevice,
)

__all__ = ["symmetric_device"]


def symmetric_device(cfg: DeviceConfig) -> DeviceConfig:
    """The symmetric variant of `cfg` (module docstring: the rule per model); `ConfigError` for an
    ideal device or a model without a rule."""
    if cfg.is_ideal:
        raise ConfigError("device", cfg.model, "a pulsed device (an ideal device has no up and down steps)")
    b = 0.5 * (cfg.w_max - cfg.w_min)
    changes: dict[str, Any] = {"up_down": 0.0, "w_max": b, "w_min": -b}
    if isinstance(cfg, LinearStepDevice):
        g = 0.5 * (cfg.gamma_up + cfg.gamma_down)
        changes.update(gamma_up=g, gamma_down=g, reverse_down=cfg.reverse_up)
    elif isinstance(cfg, SoftBoundsReferenceDevice):
        changes.update(reference_mean=0.0)
    elif isinstance(cfg, ExpStepDevice):
        a_mean, g = 0.5 * (cfg.A_up + cfg.A_down), 0.5 * (cfg.gamma_up + cfg.gamma_down)
        changes.update(A_up=a_mean, A_down=a_mean, gamma_up=g, gamma_down=g, b=0.0)
    elif isinstance(cfg, PowStepDevice):
        changes.update(pow_up_down=0.0)
    elif isinstance(cfg, PiecewiseStepDevice):
        up, down = cfg.piecewise_up, tuple(reversed(cfg.piecewise_down))
        v = tuple(0.5 * (u + d) for u, d in zip(up, down))
        changes.update(piecewise_up=v, piecewise_down=tuple(reversed(v)))
    elif not isinstance(cfg, (ConstantStepDevice, SoftBoundsDevice)):
        raise ConfigError("device", cfg.model, "a device model with a symmetric rule (devices.symmetric)")
    return cfg.replace(**changes)
