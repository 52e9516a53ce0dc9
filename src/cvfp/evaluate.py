"""Evaluation of the final model and of the contexts (SPEC section 7).

Next-token metrics on the held-out test split (reported; nothing was chosen on it) and on
validation (which chose the best epochs), each in two modes: *fixed* (input contexts are C*,
as Phase 2 trained) and *free* (contexts from a sequential scan of the final model itself, as
the model would really be used), and their gap. Then the context checks of train and val
C*: effective rank and collapse flags, and for the Phase-1 and the final model the
identity-mapping check, the CVFP convergence check, the top Lyapunov exponent along the
model's own trajectory (the predictability criterion) and the spectral radius (secondary).
"""

from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from cvfp.errors import ArtifactError
from cvfp.metrics import (EMPTY_COUNTS, TOKEN_SENSITIVITY_TOLERANCE, add_counts, context_health, contraction_estimate,
                          convergence_check, count_predictions,
                          format_number, format_rank, format_rate, identity_check, lyapunov_exponent,
                          next_token_metrics,
                          singular_spectrum)
from cvfp.model import CVFPModel
from cvfp.phase2 import evaluate_fixed
from cvfp.scan import exact_scan

NEXT_TOKEN_KEYS = ("loss", "ppl", "acc", "bpb")
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
                scored: torch.Tensor, target_bytes: torch.Tensor, batch_size: int) -> dict[str, Any]:
    """Head on step outputs: logits_t = head(contexts[t], token_outs[t]) predicts ids[t+1].

    contexts (N, C), token_outs (N, E), ids (N,), scored (N-1,) bool, target_bytes (N-1,):
    `count_predictions`' sums over the scored ones of the N-1 predictions.
    """
    targets = ids[1:].to(contexts.device)
    contexts, token_outs = contexts[:-1], token_outs[:-1]  # the last position has nothing to predict
    counts = dict(EMPTY_COUNTS)
    for start in range(0, targets.shape[0], batch_size):
        stop = start + batch_size
        logits = model.logits(contexts[start:stop], token_outs[start:stop])
        counts = add_counts(counts, count_predictions(logits, targets[start:stop], scored[start:stop],
                                                      target_bytes[start:stop]))
    return counts


@torch.no_grad()
def evaluate_free(model: CVFPModel, ids: torch.Tensor, scored: torch.Tensor, target_bytes: torch.Tensor,
                  scan_fn: Callable, batch_size: int) -> dict[str, Any]:
    """Free-running next-token evaluation: one sequential scan from c = 0 over ids (N,).

    The contexts are the model's own (never C*), as the model would be used. Returns
    `count_predictions`' sums over the scored ones of the N-1 predictions.
    """
    ids = ids.to(next(model.parameters()).device)
    contexts, token_outs = scan_fn(model, model.embed(ids), with_token_out=True)
    return head_counts(model, contexts, token_outs, ids, scored, target_bytes, batch_size)


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


@dataclass
class HeldOut:
    """A held-out split as the evaluation reads it: ids (N,), C* (N, C), scored (N-1,) bool, target_bytes (N-1,)."""

    ids: torch.Tensor
    cstar: torch.Tensor
    scored: torch.Tensor
    target_bytes: torch.Tensor


@torch.no_grad()
def next_token_results(final_model: CVFPModel, context_mode: str, split: HeldOut, batch_size: int, scan_fn: Callable,
                       name: str, log: Callable[[str], None], timing: dict[str, float]) -> tuple[dict[str, Any], torch.Tensor]:
    """Fixed and free-running next-token numbers of one held-out split, and the free-running contexts."""
    if split.cstar.shape[0] != split.ids.numel():
        raise ArtifactError(f"{name} C* has {split.cstar.shape[0]} contexts for {split.ids.numel()} {name} tokens; "
                            f"rerun the 'cstar' stage (dvc repro cstar)")
    fixed = _timed(log, timing, f"{name}_fixed", f"{name}: fixed mode (contexts = C*)", lambda: evaluate_fixed(
        final_model, split.ids, split.cstar, split.scored, split.target_bytes, batch_size, context_mode))
    contexts, token_outs = _timed(log, timing, f"{name}_free_scan", f"{name}: free-running scan",
                                  lambda: scan_fn(final_model, final_model.embed(split.ids), with_token_out=True))
    free = head_counts(final_model, contexts, token_outs, split.ids, split.scored, split.target_bytes, batch_size)
    results = {"fixed": {**next_token_metrics(fixed), "stability_mse": fixed["stability_mse"]},
               "free": next_token_metrics(free)}
    results["gap"] = {key: _difference(results["free"][key], results["fixed"][key]) for key in NEXT_TOKEN_KEYS}
    return results, contexts


def _difference(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


@torch.no_grad()
def evaluate_all(final_model, phase1_model, context_mode: str, held_out: dict[str, HeldOut],
                 train_ids: torch.Tensor, train_cstar: torch.Tensor, params, seed: int,
                 scan_fn: Callable | None = None, log: Callable[[str], None] = print) -> EvaluationResult:
    """Every SPEC-7 number for the final model (Phase 2) and the Phase-1 model.

    `held_out` has "test" (reported) and "val" (for choosing) splits; train_ids (N_train,) and
    train_cstar (N_train, C). Predictability (the top Lyapunov exponent) is taken along each
    model's own trajectory on train and val: C* for the Phase-1 model, the final model's own
    free-running scan for the final model.
    `params` is the `evaluate` section; `context_mode` the final checkpoint's Phase-2 mode.
    Next-token numbers on test and val in both modes; context checks on train and val C*.
    Contraction is taken along each model's own trajectory: val C* for the Phase-1 model, the
    free-running val contexts for the final model.
    """
    def scan_for(desc: str) -> Callable:
        return scan_fn or default_scan_fn(desc)

    device = next(final_model.parameters()).device
    final_model.eval()
    phase1_model.eval()
    held_out = {name: HeldOut(*(t.to(device) for t in (s.ids, s.cstar, s.scored, s.target_bytes)))
                for name, s in held_out.items()}
    started, timing = time.perf_counter(), {}
    metrics: dict[str, Any] = {"context_mode": context_mode, "context_dim": int(final_model.context_dim)}
    free_contexts = {}
    for name in ("test", "val"):
        metrics[name], free_contexts[name] = next_token_results(
            final_model, context_mode, held_out[name], params.batch_size, scan_for(f"{name}: free-running scan"), name,
            log, timing)

    val = held_out["val"]
    embeddings = {"": final_model.embed(val.ids), "_phase1": phase1_model.embed(val.ids)}
    splits = {"train": train_cstar.to(device), "val": val.cstar}
    health = {split: context_health(cstar, params, seed) for split, cstar in splits.items()}
    metrics["context_health"] = health
    metrics["effective_rank"] = {split: h["effective_rank"] for split, h in health.items()}
    metrics["effective_rank_ratio"] = {split: h["effective_rank_ratio"] for split, h in health.items()}
    spectra = [singular_spectrum(cstar, params.effective_rank_samples, seed) for cstar in splits.values()]

    for suffix, model, trajectory in (("", final_model, free_contexts["val"]), ("_phase1", phase1_model, val.cstar)):
        label, scan = MODEL_LABELS[suffix], scan_for(f"convergence trial, {MODEL_LABELS[suffix]}")
        metrics[f"identity{suffix}"] = _timed(log, timing, f"identity{suffix}", f"identity check, {label} model",
                                              lambda: identity_check(model, trajectory, embeddings[suffix],
                                                                     params.identity_samples, params.identity_threshold,
                                                                     params.zero_norm, seed))
        metrics[f"convergence_check{suffix}"] = _timed(
            log, timing, f"convergence_check{suffix}", f"convergence check, {label} model",
            lambda: convergence_check(model, embeddings[suffix], params.num_trials, scan, params))
        metrics[f"contraction{suffix}"] = _timed(
            log, timing, f"contraction{suffix}", f"contraction estimate, {label} model",
            lambda: contraction_estimate(model, trajectory, embeddings[suffix], params.contraction_samples,
                                         params.contraction_power_iterations, seed, params.exact_eigen_max_dim))

    # the Lyapunov exponent reads the first lyapunov_steps + 1 tokens of each trajectory
    length = params.lyapunov_steps + 1 if params.lyapunov_steps else train_ids.numel()
    train_ids = train_ids[:length].to(device)
    train_embeddings = final_model.embed(train_ids)
    trajectories = {
        "_phase1": {"train": (splits["train"][:length], phase1_model.embed(train_ids)),
                    "val": (val.cstar, embeddings["_phase1"])},
        "": {"train": (scan_for("final model: train scan")(final_model, train_embeddings), train_embeddings),
             "val": (free_contexts["val"], embeddings[""])}}
    for suffix, model in (("", final_model), ("_phase1", phase1_model)):
        metrics[f"lyapunov{suffix}"] = {
            split: _timed(log, timing, f"lyapunov{suffix}_{split}", f"Lyapunov exponent, {MODEL_LABELS[suffix]} model, "
                          f"{split}", lambda: lyapunov_exponent(model, contexts, tokens, params.lyapunov_steps,
                                                               params.lyapunov_blocks, seed))
            for split, (contexts, tokens) in trajectories[suffix].items()}
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


def _next_token_rows(name: str, results: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """Loss, perplexity, accuracy and bits per byte of one split, fixed and free, with the gaps."""
    rows = []
    fixed, free, gap = results["fixed"], results["free"], results["gap"]
    for mode, m in (("fixed", fixed), ("free", free)):
        rows.append((f"{name} loss, {mode} (CE nats/prediction)", format_number(m["loss"]), "", ""))
    rows.append((f"{name} loss gap (free - fixed)", format_number(gap["loss"], "+.4f"), "", ""))
    for mode, m in (("fixed", fixed), ("free", free)):
        rows.append((f"{name} perplexity, {mode}", format_number(m["ppl"], ".2f"), "", ""))
    for mode, m in (("fixed", fixed), ("free", free)):
        rows.append((f"{name} accuracy, {mode}", format_rate(m["correct"], m["predictions"]), "", ""))
    for mode, m in (("fixed", fixed), ("free", free)):
        rows.append((f"{name} bits per byte, {mode}", f"{format_number(m['bpb'])} ({format_number(m['total_nats'], '.1f')} "
                     f"nats / ln2 / {m['bytes']} bytes of {m['predictions']} scored predictions)", "", ""))
    rows.append((f"{name} bits per byte gap (free - fixed)", format_number(gap["bpb"], "+.4f"), "", ""))
    return rows


def results_table(metrics: dict[str, Any], params) -> str:
    """The one results table printed at the end of the stage: quantity | value | criterion | result.

    Test first (scored once, nothing was chosen on it), then validation (which chose the best epochs).
    """
    rows: list[tuple[str, str, str, str]] = []
    rows += _next_token_rows("test", metrics["test"])
    rows += _next_token_rows("val", metrics["val"])

    for split, h in metrics["context_health"].items():
        rows.append((f"Effective Rank, {split} C*", format_rank(h["effective_rank"], h["dim"]), "", ""))
        rows.append((f"global attractor, {split} C*",
                     f"cosine {format_number(h['mean_pairwise_cosine'])}, distance {format_number(h['mean_pairwise_distance'])}",
                     f"cos > {params.attractor_cosine} and dist < {params.attractor_distance}",
                     "DETECTED" if h["global_attractor"] else "none"))
        rows.append((f"zero solution, {split} C*", f"mean norm {format_number(h['mean_norm'])}", f"norm < {params.zero_norm}",
                     "DETECTED" if h["zero_solution"] else "none"))

    for suffix, label in MODEL_LABELS.items():
        ident = metrics[f"identity{suffix}"]
        pairs = f"({ident['samples']} pairs)"
        pinned = " (pinned near sqrt(dim) by LayerNorm: cannot fail)" if ident.get("norm_pinned_by_layernorm") else ""
        rows.append((f"identity {label}: mean context norm", format_number(ident['mean_context_norm']) + pinned,
                     f"> {params.zero_norm}", _verdict(_beyond(ident["mean_context_norm"], params.zero_norm, True))))
        for kind, key in (("data", "mean_step_cosine"), ("random", "mean_step_cosine_random")):
            rows.append((f"identity {label}: step cosine, {kind}", f"{format_number(ident[key])} {pairs}",
                         f"< {params.identity_threshold}", _verdict(_beyond(ident[key], params.identity_threshold, False))))
        sensitive = _beyond(ident["token_sensitivity"], TOKEN_SENSITIVITY_TOLERANCE, True)
        rows.append((f"identity {label}: token sensitivity", f"{format_number(ident['token_sensitivity'])} {pairs}",
                     f"> {TOKEN_SENSITIVITY_TOLERANCE}", _verdict(sensitive)))
        rows.append((f"identity-mapping check, {label} model", "", "all of the above", _verdict(ident["passed"])))

    for suffix, label in MODEL_LABELS.items():
        for split, lyap in metrics[f"lyapunov{suffix}"].items():
            known = lyap["exponent"] is not None and lyap["stderr"] is not None
            attracts = known and lyap["exponent"] + 2 * lyap["stderr"] < 0
            chaotic = known and lyap["exponent"] - 2 * lyap["stderr"] > 0
            rows.append((f"Lyapunov exponent {label}, {split}",
                         f"{format_number(lyap['exponent'], '+.4f')} +- {format_number(lyap['stderr'], '.4f')} per step "
                         f"({lyap['steps']} steps, {lyap['blocks']} blocks)", "< 0: fixed points attract",
                         "ATTRACTS" if attracts else "CHAOTIC" if chaotic else "undecided (within 2 s.e.)"))
    for suffix, label in MODEL_LABELS.items():
        check = metrics[f"convergence_check{suffix}"]
        trials = check["num_trials"]
        rows.append((f"convergence {label}: final diff",
                     f"{format_number(check['final_diff'], '.3e')} (trial {trials}/{trials} vs {trials - 1})",
                     f"< {params.final_diff_threshold}", _verdict(check["passed"])))
        rows.append((f"convergence {label}: trial MSEs", ", ".join(format_number(m, ".2e") for m in check["trial_mse"]),
                     "", ""))
        rows.append((f"convergence {label}: relative slope",
                     f"{format_number(check['relative_slope'], '+.3e')} per trial "
                     f"(+- {format_number(check['slope_stderr'], '.1e')} absolute)",
                     f"|slope|/mean > {params.slope_threshold} and > 2 s.e.; final diff passes", check["verdict"]))
    for suffix, label in MODEL_LABELS.items():
        c = metrics[f"contraction{suffix}"]
        how = "exact eigenvalues" if c.get("method") == "eigenvalues" else f"{c.get('iterations')} power iterations"
        rows.append((f"contraction {label}: spectral radius (secondary)",
                     f"mean {format_number(c['mean'])}, max {format_number(c['max'])} ({how})",
                     "radius > 1", f"{format_rate(c['above_one'], c['samples'])} above 1"))

    header = ("quantity", "value", "criterion", "result")
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in (header, *rows)]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)
