"""CVFP against the baselines: one table from the same counts, training seconds, validation prompts, samples."""

import json
import math

import pytest
import torch
from conftest import toy_documents
from helpers import tiny_model

import cvfp.baselines as baselines
import cvfp.compare as compare
from cvfp.cli import report
from cvfp.data.cache import encode_documents
from cvfp.data.tokenizer import train_tokenizer
from cvfp.errors import StageError
from cvfp.evaluate import evaluate_free
from cvfp.metrics import next_token_metrics
from cvfp.params import Params
from cvfp.scan import exact_scan

VAL_BYTES = 1000


def counts(nats, correct, tokens=99):
    return {"total_nats": nats, "predictions": tokens, "correct": correct}


def inputs(**changes):
    evaluation = {"val_bytes": VAL_BYTES, "fixed": next_token_metrics(counts(400.0, 20), VAL_BYTES),
                  "free": next_token_metrics(counts(420.0, 18), VAL_BYTES)}
    phase1 = {"iterations": 10, "train": {"tokens": 500}}
    phase2 = {"trainable_parameters": 1000, "train_tokens_seen": 4990}
    base = {kind: {"best": next_token_metrics(counts(380.0 + i, 25), VAL_BYTES), "trainable_parameters": 1040 + i,
                   "train_tokens_seen": 4990} for i, kind in enumerate(baselines.KINDS)}
    base["val_bytes"] = VAL_BYTES
    tree = {"evaluation": evaluation, "phase1": phase1, "phase2": phase2, "baselines": base}
    for key, value in changes.items():
        tree[key] = value
    return tree


def test_comparison_has_every_model_and_quantity():
    result = compare.comparison(**inputs())
    assert list(result["models"]) == list(compare.ROWS)
    for row in result["models"].values():
        assert {"val_loss", "val_ppl", "val_acc", "val_bpb", "trainable_parameters", "train_tokens_seen"} <= row.keys()
    assert result["best_val_bpb"] == "gru"
    assert result["parameter_ratio"]["gru"] == pytest.approx(1.04)
    json.dumps(result, allow_nan=False)


def test_other_validation_data_is_refused():
    tree = inputs()
    tree["baselines"]["val_bytes"] = VAL_BYTES + 1
    with pytest.raises(StageError, match="validation bytes"):
        compare.comparison(**tree)
    tree = inputs()
    tree["baselines"]["gru"]["best"]["predictions"] = 98
    with pytest.raises(StageError, match="different numbers of positions"):
        compare.comparison(**tree)


def test_bits_per_byte_is_one_function_for_every_model():
    """Uniform predictions give every model the same nats, hence the same bits per byte: (N-1) ln V / (ln 2 bytes)."""
    vocab, ids = 16, torch.randint(0, 16, (41,), generator=torch.Generator().manual_seed(0))
    cvfp = tiny_model(0, vocab_size=vocab, context_dim=4, embed_dim=4, layer_structure=[1])
    cvfp.zero_head_()
    found = {"cvfp": evaluate_free(cvfp, ids, exact_scan, 4096)}
    for kind in baselines.KINDS:
        params = Params().baselines.model_copy(update={"seq_len": 8})
        model = baselines.build(kind, baselines.baseline_args(kind, 8, vocab, params))
        torch.nn.init.zeros_(model.head.weight)
        torch.nn.init.zeros_(model.head.bias)
        found[kind] = baselines.validation_counts(model, ids, 8, 3)
    expected = 40 * math.log(vocab) / (math.log(2) * VAL_BYTES)
    for name, found_counts in found.items():
        assert found_counts["predictions"] == 40, name
        assert next_token_metrics(found_counts, VAL_BYTES)["val_bpb"] == pytest.approx(expected, rel=1e-6), name
    # the table recomputes every row's numbers from its counts with that one function
    tree = inputs()
    tree["evaluation"]["free"]["val_bpb"] = 123.0  # a stale derived number is not trusted
    assert compare.comparison(**tree)["models"]["cvfp_free"]["val_bpb"] == pytest.approx(
        next_token_metrics(counts(420.0, 18), VAL_BYTES)["val_bpb"])


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


def test_report_prints_the_comparison(tmp_path, capsys):
    data = {"train_tokens": 500, "train_docs": 5, "train_bytes": 2000, "val_tokens": 100, "val_docs": 2,
            "val_bytes": VAL_BYTES, "val_docs_dropped": 0, "val_coverage": 1.0, "vocab_size": 300}
    (tmp_path / "data.json").write_text(json.dumps(data))
    (tmp_path / "compare.json").write_text(json.dumps(compare.comparison(**inputs())))
    assert report(tmp_path, tmp_path / "params.yaml") == 0
    out = capsys.readouterr().out
    assert "CVFP free-running" in out and "Transformer" in out and "val bits/byte" in out
