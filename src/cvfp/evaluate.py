"""Evaluation of the final model and of the contexts (SPEC section 7).

Next-token metrics on validation in two modes: *fixed* (input contexts are C*, as Phase 2
trained) and *free* (contexts from a sequential scan of the final model itself, as the model
would really be used), and their gap. Then the context checks: effective rank and collapse
flags of train and val C*, the identity-mapping check of the final model, the CVFP
convergence check and the contraction estimate of the Phase-1 and of the final model.
"""

from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F

from cvfp.errors import ArtifactError
from cvfp.scan import exact_scan
from cvfp.metrics import (TOKEN_SENSITIVITY_TOLERANCE, context_health, contraction_estimate, convergence_check,
                          format_number, format_rank, format_rate, identity_check, next_token_metrics,
                          singular_spectrum)
from cvfp.model import CVFPModel
from cvfp.phase2 import evaluate_fixed

NEXT_TOKEN_KEYS = ("val_loss", "val_ppl", "val_acc", "val_bpb")
MODEL_LABELS = {"": "final", "_phase1": "phase1"}  # metrics-key suffix -> name in the table


@dataclass
class EvaluationResult:
    """`metrics` is metrics/eval.json; `spectrum` the rows of metrics/eval_spectrum.csv."""

    metrics: dict[str, Any] = field(default_factory=dict)
    spectrum: list[dict[str, Any]] = field(default_factory=list)
    timing: dict[str, float] = field(default_factory=dict)  # wall-clock seconds, kept apart so reruns compare equal


def default_scan_fn(progress_desc: str | None = None) -> Callable:
    """The scan_fn of every evaluation: `cvfp.scan.exact_scan` (equal to model.scan) with a progress bar."""
    return functools.partial(exact_scan, progress_desc=progress_desc)


@torch.no_grad()
def head_counts(model: CVFPModel, contexts: torch.Tensor, token_outs: torch.Tensor, ids: torch.Tensor,
                batch_size: int) -> dict[str, Any]:
    """Head on step outputs: logits_t = head(contexts[t], token_outs[t]) predicts ids[t+1].

    contexts (N, C), token_outs (N, E), ids (N,). Sums over the N-1 predicted positions:
    dict(total_nats (summed cross-entropy), predictions (N-1), correct (top-1 hits)).
    """
    targets = ids[1:].to(contexts.device)
    contexts, token_outs = contexts[:-1], token_outs[:-1]  # the last position has nothing to predict
    total_nats, correct = 0.0, 0
    for start in range(0, targets.shape[0], batch_size):
        stop = start + batch_size
        logits = model.logits(contexts[start:stop], token_outs[start:stop]).float()
        total_nats += float(F.cross_entropy(logits, targets[start:stop], reduction="sum").double())
        correct += int((logits.argmax(dim=-1) == targets[start:stop]).sum())
    return {"total_nats": total_nats, "predictions": int(targets.shape[0]), "correct": correct}


@torch.no_grad()
def evaluate_free(model: CVFPModel, ids: torch.Tensor, scan_fn: Callable, batch_size: int) -> dict[str, Any]:
    """Free-running next-token evaluation: one sequential scan from c = 0 over ids (N,).

    The contexts are the model's own (never C*), as the model would be used. Returns
    dict(total_nats, predictions, correct) over the N-1 predicted positions.
    """
    ids = ids.to(next(model.parameters()).device)
    contexts, token_outs = scan_fn(model, model.embed(ids), with_token_out=True)
    return head_counts(model, contexts, token_outs, ids, batch_size)


def context_mode_of(payload: dict[str, Any], path: str) -> str:
    """The Phase-2 context_mode a final checkpoint was trained with (fixed-mode evaluation must match it)."""
    if "context_mode" not in payload:
        raise ArtifactError(f"{path}: no context_mode recorded (not a Phase-2 checkpoint); rerun the 'phase2' stage")
    return payload["context_mode"]


def _timed(log: Callable[[str], None], timing: dict[str, float], key: str, what: str, fn: Callable[[], Any]) -> Any:
    """Run fn, log how long it took and record the seconds as timing[f"{key}_seconds"]."""
    tick = time.perf_counter()
    value = fn()
    seconds = timing[f"{key}_seconds"] = time.perf_counter() - tick
    log(f"evaluate: {what} ({seconds:.1f}s)")
    return value


def spectrum_rows(train: torch.Tensor, val: torch.Tensor) -> list[dict[str, Any]]:
    """Rows (index, train, val) of normalised singular values; a shorter spectrum leaves blanks."""
    rows = []
    for i in range(max(train.numel(), val.numel())):
        rows.append({"index": i + 1, "train": float(train[i]) if i < train.numel() else "",
                     "val": float(val[i]) if i < val.numel() else ""})
    return rows


@torch.no_grad()
def evaluate_all(final_model, phase1_model, context_mode: str, val_ids: torch.Tensor, val_bytes: int,
                 train_cstar: torch.Tensor, val_cstar: torch.Tensor, params, seed: int,
                 scan_fn: Callable | None = None, log: Callable[[str], None] = print) -> EvaluationResult:
    """Every SPEC-7 number for the final model (Phase 2) and the Phase-1 model.

    val_ids (N,), train_cstar (N_train, C), val_cstar (N, C); val_bytes is the UTF-8 byte count
    of the validation documents (bits per byte). `params` is the `evaluate` section;
    `context_mode` the final checkpoint's Phase-2 mode. Contraction is taken along each
    model's own trajectory: val C* for the Phase-1 model, the free-running contexts for the
    final model.
    """
    def scan_for(desc: str) -> Callable:
        return scan_fn or default_scan_fn(desc)

    if val_cstar.shape[0] != val_ids.numel():
        raise ArtifactError(f"val C* has {val_cstar.shape[0]} contexts for {val_ids.numel()} val tokens; "
                            f"rerun the 'cstar' stage (dvc repro cstar)")
    device = next(final_model.parameters()).device
    final_model.eval()
    phase1_model.eval()
    val_ids, val_cstar = val_ids.to(device), val_cstar.to(device)
    embeddings = {"": final_model.embed(val_ids), "_phase1": phase1_model.embed(val_ids)}
    started, timing = time.perf_counter(), {}
    metrics: dict[str, Any] = {"context_mode": context_mode, "val_bytes": int(val_bytes),
                               "context_dim": int(final_model.context_dim)}

    fixed = _timed(log, timing, "fixed", "fixed mode (contexts = C*)",
                   lambda: evaluate_fixed(final_model, val_ids, val_cstar, params.batch_size, context_mode))
    free_scan = scan_for("free-running scan")
    free_contexts, token_outs = _timed(log, timing, "free_scan", "free-running scan",
                                       lambda: free_scan(final_model, embeddings[""], with_token_out=True))
    free = head_counts(final_model, free_contexts, token_outs, val_ids, params.batch_size)
    metrics["fixed"] = next_token_metrics(fixed, val_bytes)
    if "stability_mse" in fixed:  # how far one step from C*[t-1] lands from C*[t]
        metrics["fixed"]["stability_mse"] = fixed["stability_mse"]
    metrics["free"] = next_token_metrics(free, val_bytes)
    metrics["gap"] = {key: metrics["free"][key] - metrics["fixed"][key] for key in NEXT_TOKEN_KEYS}

    splits = {"train": train_cstar, "val": val_cstar}
    health = {split: context_health(cstar, params, seed) for split, cstar in splits.items()}
    metrics["context_health"] = health
    metrics["effective_rank"] = {split: h["effective_rank"] for split, h in health.items()}
    metrics["effective_rank_ratio"] = {split: h["effective_rank_ratio"] for split, h in health.items()}
    spectra = [singular_spectrum(cstar, params.effective_rank_samples, seed) for cstar in splits.values()]

    metrics["identity"] = _timed(log, timing, "identity", "identity check", lambda: identity_check(
        final_model, val_cstar, embeddings[""], params.identity_samples, params.identity_threshold,
        params.zero_norm, seed))
    for suffix, model, trajectory in (("", final_model, free_contexts), ("_phase1", phase1_model, val_cstar)):
        label, scan = MODEL_LABELS[suffix], scan_for(f"convergence trial, {MODEL_LABELS[suffix]}")
        metrics[f"convergence_check{suffix}"] = _timed(
            log, timing, f"convergence_check{suffix}", f"convergence check, {label} model",
            lambda: convergence_check(model, embeddings[suffix], params.num_trials, scan, params))
        metrics[f"contraction{suffix}"] = _timed(
            log, timing, f"contraction{suffix}", f"contraction estimate, {label} model",
            lambda: contraction_estimate(model, trajectory, embeddings[suffix], params.contraction_samples,
                                         params.contraction_power_iterations, seed))
    timing["seconds"] = time.perf_counter() - started
    return EvaluationResult(metrics=metrics, spectrum=spectrum_rows(*spectra), timing=timing)


def json_ready(tree: Any) -> Any:
    """Non-finite floats become None (JSON has no inf/NaN; a diverged free run can produce them)."""
    if isinstance(tree, dict):
        return {key: json_ready(value) for key, value in tree.items()}
    if isinstance(tree, list):
        return [json_ready(value) for value in tree]
    if isinstance(tree, float) and not math.isfinite(tree):
        return None
    return tree


def _verdict(ok: bool) -> str:
    return "PASSED" if ok else "FAILED"


def _beyond(value: float | None, bound: float, above: bool) -> bool:
    """value > bound (above) or value < bound; a missing (non-finite) value never passes."""
    if value is None:
        return False
    return value > bound if above else value < bound


def results_table(metrics: dict[str, Any], params) -> str:
    """The one results table printed at the end of the stage: quantity | value | criterion | result."""
    rows: list[tuple[str, str, str, str]] = []
    fixed, free, gap = metrics["fixed"], metrics["free"], metrics["gap"]
    for mode, m in (("fixed", fixed), ("free", free)):
        rows.append((f"val loss, {mode} (nats/token)", format_number(m["val_loss"]), "", ""))
    rows.append(("val loss gap (free - fixed)", format_number(gap["val_loss"], "+.4f"), "", ""))
    for mode, m in (("fixed", fixed), ("free", free)):
        rows.append((f"val perplexity, {mode}", format_number(m["val_ppl"], ".2f"), "", ""))
    rows.append(("val perplexity gap (free - fixed)", format_number(gap["val_ppl"], "+.2f"), "", ""))
    for mode, m in (("fixed", fixed), ("free", free)):
        rows.append((f"val accuracy, {mode}", format_rate(m["correct"], m["predictions"]), "", ""))
    rows.append(("val accuracy gap (free - fixed)", f"{format_number(100 * gap['val_acc'], '+.1f')} points", "", ""))
    for mode, m in (("fixed", fixed), ("free", free)):
        rows.append((f"val bits per byte, {mode}", f"{format_number(m['val_bpb'])} ({format_number(m['total_nats'], '.1f')} nats / "
                     f"ln2 / {metrics['val_bytes']} bytes)", "", ""))
    rows.append(("val bits per byte gap (free - fixed)", format_number(gap["val_bpb"], "+.4f"), "", ""))

    for split, h in metrics["context_health"].items():
        rows.append((f"Effective Rank, {split} C*", format_rank(h["effective_rank"], h["dim"]), "", ""))
        rows.append((f"global attractor, {split} C*",
                     f"cosine {format_number(h['mean_pairwise_cosine'])}, distance {format_number(h['mean_pairwise_distance'])}",
                     f"cos > {params.attractor_cosine} and dist < {params.attractor_distance}",
                     "DETECTED" if h["global_attractor"] else "none"))
        rows.append((f"zero solution, {split} C*", f"mean norm {format_number(h['mean_norm'])}", f"norm < {params.zero_norm}",
                     "DETECTED" if h["zero_solution"] else "none"))

    ident = metrics["identity"]
    pairs = f"({ident['samples']} pairs)"
    rows.append(("identity: mean context norm", format_number(ident['mean_context_norm']), f"> {params.zero_norm}",
                 _verdict(_beyond(ident["mean_context_norm"], params.zero_norm, True))))
    for label, key in (("data", "mean_step_cosine"), ("random", "mean_step_cosine_random")):
        rows.append((f"identity: step cosine, {label}", f"{format_number(ident[key])} {pairs}", f"< {params.identity_threshold}",
                     _verdict(_beyond(ident[key], params.identity_threshold, False))))
    sensitive = _beyond(ident["token_sensitivity"], TOKEN_SENSITIVITY_TOLERANCE, True)
    rows.append(("identity: token sensitivity", f"{format_number(ident['token_sensitivity'])} {pairs}",
                 f"> {TOKEN_SENSITIVITY_TOLERANCE}", _verdict(sensitive)))
    rows.append(("identity-mapping check", "", "all of the above", _verdict(ident["passed"])))

    for suffix, label in MODEL_LABELS.items():
        check = metrics[f"convergence_check{suffix}"]
        trials = check["num_trials"]
        rows.append((f"convergence {label}: final diff",
                     f"{format_number(check['final_diff'], '.3e')} (trial {trials}/{trials} vs {trials - 1})",
                     f"< {params.final_diff_threshold}", _verdict(check["passed"])))
        rows.append((f"convergence {label}: slope, std",
                     f"{format_number(check['slope'], '.3e')}, {format_number(check['std'], '.3e')} ({len(check['trial_mse'])} MSEs)",
                     f"|slope| {params.slope_threshold}, std {params.std_threshold}", check["verdict"]))
    for suffix, label in MODEL_LABELS.items():
        c = metrics[f"contraction{suffix}"]
        rows.append((f"contraction {label}: spectral radius", f"mean {format_number(c['mean'])}, max {format_number(c['max'])}",
                     "radius > 1", f"{format_rate(c['above_one'], c['samples'])} above 1"))

    header = ("quantity", "value", "criterion", "result")
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in (header, *rows)]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)
