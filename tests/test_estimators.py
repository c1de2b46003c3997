import math

import pytest
import torch

from ept_hw.config import ConfigError
from ept_hw.estimators import EPEstimator, EstimatorConfig, compare_gradients, nudge_betas, resreg_gradient
from ept_hw.model import EquilibriumTransformer, ModelConfig
from ept_hw.projection import digital_factory
from ept_hw.references import implicit_gradient
from ept_hw.relaxation import SolverConfig

SOLVER = SolverConfig(tol=1e-12, max_steps=3000)
ATTENTION = ("W_Q", "W_K", "W_V", "W_O")


def _setup(resinit=0.1, seed=0, V=12, T=4, C=8, B=2, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    model = EquilibriumTransformer(ModelConfig(vocab_size=V, context=T, width=C, heads=2, resinit=resinit), digital_factory, g, dtype)
    idx = torch.randint(0, V, (B, T), generator=g)
    tg = torch.randint(0, V, (B, T), generator=g)
    return model, idx, tg


@pytest.fixture(scope="module")
def small():
    model, idx, tg = _setup()
    ref = implicit_gradient(model, idx, tg, SOLVER)
    assert ref.free.converged and ref.free.residual_max < 1e-10
    return model, idx, tg, ref


@pytest.fixture(scope="module")
def nonconservative():
    # W_O, W_2 at full scale: strongly non-conservative but still converging
    model, idx, tg = _setup(resinit=1.0, seed=0, V=16, T=8, C=16, B=3)
    ref = implicit_gradient(model, idx, tg, SOLVER)
    assert ref.free.converged and ref.free.residual_max < 1e-10
    return model, idx, tg, ref


def _rel_err(est, ref):
    a = torch.cat(list(est.groups().values()))
    b = torch.cat(list(ref.groups().values()))
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("correction", ["tracking", "frozen"])
def test_ep_with_asym_correction_matches_implicit(nonconservative, correction):
    model, idx, tg, ref = nonconservative
    est = EPEstimator(EstimatorConfig(nudge="centered", beta=1e-3, correction=correction, t2=150, t2sel=0), SOLVER)
    res = est.compute(model, idx, tg, free=ref.free)
    cmp = compare_gradients(res, ref)
    assert set(cmp) >= {"W_Q", "W_K", "W_V", "W_O", "W_1", "W_2", "W_h", "embeddings", "layernorm", "ffn_bias", "qknorm"}
    for group, (cos, ratio) in cmp.items():
        assert cos >= 0.999, (group, cos)
        assert abs(ratio - 1) < 1e-3, (group, ratio)
    # the adjoint itself: a = −J⁻ᵀ ∇ℓ
    assert float((res.adjoint - ref.adjoint).norm() / ref.adjoint.norm()) < 1e-4
    # port shapes: u (B, T, in), δ (B, T, out)
    u, d = res.ports["W_1"]
    assert u.shape == (3, 8, 16) and d.shape == (3, 8, 64)


def test_without_correction_attention_falls_clearly_below(nonconservative):
    model, idx, tg, ref = nonconservative
    plain = EPEstimator(EstimatorConfig(nudge="centered", beta=1e-3, correction="none", t2=150, t2sel=0), SOLVER)
    cmp = compare_gradients(plain.compute(model, idx, tg, free=ref.free), ref)
    for group in ATTENTION:
        assert cmp[group][0] < 0.8, (group, cmp[group])
    assert max(cmp[g][0] for g in ATTENTION) < 0.999 - 0.2
    # W_h's gradient is the direct readout gradient: exact whatever the adjoint
    assert cmp["W_h"][0] > 1 - 1e-12


def _slope(model, idx, tg, ref, nudge, points, betas, jvp="dual"):
    errs = []
    for b in betas:
        cfg = EstimatorConfig(nudge=nudge, points=points, beta=b, correction="tracking", t2=110, t2sel=0, jvp=jvp)
        errs.append(_rel_err(EPEstimator(cfg, SOLVER).compute(model, idx, tg, free=ref.free), ref))
    xs = [math.log(b) for b in betas]
    ys = [math.log(e) for e in errs]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return slope, errs


@pytest.mark.parametrize(
    "nudge,points,betas,order",
    [
        ("one_sided", 2, [1e-3, 3e-3, 1e-2], 1.0),
        ("centered", 2, [1e-2, 3e-2, 1e-1], 2.0),
        ("holomorphic", 3, [0.12, 0.25, 0.5], 3.0),
    ],
)
def test_beta_sweep_order(small, nudge, points, betas, order):
    model, idx, tg, ref = small
    slope, errs = _slope(model, idx, tg, ref, nudge, points, betas)
    assert abs(slope - order) < 0.2, (slope, errs)
    assert max(errs) < 1e-3


def test_beta_sweep_order_secant_centered(small):
    """The secant J v is third-order accurate, so the centered estimate keeps its second order."""
    model, idx, tg, ref = small
    slope, errs = _slope(model, idx, tg, ref, "centered", 2, [1e-2, 3e-2, 1e-1], jvp="secant")
    assert abs(slope - 2.0) < 0.2, (slope, errs)
    assert max(errs) < 1e-3


@pytest.mark.parametrize("nudge", ["centered", "one_sided"])
def test_secant_tracking_matches_implicit_and_dual(nonconservative, nudge):
    model, idx, tg, ref = nonconservative
    res = {}
    for jvp in ("dual", "secant"):
        cfg = EstimatorConfig(nudge=nudge, beta=1e-3, correction="tracking", t2=150, t2sel=0, jvp=jvp)
        res[jvp] = EPEstimator(cfg, SOLVER).compute(model, idx, tg, free=ref.free)
    for group, (cos, ratio) in compare_gradients(res["secant"], ref).items():
        assert cos >= 0.999, (group, cos)
        assert abs(ratio - 1) < 1e-3, (group, ratio)
    e_dual, e_secant = _rel_err(res["dual"], ref), _rel_err(res["secant"], ref)
    assert e_secant < 1e-4 and e_secant < 1.5 * e_dual, (e_secant, e_dual)
    d = res["secant"].diagnostics
    # no dual-number products; one F + backward per nudge step (+ F(z*) once, one-sided)
    assert d["jvp_evals"] == 0 and d["vjp_evals"] == 150 and d["jvp_method"] == "secant"
    assert d["force_evals_nudge"] == (2 * 150 if nudge == "centered" else 150 + 1)


@pytest.mark.slow
def test_beta_sweep_order_holomorphic_four_points(small):
    model, idx, tg, ref = small
    slope, errs = _slope(model, idx, tg, ref, "holomorphic", 4, [0.12, 0.25, 0.5])
    assert abs(slope - 4.0) < 0.25, (slope, errs)


def test_holomorphic_two_points_is_the_centered_pair(small):
    model, idx, tg, ref = small
    a = EPEstimator(EstimatorConfig(nudge="holomorphic", points=2, beta=0.05, t2=30, t2sel=0), SOLVER).compute(model, idx, tg, free=ref.free)
    b = EPEstimator(EstimatorConfig(nudge="centered", beta=0.05, t2=30, t2sel=0), SOLVER).compute(model, idx, tg, free=ref.free)
    assert torch.equal(a.adjoint, b.adjoint)
    betas, weights = nudge_betas(EstimatorConfig(nudge="holomorphic", points=3, beta=0.1))
    assert abs(sum(w * b for w, b in zip(weights, betas)) - 1) < 1e-12  # a picks out the linear term
    assert abs(sum(w * b * b for w, b in zip(weights, betas))) < 1e-12  # ... and cancels the quadratic


def test_snapshot_selection_keeps_smallest_increment_and_beats_short_nudge(nonconservative):
    model, idx, tg, ref = nonconservative
    short = EPEstimator(EstimatorConfig(nudge="centered", beta=1e-3, t2=20, t2sel=0), SOLVER).compute(model, idx, tg, free=ref.free)
    sel = EPEstimator(EstimatorConfig(nudge="centered", beta=1e-3, t2=20, t2sel=60, snapshot_every=5), SOLVER).compute(model, idx, tg, free=ref.free)
    trace = sel.diagnostics["increment_trace"]
    assert [s for s, _ in trace] == list(range(20, 61, 5))
    best_step = min(trace, key=lambda t: t[1])[0]
    assert sel.diagnostics["t2_selected"] == best_step
    e_short, e_sel = _rel_err(short, ref), _rel_err(sel, ref)
    assert e_sel < 0.2 * e_short, (e_sel, e_short)


@pytest.mark.parametrize("jvp", ["dual", "secant"])
def test_reference_recipe_in_float32(small, jvp):
    """Defaults (holomorphic N=2, r=0.02, tracking, T2 20, t2sel 40) in float32 on a converged block.

    The secant J v is a difference of two float32 forces; it must be no less accurate here.
    """
    model64, idx, tg, ref = small
    model32 = EquilibriumTransformer(model64.cfg, digital_factory, torch.Generator().manual_seed(0), torch.float32)
    res = EPEstimator(EstimatorConfig(jvp=jvp), solver=SolverConfig(tol=1e-6, max_steps=1000)).compute(model32, idx, tg)
    assert res.free.converged
    cmp = compare_gradients(res, ref)
    for group, (cos, ratio) in cmp.items():
        assert cos > 0.995, (group, cos)
    d = res.diagnostics
    assert d["force_evals_nudge"] == 2 * 40 and d["vjp_evals"] == 40
    assert d["jvp_evals"] == (40 if jvp == "dual" else 0)


def test_resreg_gradient_matches_finite_differences(small):
    model, idx, tg, ref = small
    eps = 0.1
    g = torch.Generator().manual_seed(9)
    z = ref.free.z + 0.05 * torch.randn(ref.free.z.shape, generator=g, dtype=torch.float64)
    res = resreg_gradient(model, z, idx, eps)
    x_in = model.embed(idx)

    def penalty():
        f = model.force(z, model.embed(idx))
        num = (eps * f).flatten(1).pow(2).sum(1)
        return float((num / (z.flatten(1).pow(2).sum(1) + 1e-8)).mean())

    assert abs(res.penalty - penalty()) < 1e-14
    assert res.penalty > 1e-6
    h = 1e-6
    for name in ("W_Q", "W_O", "W_2"):
        proj = model.projections[name]
        w0 = proj.weight.clone()
        d = torch.randn(w0.shape, generator=g, dtype=torch.float64)
        proj.program(w0 + h * d)
        pp = penalty()
        proj.program(w0 - h * d)
        pm = penalty()
        proj.program(w0)
        fd = (pp - pm) / (2 * h)
        assert abs(float((res.weight_grads[name] * d).sum()) - fd) < 1e-6 * abs(fd) + 1e-12, name
    for name in ("ln1_g", "tok_emb"):
        p0 = model.params[name].clone()
        d = torch.randn(p0.shape, generator=g, dtype=torch.float64)
        model.params[name] = p0 + h * d
        pp = penalty()
        model.params[name] = p0 - h * d
        pm = penalty()
        model.params[name] = p0
        fd = (pp - pm) / (2 * h)
        assert abs(float((res.digital_grads[name] * d).sum()) - fd) < 1e-6 * abs(fd) + 1e-12, name
    del x_in


def test_estimator_config_and_bad_state_errors(small):
    model, idx, tg, ref = small
    with pytest.raises(ConfigError, match="correction"):
        EstimatorConfig(correction="sometimes")
    with pytest.raises(ConfigError, match="points"):
        EstimatorConfig(nudge="centered", points=3)
    with pytest.raises(ConfigError, match="beta"):
        EstimatorConfig(beta=0.0)
    with pytest.raises(ConfigError, match="jvp"):
        EstimatorConfig(jvp="finite")
    with pytest.raises(ConfigError, match="jvp"):
        EstimatorConfig(correction="frozen", jvp="secant")
    with pytest.raises(ConfigError, match="jvp"):
        EstimatorConfig(nudge="holomorphic", points=3, jvp="secant")
    bad = type(ref.free)(**{**ref.free.__dict__, "z": torch.full_like(ref.free.z, float("nan"))})
    with pytest.raises(FloatingPointError, match="NaN"):
        EPEstimator(solver=SOLVER).compute(model, idx, tg, free=bad)
    with pytest.raises(ValueError, match="token ids"):
        EPEstimator(solver=SOLVER).compute(model, idx + 100, tg)
    with pytest.raises(ValueError, match="targets"):
        EPEstimator(solver=SOLVER).compute(model, idx, tg[:1])


@pytest.mark.parametrize("correction", ["frozen", "tracking"])
def test_holomorphic_three_points_with_either_correction(small, correction):
    """N = 3 runs complex; the correction acts on Re and Im parts separately."""
    model, idx, tg, ref = small
    cfg = EstimatorConfig(nudge="holomorphic", points=3, beta=0.1, correction=correction, t2=110, t2sel=0)
    res = EPEstimator(cfg, SOLVER).compute(model, idx, tg, free=ref.free)
    assert _rel_err(res, ref) < 1e-6
    assert res.adjoint.dtype == torch.float64
    plain = EPEstimator(EstimatorConfig(nudge="holomorphic", points=3, beta=0.1, correction="none", t2=110, t2sel=0), SOLVER)
    assert _rel_err(plain.compute(model, idx, tg, free=ref.free), ref) > 100 * _rel_err(res, ref)
