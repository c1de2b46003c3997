"""trainer.fidelity (issue 11 items 2 and 4): realised vs requested updates, analog/twin weight-norm
ratio, the twin's weights outside the analog range, per-projection saturation, as logged by runs."""

from __future__ import annotations

import math

import pytest
import torch

from crossbar import MappingParameters, TileConfig, UpdateParameters, analog_factory, perfect_io
from ept_hw.model import PROJECTION_NAMES, EquilibriumTransformer, ModelConfig
from ept_hw.projection import digital_factory
from experiments.presets import load_run_config
from trainer.config import merge
from trainer.data import embedded_works
from trainer.fidelity import mapping_figures, realised_update, saturation_per_projection
from trainer.loop import run
from trainer.metrics import read_metrics

SMALL = {
    "model": {"context": 8, "width": 16, "heads": 2, "ffn_mult": 2},
    "training": {"steps": 3, "batch_size": 4, "seq_len": 8, "eval_interval": 3, "eval_batches": 1,
                 "checkpoint_interval": 3, "health_interval": 2, "stability_every": 0},
    "solver": {"max_steps": 60},
    "estimator": {"t2": 6, "beta": 3.2},
}


def _cfg(**overrides):
    src = str(embedded_works()["hamlet"][0])
    return load_run_config("tiny", merge(merge(SMALL, {"data": {"source": src}, "mode": "compare"}), overrides))


def _device(bound: float) -> dict:
    return {"model": "constant_step", "dw_min": 1e-3, "dw_min_dtod": 0.0, "dw_min_std": 0.0, "up_down": 0.0,
            "up_down_dtod": 0.0, "w_max": bound, "w_min": -bound, "w_max_dtod": 0.0, "w_min_dtod": 0.0}


def test_ideal_arrays_realise_exactly_what_was_requested(tmp_path):
    """Ideal devices, perfect periphery: realised = requested (ratio 1, cosine 1) every step and
    projection; the logged probe figures: norm ratio 1, nothing outside the (unbounded) range."""
    result = run(_cfg(analog={"device": "ideal", "periphery": "perfect"}), tmp_path / "run")
    rows = read_metrics(result.run_dir / "metrics.jsonl")
    assert len(rows) == 3
    for r in rows:
        assert r["twin_realised_ratio"] is None and r["twin_realised_cos"] is None
        for name in PROJECTION_NAMES:
            assert r["analog_realised_ratio"][name] == pytest.approx(1.0, abs=1e-4), (r["step"], name)
            assert r["analog_realised_cos"][name] == pytest.approx(1.0, abs=1e-6), (r["step"], name)
    probed = [r for r in rows if r["weight_norm_ratio"] is not None]
    assert [r["step"] for r in probed] == [1, 2]  # health probe at step 1, and the last step
    for r in probed:
        assert all(v == pytest.approx(1.0, abs=1e-4) for v in r["weight_norm_ratio"].values())
        assert all(v == 0.0 for v in r["twin_out_of_range"].values())
        assert all(v == 0.0 for v in r["analog_saturation_per_projection"].values())
    assert rows[0]["weight_norm_ratio"] is None
    # exact reads: the on-chip resreg (window-averaged force through the arrays) is the exact-weight one
    probes = [r for r in rows if r["analog_resreg_cos"] is not None]
    assert [r["step"] for r in probes] == [1] and rows[1]["twin_resreg_cos"] is None
    assert probes[0]["analog_resreg_cos"] > 0.95 and 0.7 < probes[0]["analog_resreg_norm_ratio"] < 1.4, probes[0]
    from experiments.report import write_report

    report = write_report(result.run_dir).read_text()
    assert "## Realised updates and mapping (analog path)" in report and "plots/realised_updates.png" in report
    assert "| W_2 | 1.0000 | 1.0000 | 1.0000 | 0.0% | 0.0% |" in report
    assert "Warning: weight collapse" not in report and "### Work per training step" in report


def test_realised_update_sees_clipping_at_the_bounds():
    """A tile at its bound realises nothing of a request that pushes further, all of one that pulls back."""
    cfg = TileConfig(device=_device(1.0), forward=perfect_io(), backward=perfect_io(),
                     update=UpdateParameters(desired_bl=5000, mode="expected"),
                     mapping=MappingParameters(weight_scaling_omega=1.0))
    build = analog_factory(cfg, torch.Generator().manual_seed(0))
    proj = build("W", torch.full((4, 6), 0.5))  # max rule, ω = 1: every device at its upper bound
    u, d = torch.ones(2, 6), torch.ones(2, 4)
    for sign, ratio in ((-1.0, 0.0), (1.0, 1.0)):  # −: pushes W up (clipped), +: pulls W down
        before = {"W": proj.weight.clone()}
        proj.apply_update(u, sign * d, 0.01)
        requested = {"W": -0.01 * sign * (d.T @ u)}
        r, c = realised_update(before, {"W": proj.weight}, requested)
        assert r["W"] == pytest.approx(ratio, abs=2e-3)
        if ratio > 0:
            assert c["W"] == pytest.approx(1.0, abs=1e-6)


def test_mapping_figures_count_the_twin_weights_the_arrays_cannot_hold():
    cfg = ModelConfig(vocab_size=12, context=4, width=8, heads=2, ffn_mult=2)
    tile = TileConfig(device=_device(1.0), forward=perfect_io(), backward=perfect_io(),
                      mapping=MappingParameters(weight_scaling_omega=0.6))  # the "max" rule
    analog = EquilibriumTransformer(cfg, analog_factory(tile, torch.Generator().manual_seed(1)),
                                    torch.Generator().manual_seed(3))
    twin = EquilibriumTransformer(cfg, digital_factory, torch.Generator().manual_seed(3))
    w2 = twin.projections["W_2"].weight.clone()
    twin.projections["W_2"].program(3.0 * w2)
    fig = mapping_figures(analog, twin)
    # the analog W_2 can hold ±max|W_2,init|/ω (device bounds ±1): count the grown twin's entries beyond it
    expected = float(((3.0 * w2).abs() > w2.abs().max() / 0.6).double().mean())
    assert 0.05 < expected < 0.95
    assert fig["twin_out_of_range"]["W_2"] == pytest.approx(expected)
    assert fig["weight_norm_ratio"]["W_2"] == pytest.approx(1 / 3, rel=1e-5)
    for name in PROJECTION_NAMES:
        if name != "W_2":
            assert fig["twin_out_of_range"][name] == 0.0
            assert fig["weight_norm_ratio"][name] == pytest.approx(1.0, rel=1e-5)
    assert saturation_per_projection(twin) is None
    assert set(saturation_per_projection(analog)) == set(PROJECTION_NAMES)


# ------------------------------------------------------------------------------ resreg (issue 11 item 1)
def _digital_context(source_force_sign: float, health: bool = True):
    from ept_hw.estimators import free_phase
    from ept_hw.relaxation import SolverConfig, WindowStop
    from trainer.stabilisers import StepContext

    cfg = ModelConfig(vocab_size=12, context=6, width=8, heads=2, ffn_mult=2)
    model = EquilibriumTransformer(cfg, digital_factory, torch.Generator().manual_seed(4))
    idx = torch.randint(0, 12, (3, 6), generator=torch.Generator().manual_seed(5))
    x_in, fp = free_phase(model, idx, SolverConfig(tol=1e-3, max_steps=12), WindowStop(4, 5))
    f_exact = model.force(fp.z, x_in)
    ctx = StepContext(model, lambda: model, idx, fp.z, 0.1, 1.0, torch.Generator().manual_seed(6),
                      force=source_force_sign * f_exact, analog=True, health=health)
    return ctx, fp


def test_resreg_sources_and_their_agreement_figure():
    """On exact reads with the exact force handed in as the window force, the on-chip estimate is the
    exact-weight one (cos 1, ratio 1); a force of the wrong sign gives cos −1; "readout" is the
    exact-weight gradient itself and its ports are what gets applied."""
    from ept_hw.estimators import resreg_gradient
    from trainer.stabilisers import Resreg

    ctx, fp = _digital_context(1.0)
    assert fp.force_mean is not None and fp.force_mean.shape == fp.z.shape
    for source in ("readout", "arrays"):
        part = Resreg(0.2, relative=False, source=source).port_update(ctx)
        assert part.figures["resreg_cos"] == pytest.approx(1.0, abs=1e-6)
        assert part.figures["resreg_norm_ratio"] == pytest.approx(1.0, abs=1e-5)
    ref = resreg_gradient(ctx.model, ctx.z, ctx.idx, ctx.eps)
    part = Resreg(0.2, relative=False, source="readout").port_update(ctx)
    for name, (u, d) in ref.ports.items():
        torch.testing.assert_close(part.ports[name][1], d)
    wrong, _ = _digital_context(-1.0)
    part = Resreg(0.2, relative=False, source="arrays").port_update(wrong)
    assert part.figures["resreg_cos"] == pytest.approx(-1.0, abs=1e-6)
    quiet, _ = _digital_context(1.0, health=False)
    assert Resreg(0.2, relative=False).port_update(quiet).figures == {}


def test_window_force_is_the_drift_the_stop_rule_measures():
    """force_mean = (z_last − z_first)/(W ε) over the window, i.e. the mean of the W forces of the
    Euler steps: close to F at the window-mean state once the dynamics is slow."""
    ctx, fp = _digital_context(1.0)
    f_at_mean = ctx.model.force(fp.z, ctx.model.embed(ctx.idx))
    ratio = float(fp.force_mean.norm() / f_at_mean.norm())
    cos = float(torch.nn.functional.cosine_similarity(fp.force_mean.flatten(), f_at_mean.flatten(), dim=0))
    assert cos > 0.95 and 0.7 < ratio < 1.4, (cos, ratio)


def test_report_shows_realised_updates_and_warns_of_a_collapse(tmp_path):
    from experiments.report import fidelity_section

    from trainer.metrics import empty_row

    rows = []
    for step in range(3):
        r = empty_row(step)
        r["analog_realised_ratio"] = {"W_O": 0.3, "W_2": 1.0}
        r["analog_realised_cos"] = {"W_O": 0.8, "W_2": 0.99}
        r["weight_norm_ratio"] = {"W_O": 0.9, "W_2": 0.45 if step == 2 else 1.0}
        r["twin_out_of_range"] = {"W_O": 0.0, "W_2": 0.12}
        rows.append(r)
    text = "\n".join(fidelity_section(rows, {"free phase": (3e6, 1e6)}, 1234.0))
    assert "Warning: weight collapse" in text and "W_2: the analog weights are 0.45×" in text
    assert "W_O: the analog" not in text
    assert "| W_2 | 1.0000 | 0.9900 | 0.4500 | 12.0% |" in text
    assert "25% of all work" in text and "1,234" in text
    rows[-1]["weight_norm_ratio"]["W_2"] = 0.55  # inside [0.5, 2]: no warning
    assert "collapse" not in "\n".join(fidelity_section(rows))


def test_work_per_step_counts_the_correction_and_the_readout_assists():
    from trainer.fidelity import force_work, work_per_step

    cfg = {"model": {"context": 16, "width": 32, "heads": 2, "ffn_mult": 2, "vocab_size": 65},
           "training": {"batch_size": 16}, "estimator": {"nudge": "centered", "correction": "tracking", "jvp": "dual"},
           "stabilisers": {"resreg": 0.2, "resreg_source": "readout", "jacreg_on": True}}
    a1, d1 = force_work(cfg["model"], 1)
    assert a1 == 16 * (4 * 32 * 32 + 2 * 32 * 64)  # six projection reads per token
    assert d1 > 2 * 16 * 16 * 32  # at least attention's two activation products
    parts = work_per_step(cfg, free_steps=50, nudge_steps=10)
    aF, dF = force_work(cfg["model"], 16)
    assert parts["free phase"] == (52 * aF, 52 * dF)
    assert parts["AsymEP correction (J v, Jᵀ v)"] == (10 * 4 * aF, 10 * 5 * dF)
    assert parts["resreg"] == (0.0, 2 * aF + 3 * dF)  # the read-out copy: all digital
    assert parts["jacreg (read-out copy)"][0] == 0.0
    on_chip = work_per_step({**cfg, "stabilisers": {**cfg["stabilisers"], "resreg_source": "arrays"}}, 50, 10)
    assert on_chip["resreg"] == (2 * aF, 3 * dF)
    with_eig = work_per_step({**cfg, "stabilisers": {**cfg["stabilisers"], "eigreg": {"weight": 0.1, "iters": 2,
                                                                                      "block": 3}}}, 50, 10)
    a1, d1 = force_work(cfg["model"], 1)
    assert with_eig["eigreg (read-out copy)"] == (0.0, 6 * (4 * a1 + 5 * d1))
    W = 4 * 32 * 32 + 2 * 32 * 64 + 65 * 32
    assert parts["update (pulsed outer products)"] == (256 * W, 0.0)  # sgd: R = 16·16 token rows into the arrays
    mp = work_per_step({**cfg, "tile": {"algorithm": "mixed_precision"}}, 50, 10)
    assert mp["update (mixed precision: digital χ += lr·δuᵀ, threshold check)"] == (0.0, 256 * W + W)
    tt = work_per_step({**cfg, "tile": {"algorithm": "c_ttv2"}}, 50, 10)
    assert tt["update (pulsed onto the fast array; transfer buffer)"] == (256 * W, W)
    twin = work_per_step(cfg, 50, 10, analog=False)
    assert all(a == 0.0 for a, _ in twin.values())
    assert sum(d for _, d in twin.values()) == pytest.approx(sum(a + d for a, d in parts.values()))
