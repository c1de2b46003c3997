import pytest
import torch

from ept_hw.projection import DigitalProjection, Projection, digital_factory


def _proj(out=3, inp=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return digital_factory("W", torch.randn(out, inp, generator=g, dtype=torch.float64))


def test_forward_transpose_are_adjoint():
    p = _proj()
    g = torch.Generator().manual_seed(1)
    u = torch.randn(2, 5, 4, generator=g, dtype=torch.float64)
    d = torch.randn(2, 5, 3, generator=g, dtype=torch.float64)
    assert isinstance(p, Projection)
    lhs = (p.forward(u) * d).sum()
    rhs = (u * p.transpose(d)).sum()
    assert abs(lhs - rhs) < 1e-12 * abs(lhs)


def test_update_is_summed_outer_product():
    p = _proj()
    w0 = p.weight.clone()
    g = torch.Generator().manual_seed(2)
    u = torch.randn(2, 5, 4, generator=g, dtype=torch.float64)
    d = torch.randn(2, 5, 3, generator=g, dtype=torch.float64)
    p.apply_update(u, d, lr=0.5)
    expected = w0 - 0.5 * torch.einsum("bto,bti->oi", d, u)
    assert torch.allclose(p.weight, expected, atol=1e-12)


def test_complex_input_and_state_round_trip():
    p = _proj()
    u = torch.randn(4, dtype=torch.complex128)
    assert torch.allclose(p.forward(u), u @ p.weight.to(torch.complex128).T)
    q = DigitalProjection(torch.zeros(3, 4, dtype=torch.float64))
    q.load_state_dict(p.state_dict())
    assert torch.equal(q.weight, p.weight)


def test_shape_errors_are_clear():
    p = _proj()
    with pytest.raises(ValueError, match="expected 4"):
        p.forward(torch.zeros(2, 5, dtype=torch.float64))
    with pytest.raises(ValueError, match="leading dimensions"):
        p.apply_update(torch.zeros(2, 4, dtype=torch.float64), torch.zeros(3, 3, dtype=torch.float64), 0.1)
    with pytest.raises(ValueError, match="2-D"):
        DigitalProjection(torch.zeros(3))
