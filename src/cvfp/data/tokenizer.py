"""Byte-level BPE tokenizer trained with HuggingFace `tokenizers`.

The special tokens come first and so get fixed ids: `<|endoftext|>` = 0, `<|user|>` = 1,
`<|assistant|>` = 2, `<|system|>` = 3. Training reads the message contents of the selected
documents in document order; the same documents and params give a byte-identical
`tokenizer.json` (no `continuing_subword_prefix`: with it training was not deterministic).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from cvfp.data.corpus import SPECIAL_TOKENS, message_contents
from cvfp.io import ArtifactError, write_text
from cvfp.runtime import progress


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
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


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
