import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import cvfp.baselines as baselines
from cvfp.metrics import next_token_metrics
from cvfp.model import CVFPModel, ModelArgs, trainable_parameters
from cvfp.params import BaselinesParams, ModelParams, Params, Phase2Params
from helpers import NoRun, all_scored, labelled, load_stage
from helpers import stream as periodic  # the periodic toy stream, VOCAB = 12 like here

VOCAB = 12
REPO = Path(__file__).resolve().parents[1]
COUNT_KEYS = ("total_nats", "predictions", "correct", "bytes")


def tiny_params(**overrides):
    base = dict(seq_len=8, batch_size=4, patience=2, gru={"layers": 1, "lr": 0.01},
                transformer={"layers": 1, "heads": 2, "ffn_mult": 2, "lr": 0.01})
    base.update(overrides)
    return BaselinesParams.model_validate(base)


def per_prediction(kind, model, ids, seq_len):
    """Logits (N-1, V) of each prediction as the evaluation runs it: the GRU over the whole stream at once,
    the Transformer window by window from scratch."""
    with torch.no_grad():
        if kind == "gru":
            return model(ids[None, :-1])[0][0]
        inputs = ids[:-1]
        return torch.cat([model(inputs[start:start + seq_len][None])[0][0]
                          for start in range(0, inputs.numel(), seq_len)])


def tiny_model(kind, width=8, seed=0, params=None):
    torch.manual_seed(seed)
    return baselines.build(kind, baselines.baseline_args(kind, width, VOCAB, params or tiny_params()))


SECOND_SIZE = (ModelParams(context_dim=32, embed_dim=48, hidden_dim=80, layer_structure=[2, 1]),
               Phase2Params(freeze_embedding=True), 512)


@pytest.mark.parametrize("model_params, phase2_params, vocab", [
    (Params().model, Params().phase2, 1024),  # the default run
    SECOND_SIZE,
])
@pytest.mark.parametrize("kind", baselines.KINDS)
def test_parameters_match_cvfp_phase2_within_ten_percent(model_params, phase2_params, vocab, kind):
    target = baselines.cvfp_trainable_parameters(model_params, phase2_params, vocab)
    real = CVFPModel(ModelArgs.from_params(model_params, vocab))
    assert target == sum(p.numel() for p in real.set_trainable(phase2_params.freeze_context,
                                                          phase2_params.freeze_embedding))
    params = Params().baselines
    width, count = baselines.match_width(kind, target, vocab, params)
    assert abs(count - target) <= 0.10 * target
    built = baselines.build(kind, baselines.baseline_args(kind, width, vocab, params))
    assert trainable_parameters(built) == count  # the meta-device count is the real one
    for other in (width - (params.transformer.heads if kind == "transformer" else 1),):
        if other > 0:  # the chosen width is the closest
            assert abs(baselines.count_for(kind, other, vocab, params) - target) >= abs(count - target)


def test_frozen_context_is_a_smaller_target():
    model = Params().model
    full = baselines.cvfp_trainable_parameters(model, Phase2Params(), 1024)
    head_only = baselines.cvfp_trainable_parameters(model, Phase2Params(freeze_context=True), 1024)
    assert head_only == (model.context_dim + model.embed_dim + 1) * 1024 < full


def test_impossible_match_is_a_clear_error():
    params = Params().baselines  # 4 heads: width >= 4, whose embedding + head alone exceed the target
    with pytest.raises(ValueError, match=r"no transformer width matches CVFP's 900 trainable parameters within 10%"):
        baselines.match_width("transformer", 900, 300, params)


def test_windows_predict_every_position_once():
    ids = torch.arange(20)
    inputs, targets = baselines.windows(ids, 6)
    assert inputs.shape == targets.shape == (4, 6)
    valid = targets != baselines.IGNORE
    assert int(valid.sum()) == 19
    torch.testing.assert_close(inputs[valid], ids[:-1])
    torch.testing.assert_close(targets[valid], ids[1:])


def test_windowed_lays_per_prediction_values_out_like_the_targets():
    ids = torch.arange(20)
    _, targets = baselines.windows(ids, 6)
    laid_out = baselines.windowed(ids[1:] * 10, 6, -1)  # the value of prediction t is 10 x its target ids[t+1]
    assert laid_out.shape == targets.shape == (4, 6)
    valid = targets != baselines.IGNORE
    torch.testing.assert_close(laid_out[valid], targets[valid] * 10)
    assert bool((laid_out[~valid] == -1).all()) and int((~valid).sum()) == 5  # the padding is `fill`
    flags = baselines.windowed(torch.ones(19, dtype=torch.bool), 6, False)
    assert flags.dtype == torch.bool and torch.equal(flags, valid)


def test_gru_validation_carries_its_state_over_the_whole_stream():
    model = tiny_model("gru").eval()
    ids = periodic(50)
    counts = baselines.validation_counts(model, ids, *all_scored(ids), seq_len=8, batch_size=4)
    with torch.no_grad():
        logits, _ = model(ids[None, :-1])  # one pass over the stream
        nats = float(F.cross_entropy(logits[0], ids[1:], reduction="sum"))
    assert counts["predictions"] == 49 and counts["bytes"] == 49
    assert counts["total_nats"] == pytest.approx(nats, rel=1e-5)


@pytest.mark.parametrize("kind", baselines.KINDS)
@pytest.mark.parametrize("batch_size", [1, 3])
def test_validation_counts_the_scored_predictions_with_their_targets_bytes(kind, batch_size):
    """49 predictions in windows of 8 (the last one padded): only the scored ones count, each with its own target's
    bytes; the padding is never counted."""
    model = tiny_model(kind).eval()
    ids = periodic(50, seed=3)
    scored, target_bytes = labelled(ids)
    assert 0 < int(scored.sum()) < 49 and bool((target_bytes[~scored] > 0).any())
    logits = per_prediction(kind, model, ids, 8)
    nats = F.cross_entropy(logits, ids[1:], reduction="none").double()
    got = baselines.validation_counts(model, ids, scored, target_bytes, 8, batch_size)
    assert got["predictions"] == int(scored.sum())
    assert got["total_nats"] == pytest.approx(float(nats[scored].sum()), rel=1e-5)
    assert got["correct"] == int((logits.argmax(-1) == ids[1:])[scored].sum())
    assert got["bytes"] == int(target_bytes[scored].sum())
    # the data tell the rule from the wrong ones: all predictions, all bytes, the bytes of the inputs ids[t]
    assert got["total_nats"] != pytest.approx(float(nats.sum()), rel=1e-3)
    assert got["bytes"] != int(target_bytes.sum())
    assert got["bytes"] != int(torch.cat([torch.tensor([0]), target_bytes[:-1]])[scored].sum())
    every = baselines.validation_counts(model, ids, *all_scored(ids), 8, batch_size)
    assert (every["predictions"], every["bytes"]) == (49, 49)
    assert every["total_nats"] == pytest.approx(float(nats.sum()), rel=1e-5)


def test_transformer_is_causal():
    model = tiny_model("transformer").eval()
    ids = periodic(8)[None]
    changed = ids.clone()
    changed[0, -1] = (changed[0, -1] + 1) % VOCAB
    with torch.no_grad():
        before, after = model(ids)[0], model(changed)[0]
    torch.testing.assert_close(before[0, :-1], after[0, :-1])
    assert not torch.allclose(before[0, -1], after[0, -1])


@pytest.mark.parametrize("kind", baselines.KINDS)
def test_loss_decreases_on_a_tiny_corpus(kind):
    model = tiny_model(kind, width=16)
    train, val = periodic(400, seed=1), periodic(120, seed=2)
    val_scored, val_target_bytes = labelled(val)
    before = baselines.validation_counts(model, val, val_scored, val_target_bytes, 8, 4)
    params = tiny_params(patience=5)
    result = baselines.train_baseline(model, train, val, val_scored, val_target_bytes, params=params, lr=0.01,
                                      budget_tokens=3 * 399, seed=0, name=kind, log=lambda _: None)
    losses = [row["train_loss"] for row in result.history]
    assert len(losses) == 3 and losses[-1] < losses[0]
    best = result.summary["best"]
    assert best["val_loss"] < before["total_nats"] / before["predictions"] - 0.3
    assert result.summary["train_tokens_seen"] == 3 * 399
    assert best["predictions"] == int(val_scored.sum()) < 119  # the scored ones of the 119 predictions
    assert best["bytes"] == int(val_target_bytes[val_scored].sum())
    assert best["val_bpb"] == pytest.approx(best["total_nats"] / math.log(2) / best["bytes"])
    assert best["val_ppl"] == pytest.approx(math.exp(best["val_loss"]))
    assert set(best) == {"train_loss", "val_loss", "val_ppl", "val_acc", "val_bpb", *COUNT_KEYS}
    for row in result.history:
        assert {"epoch", "train_loss", "train_tokens_seen", "val_loss", "val_ppl", "val_acc", "val_bpb", *COUNT_KEYS,
                "skipped_steps", "seconds"} <= set(row)


def test_budget_is_exact_and_best_weights_are_kept():
    model = tiny_model("gru")
    train, val = periodic(100), periodic(40, seed=2)
    val_scored, val_target_bytes = labelled(val)
    result = baselines.train_baseline(model, train, val, val_scored, val_target_bytes, tiny_params(), 0.01,
                                      budget_tokens=150, seed=0, name="gru", log=lambda _: None)
    assert [row["train_tokens_seen"] for row in result.history] == [99, 150]  # a part-epoch at the end
    best = min(result.history, key=lambda row: row["val_loss"])
    assert result.summary["best_epoch"] == best["epoch"]
    again = next_token_metrics(baselines.validation_counts(model, val, val_scored, val_target_bytes, 8, 4), "val_")
    assert again["val_loss"] == pytest.approx(best["val_loss"], rel=1e-6)
    assert again["val_bpb"] == pytest.approx(best["val_bpb"], rel=1e-6)
    assert {k: again[k] for k in ("predictions", "correct", "bytes")} == \
        {k: best[k] for k in ("predictions", "correct", "bytes")}


def test_early_stopping_on_validation_loss():
    model = tiny_model("transformer")
    train, val = periodic(100), torch.randint(0, VOCAB, (60,), generator=torch.Generator().manual_seed(5))
    params = tiny_params(patience=1)  # validation on noise: it stops as soon as val loss fails to improve
    result = baselines.train_baseline(model, train, val, *all_scored(val), params, 0.05, budget_tokens=20 * 99, seed=0,
                                      name="t", log=lambda _: None)
    assert result.summary["stopped_early"]
    assert result.summary["epochs_run"] == result.summary["best_epoch"] + 1 < 20


@pytest.mark.parametrize("kind", baselines.KINDS)
def test_checkpoint_round_trip_with_weights_only(tmp_path, kind):
    model = tiny_model(kind).eval()
    path = tmp_path / f"{kind}.pt"
    baselines.save_baseline(path, kind, model, tokenizer_sha256="abc")
    payload = torch.load(path, weights_only=True)
    assert payload["kind"] == kind and payload["model_args"]["width"] == 8
    loaded, _ = baselines.load_baseline(path)
    ids = periodic(8)[None]
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids)[0], model(ids)[0])


def test_early_stopping_follows_the_scored_validation_loss(monkeypatch):
    """The epoch kept is the one whose validation counts give the lowest loss (nats per scored prediction)."""
    model = tiny_model("gru")
    train, val = periodic(100), periodic(40, seed=2)
    losses = iter([3.0, 2.0, 2.5, 2.6])

    def fake_counts(model, ids, scored, target_bytes, seq_len, batch_size):
        predictions = int(scored.sum())
        return {"total_nats": next(losses) * predictions, "predictions": predictions, "correct": 1,
                "bytes": int(target_bytes[scored].sum())}

    monkeypatch.setattr(baselines, "validation_counts", fake_counts)
    scored, target_bytes = labelled(val)
    result = baselines.train_baseline(model, train, val, scored, target_bytes, tiny_params(patience=2), 0.01,
                                      budget_tokens=10 * 99, seed=0, name="gru", log=lambda _: None)
    summary = result.summary
    assert (summary["best_epoch"], summary["epochs_run"], summary["stopped_early"]) == (2, 4, True)
    assert summary["best"]["val_loss"] == pytest.approx(2.0)
    assert summary["best"]["predictions"] == int(scored.sum())
    assert summary["best"]["val_bpb"] == pytest.approx(2.0 * int(scored.sum()) / math.log(2) /
                                                       int(target_bytes[scored].sum()))


def test_the_stage_early_stops_on_validation_and_scores_test_once_with_the_kept_weights(tmp_path, monkeypatch):
    stage = load_stage("baselines")
    splits = {}
    for offset, name in enumerate(("train", "val", "test")):
        ids = periodic((120, 41, 53)[offset], seed=offset + 1)
        scored, target_bytes = labelled(ids)
        splits[name] = SimpleNamespace(ids=ids, scored=scored, target_bytes=target_bytes, vocab_size=VOCAB)
    events, training = [], []
    real_train, real_counts = baselines.train_baseline, baselines.validation_counts

    def counted(model, ids, *args):  # during training: train_baseline's counts; after: the stage's own
        events.append(("validation" if training else "stage", ids))
        return real_counts(model, ids, *args)

    def train(model, train_ids, val_ids, val_scored, val_target_bytes, *args, **kwargs):
        events.append(("train", (train_ids, val_ids, val_scored, val_target_bytes)))
        training.append(True)
        try:
            return real_train(model, train_ids, val_ids, val_scored, val_target_bytes, *args, **kwargs)
        finally:
            training.pop()

    # the stage imports the library inside body(): patch where the names live
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("cvfp.data.carve.load_split", lambda path, tokenizer: splits[Path(path).stem])
    monkeypatch.setattr("cvfp.io.sha256_file", lambda path: "0" * 64)
    monkeypatch.setattr(stage, "log_split", lambda *args, **kwargs: None)  # the fakes are not TokenStreams
    monkeypatch.setattr(baselines, "train_baseline", train)
    monkeypatch.setattr(baselines, "validation_counts", counted)
    params = Params.model_validate({
        "device": "cpu", "model": {"context_dim": 8, "embed_dim": 8, "hidden_dim": 16, "layer_structure": [1, 1]},
        "phase2": {"epochs": 2},
        "baselines": {"seq_len": 8, "batch_size": 4, "transformer": {"layers": 1, "heads": 1}}})
    stage.body(params, NoRun())

    train_split, val, test = splits["train"], splits["val"], splits["test"]
    assert [kind for kind, _ in events if kind != "validation"] == ["train", "stage"] * len(baselines.KINDS)
    for kind, payload in events:
        if kind == "train":
            assert all(got is want for got, want in zip(payload, (train_split.ids, val.ids, val.scored,
                                                                  val.target_bytes)))
        elif kind == "validation":  # early stopping and the best epoch: validation only
            assert payload is val.ids
        else:
            assert payload is test.ids
    written = json.loads((tmp_path / "metrics" / "baselines.json").read_text())
    assert "val_bytes" not in written
    for kind in baselines.KINDS:
        summary = written[kind]
        assert set(summary["test"]) == {"loss", "ppl", "acc", "bpb", *COUNT_KEYS}
        assert summary["test"]["predictions"] == int(test.scored.sum())
        assert summary["test"]["bytes"] == int(test.target_bytes[test.scored].sum())
        assert summary["best"]["predictions"] == int(val.scored.sum())
        model, _ = baselines.load_baseline(tmp_path / "models" / f"{kind}.pt")  # the weights validation kept
        seq_len, batch_size = params.baselines.seq_len, params.baselines.batch_size
        again = next_token_metrics(real_counts(model, test.ids, test.scored, test.target_bytes, seq_len, batch_size))
        assert summary["test"]["loss"] == pytest.approx(again["loss"], rel=1e-6)
        assert summary["test"]["bpb"] == pytest.approx(again["bpb"], rel=1e-6)
        kept = next_token_metrics(real_counts(model, val.ids, val.scored, val.target_bytes, seq_len, batch_size))
        assert summary["best"]["val_loss"] == pytest.approx(kept["loss"], rel=1e-6)
