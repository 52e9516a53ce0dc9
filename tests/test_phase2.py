import copy
import math

import pytest
import torch

import cvfp.phase2 as phase2
from cvfp.cstar import generate_cstar
from cvfp.params import Phase2Params
from helpers import tiny_model as make_model

VOCAB, CONTEXT, EMBED = 12, 6, 4


def tiny_model(seed=0, **overrides):
    return make_model(seed, **{"vocab_size": VOCAB, "context_dim": CONTEXT, "embed_dim": EMBED, **overrides})


def params(**overrides):
    base = dict(epochs=2, batch_size=8, lr=0.01, patience=2)
    base.update(overrides)
    return Phase2Params(**base)


def stream(length, seed=1):
    """A periodic token stream (learnable) with a little noise, and its C* from the model."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.arange(length) % 5
    noise = torch.rand(length, generator=generator) < 0.1
    return torch.where(noise, torch.randint(0, VOCAB, (length,), generator=generator), ids)


def quiet(_):
    pass


def test_position_zero_gets_a_zero_input_context():
    model = tiny_model()
    ids, cstar = stream(10), torch.randn(10, CONTEXT)
    positions = torch.tensor([0, 3])
    logits, context_out = phase2.forward(model, ids[positions], phase2.input_contexts(cstar, positions), cstar[positions],
                                         "stability")
    with torch.no_grad():
        zero_start = model.step(torch.zeros(1, CONTEXT), model.embed(ids[:1]))
        from_cstar = model.step(cstar[2:3], model.embed(ids[3:4]))
        wrapped = model.step(cstar[-1:], model.embed(ids[:1]))[0]
    torch.testing.assert_close(context_out.detach(), torch.cat([zero_start[0], from_cstar[0]]))
    torch.testing.assert_close(logits.detach()[0], model.logits(*zero_start)[0].detach())
    assert not torch.allclose(context_out[0].detach(), wrapped[0])


@pytest.mark.parametrize("context_mode", ["stability", "replace"])
def test_loss_equals_a_hand_computation(context_mode):
    model = tiny_model()
    model.init_head_(seed=3)
    ids, cstar = stream(12), torch.randn(12, CONTEXT)
    positions = torch.tensor([0, 4, 7, 10])
    weight = 0.7
    got = phase2.phase2_losses(model, ids, cstar, positions, context_mode, weight)

    ces, mses = [], []
    with torch.no_grad():
        for t in positions.tolist():
            context_in = torch.zeros(CONTEXT) if t == 0 else cstar[t - 1]
            context_out, token_out = model.step(context_in, model.embed(ids[t]))
            head_context = cstar[t] if context_mode == "replace" else context_out
            logits = model.token_output.weight @ torch.cat([head_context, token_out]) + model.token_output.bias
            ces.append(-(logits[ids[t + 1]] - torch.log(torch.exp(logits).sum())))
            mses.append(((context_out - cstar[t]) ** 2).mean())
    ce, mse = torch.stack(ces).mean(), torch.stack(mses).mean()
    expected = ce + weight * mse if context_mode == "stability" else ce
    torch.testing.assert_close(got["ce"].detach(), ce)
    torch.testing.assert_close(got["stability"].detach(), mse)
    torch.testing.assert_close(got["loss"].detach(), expected)

    whole = phase2.evaluate_fixed(model, ids, cstar, batch_size=5, context_mode=context_mode)
    every = phase2.phase2_losses(model, ids, cstar, torch.arange(11), context_mode, weight)
    assert whole["predictions"] == 11
    assert whole["total_nats"] == pytest.approx(float(every["ce"].detach()) * 11, rel=1e-5)
    assert whole["correct"] == int(every["correct"])


def _snapshot(model):
    return {name: p.detach().clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("freeze_context,freeze_embedding", [(False, False), (True, False), (False, True)])
def test_freezing_freezes_exactly_what_it_says(freeze_context, freeze_embedding):
    model = tiny_model(decoder=True)
    ids = stream(40)
    cstar = generate_cstar(model, ids, "cpu")
    before = _snapshot(model)
    initial_head = copy.deepcopy(model)
    initial_head.init_head_(seed=0)
    before.update({name: p.detach().clone() for name, p in initial_head.named_parameters() if name.startswith("token_output")})

    result = phase2.train_phase2(model, ids, cstar, ids[:20], cstar[:20], 100, params(epochs=1, freeze_context=freeze_context,
                                 freeze_embedding=freeze_embedding), seed=0, log=quiet)
    assert result.summary["skipped_steps"] == 0
    after = _snapshot(model)
    for name in before:
        frozen = (name.startswith("context_decoder")
                  or (freeze_context and not name.startswith("token_output"))
                  or (freeze_embedding and name.startswith(("token_embedding", "embed_norm"))))
        assert torch.equal(before[name], after[name]) == frozen, name
    trainable = sum(p.numel() for name, p in model.named_parameters() if not torch.equal(before[name], after[name]))
    assert result.summary["trainable_parameters"] == trainable


def test_early_stopping_restores_the_best_epoch(monkeypatch):
    model = tiny_model()
    ids = stream(30)
    cstar = generate_cstar(model, ids, "cpu")
    val_losses = iter([3.0, 2.0, 2.5, 2.6, 2.7, 1.0, 0.5])
    states = []

    def fake_evaluate(model, ids, cstar, batch_size, context_mode, precision="fp32", world=None):
        states.append(copy.deepcopy(model.state_dict()))  # the weights this epoch ended with
        tokens = ids.shape[0] - 1
        return {"total_nats": next(val_losses) * tokens, "predictions": tokens, "correct": 0, "stability_mse": 0.0}

    monkeypatch.setattr(phase2, "evaluate_fixed", fake_evaluate)
    result = phase2.train_phase2(model, ids, cstar, ids, cstar, 100, params(epochs=10, patience=3, lr=0.05), seed=0,
                                 log=quiet)
    summary = result.summary
    assert (summary["best_epoch"], summary["epochs_run"], summary["stopped_early"]) == (2, 5, True)
    assert summary["best"]["val_loss"] == pytest.approx(2.0)
    assert [row["epoch"] for row in result.history] == [1, 2, 3, 4, 5]
    final = model.state_dict()
    assert all(torch.equal(final[k], states[1][k]) for k in final)
    assert not all(torch.equal(final[k], states[4][k]) for k in final)


def test_a_non_finite_loss_skips_the_step_and_is_counted():
    model = tiny_model()
    ids = stream(20)
    cstar = generate_cstar(model, ids, "cpu")
    poisoned = cstar.clone()
    poisoned[7] = math.nan  # C*[7] is position 7's stability target: its batch's loss is NaN
    result = phase2.train_phase2(model, ids, poisoned, ids, cstar, 100, params(epochs=1, batch_size=64), seed=0, log=quiet)
    assert result.summary["skipped_steps"] == 1
    assert result.summary["train_tokens_seen"] == 0
    assert result.history[0]["train_loss"] is None
    reference = tiny_model()
    reference.init_head_(seed=0)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), reference.parameters()))


@pytest.mark.parametrize("context_mode,precision", [("stability", "fp32"), ("replace", "fp32"), ("stability", "bf16")])
def test_training_lowers_validation_loss_and_reports_every_column(context_mode, precision):
    model = tiny_model()
    ids = stream(200)
    cstar = generate_cstar(model, ids, "cpu")
    result = phase2.train_phase2(model, ids[:150], cstar[:150], ids[150:], cstar[150:], 120,
                                 params(epochs=4, patience=4, lr=0.02, context_mode=context_mode, precision=precision),
                                 seed=0, log=quiet)
    history = result.history
    for key in ("epoch", "train_loss", "train_ce", "train_ppl", "val_loss", "val_ppl", "val_acc", "val_bpb", "seconds"):
        assert all(row[key] is not None for row in history), key
    assert history[-1]["val_loss"] < history[0]["val_loss"]
    assert result.summary["best_epoch"] == min(history, key=lambda r: r["val_loss"])["epoch"]
    assert result.summary["train_tokens_seen"] == 4 * 149


def test_same_seed_same_numbers():
    runs = []
    for _ in range(2):
        model = tiny_model()
        ids = stream(60)
        cstar = generate_cstar(model, ids, "cpu")
        runs.append(phase2.train_phase2(model, ids, cstar, ids, cstar, 100, params(), seed=5, log=quiet).history)
    strip = [[{k: v for k, v in row.items() if k != "seconds"} for row in run] for run in runs]
    assert strip[0] == strip[1]
