"""DVC stage `carve`: the stream's tail becomes validation, then test; the rest training (SPEC section 3)."""

import time

from cvfp.stage import log_split, report_timing, run_stage

TOKENIZER = "data/tokenizer/tokenizer.json"
SPLIT = "data/tokenizer/split.json"
STREAM = "data/cache/stream.safetensors"
TRAIN = "data/splits/train.safetensors"
VAL = "data/splits/val.safetensors"
TEST = "data/splits/test.safetensors"
METRICS = "metrics/data.json"


def body(params, run):
    # the library is imported here, after the tracking writer has started (start-up order: cvfp.stage)
    from cvfp.data.cache import load_stream
    from cvfp.data.carve import carve, require_split, save_splits
    from cvfp.data.tokenizer import load_tokenizer, token_byte_lengths
    from cvfp.io import write_json

    tick = time.perf_counter()
    stream = load_stream(STREAM, TOKENIZER)
    require_split(SPLIT, stream, params.carve.val_fraction, params.carve.test_fraction)
    token_bytes = token_byte_lengths(load_tokenizer(TOKENIZER), TOKENIZER)
    result = carve(stream, token_bytes, **params.carve.model_dump())

    save_splits(result, TRAIN, VAL, TEST)
    metrics = result.metrics()
    write_json(METRICS, metrics)
    run.log_metrics(metrics)
    run.log_artifact(METRICS)
    report_timing("carve", run, {"seconds": time.perf_counter() - tick})
    for path, split in zip((TRAIN, VAL, TEST), result.streams().values()):  # the streams just written
        log_split(run, path, split, execution=True)
    m = metrics
    print(f"carve (unseen: {m['unseen_policy']}): train {m['train_tokens']} tokens / {m['train_docs']} docs, "
          f"val {m['val_tokens']} / {m['val_docs']}, test {m['test_tokens']} / {m['test_docs']}")
    for part in ("train", "val", "test"):
        line = (f"  {part}: {m[f'{part}_scored_predictions']}/{m[f'{part}_predictions']} predictions scored, "
                f"{m[f'{part}_scored_bytes']}/{m[f'{part}_bytes']} bytes")
        if part != "train":
            before = m[f"{part}_tokens"] + m[f"{part}_tokens_dropped"]
            line += (f"; coverage {100 * m[f'{part}_coverage']:.2f}% ({m[f'{part}_tokens_covered']}/{before} tokens), "
                     f"{m[f'{part}_unseen_ids']} ids unseen in train; "
                     f"{m[f'{part}_predictions_masked']}/{m[f'{part}_predictions']} predictions masked, "
                     f"{m[f'{part}_docs_dropped']}/{m[f'{part}_docs'] + m[f'{part}_docs_dropped']} docs and "
                     f"{m[f'{part}_tokens_dropped']}/{before} tokens dropped")
        print(line)


if __name__ == "__main__":
    run_stage("carve", body)
