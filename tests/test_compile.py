"""torch.compile of the twin's plain force evaluations (`EquilibriumTransformer.compile_force`).

The default suite checks the compiled path with backends that generate no code (bit-identical to
eager); the inductor path (C++ code generation, tens of seconds) runs under `-m slow`.
"""

from __future__ import annotations

import logging

import pytest
import torch
import torch.autograd.forward_ad as fwAD

from ept_hw.config import ConfigError
from ept_hw.estimators import EPEstimator, EstimatorConfig, free_phase
from ept_hw.model import EquilibriumTransformer, ModelConfig
from ept_hw.projection import digital_factory
from ept_hw.relaxation import SolverConfig
from experiments.presets import load_run_config
from trainer.config import RunConfig, resolve_vocab, run_config_from_dict
from trainer.loop import build_paths, physics_notes

@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Compiled code is cached per code object (shared by every model) up to a recompile limit:
    each test starts from an empty cache, as a new process would."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


CFG = ModelConfig(vocab_size=13, context=8, width=16, heads=2)
SOLVER = SolverConfig(min_steps=25, max_steps=25, tol=0.0)


def _model(seed: int = 0) -> EquilibriumTransformer:
    return EquilibriumTransformer(CFG, digital_factory, torch.Generator().manual_seed(seed), torch.float32)


def _batch(seed: int = 1, B: int = 3, T: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 13, (B, T), generator=g), torch.randint(0, 13, (B, T), generator=g)


class _Counting:
    """A backend that runs the traced graph as it is (no code generation) and counts compilations."""

    __name__ = "counting"

    def __init__(self) -> None:
        self.graphs = 0

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list) -> object:
        self.graphs += 1
        return gm.forward


def test_compiled_free_phase_is_the_eager_one_bit_for_bit():
    eager, comp = _model(), _model()
    backend = _Counting()
    comp.compile_force(backend)
    idx, _ = _batch()
    _, a = free_phase(eager, idx, SOLVER)
    _, b = free_phase(comp, idx, SOLVER)
    assert backend.graphs >= 1  # the compiled force served the relaxation
    assert torch.equal(a.z, b.z)
    # a second batch shape recompiles (or reuses a dynamic graph) and is still exact
    idx2, _ = _batch(seed=2, B=5, T=6)
    assert torch.equal(free_phase(eager, idx2, SOLVER)[1].z, free_phase(comp, idx2, SOLVER)[1].z)
    # a grad-mode evaluation (the Jᵀv of the nudge) goes through the compiler too
    before = backend.graphs
    x_in = comp.embed(idx)
    p = x_in.clone().requires_grad_(True)
    torch.autograd.grad(comp.force(p, x_in), p, torch.ones_like(p))
    assert backend.graphs > before


def test_aot_eager_backend_by_name_derivatives_and_an_ep_estimate():
    eager, comp = _model(), _model()
    comp.compile_force("aot_eager")
    assert comp.compile_backend == "aot_eager"
    idx, targets = _batch()
    x_in = eager.embed(idx)
    g = torch.Generator().manual_seed(3)
    z = x_in + 0.1 * torch.randn(x_in.shape, generator=g)
    v = torch.randn(x_in.shape, generator=g)
    with torch.no_grad():
        assert torch.equal(eager.force(z, x_in), comp.force(z, x_in))
    # Jᵀv by a backward through the compiled graph (reads as plain matmuls) is the eager one, which
    # reads through the projection's autograd.Function; dual numbers (J v) stay eager
    grads = []
    for m in (eager, comp):
        p = z.clone().requires_grad_(True)
        grads.append(torch.autograd.grad(m.force(p, x_in), p, v)[0])
    assert torch.equal(grads[0], grads[1])
    jvs = []
    for m in (eager, comp):
        with torch.no_grad(), fwAD.dual_level():
            jvs.append(fwAD.unpack_dual(m.force(fwAD.make_dual(z, v), x_in)).tangent)
    assert torch.equal(jvs[0], jvs[1])
    # and a whole EP estimate (free phase, nudged phases, ports) is the same
    # and whole EP estimates (free phase, nudged phases, ports) are the same; "frozen" back-propagates
    # repeatedly through one compiled graph (retain_graph)
    for est_cfg in (EstimatorConfig(nudge="centered", beta=0.2, t2=10, t2sel=0, jvp="secant"),
                    EstimatorConfig(nudge="centered", beta=0.2, t2=10, t2sel=0, correction="frozen")):
        est = EPEstimator(est_cfg, SOLVER)
        ga, gb = est.compute(eager, idx, targets), est.compute(comp, idx, targets)
        for part in ("weight_grads", "digital_grads"):
            for name, t in getattr(ga, part).items():
                assert torch.equal(t, getattr(gb, part)[name]), (est_cfg.correction, name)


def test_the_compiled_force_follows_weight_updates_and_loaded_checkpoints():
    """The compiled graph reads the model's current tensors: after an in-place update, a program()
    and a load_state_dict (new tensors) it still equals the eager force of the same weights."""
    eager, comp = _model(), _model()
    comp.compile_force("aot_eager")
    idx, _ = _batch()
    x_in = eager.embed(idx)

    def same() -> bool:
        with torch.no_grad():
            return torch.equal(comp.force(x_in, x_in), eager.force(x_in, x_in))

    assert same()
    for m in (eager, comp):  # an SGD-like in-place step on a projection and a digital parameter
        m.projections["W_1"].parameter.sub_(0.1)
        m.params["ln1_g"].mul_(1.5)
    assert same()
    w = torch.randn(CFG.width, CFG.width, generator=torch.Generator().manual_seed(6))
    for m in (eager, comp):
        m.projections["W_O"].program(w)
    assert same()
    other = _model(seed=9).state_dict()
    for m in (eager, comp):
        m.load_state_dict(other)
    assert same()
    with torch.no_grad():
        assert torch.equal(comp.force(x_in, x_in), _model(seed=9).force(x_in, x_in))


def test_port_reads_and_other_parameters_take_the_eager_force():
    """A recorder (the port reads of EP) or explicit parameters (leaves that require grad) need the
    projections' autograd.Function and the given tensors: those calls bypass the compiled graph."""
    from ept_hw.ops import PortRecorder

    eager, comp = _model(), _model()
    comp.compile_force(_Counting())
    idx, _ = _batch()
    x_in = eager.embed(idx)
    cot = torch.randn(x_in.shape, generator=torch.Generator().manual_seed(5))
    recorded = []
    for m in (eager, comp):
        rec = PortRecorder()
        z = x_in.clone().requires_grad_(True)
        torch.autograd.grad(m.force(z, x_in, recorder=rec), z, cot)
        recorded.append(rec.weight_grads())
    assert set(recorded[1]) == set(recorded[0]) and len(recorded[0]) == 6
    for name, g in recorded[0].items():
        assert torch.equal(g, recorded[1][name]), name
    params = {k: (2.0 * v).requires_grad_(True) for k, v in comp.params.items()}
    with torch.no_grad():
        assert torch.equal(comp.force(x_in, x_in, params=params), eager.force(x_in, x_in, params=params))
        assert not torch.equal(comp.force(x_in, x_in, params=params), comp.force(x_in, x_in))


def test_a_failing_compiler_falls_back_to_the_eager_force(caplog):
    def broken(gm, example_inputs):
        raise RuntimeError("no C++ compiler here")

    eager, comp = _model(), _model()
    comp.compile_force(broken)
    idx, _ = _batch()
    x_in = eager.embed(idx)
    with caplog.at_level(logging.WARNING, logger="ept_hw.model"), torch.no_grad():
        out = comp.force(x_in, x_in)
        again = comp.force(x_in, x_in)
    assert torch.equal(out, eager.force(x_in, x_in).detach()) and torch.equal(again, out)
    assert comp.compile_backend == "none"
    warnings = [r for r in caplog.records if "eager force from now on" in r.getMessage()]
    assert len(warnings) == 1  # said once, then eager without retrying


def test_compile_is_refused_for_analog_projections_and_unknown_backends():
    from trainer.analog import build_analog_factory
    from trainer.config import AnalogConfig

    factory, _ = build_analog_factory(AnalogConfig(device="ecram"), 0)
    analog = EquilibriumTransformer(CFG, factory, torch.Generator().manual_seed(0), torch.float32)
    with pytest.raises(ConfigError, match="non-digital projections"):
        analog.compile_force("aot_eager")
    with pytest.raises(ConfigError, match="compile"):
        _model().compile_force("fast")
    with pytest.raises(ConfigError, match="compile"):
        run_config_from_dict({"compile": "fast"})
    assert RunConfig().compile == "none"


def test_run_config_compiles_the_twin_only_and_the_report_says_so():
    cfg = resolve_vocab(load_run_config("tiny", {"compile": "aot_eager"}), 65)
    paths = build_paths(cfg)
    assert paths["twin"].model.compile_backend == "aot_eager"
    assert paths["analog"].model.compile_backend == "none"
    assert any("torch.compile (backend aot_eager;" in n for n in physics_notes(cfg))
    assert not any("torch.compile" in n for n in physics_notes(resolve_vocab(load_run_config("tiny"), 65)))


@pytest.mark.slow
def test_inductor_force_matches_eager_within_rounding():
    """The inductor path (C++ code generation; needs a C++ compiler). Fused elementwise arithmetic
    rounds differently: the force agrees to ~1e-6 of its scale, far below any bin of the analog
    periphery, and the free phase to the same order."""
    eager, comp = _model(), _model()
    comp.compile_force("inductor")
    idx, _ = _batch()
    x_in = eager.embed(idx)
    with torch.no_grad():
        fa, fb = eager.force(x_in, x_in), comp.force(x_in, x_in)
    assert comp.compile_backend == "inductor"  # no fallback happened
    assert float((fa - fb).abs().max()) <= 1e-5 * float(fa.abs().max())
    za, zb = free_phase(eager, idx, SOLVER)[1].z, free_phase(comp, idx, SOLVER)[1].z
    assert float((za - zb).abs().max()) <= 1e-4 * float(za.abs().max())
    # Jᵀv through the compiled forward and backward graphs
    v = torch.randn(x_in.shape, generator=torch.Generator().manual_seed(4))
    grads = []
    for m in (eager, comp):
        p = za.clone().requires_grad_(True)
        grads.append(torch.autograd.grad(m.force(p, x_in), p, v)[0])
    assert comp.compile_backend == "inductor"
    assert float((grads[0] - grads[1]).abs().max()) <= 1e-5 * float(grads[0].abs().max())
