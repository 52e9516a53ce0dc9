"""DVC stage `tokenizer`: select the documents and train the byte-level BPE (SPEC section 3)."""

from cvfp.data.corpus import document_bytes, select_documents, write_documents
from cvfp.data.tokenizer import save_tokenizer, train_tokenizer
from cvfp.io import write_json
from cvfp.stage import run_stage

DOCUMENTS = "data/corpus/documents.jsonl"
TOKENIZER = "data/tokenizer/tokenizer.json"
METRICS = "metrics/tokenizer.json"


def body(params, run):
    selection = select_documents(params.data, params.seed)
    tokenizer = train_tokenizer(selection.documents, params.tokenizer.vocab_size, params.tokenizer.min_frequency)

    write_documents(DOCUMENTS, selection.documents)
    save_tokenizer(tokenizer, TOKENIZER)
    metrics = {
        "documents": len(selection.documents),
        "documents_skipped": selection.skipped,
        "corpus_documents": selection.corpus_documents,
        "corpus_bytes": sum(document_bytes(d) for d in selection.documents),
        "vocab_size": tokenizer.get_vocab_size(),
    }
    write_json(METRICS, metrics)
    run.log_metrics(metrics)
    run.log_artifact(METRICS)
    print(f"tokenizer: {metrics['documents']} documents from {selection.origin} "
          f"({metrics['corpus_documents']} available, {metrics['documents_skipped']} empty skipped), "
          f"{metrics['corpus_bytes']} bytes; vocab {metrics['vocab_size']}/{params.tokenizer.vocab_size}")


if __name__ == "__main__":
    run_stage("tokenizer", body)
