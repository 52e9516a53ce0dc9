"""DVC stage `compare`: CVFP vs the GRU and Transformer baselines in one table, and seeded samples from each."""

import time

from cvfp.stage import TIMING_DIR, report_timing, run_stage

TOKENIZER = "data/tokenizer/tokenizer.json"
TABLE = f"{TIMING_DIR}/compare_table.md"  # holds wall-clock seconds, so it lives with the timing files


def body(params, run):
    # the library is imported here, after the tracking writer has started (start-up order: cvfp.stage)
    from cvfp.compare import (SAMPLE_MODELS, comparison, comparison_table, samples_markdown, training_seconds,
                              validation_prompts)
    from cvfp.data.carve import load_split
    from cvfp.data.corpus import BOUNDARY_TOKEN
    from cvfp.data.tokenizer import load_tokenizer
    from cvfp.generate import load_generator, reply
    from cvfp.io import read_json, write_json, write_text
    from cvfp.runtime import resolve_device

    device = resolve_device(params.device)
    phase1 = read_json("metrics/phase1.json", "phase1")
    compare = comparison(read_json("metrics/eval.json", "evaluate"), phase1,
                         read_json("metrics/phase2.json", "phase2"), read_json("metrics/baselines.json", "baselines"))
    seconds = training_seconds(TIMING_DIR)
    table = comparison_table(compare, seconds)

    tick = time.perf_counter()
    tokenizer = load_tokenizer(TOKENIZER)
    settings = params.compare
    val = load_split("data/splits/val.safetensors", TOKENIZER)
    samples = validation_prompts(val, tokenizer, settings.sample_prompts)
    for kind in SAMPLE_MODELS:
        generator = load_generator(kind, device=device, tokenizer_path=TOKENIZER)
        for number, sample in enumerate(samples):  # one seed per prompt, the same for every model
            sample[kind] = reply(generator, tokenizer, sample["prompt"], settings.max_new_tokens,
                                 settings.temperature, settings.top_k, params.seed + number)
    described = (f"Up to {settings.max_new_tokens} new tokens, temperature {settings.temperature}, top-k "
                 f"{settings.top_k}, seed {params.seed} + prompt index (0, 1, ...), the same for every model, "
                 f"stopping at {BOUNDARY_TOKEN}.")

    write_json("metrics/compare.json", compare)
    write_text("metrics/samples.md", samples_markdown(samples, described) + "\n")
    write_text(TABLE, table + "\n")
    run.log_metrics(compare["models"])
    run.log_metrics({"training_seconds": {name: value for name, value in seconds.items() if value is not None}})
    for path in ("metrics/compare.json", "metrics/samples.md", TABLE):
        run.log_artifact(path)
    run.log_headline(headline(compare, phase1))
    report_timing("compare", run, {"seconds": time.perf_counter() - tick})  # loading models and sampling

    print(table)
    print(f"\nsamples ({len(samples)} prompts x {len(SAMPLE_MODELS)} models): metrics/samples.md")


def headline(compare: dict, phase1: dict) -> dict:
    """The execution's results for its parent run: test bits per byte of each model, Phase 1's fixed points."""
    return {
        "test_bpb": {name: model["bpb"] for name, model in compare["models"].items()},
        "phase1": {split: {"convergence_rate": phase1[split]["convergence_rate"],
                           "effective_rank": phase1[split]["effective_rank"],
                           "effective_rank_ratio": phase1[split]["effective_rank_ratio"]} for split in ("train", "val")},
    }


if __name__ == "__main__":
    run_stage("compare", body)
