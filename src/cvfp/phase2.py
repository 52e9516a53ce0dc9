"""Phase 2: next-token prediction on top of the frozen contexts C* (SPEC section 6, seed 003 v3.1).

Every position t is an independent example, because its input context is known in advance:
input context C*[t-1] (zero for t = 0, where the scan started), token embedding e_t,
(context_out, token_out) = F(C*[t-1], e_t), logits = head([context_out; token_out]),
loss = CE(logits, id_{t+1}) + context_stability_weight * MSE(context_out, C*[t]).
Positions t = 0..N-2 train in shuffled mini-batches; the last token has no target. C* never
changes. `context_mode: replace` (seed 001's v2.0) feeds C*[t] to the head instead of
context_out and drops the stability term. The head, zero and frozen in Phase 1, starts
from a seeded normal initialisation (`CVFPModel.init_head_`).

Names: the *objective* is what training minimises, CE plus the stability term in `stability`
mode (CE alone in `replace` mode); the *loss* is the cross-entropy in nats per prediction, as
everywhere in this project. Validation runs the same loss function (`phase2_losses`) and
counts its predictions with the one counting rule of every evaluation
(`cvfp.metrics.count_predictions`: scored predictions only). Early stopping and the best
epoch follow the validation *loss*: it is the number every model is compared on, while the
stability term is a training device whose scale (`context_stability_weight`) would otherwise
decide which epoch is kept.

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
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from cvfp import fast
from cvfp.distributed import Shard, World, backward_and_step, broadcast_module, main_only, sampler_batches, sum_numbers
from cvfp.distributed import current as current_world
from cvfp.loop import EarlyStopping, LoopResult, NonFiniteGuard, restore_state, save_state
from cvfp.metrics import (EMPTY_COUNTS, add_counts, count_predictions, finite_or_none, format_number, format_rate,
                          next_token_metrics, perplexity)
from cvfp.model import CVFPModel, trainable_parameters
from cvfp.runtime import progress


def input_contexts(cstar: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Input context of position t: C*[t-1], and zero for t = 0 (the scan starts from c = 0).

    cstar (N, C), positions (B,) -> (B, C).
    """
    previous = cstar[(positions - 1).clamp_min(0)]
    return torch.where((positions > 0).unsqueeze(-1), previous, torch.zeros_like(previous))


def forward(model: CVFPModel, token_ids: torch.Tensor, context_in: torch.Tensor, target_contexts: torch.Tensor,
            context_mode: str, step: Callable | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One model step from the given input contexts, then the head: (B,), (B, C), (B, C) = C*[t] -> (logits (B, V),
    context_out (B, C)). The head sees context_out (`stability`) or C*[t] (`replace`)."""
    context_out, token_out = (step or model.step)(context_in, model.embed(token_ids))
    return model.logits(target_contexts if context_mode == "replace" else context_out, token_out), context_out


def phase2_losses(model: CVFPModel, ids: torch.Tensor, cstar: torch.Tensor, positions: torch.Tensor,
                  context_mode: str, stability_weight: float, precision: str = "fp32",
                  options: fast.FastOptions = fast.DEFAULT) -> dict[str, torch.Tensor]:
    """The Phase-2 losses of a batch of positions (B,), predicting ids[positions + 1]: the train step's and validation's.

    Returns scalars `objective` (what training minimises), `loss` (mean cross-entropy) and
    `stability` (MSE(context_out, C*[t]), measured in both modes, part of the objective only
    in `stability` mode), and the `logits` (B, V) for counting.
    """
    device = next(model.parameters()).device
    token_ids = ids[positions.to(ids.device)].to(device)
    targets = ids[positions.to(ids.device) + 1].to(device)
    context_in = input_contexts(cstar, positions.to(cstar.device)).to(device)
    target_contexts = cstar[positions.to(cstar.device)].to(device)
    losses = fast.compiled(model, "phase2_losses", functools.partial(_losses, model), options)
    bf16_stream = fast.enabled(device) and options.bf16_stream and precision == "bf16"
    return losses(token_ids, context_in, target_contexts, targets, context_mode, stability_weight, precision,
                  bf16_stream)


def _losses(model: CVFPModel, token_ids: torch.Tensor, context_in: torch.Tensor, target_contexts: torch.Tensor,
            targets: torch.Tensor, context_mode: str, stability_weight: float, precision: str,
            bf16_stream: bool = False) -> dict[str, torch.Tensor]:
    """`phase2_losses` after the gathers: (B,), (B, C), (B, C) = C*[t], (B,) -> the same dict.

    `bf16_stream` (fast path only) keeps the step's residual stream in bf16 (cvfp.fast.bf16_stream_step).
    """
    step = functools.partial(fast.bf16_stream_step, model) if bf16_stream else model.step
    with fast.autocast(context_in.device, precision):
        logits, context_out = forward(model, token_ids, context_in, target_contexts, context_mode, step)
    ce = F.cross_entropy(logits.float(), targets)
    stability = F.mse_loss(context_out.float(), target_contexts.float())
    objective = ce + stability_weight * stability if context_mode == "stability" else ce
    return {"objective": objective, "loss": ce, "stability": stability, "logits": logits}


@torch.no_grad()
def evaluate_fixed(model: CVFPModel, ids: torch.Tensor, cstar: torch.Tensor, scored: torch.Tensor,
                   target_bytes: torch.Tensor, batch_size: int, context_mode: str, precision: str = "fp32",
                   world: World | None = None) -> dict[str, Any]:
    """Next-token counts with contexts = C* over the N-1 predictions of a stream, batched, no gradients.

    ids (N,), cstar (N, C), scored (N-1,) bool, target_bytes (N-1,) -> `count_predictions`' sums
    (total_nats, predictions, correct, bytes over the scored predictions) and stability_mse, the
    mean MSE(context_out, C*[t]) over all N-1 positions and dimensions. Under torchrun each rank
    takes a contiguous shard of the positions and the sums are reduced.
    """
    part = Shard(ids.shape[0] - 1, world or current_world())
    positions = torch.arange(part.lo, part.hi, device=ids.device)
    scored, target_bytes = scored.to(ids.device), target_bytes.to(ids.device)  # indexed by the positions below
    counts, stability_sum = dict(EMPTY_COUNTS), 0.0
    for batch in positions.split(batch_size):
        out = phase2_losses(model, ids, cstar, batch, context_mode, 0.0, precision)
        targets = ids[batch + 1].to(out["logits"].device)
        counts = add_counts(counts, count_predictions(out["logits"], targets, scored[batch], target_bytes[batch]))
        stability_sum += float(out["stability"]) * batch.numel()
    sums = sum_numbers({**counts, "stability": stability_sum}, part.world)
    return {"total_nats": sums["total_nats"], "predictions": int(sums["predictions"]), "correct": int(sums["correct"]),
            "bytes": int(sums["bytes"]), "stability_mse": sums["stability"] / max(part.n, 1)}


def _validation_row(model: CVFPModel, val_ids: torch.Tensor, val_cstar: torch.Tensor, val_scored: torch.Tensor,
                    val_target_bytes: torch.Tensor, params, world: World) -> dict[str, Any]:
    val = evaluate_fixed(model, val_ids, val_cstar, val_scored, val_target_bytes, params.batch_size,
                         params.context_mode, params.precision, world)
    row = next_token_metrics(val, prefix="val_")
    weight = params.context_stability_weight if params.context_mode == "stability" else 0.0
    return {"val_objective": row["val_loss"] + weight * val["stability_mse"], "val_loss": row["val_loss"],
            "val_stability": val["stability_mse"], "val_ppl": row["val_ppl"], "val_acc": row["val_acc"],
            "val_correct": val["correct"], "val_predictions": val["predictions"], "val_bpb": row["val_bpb"]}


def train_phase2(model: CVFPModel, train_ids: torch.Tensor, train_cstar: torch.Tensor, val_ids: torch.Tensor,
                 val_cstar: torch.Tensor, val_scored: torch.Tensor, val_target_bytes: torch.Tensor, params, seed: int,
                 log: Callable[[str], None] = print, *,
                 checkpoint: Callable[[dict[str, Any]], None] | None = None,
                 resume_state: dict[str, Any] | None = None, world: World | None = None,
                 options: fast.FastOptions = fast.DEFAULT) -> LoopResult:
    """Train the head (and, unless frozen, blocks and embedding) on C*, with early stopping.

    train_ids (N,), train_cstar (N, C), val_ids (M,), val_cstar (M, C); val_scored (M-1,) and
    val_target_bytes (M-1,) say which validation predictions are scored and their targets'
    bytes (cvfp.data.carve); `params` is the `phase2` section. On return the model holds the
    weights of the epoch with the lowest validation loss (the initial weights if no epoch gave
    a finite one).

    `checkpoint(state)` is called every `params.checkpoint_interval` epochs (never after the
    last one) with everything needed to continue; `resume_state` (such a state) continues from
    it, giving the same result as an uninterrupted run. After `params.max_nonfinite_steps`
    consecutive non-finite batch losses the run stops with a StageError.

    Under torchrun (`world`, default: the initialised process group) every rank calls this with
    the same arguments; `params.batch_size` must be divisible by the world size.
    """
    world = world or current_world()
    log = main_only(log, world)
    device = next(model.parameters()).device
    model.init_head_(seed)
    broadcast_module(model, world)
    trainable = model.set_trainable(params.freeze_context, params.freeze_embedding)
    optimizer = fast.adam(trainable, params.lr, device, options)
    train_ids, train_cstar = train_ids.to(device), train_cstar.to(device)
    val_ids, val_cstar = val_ids.to(device), val_cstar.to(device)
    num_positions = train_ids.shape[0] - 1
    num_batches = math.ceil(num_positions / params.batch_size)

    result = LoopResult()
    guard = NonFiniteGuard("phase2", params.max_nonfinite_steps)
    stopper = EarlyStopping(model, params.patience, "phase2.patience")
    tokens_seen, first = 0, 1
    if resume_state is not None:
        result.history = restore_state(resume_state, model, optimizer, device, guard, stopper)
        tokens_seen = resume_state["tokens_seen"]
        first = resume_state["epoch"] + 1
        log(f"resuming from epoch {first} (checkpoint after epoch {resume_state['epoch']})")
    started = time.perf_counter()
    for epoch in range(first, params.epochs + 1):
        tick = time.perf_counter()
        sums = {"objective": 0.0, "loss": 0.0, "stability": 0.0}
        seen = 0
        batches = sampler_batches(num_positions, params.batch_size, seed, epoch, world)
        bar = progress(batches, total=num_batches, desc=f"phase2 epoch {epoch}/{params.epochs}", unit="batch",
                       disable=not world.is_main)
        for index, (batch, batch_count) in enumerate(bar, start=1):
            batch_sums = train_batch(model, optimizer, trainable, train_ids, train_cstar, batch.to(device), batch_count,
                                     params, world, options)
            if not guard.record(batch_sums is not None, f"epoch {epoch}, batch {index}/{num_batches}", bar):
                continue
            for key, value in batch_sums.items():
                sums[key] += value
            seen += batch_count
        bar.close()
        tokens_seen += seen

        train_loss = sums["loss"] / seen if seen else None
        row: dict[str, Any] = {"epoch": epoch, "train_objective": sums["objective"] / seen if seen else None,
                               "train_loss": train_loss, "train_stability": sums["stability"] / seen if seen else None,
                               "train_ppl": perplexity(train_loss)}
        row.update(_validation_row(model, val_ids, val_cstar, val_scored, val_target_bytes, params, world))
        row["skipped_steps"] = guard.skipped
        row["seconds"] = time.perf_counter() - tick
        result.history.append(row)
        improved = stopper.update(epoch, row["val_loss"], model)
        log(_epoch_line(row, params.epochs, improved))
        if stopper.should_stop(epoch, params.epochs):
            log(stopper.stop_line())
            break
        if checkpoint is not None and epoch < params.epochs and epoch % params.checkpoint_interval == 0:
            checkpoint(save_state("phase2", {"epoch": epoch}, model, optimizer, device, result.history, guard, stopper,
                                  tokens_seen=tokens_seen))

    stopper.restore(model)
    best_row = result.history[stopper.best_epoch - 1] if stopper.best_epoch else {}
    result.summary = {
        "best_epoch": stopper.best_epoch, "epochs_run": len(result.history), "stopped_early": stopper.stopped_early,
        "skipped_steps": guard.skipped, "trainable_parameters": trainable_parameters(model),
        "train_tokens_seen": tokens_seen,
        "train_tokens": train_ids.shape[0], "val_tokens": val_ids.shape[0], "context_mode": params.context_mode,
        "early_stopping_on": "val_loss",
        "best": {key: finite_or_none(best_row.get(key)) for key in (  # the best epoch's row
            "train_objective", "train_loss", "train_stability", "train_ppl", "val_objective", "val_loss",
            "val_stability", "val_ppl", "val_acc", "val_correct", "val_predictions", "val_bpb")},
    }
    seconds = time.perf_counter() - started
    result.timing = {"seconds": seconds, "train_tokens_per_second": tokens_seen / seconds,
                     "seconds_per_epoch": [row["seconds"] for row in result.history]}
    return result


def train_batch(model: CVFPModel, optimizer: torch.optim.Optimizer, trainable: list[nn.Parameter], ids: torch.Tensor,
                cstar: torch.Tensor, batch: torch.Tensor, count: int, params, world: World,
                options: fast.FastOptions = fast.DEFAULT) -> dict[str, float] | None:
    """One optimizer step on a global batch of `count` positions, of which this rank holds `batch` (the loop body).

    Returns {objective, loss, stability} summed over the global batch, or None when the objective or the
    gradient was not finite and the step was skipped (identically on every rank).
    """
    loss, sums = _global_batch_loss(model, ids, cstar, batch, count, params, world, options)
    if not math.isfinite(sums["objective"]) or not backward_and_step(loss, optimizer, trainable, params.grad_clip, world):
        return None
    return sums


def _global_batch_loss(model: CVFPModel, ids: torch.Tensor, cstar: torch.Tensor, batch: torch.Tensor, count: int,
                       params, world: World, options: fast.FastOptions) -> tuple[torch.Tensor, dict[str, float]]:
    """The mean objective over a global batch of `count` positions, of which this rank holds `batch`.

    Returns (the objective to back-propagate, {objective, loss, stability} summed over the global batch).
    The local sums are summed over ranks (differentiably, see cvfp.distributed) in one
    collective; a rank with an empty share contributes zeros.
    """
    device = next(model.parameters()).device
    if batch.numel():
        losses = phase2_losses(model, ids, cstar, batch, params.context_mode, params.context_stability_weight,
                               params.precision, options)
        local = torch.stack([losses["objective"], losses["loss"].detach(), losses["stability"].detach()]) * batch.numel()
    else:
        local = torch.zeros(3, device=device, requires_grad=True)
    total = Shard(count, world).sum(local)
    return total[0] / count, dict(zip(("objective", "loss", "stability"), total.detach().tolist()))


def _epoch_line(row: dict[str, Any], epochs: int, improved: bool) -> str:
    n = format_number
    return (f"epoch {row['epoch']}/{epochs}: train objective {n(row['train_objective'])} (loss "
            f"{n(row['train_loss'])}, ppl {n(row['train_ppl'], '.2f')}) | val objective {n(row['val_objective'])}, "
            f"val loss {n(row['val_loss'])} (nats/prediction), stability {n(row['val_stability'], '.6f')}, "
            f"ppl {n(row['val_ppl'], '.2f')}, "
            f"acc {format_rate(row['val_correct'], row['val_predictions'])}, bpb {n(row['val_bpb'])}, "
            f"skipped steps {row['skipped_steps']} ({row['seconds']:.1f}s)" + (" *best" if improved else ""))
