"""Phase 2: next-token prediction on top of the frozen contexts C* (SPEC section 6, seed 003 v3.1).

Every position t is an independent example, because its input context is known in advance:
input context C*[t-1] (zero for t = 0, where the scan started), token embedding e_t,
(context_out, token_out) = F(C*[t-1], e_t), logits = head([context_out; token_out]),
loss = CE(logits, id_{t+1}) + context_stability_weight * MSE(context_out, C*[t]).
Positions t = 0..N-2 train in shuffled mini-batches; the last token has no target. C* never
changes. `context_mode: replace` (seed 001's v2.0) feeds C*[t] to the head instead of
context_out and drops the stability term. The head, zero and frozen in Phase 1, starts
from a seeded normal initialisation (`init_head_`).

Validation uses the same per-position loss, so "validation loss" (early stopping) is the
training objective measured on the validation stream: CE plus the stability term in
`stability` mode, CE alone in `replace` mode.

Where the fast paths apply (CUDA, see cvfp.fast), the batch's forward and losses, from the
embedding lookup to the cross-entropy, run as one compiled function.

Data parallel (torchrun, see cvfp.distributed): the positions of an epoch follow
DistributedSampler's seeded order (`set_epoch`); each rank computes its share of each global
batch, the batch loss is the sum over ranks divided by the global batch size, gradients are
averaged, and validation sums are reduced, so every rank takes the same steps and the same
early-stopping decision as one process would.
"""

from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from cvfp import fast
from cvfp.distributed import (Shard, World, backward_and_step, broadcast_module, main_only, sampler_batches,
                              sum_numbers)
from cvfp.distributed import current as current_world
from cvfp.metrics import bits_per_byte, format_rate
from cvfp.model import CVFPModel

CONTEXT_MODES = ("stability", "replace")
MAX_LOG_PERPLEXITY = 700.0  # exp() of more overflows a float; such a perplexity is reported as missing


def _autocast(device: torch.device, precision: str):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def input_contexts(cstar: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Input context of position t: C*[t-1], and zero for t = 0 (the scan starts from c = 0).

    cstar (N, C), positions (B,) -> (B, C).
    """
    previous = cstar[(positions - 1).clamp_min(0)]
    return torch.where((positions > 0).unsqueeze(-1), previous, torch.zeros_like(previous))


def fixed_forward(model: CVFPModel, ids: torch.Tensor, cstar: torch.Tensor, positions: torch.Tensor,
                  context_mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """One model step at each position with the input context taken from C*, predicting ids[positions + 1].

    ids (N,), cstar (N, C), positions (B,) -> (logits (B, V), context_out (B, C)).
    The head sees context_out (`stability`) or C*[t] (`replace`).
    """
    device = next(model.parameters()).device
    positions = positions.to(ids.device)
    context_in = input_contexts(cstar, positions.to(cstar.device)).to(device)
    context_out, token_out = model.step(context_in, model.embed(ids[positions].to(device)))
    head_context = cstar[positions.to(cstar.device)].to(device) if context_mode == "replace" else context_out
    return model.logits(head_context, token_out), context_out


def batch_losses(model: CVFPModel, ids: torch.Tensor, cstar: torch.Tensor, positions: torch.Tensor,
                 context_mode: str, stability_weight: float, precision: str = "fp32") -> dict[str, torch.Tensor]:
    """Phase-2 loss of a batch of positions (B,): mean CE, the stability MSE and the objective.

    Returns scalars `loss`, `ce`, `stability` (MSE(context_out, C*[t]), measured in both
    modes, part of `loss` only in `stability` mode), and `correct` (top-1 hits, a count).
    """
    device = next(model.parameters()).device
    token_ids = ids[positions.to(ids.device)].to(device)
    targets = ids[positions.to(ids.device) + 1].to(device)
    context_in = input_contexts(cstar, positions.to(cstar.device)).to(device)
    target_contexts = cstar[positions.to(cstar.device)].to(device)
    losses = fast.compiled(model, "phase2_losses", functools.partial(_losses, model))
    bf16_stream = fast.enabled(device) and fast.BF16_STREAM and precision == "bf16"
    return losses(token_ids, context_in, target_contexts, targets, context_mode, stability_weight, precision,
                  bf16_stream)


def _losses(model: CVFPModel, token_ids: torch.Tensor, context_in: torch.Tensor, target_contexts: torch.Tensor,
            targets: torch.Tensor, context_mode: str, stability_weight: float, precision: str,
            bf16_stream: bool = False) -> dict[str, torch.Tensor]:
    """`batch_losses` after the gathers: (B,), (B, C), (B, C) = C*[t], (B,) -> the same dict.

    `bf16_stream` (fast path only) keeps the step's residual stream in bf16 (cvfp.fast.bf16_stream_step).
    """
    step = functools.partial(fast.bf16_stream_step, model) if bf16_stream else model.step
    with _autocast(context_in.device, precision):
        context_out, token_out = step(context_in, model.embed(token_ids))
        logits = model.logits(target_contexts if context_mode == "replace" else context_out, token_out)
    ce = F.cross_entropy(logits.float(), targets)
    stability = F.mse_loss(context_out.float(), target_contexts.float())
    loss = ce + stability_weight * stability if context_mode == "stability" else ce
    correct = (logits.argmax(dim=-1) == targets).sum()
    return {"loss": loss, "ce": ce, "stability": stability, "correct": correct}


@torch.no_grad()
def evaluate_fixed(model: CVFPModel, ids: torch.Tensor, cstar: torch.Tensor, batch_size: int, context_mode: str,
                   precision: str = "fp32", world: World | None = None) -> dict[str, Any]:
    """Next-token numbers with contexts = C* over all N-1 positions of a stream, batched, no gradients.

    ids (N,), cstar (N, C) -> dict(total_nats: summed CE, tokens: N-1, correct: top-1 hits,
    stability_mse: mean MSE(context_out, C*[t]) over positions and dimensions).
    Under torchrun each rank takes a contiguous shard of the positions and the sums are reduced.
    """
    part = Shard(ids.shape[0] - 1, world or current_world())
    positions = torch.arange(part.lo, part.hi, device=ids.device)
    total_nats, correct, stability_sum = 0.0, 0, 0.0
    for batch in positions.split(batch_size):
        losses = batch_losses(model, ids, cstar, batch, context_mode, 0.0, precision)
        total_nats += float(losses["ce"]) * batch.numel()
        stability_sum += float(losses["stability"]) * batch.numel()
        correct += int(losses["correct"])
    total_nats, correct, stability_sum = sum_numbers([total_nats, correct, stability_sum], part.world)
    return {"total_nats": total_nats, "tokens": part.n, "correct": int(correct),
            "stability_mse": stability_sum / max(part.n, 1)}


def init_head_(model: CVFPModel, seed: int) -> None:
    """Re-initialise the output head, zero and frozen since Phase 1, like every Linear in SPEC section 2.

    Weights normal(0, init_std), biases normal(0, bias_init_std), drawn on the CPU from a
    generator seeded with `seed`, so the start is the same on every device.
    """
    generator = torch.Generator().manual_seed(seed)
    head = model.token_output
    with torch.no_grad():
        head.weight.copy_(torch.empty(head.weight.shape).normal_(0.0, model.args.init_std, generator=generator))
        head.bias.copy_(torch.empty(head.bias.shape).normal_(0.0, model.args.bias_init_std, generator=generator))


def set_trainable(model: CVFPModel, freeze_context: bool, freeze_embedding: bool) -> list[nn.Parameter]:
    """Freeze what the variant says and return the parameters left to train.

    The head always trains; `freeze_context` freezes everything else (blocks and embedding);
    `freeze_embedding` freezes token_embedding and embed_norm. The context decoder is a
    Phase-1 device and never trains here.
    """
    model.requires_grad_(not freeze_context)
    model.token_output.requires_grad_(True)
    if freeze_embedding:
        model.token_embedding.requires_grad_(False)
        model.embed_norm.requires_grad_(False)
    if model.context_decoder is not None:
        model.context_decoder.requires_grad_(False)
    return [p for p in model.parameters() if p.requires_grad]


def perplexity(ce: float | None) -> float | None:
    """exp(mean CE in nats); None where that is not a finite number."""
    if ce is None or not math.isfinite(ce) or ce > MAX_LOG_PERPLEXITY:
        return None
    return math.exp(ce)


@dataclass
class Phase2Result:
    history: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    timing: dict[str, Any] = field(default_factory=dict)  # wall-clock figures, kept apart so reruns compare equal


def _validation_row(model: CVFPModel, val_ids: torch.Tensor, val_cstar: torch.Tensor, val_bytes: int,
                    params, world: World) -> dict[str, Any]:
    val = evaluate_fixed(model, val_ids, val_cstar, params.batch_size, params.context_mode, params.precision, world)
    ce = val["total_nats"] / val["tokens"]
    loss = ce + params.context_stability_weight * val["stability_mse"] if params.context_mode == "stability" else ce
    return {"val_loss": loss, "val_ce": ce, "val_stability": val["stability_mse"], "val_ppl": perplexity(ce),
            "val_acc": val["correct"] / val["tokens"], "val_correct": val["correct"], "val_predicted": val["tokens"],
            "val_bpb": bits_per_byte(val["total_nats"], val_bytes)}


def train_phase2(model: CVFPModel, train_ids: torch.Tensor, train_cstar: torch.Tensor, val_ids: torch.Tensor,
                 val_cstar: torch.Tensor, val_bytes: int, params, seed: int,
                 log: Callable[[str], None] = print, *,
                 checkpoint: Callable[[dict[str, Any]], None] | None = None,
                 resume_state: dict[str, Any] | None = None, world: World | None = None) -> Phase2Result:
    """Train the head (and, unless frozen, blocks and embedding) on C*, with early stopping.

    train_ids (N,), train_cstar (N, C), val_ids (M,), val_cstar (M, C); `val_bytes` is the
    UTF-8 byte count of the validation documents (bits per byte); `params` is the `phase2`
    section. On return the model holds the weights of the epoch with the lowest validation
    loss (the initial weights if no epoch gave a finite one).

    `checkpoint(state)` is called every `params.checkpoint_interval` epochs (never after the
    last one) with everything needed to continue; `resume_state` (such a state) continues from
    it, giving the same result as an uninterrupted run. After `params.max_nonfinite_steps`
    consecutive non-finite batch losses the run stops with a StageError.

    Under torchrun (`world`, default: the initialised process group) every rank calls this with
    the same arguments; `params.batch_size` must be divisible by the world size.
    """
    from cvfp.resume import rng_state, set_rng_state, stop_if_diverged, to_cpu
    from cvfp.runtime import progress

    world = world or current_world()
    log = main_only(log, world)
    if params.context_mode not in CONTEXT_MODES:
        raise ValueError(f"phase2.context_mode must be one of {CONTEXT_MODES}, got {params.context_mode!r}")
    device = next(model.parameters()).device
    init_head_(model, seed)
    broadcast_module(model, world)
    trainable = set_trainable(model, params.freeze_context, params.freeze_embedding)
    optimizer = fast.adam(trainable, params.lr, device)
    train_ids, train_cstar = train_ids.to(device), train_cstar.to(device)
    val_ids, val_cstar = val_ids.to(device), val_cstar.to(device)
    num_positions = train_ids.shape[0] - 1
    num_batches = math.ceil(num_positions / params.batch_size)

    result = Phase2Result()
    best_loss, best_epoch = math.inf, 0
    best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    skipped_steps, tokens_seen, stopped_early, nonfinite_run, first = 0, 0, False, 0, 1
    interval = getattr(params, "checkpoint_interval", 1)
    max_nonfinite = getattr(params, "max_nonfinite_steps", None)
    if resume_state is not None:
        model.load_state_dict(resume_state["state_dict"])
        optimizer.load_state_dict(resume_state["optimizer"])
        set_rng_state(resume_state["rng"], device)
        best_loss, best_epoch = resume_state["best_loss"], resume_state["best_epoch"]
        best_state = {k: v.to(device) for k, v in resume_state["best_state"].items()}
        result.history = list(resume_state["history"])
        skipped_steps, tokens_seen = resume_state["skipped_steps"], resume_state["tokens_seen"]
        nonfinite_run = resume_state["nonfinite_run"]
        first = resume_state["epoch"] + 1
        log(f"resuming from epoch {first} (checkpoint after epoch {resume_state['epoch']})")
    started = time.perf_counter()
    for epoch in range(first, params.epochs + 1):
        tick = time.perf_counter()
        sums = {"loss": 0.0, "ce": 0.0, "stability": 0.0}
        seen = 0
        batches = sampler_batches(num_positions, params.batch_size, seed, epoch, world)
        bar = progress(batches, total=num_batches, desc=f"phase2 epoch {epoch}/{params.epochs}", unit="batch",
                       disable=not world.is_main)
        for index, (batch, batch_count) in enumerate(bar, start=1):
            batch_sums = train_batch(model, optimizer, trainable, train_ids, train_cstar, batch.to(device), batch_count,
                                     params, world)
            if batch_sums is None:
                skipped_steps += 1
                nonfinite_run += 1
                stop_if_diverged("phase2", nonfinite_run, max_nonfinite, f"epoch {epoch}, batch {index}/{num_batches}",
                                 bar)
                continue
            nonfinite_run = 0
            for key, value in zip(sums, batch_sums):
                sums[key] += value
            seen += batch_count
        bar.close()
        tokens_seen += seen

        train_ce = sums["ce"] / seen if seen else None
        row: dict[str, Any] = {"epoch": epoch, "train_loss": sums["loss"] / seen if seen else None, "train_ce": train_ce,
                               "train_stability": sums["stability"] / seen if seen else None,
                               "train_ppl": perplexity(train_ce)}
        row.update(_validation_row(model, val_ids, val_cstar, val_bytes, params, world))
        row["skipped_steps"] = skipped_steps
        row["seconds"] = time.perf_counter() - tick
        result.history.append(row)
        improved = row["val_loss"] < best_loss  # False for NaN: a diverged epoch is never the best
        if improved:
            best_loss, best_epoch = row["val_loss"], epoch
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        log(_epoch_line(row, params.epochs, improved))
        if epoch - best_epoch >= params.patience and epoch < params.epochs:
            stopped_early = True
            log(f"early stop: validation loss has not improved for {params.patience} epochs (phase2.patience); "
                f"keeping epoch {best_epoch}")
            break
        if checkpoint is not None and epoch < params.epochs and epoch % interval == 0:
            checkpoint(to_cpu({
                "stage": "phase2", "epoch": epoch, "state_dict": model.state_dict(),
                "optimizer": optimizer.state_dict(), "rng": rng_state(device),
                "best_loss": best_loss, "best_epoch": best_epoch, "best_state": best_state,
                "history": result.history, "skipped_steps": skipped_steps, "tokens_seen": tokens_seen,
                "nonfinite_run": nonfinite_run}))

    model.load_state_dict(best_state)
    best_row = result.history[best_epoch - 1] if best_epoch else {}
    result.summary = {
        "best_epoch": best_epoch, "epochs_run": len(result.history), "stopped_early": stopped_early,
        "skipped_steps": skipped_steps, "trainable_parameters": sum(p.numel() for p in trainable),
        "train_tokens_seen": tokens_seen,
        "train_tokens": train_ids.shape[0], "val_tokens": val_ids.shape[0], "context_mode": params.context_mode,
        **{key: _finite(best_row.get(key)) for key in ("train_loss", "train_ce", "train_stability", "train_ppl",
                                                       "val_loss", "val_ce", "val_stability", "val_ppl", "val_acc",
                                                       "val_correct", "val_predicted", "val_bpb")},
    }
    seconds = time.perf_counter() - started
    result.timing = {"seconds": seconds, "train_tokens_per_second": tokens_seen / seconds,
                     "seconds_per_epoch": [row["seconds"] for row in result.history]}
    return result


def train_batch(model: CVFPModel, optimizer: torch.optim.Optimizer, trainable: list[nn.Parameter], ids: torch.Tensor,
                cstar: torch.Tensor, batch: torch.Tensor, count: int, params, world: World) -> list[float] | None:
    """One optimizer step on a global batch of `count` positions, of which this rank holds `batch` (the loop body).

    Returns [loss, ce, stability] summed over the global batch, or None when the loss or the
    gradient was not finite and the step was skipped (identically on every rank).
    """
    loss, sums = _global_batch_loss(model, ids, cstar, batch, count, params, world)
    if not math.isfinite(sums[0]) or not backward_and_step(loss, optimizer, trainable, params.grad_clip, world):
        return None
    return sums


def _global_batch_loss(model: CVFPModel, ids: torch.Tensor, cstar: torch.Tensor, batch: torch.Tensor, count: int,
                       params, world: World) -> tuple[torch.Tensor, list[float]]:
    """The mean loss over a global batch of `count` positions, of which this rank holds `batch`.

    Returns (the loss to back-propagate, [loss, ce, stability] summed over the global batch).
    The local sums are summed over ranks (differentiably, see cvfp.distributed) in one
    collective; a rank with an empty share contributes zeros.
    """
    device = next(model.parameters()).device
    if batch.numel():
        losses = batch_losses(model, ids, cstar, batch, params.context_mode, params.context_stability_weight,
                              params.precision)
        local = torch.stack([losses["loss"], losses["ce"].detach(), losses["stability"].detach()]) * batch.numel()
    else:
        local = torch.zeros(3, device=device, requires_grad=True)
    total = Shard(count, world).sum(local)
    return total[0] / count, total.detach().tolist()


def _finite(value: float | None) -> float | None:
    """A metrics-file value: a non-finite float becomes None (JSON has no NaN)."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _number(value: float | None, digits: int = 4) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _epoch_line(row: dict[str, Any], epochs: int, improved: bool) -> str:
    return (f"epoch {row['epoch']}/{epochs}: train loss {_number(row['train_loss'])} (ce {_number(row['train_ce'])}, "
            f"ppl {_number(row['train_ppl'], 2)}) | val loss {_number(row['val_loss'])} (ce {_number(row['val_ce'])}, "
            f"stability {_number(row['val_stability'], 6)}), ppl {_number(row['val_ppl'], 2)}, "
            f"acc {format_rate(row['val_correct'], row['val_predicted'])}, bpb {_number(row['val_bpb'])}, "
            f"skipped steps {row['skipped_steps']} ({row['seconds']:.1f}s)" + (" *best" if improved else ""))
