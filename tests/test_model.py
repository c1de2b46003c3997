import math

import pytest
import torch
import torch.autograd.forward_ad as fwAD

from ept_hw.config import ConfigError
from ept_hw.model import EquilibriumTransformer, ModelConfig, gelu_tanh, layer_norm, softmax_ratio
from ept_hw.ops import PortRecorder, all_finite
from ept_hw.projection import DigitalProjection, digital_factory

CFG = ModelConfig(vocab_size=11, context=6, width=8, heads=2)


def _model(seed=0, cfg=CFG, dtype=torch.float64, factory=digital_factory):
    return EquilibriumTransformer(cfg, factory, torch.Generator().manual_seed(seed), dtype)


def _batch(seed=1, B=2, T=6, V=11):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, V, (B, T), generator=g), torch.randint(0, V, (B, T), generator=g)


def test_config_validation_names_key():
    with pytest.raises(ConfigError, match="heads"):
        ModelConfig(width=10, heads=4)
    with pytest.raises(ConfigError, match="damping"):
        ModelConfig(damping=-0.5)
    with pytest.raises(ConfigError, match="qknorm"):
        ModelConfig(qknorm="yes")
    with pytest.raises(ConfigError, match="dtype"):
        EquilibriumTransformer(CFG, digital_factory, torch.Generator(), torch.float16)


def test_same_seed_gives_identical_twins_and_resinit_scales():
    a, b, c = _model(0), _model(0), _model(1)
    for name in a.projections:
        assert torch.equal(a.projections[name].weight, b.projections[name].weight)
    assert not torch.equal(a.projections["W_Q"].weight, c.projections["W_Q"].weight)
    for name in a.params:
        assert torch.equal(a.params[name], b.params[name])
    # W_O is drawn at resinit (0.1) x the default scale 1/sqrt(C): its rms is about 0.1/sqrt(8)
    rms = float(a.projections["W_O"].weight.pow(2).mean().sqrt())
    assert 0.5 * 0.1 / math.sqrt(8) < rms < 1.6 * 0.1 / math.sqrt(8)


def test_force_at_zero_block_is_clamp_and_damping():
    m = _model()
    for p in m.projections.values():
        p.program(torch.zeros_like(p.weight))
    idx, _ = _batch()
    x = m.embed(idx)
    z = torch.randn(x.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    # with every projection zero, F = -(z - x) - c z exactly (biases are zero at init)
    assert torch.allclose(m.force(z, x), x - 2.0 * z, atol=1e-14)
    assert torch.allclose(m.embed(idx), m.params["tok_emb"][idx] + m.params["pos_emb"], atol=0)


def test_jacobian_products_match_finite_differences_and_are_adjoint():
    m = _model()
    idx, _ = _batch()
    x = m.embed(idx)
    g = torch.Generator().manual_seed(4)
    z = x + 0.3 * torch.randn(x.shape, generator=g, dtype=torch.float64)
    v = torch.randn(x.shape, generator=g, dtype=torch.float64)
    w = torch.randn(x.shape, generator=g, dtype=torch.float64)
    with fwAD.dual_level():
        jv = fwAD.unpack_dual(m.force(fwAD.make_dual(z, v), x)).tangent
    h = 1e-5
    fd = (m.force(z + h * v, x) - m.force(z - h * v, x)) / (2 * h)
    assert float((fd - jv).norm() / jv.norm()) < 1e-8
    zr = z.clone().requires_grad_(True)
    (jtw,) = torch.autograd.grad(m.force(zr, x), zr, w)
    lhs, rhs = float((w * jv).sum()), float((jtw * v).sum())
    assert abs(lhs - rhs) < 1e-12 * abs(lhs)
    # the block is non-conservative: J is far from symmetric
    with fwAD.dual_level():
        jw = fwAD.unpack_dual(m.force(fwAD.make_dual(z, w), x)).tangent
    (jtv,) = torch.autograd.grad(m.force(zr, x), zr, v)
    assert abs(float((w * jv).sum()) - float((v * jw).sum())) > 1e-3 * abs(float((w * jv).sum()))
    del jtv


class _CountingProjection(DigitalProjection):
    """Counts reads and makes the transposed read distinguishable (scaled by 2)."""

    def __init__(self, weight, name):
        super().__init__(weight, name)
        self.n_forward = 0
        self.n_transpose = 0

    def forward(self, u):
        self.n_forward += 1
        return super().forward(u)

    def transpose(self, d):
        self.n_transpose += 1
        return 2.0 * super().transpose(d)


def test_jacobian_products_are_reads_of_the_projection():
    m = _model(factory=lambda n, w: _CountingProjection(w, n))
    idx, _ = _batch()
    x = m.embed(idx)
    z = x.clone().requires_grad_(True)
    f = m.force(z, x)
    assert [m.projections[n].n_forward for n in ("W_Q", "W_K", "W_V", "W_O", "W_1", "W_2")] == [1] * 6
    torch.autograd.grad(f, z, torch.ones_like(f))
    assert [m.projections[n].n_transpose for n in ("W_Q", "W_K", "W_V", "W_O", "W_1", "W_2")] == [1] * 6
    assert m.projections["W_h"].n_transpose == 0
    with fwAD.dual_level():
        fwAD.unpack_dual(m.force(fwAD.make_dual(x, torch.ones_like(x)), x))
    # the tangent is read through forward too: one primal and one tangent read per projection
    assert m.projections["W_Q"].n_forward == 3
    # a doubled transposed read doubles the contribution of the path through W_O in Jᵀ v:
    # compare with an exact model; they must differ (the backward really used `transpose`)
    exact = _model()
    ze = x.clone().requires_grad_(True)
    (ge,) = torch.autograd.grad(exact.force(ze, x), ze, torch.ones_like(x))
    zc = x.clone().requires_grad_(True)
    (gc,) = torch.autograd.grad(m.force(zc, x), zc, torch.ones_like(x))
    assert float((ge - gc).norm()) > 1e-3 * float(ge.norm())


def test_complex_force_is_the_holomorphic_extension():
    m = _model()
    idx, _ = _batch()
    x = m.embed(idx)
    g = torch.Generator().manual_seed(5)
    z = x + 0.3 * torch.randn(x.shape, generator=g, dtype=torch.float64)
    v = torch.randn(x.shape, generator=g, dtype=torch.float64)
    f_real = m.force(z, x)
    f_cplx = m.force(z.to(torch.complex128), x)
    assert float((f_cplx.real - f_real).abs().max()) < 1e-13
    assert float(f_cplx.imag.abs().max()) == 0.0
    # complex step: Im F(z + i h v)/h = J v to O(h²) only if F is holomorphic (a conjugated
    # variance or |.|-based softmax would break this at O(1))
    h = 1e-20
    cs = m.force(z.to(torch.complex128) + 1j * h * v, x).imag / h
    with fwAD.dual_level():
        jv = fwAD.unpack_dual(m.force(fwAD.make_dual(z, v), x)).tangent
    assert float((cs - jv).norm() / jv.norm()) < 1e-12
    # the readout gradient extends the same way
    _, tg = _batch()
    gl = m.loss_grad(z, tg)
    gl_c = m.loss_grad(z.to(torch.complex128), tg)
    assert float((gl_c.real - gl).abs().max()) < 1e-15


def test_elementwise_functions_agree_real_and_complex():
    g = torch.Generator().manual_seed(6)
    x = torch.randn(4, 7, generator=g, dtype=torch.float64)
    gain, bias = torch.rand(7, generator=g, dtype=torch.float64), torch.randn(7, generator=g, dtype=torch.float64)
    xc = x.to(torch.complex128)
    assert float((gelu_tanh(xc).real - gelu_tanh(x)).abs().max()) < 1e-15
    assert float((layer_norm(xc, gain, bias, 1e-5).real - layer_norm(x, gain, bias, 1e-5)).abs().max()) < 1e-13
    assert float((layer_norm(xc, gain, None, 1e-5, center=False).real
                  - layer_norm(x, gain, None, 1e-5, center=False)).abs().max()) < 1e-13
    mask = torch.ones(7, 7, dtype=torch.bool).tril()[:4]
    s = torch.randn(4, 7, generator=g, dtype=torch.float64) * 30
    p, pc = softmax_ratio(s, mask), softmax_ratio(s.to(torch.complex128), mask)
    assert float((pc.real - p).abs().max()) < 1e-15
    assert float(p[0, 1:].abs().max()) == 0.0 and abs(float(p.sum(-1).min()) - 1) < 1e-15


def test_loss_grad_matches_autograd_and_loss_is_mean_ce():
    m = _model()
    idx, tg = _batch()
    z = m.embed(idx).clone().requires_grad_(True)
    loss = m.loss(z, tg)
    (g,) = torch.autograd.grad(loss, z)
    assert float((g - m.loss_grad(z.detach(), tg)).abs().max()) < 1e-15
    logits = z.detach() @ m.projections["W_h"].weight.T
    manual = -(logits.log_softmax(-1).gather(-1, tg[..., None])).mean()
    assert abs(float(loss.detach()) - float(manual)) < 1e-13


def test_port_quantities_give_the_weight_derivative():
    """δ uᵀ recorded in one backward equals the finite-difference derivative of ⟨a, F⟩ in W."""
    m = _model()
    idx, _ = _batch()
    x = m.embed(idx)
    g = torch.Generator().manual_seed(7)
    z = x + 0.3 * torch.randn(x.shape, generator=g, dtype=torch.float64)
    a = torch.randn(x.shape, generator=g, dtype=torch.float64)
    rec = PortRecorder()
    zr = z.clone().requires_grad_(True)
    torch.autograd.grad(m.force(zr, x, recorder=rec), zr, a)
    grads = rec.weight_grads()
    for name in ("W_Q", "W_K", "W_V", "W_O", "W_1", "W_2"):
        proj = m.projections[name]
        w0 = proj.weight.clone()
        d = torch.randn(w0.shape, generator=g, dtype=torch.float64)
        h = 1e-6
        proj.program(w0 + h * d)
        fp = float((a * m.force(z, x)).sum())
        proj.program(w0 - h * d)
        fm = float((a * m.force(z, x)).sum())
        proj.program(w0)
        fd = (fp - fm) / (2 * h)
        assert abs(float((grads[name] * d).sum()) - fd) < 1e-7 * max(1.0, abs(fd)), name


def test_state_dict_round_trip():
    a, b = _model(0), _model(5)
    idx, _ = _batch()
    x = a.embed(idx)
    assert float((a.force(x, x) - b.force(x, b.embed(idx))).abs().max()) > 1e-3
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.force(x, x), b.force(x, b.embed(idx)))
    other = _model(0, cfg=ModelConfig(vocab_size=11, context=6, width=8, heads=4))
    with pytest.raises(ValueError, match="config"):
        other.load_state_dict(a.state_dict())


def test_bad_inputs_raise_clear_errors():
    m = _model()
    idx, tg = _batch()
    x = m.embed(idx)
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 10\]"):
        m.embed(torch.full((2, 6), 11))
    with pytest.raises(ValueError, match=r"token ids must lie"):
        m.embed(torch.full((2, 6), -1))
    with pytest.raises(TypeError, match="integer"):
        m.embed(torch.zeros(2, 6))
    with pytest.raises(ValueError, match=r"shape \(B, T\)"):
        m.embed(torch.zeros(6, dtype=torch.long))
    with pytest.raises(ValueError, match="sequence length 7"):
        m.embed(torch.zeros(2, 7, dtype=torch.long))
    with pytest.raises(ValueError, match="C=8"):
        m.force(torch.zeros(2, 6, 5, dtype=torch.float64), x)
    with pytest.raises(TypeError, match="float32"):
        m.force(x.float(), x)
    with pytest.raises(ValueError, match="targets"):
        m.loss(x, tg[:, :3])
    with pytest.raises(FloatingPointError, match="NaN"):
        m.check_state(torch.full_like(x, float("nan")), "z", finite=True)


class _RealOnlyProjection(DigitalProjection):
    """Like an analog array: refuses complex inputs."""

    def forward(self, u):
        if u.is_complex():
            raise TypeError("real reads only")
        return super().forward(u)

    def transpose(self, d):
        if d.is_complex():
            raise TypeError("real reads only")
        return super().transpose(d)


def test_complex_states_are_read_as_two_real_reads():
    exact, real_only = _model(), _model(factory=lambda n, w: _RealOnlyProjection(w, n))
    idx, tg = _batch()
    x = exact.embed(idx)
    g = torch.Generator().manual_seed(8)
    z = (x + 0.1 * torch.randn(x.shape, generator=g, dtype=torch.float64)).to(torch.complex128)
    z = z + 0.05j * torch.randn(x.shape, generator=g, dtype=torch.float64)
    assert float((real_only.force(z, x) - exact.force(z, x)).abs().max()) < 1e-14
    assert float((real_only.loss_grad(z, tg) - exact.loss_grad(z, tg)).abs().max()) < 1e-15
    assert float(exact.force(z, x).imag.abs().max()) > 1e-3


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.complex64])
def test_all_finite_sees_every_nan_and_inf(dtype):
    """`all_finite` (the relaxations' and the nudge's per-step check) agrees with
    torch.isfinite(t).all() wherever the bad entry sits and whatever its sign: a reduction that
    dropped NaNs, looked at one end only or ignored an imaginary part would pass a bad state."""
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(4, 3, 5, generator=gen, dtype=torch.float64).to(dtype)
    assert all_finite(base) and all_finite(base[:, ::2])
    bads = [float("nan"), float("inf"), float("-inf")]
    if dtype.is_complex:
        bads += [complex(0.0, float("inf")), complex(float("nan"), 0.0), complex(0.0, float("-inf"))]
    for bad in bads:
        for pos in [(0, 0, 0), (3, 2, 4), (1, 1, 2)]:
            t = base.clone()
            t[pos] = bad
            assert not all_finite(t), (bad, pos)
            assert bool(torch.isfinite(t).all()) is False
            if dtype.is_complex:
                assert not all_finite(t.conj())
    assert all_finite(torch.empty(0, dtype=dtype)) and all_finite(torch.arange(4))
