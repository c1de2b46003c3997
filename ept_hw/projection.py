"""The `Projection` seam: the only way the block touches a weight matrix.

The block never multiplies a weight itself; it asks a projection. `DigitalProjection` is an
exact matrix; `crossbar.AnalogProjection` satisfies the same protocol structurally (without
importing this module) and reads through DAC, devices, noise and ADC.

Conventions shared by every implementation:
- weights have shape (out_features, in_features); `forward(u)` maps (..., in) -> (..., out) as
  y = u Wᵀ; `transpose(d)` maps (..., out) -> (..., in) as d W.
- `apply_update(u, delta, lr)` performs W <- W - lr * Σ delta uᵀ, the sum running over every
  leading dimension (batch and tokens), as aihwkit's `RPUSimple::updateMatrix` does (no mean:
  the caller scales `delta`).
- `program(weight)` sets the weights (on hardware: programming, with its noise).
- `weight` is the effective weight (for logging and the twin comparison), detached.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol, runtime_checkable

from torch import Tensor

__all__ = ["Projection", "ProjectionFactory", "DigitalProjection", "digital_factory", "check_port_shapes"]


@runtime_checkable
class Projection(Protocol):
    """Structural interface of a weight matrix inside the block (see module docstring)."""

    @property
    def in_features(self) -> int: ...

    @property
    def out_features(self) -> int: ...

    def forward(self, u: Tensor) -> Tensor: ...

    def transpose(self, d: Tensor) -> Tensor: ...

    def apply_update(self, u: Tensor, delta: Tensor, lr: float, task_rows: int | None = None) -> None: ...

    def program(self, weight: Tensor) -> None: ...

    @property
    def weight(self) -> Tensor: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


#: Builds a projection named `name` (e.g. "W_Q") programmed with `weight` of shape (out, in).
ProjectionFactory = Callable[[str, Tensor], Projection]


def check_port_shapes(name: str, u: Tensor, delta: Tensor, in_features: int, out_features: int) -> None:
    """Raise a clear `ValueError` if (u, delta) do not fit a (out, in) projection."""
    if u.shape[-1] != in_features:
        raise ValueError(f"{name}: input u has last dimension {u.shape[-1]}, expected {in_features}")
    if delta.shape[-1] != out_features:
        raise ValueError(f"{name}: delta has last dimension {delta.shape[-1]}, expected {out_features}")
    if u.shape[:-1] != delta.shape[:-1]:
        raise ValueError(
            f"{name}: u and delta must share leading dimensions, got {tuple(u.shape)} and {tuple(delta.shape)}"
        )


class DigitalProjection:
    """An exact weight matrix: the digital twin's projection and the reference for the analog one.

    Complex inputs (holomorphic EP) are multiplied by the real weight cast to the input's dtype.
    `parameter` is the underlying tensor, for optimisers that need a gradient tensor (AdamW).
    """

    def __init__(self, weight: Tensor, name: str = "W"):
        if weight.dim() != 2:
            raise ValueError(f"{name}: weight must be 2-D (out, in), got shape {tuple(weight.shape)}")
        self.name = name
        self.parameter = weight.detach().clone()

    @property
    def in_features(self) -> int:
        return self.parameter.shape[1]

    @property
    def out_features(self) -> int:
        return self.parameter.shape[0]

    def _w(self, like: Tensor) -> Tensor:
        w = self.parameter
        if like.dtype != w.dtype:
            w = w.to(like.dtype)
        return w

    def forward(self, u: Tensor) -> Tensor:
        if u.shape[-1] != self.in_features:
            raise ValueError(f"{self.name}.forward: input has last dimension {u.shape[-1]}, expected {self.in_features}")
        return u @ self._w(u).T

    def transpose(self, d: Tensor) -> Tensor:
        if d.shape[-1] != self.out_features:
            raise ValueError(f"{self.name}.transpose: input has last dimension {d.shape[-1]}, expected {self.out_features}")
        return d @ self._w(d)

    def apply_update(self, u: Tensor, delta: Tensor, lr: float, task_rows: int | None = None) -> None:
        """W ← W − lr·Σ δuᵀ exactly. `task_rows` (how many leading rows are the task's input vectors,
        which an analog tile's transfer schedule counts) does not matter to an exact matrix."""
        check_port_shapes(self.name, u, delta, self.in_features, self.out_features)
        grad = delta.reshape(-1, self.out_features).T.to(self.parameter.dtype) @ u.reshape(-1, self.in_features).to(
            self.parameter.dtype
        )
        self.parameter.sub_(lr * grad)

    def program(self, weight: Tensor) -> None:
        if tuple(weight.shape) != tuple(self.parameter.shape):
            raise ValueError(f"{self.name}.program: shape {tuple(weight.shape)}, expected {tuple(self.parameter.shape)}")
        self.parameter.copy_(weight.detach())

    @property
    def weight(self) -> Tensor:
        return self.parameter.detach()

    def state_dict(self) -> dict[str, Any]:
        return {"kind": "digital", "weight": self.parameter.detach().clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.program(state["weight"])


def digital_factory(name: str, weight: Tensor) -> DigitalProjection:
    """The `ProjectionFactory` of the digital path."""
    return DigitalProjection(weight, name=name)

