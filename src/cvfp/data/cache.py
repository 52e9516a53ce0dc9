"""The token stream: every selected document tokenized and concatenated into one id sequence.

Layout (N tokens, D documents):

    ids          (N,)   int64   doc 0 tokens, <|endoftext|>, doc 1 tokens, <|endoftext|>, ...
    doc_offsets  (D+1,) int64   start of each document in `ids`; doc_offsets[D] = N
    doc_bytes    (D,)   int64   UTF-8 bytes of each document's contents (for bits per byte)

A document's tokens are, per message, its role token then the tokens of its content; the
boundary token closes every document and belongs to it. Content is encoded as plain text, so
a literal "<|user|>" typed inside a message stays text and never becomes a special id.
The same layout is used for the train, validation and test splits (see `carve`), which add
two tensors aligned with the N-1 predictions ids[t] -> ids[t+1]:

    scored       (N-1,) bool    the prediction counts in loss and bits per byte
    target_bytes (N-1,) int64   UTF-8 bytes of the target ids[t+1] (0 for a special token)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tokenizers import Tokenizer

from cvfp.data.corpus import BOUNDARY_TOKEN, ROLE_TOKENS, document_bytes, read_documents
from cvfp.data.tokenizer import literal_specials, load_tokenizer, special_token_ids
from cvfp.errors import ArtifactError
from cvfp.io import load_tensors, require_fresh, save_tensors, sha256_file
from cvfp.runtime import progress

DOCS_PER_BATCH = 256  # documents per encode_batch call: large enough to use the Rust threads
ID_DTYPE = torch.int64
PREDICTION_TENSORS = ("scored", "target_bytes")  # present in split files only


@dataclass(frozen=True)
class TokenStream:
    """Token ids with document structure, tied to the tokenizer that produced them."""

    ids: torch.Tensor          # (N,) int64
    doc_offsets: torch.Tensor  # (D+1,) int64, starts at 0, ends at N
    doc_bytes: torch.Tensor    # (D,) int64
    tokenizer_sha256: str
    vocab_size: int
    special_ids: dict[str, int]
    name: str = "stream"       # "stream", "train", "val" or "test"
    scored: torch.Tensor | None = None        # (N-1,) bool; splits only (see cvfp.data.carve)
    target_bytes: torch.Tensor | None = None  # (N-1,) int64; splits only

    @property
    def num_tokens(self) -> int:
        return int(self.ids.numel())

    @property
    def num_predictions(self) -> int:
        """Predictions ids[t] -> ids[t+1] in the stream: N-1 (0 for an empty stream)."""
        return max(self.num_tokens - 1, 0)

    @property
    def num_docs(self) -> int:
        return int(self.doc_bytes.numel())

    @property
    def num_bytes(self) -> int:
        return int(self.doc_bytes.sum())

    def doc(self, index: int) -> torch.Tensor:
        """The ids of document `index`, its boundary token included."""
        return self.ids[self.doc_offsets[index]:self.doc_offsets[index + 1]]


def encode_documents(documents: list[dict[str, Any]], tokenizer: Tokenizer, tokenizer_sha256: str) -> TokenStream:
    """Tokenize documents (in order) into one stream; see the module docstring for the layout."""
    special_ids = special_token_ids(tokenizer)
    role_ids = {role: special_ids[token] for role, token in ROLE_TOKENS.items()}
    boundary = special_ids[BOUNDARY_TOKEN]
    pieces: list[np.ndarray] = []
    lengths: list[int] = []
    # Specials are inserted by this function alone; text that looks like one is encoded as text.
    with literal_specials(tokenizer), progress(total=len(documents), desc="cache: tokenizing", unit="doc") as bar:
        for start in range(0, len(documents), DOCS_PER_BATCH):
            batch = documents[start:start + DOCS_PER_BATCH]
            contents = [m["content"] for d in batch for m in d["messages"]]
            encodings = iter(tokenizer.encode_batch(contents, add_special_tokens=False))
            for document in batch:
                ids: list[int] = []
                for message in document["messages"]:
                    ids.append(role_ids[message["role"]])
                    ids.extend(next(encodings).ids)
                ids.append(boundary)
                pieces.append(np.asarray(ids, dtype=np.int64))
                lengths.append(len(ids))
            bar.update(len(batch))
    ids = torch.from_numpy(np.concatenate(pieces)) if pieces else torch.zeros(0, dtype=ID_DTYPE)
    offsets = torch.zeros(len(lengths) + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(torch.tensor(lengths, dtype=torch.int64), 0)
    doc_bytes = torch.tensor([document_bytes(d) for d in documents], dtype=torch.int64)
    return TokenStream(ids, offsets, doc_bytes, tokenizer_sha256, tokenizer.get_vocab_size(), special_ids)


def build_stream(documents_path: str | Path, tokenizer_path: str | Path) -> TokenStream:
    """The cache stage's work: read documents.jsonl and tokenizer.json, return the stream."""
    documents = read_documents(documents_path)
    tokenizer = load_tokenizer(tokenizer_path)
    return encode_documents(documents, tokenizer, sha256_file(tokenizer_path))


def save_stream(path: str | Path, stream: TokenStream) -> None:
    """Write a stream (or split) atomically, with the tokenizer hash and special ids as metadata."""
    metadata = {
        "tokenizer_sha256": stream.tokenizer_sha256,
        "vocab_size": str(stream.vocab_size),
        "special_ids": json.dumps(stream.special_ids, sort_keys=True),
        "split": stream.name,
    }
    tensors = {"ids": stream.ids, "doc_offsets": stream.doc_offsets, "doc_bytes": stream.doc_bytes}
    for name in PREDICTION_TENSORS:
        if getattr(stream, name) is not None:
            tensors[name] = getattr(stream, name)
    save_tensors(path, tensors, metadata)


def load_token_file(path: str | Path, tokenizer_path: str | Path, stage: str) -> TokenStream:
    """Load a file written by `save_stream`, refusing it unless it was built with this tokenizer.json.

    Corruption is caught by `load_tensors`; a stale file (tokenizer changed since) names both
    hashes; an impossible layout names what is wrong. All are ArtifactErrors naming `stage`.
    """
    tensors, meta = load_tensors(path, stage)
    tokenizer_path = Path(tokenizer_path)
    if not tokenizer_path.is_file():
        raise ArtifactError(f"{tokenizer_path}: missing; run the 'tokenizer' stage (dvc repro tokenizer)")
    current = sha256_file(tokenizer_path)
    require_fresh(path, stage, {f"tokenizer {tokenizer_path}": (meta.get("tokenizer_sha256"), current)})
    try:
        stream = TokenStream(
            ids=tensors["ids"], doc_offsets=tensors["doc_offsets"], doc_bytes=tensors["doc_bytes"],
            tokenizer_sha256=current, vocab_size=int(meta["vocab_size"]),
            special_ids=json.loads(meta["special_ids"]), name=meta.get("split", "stream"),
            scored=tensors.get("scored"), target_bytes=tensors.get("target_bytes"))
    except (KeyError, ValueError) as err:
        raise ArtifactError(f"{path}: missing field {err}; rerun the '{stage}' stage (dvc repro -f {stage})") from None
    problem = layout_problem(stream)
    if problem:
        raise ArtifactError(f"{path}: {problem}; rerun the '{stage}' stage (dvc repro -f {stage})")
    return stream


def layout_problem(stream: TokenStream) -> str | None:
    """Describe the first inconsistency in a stream's tensors, or None when the layout holds."""
    ids, offsets, doc_bytes = stream.ids, stream.doc_offsets, stream.doc_bytes
    if ids.dim() != 1 or offsets.dim() != 1 or doc_bytes.dim() != 1:
        return "ids, doc_offsets and doc_bytes must be 1-D"
    if ids.dtype != ID_DTYPE or offsets.dtype != torch.int64 or doc_bytes.dtype != torch.int64:
        return "ids, doc_offsets and doc_bytes must be int64"
    if offsets.numel() != doc_bytes.numel() + 1:
        return f"{offsets.numel()} doc_offsets for {doc_bytes.numel()} documents (expected documents + 1)"
    if int(offsets[0]) != 0 or int(offsets[-1]) != ids.numel():
        return f"doc_offsets must run from 0 to {ids.numel()}, got {int(offsets[0])}..{int(offsets[-1])}"
    if bool((offsets[1:] < offsets[:-1]).any()):
        return "doc_offsets decrease"
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= stream.vocab_size):
        return f"token ids outside [0, {stream.vocab_size})"
    scored, target_bytes = stream.scored, stream.target_bytes
    if (scored is None) != (target_bytes is None):
        return "scored and target_bytes come together"
    if scored is not None:
        shape = (stream.num_predictions,)
        if tuple(scored.shape) != shape or tuple(target_bytes.shape) != shape:
            return (f"scored {tuple(scored.shape)} and target_bytes {tuple(target_bytes.shape)} must both have the "
                    f"shape {shape} of the N-1 predictions")
        if scored.dtype != torch.bool or target_bytes.dtype != torch.int64:
            return "scored must be bool and target_bytes int64"
        if target_bytes.numel() and int(target_bytes.min()) < 0:
            return "target_bytes must be >= 0"
    return None


def load_stream(path: str | Path, tokenizer_path: str | Path) -> TokenStream:
    """Load data/cache/stream.safetensors, checked against tokenizer.json (see `load_token_file`)."""
    return load_token_file(path, tokenizer_path, "cache")
