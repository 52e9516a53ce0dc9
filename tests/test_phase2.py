import copy
import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import cvfp.phase2 as phase2
from cvfp.cstar import generate_cstar
from cvfp.metrics import next_token_metrics
from cvfp.params import Params, Phase2Params
from helpers import CONTEXT, EMBED, VOCAB, all_scored, labelled, stream, NoRun, load_stage, tiny_model as make_model

REPO = Path(__file__).resolve().parents[1]



def tiny_model(seed=0, **overrides):
    return make_model(seed, **{"vocab_size": VOCAB, "context_dim": CONTEXT, "embed_dim": EMBED, **overrides})


def params(**overrides):
    base = dict(epochs=2, batch_size=8, lr=0.01, patience=2)
    base.update(overrides)
    return Phase2Params(**base)





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
    torch.testing.assert_close(got["loss"].detach(), ce)  # the loss is the cross-entropy in both modes
    torch.testing.assert_close(got["stability"].detach(), mse)
    torch.testing.assert_close(got["objective"].detach(), expected)  # what is trained
    assert got["logits"].shape == (4, VOCAB)
    assert "ce" not in got and "correct" not in got

    scored, target_bytes = all_scored(ids)
    whole = phase2.evaluate_fixed(model, ids, cstar, scored, target_bytes, batch_size=5, context_mode=context_mode)
    every = phase2.phase2_losses(model, ids, cstar, torch.arange(11), context_mode, weight)
    assert whole["predictions"] == 11 and whole["bytes"] == 11
    assert whole["total_nats"] == pytest.approx(float(every["loss"].detach()) * 11, rel=1e-5)
    assert whole["correct"] == int((every["logits"].argmax(-1) == ids[1:]).sum())
    assert whole["stability_mse"] == pytest.approx(float(every["stability"].detach()), rel=1e-5)


@pytest.mark.parametrize("batch_size", [1, 4, 64])
def test_evaluate_fixed_counts_the_scored_predictions_only(batch_size):
    """Unscored predictions (markers, unseen ids) add nothing to nats, predictions, hits or bytes; each scored
    prediction adds the bytes of its own target ids[t+1]; stability stays a mean over every position."""
    model = tiny_model()
    model.init_head_(seed=3)
    ids, cstar = stream(40, seed=4), torch.randn(40, CONTEXT)
    scored, target_bytes = labelled(ids)
    assert 0 < int(scored.sum()) < 39 and bool((target_bytes[~scored] > 0).any())  # both kinds of unscored occur

    with torch.no_grad():
        every = phase2.phase2_losses(model, ids, cstar, torch.arange(39), "stability", 0.0)
    nats = F.cross_entropy(every["logits"], ids[1:], reduction="none").double()
    hits = every["logits"].argmax(-1) == ids[1:]
    got = phase2.evaluate_fixed(model, ids, cstar, scored, target_bytes, batch_size, "stability")
    assert got["predictions"] == int(scored.sum())
    assert got["total_nats"] == pytest.approx(float(nats[scored].sum()), rel=1e-6)
    assert got["correct"] == int(hits[scored].sum())
    assert got["bytes"] == int(target_bytes[scored].sum())
    # the data tell the right rule from the wrong ones: every prediction, or the bytes of the inputs ids[t]
    assert got["total_nats"] != pytest.approx(float(nats.sum()), rel=1e-3)
    assert got["bytes"] != int(target_bytes.sum())
    input_bytes = torch.cat([torch.tensor([0]), target_bytes[:-1]])  # bytes of ids[t], i.e. off by one
    assert got["bytes"] != int(input_bytes[scored].sum())
    unmasked = phase2.evaluate_fixed(model, ids, cstar, *all_scored(ids), batch_size, "stability")
    assert got["stability_mse"] == pytest.approx(unmasked["stability_mse"], rel=1e-6)
    assert unmasked["predictions"] == 39 and unmasked["total_nats"] == pytest.approx(float(nats.sum()), rel=1e-6)


def test_an_unscored_prediction_cannot_move_the_counts():
    """Changing the target of an unscored prediction (here to any other id) leaves every count as it was."""
    model = tiny_model()
    model.init_head_(seed=3)
    ids, cstar = stream(30, seed=6), torch.randn(30, CONTEXT)
    scored, target_bytes = labelled(ids)
    position = int((~scored).nonzero()[0])
    changed = ids.clone()
    changed[position + 1] = (changed[position + 1] + 1) % VOCAB  # the target of prediction `position`
    keep = scored.clone()
    keep[position + 1] = False  # ids[position + 1] is also the input of prediction position + 1
    first = phase2.evaluate_fixed(model, ids, cstar, keep, target_bytes, 7, "stability")
    second = phase2.evaluate_fixed(model, changed, cstar, keep, target_bytes, 7, "stability")
    assert {k: first[k] for k in ("predictions", "correct", "bytes")} == \
        {k: second[k] for k in ("predictions", "correct", "bytes")}
    assert first["total_nats"] == pytest.approx(second["total_nats"], rel=1e-12)


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

    result = phase2.train_phase2(model, ids, cstar, ids[:20], cstar[:20], *all_scored(ids[:20]),
                                 params(epochs=1, freeze_context=freeze_context, freeze_embedding=freeze_embedding),
                                 seed=0, log=quiet)
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

    def fake_evaluate(model, ids, cstar, scored, target_bytes, batch_size, context_mode, precision="fp32", world=None):
        states.append(copy.deepcopy(model.state_dict()))  # the weights this epoch ended with
        tokens = int(scored.sum())
        return {"total_nats": next(val_losses) * tokens, "predictions": tokens, "correct": 0,
                "bytes": int(target_bytes[scored].sum()), "stability_mse": 0.0}

    monkeypatch.setattr(phase2, "evaluate_fixed", fake_evaluate)
    result = phase2.train_phase2(model, ids, cstar, ids, cstar, *all_scored(ids), params(epochs=10, patience=3, lr=0.05),
                                 seed=0, log=quiet)
    summary = result.summary
    assert (summary["best_epoch"], summary["epochs_run"], summary["stopped_early"]) == (2, 5, True)
    assert summary["best"]["val_loss"] == pytest.approx(2.0)
    assert [row["epoch"] for row in result.history] == [1, 2, 3, 4, 5]
    final = model.state_dict()
    assert all(torch.equal(final[k], states[1][k]) for k in final)
    assert not all(torch.equal(final[k], states[4][k]) for k in final)


def fake_validation(monkeypatch, epochs):
    """evaluate_fixed replaced by one giving, epoch after epoch, the (CE per prediction, stability MSE) of `epochs`
    over the scored predictions it is given; returns the list of the weights each epoch ended with."""
    values, states = iter(epochs), []

    def fake_evaluate(model, ids, cstar, scored, target_bytes, batch_size, context_mode, precision="fp32", world=None):
        states.append(copy.deepcopy(model.state_dict()))
        loss, stability = next(values)
        tokens = int(scored.sum())
        return {"total_nats": loss * tokens, "predictions": tokens, "correct": tokens // 2,
                "bytes": int(target_bytes[scored].sum()), "stability_mse": stability}

    monkeypatch.setattr(phase2, "evaluate_fixed", fake_evaluate)
    return states


def test_the_best_epoch_is_the_lowest_validation_loss_not_objective(monkeypatch):
    """Stability mode, weight 2: epoch 2 has the lowest CE, epoch 3 the lowest CE + 2 x stability. Epoch 2 is kept."""
    model = tiny_model()
    ids = stream(30)
    cstar = generate_cstar(model, ids, "cpu")
    scored, target_bytes = labelled(ids)
    states = fake_validation(monkeypatch, [(2.0, 0.2), (1.5, 0.5), (1.8, 0.0)])  # objectives 2.4, 2.5, 1.8
    result = phase2.train_phase2(model, ids, cstar, ids, cstar, scored, target_bytes,
                                 params(epochs=3, patience=3, context_stability_weight=2.0), seed=0, log=quiet)
    summary, history = result.summary, result.history
    assert summary["early_stopping_on"] == "val_loss"
    assert summary["best_epoch"] == 2
    assert [row["val_objective"] for row in history] == pytest.approx([2.4, 2.5, 1.8])
    assert [row["val_loss"] for row in history] == pytest.approx([2.0, 1.5, 1.8])
    best = summary["best"]
    assert (best["val_loss"], best["val_objective"], best["val_stability"]) == pytest.approx((1.5, 2.5, 0.5))
    predictions, num_bytes = int(scored.sum()), int(target_bytes[scored].sum())
    assert best["val_predictions"] == predictions and best["val_correct"] == predictions // 2
    assert best["val_ppl"] == pytest.approx(math.exp(1.5))
    assert best["val_bpb"] == pytest.approx(1.5 * predictions / math.log(2) / num_bytes)
    assert set(best) == {"train_objective", "train_loss", "train_stability", "train_ppl", "val_objective", "val_loss",
                         "val_stability", "val_ppl", "val_acc", "val_correct", "val_predictions", "val_bpb"}
    final = model.state_dict()
    assert all(torch.equal(final[k], states[1][k]) for k in final)


def test_patience_counts_epochs_without_a_better_loss_even_when_the_objective_improves(monkeypatch):
    model = tiny_model()
    ids = stream(30)
    cstar = generate_cstar(model, ids, "cpu")
    # the loss rises while the objective (weight 1) falls every epoch: stopping on the objective would never stop
    fake_validation(monkeypatch, [(2.0, 3.0), (2.1, 2.0), (2.2, 1.0), (2.3, 0.0), (2.4, 0.0)])
    result = phase2.train_phase2(model, ids, cstar, ids, cstar, *all_scored(ids), params(epochs=5, patience=2),
                                 seed=0, log=quiet)
    summary = result.summary
    assert (summary["best_epoch"], summary["epochs_run"], summary["stopped_early"]) == (1, 3, True)
    assert summary["best"]["val_loss"] == pytest.approx(2.0)


def test_replace_mode_objective_is_the_loss(monkeypatch):
    model = tiny_model()
    ids = stream(30)
    cstar = generate_cstar(model, ids, "cpu")
    fake_validation(monkeypatch, [(2.0, 0.7)])
    result = phase2.train_phase2(model, ids, cstar, ids, cstar, *all_scored(ids),
                                 params(epochs=1, context_mode="replace", context_stability_weight=5.0), seed=0,
                                 log=quiet)
    row = result.history[0]
    assert row["val_objective"] == pytest.approx(row["val_loss"]) and row["val_stability"] == pytest.approx(0.7)
    assert row["train_objective"] == pytest.approx(row["train_loss"])


def test_a_non_finite_loss_skips_the_step_and_is_counted():
    model = tiny_model()
    ids = stream(20)
    cstar = generate_cstar(model, ids, "cpu")
    poisoned = cstar.clone()
    poisoned[7] = math.nan  # C*[7] is position 7's stability target: its batch's loss is NaN
    result = phase2.train_phase2(model, ids, poisoned, ids, cstar, *all_scored(ids), params(epochs=1, batch_size=64),
                                 seed=0, log=quiet)
    assert result.summary["skipped_steps"] == 1
    assert result.summary["train_tokens_seen"] == 0
    assert result.history[0]["train_loss"] is None and result.history[0]["train_objective"] is None
    reference = tiny_model()
    reference.init_head_(seed=0)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), reference.parameters()))


@pytest.mark.parametrize("context_mode,precision", [("stability", "fp32"), ("replace", "fp32"), ("stability", "bf16")])
def test_training_lowers_validation_loss_and_reports_every_column(context_mode, precision):
    model = tiny_model()
    ids = stream(200)
    cstar = generate_cstar(model, ids, "cpu")
    val_scored, val_target_bytes = labelled(ids[150:])
    p = params(epochs=4, patience=4, lr=0.02, context_mode=context_mode, precision=precision)
    result = phase2.train_phase2(model, ids[:150], cstar[:150], ids[150:], cstar[150:], val_scored, val_target_bytes,
                                 p, seed=0, log=quiet)
    history = result.history
    for key in ("epoch", "train_objective", "train_loss", "train_stability", "train_ppl", "val_objective", "val_loss",
                "val_stability", "val_ppl", "val_acc", "val_correct", "val_predictions", "val_bpb", "seconds"):
        assert all(row[key] is not None for row in history), key
    weight = p.context_stability_weight if context_mode == "stability" else 0.0
    for row in history:
        assert row["val_objective"] == pytest.approx(row["val_loss"] + weight * row["val_stability"])
        assert row["train_objective"] == pytest.approx(row["train_loss"] + weight * row["train_stability"], rel=1e-5)
        assert row["train_ppl"] == pytest.approx(math.exp(row["train_loss"]))
        assert row["val_ppl"] == pytest.approx(math.exp(row["val_loss"]))
        assert row["val_predictions"] == int(val_scored.sum()) < 49  # the scored ones of the 49
    assert history[-1]["val_loss"] < history[0]["val_loss"]
    assert result.summary["best_epoch"] == min(history, key=lambda r: r["val_loss"])["epoch"]
    assert result.summary["train_tokens_seen"] == 4 * 149
    # the model holds the best epoch's weights: counting validation again gives that epoch's numbers
    again = next_token_metrics(phase2.evaluate_fixed(model, ids[150:], cstar[150:], val_scored, val_target_bytes, 13,
                                                     context_mode, precision), prefix="val_")
    best = result.summary["best"]
    assert again["val_loss"] == pytest.approx(best["val_loss"], rel=1e-5)
    assert again["val_bpb"] == pytest.approx(best["val_bpb"], rel=1e-5)
    assert again["correct"] == best["val_correct"]


def test_same_seed_same_numbers():
    runs = []
    for _ in range(2):
        model = tiny_model()
        ids = stream(60)
        cstar = generate_cstar(model, ids, "cpu")
        runs.append(phase2.train_phase2(model, ids, cstar, ids, cstar, *labelled(ids), params(), seed=5,
                                        log=quiet).history)
    strip = [[{k: v for k, v in row.items() if k != "seconds"} for row in run] for run in runs]
    assert strip[0] == strip[1]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_validation_labels_from_a_split_file_work_with_a_model_on_cuda():
    """The stage passes scored/target_bytes as load_split gives them (on the CPU) with the model on the GPU."""
    model = tiny_model().cuda()
    ids = stream(40)
    cstar = torch.randn(40, CONTEXT)
    scored, target_bytes = labelled(ids)
    result = phase2.train_phase2(model, ids, cstar, ids, cstar, scored, target_bytes, params(epochs=1), seed=0,
                                 log=quiet)
    assert result.summary["best"]["val_predictions"] == int(scored.sum())


def test_the_phase2_stage_early_stops_on_validation_and_never_reads_test(tmp_path, monkeypatch):
    """The stage hands train_phase2 the validation split (ids, C*, scored, bytes) and opens no test file."""
    stage = load_stage("phase2")
    splits = {}
    for offset, name in enumerate(("train", "val", "test")):
        ids = stream(40 + 10 * offset, seed=offset + 1)
        scored, target_bytes = labelled(ids)
        splits[name] = SimpleNamespace(ids=ids, scored=scored, target_bytes=target_bytes,
                                       cstar=torch.randn(ids.numel(), CONTEXT))
    opened, calls = [], []

    def load_split(path, tokenizer):
        opened.append(path)
        return splits[Path(path).stem]

    def load_cstar(path, phase1_path):
        opened.append(path)
        return splits[Path(path).stem].cstar

    def spy(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    import cvfp.phase2

    real = cvfp.phase2.train_phase2
    # the stage imports the library inside body(): patch where the names live
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("cvfp.model.load_model", lambda path, name, device: (tiny_model(), {}))
    monkeypatch.setattr("cvfp.data.carve.load_split", load_split)
    monkeypatch.setattr("cvfp.cstar.load_cstar", load_cstar)
    monkeypatch.setattr("cvfp.io.sha256_file", lambda path: "0" * 64)
    monkeypatch.setattr(stage, "log_split", lambda *args, **kwargs: None)  # the fakes are not TokenStreams
    monkeypatch.setattr(cvfp.phase2, "train_phase2", spy)
    run_params = Params.model_validate({"device": "cpu", "phase2": {"epochs": 2, "batch_size": 8, "patience": 2}})
    stage.body(run_params, NoRun())

    assert not [path for path in opened if "test" in path]
    (_, train_ids, train_cstar, val_ids, val_cstar, val_scored, val_target_bytes, *_), = calls
    val = splits["val"]
    assert train_ids is splits["train"].ids and train_cstar is splits["train"].cstar
    assert all(got is want for got, want in zip((val_ids, val_cstar, val_scored, val_target_bytes),
                                                (val.ids, val.cstar, val.scored, val.target_bytes)))
    written = json.loads((tmp_path / "metrics" / "phase2.json").read_text())
    assert written["early_stopping_on"] == "val_loss"
    assert written["best"]["val_predictions"] == int(val.scored.sum())
