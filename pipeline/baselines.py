"""DVC stage `baselines`: a GRU and a causal Transformer sized and budgeted like Phase 2; models/{gru,transformer}.pt."""

from cvfp.stage import log_split, report_timing, run_stage

TOKENIZER = "data/tokenizer/tokenizer.json"
CURVES = ("train_loss", "val_loss", "val_ppl", "val_acc", "val_bpb")  # per-epoch columns (dvc plots, MLflow curves)


def body(params, run):
    # the library is imported here, after the tracking writer has started (start-up order: cvfp.stage)
    import torch
    from cvfp import distributed
    from cvfp.baselines import (KINDS, baseline_args, build, cvfp_trainable_parameters, match_width, save_baseline,
                                train_baseline, validation_counts)
    from cvfp.metrics import finite_or_none, format_number, next_token_metrics
    from cvfp.data.carve import load_split
    from cvfp.io import sha256_file, write_csv, write_json
    from cvfp.runtime import resolve_device
    from cvfp.errors import StageError

    device = resolve_device(params.device)
    world = distributed.current()
    say = distributed.main_only(print, world)
    train = load_split("data/splits/train.safetensors", TOKENIZER)
    val = load_split("data/splits/val.safetensors", TOKENIZER)
    test = load_split("data/splits/test.safetensors", TOKENIZER)
    for name, split in (("train", train), ("val", val), ("test", test)):
        log_split(run, f"data/splits/{name}.safetensors", split)
    target = cvfp_trainable_parameters(params.model, params.phase2, train.vocab_size)
    budget = params.baselines.budget_tokens or params.phase2.epochs * (train.ids.numel() - 1)
    rule = "baselines.budget_tokens" if params.baselines.budget_tokens else \
        f"Phase 2's: phase2.epochs {params.phase2.epochs} x {train.ids.numel() - 1} train positions"
    say(f"baselines on {device} x {world.size} process(es): CVFP Phase 2 trains {target} parameters; "
        f"budget {budget} training tokens ({rule})")

    summaries, curves, timing = {}, {}, {}
    for kind in KINDS:
        try:
            width, count = match_width(kind, target, train.vocab_size, params.baselines)
        except ValueError as err:
            raise StageError(str(err)) from None
        say(f"{kind}: width {width}, {count} trainable parameters vs CVFP's {target} "
            f"({(count - target) / target:+.1%})")
        torch.manual_seed(params.seed)  # each model's initialisation independent of the other's
        model = build(kind, baseline_args(kind, width, train.vocab_size, params.baselines)).to(device)
        lr = getattr(params.baselines, kind).lr
        result = train_baseline(model, train.ids, val.ids, val.scored, val.target_bytes, params.baselines, lr, budget,
                                params.seed, kind)
        if not world.is_main:  # rank 0 writes every output
            continue
        # test is scored once, with the weights validation chose
        tested = next_token_metrics(validation_counts(model, test.ids, test.scored, test.target_bytes,
                                                      params.baselines.seq_len, params.baselines.batch_size))
        summaries[kind] = {**result.summary, "test": {k: finite_or_none(v) for k, v in tested.items()},
                           "cvfp_trainable_parameters": target, "parameter_ratio": count / target, "lr": lr}
        curves[kind] = result.history
        timing[f"{kind}_seconds"] = result.timing["seconds"]
        timing[f"{kind}_train_tokens_per_second"] = result.timing["train_tokens_per_second"]
        save_baseline(f"models/{kind}.pt", kind, model, tokenizer_sha256=sha256_file(TOKENIZER))

    if not world.is_main:
        return
    rows = _side_by_side(curves)
    write_json("metrics/baselines.json", {**summaries, "budget_tokens": budget})
    write_csv("metrics/baselines_epochs.csv", rows)
    run.log_metrics(summaries)
    run.log_curves(rows, "epoch")
    run.log_artifact("metrics/baselines_epochs.csv")
    timing["seconds"] = sum(timing[f"{kind}_seconds"] for kind in KINDS)
    report_timing("baselines", run, timing)
    for kind, s in summaries.items():
        print(f"{kind}: best epoch {s['best_epoch']}/{s['epochs_run']}, val loss {format_number(s['best']['val_loss'])}, "
              f"val bpb {format_number(s['best']['val_bpb'])}, test bpb {format_number(s['test']['bpb'])}, "
              f"{s['train_tokens_seen']}/{budget} tokens, {timing[f'{kind}_seconds']:.1f}s")


def _side_by_side(curves):
    """One row per epoch with `<kind>_<column>` for each model (blank where a model stopped earlier)."""
    epochs = max(len(rows) for rows in curves.values())
    table = []
    for epoch in range(1, epochs + 1):
        row = {"epoch": epoch}
        for kind, rows in curves.items():
            if epoch <= len(rows):
                row.update({f"{kind}_{k}": rows[epoch - 1][k] for k in CURVES})
        table.append(row)
    return table


if __name__ == "__main__":
    run_stage("baselines", body, data_parallel=True)
