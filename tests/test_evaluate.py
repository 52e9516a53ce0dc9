import json
import math

import pytest
import torch

import cvfp.evaluate as evaluate
from cvfp.errors import ArtifactError
from cvfp.io import write_csv
from cvfp.model import CVFPModel, ModelArgs
from cvfp.params import EvaluateParams
from cvfp.scan import exact_scan
from cvfp.plots import evaluation_plots

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return CVFPModel(ModelArgs(vocab_size=30, context_dim=6, embed_dim=4, hidden_dim=10, layer_structure=[1, 1]))


def small_params(**overrides):
    base = dict(batch_size=7, identity_samples=16, num_trials=3, contraction_samples=4, contraction_power_iterations=6,
                effective_rank_samples=0, pairwise_samples=32)
    base.update(overrides)
    return EvaluateParams(**base)


@pytest.fixture
def setup():
    """A final and a Phase-1 model, a val stream, and C* as the Phase-1 model's own scan."""
    final, phase1 = tiny_model(0), tiny_model(1)
    val_ids, train_ids = torch.randint(0, 30, (25,)), torch.randint(0, 30, (40,))
    with torch.no_grad():
        val_cstar, train_cstar = phase1.scan(phase1.embed(val_ids)), phase1.scan(phase1.embed(train_ids))
    return final, phase1, val_ids, train_cstar, val_cstar


def test_evaluate_all_reports_every_key(setup):
    final, phase1, val_ids, train_cstar, val_cstar = setup
    result = evaluate.evaluate_all(final, phase1, "stability", val_ids, 123, train_cstar, val_cstar, small_params(),
                                   seed=0, log=lambda _: None)
    m = result.metrics
    for mode in ("fixed", "free", "gap"):
        assert set(evaluate.NEXT_TOKEN_KEYS) <= set(m[mode])
    for mode in ("fixed", "free"):
        assert m[mode]["predictions"] == 24
        assert m[mode]["val_bpb"] == pytest.approx(m[mode]["total_nats"] / (math.log(2) * 123))
        assert m[mode]["val_ppl"] == pytest.approx(math.exp(m[mode]["val_loss"]))
    assert m["gap"]["val_loss"] == pytest.approx(m["free"]["val_loss"] - m["fixed"]["val_loss"])
    assert m["free"]["total_nats"] == pytest.approx(evaluate.evaluate_free(final, val_ids, exact_scan, 4)["total_nats"])
    for split in ("train", "val"):
        assert m["effective_rank"][split] == m["context_health"][split]["effective_rank"]
        assert m["effective_rank_ratio"][split] == pytest.approx(m["effective_rank"][split] / 6)
    assert {"mean_context_norm", "mean_step_cosine", "passed"} <= set(m["identity"])
    for key in ("convergence_check", "convergence_check_phase1"):
        assert {"final_diff", "slope", "verdict", "trial_mse"} <= set(m[key])
        assert len(m[key]["trial_mse"]) == 2
    for key in ("contraction", "contraction_phase1"):
        assert {"mean", "max", "fraction_above_one"} <= set(m[key])
    assert [row["index"] for row in result.spectrum] == list(range(1, 7))
    json.dumps(evaluate.json_ready(m), allow_nan=False)
    assert result.timing["seconds"] > 0 and all(key.endswith("seconds") for key in result.timing)


def test_phase1_convergence_trial_one_is_cstar(setup, monkeypatch):
    """The Phase-1 model's first trial from zero reproduces C*, so trial 2's MSE is against C* itself."""
    final, phase1, val_ids, train_cstar, val_cstar = setup
    result = evaluate.evaluate_all(final, phase1, "stability", val_ids, 50, train_cstar, val_cstar, small_params(),
                                   seed=0, log=lambda _: None)
    second = phase1.scan(phase1.embed(val_ids), initial=val_cstar[-1])
    expected = float((second - val_cstar).pow(2).mean())
    assert result.metrics["convergence_check_phase1"]["trial_mse"][0] == pytest.approx(expected)


@pytest.mark.parametrize("context_mode", ["stability", "replace"])
def test_fixed_equals_free_when_cstar_is_the_models_own_scan(context_mode):
    # C* = the final model's own trajectory: every fixed-mode step reproduces the free run exactly
    model = tiny_model()
    val_ids = torch.randint(0, 30, (25,))
    with torch.no_grad():
        cstar = model.scan(model.embed(val_ids))
    result = evaluate.evaluate_all(model, model, context_mode, val_ids, 80, cstar, cstar, small_params(), seed=0,
                                   log=lambda _: None)
    m = result.metrics
    assert m["fixed"]["correct"] == m["free"]["correct"]
    assert m["gap"]["val_loss"] == pytest.approx(0.0, abs=1e-5)


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


def test_results_table_has_denominators_and_aligned_columns(setup):
    final, phase1, val_ids, train_cstar, val_cstar = setup
    params = small_params()
    metrics = evaluate.json_ready(evaluate.evaluate_all(final, phase1, "stability", val_ids, 90, train_cstar, val_cstar,
                                                        params, seed=0, log=lambda _: None).metrics)
    table = evaluate.results_table(metrics, params)
    lines = table.splitlines()
    fixed = metrics["fixed"]
    assert f"({fixed['correct']}/24)" in table
    assert f"/6 ({100 * metrics['effective_rank']['val'] / 6:.1f}%)" in table
    assert "/ 90 bytes" in table and "above 1" in table
    value_column = lines[0].index("value")
    assert all(line[value_column - 2:value_column] == "  " for line in lines[2:])
    assert set(lines[1].replace(" ", "")) == {"-"}


def test_table_survives_a_diverged_free_run(setup):
    final, phase1, val_ids, train_cstar, val_cstar = setup
    params = small_params()
    metrics = evaluate.evaluate_all(final, phase1, "stability", val_ids, 90, train_cstar, val_cstar, params, seed=0,
                                    log=lambda _: None).metrics
    metrics["free"]["val_ppl"] = math.inf
    metrics["gap"]["val_ppl"] = math.inf
    ready = evaluate.json_ready(metrics)
    assert ready["free"]["val_ppl"] is None
    assert "n/a" in evaluate.results_table(ready, params)


def test_json_ready_replaces_non_finite():
    assert evaluate.json_ready({"a": [1.0, math.nan], "b": {"c": -math.inf}, "d": "CONVERGED"}) == \
        {"a": [1.0, None], "b": {"c": None}, "d": "CONVERGED"}


def test_context_mode_comes_from_the_checkpoint():
    assert evaluate.context_mode_of({"context_mode": "replace"}, "models/phase2.pt") == "replace"
    with pytest.raises(ArtifactError, match="context_mode"):
        evaluate.context_mode_of({}, "models/phase2.pt")


def test_mismatched_cstar_is_refused(setup):
    final, phase1, val_ids, train_cstar, val_cstar = setup
    with pytest.raises(ArtifactError, match="cstar"):
        evaluate.evaluate_all(final, phase1, "stability", val_ids[:-1], 10, train_cstar, val_cstar, small_params(),
                              seed=0, log=lambda _: None)


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
