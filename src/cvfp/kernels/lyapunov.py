"""Top Lyapunov exponent of the scan along a trajectory, with a standard error over blocks.

lambda = lim (1/T) sum_t log ||J_t v_{t-1}||, J_t = dF(c, x_t)/dc at c = c_{t-1}, v renormalised
to unit length every step (the tangent vector, pushed forward by torch.func.jvp). The stream
is cut into `blocks` equal blocks; each block runs its own tangent chain from a random unit
vector, discards its first `burn_in` steps and averages log-growth over the rest. All chains
advance together (one batched jvp per step), so a stream of N tokens costs N / blocks
sequential steps. The estimate is the mean over blocks, its standard error std / sqrt(blocks).
Negative: perturbations of the context die out at that rate per token (the scan contracts,
drift between two implementations stays at rounding level); positive: they grow (chaotic).
"""

from __future__ import annotations

import math
from typing import Optional

import torch


@torch.no_grad()  # forward-mode AD still runs; no autograd graph through the parameters
def lyapunov(model, embeddings: torch.Tensor, contexts: torch.Tensor, initial: Optional[torch.Tensor] = None,
             blocks: int = 16, burn_in: int = 32, seed: int = 0) -> dict:
    """embeddings (N, E) and the scan's contexts (N, C) on that stream -> {lambda, se, ...} per token."""
    from torch.func import jvp

    n, c_dim = contexts.shape
    block_len = n // blocks
    if block_len <= burn_in:
        raise ValueError(f"{n} tokens in {blocks} blocks leave no steps after a burn-in of {burn_in}")
    c0 = contexts.new_zeros(1, c_dim) if initial is None else initial.reshape(1, c_dim).to(contexts)
    base = torch.cat([c0, contexts[:-1]], 0)  # c_{t-1} for every token t
    gen = torch.Generator(device="cpu").manual_seed(seed)
    v = torch.randn(blocks, c_dim, generator=gen, dtype=torch.float64).to(contexts)
    v = v / v.norm(dim=1, keepdim=True)
    offsets = torch.arange(blocks, device=contexts.device) * block_len
    total = torch.zeros(blocks, dtype=torch.float64, device=contexts.device)
    counted = 0
    for s in range(block_len):
        idx = offsets + s
        x = embeddings[idx]
        _, tangent = jvp(lambda c: model.step(c, x)[0], (base[idx],), (v,))
        growth = tangent.norm(dim=1)
        v = tangent / growth.clamp_min(1e-30).unsqueeze(1)
        if s >= burn_in:
            total += growth.double().clamp_min(1e-300).log()
            counted += 1
    per_block = (total / counted).cpu()
    mean = float(per_block.mean())
    se = float(per_block.std(unbiased=True)) / math.sqrt(blocks) if blocks > 1 else float("nan")
    return {"lambda": mean, "se": se, "blocks": blocks, "block_len": block_len, "burn_in": burn_in,
            "steps_counted": counted * blocks, "per_block": [float(x) for x in per_block]}
