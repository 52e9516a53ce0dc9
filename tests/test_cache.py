"""Token stream cache: layout, literal special-token text, hash binding, corruption."""

import pytest
import torch

from cvfp.data.cache import build_stream, encode_documents, load_stream, save_stream
from cvfp.data.corpus import BOUNDARY_TOKEN, ROLE_TOKENS, document_bytes, render, write_documents
from cvfp.data.tokenizer import load_tokenizer, save_tokenizer, token_byte_lengths, token_bytes, train_tokenizer
from cvfp.errors import ArtifactError
from cvfp.io import sha256_file

VOCAB = 300


@pytest.fixture
def tokenizer_path(tmp_path, documents):
    path = tmp_path / "tokenizer" / "tokenizer.json"
    save_tokenizer(train_tokenizer(documents, VOCAB, 2), path)
    return path


@pytest.fixture
def stream(tmp_path, documents, tokenizer_path):
    write_documents(tmp_path / "documents.jsonl", documents)
    return build_stream(tmp_path / "documents.jsonl", tokenizer_path)


def test_stream_layout(stream, documents, tokenizer_path):
    tokenizer = load_tokenizer(tokenizer_path)
    boundary = tokenizer.token_to_id(BOUNDARY_TOKEN)
    offsets = stream.doc_offsets
    assert offsets.dtype == torch.int64 and offsets.shape == (len(documents) + 1,)
    assert int(offsets[0]) == 0 and int(offsets[-1]) == stream.num_tokens
    # exactly one boundary per document, closing it
    assert torch.nonzero(stream.ids == boundary).flatten().tolist() == (offsets[1:] - 1).tolist()
    for index, document in enumerate(documents):
        ids = stream.doc(index).tolist()
        assert ids[0] == tokenizer.token_to_id(ROLE_TOKENS[document["messages"][0]["role"]])
        assert tokenizer.decode(ids, skip_special_tokens=False) == render(document) + BOUNDARY_TOKEN
        assert int(stream.doc_bytes[index]) == document_bytes(document)
    assert stream.tokenizer_sha256 == sha256_file(tokenizer_path)
    assert stream.special_ids[BOUNDARY_TOKEN] == boundary == 0


def test_every_documents_tokens_hold_exactly_its_doc_bytes(stream, documents, tokenizer_path):
    """The bytes bits per byte divides by: per document, the token byte lengths sum to doc_bytes, and the
    tokens' bytes are the UTF-8 of its contents (emoji, RTL, NUL, U+2028 included)."""
    tokenizer = load_tokenizer(tokenizer_path)
    lengths, table = token_byte_lengths(tokenizer), token_bytes(tokenizer)
    for index, document in enumerate(documents):
        ids = stream.doc(index).tolist()
        assert sum(lengths[i] for i in ids) == int(stream.doc_bytes[index]) == document_bytes(document)
        assert b"".join(table[i] for i in ids) == "".join(m["content"] for m in document["messages"]).encode("utf-8")
    assert sum(lengths[i] for i in stream.ids.tolist()) == stream.num_bytes


def test_special_token_text_inside_a_message_stays_text(tokenizer_path):
    tokenizer = load_tokenizer(tokenizer_path)
    document = {"messages": [{"role": "user", "content": f"type {BOUNDARY_TOKEN} or <|assistant|> here"}]}
    stream = encode_documents([document], tokenizer, "hash")
    assert stream.ids.tolist().count(0) == 1  # only the closing boundary
    assert stream.ids.tolist().count(2) == 0  # no assistant turn
    assert tokenizer.decode(stream.ids.tolist(), skip_special_tokens=False) == render(document) + BOUNDARY_TOKEN
    assert tokenizer.encode_special_tokens is False  # the caller's tokenizer is left as it was


def test_save_load_round_trip(tmp_path, stream, tokenizer_path):
    path = tmp_path / "cache" / "stream.safetensors"
    save_stream(path, stream)
    loaded = load_stream(path, tokenizer_path)
    assert torch.equal(loaded.ids, stream.ids)
    assert torch.equal(loaded.doc_offsets, stream.doc_offsets)
    assert torch.equal(loaded.doc_bytes, stream.doc_bytes)
    assert (loaded.vocab_size, loaded.special_ids) == (stream.vocab_size, stream.special_ids)
    assert loaded.scored is None and loaded.target_bytes is None  # the whole stream has no scoring tensors
    assert loaded.num_predictions == stream.num_tokens - 1


def test_stale_tokenizer_names_both_hashes(tmp_path, stream, documents, tokenizer_path):
    path = tmp_path / "stream.safetensors"
    save_stream(path, stream)
    old = sha256_file(tokenizer_path)
    save_tokenizer(train_tokenizer(documents, VOCAB + 20, 2), tokenizer_path)
    new = sha256_file(tokenizer_path)
    with pytest.raises(ArtifactError) as caught:
        load_stream(path, tokenizer_path)
    message = str(caught.value)
    assert old in message and new in message and "rerun the 'cache' stage" in message


def test_truncated_and_bit_flipped_files_are_detected(tmp_path, stream, tokenizer_path):
    path = tmp_path / "stream.safetensors"
    save_stream(path, stream)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ArtifactError, match="stream.safetensors"):
        load_stream(path, tokenizer_path)
    flipped = bytearray(data)
    flipped[-3] ^= 0x01  # inside the tensor data, past the header
    path.write_bytes(bytes(flipped))
    with pytest.raises(ArtifactError, match="stream.safetensors: content hash mismatch"):
        load_stream(path, tokenizer_path)


def test_missing_inputs_name_the_stage_to_run(tmp_path, tokenizer_path):
    with pytest.raises(ArtifactError, match="run the 'tokenizer' stage"):
        build_stream(tmp_path / "documents.jsonl", tokenizer_path)
    with pytest.raises(ArtifactError, match="run the 'cache' stage"):
        load_stream(tmp_path / "stream.safetensors", tokenizer_path)
