import pytest
import torch

from ept_hw.estimators import GradientResult, compare_gradients
from ept_hw.model import EquilibriumTransformer, ModelConfig
from ept_hw.projection import digital_factory
from ept_hw.references import bptt_gradient, implicit_gradient, solve_adjoint
from ept_hw.relaxation import SolverConfig, relax

SOLVER = SolverConfig(tol=1e-13, max_steps=3000)


@pytest.fixture(scope="module")
def block():
    g = torch.Generator().manual_seed(3)
    model = EquilibriumTransformer(ModelConfig(vocab_size=10, context=5, width=8, heads=2, resinit=0.5), digital_factory, g, torch.float64)
    idx = torch.randint(0, 10, (2, 5), generator=g)
    tg = torch.randint(0, 10, (2, 5), generator=g)
    imp = implicit_gradient(model, idx, tg, SOLVER)
    assert imp.free.converged and imp.free.residual_max < 1e-12
    return model, idx, tg, imp


def test_adjoint_solves_the_transposed_system(block):
    model, idx, tg, imp = block
    assert imp.diagnostics["relative_residual"] < 1e-10
    z = imp.free.z.clone().requires_grad_(True)
    (jta,) = torch.autograd.grad(model.force(z, model.embed(idx)), z, imp.adjoint)
    rhs = -model.loss_grad(imp.free.z, tg)
    assert float((jta - rhs).norm() / rhs.norm()) < 1e-10


def test_implicit_matches_bptt_through_a_long_unroll_but_not_a_short_one(block):
    model, idx, tg, imp = block
    long = bptt_gradient(model, idx, tg, steps=imp.free.n_steps + 100, eps=0.1)
    cmp = compare_gradients(long, imp)
    for group, (cos, ratio) in cmp.items():
        assert cos >= 0.999, (group, cos)
        assert abs(ratio - 1) < 1e-6, (group, ratio)
    assert abs(long.loss - imp.loss) < 1e-12
    short = compare_gradients(bptt_gradient(model, idx, tg, steps=5, eps=0.1), imp)
    assert min(cos for cos, _ in short.values()) < 0.99


def test_implicit_gradient_matches_finite_differences_of_the_equilibrium_loss(block):
    """Perturb a weight, re-relax to 1e-13, difference the loss: the IFT gradient must agree."""
    model, idx, tg, imp = block
    g = torch.Generator().manual_seed(11)

    def equilibrium_loss():
        x_in = model.embed(idx)
        with torch.no_grad():
            r = relax(lambda z: model.force(z, x_in), x_in, SOLVER)
        assert r.converged
        return float(model.loss(r.z, tg))

    h = 1e-5
    for name in ("W_Q", "W_V", "W_1"):
        proj = model.projections[name]
        w0 = proj.weight.clone()
        d = torch.randn(w0.shape, generator=g, dtype=torch.float64)
        proj.program(w0 + h * d)
        lp = equilibrium_loss()
        proj.program(w0 - h * d)
        lm = equilibrium_loss()
        proj.program(w0)
        fd = (lp - lm) / (2 * h)
        assert abs(float((imp.weight_grads[name] * d).sum()) - fd) < 1e-6 * abs(fd), name
    p0 = model.params["pos_emb"].clone()
    d = torch.randn(p0.shape, generator=g, dtype=torch.float64)
    model.params["pos_emb"] = p0 + h * d
    lp = equilibrium_loss()
    model.params["pos_emb"] = p0 - h * d
    lm = equilibrium_loss()
    model.params["pos_emb"] = p0
    fd = (lp - lm) / (2 * h)
    assert abs(float((imp.digital_grads["pos_emb"] * d).sum()) - fd) < 1e-6 * abs(fd)


def test_compare_gradients_values():
    est = {"a": torch.tensor([1.0, 0.0]), "b": torch.tensor([2.0, 2.0]), "only_est": torch.ones(3)}
    ref = {"a": torch.tensor([1.0, 1.0]), "b": torch.tensor([1.0, 1.0])}
    out = compare_gradients(est, ref)
    assert set(out) == {"a", "b", "all"}
    assert abs(out["a"][0] - 2 ** -0.5) < 1e-7 and abs(out["a"][1] - 2 ** -0.5) < 1e-7
    assert abs(out["b"][0] - 1) < 1e-7 and abs(out["b"][1] - 2) < 1e-7
    r = GradientResult({}, {"W_Q": torch.ones(2, 2)}, {"tok_emb": torch.ones(3), "pos_emb": torch.ones(1), "ln1_g": torch.ones(2)}, None, None, 0.0)
    groups = r.groups()
    assert set(groups) == {"W_Q", "embeddings", "layernorm"} and groups["embeddings"].numel() == 4


def test_references_reject_bad_states(block):
    model, idx, tg, imp = block
    with pytest.raises(ValueError, match="at least one step"):
        bptt_gradient(model, idx, tg, steps=0, eps=0.1)
    bad = type(imp.free)(**{**imp.free.__dict__, "z": torch.full_like(imp.free.z, float("inf"))})
    with pytest.raises(FloatingPointError, match="NaN or inf"):
        implicit_gradient(model, idx, tg, SOLVER, free=bad)
    with pytest.raises(ValueError, match="token ids"):
        implicit_gradient(model, idx * 0 + 10, tg, SOLVER)
    a, info = solve_adjoint(model, model.embed(idx), imp.free.z, torch.zeros_like(imp.free.z))
    assert float(a.abs().max()) == 0.0


def test_every_estimator_is_one_interface_with_ports_that_sum_to_its_gradient(block):
    """EP, the implicit reference and BPTT all answer `compute(model, idx, targets, free=)` with
    ports (u, δ) whose Σ δuᵀ is the weight gradient, so any of them trains a path through
    `apply_update`; `phases` is what a common-noise wrapper splits the nudge reads by."""
    from ept_hw.estimators import EPEstimator, EstimatorConfig, free_phase
    from ept_hw.ops import outer_product_sum
    from ept_hw.references import BPTTReference, ImplicitReference

    model, idx, tg, _ = block
    solver = SolverConfig(tol=1e-12, max_steps=3000)
    _, fp = free_phase(model, idx, solver)
    estimators = {
        "ep": EPEstimator(EstimatorConfig(nudge="centered", beta=0.01), solver),
        "implicit": ImplicitReference(solver),
        "bptt": BPTTReference(fp.n_steps + 100, 0.1),
    }
    assert [e.phases for e in estimators.values()] == [2, 1, 1]
    results = {name: e.compute(model, idx, tg, free=fp) for name, e in estimators.items()}
    for name, res in results.items():
        assert set(res.ports) == set(res.weight_grads), name
        for proj, (u, d) in res.ports.items():
            dense = outer_product_sum(u.reshape(-1, u.shape[-1]), d.reshape(-1, d.shape[-1]))
            assert torch.allclose(dense, res.weight_grads[proj], rtol=1e-9, atol=1e-12), (name, proj)
    # and they agree on the gradient (long unroll, tight free phase)
    assert compare_gradients(results["ep"], results["implicit"])["all"][0] > 0.999
    assert compare_gradients(results["bptt"], results["implicit"])["all"][0] > 0.9999
