"""Carving: train | val | test at the tokenizer's document boundaries, unseen-id policies, the scoring
rule (scored, target_bytes), split files, stage runs."""

import json
import os
import re
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings, strategies as st

from cvfp.data.cache import TokenStream, load_stream, save_stream
from cvfp.data.carve import carve, load_split, require_split, save_splits
from cvfp.data.corpus import SPECIAL_TOKENS, read_document_split, split_documents, write_document_split
from cvfp.data.tokenizer import load_tokenizer, save_tokenizer, token_byte_lengths, train_tokenizer
from cvfp.errors import ArtifactError, ParamsError, StageError
from cvfp.io import sha256_file
from cvfp.params import validate
from conftest import write_params

REPO = Path(__file__).resolve().parents[1]
SPECIAL_IDS = {token: index for index, token in enumerate(SPECIAL_TOKENS)}
BOUNDARY, USER = SPECIAL_IDS["<|endoftext|>"], SPECIAL_IDS["<|user|>"]
FIRST_TEXT_ID = len(SPECIAL_TOKENS)  # ids 0-3 are the specials, as in every trained tokenizer


def byte_table(vocab_size: int) -> list[int]:
    """Bytes per id for synthetic streams: 0 for the specials, 1 to 3 for text ids."""
    return [0 if i < FIRST_TEXT_ID else 1 + i % 3 for i in range(vocab_size)]


def make_stream(contents: list[list[int]], vocab_size: int = 16, tokenizer_sha256: str = "test",
                table: list[int] | None = None) -> TokenStream:
    """A stream of documents `<|user|> content <|endoftext|>` from explicit text ids (no tokenizer needed);
    doc_bytes from `table` (bytes per id), `byte_table` unless given."""
    table = table or byte_table(vocab_size)
    docs = [[USER, *content, BOUNDARY] for content in contents]
    lengths = torch.tensor([len(d) for d in docs], dtype=torch.int64)
    offsets = torch.zeros(len(docs) + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(lengths, 0)
    ids = torch.tensor([i for d in docs for i in d], dtype=torch.int64)
    doc_bytes = torch.tensor([sum(table[i] for i in content) for content in contents], dtype=torch.int64)
    return TokenStream(ids, offsets, doc_bytes, tokenizer_sha256, vocab_size, SPECIAL_IDS)


def carve_synthetic(stream: TokenStream, **carve_params):
    return carve(stream, byte_table(stream.vocab_size), **carve_params)


ONE_BYTE = 6  # a text id of 1 byte in byte_table


def test_validation_then_test_are_the_tail_cut_at_document_boundaries():
    sizes = [5, 3, 4, 6, 2, 5, 3, 2]  # bytes; document starts 0 5 8 12 18 20 25 28, total 30
    stream = make_stream([[ONE_BYTE] * n for n in sizes])
    # val: first start >= (1 - 0.2 - 0.1) * 30 = 21 is 25 (doc 6); test: first start >= 0.9 * 30 = 27 is 28 (doc 7)
    result = carve_synthetic(stream, val_fraction=0.2, test_fraction=0.1)
    assert (result.cut_doc, result.test.first_doc) == (6, 7)
    token_starts = stream.doc_offsets.tolist()  # each document is its bytes + 2 tokens (role and boundary)
    assert (result.cut_token, result.test.first_token) == (token_starts[6], token_starts[7]) == (37, 42)
    assert (result.train.num_docs, result.val.stream.num_docs, result.test.stream.num_docs) == (6, 1, 1)
    assert torch.equal(torch.cat([s.ids for s in result.streams().values()]), stream.ids)
    assert result.val.stream.doc_offsets.tolist() == [0, 5] and result.test.stream.doc_offsets.tolist() == [0, 4]
    assert result.train.doc_offsets.tolist() == token_starts[:7]
    assert (result.train.num_bytes, result.val.stream.num_bytes, result.test.stream.num_bytes) == (25, 3, 2)
    assert [s.name for s in result.streams().values()] == ["train", "val", "test"]
    assert (result.split.train_documents, result.split.val_documents, result.split.test_documents) == (6, 1, 1)


def test_the_cut_is_the_rule_on_bytes_not_on_tokens():
    # every document holds 6 bytes, but the training ones in 8 tokens and the others in 4 (id 5 is 3 bytes)
    stream = make_stream([[5, 5]] + [[ONE_BYTE] * 6] * 5 + [[5, 5]] * 4)
    result = carve_synthetic(stream, val_fraction=0.2, test_fraction=0.2)
    assert result.split == split_documents([6] * 10, 0.2, 0.2)
    assert (result.train.num_docs, result.val.stream.num_docs, result.test.stream.num_docs) == (6, 2, 2)
    token_starts = stream.doc_offsets.tolist()
    by_tokens = next(k for k, start in enumerate(token_starts) if start >= 0.6 * stream.num_tokens)
    assert by_tokens == 5  # the old token-based cut would have ended training a document earlier


def test_cut_uses_the_decimal_fractions_not_their_binary_approximations():
    # (1 - 0.2 - 0.7) * 10 is 1.0000000000000009 and (1 - 0.7) * 10 is 3.0000000000000004 in floating point;
    # the decimals as written put validation at byte 1 and test at byte 3 exactly
    assert (1 - 0.2 - 0.7) * 10 > 1 and (1 - 0.7) * 10 > 3
    split = split_documents([1] * 10, val_fraction=0.2, test_fraction=0.7)
    assert (split.train_documents, split.val_documents, split.test_documents) == (1, 2, 7)


def unseen_example() -> TokenStream:
    """Six training documents over ids 4-6; validation holds unseen id 9, test unseen id 8."""
    train = [[4, 5], [6, 4], [5, 6], [4, 4, 5, 6], [5, 5], [6, 6]]  # bytes 5 3 4 8 6 2: 28
    val = [[4, 5], [4, 9]]                                            # bytes 5 3
    test = [[5, 6], [8, 8]]                                           # bytes 4 6
    return make_stream(train + val + test)


# document starts 0 5 8 12 20 26 28 33 36 40 of 46 bytes: (1 - 0.42) * 46 = 26.68 -> doc 6, 0.75 * 46 = 34.5 -> doc 8
UNSEEN_FRACTIONS = {"val_fraction": 0.17, "test_fraction": 0.25}


def test_mask_keeps_documents_whole_and_scores_only_seen_text_targets():
    result = carve_synthetic(unseen_example(), **UNSEEN_FRACTIONS)
    assert (result.cut_doc, result.test.first_doc) == (6, 8)
    val, test = result.val.stream, result.test.stream
    assert val.ids.tolist() == [USER, 4, 5, BOUNDARY, USER, 4, 9, BOUNDARY]  # nothing dropped
    # predictions: u>4 4>5 5>B B>u u>4 4>9 9>B; specials are never targets that score; 4>9 is masked
    assert val.scored.tolist() == [True, True, False, False, True, False, False]
    assert val.target_bytes.tolist() == [2, 3, 0, 0, 2, 1, 0]
    assert test.scored.tolist() == [True, True, False, False, False, False, False]  # u>8 and 8>8 masked
    metrics = result.metrics()
    assert metrics["val_predictions_masked"] == 1 and metrics["test_predictions_masked"] == 2
    assert metrics["val_predictions"] == 7 and metrics["val_scored_predictions"] == 3
    assert metrics["val_scored_bytes"] == 2 + 3 + 2 and metrics["val_bytes"] == 8
    assert metrics["val_coverage"] == pytest.approx(7 / 8) and metrics["val_tokens_covered"] == 7
    assert metrics["test_coverage"] == pytest.approx(6 / 8)
    assert metrics["val_unseen_ids"] == metrics["test_unseen_ids"] == 1
    assert metrics["val_docs_dropped"] == metrics["val_tokens_dropped"] == 0 and metrics["unseen_policy"] == "mask"
    assert metrics["test_unscored_unseen"] == 2 and metrics["test_predictions_before_policy"] == 7
    # training: every text target scores (all its ids occur in training)
    assert torch.equal(result.train.scored, result.train.target_bytes > 0)
    assert metrics["train_scored_bytes"] == metrics["train_bytes"] == 28


def test_drop_docs_counts_dropped_documents_and_measures_coverage():
    result = carve_synthetic(unseen_example(), **UNSEEN_FRACTIONS, unseen="drop_docs", max_unscored_fraction=0.6)
    metrics = result.metrics()
    assert metrics["val_docs_dropped"] == 1 and metrics["val_docs"] == 1 and metrics["val_tokens"] == 4
    assert metrics["val_tokens_dropped"] == 4 and metrics["val_predictions_masked"] == 0
    assert metrics["val_unscored_unseen"] == 4 and metrics["val_predictions_before_policy"] == 7
    assert metrics["val_coverage"] == pytest.approx(7 / 8)  # measured before the drop
    assert result.val.dropped_docs.tolist() == [7] and result.test.dropped_docs.tolist() == [9]
    assert result.val.stream.ids.tolist() == [USER, 4, 5, BOUNDARY]
    assert result.test.stream.ids.tolist() == [USER, 5, 6, BOUNDARY]
    assert metrics["val_bytes"] == 5 and metrics["test_bytes"] == 4  # exact bytes after the drop
    assert result.val.stream.doc_bytes.tolist() == [5] and result.val.stream.doc_offsets.tolist() == [0, 4]
    assert result.val.stream.scored.tolist() == [True, True, False]


def test_too_many_unscored_predictions_is_an_error_naming_the_numbers():
    with pytest.raises(StageError) as caught:
        carve_synthetic(unseen_example(), **UNSEEN_FRACTIONS, unseen="drop_docs")  # 4 of 7 > 0.5
    message = str(caught.value)
    assert message.startswith("val: 4 of 7 predictions unscored (57.1%)")
    assert "1 of 2 documents, 4 of 8 tokens dropped" in message and "carve.max_unscored_fraction=0.5" in message
    # mask: the validation document of 6 unseen ids masks 6 of its 7 predictions
    # mask: the validation document <u> 4 9 9 9 9 <e> scores u>4 and masks the 4 predictions touching id 9
    masked = make_stream([[4, 5, 6]] * 8 + [[4, 9, 9, 9, 9]] + [[4, 5]] * 2)  # starts 0 6 ... 48 54 59 of 64 bytes
    fractions = {"val_fraction": 0.1, "test_fraction": 0.2}  # 0.7 * 64 = 44.8 -> doc 8; 0.8 * 64 = 51.2 -> doc 9
    with pytest.raises(StageError, match=r"^val: 4 of 6 predictions unscored \(66\.7%\).*mask: 4 masked"):
        carve_synthetic(masked, **fractions)
    allowed = carve_synthetic(masked, **fractions, max_unscored_fraction=0.9)
    assert allowed.val.predictions_masked == 4 and allowed.val.stream.scored.tolist() == [True] + [False] * 5
    # a part with no scored prediction left is refused even when the fraction allows it
    nothing = make_stream([[4, 5, 6]] * 8 + [[9] * 6] + [[4, 5]] * 2)
    with pytest.raises(StageError, match=r"^val: none of its 7 predictions is scored"):
        carve_synthetic(nothing, **fractions, max_unscored_fraction=1.0)


def test_fail_policy_names_the_ids_of_each_part():
    with pytest.raises(StageError) as caught:
        carve_synthetic(unseen_example(), **UNSEEN_FRACTIONS, unseen="fail")
    message = str(caught.value)
    assert "carve.unseen=fail" in message and "1 validation token ids" in message and "ids 9" in message
    assert "1 of 2 validation documents" in message
    assert "1 test token ids" in message and "ids 8" in message and "(2 of 8 tokens)" in message


def test_an_empty_part_is_refused_naming_the_counts():
    stream = make_stream([[ONE_BYTE] * 10, [ONE_BYTE] * 50])  # 0.7 * 60 = 42: no document starts after it
    with pytest.raises(StageError, match=r"2 training, 0 validation and 0 test documents .*carve.val_fraction=0.2"):
        carve_synthetic(stream, val_fraction=0.2, test_fraction=0.1)
    with pytest.raises(StageError, match=r"1 training, 0 validation and 0 test documents"):
        carve_synthetic(make_stream([[4, 5]]), val_fraction=0.5, test_fraction=0.2)


def test_dropping_every_document_of_a_part_is_refused():
    stream = make_stream([[4]] * 4 + [[9]] + [[4]])
    with pytest.raises(StageError, match="would drop all 1 validation documents"):
        carve_synthetic(stream, val_fraction=0.2, test_fraction=0.2, unseen="drop_docs", max_unscored_fraction=1.0)


def test_only_the_tail_method_exists():
    with pytest.raises(StageError, match="carve.method='random' is refused"):
        carve_synthetic(make_stream([[4], [4], [4]]), val_fraction=0.3, test_fraction=0.3, method="random")
    with pytest.raises(ParamsError, match=r"carve\.method"):
        validate({"carve": {"method": "random"}})
    with pytest.raises(ParamsError, match=r"carve.val_fraction \+ carve.test_fraction must be below 1"):
        validate({"carve": {"val_fraction": 0.3, "test_fraction": 0.7}}, complete=False)


def test_a_stream_whose_tokens_do_not_hold_its_doc_bytes_is_refused():
    stream = make_stream([[4, 5]] * 5)
    wrong = TokenStream(stream.ids, stream.doc_offsets, stream.doc_bytes + torch.tensor([0, 0, 1, 0, 0]),
                        "test", stream.vocab_size, SPECIAL_IDS)
    with pytest.raises(ArtifactError, match=r"stream document 2: its tokens hold 5 UTF-8 bytes but doc_bytes says 6"):
        carve_synthetic(wrong, val_fraction=0.2, test_fraction=0.2)


@pytest.fixture
def tokenizer_path(tmp_path, documents):
    path = tmp_path / "tokenizer.json"
    save_tokenizer(train_tokenizer(documents, 300, 2), path)
    return path


def test_split_files_round_trip_and_are_bound_to_the_tokenizer(tmp_path, documents, tokenizer_path):
    table = token_byte_lengths(load_tokenizer(tokenizer_path))
    stream = make_stream([[4, 5]] * 5, vocab_size=300, tokenizer_sha256=sha256_file(tokenizer_path), table=table)
    result = carve(stream, table, val_fraction=0.2, test_fraction=0.2)
    paths = [tmp_path / "splits" / f"{name}.safetensors" for name in ("train", "val", "test")]
    save_splits(result, *paths)
    loaded = [load_split(path, tokenizer_path) for path in paths]
    assert [(s.name, s.num_docs) for s in loaded] == [("train", 3), ("val", 1), ("test", 1)]
    for split, original in zip(loaded, result.streams().values()):
        assert torch.equal(split.ids, original.ids) and split.doc_offsets.tolist() == original.doc_offsets.tolist()
        assert torch.equal(split.scored, original.scored) and torch.equal(split.target_bytes, original.target_bytes)
        assert split.scored.dtype == torch.bool and split.target_bytes.dtype == torch.int64
        assert split.scored.shape == split.target_bytes.shape == (split.num_tokens - 1,)
    save_tokenizer(train_tokenizer(documents, 320, 2), tokenizer_path)
    with pytest.raises(ArtifactError, match="rerun the 'carve' stage"):
        load_split(paths[1], tokenizer_path)


def test_a_split_without_the_scoring_tensors_or_with_wrong_shapes_is_refused(tmp_path, tokenizer_path):
    stream = make_stream([[4, 5]] * 5, vocab_size=300, tokenizer_sha256=sha256_file(tokenizer_path))
    save_stream(tmp_path / "old.safetensors", stream)  # the layout of a split written before the scoring rule
    with pytest.raises(ArtifactError, match=r"old.safetensors: no scored/target_bytes .*rerun the 'carve' stage"):
        load_split(tmp_path / "old.safetensors", tokenizer_path)
    n = stream.num_tokens
    for scored, target_bytes, problem in [
        (torch.ones(n, dtype=torch.bool), torch.zeros(n, dtype=torch.int64), "shape"),
        (torch.ones(n - 1, dtype=torch.bool), None, "come together"),
        (torch.ones(n - 1, dtype=torch.int64), torch.zeros(n - 1, dtype=torch.int64), "bool"),
        (torch.ones(n - 1, dtype=torch.bool), -torch.ones(n - 1, dtype=torch.int64), ">= 0"),
    ]:
        damaged = TokenStream(stream.ids, stream.doc_offsets, stream.doc_bytes, stream.tokenizer_sha256,
                              stream.vocab_size, SPECIAL_IDS, "val", scored, target_bytes)
        save_stream(tmp_path / "bad.safetensors", damaged)
        with pytest.raises(ArtifactError, match=rf"bad.safetensors: .*{re.escape(problem)}.*rerun the 'carve' stage"):
            load_split(tmp_path / "bad.safetensors", tokenizer_path)


def test_require_split_refuses_another_cut_or_other_fractions(tmp_path):
    stream = unseen_example()
    path = tmp_path / "split.json"
    write_document_split(path, split_documents(stream.doc_bytes.tolist(), **UNSEEN_FRACTIONS))
    assert require_split(path, stream, **UNSEEN_FRACTIONS) == carve_synthetic(stream, **UNSEEN_FRACTIONS).split
    recorded = json.loads(path.read_text())
    path.write_text(json.dumps({**recorded, "train_documents": 5, "val_documents": 3}))
    with pytest.raises(ArtifactError) as caught:
        require_split(path, stream, **UNSEEN_FRACTIONS)
    message = str(caught.value)
    assert "after 5 training documents" in message and "cut after 6" in message
    assert "rerun the 'tokenizer' stage" in message
    path.write_text(json.dumps(recorded))
    with pytest.raises(ArtifactError, match=r"written for carve.val_fraction=0.17.*params.yaml has 0.2, 0.25"):
        require_split(path, stream, val_fraction=0.2, test_fraction=0.25)


def reference_scores(ids: list[int], seen: set[int]) -> list[bool]:
    """The scoring rule, one prediction at a time."""
    return [ids[t + 1] >= FIRST_TEXT_ID and ids[t] in seen and ids[t + 1] in seen for t in range(len(ids) - 1)]


@settings(max_examples=300, deadline=None)
@given(lengths=st.lists(st.integers(1, 8), min_size=1, max_size=25),
       vocab=st.integers(FIRST_TEXT_ID + 1, 12),
       seed=st.integers(0, 2**31 - 1),
       val_fraction=st.floats(0.01, 0.6),
       test_fraction=st.floats(0.01, 0.39),
       unseen=st.sampled_from(["mask", "drop_docs"]))
def test_carve_properties(lengths, vocab, seed, val_fraction, test_fraction, unseen):
    generator = torch.Generator().manual_seed(seed)
    contents = [torch.randint(FIRST_TEXT_ID, vocab, (n,), generator=generator).tolist() for n in lengths]
    stream = make_stream(contents, vocab_size=vocab)
    table = byte_table(vocab)
    sizes = [sum(table[i] for i in c) for c in contents]
    starts = [sum(sizes[:k]) for k in range(len(sizes))]
    total = sum(sizes)
    val_start = next((k for k, s in enumerate(starts)
                      if s >= (1 - Fraction(repr(val_fraction)) - Fraction(repr(test_fraction))) * total), len(sizes))
    test_start = next((k for k, s in enumerate(starts) if s >= (1 - Fraction(repr(test_fraction))) * total), len(sizes))
    docs = [[USER, *c, BOUNDARY] for c in contents]
    train_ids = {i for d in docs[:val_start] for i in d}
    parts = {"val": docs[val_start:test_start], "test": docs[test_start:]}

    def expect(part_docs):
        kept = [d for d in part_docs if unseen == "mask" or set(d) <= train_ids]
        ids = [i for d in kept for i in d]
        return kept, ids, reference_scores(ids, train_ids)

    expected = {name: expect(part_docs) for name, part_docs in parts.items()}
    if not (val_start and parts["val"] and parts["test"]) or any(
            not kept or not any(scored) for kept, _, scored in expected.values()):
        with pytest.raises(StageError):
            carve_synthetic(stream, val_fraction=val_fraction, test_fraction=test_fraction, unseen=unseen,
                            max_unscored_fraction=1.0)
        return
    result = carve_synthetic(stream, val_fraction=val_fraction, test_fraction=test_fraction, unseen=unseen,
                             max_unscored_fraction=1.0)
    # the cuts are document boundaries, the parts the tail in order, disjoint, covering the stream
    assert (result.cut_doc, result.test.first_doc) == (val_start, test_start)
    assert result.train.ids.tolist() == [i for d in docs[:val_start] for i in d]
    assert result.train.num_tokens + result.val.tokens_before_policy + result.test.tokens_before_policy == \
        stream.num_tokens
    for name, part in (("val", result.val), ("test", result.test)):
        kept, ids, scored = expected[name]
        assert part.stream.ids.tolist() == ids
        assert part.stream.scored.tolist() == scored
        assert part.stream.target_bytes.tolist() == [table[i] for i in ids[1:]]
        assert part.stream.num_bytes == sum(table[i] for i in ids)
        all_ids = [i for d in parts[name] for i in d]
        assert part.coverage == pytest.approx(sum(i in train_ids for i in all_ids) / len(all_ids))
        text_targets = sum(i >= FIRST_TEXT_ID for i in ids[1:])
        assert part.predictions_masked == text_targets - sum(scored)
        assert part.unscored_unseen == part.predictions_masked + len(all_ids) - len(ids)
        if unseen == "drop_docs":
            assert set(ids) <= train_ids and part.predictions_masked == 0
        else:
            assert len(kept) == len(parts[name])  # mask keeps every document
    assert result.train.scored.tolist() == reference_scores(result.train.ids.tolist(), train_ids)


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
DOCUMENTS = 40


def unique_word(n: int) -> str:
    """A word found in document n only: all are the same length and distinct, so none is part of another."""
    return "zq" + chr(ord("a") + n // 26) + chr(ord("a") + n % 26) + "vx"


@pytest.fixture(scope="module")
def data_run(tmp_path_factory):
    """tokenizer -> cache -> carve in a scratch folder, on documents that each hold one word of their own."""
    root = tmp_path_factory.mktemp("data_run")
    rows = []
    for n in range(DOCUMENTS):
        text = " ".join(WORDS[(n * 7 + k * 3) % len(WORDS)] for k in range(6 + n % 9))
        own = " ".join([unique_word(n)] * 4)
        rows.append({"messages": [{"role": "user", "content": f"{text} {own}"},
                                  {"role": "assistant", "content": text[::-1]}]})
    (root / "chats.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    write_params(root / "params.yaml", {"seed": 3, "data.source": "files", "data.files": ["chats.jsonl"],
                                        "data.num_samples": 30, "tokenizer.vocab_size": 2000,
                                        "tokenizer.min_frequency": 2, "carve.val_fraction": 0.2,
                                        "carve.test_fraction": 0.2, "carve.unseen": "mask"})
    # one process for the three stages: the imports (torch, mlflow) are paid once
    driver = "; ".join(f"runpy.run_path({str(REPO / 'pipeline' / s) + '.py'!r}, run_name='__main__')"
                       for s in ("tokenizer", "cache", "carve"))
    done = subprocess.run([sys.executable, "-c", f"import runpy; {driver}"], cwd=root, capture_output=True,
                          text=True, timeout=300,
                          env={**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}",
                               "CVFP_NO_PROGRESS": "1"})
    assert done.returncode == 0, done.stderr
    return root, done


def test_the_tokenizer_never_sees_held_out_text(data_run):
    """Test 1: the word of a validation or test document is not a token; the word of a training document is."""
    root, _ = data_run
    tokenizer = load_tokenizer(root / "data" / "tokenizer" / "tokenizer.json")
    split = read_document_split(root / "data" / "tokenizer" / "split.json")
    documents = [json.loads(line) for line in (root / "data" / "corpus" / "documents.jsonl").open()]
    assert len(documents) == split.documents == 30
    words = [re.search(r"zq\w\wvx", d["messages"][0]["content"]).group() for d in documents]
    pieces = [len(tokenizer.encode(" " + word).ids) for word in words]
    assert pieces[:split.train_documents] == [1] * split.train_documents  # learned: one merged token each
    held_out = pieces[split.train_documents:]
    assert len(held_out) == split.val_documents + split.test_documents >= 2
    assert all(count > 1 for count in held_out), held_out  # never merged whole
    vocabulary = set(tokenizer.get_vocab())
    assert not any(("Ġ" + word) in vocabulary for word in words[split.train_documents:])
    # the same documents trained together would have merged the held-out words too (the test can fail)
    everything = train_tokenizer(documents, 2000, 2)
    assert all(len(everything.encode(" " + word).ids) == 1 for word in words)


def test_carve_cuts_where_the_tokenizer_stopped(data_run):
    """Test 2: the splits start at split.json's documents, and split.json is the rule on the stream's bytes."""
    root, done = data_run
    tokenizer_path = root / "data" / "tokenizer" / "tokenizer.json"
    split = read_document_split(root / "data" / "tokenizer" / "split.json")
    stream = load_stream(root / "data" / "cache" / "stream.safetensors", tokenizer_path)
    assert split == split_documents(stream.doc_bytes.tolist(), 0.2, 0.2)
    splits = {name: load_split(root / "data" / "splits" / f"{name}.safetensors", tokenizer_path)
              for name in ("train", "val", "test")}
    offsets = stream.doc_offsets
    assert splits["train"].num_docs == split.train_documents
    assert torch.equal(splits["train"].ids, stream.ids[:offsets[split.val_start]])
    assert torch.equal(splits["val"].ids, stream.ids[offsets[split.val_start]:offsets[split.test_start]])
    assert torch.equal(splits["test"].ids, stream.ids[offsets[split.test_start]:])  # mask drops nothing
    tokenizer_metrics = json.loads((root / "metrics" / "tokenizer.json").read_text())
    assert [tokenizer_metrics[f"{p}_documents"] for p in ("train", "val", "test")] == \
        [split.train_documents, split.val_documents, split.test_documents]
    sizes = stream.doc_bytes.tolist()
    assert tokenizer_metrics["val_document_bytes"] == sum(sizes[split.val_start:split.test_start])
    data = json.loads((root / "metrics" / "data.json").read_text())
    for name, part in splits.items():
        assert data[f"{name}_tokens"] == part.num_tokens and data[f"{name}_docs"] == part.num_docs
        assert data[f"{name}_bytes"] == part.num_bytes
        assert data[f"{name}_scored_predictions"] == int(part.scored.sum())
        assert data[f"{name}_scored_bytes"] == int(part.target_bytes[part.scored].sum())
    # the held-out words are unseen ids: masked, never scored, always counted
    assert data["val_predictions_masked"] > 0 and data["val_unseen_ids"] > 0 and data["val_coverage"] < 1
    assert data["cut_token"] == int(offsets[split.val_start])
    assert data["test_cut_token"] == int(offsets[split.test_start])
    assert "predictions masked" in done.stdout and "coverage" in done.stdout


@pytest.fixture
def data_copy(data_run, tmp_path):
    """A copy of the data run's folder, for a test that changes it."""
    import shutil

    root, _ = data_run
    shutil.copytree(root, tmp_path / "run")
    for old in ("data/splits/train.safetensors", "data/splits/val.safetensors", "data/splits/test.safetensors",
                "metrics/data.json"):
        (tmp_path / "run" / old).unlink()  # as DVC removes outs before rerunning a stage
    return tmp_path / "run"


def test_stage_refuses_a_tampered_split_and_writes_nothing(data_copy):
    path = data_copy / "data" / "tokenizer" / "split.json"
    recorded = json.loads(path.read_text())
    path.write_text(json.dumps({**recorded, "train_documents": recorded["train_documents"] + 1,
                                "val_documents": recorded["val_documents"] - 1}))
    done = run_script(str(REPO / "pipeline" / "carve.py"), data_copy)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert f"after {recorded['train_documents'] + 1} training documents" in done.stderr
    assert f"cut after {recorded['train_documents']} " in done.stderr and "rerun the 'tokenizer' stage" in done.stderr
    assert not (data_copy / "data" / "splits" / "val.safetensors").exists()
    assert not (data_copy / "metrics" / "data.json").exists()


def test_stage_unseen_fail_names_the_ids(data_copy):
    # a stream whose validation documents hold ids never seen in training, carved with unseen: fail
    tokenizer_path = data_copy / "data" / "tokenizer" / "tokenizer.json"
    tokenizer = load_tokenizer(tokenizer_path)
    table = token_byte_lengths(tokenizer)
    assert [table[i] for i in (5, 6, 200, 201)] == [1, 1, 1, 1]  # single bytes: every document holds 2 bytes
    crafted = make_stream([[5, 6]] * 6 + [[5, 201], [200, 6]] + [[5, 6]] * 2, vocab_size=tokenizer.get_vocab_size(),
                          tokenizer_sha256=sha256_file(tokenizer_path), table=table)
    save_stream(data_copy / "data" / "cache" / "stream.safetensors", crafted)
    split = split_documents(crafted.doc_bytes.tolist(), 0.2, 0.2)
    assert (split.val_start, split.test_start) == (6, 8)
    write_document_split(data_copy / "data" / "tokenizer" / "split.json", split)
    (data_copy / "params.yaml").write_text((data_copy / "params.yaml").read_text().replace("unseen: mask",
                                                                                          "unseen: fail"))
    done = run_script(str(REPO / "pipeline" / "carve.py"), data_copy)
    assert done.returncode == 2, done.stderr
    assert "carve.unseen=fail" in done.stderr and "ids 200, 201" in done.stderr
    assert not (data_copy / "data" / "splits" / "val.safetensors").exists()
    assert not (data_copy / "metrics" / "data.json").exists()
