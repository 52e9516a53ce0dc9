"""Byte-level BPE tokenizer trained with HuggingFace `tokenizers`.

The special tokens come first and so get fixed ids: `<|endoftext|>` = 0, `<|user|>` = 1,
`<|assistant|>` = 2, `<|system|>` = 3. Training reads the message contents of the selected
documents in document order; the same documents and params give a byte-identical
`tokenizer.json` (no `continuing_subword_prefix`: with it training was not deterministic).

Safety bound: the trainer's time grows much faster than linearly with the length of one
pre-tokenized word (a run of letters, digits, punctuation or spaces), so a document that is one
10 MB word would stall it. Training therefore cuts every run of whitespace or of non-whitespace
longer than `MAX_TRAINING_WORD_CHARS` characters (the only places such a word can be) into pieces
of that length; a text without such a run is fed unchanged, so ordinary corpora train exactly as
before. Encoding is not affected: the cache encodes every text whole, in time linear in its length.

Bytes of a token (`token_bytes`): a byte-level token is written in the ByteLevel alphabet, one
character per byte (GPT-2's `bytes_to_unicode`); inverting that alphabet gives each vocabulary
entry's exact UTF-8 bytes, which bits per byte counts. Special tokens have no bytes. Decoding a
single token would not do: a token may hold part of a multi-byte character.

Documents and prompts encode their text literally (`literal_specials`): a "<|user|>" typed inside a
message or a prompt stays text. Special ids are placed only where documents are laid out
(`cvfp.data.cache`) and prompts (`encode_prompt`: a new document's user turn, which the model answers
as the assistant); `decode` shows them.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from cvfp.data.corpus import BOUNDARY_TOKEN, ROLE_TOKENS, SPECIAL_TOKENS, message_contents
from cvfp.errors import ArtifactError
from cvfp.io import write_text
from cvfp.runtime import progress

# A safety bound, not a hyperparameter: far longer than any word of natural text, short enough that
# training on a word of this length is cheap (measured, random letters: 100 KB 0.4 s, 1 MB 54 s).
MAX_TRAINING_WORD_CHARS = 1000
# The whitespace of the pre-tokenizer's regex (Oniguruma's \s): \t-\r, U+0085 and Unicode's separators
# Zs, Zl, Zp. Python's \s differs (it adds U+001C-U+001F), so the class is spelled out.
PRE_TOKENIZER_WHITESPACE = "\t-\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
# A pre-tokenized word lies inside one run of whitespace, or of non-whitespace after at most one space.
# The lookbehinds anchor each match at the start of its run, which keeps the search linear.
_LONG_RUN = re.compile(
    rf"(?<![^{PRE_TOKENIZER_WHITESPACE}])[^{PRE_TOKENIZER_WHITESPACE}]{{{MAX_TRAINING_WORD_CHARS + 1},}}"
    rf"|(?<![{PRE_TOKENIZER_WHITESPACE}])[{PRE_TOKENIZER_WHITESPACE}]{{{MAX_TRAINING_WORD_CHARS + 1},}}")


def bounded_texts(texts: Iterable[str]) -> Iterator[str]:
    """Yield each text, cut every `MAX_TRAINING_WORD_CHARS` characters inside any longer run of
    whitespace or of non-whitespace, so that no word the trainer sees is longer (one leading space
    aside); a text without such a run is yielded unchanged, whole."""
    for text in texts:
        if len(text) <= MAX_TRAINING_WORD_CHARS:  # no run can be longer than its text
            yield text
            continue
        cuts = [cut for run in _LONG_RUN.finditer(text)
                for cut in range(run.start() + MAX_TRAINING_WORD_CHARS, run.end(), MAX_TRAINING_WORD_CHARS)]
        for start, end in zip([0, *cuts], [*cuts, len(text)]):
            yield text[start:end]


def train_tokenizer(documents: list[dict[str, Any]], vocab_size: int, min_frequency: int) -> Tokenizer:
    """Train a byte-level BPE on the documents' message contents; the vocabulary may end up smaller
    than `vocab_size` when the corpus has fewer mergeable pairs."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        # all 256 byte symbols, so any text encodes without an unknown token
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    texts = progress(message_contents(documents), total=sum(len(d["messages"]) for d in documents),
                     desc="tokenizer: counting words", unit="msg")
    tokenizer.train_from_iterator(bounded_texts(texts), trainer=trainer)
    return tokenizer


def byte_level_alphabet() -> dict[str, int]:
    """The ByteLevel alphabet inverted: each of its 256 characters -> the byte it stands for.

    GPT-2's `bytes_to_unicode`: the printable bytes ! to ~, \xa1 to \xac and \xae to \xff stand
    for themselves; the other 68 bytes, in order, get the characters U+0100, U+0101, ...
    """
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    others = [byte for byte in range(256) if byte not in printable]
    inverse = {chr(byte): byte for byte in printable}
    inverse.update({chr(256 + n): byte for n, byte in enumerate(others)})
    return inverse


_BYTE_OF = byte_level_alphabet()  # its keys are pre_tokenizers.ByteLevel.alphabet(), the trainer's initial alphabet


def token_bytes(tokenizer: Tokenizer, origin: str | Path = "tokenizer") -> list[bytes]:
    """The UTF-8 bytes each vocabulary id stands for, indexed by id (V entries); b"" for special tokens.

    A token holding a character outside the ByteLevel alphabet is not byte-level: an ArtifactError.
    """
    specials = set(special_token_ids(tokenizer, origin).values())
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    size = tokenizer.get_vocab_size(with_added_tokens=True)
    table: list[bytes | None] = [None] * size
    for token, index in vocab.items():
        if index in specials:
            table[index] = b""
            continue
        try:
            table[index] = bytes(_BYTE_OF[char] for char in token)
        except KeyError as err:
            raise ArtifactError(f"{origin}: token {index} ({token!r}) holds {err.args[0]!r}, which is not in the "
                                f"ByteLevel alphabet; rerun the 'tokenizer' stage (dvc repro -f tokenizer)") from None
    missing = [index for index, entry in enumerate(table) if entry is None]
    if missing:
        raise ArtifactError(f"{origin}: vocabulary ids {missing[:10]} have no token; "
                            f"rerun the 'tokenizer' stage (dvc repro -f tokenizer)")
    return table  # type: ignore[return-value]


def token_byte_lengths(tokenizer: Tokenizer, origin: str | Path = "tokenizer") -> list[int]:
    """UTF-8 byte length of every vocabulary id (V entries; 0 for special tokens), see `token_bytes`."""
    return [len(entry) for entry in token_bytes(tokenizer, origin)]


def save_tokenizer(tokenizer: Tokenizer, path: str | Path) -> None:
    """Write tokenizer.json atomically."""
    write_text(path, tokenizer.to_str(pretty=True))


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Read tokenizer.json; a missing or unreadable file, or one lacking a special token, is an ArtifactError."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path}: missing; run the 'tokenizer' stage (dvc repro tokenizer)")
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as err:  # the Rust side reports parse errors as a plain Exception
        raise ArtifactError(f"{path}: unreadable tokenizer ({err}); "
                            f"rerun the 'tokenizer' stage (dvc repro -f tokenizer)") from None
    special_token_ids(tokenizer, path)
    return tokenizer


def special_token_ids(tokenizer: Tokenizer, origin: str | Path = "tokenizer") -> dict[str, int]:
    """Map each special token to its id, e.g. {"<|endoftext|>": 0, "<|user|>": 1, ...}."""
    ids = {token: tokenizer.token_to_id(token) for token in SPECIAL_TOKENS}
    missing = [token for token, index in ids.items() if index is None]
    if missing:
        raise ArtifactError(f"{origin}: special tokens missing: {', '.join(missing)}; rerun the 'tokenizer' stage")
    return ids


@contextlib.contextmanager
def literal_specials(tokenizer: Tokenizer) -> Iterator[Tokenizer]:
    """Inside the block, text that looks like a special token is encoded as text; the setting is restored after."""
    literal_before, tokenizer.encode_special_tokens = tokenizer.encode_special_tokens, True
    try:
        yield tokenizer
    finally:
        tokenizer.encode_special_tokens = literal_before


def encode_prompt(tokenizer: Tokenizer, text: str) -> list[int]:
    """`<|endoftext|> <|user|> text <|assistant|>` as ids; text that looks like a special token stays text."""
    special = special_token_ids(tokenizer)
    with literal_specials(tokenizer):
        content = tokenizer.encode(text, add_special_tokens=False).ids
    return [special[BOUNDARY_TOKEN], special[ROLE_TOKENS["user"]], *content, special[ROLE_TOKENS["assistant"]]]


def decode(tokenizer: Tokenizer, ids: Iterable[int]) -> str:
    """Text of ids with the special tokens shown (turns and document ends stay visible)."""
    return tokenizer.decode(list(ids), skip_special_tokens=False)
