"""Projection reads as autograd functions, and the recorder of port quantities.

Every weight matrix inside the block is read through `project`, an autograd function whose

- forward is `proj.forward(u)` (y = u Wᵀ),
- backward is `proj.transpose(grad)` (the transposed read of the same array),
- forward-mode rule (`jvp`) is `proj.forward(tangent)`.

Complex inputs (holomorphic EP) are read as two real reads, so any projection serves them.

So every Jacobian product of F (J v by dual numbers, Jᵀ v by a backward pass) is made of reads of
the same arrays as F itself: on the analog path, noise and quantisation act on them as on a chip.
No gradient flows to the weight through this function: weights learn only by the port quantities.

A `PortRecorder` passed down through `force` collects, in each backward, the projection's input u
and the cotangent δ arriving at its output: one vjp of ⟨a, F(z*)⟩ then yields the local update
δ uᵀ of every projection (SCIENCE §3). Through an unrolled graph (BPTT) a projection is read many
times; the recorder keeps every read and `weight_grads` sums their outer products.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor

from .projection import Projection

__all__ = ["PortRecorder", "project", "outer_product_sum", "forward_read", "transpose_read", "all_finite"]


def all_finite(t: Tensor) -> bool:
    """Whether every entry of t is finite (no NaN, no ±inf): `torch.isfinite(t).all()` by one
    reduction, `torch.aminmax` (which propagates NaN and keeps ±inf), without the boolean
    temporary: about a tenth of its cost on a (32, 16, 128) state here, and the relaxations and
    the EP nudge check their state every step. Complex tensors: both parts."""
    if t.is_complex():
        t = torch.view_as_real(t.resolve_conj())
    if not t.is_floating_point() or t.numel() == 0:
        return True
    lo, hi = torch.aminmax(t.detach())
    return math.isfinite(lo.item()) and math.isfinite(hi.item())


def outer_product_sum(u: Tensor, delta: Tensor) -> Tensor:
    """Σ over all leading dims of δ uᵀ, shape (out, in): the weight gradient of one read."""
    return delta.reshape(-1, delta.shape[-1]).T @ u.reshape(-1, u.shape[-1])


class PortRecorder:
    """Collects (u, δ) for each projection read that a backward pass goes through.

    `ports()` returns, per name, the single (u, δ) pair (raising if a name was read several times:
    EP needs exactly one read at z*); `weight_grads()` sums δ uᵀ over every read (BPTT).
    """

    def __init__(self) -> None:
        self.reads: dict[str, list[tuple[Tensor, Tensor]]] = {}

    def record(self, name: str, u: Tensor, delta: Tensor) -> None:
        self.reads.setdefault(name, []).append((u.detach(), delta.detach()))

    def ports(self) -> dict[str, tuple[Tensor, Tensor]]:
        out = {}
        for name, reads in self.reads.items():
            if len(reads) != 1:
                raise RuntimeError(f"projection {name} was read {len(reads)} times; port quantities need exactly one")
            out[name] = reads[0]
        return out

    def weight_grads(self) -> dict[str, Tensor]:
        grads = {}
        for name, reads in self.reads.items():
            total = None
            for u, d in reads:
                g = outer_product_sum(u, d)
                total = g if total is None else total + g
            grads[name] = total
        return grads


class _ProjectionRead(torch.autograd.Function):
    @staticmethod
    def forward(u: Tensor, proj: Any, name: str, recorder: PortRecorder | None) -> Tensor:
        return forward_read(proj, u)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: Tensor) -> None:
        u, proj, name, recorder = inputs
        ctx.proj = proj
        ctx.name = name
        ctx.recorder = recorder
        if recorder is not None:
            ctx.save_for_backward(u)

    @staticmethod
    def backward(ctx: Any, grad: Tensor):
        if ctx.recorder is not None:
            (u,) = ctx.saved_tensors
            ctx.recorder.record(ctx.name, u, grad)
        return transpose_read(ctx.proj, grad), None, None, None

    @staticmethod
    def jvp(ctx: Any, u_tangent: Tensor, *_unused: Any) -> Tensor:
        return forward_read(ctx.proj, u_tangent)


def forward_read(proj: Projection, u: Tensor) -> Tensor:
    """proj.forward(u); a complex u is read as two real reads (Re, Im), as a chip would do it."""
    if u.is_complex():
        return torch.complex(proj.forward(u.real.contiguous()), proj.forward(u.imag.contiguous()))
    return proj.forward(u)


def transpose_read(proj: Projection, d: Tensor) -> Tensor:
    """proj.transpose(d); a complex d is read as two real transposed reads."""
    if d.is_complex():
        return torch.complex(proj.transpose(d.real.contiguous()), proj.transpose(d.imag.contiguous()))
    return proj.transpose(d)


class _ProjectionReadCtx(torch.autograd.Function):
    """`_ProjectionRead` in the ctx-in-forward form: the same read, without the per-call argument
    binding (`inspect.signature`) that a Function with `setup_context` pays in `apply`. It cannot
    run under torch.func transforms, which need `setup_context`; `project` picks it otherwise."""

    @staticmethod
    def forward(ctx: Any, u: Tensor, proj: Any, name: str, recorder: PortRecorder | None) -> Tensor:
        _ProjectionRead.setup_context(ctx, (u, proj, name, recorder), None)
        return forward_read(proj, u)

    backward = staticmethod(_ProjectionRead.backward)
    jvp = staticmethod(_ProjectionRead.jvp)


def project(proj: Projection, u: Tensor, name: str, recorder: PortRecorder | None = None) -> Tensor:
    """Read `proj` at `u` (y = u Wᵀ) so that autograd uses the projection's own transposed read.
    Where no derivative can be asked for (grad mode off, no forward-mode tangent on u, no
    torch.func transform: the free phase) the read is made directly, without the Function."""
    if torch._C._are_functorch_transforms_active():
        return _ProjectionRead.apply(u, proj, name, recorder)
    if not torch.is_grad_enabled() and fwAD.unpack_dual(u).tangent is None:
        return forward_read(proj, u)
    return _ProjectionReadCtx.apply(u, proj, name, recorder)
