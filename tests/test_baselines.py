import pytest
import torch

import cvfp.baselines as baselines
from cvfp.model import CVFPModel, ModelArgs
from cvfp.params import BaselinesParams, ModelParams, Params, Phase2Params
from cvfp.model import trainable_parameters

VOCAB = 12


def tiny_params(**overrides):
    base = dict(seq_len=8, batch_size=4, patience=2, gru={"layers": 1, "lr": 0.01},
                transformer={"layers": 1, "heads": 2, "ffn_mult": 2, "lr": 0.01})
    base.update(overrides)
    return BaselinesParams.model_validate(base)


def periodic(length, seed=1):
    """A learnable stream: a period-5 pattern with 10% noise."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.arange(length) % 5
    noise = torch.rand(length, generator=generator) < 0.1
    return torch.where(noise, torch.randint(0, VOCAB, (length,), generator=generator), ids)


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


def test_gru_validation_carries_its_state_over_the_whole_stream():
    model = tiny_model("gru").eval()
    ids = periodic(50)
    counts = baselines.validation_counts(model, ids, seq_len=8, batch_size=4)
    with torch.no_grad():
        logits, _ = model(ids[None, :-1])  # one pass over the stream
        nats = float(torch.nn.functional.cross_entropy(logits[0], ids[1:], reduction="sum"))
    assert counts["predictions"] == 49
    assert counts["total_nats"] == pytest.approx(nats, rel=1e-5)


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
    before = baselines.validation_counts(model, val, 8, 4)
    params = tiny_params(patience=5)
    result = baselines.train_baseline(model, train, val, val_bytes=200, params=params, lr=0.01,
                                      budget_tokens=3 * 399, seed=0, name=kind, log=lambda _: None)
    losses = [row["train_loss"] for row in result.history]
    assert len(losses) == 3 and losses[-1] < losses[0]
    assert result.summary["best"]["val_loss"] < before["total_nats"] / before["predictions"] - 0.3
    assert result.summary["train_tokens_seen"] == 3 * 399
    assert result.summary["best"]["predictions"] == 119  # every validation position predicted once


def test_budget_is_exact_and_best_weights_are_kept():
    model = tiny_model("gru")
    train, val = periodic(100), periodic(40, seed=2)
    result = baselines.train_baseline(model, train, val, 50, tiny_params(), 0.01, budget_tokens=150, seed=0,
                                      name="gru", log=lambda _: None)
    assert [row["train_tokens_seen"] for row in result.history] == [99, 150]  # a part-epoch at the end
    best = min(result.history, key=lambda row: row["val_loss"])
    assert result.summary["best_epoch"] == best["epoch"]
    again = baselines.validation_counts(model, val, 8, 4)
    assert again["total_nats"] / again["predictions"] == pytest.approx(best["val_loss"], rel=1e-6)


def test_early_stopping_on_validation_loss():
    model = tiny_model("transformer")
    train, val = periodic(100), torch.randint(0, VOCAB, (60,), generator=torch.Generator().manual_seed(5))
    params = tiny_params(patience=1)  # validation on noise: it stops as soon as val loss fails to improve
    result = baselines.train_baseline(model, train, val, 50, params, 0.05, budget_tokens=20 * 99, seed=0,
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

