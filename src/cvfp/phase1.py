"""Phase 1: learn the context update alone, so contexts become fixed points (SPEC section 4).

Iteration 0 is an exact sequential scan from c = 0 (no update). Every later iteration is a
parallel (Jacobi) step: token t's input context is the previous iteration's c_{t-1}, and
token 0 takes the previous iteration's *last* context (carry-over, never a reset to zero).

Chunking without changing the maths: the losses (raw-MSE CVFP term, diversity term) are
functions of the whole context matrix C (N, C). Each iteration therefore runs two passes:
pass 1 computes C chunk by chunk without a graph, the losses and dL/dC are taken on C as a
leaf; pass 2 recomputes each chunk with a graph and back-propagates its slice of dL/dC.
Memory is bounded by one chunk's graph, and the one optimizer step per iteration gets the
exact full-batch gradient. Where the fast paths apply (CUDA, see cvfp.fast) the step is
compiled, and when one chunk holds the whole stream the two passes become one: a forward with
a graph, the losses on its output, one backward (3 forward-equivalents of work instead of 4).

Data parallel (torchrun, see cvfp.distributed): each rank holds a contiguous shard of each
stream. Token lo's input context is the previous rank's last context of the previous
iteration (`carry`, one vector exchanged per iteration; rank 0 gets the last rank's). The
losses' sums over tokens go through `Shard.sum`, so every rank computes the whole loss and,
with averaged gradients, the one-process gradient. Iteration 0 is the exact sequential scan
on rank 0, broadcast to the others.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

from cvfp import fast
from cvfp.distributed import (Shard, World, average_gradients, broadcast, broadcast_module, gather_rows, main_only,
                              previous_rank_rows, select_rows, sum_numbers)
from cvfp.distributed import current as current_world
from cvfp.loop import LoopResult, NonFiniteGuard, restore_state, save_state
from cvfp.metrics import change_sums, effective_rank, format_rank, format_rate, relative_residual, sample_indices
from cvfp.model import CVFPModel
from cvfp.runtime import progress
from cvfp.scan import exact_scan

EMA_EPS = 1e-6  # the seed's guard in 1 / (mean(var) + eps)


class DiversityLoss:
    """The diversity term on a context matrix C (N, C); keeps EMA state for `ema_variance`.

    `part` says which rows of the stream the matrices passed in are (all of them by default);
    means over tokens are sums over all ranks' rows divided by the stream's N.

    global_deviation: -||C - mean(C)||_F / N.
    ema_variance: 1 / (mean_d var_d + 1e-6), var_d the EMA of dimension d's variance,
    var = m var_old + (1 - m) mean_t (c_t - mean_old)^2, and after each accepted iteration
    (`commit`) mean = m mean_old + (1 - m) mean_t c_t. The seed's momentum is per token: over
    one pass of N tokens its EMA keeps momentum ** N of the state before the pass, so one
    update per iteration uses m = momentum ** N (within the pass the tokens count equally,
    not exponentially). The statistics start from the first batch's mean and variance, not
    from the seed's variance of ones, a prior no data put there.
    """

    def __init__(self, kind: str, momentum: float, part: Shard | None = None):
        self.kind = kind
        self.momentum = momentum
        self.part = part
        self.mean: torch.Tensor | None = None
        self.var: torch.Tensor | None = None

    def shard_of(self, contexts: torch.Tensor) -> Shard:
        """The rows `contexts` are of the stream: `part`, or the whole of `contexts` when none was given."""
        return self.part or Shard(contexts.shape[0])

    def iteration_momentum(self, part: Shard) -> float:
        """The per-token momentum applied once for a whole pass of the stream's N tokens: momentum ** N."""
        return self.momentum ** part.n

    def __call__(self, contexts: torch.Tensor) -> torch.Tensor:
        part = self.shard_of(contexts)
        if self.kind == "global_deviation":
            # -||C - mean(C)||_F / N: larger spread around the centroid, lower loss
            centroid = part.sum(contexts.sum(dim=0)) / part.n
            return -part.sum((contexts - centroid).pow(2).sum()).sqrt() / part.n
        if self.mean is None:  # the first batch's statistics
            first = contexts.detach()
            self.mean = part.sum(first.sum(dim=0)) / part.n
            self.var = part.sum((first - self.mean).pow(2).sum(dim=0)) / part.n
        m = self.iteration_momentum(part)
        # this iteration's share of the EMA stays differentiable (SPEC: the seed's fully
        # detached version gave the loss no gradient at all)
        var = m * self.var + (1 - m) * part.sum((contexts - self.mean).pow(2).sum(dim=0)) / part.n
        return 1.0 / (var.mean() + EMA_EPS)

    def commit(self, contexts: torch.Tensor) -> None:
        """Advance the EMA statistics with this iteration's (detached) contexts."""
        if self.kind != "ema_variance" or self.mean is None:
            return
        contexts, part = contexts.detach(), self.shard_of(contexts)
        m = self.iteration_momentum(part)
        self.var = m * self.var + (1 - m) * part.sum((contexts - self.mean).pow(2).sum(dim=0)) / part.n
        self.mean = m * self.mean + (1 - m) * part.sum(contexts.sum(dim=0)) / part.n


def shifted_inputs(previous: torch.Tensor, carry: torch.Tensor | None = None) -> torch.Tensor:
    """Input context of token t is previous[t-1]; the first token gets `carry`.

    In one process `carry` is previous[-1], the stream's last context (carry-over, the
    default); on a rank holding a shard it is the previous rank's last context.
    """
    carry = previous[-1] if carry is None else carry
    return torch.cat([carry.unsqueeze(0).to(previous.dtype), previous[:-1]])


def context_losses(contexts: torch.Tensor, previous: torch.Tensor, diversity: DiversityLoss,
                   dist_reg_weight: float) -> dict[str, torch.Tensor]:
    """CVFP loss (raw MSE against the previous iteration, no normalisation) and diversity loss.

    Over the whole stream: the rows of `contexts` are `diversity.part` of it.
    """
    part = diversity.shard_of(contexts)
    cvfp = part.sum((contexts - previous).pow(2).sum()) / (part.n * contexts.shape[1])
    div = diversity(contexts)
    return {"cvfp_loss": cvfp, "diversity_loss": div, "total_loss": (1 - dist_reg_weight) * cvfp + dist_reg_weight * div}


def parallel_pass(model: CVFPModel, embeddings: torch.Tensor, inputs: torch.Tensor, chunk: int,
                  precision: str = "fp32", options: fast.FastOptions = fast.DEFAULT) -> torch.Tensor:
    """F(inputs[t], e_t) for all t, chunk by chunk, without a graph: (N, E), (N, C) -> (N, C) float32."""
    out = torch.empty_like(inputs, dtype=torch.float32)
    step = fast.step_function(model, precision, options)
    with torch.no_grad(), fast.autocast(embeddings.device, precision):
        for start in range(0, embeddings.shape[0], chunk):
            stop = start + chunk
            out[start:stop] = step(inputs[start:stop], embeddings[start:stop])[0].float()
    return out


def _recon_sum(model: CVFPModel, contexts: torch.Tensor, inputs: torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor:
    """Sum of squared errors of the context decoder reconstructing [c_prev; x] from c."""
    target = torch.cat([inputs, embeddings], dim=-1)
    return (model.context_decoder(contexts).float() - target.float()).pow(2).sum()


def _recon_scale(model: CVFPModel, params, part: Shard) -> float:
    """recon_weight / (N x (C + E)): turns the decoder's summed squared error into its weighted MSE."""
    return params.recon_weight / (part.n * (model.args.context_dim + model.args.embed_dim))


def _loss_values(cvfp: float, diversity: float, total: float, recon_sum: float, recon_scale: float,
                 recon_weight: float) -> dict[str, float]:
    """The iteration's reported loss terms; with the decoder on, its plain MSE and its share of the total."""
    values = {"cvfp_loss": cvfp, "diversity_loss": diversity, "total_loss": total}
    if recon_scale > 0:
        values["recon_loss"] = recon_sum * recon_scale / recon_weight
        values["total_loss"] += recon_sum * recon_scale
    return values


def jacobi_step(model: CVFPModel, embeddings: torch.Tensor, previous: torch.Tensor, diversity: DiversityLoss,
                params, carry: torch.Tensor | None = None, optimizer: torch.optim.Optimizer | None = None,
                options: fast.FastOptions = fast.DEFAULT) -> tuple[torch.Tensor, dict[str, float], bool]:
    """One Phase-1 iteration on one split: contexts = F(shifted previous, e) for every token, and their losses.

    embeddings and previous hold the rows `diversity.part` of the stream (all by default),
    `carry` the input context of its first row (see `shifted_inputs`). With an `optimizer`
    (training) the iteration also makes one update over all N tokens; without one
    (validation) it reports the same loss terms and changes nothing but the EMA statistics.
    Returns (contexts computed before the update, loss values, skipped). A non-finite loss or
    gradient skips the update; the caller counts it.
    """
    n = embeddings.shape[0]
    part = diversity.shard_of(previous)
    inputs = shifted_inputs(previous, carry)
    if optimizer is not None and fast.enabled(embeddings.device) and n <= params.batch_tokens:
        return _single_pass_update(model, optimizer, embeddings, inputs, previous, diversity, params, options)
    contexts = parallel_pass(model, embeddings, inputs, params.batch_tokens, params.precision, options)
    # the losses are functions of the whole matrix: taken on it as a leaf, whose gradient pass 2 pushes through F
    leaf = contexts.clone().requires_grad_(True) if optimizer is not None else contexts
    losses = context_losses(leaf, previous, diversity, params.dist_reg_weight)
    scale = _recon_scale(model, params, part)
    recon_sum = 0.0
    if scale > 0:
        with torch.no_grad():
            local = sum(_recon_sum(model, contexts[s:s + params.batch_tokens], inputs[s:s + params.batch_tokens],
                                   embeddings[s:s + params.batch_tokens]) for s in range(0, n, params.batch_tokens))
            recon_sum = float(part.sum(local))
    values = _loss_values(*(float(losses[k].detach()) for k in ("cvfp_loss", "diversity_loss", "total_loss")),
                          recon_sum, scale, params.recon_weight)
    if optimizer is None:
        diversity.commit(contexts)
        return contexts, values, False
    if not math.isfinite(values["total_loss"]):
        return contexts, values, True

    (grad_contexts,) = torch.autograd.grad(losses["total_loss"], leaf)
    optimizer.zero_grad(set_to_none=True)
    step = fast.step_function(model, params.precision, options)
    with fast.autocast(embeddings.device, params.precision):
        for start in range(0, n, params.batch_tokens):
            stop = start + params.batch_tokens
            chunk = step(inputs[start:stop], embeddings[start:stop])[0].float()
            surrogate = (chunk * grad_contexts[start:stop]).sum()  # its gradient is dL/dC's slice pushed through F
            if scale > 0:  # x world size: each rank stands for the whole loss (see cvfp.distributed)
                surrogate = surrogate + part.world.size * scale * _recon_sum(
                    model, chunk, inputs[start:stop], embeddings[start:stop])
            surrogate.backward()
    grad_norm = _clip_and_queue_step(model, optimizer, params.grad_clip, part.world, losses["total_loss"].detach())
    skipped = _finish_step(optimizer, bool(torch.isfinite(grad_norm)), diversity, contexts)
    return contexts, values, skipped


def _single_pass_update(model: CVFPModel, optimizer: torch.optim.Optimizer, embeddings: torch.Tensor,
                        inputs: torch.Tensor, previous: torch.Tensor, diversity: DiversityLoss, params,
                        options: fast.FastOptions) -> tuple[torch.Tensor, dict[str, float], bool]:
    """`jacobi_step`'s update when one chunk holds all N tokens: the same loss and gradient, one forward fewer.

    The losses are compiled too (in one process), and with a fused Adam the skip on a
    non-finite loss or gradient is decided on the device: the host reads the numbers back
    once, after the optimizer step has been queued, so the GPU never waits for it mid-step.
    """
    part = diversity.shard_of(previous)
    optimizer.zero_grad(set_to_none=True)
    with fast.autocast(embeddings.device, params.precision):
        output = fast.step_function(model, params.precision, options)(inputs, embeddings)[0].float()
    contexts = output.detach()
    losses_fn = context_losses if part.world.active or not options.fused_step else \
        fast.compiled(model, "phase1_losses", context_losses, options)
    losses = losses_fn(output, previous, diversity, params.dist_reg_weight)
    total = losses["total_loss"]
    scale = _recon_scale(model, params, part)
    recon = torch.zeros((), device=output.device)
    if scale > 0:
        with fast.autocast(embeddings.device, params.precision):
            recon = part.sum(_recon_sum(model, output, inputs, embeddings))
        total = total + scale * recon
    # backward before reading any number: a non-finite loss still skips the step (below)
    total.backward()
    grad_norm = _clip_and_queue_step(model, optimizer, params.grad_clip, part.world, total.detach())
    numbers = torch.stack([losses["cvfp_loss"], losses["diversity_loss"], losses["total_loss"], recon.float(),
                           grad_norm.float()]).detach().tolist()
    values = _loss_values(*numbers[:4], scale, params.recon_weight)
    skipped = _finish_step(optimizer, math.isfinite(values["total_loss"]) and math.isfinite(numbers[4]), diversity,
                           contexts)
    return contexts, values, skipped


def _clip_and_queue_step(model: CVFPModel, optimizer: torch.optim.Optimizer, grad_clip: float, world: World,
                         loss: torch.Tensor) -> torch.Tensor:
    """Average gradients over ranks and clip them; with a fused Adam, queue the step, skipped on the device
    when `loss` or the gradient norm is not finite. Returns the gradient norm (not read back here)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    average_gradients(trainable, world)
    grad_norm = torch.nn.utils.clip_grad_norm_(trainable, grad_clip)
    if fast.skip_on_device(optimizer):
        optimizer.found_inf = (~(torch.isfinite(loss) & torch.isfinite(grad_norm))).float()
        optimizer.step()
        optimizer.found_inf = None
    return grad_norm


def _finish_step(optimizer: torch.optim.Optimizer, finite: bool, diversity: DiversityLoss,
                 contexts: torch.Tensor) -> bool:
    """Skip (gradients dropped) or take the step and advance the EMA statistics; returns whether it was skipped."""
    if not finite:
        optimizer.zero_grad(set_to_none=True)
        return True
    if not fast.skip_on_device(optimizer):
        optimizer.step()
    diversity.commit(contexts)
    return False


@dataclass
class IterationStats:
    """One Phase-1 iteration on one split."""

    cvfp_loss: float | None
    diversity_loss: float | None
    total_loss: float | None
    converged_tokens: int | None
    tokens: int
    effective_rank: float
    relative_residual: float | None
    seconds: float
    skipped: bool = False

    def row(self, prefix: str) -> dict[str, float]:
        values = {
            "cvfp_loss": self.cvfp_loss, "diversity_loss": self.diversity_loss, "total_loss": self.total_loss,
            "convergence_rate": None if self.converged_tokens is None else self.converged_tokens / self.tokens,
            "converged_tokens": self.converged_tokens, "effective_rank": self.effective_rank,
            "relative_residual": self.relative_residual, "seconds": self.seconds,
        }
        return {f"{prefix}_{k}": v for k, v in values.items() if v is not None}


@dataclass
class Phase1Result(LoopResult):
    """The loop's result plus the last accepted contexts of each split (whole streams, every rank)."""

    train_contexts: torch.Tensor | None = None
    val_contexts: torch.Tensor | None = None


def _stats(contexts: torch.Tensor, previous: torch.Tensor | None, losses: dict[str, float] | None, params,
           seed: int, seconds: float, part: Shard, skipped: bool = False) -> IterationStats:
    """Numbers of the whole stream, from this rank's rows `part` of it (counts and norms summed over ranks)."""
    converged, residual = None, None
    if previous is not None:
        sums = sum_numbers(change_sums(contexts, previous, params.convergence_threshold), part.world)
        converged, residual = int(sums["converged"]), relative_residual(sums["change_sq"], sums["norm_sq"])
    rows = select_rows(contexts, part.lo, sample_indices(part.n, params.effective_rank_samples, seed), part.world)
    return IterationStats(
        cvfp_loss=losses["cvfp_loss"] if losses else None,
        diversity_loss=losses["diversity_loss"] if losses else None,
        total_loss=losses["total_loss"] if losses else None,
        converged_tokens=converged, tokens=part.n, effective_rank=effective_rank(rows),
        relative_residual=residual, seconds=seconds, skipped=skipped)


def train_phase1(model: CVFPModel, train_ids: torch.Tensor, val_ids: torch.Tensor, params, seed: int,
                 log: Callable[[str], None] = print, *,
                 checkpoint: Callable[[dict[str, Any]], None] | None = None,
                 resume_state: dict[str, Any] | None = None, world: World | None = None,
                 options: fast.FastOptions = fast.DEFAULT) -> Phase1Result:
    """Run Phase 1 on the train stream, mirroring each iteration on validation without updates.

    `params` is the `phase1` section. `max_iterations` counts iteration 0 (the sequential scan).
    `checkpoint(state)` is called every `params.checkpoint_interval` iterations (never after the
    last one) with everything needed to continue; `resume_state` (such a state) continues from it,
    giving the same result as an uninterrupted run. After `params.max_nonfinite_steps`
    consecutive non-finite losses the run stops with a StageError.

    Under torchrun (`world`, default: the initialised process group) every rank calls this with
    the same arguments and trains on its shard; every rank returns the same result.
    """
    world = world or current_world()
    log = main_only(log, world)
    device = next(model.parameters()).device
    ids = {"train": train_ids, "val": val_ids}
    parts = {split: Shard(split_ids.numel(), world) for split, split_ids in ids.items()}
    for split, part in parts.items():
        if part.n < world.size:
            raise ValueError(f"the {split} stream has {part.n} tokens, fewer than the {world.size} processes")
    model.zero_head_()
    model.token_embedding.requires_grad_(False)  # Phase 1 input embeddings are computed once
    model.embed_norm.requires_grad_(False)
    if resume_state is not None:  # before the embeddings are computed from the model
        model.load_state_dict(resume_state["state_dict"])
    broadcast_module(model, world)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = fast.adam(trainable, params.lr, device, options)
    with torch.no_grad():  # this rank's rows
        embeddings = {split: model.embed(ids[split][part.lo:part.hi].to(device)) for split, part in parts.items()}
    diversity = {split: DiversityLoss(params.diversity, params.ema_momentum, parts[split]) for split in embeddings}
    dim = model.context_dim
    result = Phase1Result()
    guard = NonFiniteGuard("phase1", params.max_nonfinite_steps)
    previous: dict[str, torch.Tensor] = {}  # this rank's rows of the last accepted iteration
    carry: dict[str, torch.Tensor] = {}  # the input context of this rank's first row
    first = 0
    if resume_state is not None:
        result.history = restore_state(resume_state, model, optimizer, device, guard, load_weights=False)
        for split, state in resume_state["diversity"].items():
            diversity[split].mean = None if state["mean"] is None else state["mean"].to(device)
            diversity[split].var = None if state["var"] is None else state["var"].to(device)
        for split, full in resume_state["previous"].items():
            previous[split], carry[split] = _own_rows(full.to(device), parts[split])
        first = resume_state["iteration"] + 1
        log(f"resuming from iteration {first} (checkpoint after iteration {resume_state['iteration']})")
    started = time.perf_counter()
    last: dict[str, IterationStats] = {}
    bar = progress(range(first, params.max_iterations), desc="phase1", unit="iter", disable=not world.is_main)
    for iteration in bar:
        row: dict[str, Any] = {"iteration": iteration}
        for split in ("train", "val"):
            tick = time.perf_counter()
            losses, skipped = None, False
            if iteration == 0:
                contexts, carry[split] = _own_rows(_scan_on_rank0(model, ids[split], parts[split], split), parts[split])
            else:
                contexts, losses, skipped = jacobi_step(model, embeddings[split], previous[split], diversity[split],
                                                        params, carry[split],
                                                        optimizer if split == "train" else None, options)
                if split == "train":
                    guard.record(not skipped, f"iteration {iteration}", bar)
            stats = _stats(contexts, previous.get(split), losses, params, seed, time.perf_counter() - tick,
                           parts[split], skipped)
            last[split] = stats
            row.update(stats.row(split))
            if not skipped:
                if iteration > 0:
                    carry[split] = previous_rank_rows(contexts[-1], world)
                previous[split] = contexts
        row["skipped_steps"] = guard.skipped
        result.history.append(row)
        log(_iteration_line(iteration, params.max_iterations, last, dim))
        # iteration 1 re-runs the scan's own weights on the scan's contexts, so its convergence is
        # trivially ~100%; only from iteration 2 on does it measure the effect of an update
        converged = last["train"].converged_tokens
        if iteration >= 2 and converged / last["train"].tokens >= params.min_converged_ratio:
            log(f"early stop: train convergence reached phase1.min_converged_ratio={params.min_converged_ratio}")
            break
        due = (guard.run == 0 and iteration < params.max_iterations - 1
               and (iteration + 1) % params.checkpoint_interval == 0)
        if due and (checkpoint is not None or world.active):  # every rank joins the gather
            full = {split: gather_rows(previous[split], parts[split].n, world) for split in previous}
            if checkpoint is not None:
                checkpoint(save_state(
                    "phase1", {"iteration": iteration}, model, optimizer, device, result.history, guard,
                    diversity={split: {"mean": d.mean, "var": d.var} for split, d in diversity.items()},
                    previous=full))
    bar.close()

    result.summary = {split: _split_summary(split, last[split], result.history, dim) for split in ("train", "val")}
    result.summary.update({"iterations": len(result.history), "skipped_steps": guard.skipped, "context_dim": dim})
    for split in ("train", "val"):
        log(summary_line(split, result.summary[split], dim))
    result.timing = {"seconds": time.perf_counter() - started,
                     "seconds_per_iteration": [row.get("train_seconds", 0.0) for row in result.history]}
    result.train_contexts = gather_rows(previous["train"], parts["train"].n, world)
    result.val_contexts = gather_rows(previous["val"], parts["val"].n, world)
    return result


def _scan_on_rank0(model: CVFPModel, ids: torch.Tensor, part: Shard, split: str) -> torch.Tensor:
    """Iteration 0, the exact sequential scan from c = 0 of the whole stream: run on rank 0, broadcast."""
    device = next(model.parameters()).device
    if part.world.is_main:
        with torch.no_grad():
            contexts = exact_scan(model, model.embed(ids.to(device)), progress_desc=f"phase1 scan {split}").float()
    else:
        contexts = torch.empty(part.n, model.context_dim, device=device)
    return broadcast(contexts.contiguous(), part.world)


def _own_rows(full: torch.Tensor, part: Shard) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's rows of a whole-stream matrix, and the carry: the row before them (the last row for rank 0)."""
    return full[part.lo:part.hi].clone(), full[part.lo - 1].clone()


# the first cvfp loss of weights that have been updated: train's iteration 1 runs the scan's own weights on the
# scan's contexts (a loss of ~0 but for token 0's carry-over); val's iteration 1 runs after train's first step
FIRST_UPDATED_ITERATION = {"train": 2, "val": 1}


def _split_summary(split: str, stats: IterationStats, history: list[dict[str, Any]], dim: int) -> dict[str, Any]:
    """The last iteration's numbers of one split, beside the untrained model's (iteration 0) effective rank and,
    once there are two, the first and final cvfp loss of updated weights (`cvfp_loss_rose`: the final is higher)."""
    rows = {row["iteration"]: row for row in history}
    initial = rows[0][f"{split}_effective_rank"]
    summary = {"effective_rank": stats.effective_rank, "effective_rank_ratio": stats.effective_rank / dim,
               "effective_rank_initial": initial, "effective_rank_initial_ratio": initial / dim,
               "tokens": stats.tokens}
    if stats.converged_tokens is not None:
        summary.update({"convergence_rate": stats.converged_tokens / stats.tokens,
                        "converged_tokens": stats.converged_tokens, "cvfp_loss": stats.cvfp_loss,
                        "diversity_loss": stats.diversity_loss, "relative_residual": stats.relative_residual})
    first_iteration, final_iteration = FIRST_UPDATED_ITERATION[split], history[-1]["iteration"]
    first = rows.get(first_iteration, {}).get(f"{split}_cvfp_loss")
    if first is not None and final_iteration > first_iteration:
        summary.update({"cvfp_loss_first": first, "cvfp_loss_first_iteration": first_iteration,
                        "cvfp_loss_final": stats.cvfp_loss, "cvfp_loss_final_iteration": final_iteration,
                        "cvfp_loss_rose": bool(stats.cvfp_loss > first)})
    return summary


def summary_line(split: str, summary: dict[str, Any], dim: int) -> str:
    """`train: Effective Rank: 55.37/64 (86.5%), untrained 55.56/64 (86.8%), convergence 10.0% (5803/57967),
    cvfp loss 0.033319 (iteration 2) -> 0.066693 (iteration 9), ROSE` from one split's summary."""
    text = (f"{split}: Effective Rank: {format_rank(summary['effective_rank'], dim)}, "
            f"untrained {format_rank(summary['effective_rank_initial'], dim)}")
    if "converged_tokens" in summary:
        text += f", convergence {format_rate(summary['converged_tokens'], summary['tokens'])}"
    if "cvfp_loss_rose" in summary:
        text += (f", cvfp loss {summary['cvfp_loss_first']:.6f} (iteration {summary['cvfp_loss_first_iteration']})"
                 f" -> {summary['cvfp_loss_final']:.6f} (iteration {summary['cvfp_loss_final_iteration']}), "
                 + ("ROSE" if summary["cvfp_loss_rose"] else "fell"))
    return text


def _iteration_line(iteration: int, total: int, last: dict[str, IterationStats], dim: int) -> str:
    parts = [f"iteration {iteration}/{total - 1}"]
    for split, stats in last.items():
        text = f"{split}: Effective Rank: {format_rank(stats.effective_rank, dim)}"
        if stats.converged_tokens is not None:
            text += (f", convergence {format_rate(stats.converged_tokens, stats.tokens)}"
                     f", cvfp {stats.cvfp_loss:.6f}, diversity {stats.diversity_loss:.6f}")
        if stats.skipped:
            text += " [step skipped: non-finite]"
        parts.append(text + f" ({stats.seconds:.1f}s)")
    return " | ".join(parts)
