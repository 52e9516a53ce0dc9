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


def test_global_deviation_is_minus_the_spread_over_n():
    contexts = torch.randn(16, 6)
    loss = phase1.DiversityLoss("global_deviation", 0.99)
    expected = -torch.linalg.matrix_norm(contexts - contexts.mean(dim=0)) / 16  # -||C - mean(C)||_F / N
    assert float(loss(contexts)) == pytest.approx(float(expected))
    assert float(loss(2 * contexts)) < float(loss(contexts)) < 0  # more spread, lower loss


def test_ema_variance_is_one_over_the_ema_variance_with_the_momentum_per_iteration():
    n, momentum = 16, 0.95
    m = momentum ** n  # the per-token momentum over one pass of the n tokens (0.44 here)
    batches = [torch.randn(n, 6), 2 * torch.randn(n, 6) + 1, 0.5 * torch.randn(n, 6)]
    loss = phase1.DiversityLoss("ema_variance", momentum)
    # the statistics start from the first batch's (population variance), not from ones
    mean, var = batches[0].mean(dim=0), batches[0].var(dim=0, unbiased=False)
    for contexts in batches:
        expected_var = m * var + (1 - m) * ((contexts - mean) ** 2).mean(dim=0)
        assert float(loss(contexts)) == pytest.approx(float(1 / (expected_var.mean() + 1e-6)), rel=1e-5)
        loss.commit(contexts)
        var, mean = expected_var, m * mean + (1 - m) * contexts.mean(dim=0)
        torch.testing.assert_close(loss.var, var)
        torch.testing.assert_close(loss.mean, mean)


@pytest.mark.parametrize("diversity", ["global_deviation", "ema_variance"])
@pytest.mark.parametrize("recon", [0.0, 0.5])
def test_gradient_and_values_match_the_written_loss(diversity, recon):
    """The two-pass gradient and the reported terms equal the SPEC's total loss written out and differentiated."""
    model = tiny_model(decoder=recon > 0)
    embeddings, previous = torch.randn(10, 4), torch.randn(10, 6)
    p = params(batch_tokens=3, diversity=diversity, recon_weight=recon, grad_clip=1e9)
    reference = copy.deepcopy(model)
    inputs = torch.cat([previous[-1:], previous[:-1]])  # token 0 takes the last context (carry-over)
    contexts = reference.step(inputs, embeddings)[0]
    cvfp = ((contexts - previous) ** 2).mean()
    if diversity == "global_deviation":
        div = -(contexts - contexts.mean(0)).norm() / 10
    else:  # first iteration: the statistics are this batch's; m = momentum ** N
        m, first = p.ema_momentum ** 10, contexts.detach()
        mean, var = first.mean(0), first.var(0, unbiased=False)
        div = 1 / ((m * var + (1 - m) * ((contexts - mean) ** 2).mean(0)).mean() + 1e-6)
    total = (1 - p.dist_reg_weight) * cvfp + p.dist_reg_weight * div
    if recon:  # the decoder reconstructs [c_prev; x] from the new context
        recon_mse = ((reference.context_decoder(contexts) - torch.cat([inputs, embeddings], -1)) ** 2).mean()
        total = total + recon * recon_mse
    total.backward()
    loss = phase1.DiversityLoss(diversity, p.ema_momentum)
    _, values, skipped = phase1.jacobi_step(model, embeddings, previous, loss, p,
                                            optimizer=torch.optim.SGD(model.parameters(), lr=0.0))
    assert not skipped
    assert values["cvfp_loss"] == pytest.approx(float(cvfp), rel=1e-5)
    assert values["diversity_loss"] == pytest.approx(float(div), rel=1e-5)
    assert values["total_loss"] == pytest.approx(float(total), rel=1e-5)
    if recon:
        assert values["recon_loss"] == pytest.approx(float(recon_mse), rel=1e-5)
    compared = 0
    for (name, a), b in zip(model.named_parameters(), reference.parameters()):
        if b.grad is not None:
            torch.testing.assert_close(a.grad, b.grad, atol=1e-6, rtol=1e-5, msg=name)
            compared += 1
    assert compared > 0


def test_gradient_clipping_clips_the_total_norm():
    embeddings, previous = torch.randn(10, 4), torch.randn(10, 6)
    grads = {}
    for clip in (1e9, 1e-3):
        model = tiny_model()
        phase1.jacobi_step(model, embeddings, previous, phase1.DiversityLoss("global_deviation", 0.99),
                           params(grad_clip=clip), optimizer=torch.optim.SGD(model.parameters(), lr=0.0))
        grads[clip] = torch.cat([q.grad.flatten() for q in model.parameters() if q.grad is not None])
    raw = grads[1e9]
    assert raw.norm() > 1e-2  # the clip binds
    assert float(grads[1e-3].norm()) == pytest.approx(1e-3, rel=1e-3)
    torch.testing.assert_close(grads[1e-3], raw * (1e-3 / raw.norm()), rtol=1e-3, atol=1e-9)  # same direction


def test_every_iteration_of_a_run_carries_the_last_context_over(monkeypatch):
    """Token 0's input at iteration k is iteration k-1's last context (iteration 0's: the scan's), never zero."""
    model = tiny_model()
    train_ids, val_ids = torch.randint(0, 40, (13,)), torch.randint(0, 40, (9,))
    with torch.no_grad():  # iteration 0 of each stream, keyed by its length
        previous = {13: model.scan(model.embed(train_ids)), 9: model.scan(model.embed(val_ids))}
    calls = []
    real = phase1.parallel_pass

    def spy(model, embeddings, inputs, *args, **kwargs):
        out = real(model, embeddings, inputs, *args, **kwargs)
        calls.append((inputs.clone(), out.clone()))
        return out

    monkeypatch.setattr(phase1, "parallel_pass", spy)
    # a large lr: every iteration's contexts differ from the last, so a stale carry would show
    phase1.train_phase1(model, train_ids, val_ids, params(max_iterations=5, lr=0.05), seed=0, log=lambda _: None)
    assert [inputs.shape[0] for inputs, _ in calls] == [13, 9] * 4  # iterations 1..4, train then val
    for inputs, out in calls:
        last = previous[inputs.shape[0]]
        assert inputs[0].abs().sum() > 0
        torch.testing.assert_close(inputs[0], last[-1])
        torch.testing.assert_close(inputs[1:], last[:-1])
        previous[inputs.shape[0]] = out


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
        for key in ("effective_rank", "effective_rank_ratio", "effective_rank_initial", "effective_rank_initial_ratio",
                    "convergence_rate", "converged_tokens", "tokens", "cvfp_loss", "diversity_loss",
                    "relative_residual"):
            assert key in result.summary[split], (split, key)
    assert {"iterations", "skipped_steps"} <= result.summary.keys()
    assert result.summary["train"]["tokens"] == 20 and result.summary["val"]["tokens"] == 10


def test_summary_has_the_untrained_rank_and_whether_the_cvfp_loss_rose():
    model = tiny_model()
    ids = torch.randint(0, 40, (20,))
    # train's iteration 1 runs the scan's own weights on the scan: only token 0 (carried over) moves
    with torch.no_grad():
        embeddings = model.embed(ids)
        scan = model.scan(embeddings)
        trivial = float((model.step(scan[-1], embeddings[0])[0] - scan[0]).pow(2).sum()) / (20 * 6)
    lines = []
    result = phase1.train_phase1(model, ids, ids[:10], params(max_iterations=4, lr=0.05), seed=0, log=lines.append)
    rows = {row["iteration"]: row for row in result.history}
    assert rows[1]["train_cvfp_loss"] == pytest.approx(trivial, rel=1e-3)  # so the first loss of updated weights is 2's
    for split, first in (("train", 2), ("val", 1)):
        s = result.summary[split]
        assert s["effective_rank_initial"] == rows[0][f"{split}_effective_rank"]
        assert s["effective_rank_initial_ratio"] == pytest.approx(s["effective_rank_initial"] / 6)
        assert s["effective_rank"] == rows[3][f"{split}_effective_rank"]
        assert (s["cvfp_loss_first"], s["cvfp_loss_first_iteration"]) == (rows[first][f"{split}_cvfp_loss"], first)
        assert (s["cvfp_loss_final"], s["cvfp_loss_final_iteration"]) == (rows[3][f"{split}_cvfp_loss"], 3)
        assert s["cvfp_loss_rose"] == (s["cvfp_loss_final"] > s["cvfp_loss_first"])
        assert phase1.summary_line(split, s, 6) in lines


def test_summary_line_says_untrained_and_rose():
    summary = {"effective_rank": 3.0, "effective_rank_initial": 4.5, "tokens": 10, "converged_tokens": 4,
               "cvfp_loss_first": 0.01, "cvfp_loss_first_iteration": 2, "cvfp_loss_final": 0.03,
               "cvfp_loss_final_iteration": 9, "cvfp_loss_rose": True}
    assert phase1.summary_line("train", summary, 6) == (
        "train: Effective Rank: 3.00/6 (50.0%), untrained 4.50/6 (75.0%), convergence 40.0% (4/10), "
        "cvfp loss 0.010000 (iteration 2) -> 0.030000 (iteration 9), ROSE")


def test_same_seed_same_numbers():
    runs = []
    for _ in range(2):
        model = tiny_model(seed=3)
        ids = torch.randint(0, 40, (30,), generator=torch.Generator().manual_seed(1))
        result = phase1.train_phase1(model, ids, ids[:12], params(), seed=0, log=lambda _: None)
        runs.append((result.summary, [{k: v for k, v in row.items() if not k.endswith("seconds")} for row in result.history]))
    assert runs[0] == runs[1]
