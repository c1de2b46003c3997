"""Arrays of devices as weight matrices: periphery, pulsed updates, `AnalogProjection`.

Public API::

    TileConfig, IOParameters, UpdateParameters, MappingParameters, MixedPrecisionParameters,
    TransferParameters, RefreshParameters, load_tile_config, save_tile_config, tile_config_from_dict
    tile_preset(device_name, algorithm="sgd", mode="fast"), tile_preset_names()
    tile_for_device(device, algorithm="sgd", mode="fast")   # any device (name, path, dict, config)
    AnalogTile(config, out_features, in_features, generator)
    AnalogProjection(weight, config, generator, name="W"); analog_factory(config, generator)
    analog_read(weights, x, io, generator, stats=None, digital_scale=1.0, compiled=None)
        # compiled=None: numba passes + devices.normals where they apply, else torch (crossbar.io)

AnalogProjection beyond the `Projection` protocol:
    proj.counters() -> {"pulses_max", "pulses_mean", "mvm_reads", "adc_conversions",
                        "adc_clip_fraction", "device_saturation_fraction", "updates",
                        "transfers", "refreshes", "remaps"}
    proj.noise_mode = "fresh" | "common" | "frozen";  proj.set_noise_seed(seed)
        common: call set_noise_seed(s) at the start of each nudged phase with the same s, and
        both phases see the same read noise, read by read; frozen: every read replays the draws
        of seed s; fresh: set_noise_seed is ignored.
    proj.tile: the AnalogTile (weights in device units: proj.tile.slot.weights; scale: proj.tile.scale)
"""

from .config import (ALGORITHMS, NOISE_MODES, MappingParameters, MixedPrecisionParameters, RefreshParameters,
                     TileConfig, TransferParameters, load_tile_config, save_tile_config, tile_config_from_dict)
from .io import IOParameters, ReadStats, analog_read, effective_res, res_from_bits
from .presets import perfect_io, preset_io, preset_update, tile_for_device, tile_preset, tile_preset_names
from .projection import AnalogProjection, analog_factory
from .tile import AnalogTile, DeviceSlot
from .update import UpdateParameters, expected_counts, fast_counts, plan_pulses, sample_counts_per_sample

__all__ = [
    "ALGORITHMS", "NOISE_MODES", "MappingParameters", "MixedPrecisionParameters", "RefreshParameters", "TileConfig",
    "TransferParameters", "load_tile_config", "save_tile_config", "tile_config_from_dict", "IOParameters",
    "ReadStats", "analog_read", "effective_res", "res_from_bits", "perfect_io", "preset_io", "preset_update", "tile_for_device", "tile_preset",
    "tile_preset_names", "AnalogProjection", "analog_factory", "AnalogTile", "DeviceSlot", "UpdateParameters",
    "expected_counts", "fast_counts", "plan_pulses", "sample_counts_per_sample",
]
