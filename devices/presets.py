"""Device presets with aihwkit's numbers (aihwkit 1.2 `simulator/presets/devices.py`).

Every preset is a plain config of one of the basic models; the numbers were checked against the
`device_params` of `/work/shared/reference/device_response/*.json` (aihwkit 1.2.0 as it held them).
"""

from __future__ import annotations

from typing import Callable

from ept_hw.config import check_choice

from .configs import (
    ConstantStepDevice, DeviceConfig, ExpStepDevice, IdealDevice, LinearStepDevice,
    SoftBoundsReferenceDevice,
)

__all__ = ["PRESETS", "preset", "preset_names"]


def ideal() -> DeviceConfig:
    """aihwkit `IdealDevice`: exact float update (no preset class in aihwkit; the ideal baseline)."""
    return IdealDevice()


def reram_es() -> DeviceConfig:
    """aihwkit `ReRamESPresetDevice`: ExpStep fit to Gong et al., Nat. Commun. 9, 2102 (2018)."""
    return ExpStepDevice(
        dw_min=0.00135, up_down=0.259359, w_max=1.0, w_min=-1.0,
        a=-0.5, b=-0.5, gamma_up=5.0, gamma_down=5.0, A_up=-1.18445, A_down=-0.081404,
        dw_min_dtod=0.2, up_down_dtod=0.05, w_max_dtod=0.3, w_min_dtod=0.3,
        dw_min_std=5.0, write_noise_std=75.0,
    )


def reram_sb() -> DeviceConfig:
    """aihwkit `ReRamSBPresetDevice` (1.2: a SoftBoundsReference device): loose SoftBounds fit to
    Gong et al., Nat. Commun. 9, 2102 (2018), symmetry point assumed calibrated away."""
    return SoftBoundsReferenceDevice(
        dw_min=0.002, up_down=0.0, w_max=1.25, w_min=-0.75, mult_noise=False,
        dw_min_dtod=0.3, up_down_dtod=0.01, w_max_dtod=0.3 / 1.25, w_min_dtod=0.3 / 0.75,
        dw_min_std=3.75, write_noise_std=56.0,
    )


def capacitor() -> DeviceConfig:
    """aihwkit `CapacitorPresetDevice`: LinearStep fit to Li et al., VLSI 2018, with leakage
    (`lifetime` 1e6 mini-batches: a tile decays its devices once after every update)."""
    return LinearStepDevice(
        dw_min=0.005, up_down=0.0, w_max=1.0, w_min=-1.0, mult_noise=False,
        gamma_up=0.05, gamma_down=0.05, dw_min_dtod=0.1, up_down_dtod=0.06,
        w_max_dtod=0.07, w_min_dtod=0.07, gamma_up_dtod=0.01, gamma_down_dtod=0.01,
        dw_min_std=0.3, write_noise_std=0.0, mean_bound_reference=True,
        lifetime=1.0e6, lifetime_dtod=0.3,
    )


def ecram() -> DeviceConfig:
    """aihwkit `EcRamPresetDevice`: LinearStep fit to Li-ion ECRAM, Tang et al., IEDM 2018."""
    return LinearStepDevice(
        dw_min=0.002, up_down=0.0, w_max=1.1724, w_min=-0.8276, mult_noise=True,
        gamma_up=0.1153, gamma_down=0.5085, dw_min_dtod=0.1, up_down_dtod=0.01,
        w_max_dtod=0.05, w_min_dtod=0.05, gamma_up_dtod=0.05, gamma_down_dtod=0.05,
        dw_min_std=0.3, write_noise_std=0.0, mean_bound_reference=True,
    )


def ecram_mo() -> DeviceConfig:
    """aihwkit `EcRamMOPresetDevice`: LinearStep fit to metal-oxide ECRAM, Kim et al., IEDM 2019."""
    return LinearStepDevice(
        dw_min=2.8214e-4, up_down=0.0, w_max=1.1714, w_min=-0.8286, mult_noise=True,
        gamma_up=0.4152, gamma_down=0.7342, dw_min_dtod=0.1, up_down_dtod=0.01,
        w_max_dtod=0.05, w_min_dtod=0.05, gamma_up_dtod=0.05, gamma_down_dtod=0.05,
        dw_min_std=2.0, write_noise_std=0.0, mean_bound_reference=True,
    )


def idealized() -> DeviceConfig:
    """aihwkit `IdealizedPresetDevice`: ConstantStep after Gokmen & Vlasov, Front. Neurosci. 2016,
    no d2d asymmetry and 10000 states (Rasch, Gokmen & Haensch, IEEE D&T 2019)."""
    return ConstantStepDevice(
        dw_min=0.0002, dw_min_dtod=0.3, dw_min_std=0.3, up_down=0.0, up_down_dtod=0.0,
        w_max=1.0, w_min=-1.0, w_max_dtod=0.3, w_min_dtod=0.3,
    )


def gokmen_vlasov() -> DeviceConfig:
    """aihwkit `GokmenVlasovPresetDevice`: ConstantStep with the specification of
    Gokmen & Vlasov, Front. Neurosci. 10, 333 (2016), scaled to [-1, 1]."""
    return ConstantStepDevice(
        dw_min=0.0016, dw_min_dtod=0.3, dw_min_std=0.3, up_down=0.0, up_down_dtod=0.01,
        w_max=1.0, w_min=-1.0, w_max_dtod=0.3, w_min_dtod=0.3,
    )


def pcm() -> DeviceConfig:
    """aihwkit `PCMPresetDevice`: ExpStep with complex c2c noise for GST PCM,
    Nandakumar et al., Front. Neurosci. 14, 406 (2020). Uni-directional in aihwkit's use (a pair
    with refresh); here the single device, as aihwkit's pulse response measures it."""
    return ExpStepDevice(
        dw_min=0.01, up_down=0.0, w_max=2.0, w_min=0.0, a=-1.0, b=0.0,
        gamma_up=2.5, gamma_down=2.5, A_up=-27.235, A_down=-2.235,
        dw_min_dtod=0.2, up_down_dtod=0.05, w_max_dtod=0.1, w_min_dtod=0.0,
        dw_min_std=0.6, dw_min_std_add=0.042, dw_min_std_slope=0.108, write_noise_std=0.0,
        reset=0.01, reset_dtod=0.02,
    )


def reram_array_om() -> DeviceConfig:
    """aihwkit `ReRamArrayOMPresetDevice`: SoftBoundsReference fit to the "optimized material"
    ReRAM array of Gong, Rasch et al., IEDM 2022 (corrupt devices off, as aihwkit's default)."""
    return SoftBoundsReferenceDevice(
        enforce_consistency=True, dw_min_dtod_log_normal=True, dw_min=0.0949, up_down=0.0,
        w_max=1.0, w_min=-1.0, mult_noise=False, dw_min_dtod=0.7829, up_down_dtod=0.01,
        w_max_dtod=0.3499, w_min_dtod=0.5695, dw_min_std=0.4158, write_noise_std=1.4113,
        corrupt_devices_range=0.01, corrupt_devices_prob=0.0,
        subtract_symmetry_point=True, reference_std=0.05,
    )


def reram_array_hfo2() -> DeviceConfig:
    """aihwkit `ReRamArrayHfO2PresetDevice`: SoftBoundsReference fit to the "baseline HfO2"
    ReRAM array of Gong, Rasch et al., IEDM 2022 (corrupt devices off, as aihwkit's default)."""
    return SoftBoundsReferenceDevice(
        enforce_consistency=True, dw_min_dtod_log_normal=True, dw_min=0.4622, up_down=0.0,
        w_max=1.0, w_min=-1.0, mult_noise=False, dw_min_dtod=0.7125, up_down_dtod=0.01,
        w_max_dtod=0.4295, w_min_dtod=0.5990, dw_min_std=0.2174, write_noise_std=0.5841,
        corrupt_devices_range=0.01, corrupt_devices_prob=0.0,
        subtract_symmetry_point=True, reference_std=0.05,
    )


PRESETS: dict[str, Callable[[], DeviceConfig]] = {
    "ideal": ideal,
    "reram_es": reram_es,
    "reram_sb": reram_sb,
    "capacitor": capacitor,
    "ecram": ecram,
    "ecram_mo": ecram_mo,
    "gokmen_vlasov": gokmen_vlasov,
    "idealized": idealized,
    "pcm": pcm,
    "reram_array_om": reram_array_om,
    "reram_array_hfo2": reram_array_hfo2,
}


def preset_names() -> list[str]:
    """Names accepted by `preset()` and `load_device()`."""
    return list(PRESETS)


def preset(name: str) -> DeviceConfig:
    check_choice("device", name, PRESETS)
    return PRESETS[name]()
