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
TINY = 1e-30  # floor for tangent norms (power iteration, Lyapunov): a zero J v gives log(TINY), not a NaN

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
    """Tokenizer-independent loss: total cross-entropy in nats / (ln 2 * UTF-8 bytes of the predicted targets)."""
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


def count_predictions(logits: torch.Tensor, targets: torch.Tensor, scored: torch.Tensor,
                      target_bytes: torch.Tensor) -> dict[str, Any]:
    """The one counting function of every next-token evaluation (CVFP fixed and free, GRU, Transformer).

    logits (B, V), targets (B,), scored (B,) bool, target_bytes (B,) int: a batch of predictions
    and which of them are scored (text targets whose ids occur in training, see cvfp.data.carve).
    Returns the sums over the scored ones: total_nats (cross-entropy, summed in float64),
    predictions, correct (top-1 hits) and bytes (UTF-8 bytes of their targets).
    """
    scored = scored.to(logits.device)
    nats = F.cross_entropy(logits.float(), targets, reduction="none").double()
    hits = (logits.argmax(dim=-1) == targets) & scored
    return {"total_nats": float(nats[scored].sum()), "predictions": int(scored.sum()), "correct": int(hits.sum()),
            "bytes": int(target_bytes.to(logits.device)[scored].sum())}


def add_counts(total: dict[str, Any] | None, counts: dict[str, Any]) -> dict[str, Any]:
    """Sums of two `count_predictions` results (total None: the first batch)."""
    return dict(counts) if total is None else {key: total[key] + counts[key] for key in counts}


EMPTY_COUNTS = {"total_nats": 0.0, "predictions": 0, "correct": 0, "bytes": 0}


def next_token_metrics(counts: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Loss (cross-entropy, nats per scored prediction), perplexity, top-1 accuracy and bits per byte.

    `counts` is `count_predictions`' sums (total_nats, predictions, correct, bytes). Bits per byte
    = total nats / ln 2 / the UTF-8 bytes of the scored predictions' targets (role and boundary
    markers are never scored, so both sides count the same predictions). Keys get `prefix`
    (e.g. "val_") except the raw counts. A non-finite perplexity is None.
    """
    loss = counts["total_nats"] / counts["predictions"] if counts["predictions"] else math.nan
    values = {"loss": loss, "ppl": perplexity(loss),
              "acc": counts["correct"] / counts["predictions"] if counts["predictions"] else math.nan,
              "bpb": bits_per_byte(counts["total_nats"], counts["bytes"]) if counts["bytes"] else math.nan}
    return {**{f"{prefix}{key}": value for key, value in values.items()},
            **{key: counts[key] for key in ("total_nats", "predictions", "correct", "bytes")}}


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
    attractor_distance, on a seeded sample of rows). Zero solution: mean norm < zero_norm (it
    cannot fire for contexts of a model with full LayerNorm, see `identity_check`).
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
    Under full LayerNorm (model.args.layernorm_mix 1) every context is a LayerNorm output,
    gain * z + bias with ||z|| = sqrt(context_dim): the mean norm is pinned near
    sqrt(context_dim) while the gain stays near 1, so the norm test (and context_health's
    zero-solution flag) cannot fire there; `norm_pinned_by_layernorm` says so.
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
            "samples": samples, "passed": bool(passed),
            "norm_pinned_by_layernorm": float(model.args.layernorm_mix) == 1.0}


# a trend must stand out of the trial-to-trial noise: 3 noisy trials fit a steep line by chance
TREND_STANDARD_ERRORS = 2.0


def linear_fit(values: list[float]) -> tuple[float, float]:
    """Least-squares slope of values against their index, and its standard error.

    The standard error is sqrt(residual variance / sum (i - mean i)^2) with n - 2 degrees of
    freedom; 0.0 for two values (a line fits them exactly). (0.0, 0.0) for fewer than two.
    """
    n = len(values)
    if n < 2:
        return 0.0, 0.0
    x_mean, y_mean = (n - 1) / 2, sum(values) / n
    den = sum((i - x_mean) ** 2 for i in range(n))
    slope = sum((i - x_mean) * (y - y_mean) for i, y in enumerate(values)) / den
    if n < 3:
        return slope, 0.0
    residual = sum((y - y_mean - slope * (i - x_mean)) ** 2 for i, y in enumerate(values))
    return slope, math.sqrt(residual / (n - 2) / den)


def linear_slope(values: list[float]) -> float:
    """Least-squares slope of values against their index (0.0 for fewer than two values)."""
    return linear_fit(values)[0]


def relative_slope(values: list[float]) -> float:
    """The least-squares slope / the mean value: the fraction of the mean gained per trial (0.0 if all are 0)."""
    mean = sum(values) / len(values) if values else 0.0
    return linear_slope(values) / mean if mean > 0 else 0.0


def mse_trend(mses: list[float], slope_threshold: float) -> int:
    """+1 rising, -1 falling, 0 flat: the relative slope beyond +-slope_threshold per trial and the
    slope beyond TREND_STANDARD_ERRORS standard errors of the fit (noise alone is flat)."""
    slope, stderr = linear_fit(mses)
    relative = relative_slope(mses)
    if abs(relative) <= slope_threshold or abs(slope) <= TREND_STANDARD_ERRORS * stderr:
        return 0
    return 1 if relative > 0 else -1


def convergence_verdict(mses: list[float], slope_threshold: float, final_diff_threshold: float) -> str:
    """The verdict of the convergence check on the recorded trial MSEs (SPEC 7, check 3).

    The slope of a least-squares line through the MSEs is taken relative to their mean
    (`slope_threshold` is a fraction of the mean per trial: the original's absolute threshold
    suits tiny MSEs only) and counts as a trend only beyond TREND_STANDARD_ERRORS standard
    errors of the fit. DIVERGING: rising (or a non-finite MSE). CONVERGED: the final
    difference mses[-1] < final_diff_threshold and not rising; falling counts too, since the
    first MSE (a zero start against a carried-over one) can stand far above the rest, e.g.
    2e-4 then 1e-12 for a contracting scan. CONVERGING: falling, the final difference not yet
    passing. UNSTABLE: flat, the final difference failing (a scan that never settles).
    """
    if not mses or not all(math.isfinite(m) for m in mses):
        return DIVERGING if mses else UNSTABLE
    trend = mse_trend(mses, slope_threshold)
    if trend > 0:
        return DIVERGING
    if mses[-1] < final_diff_threshold:
        return CONVERGED
    return CONVERGING if trend < 0 else UNSTABLE


@torch.no_grad()
def convergence_check(model, embeddings: torch.Tensor, num_trials: int, scan_fn: Callable,
                      thresholds) -> dict[str, Any]:
    """Repeated full sequential scans of one stream with no updates (SPEC 7, check 3).

    embeddings (N, E). Trial 1 starts from c = 0; each later trial starts from the previous
    trial's last context (carry-over). trial_mse[k] is the MSE of trial k+2's contexts against
    trial k+1's (every one is returned). `thresholds` has final_diff_threshold and
    slope_threshold (the `evaluate` params section); see `convergence_verdict`.
    """
    previous, mses = None, []
    for _ in range(num_trials):
        initial = None if previous is None else previous[-1]
        contexts = scan_fn(model, embeddings, initial=initial)
        if previous is not None:
            mses.append(float((contexts.float() - previous.float()).pow(2).mean()))
        previous = contexts
    final_diff = mses[-1] if mses else math.inf
    slope, slope_stderr = linear_fit(mses)
    return {"trial_mse": mses, "final_diff": final_diff, "passed": bool(final_diff < thresholds.final_diff_threshold),
            "slope": slope, "slope_stderr": slope_stderr, "relative_slope": relative_slope(mses),
            "std": statistics.pstdev(mses) if mses else 0.0,
            "verdict": convergence_verdict(mses, thresholds.slope_threshold, thresholds.final_diff_threshold),
            "num_trials": num_trials}


JACOBIAN_ROWS = 1 << 15  # positions x context_dim per batched jacrev call: bounds its memory (~100 MB at C = 64)


def step_jacobians(model, inputs: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """J[s] = d model.step(c, x)[0] / dc at c = inputs[s], x = tokens[s]: (S, C), (S, E) -> (S, C, C).

    Reverse mode (torch.func.jacrev), vmapped over positions, in chunks of JACOBIAN_ROWS // C
    positions: far cheaper than a forward-mode jvp per step, whose LayerNorm rule runs as many
    small decomposed ops.
    """
    def context_out(context: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
        return model.step(context, token)[0]

    jacobian = torch.func.vmap(torch.func.jacrev(context_out))
    chunk = max(1, JACOBIAN_ROWS // inputs.shape[1])
    return torch.cat([jacobian(inputs[s:s + chunk], tokens[s:s + chunk]) for s in range(0, inputs.shape[0], chunk)])


@torch.no_grad()  # torch.func transforms differentiate regardless; no graph through the parameters is kept
def lyapunov_exponent(model, contexts: torch.Tensor, embeddings: torch.Tensor, steps: int = 0, blocks: int = 8,
                      seed: int = 0) -> dict[str, Any]:
    """Top Lyapunov exponent of the scan along the data's own trajectory, per step (SPEC 7, check 4).

    contexts (N, C) are the trajectory c_t, embeddings (N, E) its tokens. A seeded random unit
    tangent vector v is pushed through J_t = dc_t/dc_{t-1}, taken at (contexts[t-1],
    embeddings[t]), for t = 1..steps (steps <= N - 1; 0 = all), and renormalised every step;
    log ||J_t v|| is step t's growth. The steps are cut into blocks + 1 contiguous blocks of
    equal length (a remainder at the end is dropped); the first is a burn-in, in which v turns
    towards the most expanding direction, and is discarded. exponent: the mean growth over the
    other `blocks` blocks; stderr: the standard deviation of their block means / sqrt(blocks).
    Negative: perturbations of the context die out at that rate per token (fixed points
    attract); positive: they grow (chaotic). A tangent that vanishes exactly counts a growth of
    log(TINY) per step. Only the first steps + 1 rows of the trajectory are read.
    Returns exponent, stderr, steps (Jacobians pushed, burn-in included), burn_in, blocks.
    """
    n, dim = contexts.shape
    steps = n - 1 if steps == 0 else min(steps, n - 1)
    block = steps // (blocks + 1)
    if blocks < 2 or block < 1:
        raise ValueError(f"a Lyapunov estimate needs blocks >= 2 and at least blocks + 1 = {blocks + 1} steps; "
                         f"got blocks {blocks} and {steps} steps (a trajectory of {n} contexts)")
    steps = block * (blocks + 1)
    device = _device(model)
    contexts = contexts[:steps + 1].detach().float().to(device)
    embeddings = embeddings[:steps + 1].detach().float().to(device)
    generator = torch.Generator().manual_seed(seed)
    vector = F.normalize(torch.randn(dim, generator=generator, dtype=torch.float64), dim=0).to(device)
    growth = torch.empty(steps, dtype=torch.float64, device=device)
    chunk = max(1, JACOBIAN_ROWS // dim)
    for start in range(1, steps + 1, chunk):  # Jacobians in batches; the tangent's chain through them is sequential
        stop = min(start + chunk, steps + 1)
        jacobians = step_jacobians(model, contexts[start - 1:stop - 1], embeddings[start:stop]).double()
        for offset, jacobian in enumerate(jacobians):
            image = jacobian @ vector
            norm = image.norm().clamp_min(TINY)
            growth[start - 1 + offset] = norm.log()
            vector = image / norm
    block_means = growth[block:].reshape(blocks, block).mean(dim=1).cpu()
    return {"exponent": float(block_means.mean()), "stderr": float(block_means.std()) / math.sqrt(blocks),
            "steps": steps, "burn_in": block, "blocks": blocks}


def _power_radius(model, inputs: torch.Tensor, tokens: torch.Tensor, vector: torch.Tensor,
                  iterations: int) -> torch.Tensor:
    """Spectral radius of J at each (inputs[s], tokens[s]) by power iteration with forward-mode JVPs: (S,) float64.

    The geometric mean of the growth factors ||J v_k|| of the normalised iterates over the
    second half of the iterations, i.e. (||J^k v|| / ||J^(k/2) v||)^(2/k) - a Gelfand estimate
    with the first half as burn-in; unlike the last Rayleigh-type ratio it does not oscillate
    when the dominant eigenvalues are a complex pair. All samples in one batched call (the
    step acts on each row alone).
    """
    def step_context(c: torch.Tensor) -> torch.Tensor:
        return model.step(c, tokens)[0]

    burn_in = iterations // 2
    log_growth = torch.zeros(inputs.shape[0], dtype=torch.float64, device=inputs.device)
    for k in range(iterations):
        _, image = torch.func.jvp(step_context, (inputs,), (vector,))
        norm = image.norm(dim=-1, keepdim=True).clamp_min(TINY)
        if k >= burn_in:
            log_growth += norm.squeeze(-1).double().log()
        vector = (image / norm).detach()
    return (log_growth / (iterations - burn_in)).exp()


@torch.no_grad()
def contraction_estimate(model, contexts: torch.Tensor, embeddings: torch.Tensor, samples: int,
                         iterations: int, seed: int = 0, exact_max_dim: int = 256) -> dict[str, Any]:
    """Spectral radius of J_t = dc_t/dc_{t-1} at sampled positions of a trajectory (SPEC 7, secondary figure).

    contexts (N, C) is the trajectory the model runs along (J_t is taken at c = contexts[t-1]
    and token embeddings[t], t >= 1 seeded), embeddings (N, E) its tokens. Exact for
    C <= exact_max_dim (the Jacobians by `step_jacobians`, max |eigenvalue| by
    torch.linalg.eigvals, method "eigenvalues", iterations 0); otherwise `iterations` steps of
    power iteration (method "power_iteration"). A radius above 1 at single positions does not
    make the scan expand along its trajectory: `lyapunov_exponent` is the criterion.
    """
    device = _device(model)
    generator = torch.Generator().manual_seed(seed)
    contexts = contexts.detach().float().to(device)
    embeddings = embeddings.detach().float().to(device)
    positions = _positions(contexts.shape[0], samples, generator).to(device)
    inputs, tokens = _step_inputs(contexts, positions), embeddings[positions]
    vector = F.normalize(torch.randn(samples, contexts.shape[1], generator=generator), dim=-1).to(device)
    if contexts.shape[1] <= exact_max_dim:
        jacobians = step_jacobians(model, inputs, tokens).cpu().double()
        radius, method, iterations = torch.linalg.eigvals(jacobians).abs().amax(dim=-1), "eigenvalues", 0
    else:
        radius, method = _power_radius(model, inputs, tokens, vector, iterations).cpu(), "power_iteration"
    above = int((radius > 1).sum())
    return {"mean": float(radius.mean()), "max": float(radius.max()), "min": float(radius.min()),
            "above_one": above, "fraction_above_one": above / samples, "samples": samples,
            "method": method, "iterations": iterations, "positions": positions.tolist(),
            "radii": radius.tolist()}
