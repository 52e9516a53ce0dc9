"""DVC stage `cache`: tokenize the documents into one token stream (SPEC section 3)."""

import time

from cvfp.stage import report_timing, run_stage

DOCUMENTS = "data/corpus/documents.jsonl"
TOKENIZER = "data/tokenizer/tokenizer.json"
STREAM = "data/cache/stream.safetensors"


def body(params, run):
    # the library is imported here, after the tracking writer has started (start-up order: cvfp.stage)
    from cvfp.data.cache import build_stream, save_stream

    tick = time.perf_counter()
    stream = build_stream(DOCUMENTS, TOKENIZER)
    save_stream(STREAM, stream)
    report_timing("cache", run, {"seconds": time.perf_counter() - tick})
    summary = {"stream_tokens": stream.num_tokens, "stream_docs": stream.num_docs, "stream_bytes": stream.num_bytes}
    run.log_metrics(summary)
    print(f"cache: {stream.num_tokens} tokens from {stream.num_docs} documents, {stream.num_bytes} bytes "
          f"({stream.num_bytes / stream.num_tokens:.2f} bytes/token), vocab {stream.vocab_size}")


if __name__ == "__main__":
    run_stage("cache", body)
