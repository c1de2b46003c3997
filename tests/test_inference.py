"""crossbar.inference: aihwkit's PCM inference model against its equations (programming-noise
std, drift exponent mean, 1/f read-noise std, drift compensation), and, when aihwkit is
installed, against aihwkit's `PCMLikeNoiseModel` on the same weights (marked `aihwkit`)."""

from __future__ import annotations

import math

import pytest
import torch
from scipy import stats

from crossbar.inference import PCMInferenceModel, PCMInferenceParameters, ProgrammedWeights

N = 200_000


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _sigma_prog(g: float) -> float:
    x = g / 25.0
    return 0.26348 + 1.9650 * x - 1.1731 * x * x


@pytest.mark.parametrize("g", [3.0, 10.0, 25.0])
def test_programming_noise_std_follows_the_polynomial(g):
    model = PCMInferenceModel()
    out = model.program(torch.full((N,), g), _gen(1))
    assert abs(float(out.mean()) - g) < 5 * _sigma_prog(g) / math.sqrt(N)
    assert float(out.std()) == pytest.approx(_sigma_prog(g), rel=0.01)
    # g_max rescales the fitted coefficients (fitted at 25 uS): same relative noise at g_max = 50
    scaled = PCMInferenceModel(PCMInferenceParameters(g_max=50.0)).program(torch.full((N,), 2 * g), _gen(2))
    assert float(scaled.std()) == pytest.approx(2 * _sigma_prog(g), rel=0.01)


def _folded_normal_mean(mu: float, sigma: float) -> float:
    return sigma * math.sqrt(2 / math.pi) * math.exp(-mu * mu / (2 * sigma * sigma)) + mu * (1 - 2 * stats.norm.cdf(-mu / sigma))


@pytest.mark.parametrize("g_rel", [1e-4, 0.01, 0.2, 1.0])
def test_drift_exponent_mean_and_the_drift_law(g_rel):
    model = PCMInferenceModel(PCMInferenceParameters(read_noise_scale=0.0))
    g = torch.full((N,), 25.0 * g_rel)
    mu = min(max(-0.0155 * math.log(g_rel) + 0.0244, 0.049), 0.1)
    sigma = min(max(-0.0125 * math.log(g_rel) - 0.0059, 0.008), 0.045)
    nu = model.drift_coefficients(g, _gen(3))
    expected = _folded_normal_mean(mu, sigma)
    assert float(nu.mean()) == pytest.approx(expected, rel=0.01)
    assert float(nu.std()) == pytest.approx(math.sqrt(mu * mu + sigma * sigma - expected ** 2), rel=0.02)
    # the drift law: g(t) = g_prog (t/t_0)^-nu, t = t_inf + t_0, so nu is recovered from the ratio
    t_inf = 86400.0
    drifted = model.drift(g, nu, t_inf, _gen(4))
    recovered = -torch.log(drifted / g) / math.log((t_inf + 20.0) / 20.0)
    assert torch.allclose(recovered, nu, atol=1e-5)
    assert torch.equal(model.drift(g, nu, 0.0, _gen(4)), g)  # no drift at t_inf = 0


@pytest.mark.parametrize("g_rel,t_inf", [(0.05, 1.0), (0.5, 3600.0), (1.0, 31536000.0)])
def test_read_noise_std_follows_the_1_over_f_law(g_rel, t_inf):
    model = PCMInferenceModel(PCMInferenceParameters(drift_scale=0.0))
    g = torch.full((N,), 25.0 * g_rel)
    out = model.drift(g, torch.zeros(N), t_inf, _gen(5))
    q_s = min(0.0088 / max(g_rel ** 0.65, 1e-3), 0.2)
    sigma = q_s * math.sqrt(math.log((t_inf + 20.0 + 250e-9) / (2 * 250e-9)))
    assert float((out / g - 1).std()) == pytest.approx(sigma, rel=0.01)
    assert abs(float((out / g - 1).mean())) < 5 * sigma / math.sqrt(N)


def test_programmed_weights_map_to_one_pair_and_back():
    w = torch.tensor([[0.5, -0.25], [0.0, -1.0]])
    model = PCMInferenceModel(PCMInferenceParameters(prog_noise_scale=0.0, read_noise_scale=0.0, drift_scale=0.0))
    g_plus, g_minus, scale = model.to_conductances(w)
    assert float(scale) == pytest.approx(25.0)  # max|W| -> g_max
    assert torch.equal(g_plus, torch.tensor([[12.5, 0.0], [0.0, 0.0]]))
    assert torch.equal(g_minus, torch.tensor([[0.0, 6.25], [0.0, 25.0]]))
    chip = ProgrammedWeights(w, model, _gen(0))
    assert torch.allclose(chip.at(31536000.0, _gen(1)), w)


def test_global_drift_compensation_restores_the_mean_output():
    torch.manual_seed(0)
    gen = _gen(6)
    w = torch.randn(64, 48, generator=gen) * 0.1
    x = torch.randn(48, 256, generator=gen)
    model = PCMInferenceModel()
    chip = ProgrammedWeights(w, model, gen)
    y0 = (chip.at(0.0, _gen(7)) @ x).abs().mean()
    year = 31536000.0
    plain = (chip.at(year, _gen(8)) @ x).abs().mean()
    compensated = (chip.at(year, _gen(8), drift_compensation=True) @ x).abs().mean()
    # drift shrinks the outputs (nu ~ 0.05-0.1 over (1 year / 20 s) ~ 1.6e6: factor ~0.3-0.5)
    assert float(plain / y0) < 0.6
    assert float(compensated / y0) == pytest.approx(1.0, abs=0.03)
    # and the compensated weights point where the programmed ones do
    wc, wp = chip.at(year, _gen(9), drift_compensation=True), chip.programmed
    assert float((wc * wp).sum() / (wc.norm() * wp.norm())) > 0.9


def test_bad_parameters_name_the_key():
    from ept_hw.config import ConfigError

    with pytest.raises(ConfigError, match="g_min"):
        PCMInferenceParameters(g_min=30.0)
    with pytest.raises(ConfigError, match="t_0"):
        PCMInferenceParameters(t_0=0.0)
    chip = ProgrammedWeights(torch.ones(2, 2), PCMInferenceModel(), _gen(0))
    with pytest.raises(ValueError, match="t_inference"):
        chip.at(-1.0, _gen(0))


@pytest.mark.aihwkit
def test_statistics_match_aihwkit_pcm_like_noise_model():
    """Same weights through aihwkit's PCMLikeNoiseModel (program, then drift to 1 day) and ours:
    mean and std of the weights per target value agree within sampling error."""
    pcm = pytest.importorskip("aihwkit.inference.noise.pcm")
    gen = _gen(10)
    levels = torch.tensor([-1.0, -0.3, 0.05, 0.5, 1.0])
    w = levels.repeat(40_000).reshape(-1, 5)
    theirs_model = pcm.PCMLikeNoiseModel()
    torch.manual_seed(11)
    prog, nus = theirs_model.apply_programming_noise(w)
    theirs = theirs_model.apply_drift_noise(prog, nus, 86400.0)
    chip = ProgrammedWeights(w, PCMInferenceModel(), gen)
    ours = chip.at(86400.0, gen)
    for j in range(5):
        a, b = ours[:, j].double(), theirs[:, j].double()
        se = math.sqrt((a.var() + b.var()) / a.numel())
        assert abs(float(a.mean() - b.mean())) < 5 * se, f"level {float(levels[j])}"
        assert float(a.std() / b.std()) == pytest.approx(1.0, abs=0.03), f"level {float(levels[j])}"
        pa, pb = chip.programmed[:, j].double(), prog[:, j].double()
        assert float(pa.std() / pb.std()) == pytest.approx(1.0, abs=0.03)
