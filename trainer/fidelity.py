"""Analog fidelity figures (issue 11): what the arrays realise of what was requested, and where the
analog weights stand against the twin's and against the arrays' representable range.

These are **simulator-side measurements**: the weights are taken exactly from the simulator state
(`Projection.weight`, the devices' effective weights times the mapping scale), which a chip could
only estimate through its own noisy reads. They describe the run; nothing here feeds back into
training.

- `realised_update(before, after, requested)`: per projection, ‖ΔW_realised‖/‖ΔW_requested‖ and
  their cosine, with ΔW_realised = W_after − W_before around one `apply_update` (pulses, clipping
  at the bounds, decay and diffusion included) and ΔW_requested = −lr·Σδuᵀ.
- `mapping_figures(analog, twin)`: per projection, ‖W_analog‖/‖W_twin‖ and the fraction of the
  twin's weights outside the analog arrays' representable range (mapping scale × the devices' own
  bounds, `AnalogTile.representable_range`): the part of the twin's trajectory the arrays cannot
  follow whatever the pulses do.
- `saturation_per_projection(model)`: per projection, the fraction of devices at a bound.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

from torch import Tensor

__all__ = ["realised_update", "mapping_figures", "saturation_per_projection", "norm_ratio_and_cos",
           "COLLAPSE_BAND"]

#: A projection whose analog/twin weight-norm ratio leaves this band is reported as collapsed
#: (or blown up) in the run report.
COLLAPSE_BAND = (0.5, 2.0)


def norm_ratio_and_cos(x: Tensor, ref: Tensor) -> tuple[float, float]:
    """(‖x‖/‖ref‖, cos(x, ref)) in float64; NaN where a norm is 0."""
    x, ref = x.reshape(-1).double(), ref.reshape(-1).double()
    nx, nr = float(x.norm()), float(ref.norm())
    ratio = nx / nr if nr > 0 else math.nan
    cos = float(x @ ref) / (nx * nr) if nx > 0 and nr > 0 else math.nan
    return ratio, cos


def realised_update(before: Mapping[str, Tensor], after: Mapping[str, Tensor],
                    requested: Mapping[str, Tensor]) -> tuple[dict[str, float], dict[str, float]]:
    """Per projection in `requested`: (norm ratio, cosine) of the realised against the requested ΔW."""
    ratio, cos = {}, {}
    for name, req in requested.items():
        ratio[name], cos[name] = norm_ratio_and_cos(after[name] - before[name], req)
    return ratio, cos


def mapping_figures(analog: Any, twin: Any) -> dict[str, dict[str, float | None]]:
    """{"weight_norm_ratio": {name: ‖W_a‖/‖W_t‖}, "twin_out_of_range": {name: fraction or None}} for
    two models with the same projections; the fraction is None for a projection without a
    representable range (a digital one)."""
    ratios: dict[str, float | None] = {}
    outside: dict[str, float | None] = {}
    for name, pa in analog.projections.items():
        wt = twin.projections[name].weight
        wa = pa.weight
        nt = float(wt.double().norm())
        ratios[name] = float(wa.double().norm()) / nt if nt > 0 else math.nan
        rng = getattr(pa, "representable_range", None)
        if rng is None:
            outside[name] = None
            continue
        lo, hi = rng()
        wt = wt.to(lo.device, lo.dtype)
        outside[name] = float(((wt < lo) | (wt > hi)).double().mean())
    return {"weight_norm_ratio": ratios, "twin_out_of_range": outside}


def saturation_per_projection(model: Any) -> dict[str, float] | None:
    """Per projection, the devices' saturation fraction (`counters()`); None on a digital model."""
    out: dict[str, float] = {}
    for name, proj in model.projections.items():
        counters = getattr(proj, "counters", None)
        if counters is None:
            return None
        out[name] = float(counters().get("device_saturation_fraction", 0.0))
    return out
