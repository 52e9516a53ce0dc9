import math

import pytest
import torch
import torch.nn.functional as F

import cvfp.evaluate as evaluate
import cvfp.metrics as metrics
from cvfp.metrics import change_sums
from cvfp.model import CVFPModel, ModelArgs
from cvfp.params import EvaluateParams, Phase1Params
from cvfp.phase1 import train_phase1
from cvfp.scan import exact_scan


def tiny_model(seed=0, **overrides):
    torch.manual_seed(seed)
    args = dict(vocab_size=40, context_dim=8, embed_dim=8, hidden_dim=16, layer_structure=[1, 1])
    args.update(overrides)
    return CVFPModel(ModelArgs(**args))


class IdentityStep(torch.nn.Module):
    """Stand-in whose update is the identity: F(c, x) = (c, x)."""

    def __init__(self, vocab_size=40, dim=8):
        super().__init__()
        self.args = ModelArgs(vocab_size=vocab_size, context_dim=dim, embed_dim=dim, hidden_dim=2 * dim)
        self.table = torch.nn.Embedding(vocab_size, dim)

    def embed(self, ids):
        return self.table(ids)

    def step(self, context, token):
        return context, token


class LinearStep(torch.nn.Module):
    """Stand-in with a linear context update c' = A c + B x, so dc'/dc = A everywhere."""

    def __init__(self, matrix, embed_dim=3):
        super().__init__()
        self.register_buffer("matrix", matrix)
        self.register_buffer("mixer", torch.randn(matrix.shape[0], embed_dim))

    def step(self, context, token):
        return context @ self.matrix.T + token @ self.mixer.T, token


def test_bits_per_byte_is_total_nats_over_ln2_bytes():
    logits, targets = torch.randn(7, 5), torch.randint(0, 5, (7,))
    nats = float(F.cross_entropy(logits, targets, reduction="sum"))
    counts = {"total_nats": nats, "predictions": 7, "correct": int((logits.argmax(-1) == targets).sum())}
    result = metrics.next_token_metrics(counts, num_bytes=29)
    assert result["val_bpb"] == pytest.approx(nats / (math.log(2) * 29))
    assert metrics.bits_per_byte(nats, 29) == pytest.approx(nats / math.log(2) / 29)
    assert result["val_loss"] == pytest.approx(nats / 7)
    assert result["val_ppl"] == pytest.approx(math.exp(nats / 7))
    assert result["val_acc"] == counts["correct"] / 7


def test_perplexity_overflow_is_inf_not_an_error():
    assert metrics.next_token_metrics({"total_nats": 1e6, "predictions": 1, "correct": 0}, 1)["val_ppl"] == math.inf


def test_evaluate_free_equals_a_per_token_loop():
    model = tiny_model()
    ids = torch.randint(0, 40, (23,))
    got = evaluate.evaluate_free(model, ids, exact_scan, batch_size=5)  # batches not dividing N-1 = 22
    with torch.no_grad():
        context, nats, correct = torch.zeros(8), 0.0, 0
        for t in range(len(ids) - 1):
            context, token_out = model.step(context, model.embed(ids[t]))
            logits = model.logits(context, token_out)
            nats += float(F.cross_entropy(logits[None], ids[t + 1][None]))
            correct += int(logits.argmax() == ids[t + 1])
    assert got["predictions"] == len(ids) - 1
    assert got["correct"] == correct
    assert got["total_nats"] == pytest.approx(nats, rel=1e-5)


def test_evaluate_free_uses_the_given_scan_from_zero():
    model, calls = tiny_model(), []

    def recording_scan(model, embeddings, initial=None, with_token_out=False):
        calls.append((initial, with_token_out))
        return model.scan(embeddings, initial=initial, with_token_out=with_token_out)

    evaluate.evaluate_free(model, torch.randint(0, 40, (9,)), recording_scan, 4)
    assert calls == [(None, True)]


def test_context_health_flags_collapse_and_zero():
    params = EvaluateParams(effective_rank_samples=0, pairwise_samples=64)
    collapsed = torch.randn(1, 8).repeat(100, 1) * 3
    near_zero = torch.randn(100, 8) * 1e-3
    healthy = torch.randn(100, 8)
    h = metrics.context_health(collapsed, params)
    assert h["global_attractor"] and not h["zero_solution"]
    assert h["mean_pairwise_cosine"] == pytest.approx(1.0) and h["mean_pairwise_distance"] == pytest.approx(0.0, abs=1e-5)
    assert h["effective_rank"] == pytest.approx(1.0, abs=1e-3)
    assert metrics.context_health(near_zero, params)["zero_solution"]
    h = metrics.context_health(healthy, params)
    assert not h["global_attractor"] and not h["zero_solution"]
    assert h["dim"] == 8 and h["effective_rank_ratio"] == pytest.approx(h["effective_rank"] / 8)
    assert h["effective_rank"] == pytest.approx(metrics.effective_rank(healthy))


def test_singular_spectrum_sums_to_one_and_matches_effective_rank():
    matrix = torch.randn(50, 6)
    spectrum = metrics.singular_spectrum(matrix, samples=20, seed=3)
    assert spectrum.shape == (6,) and float(spectrum.sum()) == pytest.approx(1.0)
    entropy = -(spectrum * spectrum.log()).sum()
    assert float(entropy.exp()) == pytest.approx(metrics.effective_rank(matrix, samples=20, seed=3))


def test_identity_check_flags_the_identity_update():
    stand_in = IdentityStep()
    contexts, embeddings = torch.randn(60, 8), torch.randn(60, 8)
    result = metrics.identity_check(stand_in, contexts, embeddings, samples=32, threshold=0.95, zero_norm=0.1, seed=0)
    assert not result["passed"]
    assert result["mean_step_cosine"] == pytest.approx(1.0)
    assert result["mean_step_cosine_random"] == pytest.approx(1.0)
    assert result["token_sensitivity"] == 0.0


def test_identity_check_flags_zero_contexts():
    model = tiny_model()
    result = metrics.identity_check(model, torch.zeros(30, 8), torch.randn(30, 8), 16, 0.95, 0.1, 0)
    assert result["mean_context_norm"] == 0.0 and not result["passed"]


def test_identity_check_passes_a_trained_model():
    # a fresh model (init_std 0.1) is nearly the identity on LayerNorm-ed contexts; Phase 1 moves it away
    model = tiny_model()
    ids = torch.randint(0, 40, (300,))
    fresh = metrics.identity_check(model, model.scan(model.embed(ids)), model.embed(ids).detach(), 128, 0.95, 0.1, 0)
    params = Phase1Params(max_iterations=30, lr=0.02, batch_tokens=512, effective_rank_samples=0, min_converged_ratio=1.0)
    train_phase1(model, ids, ids[:50], params, seed=0, log=lambda _: None)
    embeddings = model.embed(ids).detach()
    result = metrics.identity_check(model, model.scan(embeddings), embeddings, 128, 0.95, 0.1, 0)
    assert result["passed"], result
    assert result["mean_step_cosine"] < fresh["mean_step_cosine"]
    assert result["token_sensitivity"] > metrics.TOKEN_SENSITIVITY_TOLERANCE


@pytest.mark.parametrize("mses, verdict", [
    ([0.1, 0.05, 0.01], metrics.CONVERGING),
    ([1e-5, 1e-5, 2e-5], metrics.CONVERGED),
    ([0.01, 0.05, 0.1], metrics.DIVERGING),
    ([0.0, 0.5, 0.0], metrics.UNSTABLE),  # flat on average (slope 0) but std 0.24 >= 0.01
])
def test_convergence_verdict(mses, verdict):
    assert metrics.convergence_verdict(mses, slope_threshold=1e-3, std_threshold=1e-2) == verdict


def test_linear_slope_is_least_squares():
    assert metrics.linear_slope([1.0, 3.0, 5.0, 7.0]) == pytest.approx(2.0)
    assert metrics.linear_slope([0.0, 1.0, 0.0]) == pytest.approx(0.0)
    assert metrics.linear_slope([4.0]) == 0.0


def test_convergence_check_carries_the_last_context_over():
    model, starts, outputs = tiny_model(), [], []

    def recording_scan(model, embeddings, initial=None, with_token_out=False):
        starts.append(None if initial is None else initial.clone())
        outputs.append(model.scan(embeddings, initial=initial))
        return outputs[-1]

    embeddings = model.embed(torch.randint(0, 40, (15,))).detach()
    thresholds = EvaluateParams()
    result = metrics.convergence_check(model, embeddings, 4, recording_scan, thresholds)
    assert starts[0] is None  # trial 1 starts from zero
    for trial in range(1, 4):
        torch.testing.assert_close(starts[trial].reshape(-1), outputs[trial - 1][-1])
    expected = [float((outputs[k] - outputs[k - 1]).pow(2).mean()) for k in range(1, 4)]
    assert result["trial_mse"] == pytest.approx(expected)
    assert result["final_diff"] == expected[-1]
    assert result["passed"] == (expected[-1] < thresholds.final_diff_threshold)
    assert result["slope"] == pytest.approx(metrics.linear_slope(expected))
    assert result["verdict"] == metrics.convergence_verdict(expected, thresholds.slope_threshold, thresholds.std_threshold)


def test_convergence_check_with_the_stages_scan_is_model_scan():
    model = tiny_model()
    embeddings = model.embed(torch.randint(0, 40, (10,))).detach()
    first = model.scan(embeddings)
    second = model.scan(embeddings, initial=first[-1])
    result = metrics.convergence_check(model, embeddings, 3, exact_scan, EvaluateParams())
    assert result["trial_mse"][0] == pytest.approx(float((second - first).pow(2).mean()))


def _matrix_with_eigenvalues(blocks, seed):
    """A non-normal matrix P D P^-1 whose eigenvalues are those of the block-diagonal D."""
    generator = torch.Generator().manual_seed(seed)
    diagonal = torch.block_diag(*blocks)
    basis = torch.eye(diagonal.shape[0]) + 0.3 * torch.randn(diagonal.shape, generator=generator)
    return basis @ diagonal @ torch.linalg.inv(basis)


def _rotation(radius, angle):
    return radius * torch.tensor([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])


@pytest.mark.parametrize("blocks", [
    [torch.tensor([[1.3]]), torch.diag(torch.tensor([0.6, -0.4, 0.2]))],  # real dominant eigenvalue > 1
    [_rotation(0.8, 0.9), torch.diag(torch.tensor([0.5, -0.3]))],  # complex dominant pair < 1
])
def test_contraction_estimate_matches_eigenvalues_of_a_linear_step(blocks):
    torch.manual_seed(0)
    matrix = _matrix_with_eigenvalues(blocks, seed=1)
    stand_in = LinearStep(matrix)
    contexts, embeddings = torch.randn(40, matrix.shape[0]), torch.randn(40, 3)
    result = metrics.contraction_estimate(stand_in, contexts, embeddings, samples=6, iterations=200, seed=0)
    radius = float(torch.linalg.eigvals(matrix).abs().max())
    assert result["mean"] == pytest.approx(radius, rel=0.02)
    assert result["max"] == pytest.approx(radius, rel=0.02)
    assert result["fraction_above_one"] == (1.0 if radius > 1 else 0.0)
    assert result["samples"] == 6


def test_contraction_estimate_uses_the_model_jacobian_at_the_previous_context():
    model = tiny_model()
    point, token = torch.randn(8), model.embed(torch.tensor(3)).detach()
    # every position has the same (previous context, token), so every sample sees one Jacobian
    contexts, embeddings = point.repeat(10, 1), token.repeat(10, 1)
    jacobian = torch.autograd.functional.jacobian(lambda c: model.step(c, token)[0], point)
    radius = float(torch.linalg.eigvals(jacobian).abs().max())
    result = metrics.contraction_estimate(model, contexts, embeddings, samples=4, iterations=200, seed=0)
    assert result["mean"] == pytest.approx(radius, rel=0.03)


def test_convergence_counts_tokens_under_threshold():
    previous = torch.zeros(5, 2)
    contexts = torch.tensor([[0.0, 0.0], [0.1, 0.1], [0.2, 0.0], [1.0, 1.0], [0.0, 0.3]])
    # mean squared change per token: 0, 0.01, 0.02, 1.0, 0.045
    assert change_sums(contexts, previous, threshold=0.03)["converged"] == 3  # the count Phase 1 reports
