"""Optimiser sinks: where a step's accumulated port updates go.

A sink takes the step's `PortUpdates` (task update + stabilisers), their dense per-projection sums
Σ δuᵀ and the learning rate, and changes the model:

- `SGDSink` (the twin rule, both paths): every projection W ← W − lr·Σ δuᵀ through
  `Projection.apply_update` (pulses on the analog arrays), the digital periphery
  p ← p − lr·`periphery_lr_scale`·g; frozen parameter groups are left alone.
- `AdamWSink` (digital paths only, the best-digital reference): torch's AdamW on every tensor,
  the dense Σ δuᵀ as the projection's gradient.

`ParameterEMA` (`trainer.controllers`) is applied after either sink when `training.ema` > 0.
"""

from __future__ import annotations

from typing import Any, Mapping, Protocol

import torch
from torch import Tensor

from ept_hw.model import EquilibriumTransformer

from .stabilisers import PortUpdates

__all__ = ["UpdateSink", "SGDSink", "AdamWSink", "trainable_tensors", "build_sink"]


def trainable_tensors(model: EquilibriumTransformer) -> dict[str, Tensor]:
    """Every trainable tensor of a digital model: `proj.NAME` (projection weights that hold a
    tensor) and `param.NAME` (the digital periphery)."""
    tensors = {f"proj.{n}": p.parameter for n, p in model.projections.items() if hasattr(p, "parameter")}
    tensors.update({f"param.{n}": t for n, t in model.params.items()})
    return tensors


class UpdateSink(Protocol):
    def apply(self, updates: PortUpdates, dense: Mapping[str, Tensor], lr: float) -> None: ...

    def state_dict(self) -> dict[str, Any] | None: ...

    def load_state_dict(self, state: Mapping[str, Any] | None) -> None: ...

    def rebind(self) -> None:
        """Re-attach to the model's tensors after `model.load_state_dict`."""


class SGDSink:
    def __init__(self, model: EquilibriumTransformer, periphery_lr_scale: float, frozen: tuple[str, ...]):
        self.model, self.periphery_lr_scale, self.frozen = model, periphery_lr_scale, frozen

    def apply(self, updates: PortUpdates, dense: Mapping[str, Tensor], lr: float) -> None:
        for name, proj in self.model.projections.items():
            if name in updates.ports:
                u, d = updates.merged(name)
                proj.apply_update(u, d, lr, task_rows=updates.task_rows(name))
        plr = lr * self.periphery_lr_scale
        for name, g in updates.digital.items():
            if EquilibriumTransformer.param_group(name) in self.frozen:
                continue
            self.model.params[name].sub_(plr * g.to(self.model.params[name].dtype))

    def state_dict(self) -> None:
        return None

    def load_state_dict(self, state: Mapping[str, Any] | None) -> None:
        return None

    def rebind(self) -> None:
        return None


class AdamWSink:
    def __init__(self, model: EquilibriumTransformer, lr: float, betas: tuple[float, float], weight_decay: float,
                 frozen: tuple[str, ...]):
        if any(not hasattr(p, "parameter") for p in model.projections.values()):
            raise ValueError("AdamW needs digital projections (a gradient tensor per weight)")
        self.model, self.frozen = model, frozen
        self._args = dict(lr=lr, betas=betas, weight_decay=weight_decay)
        self.rebind()

    def rebind(self) -> None:
        self.optimizer = torch.optim.AdamW(list(trainable_tensors(self.model).values()), **self._args)

    def apply(self, updates: PortUpdates, dense: Mapping[str, Tensor], lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        tensors = trainable_tensors(self.model)
        for key, tensor in tensors.items():
            kind, name = key.split(".", 1)
            if kind == "proj":
                tensor.grad = dense[name].to(tensor.dtype) if name in dense else None
            else:
                g = updates.digital.get(name)
                if g is None or EquilibriumTransformer.param_group(name) in self.frozen:
                    tensor.grad = None  # AdamW skips it (weight decay included)
                else:
                    tensor.grad = g.to(tensor.dtype)
        self.optimizer.step()
        for tensor in tensors.values():
            tensor.grad = None

    def state_dict(self) -> dict[str, Any]:
        return self.optimizer.state_dict()

    def load_state_dict(self, state: Mapping[str, Any] | None) -> None:
        if state is not None:
            self.optimizer.load_state_dict(state)


def build_sink(model: EquilibriumTransformer, training: Any) -> UpdateSink:
    """The sink `training.optimizer` names ("sgd" | "adamw")."""
    t = training
    if t.optimizer == "adamw":
        return AdamWSink(model, t.lr, (t.beta1, t.beta2), t.weight_decay, tuple(t.frozen))
    return SGDSink(model, t.periphery_lr_scale, tuple(t.frozen))
