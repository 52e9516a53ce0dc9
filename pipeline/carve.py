"""DVC stage `carve`: the stream's tail becomes validation, the rest training (SPEC section 3)."""

from cvfp.data.cache import load_stream
from cvfp.data.carve import carve, save_splits
from cvfp.io import write_json
from cvfp.stage import run_stage

TOKENIZER = "data/tokenizer/tokenizer.json"
STREAM = "data/cache/stream.safetensors"
TRAIN = "data/splits/train.safetensors"
VAL = "data/splits/val.safetensors"
METRICS = "metrics/data.json"


def body(params, run):
    stream = load_stream(STREAM, TOKENIZER)
    result = carve(stream, **params.carve.model_dump())

    save_splits(result, TRAIN, VAL)
    metrics = result.metrics()
    write_json(METRICS, metrics)
    run.log_metrics(metrics)
    run.log_artifact(METRICS)
    m = metrics
    print(f"carve ({params.carve.unseen}): train {m['train_tokens']} tokens / {m['train_docs']} docs, "
          f"val {m['val_tokens']} tokens / {m['val_docs']} docs "
          f"({m['val_docs_dropped']}/{result.val_docs_before_drop} docs dropped for unseen ids)")
    print(f"val coverage {100 * result.val_coverage:.2f}% "
          f"({result.val_tokens_covered}/{result.val_tokens_before_drop} tokens), "
          f"{m['val_unseen_ids']} ids unseen in train")


if __name__ == "__main__":
    run_stage("carve", body)
