"""Byte-level BPE: deterministic training, fixed special ids, lossless on unusual Unicode."""

import re

import pytest
from tokenizers import pre_tokenizers

from cvfp.data.corpus import BOUNDARY_TOKEN, ROLE_TOKENS, SPECIAL_TOKENS, message_contents
from cvfp.data.tokenizer import (MAX_TRAINING_WORD_CHARS, PRE_TOKENIZER_WHITESPACE, bounded_texts, byte_level_alphabet,
                                 decode, encode_prompt, load_tokenizer, save_tokenizer, special_token_ids, token_bytes,
                                 token_byte_lengths, train_tokenizer)
from cvfp.errors import ArtifactError

from conftest import UNICODE_SAMPLES

VOCAB = 300
MIN_FREQUENCY = 2
RARE = 10_000
BYTE_ALPHABET = 256
UNSEEN = "日本語のテキスト Ω ∑ \U0001F680 ünïcödé"


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


def test_prompt_is_a_user_turn_and_unseen_characters_still_encode(documents):
    tokenizer = train_tokenizer(documents, VOCAB, MIN_FREQUENCY)
    special = special_token_ids(tokenizer)
    ids = encode_prompt(tokenizer, UNSEEN)
    assert ids[:2] == [special[BOUNDARY_TOKEN], special[ROLE_TOKENS["user"]]]
    assert ids[-1] == special[ROLE_TOKENS["assistant"]]
    assert decode(tokenizer, ids[2:-1]) == UNSEEN  # byte-level BPE: no unknown token, exact round trip
    assert all(0 <= i < tokenizer.get_vocab_size() for i in ids)
    literal = encode_prompt(tokenizer, "<|user|>")
    assert literal.count(special[ROLE_TOKENS["user"]]) == 1  # typed text never becomes a special token
    assert tokenizer.encode_special_tokens is False  # the caller's tokenizer is left as it was


# ---- the safety bound on training words -------------------------------------------------------------------------

PRE_TOKENIZER = pre_tokenizers.ByteLevel(add_prefix_space=False)  # the one train_tokenizer uses


def longest_word(text):
    """Characters in the longest word the pre-tokenizer makes of `text`."""
    return max(end - start for _, (start, end) in PRE_TOKENIZER.pre_tokenize_str(text))


def test_guard_whitespace_is_the_pre_tokenizer_whitespace():
    """The guard finds long runs with its own regex; its whitespace must be exactly the pre-tokenizer's."""
    def pre_tokenizer_whitespace(char):  # "x" + 2 chars + "x": whitespace makes a word of the first char alone
        return (1, 2) in [offsets for _, offsets in PRE_TOKENIZER.pre_tokenize_str(f"x{char}{char}x")]

    whitespace_class = re.compile(f"[{PRE_TOKENIZER_WHITESPACE}]")
    bmp = [chr(code) for code in range(0x10000) if not 0xD800 <= code <= 0xDFFF]  # no whitespace lies beyond
    found = [char for char in bmp if pre_tokenizer_whitespace(char)]
    assert " " in found and "\u3000" in found and "\x1c" not in found  # Python's str.isspace() says otherwise
    assert found == [char for char in bmp if whitespace_class.fullmatch(char)]


@pytest.mark.parametrize("run", ["z" * 2500, "7" * 2500, " " * 2500, "!\x1c" * 1250, "\u3000\t" * 1250,
                                 "\U0001F600" * 2500])
def test_long_runs_are_cut_for_training(run):
    text = f"before {run} after"
    assert longest_word(text) > MAX_TRAINING_WORD_CHARS
    pieces = list(bounded_texts([text]))
    assert "".join(pieces) == text and len(pieces) == 3
    assert max(longest_word(piece) for piece in pieces) <= MAX_TRAINING_WORD_CHARS + 1  # + one leading space


def test_text_without_a_long_run_is_fed_whole(documents):
    ordinary = "an ordinary message, " * 200  # 4,200 characters, every word short
    at_the_bound = "x" * MAX_TRAINING_WORD_CHARS
    texts = [ordinary, at_the_bound, *message_contents(documents)]
    assert list(bounded_texts(texts)) == texts
    assert list(bounded_texts([at_the_bound + "x"])) == [at_the_bound, "x"]


# ---- bytes of a token -------------------------------------------------------------------------------------------

def test_the_inverted_alphabet_is_the_byte_level_alphabet():
    inverse = byte_level_alphabet()
    assert set(inverse) == set(pre_tokenizers.ByteLevel.alphabet()) and sorted(inverse.values()) == list(range(256))
    # every byte a UTF-8 text can hold maps back through the pre-tokenizer's own characters
    chars = [chr(c) for c in range(0x800)] + ["\u4e2d", "\uffff", "\U0001F600", "\U0010FFFF"]
    for char in chars:
        (written, _), = PRE_TOKENIZER.pre_tokenize_str(char)
        assert bytes(inverse[c] for c in written) == char.encode("utf-8"), repr(char)


@pytest.mark.parametrize("text", UNICODE_SAMPLES + [UNSEEN, "caf\u00e9 \u00e9\u00e9\u00e9 na\u00efve \U0001F600" * 3])
def test_token_bytes_spell_the_text_exactly(documents, text):
    """Tokens of a multi-byte character (an emoji split in two) carry its bytes, not a decoded U+FFFD."""
    tokenizer = train_tokenizer(documents + [{"messages": [{"role": "user", "content": "\U0001F600 \u00e9" * 5}]}],
                                VOCAB, MIN_FREQUENCY)
    table = token_bytes(tokenizer)
    ids = tokenizer.encode(text).ids
    assert b"".join(table[i] for i in ids) == text.encode("utf-8")
    lengths = token_byte_lengths(tokenizer)
    assert sum(lengths[i] for i in ids) == len(text.encode("utf-8"))
    assert len(lengths) == tokenizer.get_vocab_size()
    assert [lengths[i] for i in special_token_ids(tokenizer).values()] == [0, 0, 0, 0]
    assert all(n > 0 for i, n in enumerate(lengths) if i >= len(SPECIAL_TOKENS))


def test_a_vocabulary_that_is_not_byte_level_is_refused(documents):
    from tokenizers import Tokenizer, models

    broken = Tokenizer(models.BPE(vocab={"<|endoftext|>": 0, "<|user|>": 1, "<|assistant|>": 2, "<|system|>": 3,
                                         "a": 4, "\u4e2d": 5}, merges=[]))
    broken.add_special_tokens(list(SPECIAL_TOKENS))
    with pytest.raises(ArtifactError, match=r"token 5 .* not in the ByteLevel alphabet"):
        token_bytes(broken)
