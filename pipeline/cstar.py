"""DVC stage `cstar`: the fixed contexts C*, one exact sequential scan per split (SPEC section 5)."""

import time

from cvfp.stage import report_timing, run_stage

TOKENIZER = "data/tokenizer/tokenizer.json"
PHASE1 = "models/phase1.pt"


def body(params, run):
    # the library is imported here, after the tracking writer has started (start-up order: cvfp.stage)
    from cvfp.cstar import generate_cstar, save_cstar
    from cvfp.data.carve import load_split
    from cvfp.io import require_fresh, sha256_file, write_json
    from cvfp.metrics import effective_rank, format_rank
    from cvfp.model import load_model
    from cvfp.runtime import resolve_device

    device = resolve_device(params.device)
    model, payload = load_model(PHASE1, "phase1", device)
    phase1_sha256, tokenizer_sha256 = sha256_file(PHASE1), sha256_file(TOKENIZER)
    require_fresh(PHASE1, "phase1", {TOKENIZER: (payload.get("tokenizer_sha256"), tokenizer_sha256)}, unrecorded_ok=True)
    dim = model.context_dim
    metrics, timing = {"context_dim": dim}, {}
    for split in ("train", "val", "test"):
        data = load_split(f"data/splits/{split}.safetensors", TOKENIZER)
        tick = time.perf_counter()
        contexts = generate_cstar(model, data.ids, device, progress_desc=f"cstar {split}")
        seconds = time.perf_counter() - tick
        save_cstar(f"data/cstar/{split}.safetensors", contexts, phase1_sha256, tokenizer_sha256)
        rank = effective_rank(contexts, params.phase1.effective_rank_samples, params.seed)
        tokens = contexts.shape[0]
        metrics[split] = {"effective_rank": rank, "effective_rank_ratio": rank / dim, "tokens": tokens}
        timing.update({f"{split}_seconds": seconds, f"{split}_tokens_per_second": tokens / seconds})
        print(f"{split}: C* Effective Rank: {format_rank(rank, dim)}, {tokens} tokens "
              f"in {seconds:.1f}s ({tokens / seconds:.0f} tokens/s)")

    write_json("metrics/cstar.json", metrics)
    run.log_metrics(metrics)
    report_timing("cstar", run, timing)


if __name__ == "__main__":
    run_stage("cstar", body)
