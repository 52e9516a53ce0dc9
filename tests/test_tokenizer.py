"""Byte-level BPE: deterministic training, fixed special ids, lossless on unusual Unicode."""

import pytest

from cvfp.data.corpus import SPECIAL_TOKENS
from cvfp.data.tokenizer import load_tokenizer, save_tokenizer, special_token_ids, train_tokenizer
from cvfp.io import ArtifactError

from conftest import UNICODE_SAMPLES

VOCAB = 300
MIN_FREQUENCY = 2
RARE = 10_000
BYTE_ALPHABET = 256


def test_training_twice_gives_byte_identical_files(tmp_path, documents):
    for name in ("a", "b"):
        save_tokenizer(train_tokenizer(documents, VOCAB, MIN_FREQUENCY), tmp_path / name / "tokenizer.json")
    assert (tmp_path / "a" / "tokenizer.json").read_bytes() == (tmp_path / "b" / "tokenizer.json").read_bytes()


def test_special_tokens_have_fixed_ids(tmp_path, documents):
    path = tmp_path / "tokenizer.json"
    save_tokenizer(train_tokenizer(documents, VOCAB, MIN_FREQUENCY), path)
    tokenizer = load_tokenizer(path)
    assert special_token_ids(tokenizer) == {token: index for index, token in enumerate(SPECIAL_TOKENS)}
    assert SPECIAL_TOKENS == ("<|endoftext|>", "<|user|>", "<|assistant|>", "<|system|>")
    assert tokenizer.get_vocab_size() <= VOCAB


def test_vocab_size_and_min_frequency_change_the_result(documents):
    base = train_tokenizer(documents, VOCAB, MIN_FREQUENCY)
    assert train_tokenizer(documents, VOCAB + 10, MIN_FREQUENCY).to_str() != base.to_str()
    # no pair is frequent enough to merge: only the byte alphabet and the specials remain
    assert train_tokenizer(documents, VOCAB, RARE).get_vocab_size() == BYTE_ALPHABET + len(SPECIAL_TOKENS)


@pytest.mark.parametrize("text", UNICODE_SAMPLES + ["unseen \U0001F9EA\u4e2d\u6587 bytes"])
def test_any_text_round_trips(documents, text):
    tokenizer = train_tokenizer(documents, VOCAB, MIN_FREQUENCY)
    ids = tokenizer.encode(text).ids
    assert tokenizer.decode(ids) == text


def test_missing_or_broken_tokenizer_file(tmp_path):
    with pytest.raises(ArtifactError, match="missing; run the 'tokenizer' stage"):
        load_tokenizer(tmp_path / "tokenizer.json")
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="tokenizer.json: unreadable"):
        load_tokenizer(tmp_path / "tokenizer.json")
