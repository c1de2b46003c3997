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

from .config import run_config_from_dict

__all__ = ["realised_update", "mapping_figures", "saturation_per_projection", "norm_ratio_and_cos", "force_work", "work_per_step",
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


# ------------------------------------------------------------------------------ work per step
def force_work(model: Mapping[str, Any], n: int) -> tuple[float, float]:
    """(analog MACs, digital operations) of one force evaluation F on `n` sequences.

    Analog: the six block projections read once per token, n·T·(4C² + 2·C·C_ffn) multiply-adds in
    the arrays. Digital (every operation counted as one, multiply-adds included): the two
    activation-by-activation products of attention (QKᵀ and A·V, n·2·T²·C, causal mask not
    exploited), softmax (3 per score, n·H·T²·3), two LayerNorms (8 per element), the qknorm
    RMSNorms (4 per element of q and k), GELU (8 per hidden element) and its bias, and the
    residual sum, damping and clamp (5 per element)."""
    T, C, H = int(model["context"]), int(model["width"]), int(model["heads"])
    hidden = int(model["ffn_mult"]) * C
    analog = n * T * (4 * C * C + 2 * C * hidden)
    qk = 2 * 4 * T * C if model.get("qknorm", True) else 0
    digital = n * (2 * T * T * C + 3 * H * T * T + 2 * 8 * T * C + qk + 9 * T * hidden + 5 * T * C)
    return float(analog), float(digital)


def work_per_step(config: Mapping[str, Any], free_steps: float, nudge_steps: float,
                  analog: bool = True) -> dict[str, tuple[float, float]]:
    """Estimated work of one training step by part: {part: (analog MACs, digital operations)}.

    A formula, not an instrumented count: the model shape, batch and settings from `config` (a
    run's resolved configuration as a mapping), the mean free-phase and nudge lengths from the
    metrics. On the analog path a projection read is analog work and everything else digital;
    the read-out copy's work (jacreg, eigreg, resreg from "readout") is digital, weights
    included; on the twin (`analog=False`) everything is digital. Per part:

    - free phase: (free_steps + 2) forces on B sequences (2: the noise-floor reads);
    - nudged phases: nudge_steps forces on K·B stacked sequences, plus the loss gradient
      (W_h read and transposed read, softmax over the vocabulary) each step;
    - AsymEP correction per nudge step on B sequences (one tangent serves the centered pair):
      tracking = J v by dual numbers (2 F; 0 with `jvp = "secant"`) + Jᵀ v through a fresh graph
      (one F forward, then a backward: transposed reads, 2× F's digital work through LayerNorm,
      softmax and GELU); frozen = the same without the fresh forward; none = 0;
    - ports: one F forward and one backward (vjp of ⟨a, F⟩), plus the W_h read of the readout;
    - resreg: one F and one backward (digital on the read-out copy with source "readout");
    - jacreg: two forces and two F + backward (central difference), on the read-out copy;
    - eigreg: `iters`·`block` of `[stabilisers.eigreg]` (J v + Jᵀ v) on one sequence, on the read-out copy;
    - update, by the tile's algorithm (W = every array weight, R = B·T token rows): sgd pulses R
      outer products into the arrays (R·W coincidences, counted as analog); mixed_precision
      accumulates them digitally (χ += lr·δuᵀ: R·W multiply-adds, plus one threshold check per
      weight; its transfer pulses are not counted); ttv2, c_ttv2 and agad pulse them onto the
      fast array (analog) and keep their transfer buffer digitally (counted as at most one
      operation per weight per step; the transfer reads are not counted); the twin sums them
      digitally (R·W);
    - remap: one operation per weight every `remap_every` updates (digital; absent unless set).
    Not counted: health probes, evaluations and the stability monitor (not every step)."""
    m, t, e = config["model"], config["training"], config["estimator"]
    # the stabilisers as the run resolved them (their defaults declared once, older keys migrated)
    st = run_config_from_dict({"stabilisers": config.get("stabilisers", {})}).stabilisers
    B = int(t["batch_size"])
    T = int(m["context"])
    C, V = int(m["width"]), int(m.get("vocab_size", 65))
    K = 2 if e.get("nudge", "centered") in ("centered", "holomorphic") else 1
    if e.get("nudge") == "holomorphic":
        K = int(e.get("points", 2))
    aF, dF = force_work(m, B)
    aK, dK = force_work(m, K * B)
    readout_a, readout_d = float(B * T * V * C), float(3 * B * T * V)

    def split(a: float, d: float, on_arrays: bool) -> tuple[float, float]:
        return (a, d) if (analog and on_arrays) else (0.0, a + d)

    parts: dict[str, tuple[float, float]] = {}
    parts["free phase"] = split((free_steps + 2) * aF, (free_steps + 2) * dF, True)
    parts["nudged phases (forces, loss gradient)"] = split(nudge_steps * (aK + 2 * K * readout_a),
                                                            nudge_steps * (dK + K * readout_d), True)
    corr = e.get("correction", "tracking")
    if corr == "none":
        ca, cd = 0.0, 0.0
    else:
        jv = 0.0 if (corr == "tracking" and e.get("jvp", "dual") == "secant") else 2.0
        fwd = 1.0 if corr == "tracking" else 0.0
        ca, cd = (jv + fwd + 1.0) * aF, (jv + fwd + 2.0) * dF
    parts["AsymEP correction (J v, Jᵀ v)"] = split(nudge_steps * ca, nudge_steps * cd, True)
    parts["ports (vjp of ⟨a, F⟩, readout)"] = split(2 * aF + readout_a, 3 * dF + readout_d, True)
    if st.resreg > 0:
        parts["resreg"] = split(2 * aF, 3 * dF, st.resreg_source == "arrays")
    if st.jacreg_on:
        parts["jacreg (read-out copy)"] = split(6 * aF, 8 * dF, False)
    if st.eigreg.weight > 0:
        a1, d1 = force_work(m, 1)
        n = st.eigreg.iters * st.eigreg.block
        parts["eigreg (read-out copy)"] = split(n * 4 * a1, n * 5 * d1, False)
    tile = config.get("tile") or {}
    hidden = int(m["ffn_mult"]) * C
    weights = float(4 * C * C + 2 * C * hidden + V * C)
    rows = float(B * T)
    algorithm = tile.get("algorithm", "sgd") if analog else "twin"
    if algorithm == "twin":
        parts["update (Σ δuᵀ)"] = (0.0, rows * weights)
    elif algorithm == "mixed_precision":
        parts["update (mixed precision: digital χ += lr·δuᵀ, threshold check)"] = (0.0, rows * weights + weights)
    elif algorithm == "sgd":
        parts["update (pulsed outer products)"] = (rows * weights, 0.0)
    else:
        parts["update (pulsed onto the fast array; transfer buffer)"] = (rows * weights, weights)
    remap = int((tile.get("mapping") or {}).get("remap_every", 0))
    if analog and remap > 0:
        parts["remap"] = (0.0, weights / remap)
    return parts
