"""Text generation from a run's last checkpoint (either path)."""

from __future__ import annotations

from pathlib import Path

import torch

from .loop import load_run

__all__ = ["sample_text", "sample_tokens"]


@torch.no_grad()
def sample_tokens(
    path_obj, prompt_ids: list[int], length: int, context: int, temperature: float, top_k: int, generator: torch.Generator
) -> list[int]:
    """Append `length` tokens, each drawn from the next-token distribution at the fixed point of
    the last `context` tokens."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if top_k < 0:
        raise ValueError(f"top-k must be >= 0, got {top_k}")
    ids = list(prompt_ids)
    for _ in range(length):
        window = torch.tensor([ids[-context:]], dtype=torch.int64)
        logits = path_obj.next_token_logits(window)[0].double() / temperature
        if top_k:
            k = min(top_k, logits.numel())
            kth = torch.topk(logits, k).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        ids.append(int(torch.multinomial(probs, 1, generator=generator)))
    return ids


def sample_text(
    run_dir: str | Path,
    prompt: str,
    *,
    path: str | None = None,
    length: int = 200,
    temperature: float = 1.0,
    top_k: int = 0,
    seed: int = 0,
) -> str:
    cfg, data, paths = load_run(run_dir)
    name = path or ("twin" if "twin" in paths else next(iter(paths)))
    if name not in paths:
        raise ValueError(f"run {run_dir} has no {name!r} path (it has {', '.join(paths)})")
    prompt_ids = data.tokenizer.encode(prompt)
    if not prompt_ids:
        raise ValueError("the prompt encodes to no tokens")
    gen = torch.Generator().manual_seed(seed)
    ids = sample_tokens(paths[name], prompt_ids, length, cfg.training.seq_len, temperature, top_k, gen)
    return data.tokenizer.decode(ids)
