"""Inference noise and drift of a programmed chip: aihwkit's PCM statistical model.

After training, the weights are programmed onto fresh PCM pairs and the chip is read at times
t_inf seconds after programming. The model and its parameter names are aihwkit 1.2's
(`inference/noise/pcm.py` `PCMLikeNoiseModel`, Nandakumar et al., ICECS 2019, with the
`SinglePairConductanceConverter`; `/work/shared/AIHWKIT_SEMANTICS.md` "Inference noise and drift"):

- conductance mapping per matrix: scale = (g_max − g_min)/max|W|; G⁺ = g_min + clip(scale·W, 0, g_max),
  G⁻ = g_min + clip(−scale·W, 0, g_max); W = ((G⁺ − g_min) − (G⁻ − g_min))/scale;
- programming noise, once per device: g_prog = max(0, g + prog_noise_scale·σ_prog(g)·ξ) with
  σ_prog(g) = (c₀ + c₁ g/g_max + c₂ (g/g_max)²)·g_max/prog_coeff_g_max_reference;
- drift exponent, once per device, from the target conductance: g_rel = max(|g|/g_max, 1e-7),
  μ_ν = clip(−0.0155 ln g_rel + 0.0244, 0.049, 0.1), σ_ν = clip(−0.0125 ln g_rel − 0.0059, 0.008, 0.045),
  ν = drift_scale·|μ_ν + σ_ν ξ|;
- at t_inf (t = t_inf + t_0): g_drift = g_prog·(t/t_0)^(−ν) (for t > t_0), accumulated 1/f noise
  Q_s = min(0.2, 0.0088/max(1e-3, (|g_prog|/g_max)^0.65)), σ = Q_s·sqrt(ln((t + t_read)/(2 t_read))),
  g = max(0, g_drift + |g_drift|·read_noise_scale·σ·ξ), a fresh ξ at every evaluation time;
- global drift compensation (`GlobalDriftCompensation`): the mean |output| of one-hot reads
  (= mean |W|) right after programming and at t_inf; outputs are multiplied by their ratio.

As aihwkit's inference tile does (`program_weights`, then `drift_weights(t)`), the drift step
re-maps the *programmed weights* to a fresh conductance pair (one device of the pair at g_min)
before applying drift and 1/f noise, and ν is drawn from the target conductances at programming.

Where we differ from aihwkit: the drift-compensation read-outs are exact (mean |W| of the
weights) where aihwkit reads them through the inference tile's forward periphery (with its
output noise); random draws come from explicit torch generators (the distributions match, the
streams do not).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ept_hw.config import ConfigError, check_range

__all__ = ["PCMInferenceParameters", "PCMInferenceModel", "ProgrammedWeights"]

_ZERO_CLIP = 1e-7


@dataclass(frozen=True)
class PCMInferenceParameters:
    """aihwkit `PCMLikeNoiseModel` + `SinglePairConductanceConverter` parameters (µS, seconds)."""

    g_max: float = 25.0
    g_min: float = 0.0
    prog_coeff: tuple[float, ...] = (0.26348, 1.9650, -1.1731)
    prog_coeff_g_max_reference: float = 25.0
    t_read: float = 250.0e-9
    t_0: float = 20.0
    prog_noise_scale: float = 1.0
    read_noise_scale: float = 1.0
    drift_scale: float = 1.0

    def __post_init__(self) -> None:
        check_range("g_max", self.g_max, 0.0, lo_open=True)
        check_range("g_min", self.g_min, 0.0)
        if not self.g_min < self.g_max:
            raise ConfigError("g_min", self.g_min, f"a conductance below g_max = {self.g_max:g}")
        if len(self.prog_coeff) < 1:
            raise ConfigError("prog_coeff", self.prog_coeff, "at least one polynomial coefficient")
        object.__setattr__(self, "prog_coeff", tuple(float(c) for c in self.prog_coeff))
        check_range("prog_coeff_g_max_reference", self.prog_coeff_g_max_reference, 0.0, lo_open=True)
        check_range("t_read", self.t_read, 0.0, lo_open=True)
        check_range("t_0", self.t_0, 0.0, lo_open=True)
        for key in ("prog_noise_scale", "read_noise_scale", "drift_scale"):
            check_range(key, getattr(self, key), 0.0)


def _randn(like: Tensor, generator: torch.Generator) -> Tensor:
    return torch.randn(like.shape, generator=generator, device=generator.device, dtype=like.dtype).to(like.device)


class PCMInferenceModel:
    """The equations of the module docstring, one function each."""

    def __init__(self, params: PCMInferenceParameters | None = None):
        self.params = params or PCMInferenceParameters()

    # ---------------------------------------------------------------- conductance mapping
    def to_conductances(self, w: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(G⁺, G⁻, scale) of a weight matrix (one scale per matrix)."""
        p = self.params
        scale = (p.g_max - p.g_min) / w.abs().max().clamp_min(_ZERO_CLIP)
        scaled = w * scale
        return scaled.clamp(0.0, p.g_max) + p.g_min, (-scaled).clamp(0.0, p.g_max) + p.g_min, scale

    def to_weights(self, g_plus: Tensor, g_minus: Tensor, scale: Tensor) -> Tensor:
        return ((g_plus - self.params.g_min) - (g_minus - self.params.g_min)) / scale

    # ---------------------------------------------------------------- the three noise sources
    def programming_std(self, g: Tensor) -> Tensor:
        """σ_prog(g) in µS (before `prog_noise_scale`)."""
        p = self.params
        x = g / p.g_max
        sigma = torch.full_like(g, p.prog_coeff[0])
        power = torch.ones_like(g)
        for c in p.prog_coeff[1:]:
            power = power * x
            sigma = sigma + c * power
        return sigma * (p.g_max / p.prog_coeff_g_max_reference)

    def program(self, g_target: Tensor, generator: torch.Generator) -> Tensor:
        """Programmed conductance: target plus programming noise, clipped at 0."""
        g = g_target + self.params.prog_noise_scale * self.programming_std(g_target) * _randn(g_target, generator)
        return g.clamp_min(0.0)

    def drift_mean_std(self, g_target: Tensor) -> tuple[Tensor, Tensor]:
        """(μ_ν, σ_ν) of the drift exponent at a target conductance."""
        g_rel = (g_target / self.params.g_max).abs().clamp_min(_ZERO_CLIP)
        mu = (-0.0155 * torch.log(g_rel) + 0.0244).clamp(0.049, 0.1)
        sigma = (-0.0125 * torch.log(g_rel) - 0.0059).clamp(0.008, 0.045)
        return mu, sigma

    def drift_coefficients(self, g_target: Tensor, generator: torch.Generator) -> Tensor:
        mu, sigma = self.drift_mean_std(g_target)
        return self.params.drift_scale * (mu + sigma * _randn(g_target, generator)).abs()

    def read_noise_std(self, g_prog: Tensor, t_inference: float) -> Tensor:
        """Relative std of the accumulated 1/f read noise at t_inf (before `read_noise_scale`)."""
        p = self.params
        t = t_inference + p.t_0
        q_s = (0.0088 / ((g_prog.abs() / p.g_max) ** 0.65).clamp_min(1e-3)).clamp_max(0.2)
        return q_s * math.sqrt(math.log((t + p.t_read) / (2.0 * p.t_read)))

    def drift(self, g_prog: Tensor, nu: Tensor, t_inference: float, generator: torch.Generator) -> Tensor:
        """Conductance at t_inf seconds after programming: drift, then 1/f read noise, clipped at 0."""
        p = self.params
        t = t_inference + p.t_0
        g_drift = g_prog * (t / p.t_0) ** (-nu) if t > p.t_0 else g_prog
        sigma = self.read_noise_std(g_prog, t_inference)
        g = g_drift + g_drift.abs() * p.read_noise_scale * sigma * _randn(g_prog, generator)
        return g.clamp_min(0.0)


class ProgrammedWeights:
    """One weight matrix programmed onto fresh PCM pairs: programming noise and ν drawn once
    (one chip), then `at(t)` gives the weights read at t_inf = t with fresh 1/f noise, optionally
    with global drift compensation."""

    def __init__(self, weight: Tensor, model: PCMInferenceModel, generator: torch.Generator):
        self.model = model
        w = weight.detach().to(torch.float32)
        g_plus, g_minus, scale = model.to_conductances(w)
        programmed = [model.program(g, generator) for g in (g_plus, g_minus)]
        self.nu = [model.drift_coefficients(g, generator) for g in (g_plus, g_minus)]
        self.programmed = model.to_weights(programmed[0], programmed[1], scale)
        self.baseline = float(self.programmed.abs().mean())

    def at(self, t_inference: float, generator: torch.Generator, drift_compensation: bool = False) -> Tensor:
        if not (t_inference >= 0.0) or math.isinf(t_inference):
            raise ValueError(f"t_inference must be finite and >= 0 seconds, got {t_inference}")
        m = self.model
        g_plus, g_minus, scale = m.to_conductances(self.programmed)
        drifted = [m.drift(g, nu, t_inference, generator) for g, nu in zip((g_plus, g_minus), self.nu)]
        w = m.to_weights(drifted[0], drifted[1], scale)
        if drift_compensation:
            now = max(float(w.abs().mean()), 1e-4)
            w = w * (max(self.baseline, 1e-4) / now)
        return w
