import json
import math

import pytest
import torch
import torch.nn.functional as F

import cvfp.evaluate as evaluate
from cvfp.errors import ArtifactError
from cvfp.io import write_csv
from cvfp.metrics import next_token_metrics
from cvfp.params import EvaluateParams
from cvfp.phase2 import evaluate_fixed
from cvfp.scan import exact_scan
from cvfp.plots import evaluation_plots
from helpers import all_scored
from helpers import tiny_model as make_model

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
VOCAB = 30
TEST_TOKENS, VAL_TOKENS = 31, 25  # different lengths: a swapped split shows in every count


def tiny_model(seed=0):
    return make_model(seed, vocab_size=VOCAB, context_dim=6, embed_dim=4, layer_structure=[1, 1])


def small_params(**overrides):
    base = dict(batch_size=7, identity_samples=16, num_trials=3, contraction_samples=4, contraction_power_iterations=6,
                effective_rank_samples=0, pairwise_samples=32)
    base.update(overrides)
    return EvaluateParams(**base)


def labels(ids):
    """scored and target_bytes of ids' N-1 predictions: targets below 3 are markers (0 bytes, not scored), targets
    3, 10, 17, 24 stand for ids unseen in train (bytes, not scored), the rest score with 1 + id % 4 bytes."""
    targets = ids[1:]
    target_bytes = torch.where(targets < 3, 0, 1 + targets % 4).long()
    return (targets >= 3) & (targets % 7 != 3), target_bytes


def held_out_split(model, ids, labelled=True):
    """A HeldOut of `ids` with C* as `model`'s own scan."""
    with torch.no_grad():
        cstar = model.scan(model.embed(ids))
    return evaluate.HeldOut(ids, cstar, *(labels(ids) if labelled else all_scored(ids)))


@pytest.fixture
def setup():
    """A final and a Phase-1 model, test and val splits with C* as the Phase-1 model's own scan, train ids and C*."""
    final, phase1 = tiny_model(0), tiny_model(1)
    generator = torch.Generator().manual_seed(0)
    test_ids, val_ids, train_ids = (torch.randint(0, VOCAB, (n,), generator=generator)
                                    for n in (TEST_TOKENS, VAL_TOKENS, 40))
    held_out = {"test": held_out_split(phase1, test_ids), "val": held_out_split(phase1, val_ids)}
    with torch.no_grad():
        train_cstar = phase1.scan(phase1.embed(train_ids))
    return final, phase1, held_out, (train_ids, train_cstar)


def run(final, phase1, held_out, train, context_mode="stability", params=None):
    """evaluate_all on these splits; `train` is (train ids, train C*)."""
    return evaluate.evaluate_all(final, phase1, context_mode, held_out, *train, params or small_params(), seed=0,
                                 log=lambda _: None)


def test_evaluate_all_reports_every_key(setup):
    final, phase1, held_out, train = setup
    result = run(final, phase1, held_out, train)
    m = result.metrics
    assert {"context_mode", "context_dim", "test", "val", "context_health", "effective_rank", "effective_rank_ratio",
            "identity", "identity_phase1", "convergence_check", "convergence_check_phase1", "contraction",
            "contraction_phase1"} <= set(m)
    assert not {"val_bytes", "fixed", "free", "gap"} & set(m)  # the layout before the test split
    for name, split in held_out.items():
        predictions, num_bytes = int(split.scored.sum()), int(split.target_bytes[split.scored].sum())
        assert 0 < predictions < split.ids.numel() - 1
        assert set(m[name]) == {"fixed", "free", "gap"}
        assert set(m[name]["gap"]) == set(evaluate.NEXT_TOKEN_KEYS)
        for mode in ("fixed", "free"):
            got = m[name][mode]
            assert set(evaluate.NEXT_TOKEN_KEYS) | {"total_nats", "predictions", "correct", "bytes"} <= set(got)
            assert (got["predictions"], got["bytes"]) == (predictions, num_bytes), (name, mode)
            assert got["loss"] == pytest.approx(got["total_nats"] / predictions)
            assert got["bpb"] == pytest.approx(got["total_nats"] / (math.log(2) * num_bytes))
            assert got["ppl"] == pytest.approx(math.exp(got["loss"]))
            assert got["acc"] == pytest.approx(got["correct"] / predictions)
        for key in evaluate.NEXT_TOKEN_KEYS:
            assert m[name]["gap"][key] == pytest.approx(m[name]["free"][key] - m[name]["fixed"][key])
        assert "stability_mse" in m[name]["fixed"]
        free = evaluate.evaluate_free(final, split.ids, split.scored, split.target_bytes, exact_scan, 4)
        assert m[name]["free"]["total_nats"] == pytest.approx(free["total_nats"])
    for split in ("train", "val"):
        assert m["effective_rank"][split] == m["context_health"][split]["effective_rank"]
        assert m["effective_rank_ratio"][split] == pytest.approx(m["effective_rank"][split] / 6)
    for key in ("identity", "identity_phase1"):
        assert {"mean_context_norm", "mean_step_cosine", "passed"} <= set(m[key])
    for key in ("convergence_check", "convergence_check_phase1"):
        assert {"final_diff", "slope", "verdict", "trial_mse"} <= set(m[key])
        assert len(m[key]["trial_mse"]) == 2
    for key in ("contraction", "contraction_phase1"):
        assert {"mean", "max", "fraction_above_one"} <= set(m[key])
    assert [row["index"] for row in result.spectrum] == list(range(1, 7))
    json.dumps(evaluate.json_ready(m), allow_nan=False)
    assert result.timing["seconds"] > 0 and all(key.endswith("seconds") for key in result.timing)


@pytest.mark.parametrize("context_mode", ["stability", "replace"])
def test_each_split_is_scored_on_its_own_tokens(setup, context_mode):
    """eval.json's test numbers are the test split's and its val numbers the val split's (never swapped or mixed)."""
    final, phase1, held_out, train = setup
    m = run(final, phase1, held_out, train, context_mode).metrics
    for name, split in held_out.items():
        fixed = evaluate_fixed(final, split.ids, split.cstar, split.scored, split.target_bytes, 5, context_mode)
        free = evaluate.evaluate_free(final, split.ids, split.scored, split.target_bytes, exact_scan, 5)
        for mode, counts in (("fixed", fixed), ("free", free)):
            expected = next_token_metrics(counts)
            for key in ("total_nats", "loss", "bpb"):
                assert m[name][mode][key] == pytest.approx(expected[key], rel=1e-6), (name, mode, key)
            for key in ("predictions", "correct", "bytes"):
                assert m[name][mode][key] == expected[key], (name, mode, key)
        assert m[name]["fixed"]["stability_mse"] == pytest.approx(fixed["stability_mse"], rel=1e-6)
    assert m["test"]["fixed"]["predictions"] != m["val"]["fixed"]["predictions"]


@pytest.mark.parametrize("batch_size", [1, 4, 100])
def test_head_counts_count_the_scored_predictions_with_their_targets_bytes(batch_size):
    model = tiny_model()
    ids = torch.randint(0, VOCAB, (23,), generator=torch.Generator().manual_seed(2))
    scored, target_bytes = labels(ids)
    with torch.no_grad():
        contexts, token_outs = model.scan(model.embed(ids), with_token_out=True)
        logits = model.logits(contexts[:-1], token_outs[:-1])
    nats = F.cross_entropy(logits, ids[1:], reduction="none").double()
    assert bool((target_bytes[~scored] > 0).any()) and bool((target_bytes[~scored] == 0).any())  # both kinds
    got = evaluate.head_counts(model, contexts, token_outs, ids, scored, target_bytes, batch_size)
    assert got["predictions"] == int(scored.sum())
    assert got["total_nats"] == pytest.approx(float(nats[scored].sum()), rel=1e-6)
    assert got["correct"] == int((logits.argmax(-1) == ids[1:])[scored].sum())
    assert got["bytes"] == int(target_bytes[scored].sum())
    # the data tell the rule from the wrong ones: all predictions, all bytes, or the bytes of the inputs
    assert got["total_nats"] != pytest.approx(float(nats.sum()), rel=1e-3)
    assert got["bytes"] != int(target_bytes.sum())
    assert got["bytes"] != int(torch.cat([torch.tensor([0]), target_bytes[:-1]])[scored].sum())
    every = evaluate.head_counts(model, contexts, token_outs, ids, *all_scored(ids), batch_size)
    assert (every["predictions"], every["bytes"]) == (22, 22)
    assert every["total_nats"] == pytest.approx(float(nats.sum()), rel=1e-6)


def test_free_running_scores_all_predictions_but_counts_only_the_scored(setup):
    """Unscored predictions still run through the scan (the contexts after them are the same), they are just not
    counted: scoring fewer predictions leaves the scored ones' nats unchanged."""
    final, _, held_out, _ = setup
    split = held_out["val"]
    every = evaluate.evaluate_free(final, split.ids, *all_scored(split.ids), exact_scan, 4)
    some = evaluate.evaluate_free(final, split.ids, split.scored, split.target_bytes, exact_scan, 4)
    rest = evaluate.evaluate_free(final, split.ids, ~split.scored, split.target_bytes, exact_scan, 4)
    assert some["predictions"] + rest["predictions"] == every["predictions"] == VAL_TOKENS - 1
    assert some["total_nats"] + rest["total_nats"] == pytest.approx(every["total_nats"], rel=1e-6)
    assert some["correct"] + rest["correct"] == every["correct"]
    assert some["bytes"] + rest["bytes"] == int(split.target_bytes.sum())


def test_phase1_convergence_trial_one_is_cstar(setup):
    """The Phase-1 model's first trial from zero reproduces val C*, so trial 2's MSE is against C* itself."""
    final, phase1, held_out, train = setup
    result = run(final, phase1, held_out, train)
    val = held_out["val"]
    second = phase1.scan(phase1.embed(val.ids), initial=val.cstar[-1])
    expected = float((second - val.cstar).pow(2).mean())
    assert result.metrics["convergence_check_phase1"]["trial_mse"][0] == pytest.approx(expected)


@pytest.mark.parametrize("context_mode", ["stability", "replace"])
def test_fixed_equals_free_when_cstar_is_the_models_own_scan(context_mode):
    # C* = the final model's own trajectory: every fixed-mode step reproduces the free run exactly
    model = tiny_model()
    generator = torch.Generator().manual_seed(3)
    held_out = {name: held_out_split(model, torch.randint(0, VOCAB, (n,), generator=generator))
                for name, n in (("test", TEST_TOKENS), ("val", VAL_TOKENS))}
    m = run(model, model, held_out, (held_out["val"].ids, held_out["val"].cstar), context_mode).metrics
    for name in ("test", "val"):
        assert m[name]["fixed"]["correct"] == m[name]["free"]["correct"]
        assert m[name]["gap"]["loss"] == pytest.approx(0.0, abs=1e-5)
        assert m[name]["gap"]["bpb"] == pytest.approx(0.0, abs=1e-5)


def test_default_scan_fn_matches_model_scan():
    model = tiny_model()
    embeddings = model.embed(torch.randint(0, 30, (12,))).detach()
    contexts, token_outs = evaluate.default_scan_fn()(model, embeddings, with_token_out=True)
    ref_contexts, ref_token_outs = model.scan(embeddings, with_token_out=True)
    torch.testing.assert_close(contexts, ref_contexts)
    torch.testing.assert_close(token_outs, ref_token_outs)
    initial = torch.randn(6)
    torch.testing.assert_close(evaluate.default_scan_fn()(model, embeddings, initial=initial),
                               model.scan(embeddings, initial=initial))


def test_results_table_leads_with_test_has_denominators_and_aligned_columns(setup):
    final, phase1, held_out, train = setup
    params = small_params()
    metrics = evaluate.json_ready(run(final, phase1, held_out, train, params=params).metrics)
    table = evaluate.results_table(metrics, params)
    lines = table.splitlines()
    quantities = [line.split("  ")[0] for line in lines[2:]]
    first_val = next(i for i, q in enumerate(quantities) if q.startswith("val "))
    assert quantities[0].startswith("test ") and all(q.startswith("test ") for q in quantities[:first_val])
    assert not any(q.startswith("test ") for q in quantities[first_val:])
    for name in ("test", "val"):
        fixed = metrics[name]["fixed"]
        predictions = int(held_out[name].scored.sum())
        assert f"({fixed['correct']}/{predictions})" in table
        assert f"/ {fixed['bytes']} bytes of {predictions} scored predictions" in table
    assert "CE nats/prediction" in table
    assert f"/6 ({100 * metrics['effective_rank']['val'] / 6:.1f}%)" in table
    assert "above 1" in table
    for label in ("final", "phase1"):
        assert f"identity-mapping check, {label} model" in table
    value_column = lines[0].index("value")
    assert all(line[value_column - 2:value_column] == "  " for line in lines[2:])
    assert set(lines[1].replace(" ", "")) == {"-"}


def test_table_survives_a_diverged_free_run(setup):
    final, phase1, held_out, train = setup
    params = small_params()
    metrics = run(final, phase1, held_out, train, params=params).metrics
    metrics["test"]["free"].update(loss=math.inf, ppl=None, bpb=math.inf)
    metrics["test"]["gap"].update(loss=math.inf, ppl=None, bpb=math.nan)
    ready = evaluate.json_ready(metrics)
    assert ready["test"]["free"]["loss"] is None and ready["test"]["gap"]["bpb"] is None
    json.dumps(ready, allow_nan=False)
    assert "n/a" in evaluate.results_table(ready, params)


def test_json_ready_replaces_non_finite():
    assert evaluate.json_ready({"a": [1.0, math.nan], "b": {"c": -math.inf}, "d": "CONVERGED"}) == \
        {"a": [1.0, None], "b": {"c": None}, "d": "CONVERGED"}


def test_context_mode_comes_from_the_checkpoint():
    assert evaluate.context_mode_of({"context_mode": "replace"}, "models/phase2.pt") == "replace"
    with pytest.raises(ArtifactError, match="context_mode"):
        evaluate.context_mode_of({}, "models/phase2.pt")


@pytest.mark.parametrize("name", ["test", "val"])
def test_mismatched_cstar_is_refused(setup, name):
    final, phase1, held_out, train = setup
    split = held_out[name]
    held_out[name] = evaluate.HeldOut(split.ids[:-1], split.cstar, split.scored[:-1], split.target_bytes[:-1])
    with pytest.raises(ArtifactError, match=rf"{name} C\* has {split.ids.numel()} contexts .*'cstar' stage"):
        run(final, phase1, held_out, train)


def test_spectrum_csv_and_plots(tmp_path):
    train, val = torch.tensor([0.6, 0.3, 0.1], dtype=torch.float64), torch.tensor([0.7, 0.3], dtype=torch.float64)
    rows = evaluate.spectrum_rows(train, val)
    write_csv(tmp_path / "spectrum.csv", rows)
    lines = (tmp_path / "spectrum.csv").read_text().splitlines()
    assert lines[0] == "index,train,val" and lines[3] == "3,0.1,"
    phase1_csv = tmp_path / "phase1_iterations.csv"
    phase1_csv.write_text("iteration,train_effective_rank,val_effective_rank,train_convergence_rate\n"
                          "0,3.0,2.5,\n1,3.5,2.7,0.4\n2,3.9,2.9,0.8\n")
    folder = tmp_path / "plots"
    written = evaluation_plots(folder, rows, {"phase1": [1e-2, 1e-4], "final": [0.0, 0.0]}, phase1_csv,
                               tmp_path / "missing_phase2_epochs.csv")
    assert sorted(p.name for p in written) == ["convergence_check.png", "phase1_iterations.png", "spectrum.png"]
    for path in written:
        assert path.read_bytes()[:8] == PNG_MAGIC
    epochs_csv = tmp_path / "phase2_epochs.csv"
    epochs_csv.write_text("epoch,train_loss,val_loss,val_acc\n1,5.0,5.2,0.1\n2,4.0,4.5,0.2\n")
    written = evaluation_plots(folder, rows, {}, phase1_csv, epochs_csv)
    assert (folder / "phase2_epochs.png").read_bytes()[:8] == PNG_MAGIC
