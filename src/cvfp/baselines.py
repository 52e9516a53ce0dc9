"""Baselines: is CVFP any good? A GRU and a small causal Transformer on the same tokens.

Both use the tokenizer, training stream and validation stream CVFP uses, and are sized so
their trainable parameters match what Phase 2 trains (`cvfp_trainable_parameters`) within
PARAM_TOLERANCE: the width (embedding size = hidden size = model width) is solved for, the
depth comes from params. Embeddings and output heads are untied, as in CVFP.

Budget: the same number of training tokens (predicted positions) as Phase 2 sees at most,
`phase2.epochs x (train tokens - 1)`, unless `baselines.budget_tokens` sets another count;
early stopping on validation loss (`patience`, in epochs) with the best weights kept.

Training: the train stream cut into contiguous windows of `seq_len` inputs (each predicting
the next `seq_len` tokens, so one epoch predicts each of the N-1 positions once), shuffled,
batched, every window starting from an empty state. Validation predicts every val token t+1
exactly once, so bits per byte has CVFP's numerator (summed CE nats over the N-1 positions)
and denominator (val bytes): the GRU carries its hidden state across consecutive windows, so
it reads the stream from its start like CVFP's free-running scan; the Transformer sees
non-overlapping windows of `seq_len` with no carry (a token sees at most the window before it).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from cvfp.distributed import SINGLE, Shard, World, backward_and_step, broadcast_module, main_only, sampler_batches
from cvfp.distributed import current as current_world
from cvfp.errors import ArtifactError
from cvfp.io import load_checkpoint, save_checkpoint
from cvfp.loop import EarlyStopping, LoopResult, NonFiniteGuard
from cvfp.metrics import (EMPTY_COUNTS, add_counts, count_predictions, finite_or_none, format_number, format_rate,
                          next_token_metrics)
from cvfp.model import ModelArgs, phase2_trainable_parameters, trainable_parameters
from cvfp.runtime import progress

KINDS = ("gru", "transformer")
PARAM_TOLERANCE = 0.10  # the matching rule: |baseline - CVFP| <= 10% of CVFP's trainable parameters
IGNORE = -100  # target of a padded position (cross_entropy's ignore_index)


@dataclass
class GRUArgs:
    vocab_size: int
    width: int  # embedding size = GRU hidden size
    num_layers: int = 1


@dataclass
class TransformerArgs:
    vocab_size: int
    width: int  # d_model
    num_layers: int = 2
    num_heads: int = 4
    ffn_mult: int = 4
    seq_len: int = 64  # longest context: the learned position table has this many rows


class GRULanguageModel(nn.Module):
    """Embedding -> torch.nn.GRU -> Linear head. The hidden state can be carried between calls."""

    carries_state = True

    def __init__(self, args: GRUArgs):
        super().__init__()
        self.args = args
        self.token_embedding = nn.Embedding(args.vocab_size, args.width)
        self.gru = nn.GRU(args.width, args.width, args.num_layers, batch_first=True)
        self.head = nn.Linear(args.width, args.vocab_size)

    def forward(self, ids: torch.Tensor, state: torch.Tensor | None = None):
        """ids (B, T), state (L, B, W) or None (zeros) -> logits (B, T, V), state (L, B, W)."""
        hidden, state = self.gru(self.token_embedding(ids), state)
        return self.head(hidden), state


class TransformerLanguageModel(nn.Module):
    """Token + learned position embeddings, pre-norm causal nn.TransformerEncoderLayers, LayerNorm, Linear head."""

    carries_state = False

    def __init__(self, args: TransformerArgs):
        super().__init__()
        if args.width % args.num_heads:
            raise ValueError(f"transformer width {args.width} is not a multiple of num_heads {args.num_heads}")
        self.args = args
        self.token_embedding = nn.Embedding(args.vocab_size, args.width)
        self.position_embedding = nn.Embedding(args.seq_len, args.width)
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(args.width, args.num_heads, args.ffn_mult * args.width, dropout=0.0,
                                       batch_first=True, norm_first=True)
            for _ in range(args.num_layers))
        self.final_norm = nn.LayerNorm(args.width)
        self.head = nn.Linear(args.width, args.vocab_size)

    def forward(self, ids: torch.Tensor, state: None = None):
        """ids (B, T) with T <= seq_len -> logits (B, T, V), None (no state: the window is the context)."""
        length = ids.shape[1]
        if length > self.args.seq_len:
            raise ValueError(f"{length} tokens exceed the transformer's seq_len {self.args.seq_len}")
        positions = torch.arange(length, device=ids.device)
        x = self.token_embedding(ids) + self.position_embedding(positions)  # (B, T, W)
        mask = nn.Transformer.generate_square_subsequent_mask(length, device=ids.device)
        for layer in self.layers:
            x = layer(x, src_mask=mask, is_causal=True)
        return self.head(self.final_norm(x)), None


def build(kind: str, args) -> nn.Module:
    return {"gru": GRULanguageModel, "transformer": TransformerLanguageModel}[kind](args)


def cvfp_trainable_parameters(model_params, phase2_params, vocab_size: int) -> int:
    """What Phase 2 trains: a CVFPModel from params.model, frozen as phase2.freeze_* say (no weights made)."""
    return phase2_trainable_parameters(ModelArgs.from_params(model_params, vocab_size), phase2_params.freeze_context,
                                       phase2_params.freeze_embedding)


def baseline_args(kind: str, width: int, vocab_size: int, params):
    """The args of a `kind` baseline of this width; depth and shape from the `baselines` section."""
    if kind == "gru":
        return GRUArgs(vocab_size=vocab_size, width=width, num_layers=params.gru.layers)
    t = params.transformer
    return TransformerArgs(vocab_size=vocab_size, width=width, num_layers=t.layers, num_heads=t.heads,
                           ffn_mult=t.ffn_mult, seq_len=params.seq_len)


def count_for(kind: str, width: int, vocab_size: int, params) -> int:
    """Trainable parameters of a baseline of this width, counted on the meta device (no memory, exact)."""
    with torch.device("meta"):
        return trainable_parameters(build(kind, baseline_args(kind, width, vocab_size, params)))


def match_width(kind: str, target: int, vocab_size: int, params) -> tuple[int, int]:
    """The width whose parameter count is closest to `target`: (width, parameters).

    Widths are multiples of the head count for the Transformer. The count grows with the
    width, so a doubling search then bisection finds the first width at or above the target;
    it or the one below is the closest. Raises ValueError when even that misses by more than
    PARAM_TOLERANCE (e.g. a vocabulary so large that the smallest model is already too big).
    """
    step = params.transformer.heads if kind == "transformer" else 1
    low, high = 1, 1  # multiples of step
    while count_for(kind, high * step, vocab_size, params) < target:
        low, high = high, high * 2
    while low < high:
        middle = (low + high) // 2
        if count_for(kind, middle * step, vocab_size, params) < target:
            low = middle + 1
        else:
            high = middle
    candidates = [(abs(count_for(kind, k * step, vocab_size, params) - target), k) for k in (high - 1, high) if k >= 1]
    width = min(candidates)[1] * step
    count = count_for(kind, width, vocab_size, params)
    if abs(count - target) > PARAM_TOLERANCE * target:
        raise ValueError(
            f"no {kind} width matches CVFP's {target} trainable parameters within {PARAM_TOLERANCE:.0%}: the closest, "
            f"width {width}, has {count} ({(count - target) / target:+.1%}); change baselines.{kind} depth/shape "
            f"or the CVFP model size")
    return width, count


def windows(ids: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Contiguous windows predicting each of the N-1 next tokens once.

    ids (N,) -> inputs (W, seq_len), targets (W, seq_len) with W = ceil((N-1) / seq_len);
    inputs[w, i] = ids[w*L + i] predicts targets[w, i] = ids[w*L + i + 1]. The last window is
    padded at its end (input id 0, target IGNORE), which no earlier position can see.
    """
    predicted = ids.numel() - 1
    count = max(math.ceil(predicted / seq_len), 0)
    inputs = ids.new_zeros(count * seq_len)
    targets = ids.new_full((count * seq_len,), IGNORE)
    inputs[:predicted] = ids[:-1]
    targets[:predicted] = ids[1:]
    return inputs.view(count, seq_len), targets.view(count, seq_len)


def windowed(values: torch.Tensor, seq_len: int, fill) -> torch.Tensor:
    """A per-prediction tensor (N-1,) laid out like `windows`' targets: (W, seq_len), the padding `fill`."""
    count = max(math.ceil(values.numel() / seq_len), 0)
    out = values.new_full((count * seq_len,), fill)
    out[:values.numel()] = values
    return out.view(count, seq_len)


@torch.no_grad()
def validation_counts(model: nn.Module, ids: torch.Tensor, scored: torch.Tensor, target_bytes: torch.Tensor,
                      seq_len: int, batch_size: int) -> dict[str, Any]:
    """Next-token counts over the N-1 predictions of ids (N,): `count_predictions`' sums over the scored ones.

    scored (N-1,) bool and target_bytes (N-1,) come with the split (cvfp.data.carve). The GRU
    runs the windows in order with its state carried (one pass over the stream); the
    Transformer runs them batched, each from scratch.
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    inputs, targets = (t.to(device) for t in windows(ids, seq_len))
    keep = windowed(scored.to(device), seq_len, False)  # padded positions are never scored
    sizes = windowed(target_bytes.to(device), seq_len, 0)
    counts = dict(EMPTY_COUNTS)
    state = None
    step = 1 if model.carries_state else batch_size
    for start in range(0, inputs.shape[0], step):
        x, y = inputs[start:start + step], targets[start:start + step]
        logits, state = model(x, state)
        y = y.reshape(-1).clamp_min(0)  # IGNORE padding: any valid id, it is not scored
        counts = add_counts(counts, count_predictions(logits.reshape(-1, logits.shape[-1]), y,
                                                      keep[start:start + step].reshape(-1),
                                                      sizes[start:start + step].reshape(-1)))
    model.train(was_training)
    return counts


def train_baseline(model: nn.Module, train_ids: torch.Tensor, val_ids: torch.Tensor, val_scored: torch.Tensor,
                   val_target_bytes: torch.Tensor, params,
                   lr: float, budget_tokens: int, seed: int, name: str,
                   log: Callable[[str], None] = print, world: World | None = None) -> LoopResult:
    """Train a baseline for at most `budget_tokens` predicted positions, early-stopping on val loss.

    train_ids (N,), val_ids (M,) with val_scored and val_target_bytes (M-1,) (which validation
    predictions are scored, their targets' bytes); `params` is the `baselines` section (seq_len, batch_size,
    patience, grad_clip, max_nonfinite_steps). An epoch is one shuffled pass over the train
    windows (N-1 positions); the last epoch stops mid-way when the budget runs out (targets
    past it are masked). On return the model holds the weights of the epoch with the lowest
    validation loss.

    Under torchrun (`world`, default: the initialised process group) each global batch of
    windows (DistributedSampler's seeded order) is split between the ranks, every window
    i of it going to rank i mod N; the loss is the batch's summed CE over ranks divided by its
    global target count, gradients are averaged. Validation runs whole on every rank (the GRU
    reads the stream in order), so every rank sees the same numbers.
    """
    world = world or current_world()
    log = main_only(log, world)
    broadcast_module(model, world)
    device = next(model.parameters()).device
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    inputs, targets = windows(train_ids, params.seq_len)
    per_epoch = int((targets != IGNORE).sum())
    if per_epoch == 0 or budget_tokens <= 0:
        raise ValueError(f"nothing to train: {per_epoch} training positions, a budget of {budget_tokens} tokens")
    epochs = math.ceil(budget_tokens / per_epoch)

    result = LoopResult()
    guard = NonFiniteGuard("baselines", params.max_nonfinite_steps)
    stopper = EarlyStopping(model, params.patience, "baselines.patience")
    tokens_seen = 0
    started = time.perf_counter()
    model.train()
    for epoch in range(1, epochs + 1):
        tick = time.perf_counter()
        total, seen = 0.0, 0
        num_batches = math.ceil(inputs.shape[0] / params.batch_size)
        batches = sampler_batches(inputs.shape[0], params.batch_size, seed, epoch, SINGLE)  # global batches
        bar = progress(batches, total=num_batches, desc=f"{name} epoch {epoch}/{epochs}", unit="batch",
                       disable=not world.is_main)
        for index, (batch, _) in enumerate(bar, start=1):
            remaining = budget_tokens - tokens_seen - seen
            if remaining <= 0:
                break
            y = targets[batch].clone()
            valid = y != IGNORE
            y[valid & (valid.flatten().cumsum(0).view_as(y) > remaining)] = IGNORE  # past the budget
            count = int((y != IGNORE).sum())  # over the global batch
            if count == 0:
                continue
            mine = slice(world.rank, None, world.size)  # this rank's windows of it
            x, y = inputs[batch][mine].to(device), y[mine].to(device)
            if x.shape[0]:
                logits, _ = model(x)
                local = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1),
                                        ignore_index=IGNORE, reduction="sum")
            else:
                local = torch.zeros((), device=device, requires_grad=True)
            loss = Shard(count, world).sum(local) / count
            stepped = bool(torch.isfinite(loss)) and backward_and_step(loss, optimizer, list(model.parameters()),
                                                                        params.grad_clip, world)
            if not guard.record(stepped, f"{name} epoch {epoch}, batch {index}/{num_batches}", bar):
                continue
            total += float(loss.detach()) * count
            seen += count
        bar.close()
        tokens_seen += seen

        val = next_token_metrics(validation_counts(model, val_ids, val_scored, val_target_bytes, params.seq_len,
                                                   params.batch_size), prefix="val_")
        row = {"epoch": epoch, "train_loss": total / seen if seen else None, "train_tokens_seen": tokens_seen,
               **{k: finite_or_none(v) for k, v in val.items()}, "skipped_steps": guard.skipped,
               "seconds": time.perf_counter() - tick}
        result.history.append(row)
        improved = stopper.update(epoch, val["val_loss"], model)
        log(f"{name} epoch {epoch}/{epochs}: train loss {format_number(row['train_loss'])} | val loss "
            f"{format_number(row['val_loss'])}, ppl {format_number(row['val_ppl'], '.2f')}, "
            f"acc {format_rate(row['correct'], row['predictions'])}, "
            f"bpb {format_number(row['val_bpb'])}, {tokens_seen}/{budget_tokens} tokens ({row['seconds']:.1f}s)"
            + (" *best" if improved else ""))
        last_epoch = epoch if tokens_seen >= budget_tokens else epochs  # the budget ends the loop too
        if stopper.should_stop(epoch, last_epoch):
            log(f"{name}: {stopper.stop_line()}")
        if tokens_seen >= budget_tokens or stopper.stopped_early:
            break

    stopper.restore(model)
    model.eval()
    best_row = result.history[stopper.best_epoch - 1] if stopper.best_epoch else {}
    result.summary = {
        "trainable_parameters": trainable_parameters(model), "width": model.args.width,
        "num_layers": model.args.num_layers, "best_epoch": stopper.best_epoch, "epochs_run": len(result.history),
        "stopped_early": stopper.stopped_early, "skipped_steps": guard.skipped, "budget_tokens": budget_tokens,
        "train_tokens_seen": tokens_seen, "train_tokens": int(train_ids.numel()), "val_tokens": int(val_ids.numel()),
        "best": {key: best_row.get(key) for key in ("train_loss", "val_loss", "val_ppl", "val_acc", "val_bpb",
                                                     "total_nats", "predictions", "correct", "bytes")},  # the best epoch's row
    }
    seconds = time.perf_counter() - started
    result.timing = {"seconds": seconds, "train_tokens_per_second": tokens_seen / seconds,
                     "seconds_per_epoch": [row["seconds"] for row in result.history]}
    return result


def save_baseline(path: str | Path, kind: str, model: nn.Module, **extra: Any) -> None:
    """Checkpoint = weights + kind + the args that built them (plain values: loads with weights_only=True)."""
    save_checkpoint(path, {"kind": kind, "model_args": asdict(model.args), "state_dict": model.state_dict(), **extra})


def load_baseline(path: str | Path, device: torch.device | str = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a baseline from a checkpoint written by `save_baseline`."""
    payload = load_checkpoint(path, "baselines")
    try:
        kind = payload["kind"]
        args = {"gru": GRUArgs, "transformer": TransformerArgs}[kind](**payload["model_args"])
        model = build(kind, args)
        model.load_state_dict(payload["state_dict"])
    except (KeyError, TypeError, RuntimeError, ValueError) as err:
        raise ArtifactError(f"{path}: checkpoint does not match a baseline ({err}); "
                            f"rerun the 'baselines' stage") from None
    return model.to(device).eval(), payload
