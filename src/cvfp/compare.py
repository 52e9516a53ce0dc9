"""Is CVFP any good? CVFP (fixed and free-running), the GRU and the Transformer in one table, and samples.

Every model's numbers come from the same summed counts over the same held-out **test**
predictions, scored once with the weights validation chose: total cross-entropy nats, the
scored predictions, top-1 hits and the UTF-8 bytes of their targets, all counted by one
function (`cvfp.metrics.count_predictions`). Loss, perplexity, accuracy and bits per byte
are then computed for all of them by `cvfp.metrics.next_token_metrics`.

Training seconds are wall clock: they are read from metrics/timing/*.json and never written
to metrics/compare.json, which must be identical when the same params run twice.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from cvfp.baselines import KINDS, PARAM_TOLERANCE
from cvfp.data.cache import TokenStream
from cvfp.data.corpus import ROLE_TOKENS
from cvfp.data.tokenizer import decode, special_token_ids
from cvfp.errors import StageError
from cvfp.metrics import finite_or_none, format_number, format_rate, next_token_metrics

ROWS = ("cvfp_fixed", "cvfp_free", *KINDS)
LABELS = {"cvfp_fixed": "CVFP fixed (contexts = C*)", "cvfp_free": "CVFP free-running", "gru": "GRU",
          "transformer": "Transformer"}
COUNTS = ("total_nats", "predictions", "correct", "bytes")
SAMPLE_MODELS = ("cvfp", *KINDS)


def comparison(evaluation: dict[str, Any], phase1: dict[str, Any], phase2: dict[str, Any],
               baselines: dict[str, Any]) -> dict[str, Any]:
    """metrics/compare.json from metrics/{eval,phase1,phase2,baselines}.json, on the test split.

    Refuses inputs scored on different test data (other prediction or byte counts).
    """
    sources = {f"cvfp_{mode}": evaluation["test"][mode] for mode in ("fixed", "free")}
    sources.update({kind: baselines[kind]["test"] for kind in KINDS})
    scored = {name: (source["predictions"], source["bytes"]) for name, source in sources.items()}
    if len(set(scored.values())) != 1:
        raise StageError(f"the models were tested on different predictions (scored predictions, bytes): {scored}; "
                         f"rerun the stale stage (dvc repro)")
    models = {}
    for name, source in sources.items():
        trained = phase2 if name.startswith("cvfp") else baselines[name]
        models[name] = {**next_token_metrics({key: source[key] for key in COUNTS}),
                        "trainable_parameters": trained["trainable_parameters"],
                        "train_tokens_seen": trained["train_tokens_seen"]}
    target = phase2["trainable_parameters"]
    predictions, num_bytes = next(iter(scored.values()))
    return {
        "split": "test",
        "models": {name: {key: finite_or_none(value) for key, value in row.items()} for name, row in models.items()},
        "test_predictions": predictions, "test_bytes": num_bytes,
        "parameter_ratio": {kind: models[kind]["trainable_parameters"] / target for kind in KINDS},
        "phase1_iterations": phase1["iterations"], "phase1_train_tokens": phase1["train"]["tokens"],
        "best_test_bpb": min(models, key=lambda name: _or_inf(models[name]["bpb"])),
    }


def _or_inf(value: float | None) -> float:
    """A number to rank by: missing or NaN ranks last."""
    return math.inf if value is None or not math.isfinite(value) else value


def training_seconds(timing_dir: str | Path) -> dict[str, float | None]:
    """Wall-clock training seconds per row from metrics/timing/: CVFP = phase1 + C* (train split) + phase2
    (the same for fixed and free: one model); each baseline its own training. None where a file is missing."""
    folder = Path(timing_dir)

    def read(stage: str) -> dict[str, Any]:
        path = folder / f"{stage}.json"
        return json.loads(path.read_text()) if path.is_file() else {}

    phase1, cstar, phase2, baselines = (read(stage) for stage in ("phase1", "cstar", "phase2", "baselines"))
    parts = (phase1.get("seconds"), cstar.get("train_seconds"), phase2.get("seconds"))
    cvfp = sum(parts) if all(part is not None for part in parts) else None
    return {"cvfp_fixed": cvfp, "cvfp_free": cvfp, **{kind: baselines.get(f"{kind}_seconds") for kind in KINDS}}


def comparison_table(compare: dict[str, Any], seconds: dict[str, float | None]) -> str:
    """The comparison table (markdown, readable as plain text) with its footnotes."""
    header = ("model", "test bits/byte", "test loss", "test ppl", "test accuracy", "trainable params",
              "training tokens", "training s")
    rows = []
    for name in ROWS:
        m = compare["models"][name]
        rows.append((LABELS[name], format_number(m["bpb"]), format_number(m["loss"]), format_number(m["ppl"], ".2f"),
                     format_rate(m["correct"], m["predictions"]),
                     str(m["trainable_parameters"]), str(m["train_tokens_seen"]), format_number(seconds.get(name), ".1f")))
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]
    lines = ["| " + " | ".join(cell.ljust(width) for cell, width in zip(row, widths)) + " |" for row in (header, *rows)]
    lines.insert(1, "|" + "|".join("-" * (width + 2) for width in widths) + "|")
    ratios = ", ".join(f"{LABELS[kind]} {ratio - 1:+.1%}" for kind, ratio in compare["parameter_ratio"].items())
    lines += [
        "",
        f"- test: the same {compare['test_predictions']} scored next-token predictions for every model, scored once "
        f"with the weights validation chose (nothing was chosen on test); bits per byte = total nats / (ln 2 x "
        f"{compare['test_bytes']} UTF-8 bytes of the scored targets; role/boundary markers and ids unseen in "
        f"training are not scored), one function for all (cvfp.metrics). Lowest bits per byte: "
        f"{LABELS[compare['best_test_bpb']]}.",
        f"- trainable params: CVFP's = what Phase 2 trains; the baselines are matched within "
        f"{PARAM_TOLERANCE:.0%} ({ratios}); embeddings and heads untied everywhere.",
        f"- training tokens: next-token predictions trained on (the budget is Phase 2's). CVFP's Phase 1 also made "
        f"{compare['phase1_iterations']} passes over {compare['phase1_train_tokens']} train tokens without a "
        f"next-token objective.",
        "- training s: wall clock from metrics/timing/ (not in compare.json): CVFP = phase1 + C* (train) + phase2; "
        "the baselines' own training; all include their per-epoch validation.",
        "- GRU: hidden state carried across the test stream (like CVFP's free-running scan); Transformer: "
        "non-overlapping windows of baselines.seq_len tokens, no carry.",
    ]
    return "\n".join(lines)


def validation_prompts(val: TokenStream, tokenizer: Tokenizer, count: int) -> list[dict[str, str]]:
    """`count` fixed prompts: the first user turn of validation documents, with the turn that answered it
    (`reference`). The documents are evenly spaced over those whose first user turn has a reply (over
    those with a user turn, if none has)."""
    special = special_token_ids(tokenizer)
    user, special_set = special[ROLE_TOKENS["user"]], set(special.values())
    found = []
    for index in range(val.num_docs):
        turns, current = [], None  # (role id, content ids) per turn
        for token in val.doc(index).tolist():
            if token in special_set:
                current = (token, [])
                turns.append(current)
            elif current is not None:
                current[1].append(token)
        first = next((i for i, (role, content) in enumerate(turns) if role == user and content), None)
        if first is not None:
            reply = turns[first + 1][1] if first + 1 < len(turns) else []
            found.append({"document": index, "prompt": decode(tokenizer, turns[first][1]),
                          "reference": decode(tokenizer, reply)})
    answered = [prompt for prompt in found if prompt["reference"]] or found
    if not answered or not count:
        return []
    picks = sorted({round(i * (len(answered) - 1) / max(count - 1, 1)) for i in range(count)})
    return [answered[i] for i in picks]


def samples_markdown(samples: list[dict[str, Any]], settings: str) -> str:
    """metrics/samples.md: each prompt, the reference reply and every model's continuation."""
    lines = ["# Samples", "", f"Prompts: the first user turn of validation documents. {settings}", ""]
    for number, sample in enumerate(samples, start=1):
        lines += [f"## {number}. validation document {sample['document']}", "",
                  f"**prompt:** {_inline(sample['prompt'])}", "",
                  f"**reference reply:** {_inline(sample['reference'])}", ""]
        for model in SAMPLE_MODELS:
            lines += [f"**{model}:** {_inline(sample[model])}", ""]
    return "\n".join(lines)


def _inline(text: str) -> str:
    """One markdown line: newlines shown as ⏎; an empty text as `(empty)`."""
    text = text.replace("\r\n", "\n").replace("\n", " \u23ce ")
    return text if text.strip() else "`(empty)`"
