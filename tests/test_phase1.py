import copy

import pytest
import torch

import cvfp.phase1 as phase1
from cvfp.params import Phase1Params
from helpers import tiny_model as make_model


def tiny_model(seed=0, **overrides):
    return make_model(seed, **{"layer_structure": [1, 1], **overrides})


def params(**overrides):
    base = dict(max_iterations=3, batch_tokens=5, min_converged_ratio=1.0, effective_rank_samples=0)
    base.update(overrides)
    return Phase1Params(**base)


def test_iteration0_is_the_sequential_scan_from_zero():
    model = tiny_model()
    ids = torch.randint(0, 40, (12,))
    result = phase1.train_phase1(model, ids, ids[:7], params(max_iterations=1), seed=0, log=lambda _: None)
    embeddings = model.embed(ids).detach()
    context, naive = torch.zeros(6), []
    for t in range(12):
        context = model.step(context, embeddings[t])[0].detach()
        naive.append(context)
    torch.testing.assert_close(result.train_contexts, torch.stack(naive))


def test_parallel_iteration_is_the_jacobi_update_with_carry_over():
    model = tiny_model()
    embeddings = torch.randn(8, 4)
    previous = torch.randn(8, 6)
    got = phase1.parallel_pass(model, embeddings, phase1.shifted_inputs(previous), chunk=3)
    expected = torch.stack([model.step(previous[t - 1], embeddings[t])[0] for t in range(8)]).detach()
    # t = 0 uses previous[-1]: the last context of the previous iteration, never zero
    torch.testing.assert_close(got, expected)
    zero_start = model.step(torch.zeros(6), embeddings[0])[0].detach()
    assert not torch.allclose(got[0], zero_start)


def test_shifted_inputs_carry_over_last_context():
    previous = torch.arange(12.0).reshape(4, 3)
    shifted = phase1.shifted_inputs(previous)
    torch.testing.assert_close(shifted[0], previous[-1])
    torch.testing.assert_close(shifted[1:], previous[:-1])


@pytest.mark.parametrize("diversity", ["global_deviation", "ema_variance"])
@pytest.mark.parametrize("recon", [0.0, 0.5])
def test_chunked_gradient_equals_full_batch(diversity, recon):
    embeddings, previous = torch.randn(23, 4), torch.randn(23, 6)
    grads = []
    for chunk in (23, 4):
        model = tiny_model(decoder=recon > 0)
        p = params(batch_tokens=chunk, diversity=diversity, recon_weight=recon, lr=1e-30)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
        loss = phase1.DiversityLoss(diversity, p.ema_momentum)
        phase1.jacobi_step(model, embeddings, previous, loss, p, optimizer=optimizer)
        grads.append({n: q.grad.clone() for n, q in model.named_parameters() if q.grad is not None})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-6, rtol=1e-5)


def test_gradient_matches_autograd_of_the_written_loss():
    """The two-pass gradient equals differentiating the SPEC's total loss directly."""
    model = tiny_model()
    embeddings, previous = torch.randn(10, 4), torch.randn(10, 6)
    p = params(batch_tokens=3)
    reference = copy.deepcopy(model)
    contexts = reference.step(phase1.shifted_inputs(previous), embeddings)[0]
    cvfp = ((contexts - previous) ** 2).mean()
    div = -(contexts - contexts.mean(0)).norm() / 10
    ((1 - p.dist_reg_weight) * cvfp + p.dist_reg_weight * div).backward()
    phase1.jacobi_step(model, embeddings, previous, phase1.DiversityLoss("global_deviation", 0.99), p,
                       optimizer=torch.optim.SGD(model.parameters(), lr=0.0))
    for (name, a), b in zip(model.named_parameters(), reference.parameters()):
        if b.grad is not None:
            torch.testing.assert_close(a.grad, b.grad, atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("diversity", ["global_deviation", "ema_variance"])
def test_each_diversity_loss_moves_the_parameters(diversity):
    model = tiny_model()
    embeddings, previous = torch.randn(16, 4), torch.randn(16, 6)
    loss = phase1.DiversityLoss(diversity, 0.9)
    contexts = phase1.parallel_pass(model, embeddings, phase1.shifted_inputs(previous), chunk=16)
    leaf = contexts.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(loss(leaf), leaf)
    assert grad.abs().sum() > 0, "the diversity loss must have a gradient"
    # dist_reg_weight = 1: only the diversity term drives the step
    before = [q.detach().clone() for q in model.parameters()]
    p = params(dist_reg_weight=1.0, diversity=diversity)
    phase1.jacobi_step(model, embeddings, previous, phase1.DiversityLoss(diversity, 0.9), p,
                       optimizer=torch.optim.Adam(model.parameters(), lr=1e-2))
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_nonfinite_loss_is_skipped_and_counted(monkeypatch):
    model = tiny_model()
    real = phase1.context_losses
    calls = {"n": 0}

    def poisoned(contexts, previous, diversity, weight):
        losses = real(contexts, previous, diversity, weight)
        if contexts.requires_grad:  # only the train step's loss (validation runs without grad)
            calls["n"] += 1
            if calls["n"] == 2:
                losses["total_loss"] = losses["total_loss"] * float("nan")
        return losses

    monkeypatch.setattr(phase1, "context_losses", poisoned)
    ids = torch.randint(0, 40, (20,))
    state = {}

    def snapshot(line):
        state.setdefault("lines", []).append(line)

    result = phase1.train_phase1(model, ids, ids[:10], params(max_iterations=4), seed=0, log=snapshot)
    assert result.summary["skipped_steps"] == 1
    assert [row["skipped_steps"] for row in result.history] == [0, 0, 1, 1]
    assert any("step skipped" in line for line in state["lines"])
    assert torch.isfinite(result.train_contexts).all()


def test_early_stop_at_min_converged_ratio():
    model = tiny_model()
    ids = torch.randint(0, 40, (20,))
    result = phase1.train_phase1(model, ids, ids[:10], params(max_iterations=8, min_converged_ratio=0.0, lr=1e-9),
                                 seed=0, log=lambda _: None)
    # iteration 1 is trivially converged and never stops the run; iteration 2 is the first real check
    assert result.summary["iterations"] == 3


def test_summary_has_the_reported_keys():
    model = tiny_model()
    ids = torch.randint(0, 40, (20,))
    result = phase1.train_phase1(model, ids, ids[:10], params(), seed=0, log=lambda _: None)
    for split in ("train", "val"):
        for key in ("effective_rank", "effective_rank_ratio", "convergence_rate", "converged_tokens", "tokens",
                    "cvfp_loss", "diversity_loss", "relative_residual"):
            assert key in result.summary[split], (split, key)
    assert {"iterations", "skipped_steps"} <= result.summary.keys()
    assert result.summary["train"]["tokens"] == 20 and result.summary["val"]["tokens"] == 10


def test_same_seed_same_numbers():
    runs = []
    for _ in range(2):
        model = tiny_model(seed=3)
        ids = torch.randint(0, 40, (30,), generator=torch.Generator().manual_seed(1))
        result = phase1.train_phase1(model, ids, ids[:12], params(), seed=0, log=lambda _: None)
        runs.append((result.summary, [{k: v for k, v in row.items() if not k.endswith("seconds")} for row in result.history]))
    assert runs[0] == runs[1]
