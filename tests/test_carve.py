"""Validation carving: tail cut at a document boundary, unseen-id policies, split files, stage runs."""

import json
import os
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings, strategies as st

from cvfp.data.cache import TokenStream, load_stream, save_stream
from cvfp.data.carve import carve, cut_document, load_split, save_splits
from cvfp.data.corpus import SPECIAL_TOKENS
from cvfp.data.tokenizer import load_tokenizer, save_tokenizer, train_tokenizer
from cvfp.errors import ArtifactError, ParamsError, StageError
from cvfp.io import sha256_file
from cvfp.params import validate
from conftest import write_params

REPO = Path(__file__).resolve().parents[1]
SPECIAL_IDS = {token: index for index, token in enumerate(SPECIAL_TOKENS)}


def make_stream(docs: list[list[int]], vocab_size: int = 16, tokenizer_sha256: str = "test") -> TokenStream:
    """A stream from explicit per-document ids (no tokenizer needed)."""
    lengths = torch.tensor([len(d) for d in docs], dtype=torch.int64)
    offsets = torch.zeros(len(docs) + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(lengths, 0)
    ids = torch.tensor([i for d in docs for i in d], dtype=torch.int64)
    return TokenStream(ids, offsets, lengths * 2, tokenizer_sha256, vocab_size, SPECIAL_IDS)


def test_validation_is_the_tail_cut_at_a_document_boundary():
    lengths = [5, 3, 4, 6, 2, 5, 3, 2]  # offsets 0 5 8 12 18 20 25 28 30
    stream = make_stream([[1] * (n - 1) + [0] for n in lengths])
    result = carve(stream, val_fraction=0.25)  # 0.75 * 30 = 22.5 -> first boundary >= 22.5 is 25
    assert (result.cut_doc, result.cut_token) == (6, 25)
    assert result.train.num_docs == 6 and result.val.num_docs == 2
    assert torch.equal(torch.cat([result.train.ids, result.val.ids]), stream.ids)
    assert result.val.doc_offsets.tolist() == [0, 3, 5]
    assert result.train.doc_offsets.tolist() == stream.doc_offsets[:7].tolist()
    assert result.val.num_bytes == 2 * 5 and result.train.num_bytes == 2 * 25
    assert (result.train.name, result.val.name) == ("train", "val")


def test_cut_uses_the_decimal_fraction_not_its_binary_approximation():
    # (1 - 0.7) * 10 is 3.0000000000000004 in floating point; the cut must still be at token 3
    assert cut_document(torch.arange(11), 0.7) == 3


def unseen_example() -> TokenStream:
    train = [[1, 2, 0], [3, 1, 0], [2, 3, 0], [1, 1, 2, 3, 0], [2, 2, 0], [3, 3, 0]]  # 20 tokens
    val = [[1, 2, 0], [1, 9, 0], [2, 3, 0], [8, 8, 0]]                                   # 12 tokens
    return make_stream(train + val)


def test_drop_docs_counts_dropped_documents_and_measures_coverage():
    result = carve(unseen_example(), val_fraction=0.4)  # 0.6 * 32 = 19.2 -> the boundary at 20
    assert (result.cut_doc, result.cut_token) == (6, 20)
    metrics = result.metrics()
    assert metrics["val_docs_dropped"] == 2 and metrics["val_docs"] == 2 and metrics["val_tokens"] == 6
    assert metrics["val_coverage"] == pytest.approx(9 / 12)  # ids 9, 8, 8 are unseen in train
    assert metrics["val_unseen_ids"] == 2
    assert result.dropped_docs.tolist() == [7, 9]
    assert result.val.ids.tolist() == [1, 2, 0, 2, 3, 0]
    assert result.val.doc_offsets.tolist() == [0, 3, 6]


def test_fail_policy_names_the_ids():
    with pytest.raises(StageError) as caught:
        carve(unseen_example(), val_fraction=0.4, unseen="fail")
    message = str(caught.value)
    assert "carve.unseen=fail" in message and "2 validation token ids" in message
    assert "ids 8, 9" in message and "2 of 4 validation documents" in message


def test_an_empty_side_is_refused_naming_the_counts():
    stream = make_stream([[1] * 10, [1] * 50])  # 0.8 * 60 = 48: no boundary before the end
    with pytest.raises(StageError, match=r"carve.val_fraction=0.2 .* 2 training and 0 validation documents"):
        carve(stream, val_fraction=0.2)
    with pytest.raises(StageError, match=r"1 training and 0 validation documents"):
        carve(make_stream([[1, 2, 0]]), val_fraction=0.5)


def test_dropping_every_validation_document_is_refused():
    with pytest.raises(StageError, match="would drop all 1 validation documents"):
        carve(make_stream([[1, 0], [1, 0], [1, 0], [7, 0]]), val_fraction=0.25)


def test_only_the_tail_method_exists():
    with pytest.raises(StageError, match="carve.method='random' is refused"):
        carve(make_stream([[1, 0], [1, 0]]), val_fraction=0.5, method="random")
    with pytest.raises(ParamsError, match=r"carve\.method"):
        validate({"carve": {"method": "random"}})


def test_split_files_round_trip_and_are_bound_to_the_tokenizer(tmp_path, documents):
    tokenizer_path = tmp_path / "tokenizer.json"
    save_tokenizer(train_tokenizer(documents, 300, 2), tokenizer_path)
    stream = make_stream([[1, 2, 0]] * 5, vocab_size=300, tokenizer_sha256=sha256_file(tokenizer_path))
    result = carve(stream, val_fraction=0.4)
    save_splits(result, tmp_path / "splits" / "train.safetensors", tmp_path / "splits" / "val.safetensors")
    train = load_split(tmp_path / "splits" / "train.safetensors", tokenizer_path)
    val = load_split(tmp_path / "splits" / "val.safetensors", tokenizer_path)
    assert (train.name, train.num_docs, val.name, val.num_docs) == ("train", 3, "val", 2)
    assert torch.equal(val.ids, result.val.ids) and val.doc_offsets.tolist() == [0, 3, 6]
    save_tokenizer(train_tokenizer(documents, 320, 2), tokenizer_path)
    with pytest.raises(ArtifactError, match="rerun the 'carve' stage"):
        load_split(tmp_path / "splits" / "val.safetensors", tokenizer_path)


@settings(max_examples=300, deadline=None)
@given(lengths=st.lists(st.integers(1, 12), min_size=1, max_size=25),
       vocab=st.integers(2, 10),
       seed=st.integers(0, 2**31 - 1),
       val_fraction=st.floats(0.01, 0.99))
def test_carve_properties(lengths, vocab, seed, val_fraction):
    generator = torch.Generator().manual_seed(seed)
    docs = [torch.randint(0, vocab, (n,), generator=generator).tolist() for n in lengths]
    stream = make_stream(docs, vocab_size=vocab)
    total = stream.num_tokens
    target = (1 - Fraction(repr(val_fraction))) * total
    starts = stream.doc_offsets.tolist()
    cut = next(j for j, start in enumerate(starts) if start >= target)
    train_ids = {i for d in docs[:cut] for i in d}
    val_docs = docs[cut:]
    bad = [any(i not in train_ids for i in d) for d in val_docs]
    if cut == len(docs) or all(bad):
        with pytest.raises(StageError):
            carve(stream, val_fraction=val_fraction)
        return
    result = carve(stream, val_fraction=val_fraction)
    # the cut is a document boundary, validation is the tail, the two are disjoint and cover the stream
    assert result.cut_doc == cut and result.cut_token == starts[cut]
    assert result.train.ids.tolist() == [i for d in docs[:cut] for i in d]
    assert result.train.num_tokens + result.val_tokens_before_drop == total
    assert result.val.ids.tolist() == [i for d, b in zip(val_docs, bad) if not b for i in d]
    assert result.dropped_docs.tolist() == [cut + k for k, b in enumerate(bad) if b]
    val_tokens = [i for d in val_docs for i in d]
    assert result.val_coverage == pytest.approx(sum(i in train_ids for i in val_tokens) / len(val_tokens))
    assert set(result.val.ids.tolist()) <= train_ids


def run_script(script: str, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{cwd / 'mlflow.db'}", "CVFP_NO_PROGRESS": "1"}
    return subprocess.run([sys.executable, *args, script], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


def test_stage_refuses_a_random_carve_and_writes_nothing(tmp_path):
    write_params(tmp_path / "params.yaml", {"carve.method": "random"})
    done = run_script(str(REPO / "pipeline" / "carve.py"), tmp_path)
    assert done.returncode == 2
    assert "error in stage 'carve'" in done.stderr and "carve.method" in done.stderr and "Traceback" not in done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]


WORDS = "the cat sat on a mat and then it ran to see my dog who was not at home today".split()


def test_data_stages_end_to_end_then_unseen_fail(tmp_path):
    rows = []
    for n in range(40):
        text = " ".join(WORDS[(n * 7 + k * 3) % len(WORDS)] for k in range(6 + n % 9))
        rows.append({"messages": [{"role": "user", "content": text}, {"role": "assistant", "content": text[::-1]}]})
    (tmp_path / "chats.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    write_params(tmp_path / "params.yaml", {"seed": 3, "data.source": "files", "data.files": ["chats.jsonl"],
                                            "data.num_samples": 30, "tokenizer.vocab_size": 300,
                                            "tokenizer.min_frequency": 2, "carve.val_fraction": 0.25,
                                            "carve.unseen": "drop_docs"})
    # one process for the three stages: the imports (torch, mlflow) are paid once
    driver = "; ".join(f"runpy.run_path({str(REPO / 'pipeline' / s) + '.py'!r}, run_name='__main__')"
                       for s in ("tokenizer", "cache", "carve"))
    done = subprocess.run([sys.executable, "-c", f"import runpy; {driver}"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300,
                          env={**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
                               "CVFP_NO_PROGRESS": "1"})
    assert done.returncode == 0, done.stderr
    assert "val coverage" in done.stdout

    tokenizer_path = tmp_path / "data" / "tokenizer" / "tokenizer.json"
    documents = [json.loads(line) for line in (tmp_path / "data" / "corpus" / "documents.jsonl").open()]
    assert len(documents) == 30
    # training in another process gives the same file as training here
    assert tokenizer_path.read_text() == train_tokenizer(documents, 300, 2).to_str(pretty=True)
    data = json.loads((tmp_path / "metrics" / "data.json").read_text())
    required = {"train_tokens", "val_tokens", "train_docs", "val_docs", "val_docs_dropped", "val_coverage",
                "vocab_size", "train_bytes", "val_bytes"}
    assert required <= set(data)
    stream = load_stream(tmp_path / "data" / "cache" / "stream.safetensors", tokenizer_path)
    assert data["train_docs"] + data["val_docs"] + data["val_docs_dropped"] == stream.num_docs == 30
    assert data["train_bytes"] + data["val_bytes"] <= stream.num_bytes
    assert load_split(tmp_path / "data" / "splits" / "val.safetensors", tokenizer_path).num_tokens == data["val_tokens"]

    # a stream whose tail holds ids never seen in training, carved with unseen: fail
    vocab = load_tokenizer(tokenizer_path).get_vocab_size()
    crafted = make_stream([[5, 6, 0]] * 6 + [[5, 299, 0], [298, 6, 0]], vocab_size=vocab,
                          tokenizer_sha256=sha256_file(tokenizer_path))
    save_stream(tmp_path / "data" / "cache" / "stream.safetensors", crafted)
    for old in ("data/splits/train.safetensors", "data/splits/val.safetensors", "metrics/data.json"):
        (tmp_path / old).unlink()  # as DVC removes outs before rerunning a stage
    (tmp_path / "params.yaml").write_text((tmp_path / "params.yaml").read_text().replace("drop_docs", "fail"))
    done = run_script(str(REPO / "pipeline" / "carve.py"), tmp_path)
    assert done.returncode == 2
    assert "carve.unseen=fail" in done.stderr and "ids 298, 299" in done.stderr
    assert not (tmp_path / "data" / "splits" / "val.safetensors").exists()
    assert not (tmp_path / "metrics" / "data.json").exists()
