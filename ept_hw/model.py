"""The equilibrium-transformer block as a force F(z) (SCIENCE §1), its embeddings and readout.

    F(z) = −(z − x_in) + Attn(LN1(z)) + FFN(LN2(z)) − c·z,   logits = z W_hᵀ

Every weight matrix (W_Q, W_K, W_V, W_O, W_1, W_2, W_h) is a `Projection` made by the factory
passed in, read through `ops.project` so that Jacobian products are reads of the same array. The
remaining parameters (embeddings, LayerNorm gains/biases, FFN biases, qknorm gains) are plain
digital tensors in `self.params`.

The same functions evaluate F on complex states (holomorphic EP, SCIENCE §3): LayerNorm and the
qknorm RMSNorm use the non-conjugate variance mean((z − μ)²), softmax is a ratio of exponentials,
GELU is the tanh form. On real states they reduce to the usual real functions.

Differences from SCIENCE §1 worth knowing: LayerNorm/RMSNorm carry an epsilon (`ln_eps`) inside
the square root; weights are drawn N(0, 1/fan_in) (W_O, W_2 times `resinit`), embeddings
N(0, `embed_std`²); there is no final LayerNorm before the readout (logits = z* W_hᵀ).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch._functorch.config as functorch_config
import torch.autograd.forward_ad as fwAD
from torch import Tensor

from .config import ConfigError, check_choice, check_positive_int, check_range, to_dict
from .ops import PortRecorder, all_finite, project, transpose_read
from .projection import DigitalProjection, Projection, ProjectionFactory

logger = logging.getLogger(__name__)

#: `EquilibriumTransformer.compile_force` backends by name ("none": the eager force only).
COMPILE_BACKENDS = ("none", "aot_eager", "inductor")

__all__ = ["ModelConfig", "EquilibriumTransformer", "PROJECTION_NAMES", "gelu_tanh", "layer_norm", "softmax_ratio"]

#: Projection names, in the order their weights are drawn from the generator.
PROJECTION_NAMES = ("W_Q", "W_K", "W_V", "W_O", "W_1", "W_2", "W_h")


@dataclass(frozen=True)
class ModelConfig:
    """Shape and options of the block (SCIENCE §1)."""

    vocab_size: int = 65
    context: int = 64  # T: longest sequence; position embeddings have this many rows
    width: int = 64  # C
    heads: int = 4  # H
    ffn_mult: int = 4  # FFN hidden width = ffn_mult * C
    qknorm: bool = True
    damping: float = 1.0  # c
    resinit: float = 0.1  # W_O and W_2 initialised at this multiple of the default scale
    causal: bool = True
    ln_eps: float = 1e-5
    embed_std: float = 1.0

    def __post_init__(self) -> None:
        check_positive_int("vocab_size", self.vocab_size, 2)
        check_positive_int("context", self.context)
        check_positive_int("width", self.width)
        check_positive_int("heads", self.heads)
        check_positive_int("ffn_mult", self.ffn_mult)
        if self.width % self.heads:
            raise ConfigError("heads", self.heads, f"a divisor of width = {self.width}")
        for key in ("qknorm", "causal"):
            if not isinstance(getattr(self, key), bool):
                raise ConfigError(key, getattr(self, key), "true or false")
        check_range("damping", self.damping, 0.0)
        check_range("resinit", self.resinit, 0.0)
        check_range("ln_eps", self.ln_eps, 0.0, lo_open=True)
        check_range("embed_std", self.embed_std, 0.0, lo_open=True)

    @property
    def head_dim(self) -> int:
        return self.width // self.heads

    @property
    def hidden(self) -> int:
        return self.ffn_mult * self.width


_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


def gelu_tanh(x: Tensor) -> Tensor:
    """Tanh-form GELU, an entire function: real inputs use torch's fused kernel of the same formula."""
    if not x.is_complex():
        return torch.nn.functional.gelu(x, approximate="tanh")
    return 0.5 * x * (1.0 + torch.tanh(_SQRT_2_OVER_PI * (x + 0.044715 * x * x * x)))


def normalise(x: Tensor, eps: float | Tensor, center: bool = True) -> Tensor:
    """(x − μ)·rsqrt(var + eps) over the last dim (μ = 0 without `center`): LayerNorm/RMSNorm
    before their gain and bias. The variance is mean((x − μ)²) without conjugation, so the
    complex extension is holomorphic."""
    if center:
        x = x - x.mean(dim=-1, keepdim=True)
    var = (x * x).mean(dim=-1, keepdim=True)
    return x * torch.rsqrt(var + eps)


def layer_norm(x: Tensor, gain: Tensor, bias: Tensor | None, eps: float | Tensor, center: bool = True) -> Tensor:
    """LayerNorm (center=True) or RMSNorm (center=False) over the last dim: `normalise`, times
    `gain`, plus `bias`."""
    y = normalise(x, eps, center) * gain
    return y if bias is None else y + bias


def softmax_ratio(scores: Tensor, mask: Tensor | None) -> Tensor:
    """Softmax over the last dim as a ratio of exponentials; `mask` (bool, True = keep) zeroes entries.

    Real inputs use `torch.softmax` (the same function, numerically safer); complex inputs use the
    explicit ratio, shifted by the detached max of the real part (the ratio does not depend on it).
    """
    if not scores.is_complex():
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        return torch.softmax(scores, dim=-1)
    real = scores.real
    if mask is not None:
        real = real.masked_fill(~mask, float("-inf"))
    shift = real.amax(dim=-1, keepdim=True).detach()
    if mask is not None:
        # Masked entries get the shift itself (exp(0) = 1, finite) before being zeroed.
        scores = torch.where(mask, scores, shift.to(scores.dtype))
    e = torch.exp(scores - shift)
    if mask is not None:
        e = e * mask
    return e / e.sum(dim=-1, keepdim=True)


def _complex_of(dtype: torch.dtype) -> torch.dtype:
    return {torch.float32: torch.complex64, torch.float64: torch.complex128}[dtype]


class EquilibriumTransformer:
    """One equilibrium-transformer block: embeddings, force F(z), readout and loss.

    `projection_factory(name, weight)` builds each of W_Q, W_K, W_V, W_O, W_1, W_2, W_h from an
    initial weight (shape (out, in)) drawn from `generator`, so two twins built from generators
    with the same seed start identical.
    """

    def __init__(
        self,
        cfg: ModelConfig,
        projection_factory: ProjectionFactory,
        generator: torch.Generator,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ):
        if dtype not in (torch.float32, torch.float64):
            raise ConfigError("dtype", str(dtype), "torch.float32 or torch.float64")
        self.cfg = cfg
        self.dtype = dtype
        # where the parameters live (the projections get their weights there); the initial values
        # are drawn on the CPU from `generator`, so every device starts from the same numbers
        self.device = torch.device("cpu") if device is None else torch.device(device)
        C, V, T, Hd = cfg.width, cfg.vocab_size, cfg.context, cfg.hidden

        def draw(*shape: int, std: float) -> Tensor:
            return torch.randn(*shape, generator=generator, dtype=torch.float64).mul_(std).to(dtype=dtype,
                                                                                            device=self.device)

        tok = draw(V, C, std=cfg.embed_std)
        pos = draw(T, C, std=cfg.embed_std)
        shapes = {
            "W_Q": (C, C, 1.0),
            "W_K": (C, C, 1.0),
            "W_V": (C, C, 1.0),
            "W_O": (C, C, cfg.resinit),
            "W_1": (Hd, C, 1.0),
            "W_2": (C, Hd, cfg.resinit),
            "W_h": (V, C, 1.0),
        }
        self.projections: dict[str, Projection] = {}
        for name in PROJECTION_NAMES:
            out_f, in_f, scale = shapes[name]
            self.projections[name] = projection_factory(name, draw(out_f, in_f, std=scale / math.sqrt(in_f)))
        ones = lambda n: torch.ones(n, dtype=dtype, device=self.device)  # noqa: E731
        zeros = lambda n: torch.zeros(n, dtype=dtype, device=self.device)  # noqa: E731
        self.params: dict[str, Tensor] = {
            "tok_emb": tok,
            "pos_emb": pos,
            "ln1_g": ones(C),
            "ln1_b": zeros(C),
            "ln2_g": ones(C),
            "ln2_b": zeros(C),
            "b_1": zeros(Hd),
            "b_2": zeros(C),
        }
        if cfg.qknorm:
            self.params["q_norm_g"] = ones(cfg.head_dim)
            self.params["k_norm_g"] = ones(cfg.head_dim)
        self._masks: dict[int, Tensor] = {}
        self._mask_biases: dict[tuple[int, torch.dtype], Tensor] = {}
        self._compiled: Callable[[Tensor, Tensor], Tensor] | None = None
        self.compile_backend = "none"

    # ----------------------------------------------------------------- compiled force
    def compile_force(self, backend: str | Callable[..., Any]) -> None:
        """Serve the force's plain evaluations from `torch.compile(backend=backend)`: those of a real
        state with no forward-mode tangent, the model's own parameters and no port recorder: the
        free phase, the nudged states of EP and the Jᵀv of the tracking correction (a backward
        through the compiled graph). Dual-number J v, the port reads (recorder), evaluations at
        other parameters and complex states stay eager. `backend`: "inductor" (fused C++ kernels;
        the first evaluation of each new shape, and of each grad mode, compiles: seconds to tens
        of seconds), "aot_eager" (no code generation: the eager arithmetic, for tests), a callable
        backend, or "none" (off).

        Only a model whose projections are all exact matrices (`DigitalProjection`) compiles: an
        analog read draws from its tile's own generator, which the compiler does not trace.
        Results equal the eager force's up to float rounding (inductor fuses and reorders
        elementwise arithmetic; measured max |ΔF| ~1e-6 at the demo size). If compiling or
        running the compiled force fails (e.g. inductor without a C++ compiler), a warning is
        logged once and the eager force serves every call from then on."""
        if isinstance(backend, str):
            check_choice("compile", backend, COMPILE_BACKENDS)
        if backend == "none":
            self._compiled, self.compile_backend = None, "none"
            return
        analog = [name for name, p in self.projections.items() if not isinstance(p, DigitalProjection)]
        if analog:
            raise ConfigError("compile", str(backend), f"'none' for a model with non-digital projections ({', '.join(analog)})")
        # A compiled backward that frees ("donates") its saved tensors fails where a caller
        # back-propagates twice through one graph (`retain_graph`, the "frozen" correction); the
        # switch is process-wide and read when a backward is compiled, hence set here.
        functorch_config.donated_buffer = False
        self._compiled = torch.compile(self._plain_force, backend=backend)
        self.compile_backend = backend if isinstance(backend, str) else getattr(backend, "__name__", "custom")

    def _plain_force(self, z: Tensor, x_in: Tensor) -> Tensor:
        return self._force(z, x_in, None, None, direct=True)

    # ----------------------------------------------------------------- groups and state
    @staticmethod
    def param_group(name: str) -> str:
        """The comparison group of a digital parameter (projections are their own group)."""
        if name in ("tok_emb", "pos_emb"):
            return "embeddings"
        if name.startswith("ln"):
            return "layernorm"
        if name.startswith("b_"):
            return "ffn_bias"
        if name.endswith("norm_g"):
            return "qknorm"
        return name

    def state_dict(self) -> dict[str, Any]:
        return {
            "config": to_dict(self.cfg),
            "dtype": str(self.dtype),
            "projections": {n: p.state_dict() for n, p in self.projections.items()},
            "params": {n: t.detach().clone() for n, t in self.params.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("config") != to_dict(self.cfg):
            raise ValueError(f"checkpoint model config {state.get('config')} does not match {to_dict(self.cfg)}")
        missing = set(self.params) ^ set(state["params"])
        if missing or set(self.projections) != set(state["projections"]):
            raise ValueError(f"checkpoint parameters do not match the model (differ in {sorted(missing)})")
        for name, t in state["params"].items():
            if tuple(t.shape) != tuple(self.params[name].shape):
                raise ValueError(f"checkpoint {name}: shape {tuple(t.shape)}, expected {tuple(self.params[name].shape)}")
        for name, t in state["params"].items():
            self.params[name] = t.detach().to(dtype=self.dtype, device=self.device).clone()
        for name, s in state["projections"].items():
            self.projections[name].load_state_dict(s)

    # ----------------------------------------------------------------- validation
    def _check_idx(self, idx: Tensor) -> None:
        if not isinstance(idx, Tensor):
            raise TypeError(f"token ids must be a torch.Tensor, got {type(idx).__name__}")
        if idx.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise TypeError(f"token ids must be an integer tensor, got {idx.dtype}")
        if idx.dim() != 2:
            raise ValueError(f"token ids must have shape (B, T), got {tuple(idx.shape)}")
        if not 1 <= idx.shape[1] <= self.cfg.context:
            raise ValueError(f"sequence length {idx.shape[1]} outside [1, context = {self.cfg.context}]")
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= self.cfg.vocab_size):
            raise ValueError(
                f"token ids must lie in [0, {self.cfg.vocab_size - 1}], got range [{int(idx.min())}, {int(idx.max())}]"
            )

    def check_state(self, z: Tensor, what: str = "state", finite: bool = False) -> None:
        """Raise a clear error unless z has shape (B, T, C) with T ≤ context and the model's dtype."""
        if not isinstance(z, Tensor):
            raise TypeError(f"{what} must be a torch.Tensor, got {type(z).__name__}")
        if z.dim() != 3 or z.shape[-1] != self.cfg.width or not 1 <= z.shape[1] <= self.cfg.context:
            raise ValueError(
                f"{what} must have shape (B, T<={self.cfg.context}, C={self.cfg.width}), got {tuple(z.shape)}"
            )
        if z.dtype not in (self.dtype, _complex_of(self.dtype)):
            raise TypeError(f"{what} has dtype {z.dtype}, the model computes in {self.dtype} (or its complex form)")
        if finite and not all_finite(z):
            raise FloatingPointError(f"{what} contains NaN or inf")

    # ----------------------------------------------------------------- the block
    def embed(self, idx: Tensor, params: dict[str, Tensor] | None = None) -> Tensor:
        """x_in = tok[idx] + pos, shape (B, T, C)."""
        self._check_idx(idx)
        p = self.params if params is None else params
        return p["tok_emb"][idx.to(device=self.device, dtype=torch.long)] + p["pos_emb"][: idx.shape[1]]

    def _mask(self, T: int) -> Tensor:
        if T not in self._masks:
            self._masks[T] = torch.ones(T, T, dtype=torch.bool, device=self.device).tril()
        return self._masks[T]

    def _mask_bias(self, T: int, dtype: torch.dtype) -> Tensor:
        key = (T, dtype)
        if key not in self._mask_biases:
            self._mask_biases[key] = torch.zeros(T, T, dtype=dtype, device=self.device).masked_fill(~self._mask(T), float("-inf"))
        return self._mask_biases[key]

    def force(
        self,
        z: Tensor,
        x_in: Tensor,
        *,
        params: dict[str, Tensor] | None = None,
        recorder: PortRecorder | None = None,
    ) -> Tensor:
        """F(z) of SCIENCE §1; real or complex z of shape (B, T, C), x_in broadcastable to it.

        `params` replaces the digital parameters (e.g. leaves that require grad); `recorder`
        collects the projections' port quantities during a later backward.
        """
        self.check_state(z)
        if x_in.shape[-2:] != z.shape[-2:]:
            raise ValueError(f"x_in has shape {tuple(x_in.shape)}, incompatible with the state {tuple(z.shape)}")
        if (self._compiled is not None and params is None and recorder is None
                and not z.is_complex() and fwAD.unpack_dual(z).tangent is None
                and fwAD.unpack_dual(x_in).tangent is None):
            try:
                return self._compiled(z, x_in)
            except Exception as exc:  # the compiler or its toolchain failed: the eager force from now on
                logger.warning("compiled force (backend %s) failed, using the eager force from now on: %s: %s",
                               self.compile_backend, type(exc).__name__, exc)
                self._compiled, self.compile_backend = None, "none"
        return self._force(z, x_in, params, recorder)

    def _force(self, z: Tensor, x_in: Tensor, params: dict[str, Tensor] | None,
               recorder: PortRecorder | None, direct: bool = False) -> Tensor:
        cfg = self.cfg
        p = self.params if params is None else params
        P = self.projections
        B, T, C = z.shape
        H, d = cfg.heads, cfg.head_dim
        real_dtype = z.real.dtype if z.is_complex() else z.dtype

        # Under forward-mode AD (J v by dual numbers) every operand that carries no tangent sends
        # torch 2.13 down a slow zero-tangent path (10-30x per elementwise op); giving the constants
        # explicit zero tangents keeps J v within a few F.
        dual = fwAD.unpack_dual(z).tangent is not None

        def const(t: Tensor | float) -> Tensor | float:
            if not dual:
                return t
            if not isinstance(t, Tensor):
                t = torch.tensor(t, dtype=real_dtype, device=z.device)
            if fwAD.unpack_dual(t).tangent is not None:
                return t
            return fwAD.make_dual(t, torch.zeros_like(t))

        if dual:
            p = {name: const(t) for name, t in p.items()}
            x_in = const(x_in)
        ln_eps = const(cfg.ln_eps)

        # LN1 and LN2 normalise the same z: without a backward to come, one normalisation serves
        # both (the same arithmetic as two `layer_norm` calls, bit for bit); under autograd they stay
        # two, so that the backward still sums their contributions at z (bit-identical Jᵀv)
        z_hat = None if torch.is_grad_enabled() else normalise(z, ln_eps)

        def ln(gain: Tensor, bias: Tensor) -> Tensor:
            return layer_norm(z, gain, bias, ln_eps) if z_hat is None else z_hat * gain + bias

        h = ln(p["ln1_g"], p["ln1_b"])
        # `direct` (the compiled force: exact matrices, no recorder): a read is the projection's own
        # forward, differentiated by autograd as the matmul it is (Jᵀv: d W, the same product as
        # the transposed read), so that the compiler sees one graph with no autograd.Function in it
        read = (lambda proj, u, name, rec: proj.forward(u)) if direct else project
        q = read(P["W_Q"], h, "W_Q", recorder).view(B, T, H, d).transpose(1, 2)
        k = read(P["W_K"], h, "W_K", recorder).view(B, T, H, d).transpose(1, 2)
        v = read(P["W_V"], h, "W_V", recorder).view(B, T, H, d).transpose(1, 2)
        if cfg.qknorm:
            q = layer_norm(q, p["q_norm_g"], None, ln_eps, center=False)
            k = layer_norm(k, p["k_norm_g"], None, ln_eps, center=False)
        scores = (q @ k.transpose(-1, -2)) * const(1.0 / math.sqrt(d))
        if scores.is_complex():
            att = softmax_ratio(scores, self._mask(T) if cfg.causal else None)
        else:
            # the same softmax with the causal mask as an additive −inf bias (no masked_fill on duals)
            att = torch.softmax(scores + const(self._mask_bias(T, real_dtype)) if cfg.causal else scores, dim=-1)
        mixed = (att @ v).transpose(1, 2).reshape(B, T, C)
        attn_out = read(P["W_O"], mixed, "W_O", recorder)

        h2 = ln(p["ln2_g"], p["ln2_b"])
        hidden = gelu_tanh(read(P["W_1"], h2, "W_1", recorder) + p["b_1"])
        ffn_out = read(P["W_2"], hidden, "W_2", recorder) + p["b_2"]

        return x_in - const(1.0 + cfg.damping) * z + attn_out + ffn_out

    # ----------------------------------------------------------------- readout
    def logits(self, z: Tensor, recorder: PortRecorder | None = None) -> Tensor:
        self.check_state(z)
        return project(self.projections["W_h"], z, "W_h", recorder)

    def _check_targets(self, z: Tensor, targets: Tensor) -> None:
        self._check_idx(targets)
        if tuple(targets.shape) != tuple(z.shape[:2]):
            raise ValueError(f"targets have shape {tuple(targets.shape)}, expected {tuple(z.shape[:2])}")

    def loss(self, z: Tensor, targets: Tensor) -> Tensor:
        """Mean cross-entropy over all B·T tokens (real z)."""
        self._check_targets(z, targets)
        logits = self.logits(z)
        return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                 targets.reshape(-1).to(device=logits.device, dtype=torch.long))

    def readout_error(self, z: Tensor, targets: Tensor, n_tokens: int | None = None) -> Tensor:
        """δ_h = (softmax(logits) − onehot)/n_tokens: the cotangent of the mean CE at the logits.

        `n_tokens` defaults to targets.numel() (B·T); callers that stack several copies of one batch
        pass the original count. A ratio of exponentials, so it extends holomorphically to complex z.
        """
        self._check_targets(z, targets)
        logits = self.logits(z)
        prob = softmax_ratio(logits, None)
        onehot = torch.nn.functional.one_hot(targets.to(device=prob.device, dtype=torch.long),
                                             self.cfg.vocab_size).to(prob.dtype)
        return (prob - onehot) / (targets.numel() if n_tokens is None else n_tokens)

    def loss_grad(self, z: Tensor, targets: Tensor, n_tokens: int | None = None) -> Tensor:
        """∇_z of the mean CE, through the transposed read of W_h (holomorphic for complex z)."""
        return transpose_read(self.projections["W_h"], self.readout_error(z, targets, n_tokens))
