"""Carving: the tail of the token stream, cut at document boundaries, is validation, then test.

Where each part starts is the held-out rule `cvfp.data.corpus.split_documents` applied to the
stream's doc_bytes: the documents the tokenizer stage held out of its training, as its
data/tokenizer/split.json records (`require_split` checks the two agree). The parts
train | val | test are disjoint and in stream order; a random split is refused (seed rule).

Unseen ids (seed rule: every held-out token id must also occur in training). A part's
coverage is the fraction of its tokens, before any policy, whose id occurs in training. The
`carve.unseen` policy:

- `mask`: every held-out document stays whole; a prediction ids[t] -> ids[t+1] whose input or
  target id never occurs in training is not scored, and is counted as masked.
- `drop_docs`: the held-out documents holding an unseen id are removed, and counted.
- `fail`: an unseen id stops the stage, naming the ids.

Scoring rule, the same for every model: a prediction is scored only if its target is a text
token (a role or boundary token has no bytes) whose ids, input and target, occur in training.
Bits per byte = nats summed over the scored predictions / ln 2 / their targets' UTF-8 bytes.
Each split therefore carries `scored` and `target_bytes`, aligned with its N-1 predictions.

A held-out part whose predictions go unscored because of unseen ids (masked, or lost with the
dropped documents) beyond `carve.max_unscored_fraction` of its predictions before the policy
is an error naming the numbers, and so is a part left with no scored prediction.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from fractions import Fraction
from pathlib import Path
from typing import Any, Sequence, get_args

import torch

from cvfp.data.cache import TokenStream, load_token_file, save_stream
from cvfp.data.corpus import DocumentSplit, read_document_split, split_documents
from cvfp.errors import ArtifactError, StageError
from cvfp.params import CarveParams

CARVE_METHODS = get_args(CarveParams.model_fields["method"].annotation)  # the schema's ("tail",)
HELD_OUT = {"val": "validation", "test": "test"}
IDS_NAMED = 10  # unseen ids quoted in an error message


@dataclass(frozen=True)
class HeldOut:
    """One held-out part (val or test) and what the unseen-id policy did to it."""

    stream: TokenStream             # after the policy, with scored and target_bytes
    first_doc: int                  # stream index of the part's first document
    first_token: int                # stream index of its first token (= stream doc_offsets[first_doc])
    tokens_before_policy: int
    docs_before_policy: int
    tokens_covered: int             # tokens (before the policy) whose id occurs in train
    unseen_ids: torch.Tensor        # (U,) sorted ids found in this part but never in train
    docs_with_unseen: int           # documents (before the policy) holding an unseen id
    dropped_docs: torch.Tensor      # (K,) stream indices of the dropped documents (drop_docs only)
    predictions_masked: int         # predictions of text targets not scored for an unseen id

    @property
    def coverage(self) -> float:
        return self.tokens_covered / self.tokens_before_policy

    @property
    def tokens_dropped(self) -> int:
        return self.tokens_before_policy - self.stream.num_tokens

    @property
    def predictions_before_policy(self) -> int:
        return self.tokens_before_policy - 1

    @property
    def unscored_unseen(self) -> int:
        """Predictions unscored because of unseen ids: masked, or gone with the dropped documents."""
        return self.predictions_masked + self.tokens_dropped


@dataclass(frozen=True)
class Carve:
    """The three splits and what the carve measured; doc and token indices refer to the stream."""

    train: TokenStream
    val: HeldOut
    test: HeldOut
    split: DocumentSplit
    unseen_policy: str              # carve.unseen: mask, drop_docs or fail

    @property
    def cut_doc(self) -> int:
        """First validation document."""
        return self.val.first_doc

    @property
    def cut_token(self) -> int:
        """Stream index where validation starts."""
        return self.val.first_token

    def streams(self) -> dict[str, TokenStream]:
        return {"train": self.train, "val": self.val.stream, "test": self.test.stream}

    def metrics(self) -> dict[str, Any]:
        """The numbers written to metrics/data.json, each with its denominator beside it.

        Per split: tokens, docs, bytes, predictions (tokens - 1), scored_predictions (of
        predictions), scored_bytes (of bytes). Per held-out part, before the policy:
        tokens_covered and coverage (of tokens + tokens_dropped), unseen_ids (of vocab_size),
        docs_dropped (of docs + docs_dropped), tokens_dropped, predictions_masked (of
        predictions), unscored_unseen (masked + tokens dropped, of predictions_before_policy;
        under `mask` the two denominators are equal).
        """
        metrics: dict[str, Any] = {"vocab_size": self.train.vocab_size, "unseen_policy": self.unseen_policy,
                                   "cut_token": self.val.first_token, "test_cut_token": self.test.first_token}
        for name, stream in self.streams().items():
            metrics.update({
                f"{name}_tokens": stream.num_tokens,
                f"{name}_docs": stream.num_docs,
                f"{name}_bytes": stream.num_bytes,
                f"{name}_predictions": stream.num_predictions,
                f"{name}_scored_predictions": int(stream.scored.sum()),
                f"{name}_scored_bytes": int(stream.target_bytes[stream.scored].sum()),
            })
        for name, part in (("val", self.val), ("test", self.test)):
            metrics.update({
                f"{name}_tokens_covered": part.tokens_covered,
                f"{name}_coverage": part.coverage,
                f"{name}_unseen_ids": int(part.unseen_ids.numel()),
                f"{name}_docs_dropped": int(part.dropped_docs.numel()),
                f"{name}_tokens_dropped": part.tokens_dropped,
                f"{name}_predictions_masked": part.predictions_masked,
                f"{name}_unscored_unseen": part.unscored_unseen,
                f"{name}_predictions_before_policy": part.predictions_before_policy,
            })
        return metrics


def require_split(path: str | Path, stream: TokenStream, val_fraction: float, test_fraction: float) -> DocumentSplit:
    """The held-out rule applied to the stream's doc_bytes, refused (ArtifactError naming both answers)
    unless it is what the tokenizer stage wrote to `path` (data/tokenizer/split.json)."""
    recorded = read_document_split(path)
    if (recorded.val_fraction, recorded.test_fraction) != (val_fraction, test_fraction):
        raise ArtifactError(
            f"{path}: written for carve.val_fraction={recorded.val_fraction}, carve.test_fraction="
            f"{recorded.test_fraction}, but params.yaml has {val_fraction}, {test_fraction}; the tokenizer was "
            f"trained on other documents; rerun the 'tokenizer' stage and those after it (dvc repro -f carve)")
    computed = split_documents(stream.doc_bytes.tolist(), val_fraction, test_fraction)
    if computed != recorded:
        raise ArtifactError(
            f"{path}: the tokenizer stage held out after {recorded.train_documents} training documents "
            f"({recorded.describe()}), but the stream's doc_bytes put the cut after {computed.train_documents} "
            f"({computed.describe()}); rerun the 'tokenizer' stage and those after it (dvc repro -f carve)")
    return computed


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


def _doc_of_token(stream: TokenStream) -> torch.Tensor:
    """(N,) index of the document each token belongs to."""
    return torch.repeat_interleave(torch.arange(stream.num_docs), stream.doc_offsets[1:] - stream.doc_offsets[:-1])


def _with_scores(stream: TokenStream, token_bytes: torch.Tensor, special: torch.Tensor,
                 seen: torch.Tensor) -> tuple[TokenStream, int]:
    """`stream` with `scored` and `target_bytes` set by the scoring rule, and the number of masked predictions.

    token_bytes (V,) int64, special (V,) bool, seen (V,) bool: ids that occur in training.
    """
    inputs, targets = stream.ids[:-1], stream.ids[1:]          # (N-1,) each
    text = ~special[targets]
    both_seen = seen[inputs] & seen[targets]
    scored = text & both_seen
    return replace(stream, scored=scored, target_bytes=token_bytes[targets].clone()), int((text & ~both_seen).sum())


def _check_content_bytes(stream: TokenStream, token_bytes: torch.Tensor) -> None:
    """Every document's tokens must hold exactly its doc_bytes: the bytes bits per byte divides by."""
    cumulative = torch.zeros(stream.num_tokens + 1, dtype=torch.int64)
    cumulative[1:] = torch.cumsum(token_bytes[stream.ids], 0)
    held = cumulative[stream.doc_offsets[1:]] - cumulative[stream.doc_offsets[:-1]]   # (D,)
    wrong = torch.nonzero(held != stream.doc_bytes).flatten()
    if wrong.numel():
        k = int(wrong[0])
        raise ArtifactError(f"stream document {k}: its tokens hold {int(held[k])} UTF-8 bytes but doc_bytes says "
                            f"{int(stream.doc_bytes[k])} ({wrong.numel()} documents disagree); the stream does not "
                            f"match tokenizer.json; rerun the 'cache' stage (dvc repro -f cache)")


def _held_out(stream: TokenStream, docs: range, name: str, seen: torch.Tensor, token_bytes: torch.Tensor,
              special: torch.Tensor, unseen: str) -> HeldOut:
    """Documents `docs` of the stream as the held-out part `name`, after the unseen-id policy."""
    part = _slice_docs(stream, docs.start, docs.stop, name)
    covered = seen[part.ids]                                   # (Np,) bool
    doc_of_token = _doc_of_token(part)                         # (Np,)
    has_unseen = torch.zeros(part.num_docs, dtype=torch.bool)
    has_unseen[doc_of_token[~covered]] = True
    dropped = has_unseen if unseen == "drop_docs" else torch.zeros_like(has_unseen)
    kept = _keep_docs(part, ~dropped, doc_of_token) if bool(dropped.any()) else part
    kept, masked = _with_scores(kept, token_bytes, special, seen)
    return HeldOut(stream=kept, first_doc=docs.start, first_token=int(stream.doc_offsets[docs.start]),
                   tokens_before_policy=part.num_tokens, docs_before_policy=part.num_docs,
                   tokens_covered=int(covered.sum()), unseen_ids=torch.unique(part.ids[~covered]),
                   docs_with_unseen=int(has_unseen.sum()),
                   dropped_docs=torch.nonzero(dropped).flatten() + docs.start, predictions_masked=masked)


def _percent(count: int, total: int) -> str:
    return f"{100 * count / max(total, 1):.1f}%"


def _unseen_summary(part: HeldOut, name: str) -> str:
    ids, label = part.unseen_ids, HELD_OUT[name]
    named = ", ".join(str(i) for i in ids[:IDS_NAMED].tolist())
    more = f" and {ids.numel() - IDS_NAMED} more" if ids.numel() > IDS_NAMED else ""
    return (f"{ids.numel()} {label} token ids never occur in training (ids {named}{more}), in "
            f"{part.docs_with_unseen} of {part.docs_before_policy} {label} documents "
            f"({part.tokens_before_policy - part.tokens_covered} of {part.tokens_before_policy} tokens)")


def carve(stream: TokenStream, token_bytes: Sequence[int] | torch.Tensor, *, val_fraction: float,
          test_fraction: float, unseen: str = "mask", method: str = "tail",
          max_unscored_fraction: float = 0.5) -> Carve:
    """Split `stream` into train | val | test by the held-out rule and apply the unseen-id policy.

    token_bytes: (V,) UTF-8 bytes of every vocabulary id, 0 for special tokens
    (`cvfp.data.tokenizer.token_byte_lengths`). The keywords are the `carve` params section; its
    schema bounds the fractions and the policy, which are not checked again here; the method is,
    for callers passing raw arguments, since a random split breaks the seed rule.
    """
    if method not in CARVE_METHODS:
        raise StageError(f"carve.method={method!r} is refused: allowed {', '.join(CARVE_METHODS)} "
                         f"(validation and test are the tail of the stream; a random split is forbidden)")
    token_bytes = torch.as_tensor(token_bytes, dtype=torch.int64)
    if token_bytes.shape != (stream.vocab_size,):
        raise ArtifactError(f"the tokenizer has {token_bytes.numel()} ids but the stream's vocabulary "
                            f"{stream.vocab_size}; rerun the 'cache' stage (dvc repro -f cache)")
    _check_content_bytes(stream, token_bytes)
    split = split_documents(stream.doc_bytes.tolist(), val_fraction, test_fraction)
    train = _slice_docs(stream, 0, split.val_start, "train")
    seen = torch.zeros(stream.vocab_size, dtype=torch.bool)
    seen[train.ids] = True
    special = torch.zeros(stream.vocab_size, dtype=torch.bool)
    special[list(stream.special_ids.values())] = True
    train, _ = _with_scores(train, token_bytes, special, seen)
    parts = {name: _held_out(stream, docs, name, seen, token_bytes, special, unseen)
             for name, docs in split.parts().items() if name in HELD_OUT}

    failing = [_unseen_summary(part, name) for name, part in parts.items() if part.unseen_ids.numel()]
    if failing and unseen == "fail":
        raise StageError(f"carve.unseen=fail: {'; '.join(failing)}; use carve.unseen: mask or drop_docs")
    limit = Fraction(repr(max_unscored_fraction))
    for name, part in parts.items():
        label = HELD_OUT[name]
        if part.stream.num_docs == 0:
            raise StageError(
                f"carve.unseen=drop_docs would drop all {part.docs_before_policy} {label} documents (each holds an id "
                f"never seen in training; {split.describe()}); use more data.num_samples or carve.unseen: mask")
        if part.unscored_unseen > limit * part.predictions_before_policy:
            how = (f"{part.predictions_masked:,} masked" if unseen == "mask" else
                   f"{part.dropped_docs.numel()} of {part.docs_before_policy} documents, {part.tokens_dropped:,} of "
                   f"{part.tokens_before_policy:,} tokens dropped")
            raise StageError(
                f"{name}: {part.unscored_unseen:,} of {part.predictions_before_policy:,} predictions unscored "
                f"({_percent(part.unscored_unseen, part.predictions_before_policy)}) because "
                f"{part.unseen_ids.numel()} ids never occur in training (carve.unseen={unseen}: {how}) > "
                f"carve.max_unscored_fraction={max_unscored_fraction}; use more data.num_samples"
                f"{' or carve.unseen: mask' if unseen == 'drop_docs' else ''}")
        if not bool(part.stream.scored.any()):
            raise StageError(f"{name}: none of its {part.stream.num_predictions} predictions is scored (no text "
                             f"target whose ids occur in training); use more data.num_samples")
    return Carve(train=train, val=parts["val"], test=parts["test"], split=split, unseen_policy=unseen)


def save_splits(result: Carve, train_path: str | Path, val_path: str | Path, test_path: str | Path) -> None:
    """Write data/splits/{train,val,test}.safetensors (each with tokenizer hash, split name, scored, target_bytes)."""
    for stream, path in zip(result.streams().values(), (train_path, val_path, test_path)):
        save_stream(path, stream)


def load_split(path: str | Path, tokenizer_path: str | Path) -> TokenStream:
    """Load a split for a later stage, refusing it unless it was built with this tokenizer.json.

    The split carries `scored` (N-1,) bool and `target_bytes` (N-1,) int64 (see the module docstring).
    """
    stream = load_token_file(path, tokenizer_path, "carve")
    if stream.scored is None:
        raise ArtifactError(f"{path}: no scored/target_bytes tensors (written before the scoring rule); "
                            f"rerun the 'carve' stage (dvc repro -f carve)")
    return stream
