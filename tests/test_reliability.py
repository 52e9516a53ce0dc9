"""Faults: a broken tracking store, damaged artifacts, hostile corpus documents."""

import json
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from conftest import write_params
from cvfp import tracking
from cvfp.data import cache
from cvfp.data.cache import encode_documents, load_stream, save_stream
from cvfp.data.carve import carve, load_split, save_splits
from cvfp.data.corpus import (document_bytes, load_corpus, read_documents, split_documents, take_documents,
                              write_document_split, write_documents)
from cvfp.data.tokenizer import load_tokenizer, save_tokenizer, token_byte_lengths, train_tokenizer
from cvfp.errors import ArtifactError
from cvfp.io import sha256_file
from cvfp.params import DataParams, Params

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    (tmp_path / "params.yaml").write_text("seed: 0\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    return tmp_path


def logged_stages(root):
    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(tracking.DEFAULT_EXPERIMENT)
    return sorted(r.data.tags[tracking.STAGE_TAG] for r in client.search_runs([experiment.experiment_id]))


def test_corrupted_store_warns_then_a_repaired_store_logs(workspace):
    (workspace / "mlflow.db").write_bytes(b"this is not a sqlite database" * 100)
    run = tracking.StageRun("carve", Params().flat())
    run.log_metrics({"val_coverage": 1.0})
    with pytest.warns(UserWarning, match=r"not logged for stage 'carve'.*connect"):
        run.close()
    (workspace / "mlflow.db").unlink()
    with tracking.StageRun("carve", Params().flat()) as later:
        later.log_metrics({"val_coverage": 1.0})
    assert not later.failures
    assert logged_stages(workspace) == ["carve", "pipeline"]


def test_locked_store_is_waited_for_not_lost(workspace):
    """A writer holding the sqlite lock briefly (another experiment) delays logging; nothing is lost."""
    tracking.StageRun("tokenizer", Params().flat()).close()  # creates the store
    locker = sqlite3.connect(workspace / "mlflow.db", timeout=0, isolation_level=None, check_same_thread=False)
    locker.execute("BEGIN EXCLUSIVE")
    release = threading.Timer(1.5, lambda: locker.execute("COMMIT"))
    release.start()
    try:
        with tracking.StageRun("cache", Params().flat()) as run:
            run.log_metrics({"tokens": 5})
    finally:
        release.join()
        locker.close()
    assert not run.failures
    assert logged_stages(workspace) == ["cache", "pipeline", "tokenizer"]


def test_unreachable_server_fails_fast_and_the_stage_goes_on(workspace, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")  # discard port: nothing listens
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    run = tracking.StageRun("phase1", Params().flat())
    run.log_metrics({"x": 1.0})
    run.log_curves([{"iteration": 0, "loss": 1.0}], "iteration")
    with pytest.warns(UserWarning, match="not logged for stage 'phase1'"):
        run.close()


def test_a_stage_completes_with_a_broken_store(tmp_path):
    """The carve stage with a corrupted mlflow.db still writes every output and metrics file."""
    documents = [{"messages": [{"role": "user", "content": f"word {i % 5} word {i % 3} and more"}]} for i in range(40)]
    tokenizer = train_tokenizer(documents, 300, 2)
    tok_path = tmp_path / "data" / "tokenizer" / "tokenizer.json"
    save_tokenizer(tokenizer, tok_path)
    save_stream(tmp_path / "data" / "cache" / "stream.safetensors", build_stream(documents, tok_path))
    carve_params = Params().carve
    write_document_split(tmp_path / "data" / "tokenizer" / "split.json",
                         split_documents([document_bytes(d) for d in documents], carve_params.val_fraction,
                                         carve_params.test_fraction))
    write_params(tmp_path / "params.yaml", {})
    (tmp_path / "mlflow.db").write_bytes(b"garbage" * 1000)
    done = subprocess.run([sys.executable, str(REPO / "pipeline" / "carve.py")], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300, env={**_env(), "DVC_ROOT": str(tmp_path)})
    assert done.returncode == 0, done.stderr
    assert "not logged for stage 'carve'" in done.stderr
    assert json.loads((tmp_path / "metrics" / "data.json").read_text())["train_tokens"] > 0
    for split in ("train", "val", "test"):
        assert (tmp_path / "data" / "splits" / f"{split}.safetensors").is_file()


def _env():
    import os

    return {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_TRACKING", "DVC_"))}


@pytest.fixture
def split_files(tmp_path):
    documents = [{"messages": [{"role": "user", "content": f"the cat {i % 3} sat"}]} for i in range(30)]
    tok_path = tmp_path / "tokenizer.json"
    save_tokenizer(train_tokenizer(documents, 300, 1), tok_path)
    table = token_byte_lengths(load_tokenizer(tok_path))
    save_splits(carve(build_stream(documents, tok_path), table, val_fraction=0.2, test_fraction=0.2),
                tmp_path / "train.safetensors", tmp_path / "val.safetensors", tmp_path / "test.safetensors")
    return tmp_path, tok_path


def build_stream(documents, tok_path):
    return encode_documents(documents, load_tokenizer(tok_path), sha256_file(tok_path))


def test_bit_flipped_and_truncated_split_files_name_the_file_and_stage(split_files):
    folder, tok_path = split_files
    path = folder / "train.safetensors"
    original = path.read_bytes()
    flipped = bytearray(original)
    flipped[-3] ^= 0x10
    path.write_bytes(bytes(flipped))
    with pytest.raises(ArtifactError, match=r"train\.safetensors.*carve"):
        load_split(path, tok_path)
    path.write_bytes(original[: len(original) // 3])
    with pytest.raises(ArtifactError, match=r"train\.safetensors.*carve"):
        load_split(path, tok_path)


def test_retrained_tokenizer_under_an_old_split_names_both_hashes(split_files):
    folder, tok_path = split_files
    old = sha256_file(tok_path)
    save_tokenizer(train_tokenizer([{"messages": [{"role": "user", "content": "other text"}]}], 300, 1), tok_path)
    with pytest.raises(ArtifactError) as caught:
        load_split(folder / "val.safetensors", tok_path)
    message = str(caught.value)
    assert old[:12] in message and sha256_file(tok_path)[:12] in message


def test_hostile_documents_keep_byte_counts_exact(tmp_path):
    """Empty, huge (10 MB) and odd-Unicode documents (NUL, RTL, emoji, lone surrogates in JSON)."""
    huge = "word salad " * 1_000_000  # 11 MB of text in ordinary words
    rows = [
        '{"messages": [{"role": "user", "content": ""}]}',
        json.dumps({"messages": [{"role": "user", "content": huge}]}),
        '{"messages": [{"role": "user", "content": "nul \\u0000 rtl \\u05e9\\u05dc emoji \\ud83d\\ude00"}]}',
        '{"messages": [{"role": "user", "content": "lone \\ud800 surrogate"}]}',
    ]
    path = tmp_path / "hostile.jsonl"
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    corpus = load_corpus(DataParams(source="files", files=[str(path)], num_samples=3))
    selection = take_documents(corpus, 3, seed=0)
    docs = selection.documents
    assert len(docs) == 3  # the empty one is skipped and counted
    sizes = sorted(document_bytes(d) for d in docs)
    expected_odd = len("nul \x00 rtl \u05e9\u05dc emoji \U0001F600".encode("utf-8"))
    expected_lone = len("lone \ufffd surrogate".encode("utf-8"))  # the lone surrogate becomes U+FFFD
    assert sizes == sorted([11_000_000, expected_odd, expected_lone])
    tok_path = tmp_path / "tokenizer.json"
    save_tokenizer(train_tokenizer(docs, 300, 2), tok_path)
    stream = build_stream(docs, tok_path)
    assert int(stream.doc_bytes.sum()) == sum(sizes)
    save_stream(tmp_path / "stream.safetensors", stream)
    assert load_stream(tmp_path / "stream.safetensors", tok_path).num_tokens == stream.num_tokens


def test_a_10mb_single_word_document_trains_and_encodes(tmp_path):
    """A 10 MB word (letters only: one pre-tokenized word) stalls an unguarded BPE trainer (1 MB: over 100 s)."""
    word = "zürich" * 1_428_572  # 8.6 million letters, 10,000,004 UTF-8 bytes ("ü" takes two)
    write_documents(tmp_path / "documents.jsonl", [{"messages": [{"role": "user", "content": word}]},
                                                   {"messages": [{"role": "assistant", "content": "a short reply"}]}])
    docs = read_documents(tmp_path / "documents.jsonl")  # what the tokenizer stage hands to the cache stage
    tok_path = tmp_path / "tokenizer.json"
    save_tokenizer(train_tokenizer(docs, 300, 2), tok_path)
    stream = cache.build_stream(tmp_path / "documents.jsonl", tok_path)  # the cache stage's work
    assert stream.doc_bytes.tolist() == [10_000_004, len(b"a short reply")]
    assert load_tokenizer(tok_path).decode(stream.doc(0).tolist()) == word  # lossless; specials are skipped
    assert stream.doc(0).numel() < len(word) / 100  # the merges were learned from the word's pieces


@pytest.mark.parametrize("name, data, expected", [
    ("random.txt", bytes([0x41, 0x42, 0xFE, 0x00, 0x93] * 200), "random.txt: not valid UTF-8: byte offset 2 (line 1)"),
    ("controls.jsonl", json.dumps({"text": "\x00\x01\x02\x03 ok"}).encode() + b"\n",
     "controls.jsonl:1: 4 of 7 characters are control characters"),
], ids=["random-bytes", "control-characters"])
def test_the_tokenizer_stage_refuses_input_that_is_not_text_in_one_line(tmp_path, name, data, expected):
    """Arbitrary bytes or control characters are one named error (exit 2), never a document of U+FFFD."""
    (tmp_path / name).write_bytes(data)
    write_params(tmp_path / "params.yaml", {"data.source": "files", "data.files": [name], "data.num_samples": 1})
    done = subprocess.run([sys.executable, str(REPO / "pipeline" / "tokenizer.py")], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300,
                          env={**_env(), "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"})
    assert done.returncode == 2, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error in stage 'tokenizer'")]
    assert len(errors) == 1 and expected in errors[0] and "Traceback" not in done.stderr
    assert not (tmp_path / "data").exists()
