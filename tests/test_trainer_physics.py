"""The noise-aware stop rule of `relax` (`WindowStop`), trainer.analog (common random numbers), jacreg."""

from __future__ import annotations

import math

import pytest
import torch

from ept_hw.relaxation import SolverConfig, WindowStop, relax


def noise_aware_free_phase(force, z0, solver, window=10, patience=30):
    return relax(force, z0, solver, stop=WindowStop(window, patience))


def _linear_force(target, sigma, gen):
    def force(z):
        f = -(z - target)
        if sigma > 0:
            f = f + sigma * torch.randn(z.shape, generator=gen, dtype=z.dtype)
        return f
    return force


def test_noise_free_phase_converges_with_zero_floor():
    gen = torch.Generator().manual_seed(0)
    target = torch.randn(3, 4, 8, generator=gen, dtype=torch.float64)
    fp = noise_aware_free_phase(_linear_force(target, 0.0, gen), torch.zeros_like(target) + 0.1,
                                SolverConfig(tol=1e-6, max_steps=500), window=5, patience=30)
    assert fp.converged and not fp.at_floor
    assert fp.floor_max == 0.0
    assert fp.residual_max <= 1e-6
    assert float((fp.z - target).norm() / target.norm()) < 1e-4
    # the window residual and the returned state, exactly: z_t = target + (1 - eps)^t (z0 - target),
    # res_W = ||z_n - z_{n-W}|| / (W ||mean(z_{n-W+1..n})||) per sample, state = that window mean
    n, w, eps = fp.n_steps, 5, 0.1
    states = [target + (1 - eps) ** t * (0.1 - target) for t in range(n - w, n + 1)]
    mean = torch.stack(states[1:]).mean(dim=0)
    per = lambda t: t.reshape(t.shape[0], -1).norm(dim=1)  # noqa: E731
    expected = per(states[-1] - states[0]) / (w * per(mean))
    assert torch.allclose(fp.residual, expected, rtol=1e-6)
    assert torch.allclose(fp.z, mean, rtol=1e-9, atol=1e-12)


def test_noisy_free_phase_measures_its_floor_and_stops_there():
    gen = torch.Generator().manual_seed(1)
    target = torch.randn(2, 16, 32, generator=gen, dtype=torch.float64)
    sigma, eps = 1e-2, 0.1
    fp = noise_aware_free_phase(_linear_force(target, sigma, gen), target.clone(),
                                SolverConfig(eps=eps, tol=1e-9, max_steps=400), window=10, patience=30)
    n = target[0].numel()
    expected_floor = eps * sigma * math.sqrt(n) / float(target[0].norm())
    assert fp.floor_max == pytest.approx(expected_floor, rel=0.25)
    assert fp.at_floor and not fp.converged  # tol 1e-9 is below the floor: it stops on patience
    assert fp.n_steps < 400
    # the window residual sits well below the raw one-step residual (noise averages down)
    assert fp.residual_max < 0.6 * fp.residual_raw_max
    # the time-averaged state is closer to the fixed point than a single noisy state, whose
    # stationary spread per element is sigma * sqrt(eps / (2 - eps)) (measured ratio: 0.79)
    single = sigma * math.sqrt(eps / (2 - eps)) * math.sqrt(target.numel()) / float(target.norm())
    assert float((fp.z - target).norm() / target.norm()) < 0.9 * single


def test_free_phase_refuses_non_euler():
    with pytest.raises(ValueError, match="Euler"):
        noise_aware_free_phase(lambda z: -z, torch.ones(1, 2), SolverConfig(method="anderson"))


def test_common_noise_gives_the_nudge_blocks_identical_draws():
    from crossbar import AnalogProjection, tile_preset

    from trainer.analog import CommonNoise

    gen = torch.Generator().manual_seed(0)
    cfg = tile_preset("ecram").replace(noise_mode="common")
    weight = torch.randn(6, 5, generator=gen) / 3
    proj = CommonNoise(AnalogProjection(weight, cfg, gen), seed=3)
    x = torch.randn(4, 3, 5, generator=gen)
    stacked = torch.cat([x, x])
    plain = proj.forward(stacked)
    assert float((plain[:4] - plain[4:]).abs().max()) > 1e-3  # fresh draws differ
    proj.blocks = (2, 4)
    common = proj.forward(stacked)
    assert torch.equal(common[:4], common[4:])  # the same noise read by read
    assert float((common[:4] - x @ proj.weight.T).abs().max()) > 1e-3  # ... and it is noise, not none
    back = proj.transpose(torch.cat([plain[:4], plain[:4]]))
    assert torch.equal(back[:4], back[4:])
    proj.blocks = (2, 4)
    other = proj.forward(torch.cat([x, x]))
    assert not torch.equal(other, common)  # a fresh seed per read


def test_the_runs_tile_noise_mode_gives_the_estimate_common_draws():
    """`analog.tile.noise_mode = "common"` (the tile's own setting, overridden by the run) wraps the
    arrays in `CommonNoise` and the EP estimate reads its K stacked phases as K blocks of the same
    draws; "fresh" wraps nothing."""
    from experiments.presets import load_run_config
    from trainer.analog import CommonNoise
    from trainer.config import resolve_vocab
    from trainer.loop import build_paths

    small = {"mode": "compare", "model": {"context": 8, "width": 16, "heads": 2, "ffn_mult": 2},
             "training": {"batch_size": 2, "seq_len": 8}, "solver": {"max_steps": 20}, "estimator": {"t2": 3}}
    for mode in ("common", "fresh"):
        cfg = resolve_vocab(load_run_config("tiny", {**small, "analog": {"device": "ecram", "tile": {"noise_mode": mode}}}), 16)
        path = build_paths(cfg)["analog"]
        proj = path.model.projections["W_O"]
        assert isinstance(proj, CommonNoise) == (mode == "common") == path.common_noise
        if mode == "fresh":
            continue
        seen = []
        read = proj.forward
        proj.forward = lambda u: (seen.append(proj.blocks), read(u))[1]
        idx = torch.randint(0, 16, (2, 8), generator=torch.Generator().manual_seed(0))
        _, fp = path.free_phase(idx)
        path.estimate(idx, idx, fp)
        assert (path.estimator.phases, 2) in seen and None in seen  # nudge blocks set, free phase not


def test_jacreg_update_lowers_the_penalty():
    from ept_hw.model import EquilibriumTransformer
    from ept_hw.projection import digital_factory
    from experiments.presets import load_run_config
    from trainer.stabilisers import Jacreg, PortUpdates, StepContext
    from trainer.controllers import ControllerConfig, JacregController
    from trainer.twin import build_ep_path

    cfg = load_run_config("tiny", {"mode": "ep", "model": {"vocab_size": 20, "width": 16, "heads": 2, "context": 8}, "training": {"seq_len": 8}})
    model = EquilibriumTransformer(cfg.model, digital_factory, torch.Generator().manual_seed(0))
    path = build_ep_path("twin", model, cfg, analog=False, probe_seed=5)
    gen = torch.Generator().manual_seed(2)
    idx = torch.randint(0, 20, (2, 8), generator=gen)
    _, fp = path.free_phase(idx)
    z = fp.z
    v = torch.randn(z.shape, generator=torch.Generator().manual_seed(9))

    def penalty():
        x_in = model.embed(idx)
        with torch.no_grad():
            h = 1e-3
            jv = (model.force(z + h * v, x_in) - model.force(z - h * v, x_in)) / (2 * h) + 2.0 * v
        return float(jv.pow(2).sum() / v.pow(2).sum())

    before = penalty()
    jacreg = Jacreg(JacregController(ControllerConfig(initial=1.0)), cfg.stabilisers.jacreg_fd_step, cfg.model.damping)
    ctx = StepContext(model, path.readout_model, idx, z, cfg.solver.eps, None,
                      torch.Generator().manual_seed(9))  # the probe v above
    part = jacreg.port_update(ctx)
    collected = PortUpdates()
    collected.add(part.ports, part.digital, part.scale)
    out_lr = 0.05
    for name, proj in model.projections.items():
        if name in collected.ports:
            proj.apply_update(*collected.merged(name), out_lr)
    for name, g in collected.digital.items():
        model.params[name].sub_(out_lr * g)
    after = penalty()
    assert after < before - 1e-3 * before  # a step along minus the port-form gradient lowers ||J_nc v||^2


def _tiny_twin():
    from ept_hw.model import EquilibriumTransformer
    from ept_hw.projection import digital_factory
    from experiments.presets import load_run_config
    from trainer.twin import build_ep_path

    cfg = load_run_config("tiny", {"mode": "ep", "model": {"vocab_size": 20, "width": 16, "heads": 2, "context": 8},
                                   "training": {"seq_len": 8}})
    model = EquilibriumTransformer(cfg.model, digital_factory, torch.Generator().manual_seed(0))
    idx = torch.randint(0, 20, (2, 8), generator=torch.Generator().manual_seed(2))
    return cfg, model, build_ep_path("twin", model, cfg, analog=False, probe_seed=5), idx


def test_resreg_stabiliser_is_scaled_to_the_task_update_and_lowers_the_residual():
    from ept_hw.estimators import resreg_gradient
    from trainer.optimisers import SGDSink
    from trainer.stabilisers import PortUpdates, Resreg, StepContext

    cfg, model, path, idx = _tiny_twin()
    _, fp = path.free_phase(idx)
    z = fp.z
    gen = torch.Generator().manual_seed(0)
    # relative: the part's norm (ports and digital gradients, times its scale) is weight x task norm
    part = Resreg(0.2, relative=True).port_update(StepContext(model, path.readout_model, idx, z, 0.1, 3.0, gen))
    acc = PortUpdates()
    acc.add(part.ports, part.digital, part.scale)
    norm2 = sum(float(acc.dense(n).double().pow(2).sum()) for n in acc.ports)
    norm2 += sum(float(g.double().pow(2).sum()) for g in acc.digital.values())
    assert math.sqrt(norm2) == pytest.approx(0.2 * 3.0, rel=1e-4)
    assert Resreg(0.2, relative=True).port_update(StepContext(model, path.readout_model, idx, z, 0.1, None, gen)) is None
    # absolute: a small SGD step along the part lowers the penalty at the same state (taken away
    # from the fixed point, at x_in, where the penalty is not ~0)
    z = model.embed(idx).detach()
    before = resreg_gradient(model, z, idx, 0.1).penalty
    part = Resreg(1.0, relative=False).port_update(StepContext(model, path.readout_model, idx, z, 0.1, None, gen))
    acc = PortUpdates()
    acc.add(part.ports, part.digital, part.scale)
    g2 = sum(float(acc.dense(n).double().pow(2).sum()) for n in acc.ports)
    g2 += sum(float(g.double().pow(2).sum()) for g in acc.digital.values())
    lr = 0.02 * before / g2  # a 2 % first-order decrease
    SGDSink(model, 1.0, ()).apply(acc, {n: acc.dense(n) for n in acc.ports}, lr)
    after = resreg_gradient(model, z, idx, 0.1).penalty
    # the decrease is the first-order one, lr·‖g‖² (a wrong sign or scale misses it)
    assert before - after == pytest.approx(lr * g2, rel=0.2), (before, after, lr * g2)


def test_sgd_sink_applies_minus_lr_times_the_port_sum_and_skips_frozen_groups():
    from trainer.optimisers import SGDSink
    from trainer.stabilisers import PortUpdates

    _, model, _, _ = _tiny_twin()
    gen = torch.Generator().manual_seed(4)
    w0 = model.projections["W_1"].weight.clone()
    u = torch.randn(5, w0.shape[1], generator=gen)
    d = torch.randn(5, w0.shape[0], generator=gen)
    name_ln = next(n for n in model.params if model.param_group(n) == "layernorm")
    name_emb = next(n for n in model.params if model.param_group(n) == "embeddings")
    p_ln, p_emb = model.params[name_ln].clone(), model.params[name_emb].clone()
    acc = PortUpdates()
    acc.add({"W_1": (u[:3], d[:3])}, {name_ln: torch.ones_like(p_ln), name_emb: torch.ones_like(p_emb)})
    acc.add({"W_1": (u[3:], d[3:])}, {}, scale=2.0)
    SGDSink(model, 0.5, ("embeddings",)).apply(acc, {}, 0.1)
    expected = w0 - 0.1 * (d[:3].T @ u[:3] + 2.0 * d[3:].T @ u[3:])
    assert torch.allclose(model.projections["W_1"].weight, expected, atol=1e-6)
    assert torch.allclose(model.params[name_ln], p_ln - 0.1 * 0.5)  # lr x periphery_lr_scale
    assert torch.equal(model.params[name_emb], p_emb)  # frozen


def test_step_cap_warns_for_a_plain_relaxation_but_not_for_a_logged_training_free_phase(caplog):
    """A free phase with the noise-aware stop reports its residual on every metrics row: ending at
    the step cap must not print a warning per step (the demo printed dozens); a plain relaxation
    that ends at the cap still warns."""
    import logging

    rot = torch.tensor([[0.0, -1.0], [1.0, 0.0]])  # a pure rotation: Euler never converges
    force = lambda z: z @ rot.T  # noqa: E731
    z0 = torch.ones(3, 2)
    solver = SolverConfig(method="euler", eps=0.1, tol=1e-8, max_steps=20, min_steps=0)
    with caplog.at_level(logging.INFO, logger="ept_hw.relaxation"):
        r_window = relax(force, z0, solver, stop=WindowStop(window=3, patience=1000))
        window_levels = [rec.levelno for rec in caplog.records]
        caplog.clear()
        r_plain = relax(force, z0, solver)
        plain_levels = [rec.levelno for rec in caplog.records]
    assert not r_window.converged and not r_window.at_floor and not r_plain.converged
    assert window_levels == [logging.INFO]
    assert plain_levels == [logging.WARNING]


def _per_sample_error(z, target):
    return (z - target).reshape(z.shape[0], -1).norm(dim=1) / target.reshape(z.shape[0], -1).norm(dim=1)


def test_floor_rule_stops_when_the_drift_reaches_the_window_noise():
    """`WindowStop(floor_factor=1)` on a noisy linear relaxation started far from its fixed point:
    it stops long before the patience rule, once the deterministic drift ((1 − ε)^t of the start
    offset) is below the noise, and its averaged state is as close to the fixed point."""
    gen = torch.Generator().manual_seed(4)
    target = torch.randn(4, 16, 32, generator=gen, dtype=torch.float64)
    sigma, eps = 1e-2, 0.1
    solver = SolverConfig(eps=eps, tol=1e-9, max_steps=400)
    z0 = target + 0.5 * torch.randn(target.shape, generator=gen, dtype=torch.float64)
    floor = relax(_linear_force(target, sigma, gen), z0, solver, stop=WindowStop(5, 20, floor_factor=1.0))
    patience = relax(_linear_force(target, sigma, gen), z0, solver, stop=WindowStop(5, 20))
    assert floor.at_floor and patience.at_floor
    assert floor.n_steps <= 0.6 * patience.n_steps
    # the start offset has decayed below the noise of a single state (stationary spread per element
    # sigma * sqrt(eps / (2 - eps))): stopping one window earlier would leave it above
    spread = sigma * math.sqrt(eps / (2 - eps)) * math.sqrt(target[0].numel()) / float(target[0].norm())
    drift = (1 - eps) ** floor.n_steps * 0.5 * math.sqrt(target[0].numel()) / float(target[0].norm())
    assert drift < spread
    assert (1 - eps) ** (floor.n_steps - 5) * 0.5 * math.sqrt(target[0].numel()) / float(target[0].norm()) > 0.5 * spread
    err_floor = float(_per_sample_error(floor.z, target).max())
    err_patience = float(_per_sample_error(patience.z, target).max())
    assert err_floor < 1.5 * err_patience  # measured 1.3x: the rule stops once the drift is ~ the noise


@pytest.mark.parametrize("rotation", [0.0, 3.0])
def test_floor_rule_never_fires_on_a_noise_free_relaxation(rotation):
    """Without read noise the window's successive forces differ only by the smooth decay (and the
    rotation of an oscillating mode): the floor rule never fires and the relaxation is unchanged."""
    gen = torch.Generator().manual_seed(5)
    target = torch.randn(3, 8, 2, generator=gen, dtype=torch.float64)
    a = torch.tensor([[1.0, -rotation], [rotation, 1.0]], dtype=torch.float64)  # eigenvalues 1 ± i·rotation

    def force(z):
        return -(z - target) @ a.T

    z0 = target + torch.randn(target.shape, generator=gen, dtype=torch.float64)
    solver = SolverConfig(tol=1e-7, max_steps=600)
    on = relax(force, z0, solver, stop=WindowStop(5, 20, floor_factor=1.0))
    off = relax(force, z0, solver, stop=WindowStop(5, 20))
    assert on.converged and not on.at_floor
    assert on.n_steps == off.n_steps and torch.equal(on.z, off.z)
