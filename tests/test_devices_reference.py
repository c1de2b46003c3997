"""Every preset and basic device class against aihwkit 1.2.0 pulse-response measurements.

Tolerance from `tests/reference/README.md`: mean within 5 % of (w_max − w_min) at every
pulse, spread within 30 % of the reference std (median over pulses), same number of devices.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from devices import load_device, preset_names
from devices.aihwkit_compat import AIHWKIT_PRESET_CLASSES, config_from_aihwkit_params
from devices.response import run_pulse_response

from _shared import REFERENCE as SHARED_REFERENCE


REFERENCE = SHARED_REFERENCE / "device_response"
# Named, not globbed: a missing reference file must fail, not shrink the test.
FILES = [REFERENCE / f"{name}.json" for name in (
    "capacitor", "constant_step_default", "ecram", "ecram_mo", "exp_step_default", "gokmen_vlasov", "idealized",
    "linear_step_default", "pcm", "pow_step_default", "reram_es", "reram_sb", "soft_bounds_default")]
LONG = {"ecram_mo.json", "idealized.json"}   # 28356 and 40000 pulses: several seconds each


def _params(path: Path):
    ref = json.loads(path.read_text())
    return ref, config_from_aihwkit_params(ref["device_class"], ref["device_params"])


@pytest.mark.parametrize("path", [pytest.param(p, id=p.stem, marks=[pytest.mark.slow] if p.name in LONG else [])
                                  for p in FILES])
def test_pulse_response_matches_aihwkit(path):
    ref, cfg = _params(path)
    if ref["device_class"] in AIHWKIT_PRESET_CLASSES:
        assert load_device(ref["name"]) == cfg, "preset numbers differ from aihwkit's"
    resp = run_pulse_response(cfg, n_devices=ref["n_devices"], n_steps=ref["n_steps"],
                              n_loops=ref["n_loops"], seed=1, c2c_samples=0, quantiles=False)
    assert resp.n_steps == ref["n_steps"]  # our default n_steps (granularity) agrees too
    assert np.array_equal(resp.direction, np.array(ref["direction"]))
    span = cfg.w_max - cfg.w_min
    mean_err = np.abs(resp.mean - np.array(ref["mean"])).max() / span
    std_ref = np.array(ref["std"])
    std_err = np.median(np.abs(resp.std - std_ref) / std_ref)
    assert mean_err < 0.05, f"mean off by {mean_err:.3f} of the range"
    assert std_err < 0.30, f"spread off by {std_err:.3f} (median relative)"
    assert abs(resp.w_start_mean - ref["w_start_mean"]) < 0.05 * span


def test_every_reference_preset_is_a_preset():
    names = {json.loads(p.read_text())["name"] for p in FILES}
    presets = names - {n for n in names if n.endswith("_default")}
    assert presets <= set(preset_names())
    assert {"ideal", "reram_es", "reram_sb", "capacitor", "ecram", "ecram_mo", "gokmen_vlasov",
            "idealized", "pcm"} <= set(preset_names())
