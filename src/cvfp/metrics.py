"""Numbers about contexts and predictions, and how they are printed (always with denominators).

A `scan_fn` below is any callable `scan_fn(model, embeddings, initial=None, with_token_out=False)`
with the return convention of `CVFPModel.scan` (the stages pass `cvfp.scan.exact_scan`).
"""

from __future__ import annotations

import math
import statistics
from typing import Any, Callable

import torch
import torch.nn.functional as F

# token_sensitivity is relative to the output norm; a token-blind step differs only by float32
# rounding (~1e-7 relative), any real dependence on the token is orders of magnitude above this
TOKEN_SENSITIVITY_TOLERANCE = 1e-4
TINY = 1e-30  # floor for norms in power iteration so a zero J v gives a radius ~0, not a NaN

CONVERGING, CONVERGED, DIVERGING, UNSTABLE = "CONVERGING", "CONVERGED", "DIVERGING", "UNSTABLE"


def effective_rank(matrix: torch.Tensor, samples: int = 0, seed: int = 0) -> float:
    """exp(entropy of the normalised singular values) of a (N, D) matrix, in [1, min(N, D)].

    With `samples` > 0 and N larger, a seeded random subset of rows is used (SVD of the full
    matrix is the cost that grows with N; the rank of D-dim rows saturates well before N).
    """
    matrix = matrix.detach().float()
    if not bool(torch.isfinite(matrix).all()):  # a diverged matrix has no rank to speak of
        return 0.0
    singular = torch.linalg.svdvals(sample_rows(matrix, samples, seed).double())
    total = singular.sum()
    if not torch.isfinite(total) or total <= 0:
        return 0.0
    p = singular / total
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def sample_indices(n: int, samples: int, seed: int) -> torch.Tensor:
    """A seeded subset of `samples` of the row indices 0..n-1, sorted; all of them when samples is 0 or >= n."""
    if samples and n > samples:
        generator = torch.Generator().manual_seed(seed)
        return torch.randperm(n, generator=generator)[:samples].sort().values
    return torch.arange(n)


def sample_rows(matrix: torch.Tensor, samples: int, seed: int) -> torch.Tensor:
    """A seeded subset of `samples` rows of (N, D), in their original order; all rows when samples is 0 or >= N."""
    if samples and matrix.shape[0] > samples:
        return matrix[sample_indices(matrix.shape[0], samples, seed).to(matrix.device)]
    return matrix


def change_sums(contexts: torch.Tensor, previous: torch.Tensor, threshold: float) -> dict[str, float]:
    """converged: tokens whose mean squared change over dimensions is below `threshold` (SPEC 4's
    convergence); change_sq: the sum of (c - c_prev)^2; norm_sq: the sum of c^2.

    Sums over rows, so those of a stream held in shards are the sums of the shards' (Phase 1 under torchrun).
    """
    change = (contexts.float() - previous.float()).pow(2)
    return {"converged": float((change.mean(dim=-1) < threshold).sum()), "change_sq": float(change.sum()),
            "norm_sq": float(contexts.float().pow(2).sum())}


def relative_residual(change_sq: float, norm_sq: float) -> float:
    """||c^k - c^(k-1)|| / ||c^k|| (the deep-equilibrium-model convention), from `change_sums`' change_sq and norm_sq."""
    return math.sqrt(change_sq / norm_sq) if norm_sq > 0 else math.inf


def finite_or_none(value: Any) -> Any:
    """A metrics-file value: a non-finite float becomes None (JSON has no inf/NaN); anything else is kept."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


def format_number(value: float | None, spec: str = ".4f") -> str:
    """A number for a table or a log line; `n/a` for a missing (None) or non-finite value."""
    return "n/a" if value is None or not math.isfinite(value) else format(value, spec)


def perplexity(loss: float | None) -> float | None:
    """exp(mean cross-entropy in nats): the one perplexity rule. None where that is not a finite number."""
    if loss is None or not math.isfinite(loss):
        return None
    try:
        return math.exp(loss)
    except OverflowError:  # a diverged model
        return None


def format_rank(value: float, dim: int) -> str:
    """`612.52/768 (79.8%)`"""
    return f"{value:.2f}/{dim} ({100.0 * value / dim:.1f}%)"


def format_rate(count: int, total: int) -> str:
    """`30.0% (1923/6400)`"""
    return f"{100.0 * count / max(total, 1):.1f}% ({count}/{total})"


def bits_per_byte(total_nats: float, num_bytes: int) -> float:
    """Tokenizer-independent loss: total cross-entropy in nats / (ln 2 * UTF-8 bytes)."""
    return total_nats / (math.log(2) * num_bytes)


def singular_spectrum(matrix: torch.Tensor, samples: int = 0, seed: int = 0) -> torch.Tensor:
    """Normalised singular values sigma_i / sum(sigma) of (N, D), descending, (min(N, D),) float64.

    The same rows as `effective_rank(matrix, samples, seed)`; empty for a non-finite or zero matrix.
    """
    matrix = matrix.detach().float()
    if not bool(torch.isfinite(matrix).all()):
        return torch.empty(0, dtype=torch.float64)
    singular = torch.linalg.svdvals(sample_rows(matrix, samples, seed).double()).cpu()
    total = singular.sum()
    return singular / total if total > 0 else torch.empty(0, dtype=torch.float64)


def next_token_metrics(counts: dict[str, Any], num_bytes: int) -> dict[str, Any]:
    """Loss (nats/token), perplexity, top-1 accuracy and bits per byte from summed counts.

    `counts` is dict(total_nats, predictions, correct) as the evaluations count them (cvfp.evaluate, cvfp.baselines).
    """
    loss = counts["total_nats"] / counts["predictions"]
    ppl = perplexity(loss)
    return {"val_loss": loss, "val_ppl": math.inf if ppl is None else ppl, "val_acc": counts["correct"] / counts["predictions"],
            "val_bpb": bits_per_byte(counts["total_nats"], num_bytes), "total_nats": counts["total_nats"],
            "predictions": counts["predictions"], "correct": counts["correct"]}


def _device(model: torch.nn.Module) -> torch.device:
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def _pairwise_means(rows: torch.Tensor) -> tuple[float, float]:
    """Mean cosine and mean Euclidean distance over distinct pairs of rows (M, D)."""
    m = rows.shape[0]
    if m < 2:  # a single point is trivially collapsed
        return 1.0, 0.0
    rows = rows.double()
    unit = F.normalize(rows, dim=-1)
    cosine = unit @ unit.T
    distance = torch.cdist(rows, rows)
    pairs = m * (m - 1)
    return float((cosine.sum() - cosine.diagonal().sum()) / pairs), float(distance.sum() / pairs)


def context_health(contexts: torch.Tensor, params, seed: int = 0) -> dict[str, Any]:
    """Effective rank and collapse flags of a context matrix (N, C) (SPEC 7, check 1).

    `params` is the `evaluate` section (effective_rank_samples, pairwise_samples,
    attractor_cosine, attractor_distance, zero_norm). Global attractor: every context near one
    point (mean pairwise cosine > attractor_cosine and mean pairwise distance <
    attractor_distance, on a seeded sample of rows). Zero solution: mean norm < zero_norm.
    """
    contexts = contexts.detach().float()
    dim = contexts.shape[1]
    rank = effective_rank(contexts, params.effective_rank_samples, seed)
    cosine, distance = _pairwise_means(sample_rows(contexts, params.pairwise_samples, seed))
    mean_norm = float(contexts.norm(dim=-1).mean())
    return {
        "effective_rank": rank, "effective_rank_ratio": rank / dim, "dim": dim, "rows": int(contexts.shape[0]),
        "mean_norm": mean_norm, "mean_pairwise_cosine": cosine, "mean_pairwise_distance": distance,
        "global_attractor": cosine > params.attractor_cosine and distance < params.attractor_distance,
        "zero_solution": mean_norm < params.zero_norm,
    }


def _step_inputs(contexts: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Input context of token t: contexts[t-1], zero for t = 0. contexts (N, C), positions (S,) -> (S, C)."""
    padded = torch.cat([contexts.new_zeros(1, contexts.shape[1]), contexts])
    return padded[positions]


def _positions(n: int, samples: int, generator: torch.Generator) -> torch.Tensor:
    """`samples` seeded positions t in [1, N) (t >= 1 so the input context is a data context)."""
    low = 1 if n > 1 else 0
    return torch.randint(low, n, (samples,), generator=generator)


@torch.no_grad()
def identity_check(model, data_contexts: torch.Tensor, data_embeddings: torch.Tensor, samples: int,
                   threshold: float, zero_norm: float, seed: int = 0) -> dict[str, Any]:
    """Is the context update more than the identity? (SPEC 7, check 2)

    data_contexts (N, C) are a context trajectory (e.g. C*) and data_embeddings (N, E) its
    token embeddings; pair t is (data_contexts[t-1], data_embeddings[t]). Random pairs use
    standard-normal contexts rescaled to the data's mean norm (the model's typical scale,
    so LayerNorm sees inputs like its real ones) and the embeddings of random token ids.
    Token sensitivity: mean ||F(c, e_a) - F(c, e_b)|| / mean ||F(c, .)|| for two different
    random tokens a != b from the same data context c.
    Passed: mean norm > zero_norm, both mean step cosines < threshold, token_sensitivity >
    TOKEN_SENSITIVITY_TOLERANCE.
    """
    device = _device(model)
    generator = torch.Generator().manual_seed(seed)
    contexts = data_contexts.detach().float().to(device)
    embeddings = data_embeddings.detach().float().to(device)
    dim, vocab = contexts.shape[1], model.args.vocab_size
    mean_norm = float(contexts.norm(dim=-1).mean())

    positions = _positions(contexts.shape[0], samples, generator).to(device)
    inputs = _step_inputs(contexts, positions)
    outputs = model.step(inputs, embeddings[positions])[0]
    cosine_data = float(F.cosine_similarity(inputs, outputs, dim=-1).mean())

    random_contexts = F.normalize(torch.randn(samples, dim, generator=generator), dim=-1).to(device) * mean_norm
    random_ids = torch.randint(0, vocab, (samples,), generator=generator).to(device)
    random_outputs = model.step(random_contexts, model.embed(random_ids))[0]
    cosine_random = float(F.cosine_similarity(random_contexts, random_outputs, dim=-1).mean())

    # b = a + offset (mod V) with offset in [1, V): always a different token
    other_ids = (random_ids + torch.randint(1, vocab, (samples,), generator=generator).to(device)) % vocab
    out_a = model.step(inputs, model.embed(random_ids))[0]
    out_b = model.step(inputs, model.embed(other_ids))[0]
    scale = 0.5 * float(out_a.norm(dim=-1).mean() + out_b.norm(dim=-1).mean())
    sensitivity = float((out_a - out_b).norm(dim=-1).mean()) / scale if scale > 0 else 0.0

    passed = (mean_norm > zero_norm and cosine_data < threshold and cosine_random < threshold
              and sensitivity > TOKEN_SENSITIVITY_TOLERANCE)
    return {"mean_context_norm": mean_norm, "mean_step_cosine": cosine_data,
            "mean_step_cosine_random": cosine_random, "token_sensitivity": sensitivity,
            "samples": samples, "passed": bool(passed)}


def linear_slope(values: list[float]) -> float:
    """Least-squares slope of values against their index (0.0 for fewer than two values)."""
    n = len(values)
    if n < 2:
        return 0.0
    x_mean, y_mean = (n - 1) / 2, sum(values) / n
    num = sum((i - x_mean) * (y - y_mean) for i, y in enumerate(values))
    den = sum((i - x_mean) ** 2 for i in range(n))
    return num / den


def convergence_verdict(mses: list[float], slope_threshold: float, std_threshold: float) -> str:
    """The original check_val_convergence rule on the recorded trial MSEs.

    slope of a least-squares line through the MSEs vs trial index; std is the population std.
    CONVERGING: slope < -t. CONVERGED: |slope| < t and std < std_threshold. DIVERGING:
    slope > t. UNSTABLE: anything else.
    """
    slope = linear_slope(mses)
    std = statistics.pstdev(mses) if mses else 0.0
    if slope < -slope_threshold:
        return CONVERGING
    if abs(slope) < slope_threshold and std < std_threshold:
        return CONVERGED
    if slope > slope_threshold:
        return DIVERGING
    return UNSTABLE


@torch.no_grad()
def convergence_check(model, embeddings: torch.Tensor, num_trials: int, scan_fn: Callable,
                      thresholds) -> dict[str, Any]:
    """Repeated full sequential scans of one stream with no updates (SPEC 7, check 3).

    embeddings (N, E). Trial 1 starts from c = 0; each later trial starts from the previous
    trial's last context (carry-over). trial_mse[k] is the MSE of trial k+2's contexts against
    trial k+1's. `thresholds` has final_diff_threshold, slope_threshold, std_threshold (the
    `evaluate` params section).
    """
    previous, mses = None, []
    for _ in range(num_trials):
        initial = None if previous is None else previous[-1]
        contexts = scan_fn(model, embeddings, initial=initial)
        if previous is not None:
            mses.append(float((contexts.float() - previous.float()).pow(2).mean()))
        previous = contexts
    final_diff = mses[-1] if mses else math.inf
    return {"trial_mse": mses, "final_diff": final_diff, "passed": bool(final_diff < thresholds.final_diff_threshold),
            "slope": linear_slope(mses), "std": statistics.pstdev(mses) if mses else 0.0,
            "verdict": convergence_verdict(mses, thresholds.slope_threshold, thresholds.std_threshold),
            "num_trials": num_trials}


@torch.no_grad()  # forward-mode tangents of torch.func.jvp are unaffected; no reverse graph is built
def contraction_estimate(model, contexts: torch.Tensor, embeddings: torch.Tensor, samples: int,
                         iterations: int, seed: int = 0) -> dict[str, Any]:
    """Spectral radius of J_t = dc_t/dc_{t-1} at sampled positions of a trajectory (SPEC 7, check 4).

    contexts (N, C) is the trajectory the model runs along (J_t is taken at c = contexts[t-1]),
    embeddings (N, E) its tokens. Power iteration with Jacobian-vector products (forward mode,
    torch.func.jvp; all samples in one batched call, since the step acts on each row alone).
    Estimate: the geometric mean of the growth factors ||J v_k|| of the normalised iterates
    over the second half of the iterations, i.e. (||J^k v|| / ||J^(k/2) v||)^(2/k) - a Gelfand
    estimate with the first half as burn-in; unlike the last Rayleigh-type ratio it does not
    oscillate when the dominant eigenvalues are a complex pair.
    """
    device = _device(model)
    generator = torch.Generator().manual_seed(seed)
    contexts = contexts.detach().float().to(device)
    embeddings = embeddings.detach().float().to(device)
    positions = _positions(contexts.shape[0], samples, generator).to(device)
    inputs, tokens = _step_inputs(contexts, positions), embeddings[positions]
    vector = F.normalize(torch.randn(samples, contexts.shape[1], generator=generator), dim=-1).to(device)

    def step_context(c: torch.Tensor) -> torch.Tensor:
        return model.step(c, tokens)[0]

    burn_in = iterations // 2
    log_growth = torch.zeros(samples, dtype=torch.float64, device=device)
    for k in range(iterations):
        _, image = torch.func.jvp(step_context, (inputs,), (vector,))
        norm = image.norm(dim=-1, keepdim=True).clamp_min(TINY)
        if k >= burn_in:
            log_growth += norm.squeeze(-1).double().log()
        vector = (image / norm).detach()
    radius = (log_growth / (iterations - burn_in)).exp().cpu()
    above = int((radius > 1).sum())
    return {"mean": float(radius.mean()), "max": float(radius.max()), "min": float(radius.min()),
            "above_one": above, "fraction_above_one": above / samples, "samples": samples,
            "iterations": iterations}
