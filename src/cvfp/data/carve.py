"""Validation carving: the tail of the token stream, cut at a document boundary, is validation.

With N stream tokens, the cut is the first document start at or after (1 - val_fraction) * N;
documents before it are training, documents from it on are validation, so the two are
disjoint and validation is exactly the tail. A random split is refused (seed rule).

Every validation token id must occur in training. `val_coverage` is the fraction of
validation tokens (before any drop) whose id occurs in training; the `unseen` policy then
either drops the validation documents holding an unseen id (`drop_docs`, counted) or stops
the stage naming the ids (`fail`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from fractions import Fraction
from pathlib import Path
from typing import Any, get_args

import torch

from cvfp.data.cache import TokenStream, load_token_file, save_stream
from cvfp.errors import StageError
from cvfp.params import CarveParams

CARVE_METHODS = get_args(CarveParams.model_fields["method"].annotation)  # the schema's ("tail",)
IDS_NAMED = 10  # unseen ids quoted in an error message


@dataclass(frozen=True)
class Carve:
    """The two splits and what the carve measured; doc indices refer to the stream."""

    train: TokenStream
    val: TokenStream                # after the unseen policy
    cut_doc: int                    # first validation document
    cut_token: int                  # stream index where validation starts (= doc_offsets[cut_doc])
    val_tokens_before_drop: int
    val_docs_before_drop: int
    val_tokens_covered: int         # validation tokens (before drop) whose id occurs in train
    unseen_ids: torch.Tensor        # (U,) sorted ids found in validation but never in train
    dropped_docs: torch.Tensor      # (K,) stream indices of dropped validation documents

    @property
    def val_coverage(self) -> float:
        return self.val_tokens_covered / self.val_tokens_before_drop

    def metrics(self) -> dict[str, Any]:
        """The numbers written to metrics/data.json."""
        return {
            "train_tokens": self.train.num_tokens,
            "val_tokens": self.val.num_tokens,
            "train_docs": self.train.num_docs,
            "val_docs": self.val.num_docs,
            "val_docs_dropped": int(self.dropped_docs.numel()),
            "val_tokens_dropped": self.val_tokens_before_drop - self.val.num_tokens,
            "val_coverage": self.val_coverage,
            "val_unseen_ids": int(self.unseen_ids.numel()),
            "vocab_size": self.train.vocab_size,
            "train_bytes": self.train.num_bytes,
            "val_bytes": self.val.num_bytes,
            "cut_token": self.cut_token,
        }


def cut_document(doc_offsets: torch.Tensor, val_fraction: float) -> int:
    """Index of the first document starting at or after token (1 - val_fraction) * N.

    doc_offsets: (D+1,) int64 with doc_offsets[D] = N, so the answer lies in [0, D].
    """
    total = int(doc_offsets[-1])
    # The decimal as written in params.yaml, so 0.7 of 10 tokens cuts at exactly 3 (float: 3.0000000000000004).
    target = math.ceil((1 - Fraction(repr(val_fraction))) * total)
    return int(torch.searchsorted(doc_offsets, torch.tensor([target], dtype=doc_offsets.dtype), side="left")[0])


def _slice_docs(stream: TokenStream, first: int, last: int, name: str) -> TokenStream:
    """Documents [first, last) of `stream` as a stream of their own (offsets re-based to 0)."""
    start, stop = int(stream.doc_offsets[first]), int(stream.doc_offsets[last])
    return replace(stream, ids=stream.ids[start:stop].clone(),
                   doc_offsets=stream.doc_offsets[first:last + 1] - start,
                   doc_bytes=stream.doc_bytes[first:last].clone(), name=name)


def _keep_docs(stream: TokenStream, keep: torch.Tensor, doc_of_token: torch.Tensor) -> TokenStream:
    """The documents of `stream` where `keep` (D,) bool is set; doc_of_token (N,) maps tokens to documents."""
    lengths = (stream.doc_offsets[1:] - stream.doc_offsets[:-1])[keep]
    offsets = torch.zeros(lengths.numel() + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(lengths, 0)
    return replace(stream, ids=stream.ids[keep[doc_of_token]], doc_offsets=offsets, doc_bytes=stream.doc_bytes[keep])


def carve(stream: TokenStream, *, val_fraction: float, unseen: str = "drop_docs", method: str = "tail") -> Carve:
    """Split `stream` into training (head) and validation (tail), applying the unseen-id policy.

    The keywords are the `carve` params section. Its schema bounds val_fraction to (0, 1) and unseen
    to drop_docs | fail, which are not checked again here; the method is, for callers passing raw
    arguments, since a random split breaks the seed rule."""
    if method not in CARVE_METHODS:
        raise StageError(f"carve.method={method!r} is refused: allowed {', '.join(CARVE_METHODS)} "
                         f"(validation is the tail of the stream; a random split is forbidden)")
    docs = stream.num_docs
    cut = cut_document(stream.doc_offsets, val_fraction) if docs else 0
    if cut == 0 or cut == docs or int(stream.doc_offsets[cut]) == stream.num_tokens:
        raise StageError(
            f"carve.val_fraction={val_fraction} leaves an empty split: {cut} training and {docs - cut} validation "
            f"documents (of {docs}, {stream.num_tokens} tokens); use more data.num_samples or another val_fraction")
    train = _slice_docs(stream, 0, cut, "train")
    val = _slice_docs(stream, cut, docs, "val")

    seen = torch.zeros(stream.vocab_size, dtype=torch.bool)
    seen[train.ids] = True
    covered = seen[val.ids]                                    # (Nv,) bool
    doc_lengths = val.doc_offsets[1:] - val.doc_offsets[:-1]
    doc_of_token = torch.repeat_interleave(torch.arange(val.num_docs), doc_lengths)  # (Nv,)
    has_unseen = torch.zeros(val.num_docs, dtype=torch.bool)
    has_unseen[doc_of_token[~covered]] = True
    unseen_ids = torch.unique(val.ids[~covered])
    bad_docs = int(has_unseen.sum())

    if unseen_ids.numel() and unseen == "fail":
        named = ", ".join(str(i) for i in unseen_ids[:IDS_NAMED].tolist())
        more = f" and {unseen_ids.numel() - IDS_NAMED} more" if unseen_ids.numel() > IDS_NAMED else ""
        raise StageError(
            f"carve.unseen=fail: {unseen_ids.numel()} validation token ids never occur in training "
            f"(ids {named}{more}), in {bad_docs} of {val.num_docs} validation documents "
            f"({int((~covered).sum())} of {val.num_tokens} tokens); use carve.unseen: drop_docs")
    if bad_docs == val.num_docs:
        raise StageError(
            f"carve.unseen=drop_docs would drop all {val.num_docs} validation documents (each holds an id never "
            f"seen in training; carve.val_fraction={val_fraction}, {train.num_docs} training documents); "
            f"use more data.num_samples")
    kept = _keep_docs(val, ~has_unseen, doc_of_token) if bad_docs else val
    return Carve(train=train, val=kept, cut_doc=cut, cut_token=int(stream.doc_offsets[cut]),
                 val_tokens_before_drop=val.num_tokens, val_docs_before_drop=val.num_docs,
                 val_tokens_covered=int(covered.sum()), unseen_ids=unseen_ids,
                 dropped_docs=torch.nonzero(has_unseen).flatten() + cut)


def save_splits(result: Carve, train_path: str | Path, val_path: str | Path) -> None:
    """Write data/splits/{train,val}.safetensors (each with tokenizer hash and split name)."""
    save_stream(train_path, result.train)
    save_stream(val_path, result.val)


def load_split(path: str | Path, tokenizer_path: str | Path) -> TokenStream:
    """Load a split for a later stage, refusing it unless it was built with this tokenizer.json."""
    return load_token_file(path, tokenizer_path, "carve")
