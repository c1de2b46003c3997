"""DAC/ADC periphery of an analog matrix-vector read (aihwkit `IOParameters`, SEMANTICS §1.1).

`analog_read` realises y = W x (or Wᵀ d for the transposed read) with aihwkit's order of
operations: noise management (divide by α) -> input quantisation (DAC, step inp_res·2·inp_bound)
-> clip ±inp_bound -> input noise -> MVM -> weight read noise -> output noise -> output
quantisation (ADC, step out_res·2·out_bound) -> clip ±out_bound -> multiply by α (and by the
bound-management factor). Vectorised over every leading dimension. Two implementations of the
same read (`PeripheryReader`): compiled numba passes around the torch product, with the output
noise from `devices.normals`, and plain torch ops with `torch.randn`.

Where we differ from aihwkit
----------------------------
- Not modelled: `ir_drop`, `out_nonlinearity`, `*_asymmetry`, `slope_calibration`,
  `v_offset_*`, `r_series`, `w_read_asymmetry_dtod`, `mv_type` other than ONE_PASS, and the
  bound-management types other than NONE/ITERATIVE.
- aihwkit silently turns bound management off for the backward (transposed) pass; here a read
  does what its `IOParameters` say. The tile presets in `crossbar.presets` therefore give the
  backward IO `bound_management="none"`, as aihwkit effectively runs it.
- `PCM_READ` weight noise: σ_i = w_noise·sqrt(Σ_j |W_ij| x_j²) (the current-dependent form of
  aihwkit's docstring, without its w_max normalisation).
- Iterative bound management re-reads only the vectors that saturated (aihwkit re-reads the whole
  batch); the outputs are the same in distribution.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from devices.normals import draw_key, fill_normals, padded
from ept_hw.config import ConfigError, check_choice, check_finite_range

from . import io_kernels

__all__ = ["IOParameters", "PeripheryReader", "ReadStats", "analog_read", "effective_res", "res_from_bits", "bits_from_res",
           "BOUND_MANAGEMENT", "NOISE_MANAGEMENT",
           "W_NOISE_TYPES"]

BOUND_MANAGEMENT = ("none", "iterative")
NOISE_MANAGEMENT = ("none", "abs_max", "max", "constant")
W_NOISE_TYPES = ("none", "additive_constant", "pcm_read")


def res_from_bits(bits: int) -> float:
    """aihwkit's convention: a converter of b bits has res = 1/(2^b − 2) (e.g. 7 bits -> 1/126)."""
    if isinstance(bits, bool) or not isinstance(bits, int) or bits < 2:
        raise ConfigError("bits", bits, "an integer >= 2")
    return 1.0 / (2**bits - 2)


def bits_from_res(res: float) -> float | None:
    """Inverse of `res_from_bits`: log2(steps + 2) bits, with steps = res when res > 1 (a number of
    steps) else 1/res; None for res <= 0 (no quantisation)."""
    if res <= 0.0:
        return None
    steps = res if res > 1.0 else 1.0 / res
    return math.log2(steps + 2.0)


def effective_res(res: float) -> float:
    """aihwkit `checkRes`: a resolution > 1 is a number of steps (-> 1/res); <= 0 means none."""
    if res <= 0.0:
        return 0.0
    return 1.0 / res if res > 1.0 else res


@dataclass(frozen=True)
class IOParameters:
    """aihwkit `IOParameters` (names and defaults as aihwkit 1.2), the subset this simulator models."""

    is_perfect: bool = False
    inp_bound: float = 1.0
    inp_noise: float = 0.0
    inp_res: float = 1.0 / 126.0
    inp_sto_round: bool = False
    out_bound: float = 12.0
    out_noise: float = 0.06
    out_res: float = 1.0 / 510.0
    out_sto_round: bool = False
    out_scale: float = 1.0
    bound_management: str = "iterative"
    noise_management: str = "abs_max"
    nm_thres: float = 0.0
    w_noise: float = 0.0
    w_noise_type: str = "none"
    max_bm_factor: float = 1000.0
    max_bm_res: float = 0.25
    bm_test_negative_bound: bool = True

    def __post_init__(self) -> None:
        check_finite_range("inp_bound", self.inp_bound, 0.0, lo_open=True)
        check_finite_range("out_bound", self.out_bound, 0.0, lo_open=True)
        for key in ("inp_noise", "out_noise", "w_noise", "nm_thres", "inp_res", "out_res"):
            check_finite_range(key, getattr(self, key), 0.0)
        check_finite_range("out_scale", self.out_scale, 0.0, lo_open=True)
        check_finite_range("max_bm_factor", self.max_bm_factor, 1.0)
        check_finite_range("max_bm_res", self.max_bm_res, 0.0, lo_open=True)
        check_choice("bound_management", self.bound_management, BOUND_MANAGEMENT)
        check_choice("noise_management", self.noise_management, NOISE_MANAGEMENT)
        check_choice("w_noise_type", self.w_noise_type, W_NOISE_TYPES)
        if self.noise_management != "none" and self.inp_bound != 1.0 and not self.is_perfect:
            raise ConfigError("inp_bound", self.inp_bound, "1.0 when noise_management is on (as aihwkit)")
        if self.noise_management == "constant" and self.nm_thres <= 0.0 and not self.is_perfect:
            raise ConfigError("nm_thres", self.nm_thres, "> 0 with noise_management = 'constant'")

    @property
    def inp_step(self) -> float:
        return effective_res(self.inp_res) * 2.0 * self.inp_bound

    @property
    def out_step(self) -> float:
        return effective_res(self.out_res) * 2.0 * self.out_bound


class ReadStats:
    """Counts of one tile's reads: MVM vectors (including bound-management re-reads), ADC
    conversions (output values converted), ADC clips (outputs at ±out_bound in the kept read)."""

    def __init__(self) -> None:
        self.mvm_reads = 0
        self.adc_conversions = 0
        self.adc_clipped = 0

    def as_dict(self) -> dict[str, int]:
        return {"mvm_reads": self.mvm_reads, "adc_conversions": self.adc_conversions, "adc_clipped": self.adc_clipped}

    def load(self, state: dict[str, Any]) -> None:
        self.mvm_reads = int(state["mvm_reads"])
        self.adc_conversions = int(state["adc_conversions"])
        self.adc_clipped = int(state["adc_clipped"])


def _draw(rand: Any, shape: torch.Size | tuple[int, ...], generator: torch.Generator, dtype: torch.dtype,
          device: torch.device, blocks: int) -> Tensor:
    """`rand` (torch.rand or torch.randn) of `shape` from `generator`; with `blocks` > 1 the draw is
    made for one block of shape[0] / blocks rows and repeated down the blocks (each block sees the
    same numbers, as if the generator were reset before each block)."""
    if blocks == 1:
        return rand(shape, generator=generator, device=generator.device, dtype=dtype).to(device)
    one = rand((shape[0] // blocks, *shape[1:]), generator=generator, device=generator.device, dtype=dtype)
    return torch.cat(blocks * [one.to(device)])


def _quantise_(v: Tensor, stochastic: bool, generator: torch.Generator, blocks: int = 1) -> Tensor:
    """Round in place to integers (values already in units of the step)."""
    if stochastic:
        v.add_(_draw(torch.rand, v.shape, generator, v.dtype, v.device, blocks))
        return v.floor_()
    return v.round_()


class _PassBuffers:
    """A compiled pass's working arrays, views of its reader's arena (`PeripheryReader._buffers_for`):
    the DAC inputs xu (n, k) and a tensor sharing them, the noise, the clip counts (|y| at the
    bound, y at the upper bound: two rows of one array), α."""

    __slots__ = ("xu", "xu_t", "noise", "count_abs", "count_pos", "alpha")

    def __init__(self, xu: np.ndarray, noise: np.ndarray, counts: np.ndarray, alpha: np.ndarray):
        self.xu, self.noise, self.alpha = xu, noise, alpha
        self.count_abs, self.count_pos = counts[0], counts[1]
        self.xu_t = torch.from_numpy(xu)


class PeripheryReader:
    """The read of one `IOParameters`, with everything that does not depend on the data worked
    out once: step sizes, which stages act, and the weight matrix in ADC-per-DAC units (kept for
    as long as the weight tensor is unchanged). `analog_read` is the same read as a function.

    Built once per periphery (an `AnalogTile` holds one per direction). Two implementations of
    the same read:

    - **compiled** (`crossbar.io_kernels`, numba): the DAC stage and the ADC stage are one pass
      each around the torch product, and the output noise is drawn by `devices.normals`
      (Philox4x32-10 and Box–Muller, one 64-bit key drawn from `generator` per pass). Used for
      float32 CPU reads when numba imports and the periphery has none of: stochastic rounding,
      input noise, weight noise, noise management "max" (`compiled=None` decides, True insists,
      False refuses).
    - **torch**: one tensor operation per stage that acts and no Python-side checks; its random
      draws (order, shapes, generator) and arithmetic are those of the straightforward
      implementation, so its outputs are bit-identical to it.

    Both give the same read in distribution; given the same generator state they draw different
    noise (the compiled path's normals are not torch's `randn` stream). Without output noise
    they agree bit for bit (the same product, the same float32 operations in the same order;
    `tests/test_io_compiled.py`).
    """

    def __init__(self, io: IOParameters, compiled: bool | None = None):
        self.io = io
        self.perfect = io.is_perfect
        in_step, out_step = io.inp_step, io.out_step
        self.in_unit = in_step if in_step > 0 else 1.0
        self.out_unit = out_step if out_step > 0 else 1.0
        self.quantise_in = in_step > 0
        self.quantise_out = out_step > 0
        self.in_bound = io.inp_bound / self.in_unit
        self.bound = io.out_bound / self.out_unit
        self.inp_noise = io.inp_noise / self.in_unit if io.inp_noise > 0.0 else 0.0
        self.has_w_noise = io.w_noise > 0.0 and io.w_noise_type != "none"
        self.w_sigma = io.w_noise * self.in_unit / self.out_unit
        self.out_noise = io.out_noise / self.out_unit if io.out_noise > 0.0 else 0.0
        self.w_factor = self.in_unit / self.out_unit
        self.final_factor = self.out_unit * io.out_scale
        nm = io.noise_management
        # |x|/max|x| <= 1 = inp_bound: the DAC clip cannot act (rounding keeps ±1 on the grid)
        self.within = nm == "abs_max" and io.nm_thres == 0.0 and io.inp_bound >= 1.0
        self.iterative = io.bound_management == "iterative"
        res = effective_res(io.inp_res)
        self.bm_factors: list[float] = []
        factor = 1.0
        while self.iterative:
            nxt = factor * 2.0
            if nxt > io.max_bm_factor or (res > 0.0 and nxt * res > io.max_bm_res):
                break
            self.bm_factors.append(nxt)
            factor = nxt
        self.bound_managed = bool(self.bm_factors)
        self._w_key: tuple | None = None
        self._w_src: Tensor | None = None
        self._w_units_t: Tensor | None = None
        nm_mode = {"none": io_kernels.NM_NONE, "abs_max": io_kernels.NM_ABS_MAX,
                   "constant": io_kernels.NM_CONSTANT}.get(nm)
        covered = (io_kernels.AVAILABLE and nm_mode is not None and not io.inp_sto_round and not io.out_sto_round
                   and not self.inp_noise and not self.has_w_noise)
        if compiled and not self.perfect and not covered:
            raise ValueError("PeripheryReader(compiled=True): the compiled read does not cover this periphery "
                             "(numba missing, stochastic rounding, input or weight noise, or noise_management 'max')")
        self.compiled = covered and compiled is not False and not self.perfect
        self._nm_mode = nm_mode
        # the constants as the torch path's float32 ops round them
        self._thres, self._in_unit32 = np.float32(io.nm_thres), np.float32(self.in_unit)
        self._in_bound32, self._sigma32, self._bound32 = (np.float32(self.in_bound), np.float32(self.out_noise),
                                                          np.float32(self.bound))
        # the compiled pass's arrays (`_buffers_for`): flat DAC inputs, noise, clip counts, α
        self._arena: tuple[np.ndarray, ...] = (np.empty(0, np.float32), np.empty(0, np.float32),
                                               np.empty(0, np.int64), np.empty(0, np.float32))
        self._buffers: dict[tuple[int, int, int], _PassBuffers] = {}  # views of them, per main-pass shape
        self._key_buf = torch.empty(2, dtype=torch.int64)
        self._factor_of: tuple[float, np.float32] = (math.nan, np.float32(math.nan))  # (digital scale, factor)
        self._cpu_generator: torch.Generator | None = None  # the last generator found to be on the CPU

    def _scaled_weights_t(self, w: Tensor) -> Tensor:
        """(w·in_unit/out_unit)ᵀ, recomputed only when `w` (storage, layout or content) changes.
        The tensor last seen, at the same storage and version, is the usual case and is tested
        first (a tensor's metadata and contents change only with its version or its storage)."""
        if w is self._w_src and w._version == self._w_key[3] and w.data_ptr() == self._w_key[0]:
            return self._w_units_t
        key = (w.data_ptr(), tuple(w.shape), w.stride(), w._version, w.dtype, w.device)
        if self._w_units_t is None or key != self._w_key or self._w_src is None:
            self._w_units_t = (w.detach() * self.w_factor).T
            self._w_key = key
        self._w_src = w  # held so that its storage (and data_ptr) is not reused while cached
        return self._w_units_t

    def _pass(self, w: Tensor, w_units_t: Tensor, x: Tensor, inv_alpha: Tensor, generator: torch.Generator,
              per_row: bool, blocks: int = 1) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """One read of the (N, in) inputs x·inv_alpha in units of the DAC and ADC steps (scalings
        folded into the weights, output noise fused into the product). Returns the clipped
        outputs in ADC units and what `_clip_` returns. With `blocks` > 1 the N rows are that many
        equal blocks that see the same random numbers (`_draw`)."""
        io = self.io
        xu = x * (inv_alpha / self.in_unit)
        if self.quantise_in:
            _quantise_(xu, io.inp_sto_round, generator, blocks)
        if not self.within:
            xu.clamp_(-self.in_bound, self.in_bound)
        if self.inp_noise:
            xu.add_(_draw(torch.randn, xu.shape, generator, xu.dtype, xu.device, blocks), alpha=self.inp_noise)
        if self.out_noise and not self.has_w_noise:
            if blocks == 1:
                noise = _draw(torch.randn, (xu.shape[0], w.shape[0]), generator, xu.dtype, xu.device, 1)
                y = torch.addmm(noise, xu, w_units_t, beta=self.out_noise)
            else:  # one block's noise into each block's product (no repeated copy of the noise)
                rows = xu.shape[0] // blocks
                noise = torch.randn((rows, w.shape[0]), generator=generator, device=generator.device,
                                    dtype=xu.dtype).to(xu.device)
                y = torch.empty((xu.shape[0], w.shape[0]), dtype=xu.dtype, device=xu.device)
                for b in range(blocks):
                    torch.addmm(noise, xu[b * rows:(b + 1) * rows], w_units_t, beta=self.out_noise,
                                out=y[b * rows:(b + 1) * rows])
        else:
            y = xu @ w_units_t
            if self.has_w_noise:
                if io.w_noise_type == "additive_constant":
                    sigma = self.w_sigma * xu.norm(dim=-1, keepdim=True)
                else:
                    sigma = self.w_sigma * ((xu * xu) @ w.abs().T).sqrt()
                y.add_(sigma * _draw(torch.randn, y.shape, generator, y.dtype, y.device, blocks))
            if self.out_noise:
                y.add_(_draw(torch.randn, y.shape, generator, y.dtype, y.device, blocks), alpha=self.out_noise)
        if self.quantise_out:
            _quantise_(y, io.out_sto_round, generator, blocks)
        return self._clip_(y, per_row)

    def _pass_compiled(self, w_units_t: Tensor, x: Tensor, alpha: np.ndarray | None, mode: int,
                       generator: torch.Generator, per_row: bool, digital_scale: float,
                       blocks: int = 1) -> tuple[Tensor, Tensor | None, Tensor | None, np.ndarray]:
        """`_pass` by the compiled stages: `io_kernels.prepare` (α into the pass's own buffer, or
        from `alpha` with `mode` NM_GIVEN; DAC), the torch product, the output noise (a
        `devices.normals` draw under one key from `generator`, one block's worth that every block
        shares) and `io_kernels.finish` (noise, ADC, clip, counts, and the final scaling by
        α·final_factor·digital_scale, which the torch path applies after bound management).
        Returns what `_pass` returns, y rescaled, and the α (N,) the pass used (a view of the
        reader's arena: valid until its next pass)."""
        if x.requires_grad:
            x = x.detach()
        xn = x.numpy() if x.is_contiguous() else x.contiguous().numpy()
        n, k = xn.shape
        m = w_units_t.shape[1]
        rows = n // blocks
        buf = self._buffers_for(n, k, rows * m, alpha is not None)
        if alpha is None:
            alpha = buf.alpha
        io_kernels.prepare(xn, alpha, mode, self._thres, self._in_unit32, self.quantise_in, self._in_bound32,
                           not self.within, buf.xu)
        y = buf.xu_t @ w_units_t
        noise = buf.noise
        if self.out_noise:  # one key per pass, one block's worth of normals
            fill_normals(noise, *draw_key(generator, self._key_buf))
        if digital_scale != self._factor_of[0]:  # float32(final_factor·digital_scale), per digital scale
            self._factor_of = (digital_scale, np.float32(self.final_factor * digital_scale))
        if not io_kernels.finish(y.numpy(), noise, self._sigma32, rows, self.quantise_out, self._bound32, alpha,
                                 self._factor_of[1], buf.count_abs, buf.count_pos):
            return y, None, None, alpha
        clipped = torch.from_numpy(buf.count_abs.copy())  # a copy: the buffer serves the next pass
        touched = None
        if per_row:
            touched = clipped > 0 if self.io.bm_test_negative_bound else torch.from_numpy(buf.count_pos > 0)
        return y, clipped, touched, alpha

    def _buffers_for(self, n: int, k: int, noise_n: int, given_alpha: bool) -> "_PassBuffers":
        """The compiled pass's buffers for n input vectors of length k (and noise_n normals):
        views of one set of arrays per reader (`_arena`), grown to the largest read it has made,
        so a reader holds one read's worth of memory whatever the shapes it reads (a fresh 100 kB
        array costs its page faults on every read). A main pass's views are kept per shape, so a
        read of a known shape makes no view and allocates nothing but its output; bound-management
        re-reads (`given_alpha`) come in many sizes and take fresh views. Contents are consumed
        within a pass: the caller copies what it keeps (α, the clip counts) before the next one."""
        key = (n, k, noise_n)
        if not given_alpha:
            buf = self._buffers.get(key)
            if buf is not None:
                return buf
        noise_n = padded(noise_n) if self.out_noise else 0
        xu, noise, counts, alpha = self._arena
        if xu.size < n * k or noise.size < noise_n or alpha.size < n:
            cap = max(n, alpha.size)
            self._arena = xu, noise, counts, alpha = (
                np.empty(max(n * k, xu.size), dtype=np.float32), np.empty(max(noise_n, noise.size), dtype=np.float32),
                np.empty(2 * cap, dtype=np.int64), np.empty(cap, dtype=np.float32))
            self._buffers.clear()  # views of the old arrays
        view = _PassBuffers(xu[:n * k].reshape(n, k), noise[:noise_n], counts[:2 * n].reshape(2, n), alpha[:n])
        if not given_alpha:
            self._buffers[key] = view
        return view

    def _reread(self, w: Tensor, w_units_t: Tensor, x: Tensor, alpha: Tensor, generator: torch.Generator,
                compiled_scale: float | None) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """A bound-management re-read of the vectors x with the noise-management scales `alpha` (N, 1).
        `compiled_scale`: None for the torch path, else the compiled path with this digital scale."""
        if compiled_scale is not None:
            a = alpha.reshape(-1).contiguous().numpy()  # `alpha` is the caller's fresh product
            return self._pass_compiled(w_units_t, x, a, io_kernels.NM_GIVEN, generator, True, compiled_scale)[:3]
        return self._pass(w, w_units_t, x, alpha.reciprocal(), generator, True)

    def _clip_(self, y: Tensor, per_row: bool) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """Clip y to ±bound in place. Returns y, the per-vector count of outputs at the bound
        (None when there are none) and, with `per_row`, the per-vector saturation that bound
        management tests (the upper bound only unless `bm_test_negative_bound`; None when no
        output reached the bound)."""
        a = y.abs()
        if not float(a.max()) >= self.bound:  # the usual case: one test, nothing clipped, nothing saturated
            return y, None, None
        clipped = (a >= self.bound).sum(dim=-1)
        touched = None
        if per_row:
            touched = clipped > 0 if self.io.bm_test_negative_bound else (y >= self.bound).any(dim=-1)
        y.clamp_(-self.bound, self.bound)
        return y, clipped, touched

    def _bound_managed(self, w: Tensor, w_units_t: Tensor, flat: Tensor, alpha: Tensor, generator: torch.Generator,
                       y: Tensor, clipped: Tensor, saturated: Tensor, compiled_scale: float | None = None) -> int:
        """Iterative bound management (in place on y, clipped): re-read the saturated vectors with
        the input scaled down by 2, 4, ... until none saturates or the factors run out. Returns the
        number of vectors re-read. `compiled_scale` as `_reread` (y then holds final values: a re-read's
        α·factor rescaling is already in its outputs)."""
        reads = 0
        for factor in self.bm_factors:
            if not bool(saturated.any()):
                break
            idx = saturated.nonzero().squeeze(-1)
            y_again, clip_again, sat_again = self._reread(w, w_units_t, flat[idx], alpha[idx] * factor, generator,
                                                          compiled_scale)
            reads += int(idx.numel())
            y[idx] = y_again if compiled_scale is not None else y_again * factor
            clipped[idx] = 0 if clip_again is None else clip_again
            if sat_again is None:  # no re-read vector reached the bound: done
                break
            saturated = torch.zeros_like(saturated)
            saturated[idx] = sat_again
        return reads

    def __call__(self, weights: Tensor, x: Tensor, generator: torch.Generator, stats: ReadStats | None = None,
                 digital_scale: float = 1.0, blocks: int = 1) -> Tensor:
        """y = x Wᵀ through the periphery (see `analog_read`).

        `blocks` > 1: the leading dimension of x holds that many equal blocks (e.g. the stacked
        nudged phases of EP) to be read as if `generator` were reset to its present state before
        each block, i.e. with common random numbers; the result is that of reading the blocks one
        after the other with the reset, draw for draw, and the generator ends where the last
        block's read leaves it. The main pass draws its noise once for a block and reads all
        blocks in one product; only the (rare) bound-management re-reads go block by block."""
        if x.shape[-1] != weights.shape[1]:
            raise ValueError(f"analog_read: input has last dimension {x.shape[-1]}, expected {weights.shape[1]}")
        same_place = weights.is_cpu and x.is_cpu or weights.device == x.device
        w = weights if (weights.dtype is x.dtype and same_place) else weights.to(dtype=x.dtype, device=x.device)
        flat = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
        n_vec, n_out = flat.shape[0], w.shape[0]
        if self.perfect:
            if stats is not None:
                stats.mvm_reads += n_vec
            y = flat @ (w.T * digital_scale if digital_scale != 1.0 else w.T)
            return y if x.dim() == 2 else y.reshape(*x.shape[:-1], n_out)
        if blocks < 1 or (blocks > 1 and (x.dim() < 2 or x.shape[0] % blocks)):
            raise ValueError(f"analog_read: {blocks} blocks do not divide the leading dimension of {tuple(x.shape)}")

        w_units_t = self._scaled_weights_t(w)
        bm = self.bound_managed
        # the compiled path (None: the torch path) applies the digital scale inside its passes
        compiled_scale = digital_scale if (self.compiled and x.dtype is torch.float32 and x.is_cpu
                                           and self._on_cpu(generator)) else None
        if compiled_scale is not None:
            y, clipped, saturated, alpha_np = self._pass_compiled(w_units_t, flat, None, self._nm_mode, generator, bm,
                                                                  digital_scale, blocks)
            # (a copy: bound management's re-reads may reuse the buffer)
            alpha = torch.from_numpy(alpha_np.copy()).unsqueeze(1) if bm and clipped is not None else None
        else:
            alpha = self._alpha(flat)
            y, clipped, saturated = self._pass(w, w_units_t, flat, alpha.reciprocal(), generator, bm, blocks)
        reads = n_vec
        if bm and clipped is not None:
            if blocks == 1:
                reads += self._bound_managed(w, w_units_t, flat, alpha, generator, y, clipped, saturated, compiled_scale)
            else:
                # block by block from the state the main pass left (each block's own re-reads)
                after_main = generator.get_state()
                rows = n_vec // blocks
                last = -1
                for b in range(blocks):
                    part = slice(b * rows, (b + 1) * rows)
                    if not bool(saturated[part].any()):
                        continue
                    if last >= 0:
                        generator.set_state(after_main)
                    y_b, clipped_b = y[part], clipped[part]  # views: written in place
                    reads += self._bound_managed(w, w_units_t, flat[part], alpha[part], generator, y_b, clipped_b,
                                                 saturated[part], compiled_scale)
                    last = b
                if 0 <= last < blocks - 1:
                    generator.set_state(after_main)  # the last block drew nothing after its main pass
        if stats is not None:
            stats.mvm_reads += reads
            stats.adc_conversions += reads * n_out
            if clipped is not None:
                stats.adc_clipped += int(clipped.sum())
        if compiled_scale is None:
            y.mul_(alpha * (self.final_factor * digital_scale))
        return y if x.dim() == 2 else y.reshape(*x.shape[:-1], n_out)

    def _on_cpu(self, generator: torch.Generator) -> bool:
        """Whether `generator` is a CPU generator (remembered for the last one found to be)."""
        if generator is self._cpu_generator:
            return True
        if generator.device.type != "cpu":
            return False
        self._cpu_generator = generator
        return True

    def _alpha(self, flat: Tensor) -> Tensor:
        """The noise-management scale α (N, 1) of each input vector (torch path)."""
        io = self.io
        nm = io.noise_management
        n_vec = flat.shape[0]
        if nm == "none":
            alpha = torch.ones(n_vec, 1, dtype=flat.dtype, device=flat.device)
        elif nm == "constant":
            alpha = torch.full((n_vec, 1), io.nm_thres, dtype=flat.dtype, device=flat.device)
        else:
            if nm == "abs_max":
                alpha = flat.abs().amax(dim=-1, keepdim=True)
            else:  # "max": aihwkit MAX uses the signed maximum; fall back to abs max where it is <= 0
                lo, hi = torch.aminmax(flat, dim=-1, keepdim=True)
                alpha = torch.where(hi > 0, hi, torch.maximum(-lo, hi))
            if io.nm_thres > 0.0:
                alpha = alpha.clamp_max(io.nm_thres)
            alpha = torch.where(alpha > 0, alpha, 1.0)
        return alpha


def analog_read(weights: Tensor, x: Tensor, io: IOParameters, generator: torch.Generator,
                stats: ReadStats | None = None, digital_scale: float = 1.0, compiled: bool | None = None) -> Tensor:
    """y = x Wᵀ through the periphery `io` (W: (out, in) in device units, x: (..., in)).

    For the transposed read pass `weights.T`. Computes in x's dtype. Every random draw comes from
    `generator`. `stats` (optional) accumulates read counters. `digital_scale` multiplies the
    result after the ADC (the tile's mapping scale; folded into the final rescaling). Repeated
    reads of one periphery should hold a `PeripheryReader` (this builds one per call).
    `compiled`: which implementation (`PeripheryReader`: None picks the compiled one where it
    applies; the two draw different noise of the same distribution).
    """
    return PeripheryReader(io, compiled)(weights, x, generator, stats, digital_scale)
