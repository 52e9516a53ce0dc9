"""CVFP against the baselines: one table from the same counts, training seconds, validation prompts, samples."""

import json
import math

import pytest
import torch
from conftest import toy_documents, write_params
from helpers import tiny_model

import cvfp.baselines as baselines
import cvfp.compare as compare
from cvfp.cli import report
from cvfp.data.cache import encode_documents
from cvfp.data.tokenizer import train_tokenizer
from cvfp.errors import StageError
from cvfp.evaluate import HeldOut, evaluate_all, evaluate_free, json_ready
from cvfp.metrics import next_token_metrics
from cvfp.params import EvaluateParams, Params
from cvfp.scan import exact_scan

TEST_BYTES = 1000
MODEL_KEYS = {"loss", "ppl", "acc", "bpb", "total_nats", "predictions", "correct", "bytes", "trainable_parameters",
              "train_tokens_seen"}


def counts(nats, correct, predictions=99, num_bytes=TEST_BYTES):
    return {"total_nats": nats, "predictions": predictions, "correct": correct, "bytes": num_bytes}


def inputs(**changes):
    # validation numbers (eval.json's "val", baselines.json's "best") differ from test's everywhere: none is read
    evaluation = {"test": {"fixed": next_token_metrics(counts(400.0, 20)), "free": next_token_metrics(counts(420.0, 18))},
                  "val": {"fixed": next_token_metrics(counts(10.0, 1, 7, 30)),
                          "free": next_token_metrics(counts(11.0, 1, 7, 30))}}
    phase1 = {"iterations": 10, "train": {"tokens": 500}}
    phase2 = {"trainable_parameters": 1000, "train_tokens_seen": 4990,
              "best": next_token_metrics(counts(12.0, 1, 7, 30), prefix="val_")}
    base = {kind: {"test": next_token_metrics(counts(380.0 + i, 25)), "trainable_parameters": 1040 + i,
                   "train_tokens_seen": 4990, "best": next_token_metrics(counts(1.0 + i, 5, 7 + i, 31), prefix="val_")}
            for i, kind in enumerate(baselines.KINDS)}
    base["budget_tokens"] = 4990
    tree = {"evaluation": evaluation, "phase1": phase1, "phase2": phase2, "baselines": base}
    for key, value in changes.items():
        tree[key] = value
    return tree


def test_comparison_has_every_model_and_quantity():
    result = compare.comparison(**inputs())
    assert set(result) == {"split", "models", "test_predictions", "test_bytes", "parameter_ratio", "phase1_iterations",
                           "phase1_train_tokens", "best_test_bpb"}
    assert result["split"] == "test"
    assert list(result["models"]) == list(compare.ROWS)
    for row in result["models"].values():
        assert set(row) == MODEL_KEYS
    assert (result["test_predictions"], result["test_bytes"]) == (99, TEST_BYTES)
    assert result["best_test_bpb"] == "gru"
    assert result["models"]["gru"]["bpb"] == pytest.approx(380.0 / math.log(2) / TEST_BYTES)
    assert result["models"]["cvfp_free"]["loss"] == pytest.approx(420.0 / 99)
    assert result["parameter_ratio"]["gru"] == pytest.approx(1.04)
    json.dumps(result, allow_nan=False)


def test_the_comparison_reads_test_not_validation():
    """Changing every validation number changes nothing; changing a test count changes that model's row."""
    tree = inputs()
    before = compare.comparison(**tree)
    tree["evaluation"]["val"] = {"fixed": next_token_metrics(counts(1.0, 90)), "free": next_token_metrics(counts(1.0, 90))}
    for kind in baselines.KINDS:
        tree["baselines"][kind]["best"] = next_token_metrics(counts(1.0, 90), prefix="val_")
    assert compare.comparison(**tree) == before
    tree["baselines"]["transformer"]["test"] = next_token_metrics(counts(300.0, 25))
    after = compare.comparison(**tree)
    assert after["models"]["transformer"]["loss"] == pytest.approx(300.0 / 99)
    assert after["best_test_bpb"] == "transformer"


@pytest.mark.parametrize("model", ["cvfp_fixed", "cvfp_free", "gru", "transformer"])
@pytest.mark.parametrize("changed", [{"predictions": 98}, {"bytes": TEST_BYTES + 1}, {"predictions": 98, "bytes": 990}])
def test_other_test_predictions_are_refused(model, changed):
    """Any model scored on other test predictions (a count or a byte total that differs) stops the stage."""
    tree = inputs()
    source = tree["evaluation"]["test"][model.split("_")[1]] if model.startswith("cvfp") else \
        tree["baselines"][model]["test"]
    source.update(changed)
    with pytest.raises(StageError, match=r"different predictions .*rerun the stale stage"):
        compare.comparison(**tree)


def test_bits_per_byte_is_one_function_for_every_model():
    """Uniform predictions give every model the same nats, hence the same bits per byte on the same scored
    predictions: scored x ln V / (ln 2 x their targets' bytes); unscored predictions count on neither side."""
    vocab, ids = 16, torch.randint(0, 16, (41,), generator=torch.Generator().manual_seed(0))
    targets = ids[1:]
    scored = (targets != 0) & (targets % 5 != 1)  # 0: a marker; 1, 6, 11: ids unseen in train
    target_bytes = torch.where(targets == 0, 0, 1 + targets % 4).long()
    predictions, num_bytes = int(scored.sum()), int(target_bytes[scored].sum())
    assert 0 < predictions < 40 and num_bytes < int(target_bytes.sum())
    cvfp = tiny_model(0, vocab_size=vocab, context_dim=4, embed_dim=4, layer_structure=[1])
    cvfp.zero_head_()
    found = {"cvfp": evaluate_free(cvfp, ids, scored, target_bytes, exact_scan, 4096)}
    for kind in baselines.KINDS:
        params = Params().baselines.model_copy(update={"seq_len": 8})
        model = baselines.build(kind, baselines.baseline_args(kind, 8, vocab, params))
        torch.nn.init.zeros_(model.head.weight)
        torch.nn.init.zeros_(model.head.bias)
        found[kind] = baselines.validation_counts(model, ids, scored, target_bytes, 8, 3)
    expected = predictions * math.log(vocab) / (math.log(2) * num_bytes)
    for name, found_counts in found.items():
        assert (found_counts["predictions"], found_counts["bytes"]) == (predictions, num_bytes), name
        assert next_token_metrics(found_counts)["bpb"] == pytest.approx(expected, rel=1e-6), name
    # the table recomputes every row's numbers from its counts with that one function
    tree = inputs()
    tree["evaluation"]["test"]["free"]["bpb"] = 123.0  # a stale derived number is not trusted
    assert compare.comparison(**tree)["models"]["cvfp_free"]["bpb"] == pytest.approx(
        next_token_metrics(counts(420.0, 18))["bpb"])


def test_table_lists_all_models_and_where_seconds_come_from(tmp_path):
    result = compare.comparison(**inputs())
    (tmp_path / "phase1.json").write_text(json.dumps({"seconds": 1.0}))
    (tmp_path / "cstar.json").write_text(json.dumps({"train_seconds": 0.5, "val_seconds": 9.0}))
    (tmp_path / "phase2.json").write_text(json.dumps({"seconds": 2.0}))
    (tmp_path / "baselines.json").write_text(json.dumps({"gru_seconds": 4.0, "transformer_seconds": 5.0}))
    seconds = compare.training_seconds(tmp_path)
    assert seconds == {"cvfp_fixed": 3.5, "cvfp_free": 3.5, "gru": 4.0, "transformer": 5.0}
    table = compare.comparison_table(result, seconds)
    for label in compare.LABELS.values():
        assert label in table
    assert "20.2% (20/99)" in table and "metrics/timing/" in table
    header = [cell.strip() for cell in table.splitlines()[0].strip("|").split("|")]
    assert header[:5] == ["model", "test bits/byte", "test loss", "test ppl", "test accuracy"]  # led by test bpb
    assert "val" not in table.splitlines()[0]
    assert "the same 99 scored next-token predictions" in table and f"{TEST_BYTES} UTF-8 bytes" in table
    assert "n/a" in compare.comparison_table(result, compare.training_seconds(tmp_path / "missing"))


def test_validation_prompts_are_user_turns_with_a_reply():
    documents = toy_documents()
    documents.insert(0, {"messages": [{"role": "user", "content": "nobody answers"}]})
    tokenizer = train_tokenizer(documents, vocab_size=300, min_frequency=2)
    stream = encode_documents(documents, tokenizer, "sha")
    prompts = compare.validation_prompts(stream, tokenizer, 3)
    assert [p["document"] for p in prompts] == [1, 7, 12]  # evenly spaced over the answered documents
    assert prompts[0]["prompt"] == "hello there number 0, how are you doing today?"
    assert prompts[0]["reference"].startswith("I am doing fine")
    text = compare.samples_markdown([{**p, "cvfp": "a", "gru": "", "transformer": "line\nbreak"} for p in prompts],
                                    "settings")
    assert "**gru:** `(empty)`" in text and "line \u23ce break" in text


def small_evaluation():
    """eval.json of a real evaluate_all run on tiny models and splits."""
    final, phase1 = tiny_model(0), tiny_model(1)
    generator = torch.Generator().manual_seed(0)
    held_out = {}
    for name, n in (("test", 21), ("val", 17)):
        ids = torch.randint(0, 40, (n,), generator=generator)
        with torch.no_grad():
            cstar = phase1.scan(phase1.embed(ids))
        held_out[name] = HeldOut(ids, cstar, ids[1:] > 3, torch.ones(n - 1, dtype=torch.int64))
    params = EvaluateParams(batch_size=8, identity_samples=8, num_trials=3, contraction_samples=2,
                            contraction_power_iterations=4, effective_rank_samples=0, pairwise_samples=8)
    return json_ready(evaluate_all(final, phase1, "stability", held_out, held_out["val"].ids, held_out["val"].cstar,
                                   params, seed=0, log=lambda _: None).metrics)


def test_report_leads_with_the_test_comparison(tmp_path, capsys):
    data = {"vocab_size": 300, "unseen_policy": "score_seen"}
    for split, (tokens, docs, num_bytes) in {"train": (500, 5, 2000), "val": (100, 2, 400),
                                             "test": (120, 2, 480)}.items():
        data.update({f"{split}_tokens": tokens, f"{split}_docs": docs, f"{split}_bytes": num_bytes})
    for split, (predictions, scored, scored_bytes, unseen, coverage) in {"val": (99, 90, 380, 4, 0.96),
                                                                         "test": (119, 110, 460, 3, 0.97)}.items():
        data.update({f"{split}_predictions": predictions, f"{split}_scored_predictions": scored,
                     f"{split}_scored_bytes": scored_bytes, f"{split}_unscored_unseen": unseen,
                     f"{split}_predictions_before_policy": predictions, f"{split}_coverage": coverage})
    (tmp_path / "data.json").write_text(json.dumps(data))
    (tmp_path / "compare.json").write_text(json.dumps(compare.comparison(**inputs())))
    phase2 = {"context_mode": "stability", "best_epoch": 2, "epochs_run": 3, "early_stopping_on": "val_loss",
              "best": {"val_loss": 4.5, "val_objective": 4.75, "val_correct": 9, "val_predictions": 90,
                       "val_bpb": 2.25}}
    (tmp_path / "phase2.json").write_text(json.dumps(phase2))
    (tmp_path / "eval.json").write_text(json.dumps(small_evaluation()))
    write_params(tmp_path / "params.yaml", {})
    assert report(tmp_path, tmp_path / "params.yaml") == 0
    out = capsys.readouterr().out
    assert "CVFP free-running" in out and "Transformer" in out and "test bits/byte" in out
    lines = out.splitlines()
    heading = next(i for i, line in enumerate(lines) if "on the held-out test split" in line)
    data_line = lines.index("data")
    assert heading == 0 and heading < data_line  # the comparison comes first
    assert "  test: 120 tokens / 2 docs / 480 bytes; scored predictions 92.4% (110/119) (460 bytes)" in lines
    assert "  val: 100 tokens / 2 docs / 400 bytes; scored predictions 90.9% (90/99) (380 bytes)" in lines
    assert any(line.startswith("  test: unscored because of ids unseen in train: 2.5% (3/119)") for line in lines)
    phase2_line = next(line for line in lines if line.startswith("phase2 (stability)"))
    assert "by val loss" in phase2_line and "val loss 4.5000 (objective 4.7500)" in phase2_line
    table_start = next(i for i, line in enumerate(lines) if line.startswith("quantity"))
    rows = [line for line in lines[table_start + 2:] if line.strip()]
    assert rows[0].startswith("test loss, fixed") and data_line < table_start


def test_report_reads_data_without_the_optional_keys(tmp_path, capsys):
    data = {f"{split}_{key}": 10 for split in ("train", "val", "test") for key in ("tokens", "docs", "bytes")}
    (tmp_path / "data.json").write_text(json.dumps(data))
    assert report(tmp_path, tmp_path / "params.yaml") == 0
    out = capsys.readouterr().out
    assert "  test: 10 tokens / 10 docs / 10 bytes" in out and "unscored" not in out
