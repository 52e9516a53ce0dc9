"""Corpus sources (chitchat, hub layout, files), seeded selection, rendering and byte counts."""

import json
from fractions import Fraction

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from datasets import Dataset
from hypothesis import given, settings, strategies as st

from cvfp.data import corpus
from cvfp.data.corpus import (BOUNDARY_TOKEN, DocumentSplit, document_bytes, load_corpus, read_document_split,
                              read_documents, render, select_documents, split_documents, take_documents,
                              write_document_split, write_documents)
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
    (tmp_path / "b.txt").write_bytes("caf\u00e9 \U0001F600 \t\x00".encode("utf-8"))  # a NUL among text is text
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"messages": conversation(n)}) + "\n" for n in range(2)))
    (tmp_path / "d.jsonl").write_text(json.dumps({"text": "plain text row"}) + "\n")
    files = [str(tmp_path / name) for name in ("a.txt", "b.txt", "c.jsonl", "d.jsonl")]
    dataset = load_corpus(DataParams(source="files", files=files))
    messages = dataset["messages"]
    assert len(messages) == 5
    assert messages[0] == [{"role": "user", "content": "first line\nsecond line\n"}]  # one file = one document
    assert messages[1] == [{"role": "user", "content": "caf\u00e9 \U0001F600 \t\x00"}]
    assert messages[2] == conversation(0)
    assert messages[4] == [{"role": "user", "content": "plain text row"}]


@pytest.mark.parametrize("name, data, where", [
    ("bytes.txt", b"invalid \xff byte", "byte offset 8 (line 1)"),
    ("cut.txt", "line one\nsecond \u00e9".encode("utf-8")[:-1], "byte offset 16 (line 2)"),  # a truncated character
    ("latin1.txt", "caf\u00e9".encode("latin-1"), "byte offset 3 (line 1)"),
    ("rows.jsonl", b'{"text": "fine"}\n{"text": "bad \xc3\x28"}\n', "byte offset 31 (line 2)"),
    ("surrogate.txt", b"encoded surrogate \xed\xa0\x80", "byte offset 18 (line 1)"),  # CESU-8, not UTF-8
])
def test_files_that_are_not_utf8_name_the_file_and_the_offset(tmp_path, name, data, where):
    (tmp_path / name).write_bytes(data)
    with pytest.raises(StageError) as caught:
        load_corpus(DataParams(source="files", files=[str(tmp_path / name)]))
    message = str(caught.value)
    assert f"{tmp_path / name}: not valid UTF-8: {where}" in message
    assert "\n" not in message


@pytest.mark.parametrize("name, data, where", [
    ("binary.txt", bytes(range(32)) * 10, "binary.txt: 290 of 320 characters are control characters"),
    ("rows.jsonl", b'{"text": "fine"}\n\n{"text": "\\u0000\\u0001\\u0002ab"}\n', "rows.jsonl:3: 3 of 5 characters"),
    ("chat.jsonl", json.dumps({"messages": [{"role": "user", "content": "hi"},
                                            {"role": "assistant", "content": "\x07" * 3}]}).encode() + b"\n",
     "chat.jsonl:1: 3 of 5 characters"),
])
def test_documents_of_mostly_control_characters_are_refused(tmp_path, name, data, where):
    (tmp_path / name).write_bytes(data)
    with pytest.raises(StageError, match="not text") as caught:
        load_corpus(DataParams(source="files", files=[str(tmp_path / name)]))
    assert where in str(caught.value)


def test_half_control_characters_or_tabs_and_newlines_are_still_text(tmp_path):
    texts = {"half.txt": "\x00\x01ab", "layout.txt": "\t\t\n\r\n\ra", "escape.txt": "\x1b[1mbold\x1b[0m"}
    for name, text in texts.items():
        (tmp_path / name).write_text(text, encoding="utf-8", newline="")
    dataset = load_corpus(DataParams(source="files", files=[str(tmp_path / name) for name in texts]))
    assert len(dataset) == 3


def test_a_hub_document_of_control_characters_is_refused_naming_it():
    binary = [{"role": "user", "content": "\x01" * 9}]
    dataset = Dataset.from_list([{"messages": conversation(0)}, {"messages": binary}])
    with pytest.raises(StageError, match=r"the corpus, document \d in seeded order: 9 of 9 characters are control"):
        take_documents(dataset, 2, seed=0)


def test_the_control_class_is_unicode_category_cc_without_tab_newline_return():
    import unicodedata

    bmp = [chr(c) for c in range(0x10000) if not 0xD800 <= c <= 0xDFFF]  # Cc lies inside U+0000-U+009F
    refused = [char for char in bmp if corpus.control_problem(char) is not None]  # 1 of 1 characters
    assert refused == [char for char in bmp if unicodedata.category(char) == "Cc" and char not in "\t\n\r"]
    assert len(refused) == 62


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


# ---- the held-out rule ------------------------------------------------------------------------------------------

def test_held_out_rule_cuts_at_the_first_document_starting_past_each_fraction():
    sizes = [10, 30, 20, 15, 5, 10, 10]  # starts 0 10 40 60 75 80 90, total 100
    split = split_documents(sizes, val_fraction=0.2, test_fraction=0.15)
    # val: first start >= 65 is 75 (doc 4); test: first start >= 85 is 90 (doc 6)
    assert split == DocumentSplit(4, 2, 1, 0.2, 0.15)
    assert split.parts() == {"train": range(0, 4), "val": range(4, 6), "test": range(6, 7)}
    assert (split.val_start, split.test_start, split.documents) == (4, 6, 7)
    # a start exactly at the fraction belongs to the held-out part
    assert split_documents([25, 25, 25, 25], 0.25, 0.25) == DocumentSplit(2, 1, 1, 0.25, 0.25)


@pytest.mark.parametrize("sizes, fractions, counts", [
    ([1, 99], (0.2, 0.1), "2 training, 0 validation and 0 test documents"),
    ([50, 40, 10], (0.05, 0.1), "2 training, 0 validation and 1 test documents"),
    ([30, 30, 30], (0.1, 0.1), "3 training, 0 validation and 0 test documents"),
    ([], (0.1, 0.1), "0 training, 0 validation and 0 test documents"),
])
def test_held_out_rule_refuses_an_empty_part(sizes, fractions, counts):
    with pytest.raises(StageError, match=f"empty split: {counts}") as caught:
        split_documents(sizes, *fractions)
    assert f"carve.val_fraction={fractions[0]}" in str(caught.value) and "data.num_samples" in str(caught.value)


@settings(max_examples=300, deadline=None)
@given(sizes=st.lists(st.integers(1, 50), min_size=3, max_size=30), val=st.floats(0.01, 0.5),
       test=st.floats(0.01, 0.49))
def test_held_out_rule_matches_its_definition(sizes, val, test):
    total = sum(sizes)
    starts = [sum(sizes[:k]) for k in range(len(sizes))]
    val_start = next((k for k, s in enumerate(starts) if s >= (1 - Fraction(repr(val)) - Fraction(repr(test))) * total),
                     len(sizes))
    test_start = next((k for k, s in enumerate(starts) if s >= (1 - Fraction(repr(test))) * total), len(sizes))
    if not (0 < val_start < test_start < len(sizes)):
        with pytest.raises(StageError):
            split_documents(sizes, val, test)
        return
    split = split_documents(sizes, val, test)
    assert (split.train_documents, split.val_documents, split.test_documents) == \
        (val_start, test_start - val_start, len(sizes) - test_start)


def test_split_file_round_trip_and_damage(tmp_path):
    split = DocumentSplit(150, 15, 15, 0.15, 0.15)
    path = tmp_path / "tokenizer" / "split.json"
    write_document_split(path, split)
    assert json.loads(path.read_text()) == {"train_documents": 150, "val_documents": 15, "test_documents": 15,
                                            "val_fraction": 0.15, "test_fraction": 0.15}
    assert read_document_split(path) == split
    for damaged in ('{"train_documents": 150}', '{"train_documents": -1, "val_documents": 1, "test_documents": 1, '
                    '"val_fraction": 0.1, "test_fraction": 0.1}', '[1, 2]', '{"train'):
        path.write_text(damaged)
        with pytest.raises(ArtifactError, match=r"split.json: .*rerun the 'tokenizer' stage"):
            read_document_split(path)
    with pytest.raises(ArtifactError, match="missing; run the 'tokenizer' stage"):
        read_document_split(tmp_path / "none.json")
