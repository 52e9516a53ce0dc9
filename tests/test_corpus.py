"""Corpus sources (chitchat, hub layout, files), seeded selection, rendering and byte counts."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from datasets import Dataset

from cvfp.data import corpus
from cvfp.data.corpus import (BOUNDARY_TOKEN, document_bytes, load_corpus, read_documents, render,
                              select_documents, take_documents, write_documents)
from cvfp.errors import ArtifactError, StageError
from cvfp.params import DataParams

CHITCHAT_CONVERSATIONS = 7168


def conversation(n: int) -> list[dict]:
    return [{"role": "user", "content": f"question {n}"}, {"role": "assistant", "content": f"answer {n}"}]


@pytest.fixture(scope="module")
def chitchat():
    return load_corpus(DataParams())


def test_chitchat_has_the_ultrachat_schema_with_alternating_roles(chitchat):
    assert len(chitchat) == CHITCHAT_CONVERSATIONS
    assert chitchat.column_names == ["messages"]
    for row in chitchat.select(range(50)):
        roles = [m["role"] for m in row["messages"]]
        assert roles == [("user", "assistant")[i % 2] for i in range(len(roles))]
        assert all(isinstance(m["content"], str) for m in row["messages"])


def test_chitchat_selection_is_seeded(chitchat):
    first = select_documents(DataParams(num_samples=5), seed=0)
    assert first.corpus_documents == CHITCHAT_CONVERSATIONS
    assert take_documents(chitchat, 5, seed=0).documents == first.documents
    assert take_documents(chitchat, 5, seed=1).documents != first.documents


def test_hub_layout_from_a_local_folder(tmp_path):
    rows = [{"prompt": f"q{n}", "prompt_id": str(n), "messages": conversation(n)} for n in range(6)]
    (tmp_path / "data").mkdir()
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "data" / "train_sft-00000-of-00001.parquet")
    pq.write_table(pa.Table.from_pylist(rows[:2]), tmp_path / "data" / "test_sft-00000-of-00001.parquet")

    params = DataParams(source="hub", hub_name=str(tmp_path), hub_split="train_sft", num_samples=6)
    selection = select_documents(params, seed=0)
    assert selection.corpus_documents == 6
    assert sorted(d["messages"][0]["content"] for d in selection.documents) == [f"question {n}" for n in range(6)]
    assert all(set(d) == {"messages"} for d in selection.documents)

    with pytest.raises(StageError, match="data.hub_split='nope'"):
        load_corpus(DataParams(source="hub", hub_name=str(tmp_path), hub_split="nope"))


def test_files_txt_and_jsonl(tmp_path):
    (tmp_path / "a.txt").write_text("first line\nsecond line\n", encoding="utf-8")
    (tmp_path / "b.txt").write_bytes(b"invalid \xff byte")
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"messages": conversation(n)}) + "\n" for n in range(2)))
    (tmp_path / "d.jsonl").write_text(json.dumps({"text": "plain text row"}) + "\n")
    files = [str(tmp_path / name) for name in ("a.txt", "b.txt", "c.jsonl", "d.jsonl")]
    dataset = load_corpus(DataParams(source="files", files=files))
    messages = dataset["messages"]
    assert len(messages) == 5
    assert messages[0] == [{"role": "user", "content": "first line\nsecond line\n"}]  # one file = one document
    assert messages[1] == [{"role": "user", "content": "invalid \ufffd byte"}]
    assert messages[2] == conversation(0)
    assert messages[4] == [{"role": "user", "content": "plain text row"}]


@pytest.mark.parametrize("name, content, expected", [
    ("notes.csv", "a,b\n", "unknown extension '.csv'"),
    ("rows.jsonl", json.dumps({"body": "x"}) + "\n", "'messages' or a 'text' field"),
    ("missing.txt", None, "file not found"),
])
def test_files_errors_name_the_file(tmp_path, name, content, expected):
    if content is not None:
        (tmp_path / name).write_text(content)
    with pytest.raises(StageError, match=expected) as caught:
        load_corpus(DataParams(source="files", files=[str(tmp_path / name)]))
    assert name in str(caught.value)


def test_num_samples_beyond_the_corpus_says_how_many_exist(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps({"messages": conversation(n)}) + "\n" for n in range(3)))
    with pytest.raises(StageError, match="num_samples=4 .* only 3 documents"):
        select_documents(DataParams(source="files", files=[str(path)], num_samples=4), seed=0)


def test_empty_corpus(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("")
    with pytest.raises(StageError, match="empty: 0 documents"):
        select_documents(DataParams(source="files", files=[str(path)], num_samples=1), seed=0)


def test_documents_without_content_are_skipped_and_counted(tmp_path):
    empty = [[{"role": "user", "content": ""}], [], [{"role": "user", "content": None}]]
    rows = [conversation(0), empty[0], empty[1], conversation(1), empty[2]]
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps({"messages": m}) + "\n" for m in rows))
    dataset = load_corpus(DataParams(source="files", files=[str(path)]))
    selection = take_documents(dataset, num_samples=2, seed=0)
    # skipped counts the empty documents met in the seeded order before the selection is full
    order = [bool(m) and m[0]["content"] not in ("", None) for m in dataset.shuffle(seed=0)["messages"]]
    last_taken = [i for i, has_content in enumerate(order) if has_content][1]
    assert selection.skipped == order[:last_taken].count(False)
    assert sorted(d["messages"][0]["content"] for d in selection.documents) == ["question 0", "question 1"]
    with pytest.raises(StageError, match="only 2 documents with content .5 in total, 3 empty"):
        take_documents(dataset, num_samples=3, seed=0)


def test_seeded_order_is_a_fixed_permutation():
    dataset = Dataset.from_list([{"messages": conversation(n)} for n in range(40)])
    first = [d["messages"][0]["content"] for d in take_documents(dataset, 40, seed=3).documents]
    assert first != [f"question {n}" for n in range(40)]
    assert [d["messages"][0]["content"] for d in take_documents(dataset, 10, seed=3).documents] == first[:10]
    assert [d["messages"][0]["content"] for d in take_documents(dataset, 40, seed=4).documents] != first


def test_unknown_role_is_refused():
    dataset = Dataset.from_list([{"messages": [{"role": "narrator", "content": "x"}]}])
    with pytest.raises(StageError, match="role 'narrator'"):
        take_documents(dataset, 1, seed=0)


@pytest.mark.parametrize("content, nbytes", [
    ("\U0001F600", 4),                      # emoji: 4 UTF-8 bytes
    ("\U0001F44D\U0001F3FD", 8),            # emoji + skin tone modifier
    ("\u05e9\u05dc\u05d5\u05dd", 8),        # Hebrew (RTL), 2 bytes per letter
    ("\u202eabc", 6),                       # right-to-left override + ASCII
    ("a\x00b", 3),                          # NUL is one byte
    ("e\u0301", 3),                         # combining accent, not normalised
    ("\ud800", 3),                          # lone surrogate -> U+FFFD (3 bytes)
])
def test_byte_counts_of_unusual_unicode(content, nbytes):
    document = corpus.normalize_document([{"role": "user", "content": content}], "test")
    assert document_bytes(document) == nbytes
    assert document_bytes({"messages": [{"role": "user", "content": content}]}) == nbytes
    assert render(document).encode("utf-8")  # always encodable


def test_render_puts_role_tokens_before_contents_and_no_boundary():
    document = {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
                             {"role": "assistant", "content": "a"}]}
    assert render(document) == "<|system|>s<|user|>u<|assistant|>a"
    assert BOUNDARY_TOKEN not in render(document)
    assert document_bytes(document) == 3  # special tokens count 0 bytes


def test_documents_file_round_trip(tmp_path, documents):
    path = tmp_path / "docs" / "documents.jsonl"
    write_documents(path, documents)
    assert read_documents(path) == documents
    assert len(path.read_text(encoding="utf-8").split("\n")) == len(documents) + 1


def test_damaged_documents_file(tmp_path, documents):
    path = tmp_path / "documents.jsonl"
    write_documents(path, documents)
    path.write_text(path.read_text(encoding="utf-8")[:-20], encoding="utf-8")
    with pytest.raises(ArtifactError, match=f"documents.jsonl:{len(documents)}: .*rerun the 'tokenizer' stage"):
        read_documents(path)
    with pytest.raises(ArtifactError, match="missing"):
        read_documents(tmp_path / "none.jsonl")
