"""Tests that fail when the pulse path is wrong (issue 11 item 6).

Every test here goes through the real pulsed update of an `AnalogTile` (never the ideal-device
float shortcut) with a mapping scale s != 1, and compares the realised weight change with its
known expected value:

- in-situ parity: a whole 20-step `compare` run of the tiny model on a noise-free constant-step
  device in expected-value mode tracks the digital twin, every projection;
- mean ΔW = −lr·Σ δuᵀ for a single device, a differential pair and column-wise mapping, under
  both update signs, in each update mode (expected, fast, exact);
- the PCM preset (a real one-sided pair) learns in the requested direction;
- each update algorithm (sgd, mixed_precision, ttv2) against its expected value.

Each of these was checked against a deliberately broken pulse path (scale applied the wrong way,
up/down swapped on a pair, the coincidence sign flipped, MP/TTv2 transfer signs flipped): at least
one test here fails for each (see the lead's report of issue 11 item 6).
"""

from __future__ import annotations

import math

import pytest
import torch

from crossbar import (AnalogTile, MappingParameters, MixedPrecisionParameters, TileConfig, TransferParameters,
                      UpdateParameters, perfect_io, save_tile_config, tile_for_device, tile_preset)
from experiments.presets import load_run_config
from trainer.data import embedded_works
from trainer.loop import build_paths, run
from trainer.metrics import read_metrics
from ept_hw.model import PROJECTION_NAMES

G = 1e-3  # granularity of the noise-free constant-step device of the tile tests


def _constant_step(w_min: float = -1.0, w_max: float = 1.0, dw_min: float = G) -> dict:
    """Noise-free constant-step device: no device-to-device spread, no cycle-to-cycle noise."""
    return {"model": "constant_step", "dw_min": dw_min, "dw_min_dtod": 0.0, "dw_min_std": 0.0, "up_down": 0.0,
            "up_down_dtod": 0.0, "w_max": w_max, "w_min": w_min, "w_max_dtod": 0.0, "w_min_dtod": 0.0}


def _tile_config(device: dict, mode: str, *, omega: float = 0.6, columnwise: bool = False,
                 differential: str = "auto", **extra) -> TileConfig:
    return TileConfig(device=device, forward=perfect_io(), backward=perfect_io(),
                      update=UpdateParameters(desired_bl=1000, mode=mode),
                      mapping=MappingParameters(weight_scaling_omega=omega, weight_scaling_columnwise=columnwise),
                      differential=differential, **extra)


def _problem(seed: int, sign: float, out_f: int = 4, in_f: int = 3, n: int = 6, row_scales=None):
    """(W0, u, δ): a weight matrix far below its mapping bound and a batch whose requested
    update −lr·Σ δuᵀ has the sign `sign` in every element (u ≥ 0, δ of one sign), so both
    update directions are tested element by element."""
    g = torch.Generator().manual_seed(seed)
    w0 = 0.2 * (torch.rand(out_f, in_f, generator=g) - 0.5)
    u = 0.2 + 0.8 * torch.rand(n, in_f, generator=g)
    delta = -sign * (0.2 + 0.8 * torch.rand(n, out_f, generator=g))
    if row_scales is not None:  # rows of very different sizes, updates in proportion (similar pulse counts)
        w0 = w0 * torch.tensor(row_scales).unsqueeze(1)
        delta = delta * torch.tensor(row_scales)
    return w0, u, delta


def _mean_realised(config: TileConfig, w0, u, delta, lr: float, reps: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean realised ΔW (model units) over `reps` updates from the same programmed W0, and the
    tile's scale (to check the mapping is really exercised)."""
    tile = AnalogTile(config, w0.shape[0], w0.shape[1], torch.Generator().manual_seed(seed))
    total = torch.zeros_like(w0, dtype=torch.float64)
    for _ in range(reps):
        tile.program(w0)
        start = tile.weight.clone()
        tile.apply_update(u, delta, lr)
        total += (tile.weight - start).double()
    return (total / reps).float(), tile.scale.clone()


def _lr_for(w0, u, delta, scale: torch.Tensor, net_pulses: float) -> float:
    """The learning rate at which the largest requested change is `net_pulses` device steps."""
    request_dev = (delta.T @ u) / scale
    return float(net_pulses * G / request_dev.abs().max())


# ------------------------------------------------------------------------------------- mean ΔW
@pytest.mark.parametrize("mode,reps,pulses", [("expected", 1, 12.0), ("fast", 300, 12.0), ("fast", 100, 40.0),
                                              ("exact", 150, 12.0)])
@pytest.mark.parametrize("sign", [1.0, -1.0])
@pytest.mark.parametrize("layout", ["single", "pair", "columnwise"])
def test_mean_weight_change_is_the_requested_update(layout, sign, mode, reps, pulses):
    """Mean realised ΔW = −lr·Σ δuᵀ in model units, for s ≠ 1 (one global scale, or one per row),
    single devices and differential pairs, both signs of the update, every update mode (fast
    mode both pulse by pulse, ≤ 16 pulses, and through the integrated n-pulse response, 40)."""
    if layout == "pair":
        device, differential, omega = _constant_step(w_min=0.0, w_max=1.0), "auto", 0.5
    else:
        device, differential, omega = _constant_step(), "single", 0.6
    row_scales = [1.0, 0.05, 0.3, 2.0] if layout == "columnwise" else None
    w0, u, delta = _problem(3, sign, row_scales=row_scales)
    config = _tile_config(device, mode, omega=omega, columnwise=layout == "columnwise", differential=differential)
    assert config.uses_pair == (layout == "pair")
    probe = AnalogTile(config, *w0.shape, torch.Generator().manual_seed(0))
    probe.program(w0)
    scale = probe.scale
    # the mapping really rescales: s far from 1 (and per row very different when column-wise)
    assert float((scale - 1).abs().min()) > 0.5
    if layout == "columnwise":
        assert float(scale.max() / scale.min()) > 10
    lr = _lr_for(w0, u, delta, scale, net_pulses=pulses)
    requested = -lr * (delta.T @ u)
    assert bool((torch.sign(requested) == sign).all())
    mean, _ = _mean_realised(config, w0, u, delta, lr, reps)
    # statistical tolerance: per element ≈ s·G·sqrt(pulses/reps) in the stochastic modes
    rel = float((mean - requested).norm() / requested.norm())
    bound = 1e-4 if mode == "expected" else 0.06
    assert rel <= bound, f"{layout} {mode} sign {sign}: relative error of the mean ΔW {rel:.3g} > {bound}"
    # and element by element in the right direction (a swapped pair or sign flips every element)
    assert bool((torch.sign(mean) == sign).all())


def test_pcm_preset_pair_learns_in_the_requested_direction():
    """The PCM preset (one-sided devices in a differential pair, preset periphery, fast pulses):
    realised ΔW correlates with the request (up/down swapped on the pair gives cosine ≈ −1)."""
    config = tile_preset("pcm")
    assert config.uses_pair
    for sign in (1.0, -1.0):
        w0, u, delta = _problem(5, sign, out_f=6, in_f=5, n=8)
        tile = AnalogTile(config, *w0.shape, torch.Generator().manual_seed(1))
        tile.program(w0)
        g = config.device_config().granularity
        lr = float(8.0 * g / ((delta.T @ u) / tile.scale).abs().max())
        requested = -lr * (delta.T @ u)
        mean, _ = _mean_realised(config, w0, u, delta, lr, reps=40, seed=2)
        cos = float((mean * requested).sum() / (mean.norm() * requested.norm()))
        assert cos > 0.8, f"sign {sign}: cosine of realised vs requested ΔW on the PCM pair {cos:.3f}"
        # the nominal size: the ExpStep up step near G = 0 is larger than the granularity (aihwkit's
        # down step at w = 0), measured 2-3.2x here; a mapping scale applied the wrong way is 100x
        ratio = float(mean.norm() / requested.norm())
        assert 0.2 < ratio < 8.0, f"sign {sign}: realised/requested norm {ratio:.3f} on the PCM pair"


# ---------------------------------------------------------------------------------- algorithms
@pytest.mark.parametrize("layout", ["single", "pair"])
def test_mixed_precision_sends_whole_granules_and_keeps_the_rest(layout):
    """MP (transfer_every = 2): nothing reaches the devices after the first update; after the
    second, each device moves by trunc(χ/g)·g with χ = −lr·Σ δuᵀ/s accumulated over both updates
    (device units), and the weight plus what is left in the accumulator is the exact request."""
    device, differential, omega = ((_constant_step(w_min=0.0), "auto", 0.5) if layout == "pair"
                                   else (_constant_step(), "single", 0.6))
    w0, u, delta = _problem(7, 1.0, n=4)
    delta = delta * torch.tensor([1.0, -1.0, 1.0, -1.0])  # both signs in one matrix
    config = _tile_config(device, "expected", omega=omega, differential=differential, algorithm="mixed_precision",
                          mixed_precision=MixedPrecisionParameters(transfer_every=2))
    tile = AnalogTile(config, *w0.shape, torch.Generator().manual_seed(0))
    tile.program(w0)
    scale = tile.scale
    lr = _lr_for(w0, u, delta, scale, net_pulses=5.3)
    start = tile.weight.clone()
    tile.apply_update(u, delta, lr)
    assert torch.equal(tile.weight, start)  # accumulated only
    tile.apply_update(u, delta, lr)
    chi = -2 * lr * (delta.T @ u) / scale  # device units
    expected = start + torch.trunc(chi / G) * G * scale
    assert torch.allclose(tile.weight, expected, atol=1e-6 * float(scale.max()), rtol=0)
    assert float((tile.weight - start).abs().max()) > 5 * G * float(scale.min())  # it did move


def test_ttv2_transfers_the_fast_array_read_to_the_slow_array():
    """TTv2, one input vector per update, every column read per transfer, perfect periphery,
    transfer_lr 1 unscaled: the fast array A gets ΔA = −lr·δuᵀ/s (device units), the buffer
    gets A's read, and the visible (slow) weights move by sign(A)·g where |A| ≥ g (|A| < 2g
    here, so at most one pulse per device, as with aihwkit's ±1 clamp per transfer)."""
    w0, u, delta = _problem(11, 1.0, out_f=4, in_f=3, n=1)
    delta = delta * torch.tensor([1.0, -1.0, 1.0, -1.0])
    tr = TransferParameters(fast_lr=1.0, transfer_lr=1.0, scale_transfer_lr=False, transfer_every=1,
                            n_reads_per_transfer=3, buffer_granularity=1.0)
    config = _tile_config(_constant_step(), "expected", differential="single", algorithm="ttv2", transfer=tr)
    tile = AnalogTile(config, *w0.shape, torch.Generator().manual_seed(0))
    tile.program(w0)
    scale = tile.scale
    lr = _lr_for(w0, u, delta, scale, net_pulses=1.9)
    start = tile.weight.clone()
    tile.apply_update(u, delta, lr)
    a = -lr * (delta.T @ u) / scale
    assert float(a.abs().min()) < G < float(a.abs().max()) < 2 * G  # some below, some above one granule
    expected = start + torch.sign(a) * (a.abs() >= G) * G * scale
    assert torch.allclose(tile.weight, expected, atol=1e-6 * float(scale.max()), rtol=0)
    assert not torch.equal(tile.weight, start)


# ------------------------------------------------------------------------------ in-situ parity
@pytest.fixture(scope="module")
def parity_run(tmp_path_factory):
    """20 steps of the tiny model, compare mode: noise-free constant-step device (no d2d, no c2c,
    symmetric), perfect periphery, expected-value updates, BL 10⁵ (no update truncation), and
    the preset mapping ω = 0.6 (so W_O and W_2, initialised small, have s ≈ 0.1).

    The device range is ±10 (16× the mapped maximum), not the ±1 the preset rule would pair
    with ω = 0.6: with ±1 the twin's W_2 leaves the representable range ±max|W_2,init|/0.6 at
    step 8 and the W_2 gap reaches 0.34 by step 20 (issue 11, "a fixed mapping scale caps the
    residual branch") — a mapping limit, not a pulse-path error, which this test isolates."""
    out = tmp_path_factory.mktemp("parity")
    tile = tile_for_device(_constant_step(w_min=-10.0, w_max=10.0, dw_min=1e-4), mode="expected")
    tile = tile.replace(mapping=MappingParameters(weight_scaling_omega=0.6),
                        update=UpdateParameters(desired_bl=100_000, mode="expected"))
    save_tile_config(out / "device.toml", tile)
    cfg = load_run_config("tiny", {
        "mode": "compare", "data": {"source": str(embedded_works()["hamlet"][0])},
        "analog": {"device": str(out / "device.toml"), "periphery": "perfect",
                   "tile": {"update": {"mode": "expected"}}},
        "training": {"eval_interval": 20, "stability_every": 0},
    })
    initial = build_paths(cfg)["twin"].model
    w_init = {n: initial.projections[n].weight.clone() for n in PROJECTION_NAMES}
    result = run(cfg, out / "run")
    return cfg, result, w_init


def test_in_situ_parity_with_the_twin(parity_run):
    cfg, result, w_init = parity_run
    assert result.exit_code == 0 and result.steps_completed == cfg.training.steps == 20
    rows = read_metrics(result.run_dir / "metrics.jsonl")
    worst = {n: max(r["weight_gap_per_projection"][n] for r in rows) for n in PROJECTION_NAMES}
    assert max(worst.values()) <= 1e-3, f"relative weight gap per projection {worst}"
    analog = result.paths["analog"].model.projections
    twin = result.paths["twin"].model.projections
    for name in PROJECTION_NAMES:
        tile = analog[name].tile
        # the real pulse path: pulses were counted and the mapping scale is not 1
        assert tile.counters()["pulses_mean"] > 0
        moved = float((twin[name].weight - w_init[name]).norm() / w_init[name].norm())
        gap = float((analog[name].weight - twin[name].weight).norm() / twin[name].weight.norm())
        # the run learned: every projection moved at least 20x further than the analog-twin gap
        assert moved > 20 * gap and moved > 2e-3, f"{name}: moved {moved:.3g}, gap {gap:.3g}"
    for name in ("W_O", "W_2"):  # resinit-shrunk: their mapping scales are far below 1
        assert float(analog[name].tile.scale.max()) < 0.3
    assert not math.isnan(rows[-1]["analog_val_loss"])
