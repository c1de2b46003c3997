"""trainer.physics (noise-aware free phase), trainer.analog (common random numbers), jacreg."""

from __future__ import annotations

import math

import pytest
import torch

from ept_hw.relaxation import SolverConfig
from trainer.physics import noise_aware_free_phase



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
    assert fp.result.converged and not fp.at_floor
    assert fp.floor == 0.0
    assert fp.residual <= 1e-6
    assert float((fp.result.z - target).norm() / target.norm()) < 1e-4


def test_noisy_free_phase_measures_its_floor_and_stops_there():
    gen = torch.Generator().manual_seed(1)
    target = torch.randn(2, 16, 32, generator=gen, dtype=torch.float64)
    sigma, eps = 1e-2, 0.1
    fp = noise_aware_free_phase(_linear_force(target, sigma, gen), target.clone(),
                                SolverConfig(eps=eps, tol=1e-9, max_steps=400), window=10, patience=30)
    n = target[0].numel()
    expected_floor = eps * sigma * math.sqrt(n) / float(target[0].norm())
    assert fp.floor == pytest.approx(expected_floor, rel=0.25)
    assert fp.at_floor and not fp.result.converged  # tol 1e-9 is below the floor: it stops on patience
    assert fp.steps < 400
    # the window residual sits well below the raw one-step residual (noise averages down)
    assert fp.residual < 0.6 * fp.residual_raw
    # the time-averaged state is closer to the fixed point than a single noisy state, whose
    # stationary spread per element is sigma * sqrt(eps / (2 - eps)) (measured ratio: 0.79)
    single = sigma * math.sqrt(eps / (2 - eps)) * math.sqrt(target.numel()) / float(target.norm())
    assert float((fp.result.z - target).norm() / target.norm()) < 0.9 * single


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


def test_jacreg_update_lowers_the_penalty():
    from ept_hw.model import EquilibriumTransformer, ModelConfig
    from ept_hw.projection import digital_factory
    from trainer.config import RunConfig, load_run_config
    from trainer.twin import EPPath, _Ports

    cfg = load_run_config("tiny", {"mode": "ep", "model": {"vocab_size": 20, "width": 16, "heads": 2, "context": 8}, "training": {"seq_len": 8}})
    model = EquilibriumTransformer(cfg.model, digital_factory, torch.Generator().manual_seed(0))
    path = EPPath("twin", model, cfg, analog=False, probe_seed=5)
    gen = torch.Generator().manual_seed(2)
    idx = torch.randint(0, 20, (2, 8), generator=gen)
    _, fp = path.free_phase(idx)
    z = fp.result.z
    v = torch.randn(z.shape, generator=torch.Generator().manual_seed(9))

    def penalty():
        x_in = model.embed(idx)
        with torch.no_grad():
            h = 1e-3
            jv = (model.force(z + h * v, x_in) - model.force(z - h * v, x_in)) / (2 * h) + 2.0 * v
        return float(jv.pow(2).sum() / v.pow(2).sum())

    before = penalty()
    path.probe_generator = torch.Generator().manual_seed(9)  # the probe v above
    ports, digital = path._jacreg(idx, z, lam=1.0)
    collected = _Ports()
    collected.add(ports, digital)
    out_lr = 0.05
    for name, proj in model.projections.items():
        if name in collected.ports:
            proj.apply_update(*collected.merged(name), out_lr)
    for name, g in collected.digital.items():
        model.params[name].sub_(out_lr * g)
    after = penalty()
    assert after < before - 1e-3 * before  # a step along minus the port-form gradient lowers ||J_nc v||^2
