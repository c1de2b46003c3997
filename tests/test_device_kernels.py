"""devices.kernels: every compiled scalar kernel means exactly what its torch rule means."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from devices import (ConstantStepDevice, DeviceArray, ExpStepDevice, LinearStepDevice, PiecewiseStepDevice,
                     PowStepDevice, SoftBoundsDevice, SoftBoundsReferenceDevice)
from devices import kernels
from devices.physics import rule_for

# Configs per rule with kernel: device spreads on, c2c noise on, both noise forms where the rule has two.
CONFIGS = {
    "constant_step": ConstantStepDevice(dw_min=0.01, dw_min_std=0.5),
    "linear_step_mult": LinearStepDevice(dw_min=0.01, gamma_up=0.3, gamma_down=0.6, dw_min_std=0.5,
                                         mean_bound_reference=False),
    "linear_step_add": LinearStepDevice(dw_min=0.01, gamma_up=0.3, gamma_down=0.6, dw_min_std=0.5, mult_noise=False,
                                        allow_increasing=True, gamma_up_dtod=0.5),
    "soft_bounds_mult": SoftBoundsDevice(dw_min=0.01, dw_min_std=0.5),
    "soft_bounds_add": SoftBoundsDevice(dw_min=0.01, dw_min_std=0.5, mult_noise=False),
    "soft_bounds_reference_add": SoftBoundsReferenceDevice(dw_min=0.01, dw_min_std=0.5, reference_std=0.2,
                                                           slope_up_dtod=0.2, slope_down_dtod=0.2),
    "soft_bounds_reference_mult": SoftBoundsReferenceDevice(dw_min=0.01, dw_min_std=0.5, mult_noise=True,
                                                            reference_mean=0.1, subtract_symmetry_point=True),
    "exp_step": ExpStepDevice(dw_min=0.01, dw_min_std=0.5),
    "exp_step_extra_noise": ExpStepDevice(dw_min=0.01, dw_min_std=0.5, dw_min_std_add=0.002, dw_min_std_slope=0.1),
    "pow_step": PowStepDevice(dw_min=0.01, dw_min_std=0.5, pow_gamma=1.7, pow_gamma_dtod=0.3, pow_up_down=0.2,
                              pow_up_down_dtod=0.1),
}
# Rules whose step calls exp or pow: torch's float32 exp/pow (SLEEF, 1-ulp class) and libm's differ
# in the last bit (both within 1 ulp of the true value); the new weight w + Δw may then differ by
# about an ulp of max(|w|, |w + Δw|) (measured here: exp_step 0, pow_step 1.23 units of
# eps·max(|w|, |w + Δw|), on 0.05% of the devices).
ULPS = {"exp_step": 2, "exp_step_extra_noise": 2, "pow_step": 2}


def _draws(cfg, n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    arr = DeviceArray(cfg, (n,), g)
    h = arr.hidden
    lo, hi = arr.pulse_range()
    span = (hi - lo).abs() + 0.1
    w = lo - 0.2 * span + 1.4 * span * torch.rand(n, generator=g)  # inside and outside the range
    up = torch.rand(n, generator=g) < 0.5
    xi = 2.0 * torch.randn(n, generator=g)
    return arr, h, w, up, xi


def test_every_rule_with_a_kernel_is_covered_and_piecewise_has_none():
    assert {type(rule_for(cfg)) for cfg in CONFIGS.values()} == set(kernels.KERNELS)
    assert kernels.kernel_for(rule_for(PiecewiseStepDevice())) is None  # torch path


@pytest.mark.parametrize("noisy", [False, True])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_kernel_equals_torch_rule(name, noisy):
    """One pulse per device through the torch rule (`step`, then `clip`; the direction as the
    exact mode passes it, a float 0/1 mask, and as a bool tensor) and through the kernel: equal bit
    for bit, or within ULPS[name] ulps of the weight where the rule calls exp/pow."""
    cfg = CONFIGS[name]
    arr, h, w, up, xi = _draws(cfg, 20000, seed=len(name))
    rule, noise = arr.rule, (xi if noisy else None)
    kernel = kernels.kernel_for(rule)
    hp, cp = kernels.pack(kernel, cfg, h)
    got = torch.from_numpy(kernels.step_each(kernel, w.numpy(), up.numpy(), None if noise is None else noise.numpy(),
                                             hp, cp, kernel.alt(cfg)))
    for mask in (up.float(), up):
        want = rule.clip(h, w + rule.step(cfg, h, w, mask, noise))
        assert bool(torch.isfinite(want).all())
        moved = (want != w).float().mean()
        assert float(moved) > 0.5  # most devices moved (a few sit at a bound)
        if name in ULPS:
            scale = torch.maximum(w.abs(), want.abs()).clamp_min(torch.finfo(torch.float32).tiny)
            ulp = torch.finfo(torch.float32).eps * scale  # of the larger of the old and new weight
            assert float(((got - want).abs() / ulp).max()) <= ULPS[name]
        else:
            assert torch.equal(got, want), float((got - want).abs().max())


def test_kernel_directions_and_clip_matter():
    """The comparison above is sharp: flipping every direction, or leaving the clip out, changes
    the result (so a kernel with that bug fails it)."""
    cfg = CONFIGS["soft_bounds_reference_add"]
    arr, h, w, up, xi = _draws(cfg, 5000, seed=3)
    kernel = kernels.kernel_for(arr.rule)
    hp, cp = kernels.pack(kernel, cfg, h)
    got = kernels.step_each(kernel, w.numpy(), up.numpy(), xi.numpy(), hp, cp, kernel.alt(cfg))
    flipped = arr.rule.clip(h, w + arr.rule.step(cfg, h, w, ~up, xi)).numpy()
    unclipped = (w + arr.rule.step(cfg, h, w, up, xi)).numpy()
    assert (got != flipped).mean() > 0.6 and (got != unclipped).mean() > 0.3  # (~28% start outside the range)
