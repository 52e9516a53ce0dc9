"""DVC stage `tokenizer`: select the documents, hold out the tail, train the byte-level BPE on the rest (SPEC 3)."""

import time

from cvfp.stage import report_timing, run_stage

DOCUMENTS = "data/corpus/documents.jsonl"
TOKENIZER = "data/tokenizer/tokenizer.json"
SPLIT = "data/tokenizer/split.json"
METRICS = "metrics/tokenizer.json"


def body(params, run):
    # the library is imported here, after the tracking writer has started (start-up order: cvfp.stage)
    from cvfp.data.corpus import document_bytes, select_documents, split_documents, write_document_split, write_documents
    from cvfp.data.tokenizer import save_tokenizer, train_tokenizer
    from cvfp.io import write_json

    tick = time.perf_counter()
    selection = select_documents(params.data, params.seed)
    sizes = [document_bytes(d) for d in selection.documents]
    split = split_documents(sizes, params.carve.val_fraction, params.carve.test_fraction)
    # No validation or test text reaches the trainer; the cache still tokenizes every document.
    training = selection.documents[:split.train_documents]
    tokenizer = train_tokenizer(training, params.tokenizer.vocab_size, params.tokenizer.min_frequency)

    write_documents(DOCUMENTS, selection.documents)
    save_tokenizer(tokenizer, TOKENIZER)
    write_document_split(SPLIT, split)
    metrics = {
        "documents": len(selection.documents),
        "documents_skipped": selection.skipped,
        "corpus_documents": selection.corpus_documents,
        "corpus_bytes": sum(sizes),
        "vocab_size": tokenizer.get_vocab_size(),
    }
    for part, docs in split.parts().items():
        metrics[f"{part}_documents"] = len(docs)
        metrics[f"{part}_document_bytes"] = sum(sizes[docs.start:docs.stop])
    write_json(METRICS, metrics)
    report_timing("tokenizer", run, {"seconds": time.perf_counter() - tick})
    run.log_metrics(metrics)
    run.log_artifact(METRICS)
    run.log_artifact(SPLIT)
    run.log_dataset(f"{params.data.source}-{metrics['documents']}docs", DOCUMENTS, "corpus",
                    {"documents": metrics["documents"], "bytes": metrics["corpus_bytes"],
                     **{f"{part}_documents": metrics[f"{part}_documents"] for part in split.parts()}}, execution=True)
    print(f"tokenizer: {metrics['documents']} documents from {selection.origin} "
          f"({metrics['corpus_documents']} available, {metrics['documents_skipped']} empty skipped), "
          f"{metrics['corpus_bytes']} bytes; vocab {metrics['vocab_size']}/{params.tokenizer.vocab_size}")
    print(f"held out: {split.describe()}; trained on the {split.train_documents} training documents "
          f"({metrics['train_document_bytes']} of {metrics['corpus_bytes']} bytes)")


if __name__ == "__main__":
    run_stage("tokenizer", body)
