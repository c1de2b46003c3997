"""Device configs: one frozen dataclass per aihwkit pulsed device class, same names and defaults.

A config describes the *distribution* of devices (nominal values and device-to-device spreads);
`devices.array.DeviceArray` samples one realisation per device from an explicit generator.

Names, defaults and meanings follow IBM aihwkit 1.2 (`simulator/configs/devices.py`, the C++
`rpu_*_device.cpp`), summarised in `/work/shared/AIHWKIT_SEMANTICS.md` §1.3–1.4.

Where we deliberately differ from aihwkit
-----------------------------------------
- `drift` (a `DriftParameter` object in aihwkit) is accepted only at its default (no drift);
  `perfect_bias` only False (there is no bias column here). `count_pulses` and
  `construction_seed` are kept for round trips and have no effect (our seed is the generator).
- `lifetime` (decay) and `diffusion` are sampled per device (`decay_scales`, `diffusion_rates`)
  and applied by `DeviceArray.decay()` / `DeviceArray.diffuse()`, which the crossbar's tile calls
  once after every update (aihwkit's `post_update_step` after each mini-batch update); the
  pulse-response protocol applies neither (as aihwkit's pulse response).
- ExpStep granularity: aihwkit's `calcWeightGranularity` computes `(dw_down + dw_down)/2` at w = 0,
  a typo for `(dw_up + dw_down)/2`. We keep aihwkit's value (the down step at w = 0) so that
  pulse counts, `n_steps` and learning-rate scaling agree with aihwkit; the typo is thus
  reproduced on purpose (`ExpStepDevice.granularity`).
- `IdealDevice.granularity` is 0.0 (a float update has no step); its bounds are ±inf.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

from ept_hw.config import ConfigError, check_choice, check_finite_range, from_dict

__all__ = [
    "DeviceConfig",
    "IdealDevice",
    "PulsedDevice",
    "ConstantStepDevice",
    "LinearStepDevice",
    "SoftBoundsDevice",
    "SoftBoundsReferenceDevice",
    "ExpStepDevice",
    "PowStepDevice",
    "PiecewiseStepDevice",
    "DEVICE_MODELS",
    "device_from_dict",
]


@dataclass(frozen=True)
class DeviceConfig:
    """Base of every device config. `model` is the snake-case class name used in TOML files."""

    model: ClassVar[str] = ""
    is_ideal: ClassVar[bool] = False
    uses_write_noise: ClassVar[bool] = False

    @property
    def granularity(self) -> float:  # pragma: no cover - overridden
        raise NotImplementedError

    def to_dict(self) -> dict[str, Any]:
        """`{"model": ..., <every aihwkit parameter>}`; round-trips through `device_from_dict`."""
        out: dict[str, Any] = {"model": self.model}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    def replace(self, **changes: Any) -> "DeviceConfig":
        """A copy with some parameters changed (validated again)."""
        return dataclasses.replace(self, **changes)


def _check_up_down(key: str, value: float, enforce_consistency: bool) -> None:
    """Δ⁺ = (1 + min(up_down, 0))·dw_min, Δ⁻ = (1 − max(up_down, 0))·dw_min at nominal gain.

    |up_down| = 1 makes a nominal step zero (refused). |up_down| > 1 flips the sign of one step:
    aihwkit's `enforce_consistency` (our default too) then takes |Δ|, so the device still moves
    the right way, with a step of |1 − |up_down||·dw_min: accepted with a warning. Without
    `enforce_consistency` a pulse would move the weight the wrong way: refused."""
    if abs(value) == 1.0:
        raise ConfigError(key, value, "a number in (-inf, -1) or (-1, 1) or (1, inf): ±1 makes the nominal "
                                      "down (up) step zero")
    if abs(value) > 1.0:
        if not enforce_consistency:
            raise ConfigError(key, value, "a number in (-1, 1) when enforce_consistency is false (beyond ±1 "
                                          "a pulse would move the weight the wrong way)")
        warnings.warn(f"{key} = {value:g} flips the sign of the nominal {'down' if value > 0 else 'up'} step; "
                      f"enforce_consistency takes |Δ| (as aihwkit), so that step is |1 − |{key}||·dw_min = "
                      f"{abs(1 - abs(value)):g}·dw_min", UserWarning, stacklevel=4)


def _check_zero(key: str, value: float, why: str) -> None:
    if value != 0.0:
        raise ConfigError(key, value, f"0.0 ({why})")


@dataclass(frozen=True)
class IdealDevice(DeviceConfig):
    """aihwkit `IdealDevice`: the update is applied exactly as a float; no bounds, no noise."""

    model: ClassVar[str] = "ideal"
    is_ideal: ClassVar[bool] = True

    construction_seed: int = 0
    diffusion: float = 0.0
    lifetime: float = 0.0
    reset_std: float = 0.01   # aihwkit's field, kept for round trips: an ideal device is never reset

    def __post_init__(self) -> None:
        _check_zero("diffusion", self.diffusion, "the ideal device is exact: no diffusion")
        _check_zero("lifetime", self.lifetime, "the ideal device is exact: no decay")
        check_finite_range("reset_std", self.reset_std, 0.0)

    @property
    def granularity(self) -> float:
        return 0.0

    @property
    def w_min(self) -> float:
        return -math.inf

    @property
    def w_max(self) -> float:
        return math.inf


@dataclass(frozen=True)
class PulsedDevice(DeviceConfig):
    """aihwkit `PulsedDevice` parameters shared by every pulsed model (SEMANTICS §1.3)."""

    construction_seed: int = 0
    corrupt_devices_prob: float = 0.0
    corrupt_devices_range: float = 0.1
    count_pulses: bool = False
    diffusion: float = 0.0
    diffusion_dtod: float = 0.0
    drift: str = "DriftParameter()"
    dw_min: float = 0.001
    dw_min_dtod: float = 0.3
    dw_min_dtod_log_normal: bool = False
    dw_min_std: float = 0.3
    enforce_consistency: bool = True
    lifetime: float = 0.0
    lifetime_dtod: float = 0.0
    perfect_bias: bool = False
    reset: float = 0.0
    reset_dtod: float = 0.0
    reset_std: float = 0.01
    up_down: float = 0.0
    up_down_dtod: float = 0.01
    w_max: float = 0.6
    w_max_dtod: float = 0.3
    w_min: float = -0.6
    w_min_dtod: float = 0.3

    def __post_init__(self) -> None:
        check_finite_range("dw_min", self.dw_min, 0.0, lo_open=True)  # dw_min = 0: no step at all
        for key in ("dw_min_dtod", "dw_min_std", "up_down_dtod", "w_max_dtod", "w_min_dtod",
                    "lifetime", "lifetime_dtod", "reset_std", "reset_dtod", "diffusion_dtod",
                    "corrupt_devices_range"):
            check_finite_range(key, getattr(self, key), 0.0)
        check_finite_range("up_down", self.up_down)
        _check_up_down("up_down", self.up_down, self.enforce_consistency)
        check_finite_range("reset", self.reset)
        check_finite_range("corrupt_devices_prob", self.corrupt_devices_prob, 0.0, 1.0)
        check_finite_range("diffusion", self.diffusion, 0.0)
        check_choice("drift", self.drift, ["DriftParameter()"])
        if self.perfect_bias:
            raise ConfigError("perfect_bias", self.perfect_bias, "false (there is no bias column here)")
        check_finite_range("w_max", self.w_max)
        check_finite_range("w_min", self.w_min)
        if not self.w_min < self.w_max:
            raise ConfigError("w_min", self.w_min, f"a number < w_max = {self.w_max:g}")
        check_finite_range("w_max", self.w_max, 0.0)  # aihwkit: a range not containing 0 is fatal
        check_finite_range("w_min", self.w_min, None, 0.0)

    @property
    def granularity(self) -> float:
        return self.dw_min


@dataclass(frozen=True)
class ConstantStepDevice(PulsedDevice):
    """aihwkit `ConstantStepDevice`: w ± Δ±(1 + σξ), clipped to the device's bounds."""

    model: ClassVar[str] = "constant_step"


def _check_write_noise(cfg: Any) -> None:
    check_finite_range("write_noise_std", cfg.write_noise_std, 0.0)


@dataclass(frozen=True)
class LinearStepDevice(PulsedDevice):
    """aihwkit `LinearStepDevice`: step linear in w, slopes γ±·Δ±/w_ref (SEMANTICS §1.4)."""

    model: ClassVar[str] = "linear_step"
    uses_write_noise: ClassVar[bool] = True

    allow_increasing: bool = False
    apply_write_noise_on_set: bool = True
    gamma_down: float = 0.0
    gamma_down_dtod: float = 0.05
    gamma_up: float = 0.0
    gamma_up_dtod: float = 0.05
    mean_bound_reference: bool = True
    mult_noise: bool = True
    reverse_down: bool = False
    reverse_offset: float = 0.01
    reverse_up: bool = False
    write_noise_std: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_write_noise(self)
        check_finite_range("gamma_up", self.gamma_up)
        check_finite_range("gamma_down", self.gamma_down)
        check_finite_range("gamma_up_dtod", self.gamma_up_dtod, 0.0)
        check_finite_range("gamma_down_dtod", self.gamma_down_dtod, 0.0)
        check_finite_range("reverse_offset", self.reverse_offset)
        if (self.reverse_up or self.reverse_down) and not self.mult_noise:
            raise ConfigError("mult_noise", self.mult_noise, "true when reverse_up or reverse_down is set")


@dataclass(frozen=True)
class SoftBoundsDevice(PulsedDevice):
    """aihwkit `SoftBoundsDevice`: up Δ⁺(1 − w/b_max), down Δ⁻(1 − w/b_min).

    In aihwkit's C++ this is LinearStep with γ = 1, no γ spread and per-device bound references.
    """

    model: ClassVar[str] = "soft_bounds"
    uses_write_noise: ClassVar[bool] = True

    apply_write_noise_on_set: bool = True
    mult_noise: bool = True
    reverse_down: bool = False
    reverse_offset: float = 0.01
    reverse_up: bool = False
    write_noise_std: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_write_noise(self)
        check_finite_range("reverse_offset", self.reverse_offset)
        if (self.reverse_up or self.reverse_down) and not self.mult_noise:
            raise ConfigError("mult_noise", self.mult_noise, "true when reverse_up or reverse_down is set")


@dataclass(frozen=True)
class SoftBoundsReferenceDevice(PulsedDevice):
    """aihwkit `SoftBoundsReferenceDevice`: SoftBounds acting on w + r with a per-device reference r."""

    model: ClassVar[str] = "soft_bounds_reference"
    uses_write_noise: ClassVar[bool] = True

    apply_write_noise_on_set: bool = True
    mult_noise: bool = False
    reference_mean: float = 0.0
    reference_std: float = 0.0
    slope_down_dtod: float = 0.0
    slope_up_dtod: float = 0.0
    subtract_symmetry_point: bool = False
    write_noise_std: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_write_noise(self)
        check_finite_range("reference_mean", self.reference_mean)
        for key in ("reference_std", "slope_down_dtod", "slope_up_dtod"):
            check_finite_range(key, getattr(self, key), 0.0)


@dataclass(frozen=True)
class ExpStepDevice(PulsedDevice):
    """aihwkit `ExpStepDevice`: step 1 − A·exp(±γ z), z = 2w/(b_max − b_min)·a + b.

    `granularity` reproduces aihwkit's `calcWeightGranularity` including its typo (only the down
    step at w = 0 is used), so pulse counts agree with aihwkit; see the module docstring.
    """

    model: ClassVar[str] = "exp_step"
    uses_write_noise: ClassVar[bool] = True

    A_down: float = 0.36833
    A_up: float = 0.00081
    a: float = 0.244
    apply_write_noise_on_set: bool = True
    b: float = 0.2425
    dw_min_std_add: float = 0.0
    dw_min_std_slope: float = 0.0
    gamma_down: float = 12.78785
    gamma_up: float = 12.44625
    write_noise_std: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_write_noise(self)
        for key in ("A_down", "A_up", "a", "b", "gamma_down", "gamma_up", "dw_min_std_add", "dw_min_std_slope"):
            check_finite_range(key, getattr(self, key))

    def step_factors(self, w: float) -> tuple[float, float]:
        """Noise-free (y_up, y_down) at weight w for the nominal bounds."""
        z = 2.0 * w / (self.w_max - self.w_min) * self.a + self.b
        y_up = max(1.0 - self.A_up * math.exp(self.gamma_up * z), 0.0)
        y_down = max(1.0 - self.A_down * math.exp(-self.gamma_down * z), 0.0)
        return y_up, y_down

    @property
    def granularity(self) -> float:
        _, y_down = self.step_factors(0.0)
        scale_down = (1.0 - max(self.up_down, 0.0)) * self.dw_min
        dw_down = scale_down * y_down
        g = max((dw_down + dw_down) / 2.0, 0.0)  # aihwkit's typo (down step twice), kept on purpose
        return g if g > 0 else self.dw_min


@dataclass(frozen=True)
class PowStepDevice(PulsedDevice):
    """aihwkit `PowStepDevice`: up Δ⁺((b_max − w)/R)^γ⁺, down Δ⁻((w − b_min)/R)^γ⁻."""

    model: ClassVar[str] = "pow_step"
    uses_write_noise: ClassVar[bool] = True

    apply_write_noise_on_set: bool = True
    pow_gamma: float = 1.0
    pow_gamma_dtod: float = 0.1
    pow_up_down: float = 0.0
    pow_up_down_dtod: float = 0.0
    write_noise_std: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_write_noise(self)
        check_finite_range("pow_gamma", self.pow_gamma, 0.0)
        check_finite_range("pow_up_down", self.pow_up_down)
        check_finite_range("pow_gamma_dtod", self.pow_gamma_dtod, 0.0)
        check_finite_range("pow_up_down_dtod", self.pow_up_down_dtod, 0.0)

    @property
    def granularity(self) -> float:
        return self.dw_min * 0.5 ** self.pow_gamma


@dataclass(frozen=True)
class PiecewiseStepDevice(PulsedDevice):
    """aihwkit `PiecewiseStepDevice`: step scaled by linear interpolation of node lists over [b_min, b_max]."""

    model: ClassVar[str] = "piecewise_step"
    uses_write_noise: ClassVar[bool] = True

    apply_write_noise_on_set: bool = True
    piecewise_down: tuple[float, ...] = (1.0,)
    piecewise_up: tuple[float, ...] = (1.0,)
    write_noise_std: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_write_noise(self)
        for key in ("piecewise_up", "piecewise_down"):
            nodes = tuple(float(v) for v in getattr(self, key))
            object.__setattr__(self, key, nodes)
            if len(nodes) < 1 or any(not math.isfinite(v) or v < 0 for v in nodes) or max(nodes) == 0:
                raise ConfigError(key, list(nodes), "a non-empty list of finite numbers >= 0, at least one > 0 "
                                                    "(all zero: no step)")
        if len(self.piecewise_up) != len(self.piecewise_down):
            raise ConfigError("piecewise_down", list(self.piecewise_down),
                              f"a list as long as piecewise_up ({len(self.piecewise_up)} nodes)")


DEVICE_MODELS: dict[str, type[DeviceConfig]] = {
    cls.model: cls
    for cls in (IdealDevice, ConstantStepDevice, LinearStepDevice, SoftBoundsDevice,
                SoftBoundsReferenceDevice, ExpStepDevice, PowStepDevice, PiecewiseStepDevice)
}


def device_from_dict(data: Mapping[str, Any]) -> DeviceConfig:
    """Build a config from `{"model": "soft_bounds", "dw_min": 0.002, ...}`; unset keys take aihwkit's defaults."""
    if "model" not in data:
        raise ConfigError("model", None, "one of " + ", ".join(repr(m) for m in DEVICE_MODELS))
    params = dict(data)
    model = params.pop("model")
    check_choice("model", model, DEVICE_MODELS)
    return from_dict(DEVICE_MODELS[model], params)
