"""A standard (non-equilibrium) pre-LN transformer of matched width, trained by backprop.

Same width C, heads, FFN width (ffn_mult·C, tanh-GELU), qknorm option, context and vocabulary as
the equilibrium block, one block, learned token and position embeddings, readout without a final
LayerNorm (as the equilibrium model's logits = z* W_hᵀ). The precursor's "BP transformer"
reference (SCIENCE §5). Initialisation follows the equilibrium model (N(0, 1/fan_in), residual
outputs × resinit), drawn from an explicit generator.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ept_hw.model import ModelConfig, gelu_tanh

__all__ = ["BPTransformer"]


class BPTransformer(nn.Module):
    def __init__(self, cfg: ModelConfig, generator: torch.Generator):
        super().__init__()
        self.cfg = cfg
        C, V, T, Hd = cfg.width, cfg.vocab_size, cfg.context, cfg.hidden

        def param(*shape: int, std: float) -> nn.Parameter:
            return nn.Parameter(torch.randn(*shape, generator=generator) * std)

        self.tok = param(V, C, std=cfg.embed_std)
        self.pos = param(T, C, std=cfg.embed_std)
        self.w_q = param(C, C, std=1 / math.sqrt(C))
        self.w_k = param(C, C, std=1 / math.sqrt(C))
        self.w_v = param(C, C, std=1 / math.sqrt(C))
        self.w_o = param(C, C, std=cfg.resinit / math.sqrt(C))
        self.w_1 = param(Hd, C, std=1 / math.sqrt(C))
        self.w_2 = param(C, Hd, std=cfg.resinit / math.sqrt(Hd))
        self.w_h = param(V, C, std=1 / math.sqrt(C))
        self.ln1 = nn.LayerNorm(C, eps=cfg.ln_eps)
        self.ln2 = nn.LayerNorm(C, eps=cfg.ln_eps)
        self.b_1 = nn.Parameter(torch.zeros(Hd))
        self.b_2 = nn.Parameter(torch.zeros(C))
        if cfg.qknorm:
            self.q_norm = nn.RMSNorm(cfg.head_dim, eps=cfg.ln_eps)
            self.k_norm = nn.RMSNorm(cfg.head_dim, eps=cfg.ln_eps)

    def forward(self, idx: Tensor) -> Tensor:
        cfg = self.cfg
        B, T = idx.shape
        H, d = cfg.heads, cfg.head_dim
        x = self.tok[idx.to(self.tok.device)] + self.pos[:T]
        h = self.ln1(x)
        q = (h @ self.w_q.T).view(B, T, H, d).transpose(1, 2)
        k = (h @ self.w_k.T).view(B, T, H, d).transpose(1, 2)
        v = (h @ self.w_v.T).view(B, T, H, d).transpose(1, 2)
        if cfg.qknorm:
            q, k = self.q_norm(q), self.k_norm(k)
        att = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=cfg.causal)
        x = x + att.transpose(1, 2).reshape(B, T, -1) @ self.w_o.T
        h2 = self.ln2(x)
        x = x + gelu_tanh(h2 @ self.w_1.T + self.b_1) @ self.w_2.T + self.b_2
        return x @ self.w_h.T

    def loss(self, idx: Tensor, targets: Tensor) -> Tensor:
        logits = self(idx)
        return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1).to(logits.device))
