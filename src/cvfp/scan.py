"""The exact sequential scan c_t = F(c_{t-1}, e_t): the engine behind Phase 1's iteration 0, C*,
free-running evaluation, the convergence check and generation.

`model.scan` is the plain reference (one nn.Module call per token). `exact_scan` computes the
same contexts faster and is what every stage calls. Its cost is per-token overhead, not
arithmetic: `model.scan` spends most of its time in nn.Module calls on (1, 128) tensors.

`exact_scan` runs the same step on weights fetched once, as plain ATen calls inside a
TorchScript loop (no Python per operation). It calls the very kernels `model.step` calls
(`F.linear` on a 2-D input *is* `addmm(bias, input, weight.t())`, and IEEE addition is
commutative), so its contexts match `model.scan` to the bit on the same machine; the tests
hold it to float32 rounding. Bitwise matters here: a random or weakly trained CVFP map can be
chaotic, and there a re-ordered sum (e.g. precomputing the first layer's W_x e_t + b for all t)
drifts from the reference by O(1) within a few thousand tokens.

On CUDA the same loop costs kernel launches, not Python: `graph_scan` captures the loop over
GRAPH_TOKENS tokens once in a CUDA graph (the very kernels `_scan_states` launches, so the
result is unchanged to the bit) and replays it N / GRAPH_TOKENS times; `exact_scan` takes it
whenever the fast paths apply (cvfp.fast.enabled).
"""

from __future__ import annotations

import functools
import warnings
from typing import List

import torch
import torch.nn.functional as F

from cvfp import fast
from cvfp.model import CVFPModel
from cvfp.runtime import progress

SCAN_CHUNK = 4096  # tokens per compiled call: the progress bar moves, the Python overhead stays negligible
GRAPH_TOKENS = 256  # scan steps per captured CUDA graph: replay overhead (~10 us) stays under 1%


def _scan_states(embeddings: torch.Tensor, context: torch.Tensor, weights_t: List[torch.Tensor],
                 biases: List[torch.Tensor], context_gamma: List[torch.Tensor], context_beta: List[torch.Tensor],
                 token_gamma: List[torch.Tensor], token_beta: List[torch.Tensor], context_eps: List[float],
                 token_eps: List[float], mix: float, keep: int) -> torch.Tensor:
    """The CVFP step loop on pre-fetched weights (one entry per layer, blocks flattened).

    embeddings (n, E), context (1, C) = c_{t-1} before the first token
    -> states (n, keep): [c_t; token_out_t] truncated to `keep` columns (C or C + E).
    Mirrors CVFPLayer.forward operation for operation (see the module docstring).
    """
    c_dim = context.shape[1]
    e_dim = embeddings.shape[1]
    states: List[torch.Tensor] = []
    c = context
    for x in embeddings.unsqueeze(1).unbind(0):  # (1, E) views made in one call, not one slice per token
        for i in range(len(weights_t)):
            z = torch.cat([c, x], 1)
            u = torch.addmm(biases[i], z, weights_t[i]).relu_().add_(z)  # [c; x] + ReLU(W [c; x] + b)
            c, x = u.split([c_dim, e_dim], 1)
            if mix > 0.0:
                c_norm = F.layer_norm(c, [c_dim], context_gamma[i], context_beta[i], context_eps[i])
                x_norm = F.layer_norm(x, [e_dim], token_gamma[i], token_beta[i], token_eps[i])
                if mix < 1.0:
                    c_norm = (1 - mix) * c + mix * c_norm
                    x_norm = (1 - mix) * x + mix * x_norm
                c = c_norm
                x = x_norm
        states.append(torch.cat([c, x], 1) if keep > c_dim else c)
    return torch.cat(states, 0)


@functools.cache
def _compiled_scan():
    """`_scan_states` compiled by TorchScript, or the same Python function where that is unavailable."""
    try:
        with warnings.catch_warnings():
            # deprecated upstream, yet still the only interpreter that runs this loop without Python per op
            warnings.simplefilter("ignore", DeprecationWarning)
            return torch.jit.script(_scan_states)
    except Exception:  # a torch build without TorchScript: identical results, about half the speed
        return _scan_states


def _layer_weights(model: CVFPModel) -> tuple[list, list[float], list[float]]:
    """Every CVFPLayer's tensors, in step order, as the loop's lists (detached views, no copies)."""
    layers = [layer for block in model.blocks for layer in block.layers]
    tensors = [
        [layer.fnn.weight.detach().t() for layer in layers],  # a view, exactly what F.linear passes to addmm
        [layer.fnn.bias.detach() for layer in layers],
        [layer.context_norm.weight.detach() for layer in layers],
        [layer.context_norm.bias.detach() for layer in layers],
        [layer.token_norm.weight.detach() for layer in layers],
        [layer.token_norm.bias.detach() for layer in layers],
    ]
    return tensors, [layer.context_norm.eps for layer in layers], [layer.token_norm.eps for layer in layers]


@torch.no_grad()
def exact_scan(model: CVFPModel, embeddings: torch.Tensor, initial: torch.Tensor | None = None,
              with_token_out: bool = False, progress_desc: str | None = None):
    """Exact sequential pass c_t = F(c_{t-1}, e_t), a faster drop-in for `model.scan`.

    embeddings (N, E) -> contexts (N, C); with `with_token_out` also token outputs (N, E).
    `initial` (C,) or (1, C) is c_{-1} (zeros when None).
    """
    n, e_dim = embeddings.shape
    if fast.enabled(embeddings.device) and n >= 2 * GRAPH_TOKENS:
        return graph_scan(model, embeddings, initial, with_token_out, progress_desc=progress_desc)
    c_dim = model.context_dim
    context = embeddings.new_zeros(1, c_dim) if initial is None else initial.reshape(1, c_dim).to(embeddings)
    tensors, context_eps, token_eps = _layer_weights(model)
    keep = c_dim + e_dim if with_token_out else c_dim
    scan = _compiled_scan()
    states = embeddings.new_empty(n, keep)
    bar = progress(total=n, desc=progress_desc, unit="tok") if progress_desc is not None else None
    for start in range(0, n, SCAN_CHUNK):
        chunk = scan(embeddings[start:start + SCAN_CHUNK].contiguous(), context, *tensors, context_eps, token_eps,
                     float(model.args.layernorm_mix), keep)
        states[start:start + chunk.shape[0]] = chunk
        context = chunk[-1:, :c_dim]
        if bar is not None:
            bar.update(chunk.shape[0])
    if bar is not None:
        bar.close()
    contexts = states[:, :c_dim].contiguous()
    return (contexts, states[:, c_dim:].contiguous()) if with_token_out else contexts


@torch.no_grad()
def graph_scan(model: CVFPModel, embeddings: torch.Tensor, initial: torch.Tensor | None = None,
               with_token_out: bool = False, compiled_step: bool = False, progress_desc: str | None = None):
    """`exact_scan` by replaying one captured block of GRAPH_TOKENS scan steps (a CUDA graph on CUDA).

    embeddings (N, E) -> contexts (N, C) [, token outputs (N, E)]. The exact variant captures
    `_scan_states`, the kernels of `model.step`, so it equals `model.scan` to the bit on the
    same device. `compiled_step` captures `torch.compile(model.step)` instead: fewer, fused
    kernels whose LayerNorm reductions round differently (within float32 rounding per step;
    benchmarks/bench.py measures the drift over a stream). Off CUDA the block is re-run, not replayed.
    """
    n, e_dim = embeddings.shape
    c_dim = model.context_dim
    keep = c_dim + e_dim if with_token_out else c_dim
    block = min(GRAPH_TOKENS, n)
    tokens = embeddings.new_zeros(block, e_dim)  # static inputs the captured kernels read
    start_context = embeddings.new_zeros(1, c_dim)
    if compiled_step:
        step = fast.compiled(model, "scan_step", model.step)

        def run() -> torch.Tensor:
            context, states = start_context, []
            for x in tokens.unsqueeze(1).unbind(0):
                context, token_out = step(context, x)
                states.append(torch.cat([context, token_out], 1) if keep > c_dim else context)
            return torch.cat(states, 0)
    else:
        tensors, context_eps, token_eps = _layer_weights(model)
        mix = float(model.args.layernorm_mix)

        def run() -> torch.Tensor:
            return _scan_states(tokens, start_context, *tensors, context_eps, token_eps, mix, keep)

    replay = fast.replayable(run, embeddings.device)
    states = embeddings.new_empty(n, keep)
    context = embeddings.new_zeros(1, c_dim) if initial is None else initial.reshape(1, c_dim).to(embeddings)
    bar = progress(total=n, desc=progress_desc, unit="tok") if progress_desc is not None else None
    for start in range(0, n, block):
        count = min(block, n - start)  # a short last block leaves stale rows in `tokens`; they are never read back
        tokens[:count].copy_(embeddings[start:start + count])
        start_context.copy_(context)
        states[start:start + count] = replay()[:count]
        context = states[start + count - 1:start + count, :c_dim]
        if bar is not None:
            bar.update(count)
    if bar is not None:
        bar.close()
    contexts = states[:, :c_dim].contiguous()
    return (contexts, states[:, c_dim:].contiguous()) if with_token_out else contexts
