"""Statistical parity with aihwkit 1.2.0 (issue 13 item 6), against `tests/reference/parity/`.

The reference was measured by `tests/reference/make_parity.py` (aihwkit's CPU simulator, one
fresh tile per seed); here our simulator runs the same protocol (same weights, inputs, update
stream) with its own seeds. Compared per device preset (forward and transposed reads at the
preset periphery, the programmed weights, the weights after 200 pulsed updates of an open-loop
regression) and per algorithm on reram_sb (weights after the same updates).

Decision rule, per statistic s (mean, std and the 5/25/50/75/95 % quantiles of each
distribution), from the per-seed values a (aihwkit, 10 seeds) and b (ours, 4):
- |mean(b) − mean(a)| ≤ 0.1·σ + z·SE, σ the distribution's standard deviation (aihwkit's,
  averaged over seeds; for the statistic std itself: mean(a), i.e. a 10 % band),
  SE = sqrt(var(a)/n_a + var(b)/n_b) the standard error of the difference over seeds;
- z = Φ⁻¹(1 − α/(2m)), α = 0.01, m = every statistic this module compares: a **Bonferroni**
  correction, so that with exact parity the whole module fails by sampling chance with
  probability ≤ 1 %, and a difference larger than 10 % of a standard deviation (or 10 % in
  spread) fails once the seeds resolve it.
Differences found and kept are listed in `KNOWN` with the reason and where they are documented;
they are reported, not asserted (an unexpected difference fails; so does a known one that has
disappeared, so that the documentation is kept true).
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
from scipy import stats as sps

from _shared import REFERENCE
from crossbar import AnalogTile, MappingParameters, tile_for_device

_spec = importlib.util.spec_from_file_location("make_parity", REFERENCE / "make_parity.py")
mp = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(mp)  # type: ignore[union-attr]

PARITY = REFERENCE / "parity"
OUR_SEEDS = 4
ALPHA, TOL = 0.01, 0.1

# (group, quantity, statistic) -> why it differs and where that is documented
KNOWN: dict[tuple[str, str, str], str] = {}


def _tile(device: str, algorithm: str = "sgd", seed: int = 0, shape=mp.SHAPE) -> AnalogTile:
    """The preset tile as our runs build it, without the mapping scale (aihwkit's tiles have
    none: weights in device units)."""
    cfg = tile_for_device(device, algorithm=algorithm).replace(mapping=MappingParameters())
    return AnalogTile(cfg, shape[0], shape[1], torch.Generator().manual_seed(1000 + seed))


def ours_presets(proto) -> dict[str, list[dict]]:
    out = {}
    for name in mp.PRESETS:
        runs = []
        for seed in range(OUR_SEEDS):
            tile = _tile(name, seed=seed)
            tile.program(proto["w"])
            fwd = torch.stack([tile.forward(proto["x_read"]) for _ in range(mp.READ_REPEATS)])
            bwd = torch.stack([tile.transpose(proto["d_read"]) for _ in range(mp.READ_REPEATS)])
            runs.append({"forward": mp.stats(fwd - proto["x_read"] @ proto["w"].T),
                         "transpose": mp.stats(bwd - proto["d_read"] @ proto["w"]),
                         "programmed": mp.stats(tile.weight - proto["w"])})
        for run, upd in zip(runs, _updates(name, "sgd", proto)):
            run.update(upd)
        out[name] = runs
    return out


def _updates(device: str, algorithm: str, proto) -> list[dict]:
    """The open-loop update stream on OUR_SEEDS independent replicas at once: one tile of
    OUR_SEEDS·out rows (each block of rows its own device samples), every replica fed the same
    x and d (so each sample's update management, which sees max|x| and max|d|, is the
    replica's own); one statistics row per replica."""
    n_out = mp.SHAPE[0]
    tile = _tile(device, algorithm, seed=0, shape=(OUR_SEEDS * n_out, mp.SHAPE[1]))
    tile.program(proto["w"].repeat(OUR_SEEDS, 1))
    for t in range(mp.STEPS):
        tile.apply_update(proto["xs"][t], proto["ds"][t].repeat(1, OUR_SEEDS), mp.LR)
    w = tile.weight
    return [{"weights": mp.stats(w[k * n_out:(k + 1) * n_out] - proto["w_digital"])} for k in range(OUR_SEEDS)]


def ours_algorithms(proto) -> dict[str, list[dict]]:
    return {name: _updates("reram_sb", name, proto) for name in mp.ALGORITHMS}


def compare(ref: dict[str, list[dict]], ours: dict[str, list[dict]], m: int) -> list[dict]:
    """One row per (group, quantity, statistic): the effect, its bound, pass/fail."""
    z = float(sps.norm.ppf(1 - ALPHA / (2 * m)))
    rows = []
    for group, runs in ref.items():
        for quantity in runs[0]:
            sigma = sum(r[quantity]["std"] for r in runs) / len(runs)
            for stat in mp.STATS:
                a = torch.tensor([r[quantity][stat] for r in runs], dtype=torch.float64)
                b = torch.tensor([r[quantity][stat] for r in ours[group]], dtype=torch.float64)
                effect = abs(float(b.mean() - a.mean()))
                se = math.sqrt(float(a.var()) / len(a) + float(b.var()) / len(b))
                scale = float(a.mean()) if stat == "std" else sigma
                bound = TOL * scale + z * se + 1e-7
                rows.append({"group": group, "quantity": quantity, "stat": stat, "aihwkit": float(a.mean()),
                             "ours": float(b.mean()), "effect": effect, "bound": bound, "ok": effect <= bound})
    return rows


def _n_stats(ref: dict[str, list[dict]]) -> int:
    return sum(len(runs[0]) * len(mp.STATS) for runs in ref.values())


def _check(rows: list[dict], capsys=None) -> None:
    failed = {(r["group"], r["quantity"], r["stat"]): r for r in rows if not r["ok"]}
    unexpected = {k: v for k, v in failed.items() if k not in KNOWN}
    gone = [k for k in KNOWN if k[0] in {r["group"] for r in rows} and k not in failed]
    lines = [f"{k}: aihwkit {v['aihwkit']:.4g} ours {v['ours']:.4g} effect {v['effect']:.3g} > bound {v['bound']:.3g}"
             for k, v in unexpected.items()]
    assert not unexpected, "differences from aihwkit:\n" + "\n".join(lines)
    assert not gone, f"known differences no longer measured (update KNOWN and the docstrings): {gone}"


@pytest.fixture(scope="module")
def reference():
    presets = json.loads((PARITY / "presets.json").read_text())
    algos = json.loads((PARITY / "algorithms.json").read_text())
    proto = mp.protocol()
    assert mp.checksum(proto) == pytest.approx(presets["protocol_checksum"], rel=1e-9), \
        "the parity protocol changed (or torch's generator did): regenerate tests/reference/parity"
    m = _n_stats(presets["measured"]) + _n_stats(algos["measured"])
    return presets["measured"], algos["measured"], proto, m


def test_reads_programming_and_updates_match_aihwkit_per_preset(reference):
    presets, _, proto, m = reference
    _check(compare(presets, ours_presets(proto), m))


def test_algorithms_on_reram_sb_match_aihwkit(reference):
    _, algos, proto, m = reference
    _check(compare(algos, ours_algorithms(proto), m))


def _our_pcm_regression(seed: int) -> float:
    proto = mp.pcm_regression_protocol()
    tile = _tile("pcm", seed=seed)
    tile.program(torch.zeros(mp.SHAPE))
    for t in range(mp.PCM_REG_STEPS):
        x = proto["xs"][t]
        tile.apply_update(x, x @ (tile.weight - proto["w_star"]).T, mp.PCM_REG_LR)
    return float(((tile.weight - proto["w_star"]) ** 2).mean())


@pytest.mark.slow
def test_pcm_pair_regression_final_loss_matches_aihwkit():
    """The closed-loop PCM-pair regression of make_parity.py (PCMPreset, refresh every update):
    our final loss (geometric mean over 2 seeds) within a factor 1.5 of aihwkit's (10 tiles).
    Measured (6 seeds): ours 0.916, aihwkit 0.890 (ratio 1.03); with the exact reprogramming this project used before the
    noisy refresh, ours was 0.250 (3.6x lower than aihwkit's)."""
    ref = json.loads((PARITY / "pcm_pair.json").read_text())["regression"]
    assert mp.checksum(mp.pcm_regression_protocol()) == pytest.approx(ref["checksum"], rel=1e-9)
    ours = math.exp(sum(math.log(_our_pcm_regression(s)) for s in range(2)) / 2)
    assert 1 / 1.5 < ours / ref["final_loss_geomean"] < 1.5


@pytest.mark.aihwkit_live
def test_live_parity_with_installed_aihwkit():
    """The preset protocol measured live on the installed aihwkit (3 fresh tiles per preset,
    ecram and pcm) against ours, with the same decision rule (Bonferroni over these statistics)."""
    pytest.importorskip("aihwkit.simulator.tiles", exc_type=ImportError)
    proto = mp.protocol()
    ref = {name: [{**mp.measure_reads(mp._aihwkit_config(name), proto),
                   **mp.measure_updates(mp._aihwkit_config(name), proto)} for _ in range(3)]
           for name in ("ecram", "pcm")}
    ours = {k: v for k, v in ours_presets(proto).items() if k in ref}
    _check(compare(ref, ours, _n_stats(ref)))
