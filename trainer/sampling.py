"""Text generation from a run's last checkpoint (either path)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .checkpoint import load_checkpoint
from .loop import load_run
from .rundir import RunDirectory

__all__ = ["sample_text", "sample_tokens", "sample_run", "Sample"]


@dataclass
class Sample:
    text: str
    path: str  # the path sampled ("twin" or "analog")
    step: int  # the checkpoint's step
    checkpoint: Path


@torch.no_grad()
def sample_tokens(
    path_obj, prompt_ids: list[int], length: int, context: int, temperature: float, top_k: int,
    generator: torch.Generator, on_token: Callable[[int], None] | None = None,
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
        if on_token is not None:
            on_token(ids[-1])
    return ids


def sample_run(
    run_dir: str | Path,
    prompt: str,
    *,
    path: str | None = None,
    length: int = 200,
    temperature: float = 1.0,
    top_k: int = 0,
    seed: int = 0,
    on_token: Callable[[int], None] | None = None,
) -> Sample:
    """Text from a run's latest readable checkpoint, with the path and checkpoint it came from;
    `on_token` is called after each generated token (progress)."""
    rd = RunDirectory(run_dir).require_run()
    _, ck_path = rd.load_checkpoint()
    cfg, data, paths = load_run(rd.path, ck_path)
    name = path or ("twin" if "twin" in paths else next(iter(paths)))
    if name not in paths:
        raise ValueError(f"run {run_dir} has no {name!r} path (it has {', '.join(paths)})")
    prompt_ids = data.tokenizer.encode(prompt)
    if not prompt_ids:
        raise ValueError("the prompt encodes to no tokens")
    gen = torch.Generator().manual_seed(seed)
    ids = sample_tokens(paths[name], prompt_ids, length, cfg.training.seq_len, temperature, top_k, gen, on_token)

    step = int(load_checkpoint(ck_path)["step"])
    return Sample(data.tokenizer.decode(ids), name, step, ck_path)


def sample_text(run_dir: str | Path, prompt: str, **kwargs) -> str:
    """`sample_run(...).text`."""
    return sample_run(run_dir, prompt, **kwargs).text
