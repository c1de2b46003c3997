"""Tests of the free-phase solvers (ept_hw/relaxation.py)."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from ept_hw.config import ConfigError
from ept_hw.relaxation import (
    NonFiniteStateError,
    NotConvergedError,
    RelaxResult,
    SolverConfig,
    dopri5_trajectory,
    one_step_residual,
    relax,
)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def contractive_system(n: int = 6, batch: int = 3, dtype=torch.float64, seed: int = 0):
    """F(z) = -z + 0.6 tanh(z A) + b with ||A||_2 = 1: a contraction, unique fixed point."""
    g = _gen(seed)
    a = torch.randn(n, n, generator=g, dtype=dtype)
    a = a / torch.linalg.matrix_norm(a, ord=2)
    b = torch.randn(batch, n, generator=g, dtype=dtype)

    def force(z):
        return -z + 0.6 * torch.tanh(z @ a) + b

    return force, torch.zeros(batch, n, dtype=dtype)


def transformer_like_system(batch: int = 2, tokens: int = 4, d: int = 8, dtype=torch.float64, seed: int = 1):
    """F(z) = -(z - x) + tanh(z A) B - c z over (B, T, d) states, with a token-mixing term."""
    g = _gen(seed)  # drawn in float64 then cast, so every dtype sees the same system
    x = torch.randn(batch, tokens, d, generator=g, dtype=torch.float64).to(dtype)
    a = (torch.randn(d, 2 * d, generator=g, dtype=torch.float64) / math.sqrt(d)).to(dtype)
    bm = (torch.randn(2 * d, d, generator=g, dtype=torch.float64) / math.sqrt(2 * d)).to(dtype)
    mix = torch.softmax(torch.randn(tokens, tokens, generator=g, dtype=torch.float64), dim=-1).to(dtype)
    c = 0.5

    def force(z):
        return -(z - x) + 0.5 * torch.einsum("st,btd->bsd", mix, torch.tanh(z @ a) @ bm) - c * z

    return force, x.clone()


ALL_METHODS = ("euler", "dopri5", "anderson")


def _tight(method: str, **kw) -> SolverConfig:
    return SolverConfig(method=method, tol=1e-12, max_steps=2000, rtol=1e-10, atol=1e-12, **kw)


@pytest.mark.parametrize("system", [contractive_system, transformer_like_system])
def test_three_solvers_reach_same_fixed_point(system):
    force, z0 = system()
    results = {m: relax(force, z0, _tight(m), require_converged=True) for m in ALL_METHODS}
    ref = results["euler"].z
    assert float(one_step_residual(ref, force(ref), 0.1).max()) <= 1e-12
    for m, r in results.items():
        rel = float(torch.linalg.vector_norm(r.z - ref) / torch.linalg.vector_norm(ref))
        assert rel < 1e-6, (m, rel)
        assert r.residual_max <= 1e-12
        assert r.z.shape == z0.shape and r.z.dtype == z0.dtype
    # Anderson must actually accelerate (dopri5 at rtol 1e-10 is not meant to be cheap)
    assert results["anderson"].n_force_evals < results["euler"].n_force_evals / 3


def test_euler_matches_closed_form_and_per_sample_trace():
    # dz/dt = -a (z - x) per sample: z_k = x + (1 - eps a)^k (z0 - x)
    eps = 0.1
    rates = torch.tensor([0.5, 1.0, 3.0], dtype=torch.float64)
    x = torch.tensor([[1.0, -2.0], [0.5, 0.5], [3.0, 0.0]], dtype=torch.float64)
    z0 = torch.zeros_like(x)

    def force(z):
        return -rates[:, None] * (z - x)

    res = relax(force, z0, SolverConfig(eps=eps, tol=0.0, max_steps=20))
    assert not res.converged and res.n_steps == 20 and res.n_force_evals == 21
    k = torch.arange(21, dtype=torch.float64)[:, None]
    decay = (1 - eps * rates)[None, :] ** k  # (21, 3)
    z_k = x[None] * (1 - decay[..., None])  # (21, 3, 2)
    expected = eps * rates * decay * x.norm(dim=1) / z_k.norm(dim=2).clamp_min(torch.finfo(torch.float64).eps)
    assert res.trace.shape == (21, 3)
    torch.testing.assert_close(res.trace[1:], expected[1:], rtol=1e-12, atol=0)
    torch.testing.assert_close(res.z, z_k[-1], rtol=1e-12, atol=1e-14)
    assert res.sim_time == pytest.approx(2.0)
    # the slow sample (rate 0.5) dominates: the per-sample trace shows it, a global norm would not
    assert int(torch.argmax(res.residual)) == 0
    assert res.residual_max == pytest.approx(float(res.residual[0]))


def test_one_unconverged_sample_blocks_convergence():
    x = torch.ones(4, 3, dtype=torch.float64)
    rates = torch.tensor([2.0, 2.0, 2.0, 0.02], dtype=torch.float64)

    def force(z):
        return -rates[:, None] * (z - x)

    res = relax(force, torch.zeros_like(x), SolverConfig(tol=1e-4, max_steps=200))
    assert not res.converged
    assert float(res.residual[:3].max()) < 1e-8  # three samples are long converged
    assert float(res.residual[3]) > 1e-4
    # the batch-global relative residual would have passed the test
    f = force(res.z)
    global_res = 0.1 * float(f.norm() / res.z.norm())
    assert global_res < float(res.residual[3])


def test_non_convergence_flag_and_exception():
    force, z0 = contractive_system()
    cfg = SolverConfig(tol=1e-10, max_steps=10)
    res = relax(force, z0, cfg)
    assert isinstance(res, RelaxResult)
    assert not res.converged and res.residual_max > 1e-10
    assert res.trace.shape == (11, 3)
    with pytest.raises(NotConvergedError) as info:
        relax(force, z0, cfg, require_converged=True)
    assert info.value.result.residual_max == pytest.approx(res.residual_max)
    for method in ("dopri5", "anderson"):
        with pytest.raises(NotConvergedError):
            relax(force, z0, SolverConfig(method=method, tol=1e-14, max_steps=2), require_converged=True)


def test_min_steps_delays_the_stop():
    force, z0 = contractive_system()
    quick = relax(force, z0, SolverConfig(tol=1e-2))
    delayed = relax(force, z0, SolverConfig(tol=1e-2, min_steps=quick.n_steps + 25))
    assert delayed.converged and delayed.n_steps == quick.n_steps + 25
    dp = relax(force, z0, SolverConfig(method="dopri5", tol=1e-2, min_steps=100))
    assert dp.sim_time >= 100 * 0.1 - 1e-9


@pytest.mark.parametrize("method", ALL_METHODS)
def test_nan_force_raises_naming_the_step(method):
    calls = {"n": 0}

    def force(z):
        calls["n"] += 1
        f = -z + 1.0
        if calls["n"] == 5:
            f = f.clone()
            f[1, 0] = float("nan")
        return f

    with pytest.raises(NonFiniteStateError) as info:
        relax(force, torch.zeros(3, 2), SolverConfig(method=method, tol=1e-12))
    assert "step" in str(info.value) and info.value.bad_samples == [1]
    if method != "dopri5":  # one evaluation per step: the 5th evaluation is at step 4
        assert info.value.step == 4 and "step 4" in str(info.value)


def test_diverging_state_raises_naming_the_step():
    # z grows by a factor 1 + 0.1 * 1e3 = 101 per Euler step: float32 overflows after ~20 steps
    def force(z):
        return 1e3 * z

    with pytest.raises(NonFiniteStateError) as info:
        relax(force, torch.ones(2, 2), SolverConfig(max_steps=100))
    # the force 1e3 * 101^k overflows first
    expected_step = math.ceil(math.log(torch.finfo(torch.float32).max / 1e3) / math.log(101.0))
    assert info.value.step in (expected_step, expected_step + 1)
    assert f"step {info.value.step}" in str(info.value)
    with pytest.raises(NonFiniteStateError):
        relax(lambda z: -z, torch.tensor([[1.0, float("inf")]]), SolverConfig())


@pytest.mark.parametrize(
    "key,value",
    [
        ("method", "rk4"), ("eps", 0.0), ("eps", -0.1), ("tol", -1e-4), ("tol", float("nan")),
        ("max_steps", 0), ("min_steps", -1), ("min_steps", 500), ("rtol", 0.0), ("atol", -1.0),
        ("max_dt", 0.0), ("anderson_m", 0), ("anderson_lam", -1.0), ("anderson_beta", 0.0),
        ("check_every", 0), ("max_steps", 2.5),
    ],
)
def test_bad_config_raises_config_error(key, value):
    with pytest.raises(ConfigError) as info:
        SolverConfig(**{key: value})
    assert info.value.key == key


def test_dopri5_trajectory_matches_solve_ivp():
    solve_ivp = pytest.importorskip("scipy.integrate").solve_ivp
    a = np.array([[-1.0, 2.0, 0.3], [-2.0, -0.5, 0.0], [0.4, 0.1, -0.8]])
    b = np.array([0.5, -1.0, 0.25])

    def rhs_np(t, y):
        return a @ np.tanh(y) + b - 0.2 * y

    at = torch.tensor(a)
    bt = torch.tensor(b)

    def force(z):  # (1, 3)
        return torch.tanh(z) @ at.T + bt - 0.2 * z

    y0 = np.array([1.0, -0.5, 2.0])
    times = [0.3, 1.0, 2.5, 6.0]
    ref = solve_ivp(rhs_np, (0, times[-1]), y0, method="RK45", t_eval=times, rtol=1e-12, atol=1e-14)
    ours = dopri5_trajectory(force, torch.tensor(y0)[None], times, SolverConfig(method="dopri5", rtol=1e-11, atol=1e-13))
    assert ours.shape == (4, 1, 3)
    err = np.abs(ours[:, 0].numpy() - ref.y.T).max()
    assert err < 1e-8, err
    # the solution really moves over these times (a wrong integrator could not pass by staying put)
    assert np.abs(ref.y.T[-1] - y0).max() > 0.5


def test_dopri5_uses_error_control():
    force, z0 = contractive_system()
    # the fixed point is only as accurate as rtol allows, so loose means rtol a little below tol
    loose = relax(force, z0, SolverConfig(method="dopri5", tol=1e-6, rtol=1e-7, atol=1e-10))
    tight = relax(force, z0, SolverConfig(method="dopri5", tol=1e-6, rtol=1e-9, atol=1e-12))
    assert loose.converged and tight.converged
    assert tight.n_force_evals > 2 * loose.n_force_evals


def test_complex_state_euler():
    g = _gen(3)
    x = torch.randn(2, 5, dtype=torch.complex128, generator=g)
    rot = torch.tensor(1.0 + 0.5j, dtype=torch.complex128)
    res = relax(lambda z: -rot * (z - x), torch.zeros_like(x), SolverConfig(tol=1e-12, max_steps=1000))
    assert res.converged and res.z.dtype == torch.complex128
    assert float((res.z - x).abs().max()) < 1e-10
    assert res.residual.dtype == torch.float64


@pytest.mark.parametrize("method", ALL_METHODS)
def test_float32_any_shape(method):
    force, z0 = transformer_like_system(dtype=torch.float32)
    res = relax(force, z0, SolverConfig(method=method, tol=1e-5, max_steps=1000))
    assert res.converged and res.z.dtype == torch.float32 and res.z.shape == (2, 4, 8)
    assert res.residual.shape == (2,) and res.trace.shape[1] == 2
    ref = relax(*transformer_like_system(dtype=torch.float64), _tight("euler"))
    rel = float((res.z.double() - ref.z).norm() / ref.z.norm())
    assert rel < 1e-4


def test_anderson_singular_solve_falls_back_and_reports():
    # a constant force: every residual in the window is the same vector, so the unregularised
    # least-squares matrix is exactly singular; the solver must fall back, not produce NaN
    c = torch.tensor([[1.0, 2.0], [0.0, 1.0]], dtype=torch.float64)
    res = relax(lambda z: c.expand_as(z).clone(), torch.ones(2, 2, dtype=torch.float64),
                SolverConfig(method="anderson", anderson_lam=0.0, tol=1e-12, max_steps=6))
    assert not res.converged
    assert res.n_fallbacks >= 2 * 4  # both samples, iterations 1..5
    assert any("fell back" in n for n in res.notes)
    # plain iteration with eps = 0.1: after 6 steps z = 1 + 0.6 c
    torch.testing.assert_close(res.z, 1.0 + 0.6 * c)


def test_check_every_thins_the_trace():
    force, z0 = contractive_system()
    full = relax(force, z0, SolverConfig(tol=1e-6))
    thin = relax(force, z0, SolverConfig(tol=1e-6, check_every=5))
    assert thin.converged and thin.n_steps % 5 == 0
    assert thin.n_steps >= full.n_steps and thin.n_steps < full.n_steps + 5
    assert thin.trace.shape[0] == thin.n_steps // 5 + 1
    torch.testing.assert_close(thin.trace, full.trace[::5][: thin.trace.shape[0]])


def _model_block(width=16, context=8, batch=2, residual_gain=1.0, qk_gain=1.0, seed=0):
    model_mod = pytest.importorskip("ept_hw.model")
    from ept_hw.projection import digital_factory

    model = model_mod.EquilibriumTransformer(
        model_mod.ModelConfig(width=width, heads=4, context=context), digital_factory, _gen(seed), torch.float64
    )
    for name in ("W_O", "W_2"):
        model.projections[name].program(model.projections[name].weight * residual_gain)
    for name in ("q_norm_g", "k_norm_g"):
        model.params[name] = model.params[name] * qk_gain
    idx = torch.randint(0, model.cfg.vocab_size, (batch, context), generator=_gen(seed + 1))
    x_in = model.embed(idx)
    return (lambda z: model.force(z, x_in)), x_in


def test_solvers_agree_on_the_model_block():
    force, x_in = _model_block()
    results = {m: relax(force, x_in, dataclasses.replace(_tight(m), tol=1e-11), require_converged=True)
               for m in ALL_METHODS}
    ref = results["euler"].z
    for m, r in results.items():
        rel = float(torch.linalg.vector_norm(r.z - ref) / torch.linalg.vector_norm(ref))
        assert rel < 1e-6, (m, rel)


def test_anderson_stall_is_rescued_on_a_non_normal_block():
    # the strong-attention block of bench_solvers, first sample: windowed Anderson (m = 5) creeps at
    # res ~1e-3, 13 % away from z*; the restart/plain-iteration safeguard must still converge
    force, x_in = _model_block(width=32, context=16, batch=4, residual_gain=10.0, qk_gain=1.5)
    res = relax(force, x_in, SolverConfig(method="anderson", tol=1e-4, max_steps=1500))
    assert res.converged
    assert any("restart" in n or "stalled" in n for n in res.notes)
    ref = relax(force, x_in, SolverConfig(tol=1e-9, max_steps=5000), require_converged=True)
    rel = (res.z - ref.z).flatten(1).norm(dim=1) / ref.z.flatten(1).norm(dim=1)
    assert float(rel.max()) < 1e-2
