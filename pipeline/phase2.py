"""DVC stage `phase2`: next-token prediction on the frozen contexts C* (SPEC section 6); writes models/phase2.pt."""

from cvfp.stage import log_split, report_timing, run_stage, without_timing

TOKENIZER = "data/tokenizer/tokenizer.json"
PHASE1 = "models/phase1.pt"
RESUME = "models/phase2.resume.pt"  # not a DVC out: DVC would delete it before rerunning the stage


def body(params, run):
    # the library is imported here, after the tracking writer has started (start-up order: cvfp.stage)
    from cvfp import distributed
    from cvfp.cstar import load_cstar
    from cvfp.data.carve import load_split
    from cvfp.errors import ArtifactError
    from cvfp.io import sha256_file, write_csv, write_json
    from cvfp.metrics import format_rate
    from cvfp.model import load_model, save_model
    from cvfp.phase2 import train_phase2
    from cvfp.resume import checkpointer, fingerprint, load_resume_state, remove
    from cvfp.runtime import resolve_device

    device = resolve_device(params.device)
    world = distributed.current()
    model, _ = load_model(PHASE1, "phase1", device)
    splits, cstar = {}, {}
    for split in ("train", "val"):
        splits[split] = load_split(f"data/splits/{split}.safetensors", TOKENIZER)
        log_split(run, f"data/splits/{split}.safetensors", splits[split])
        cstar[split] = load_cstar(f"data/cstar/{split}.safetensors", PHASE1)
        if cstar[split].shape[0] != splits[split].ids.numel():
            raise ArtifactError(f"data/cstar/{split}.safetensors: {cstar[split].shape[0]} contexts for "
                                f"{splits[split].ids.numel()} tokens; rerun the 'cstar' stage (dvc repro cstar)")
    val = splits["val"]
    if world.is_main:
        print(f"phase2 on {device} x {world.size} process(es): context_mode {params.phase2.context_mode}, "
              f"{splits['train'].ids.numel()} train / {val.ids.numel()} val tokens; early stopping on val loss over "
              f"{int(val.scored.sum())}/{val.ids.numel() - 1} scored predictions")

    inputs = {"phase1": PHASE1, "tokenizer": TOKENIZER, "train": "data/splits/train.safetensors",
              "val": "data/splits/val.safetensors", "cstar_train": "data/cstar/train.safetensors",
              "cstar_val": "data/cstar/val.safetensors"}
    current = fingerprint(params, ("seed", "phase2"), {name: sha256_file(path) for name, path in inputs.items()})
    resume = load_resume_state(RESUME, "phase2", current, log=distributed.main_only(print, world))
    result = train_phase2(model, splits["train"].ids, cstar["train"], val.ids, cstar["val"], val.scored,
                          val.target_bytes, params.phase2, params.seed, checkpoint=checkpointer(RESUME, current) if world.is_main else None,
                          resume_state=resume)
    if not world.is_main:  # rank 0 writes every output
        return

    summary = result.summary
    save_model("models/phase2.pt", model, phase1_sha256=sha256_file(PHASE1), tokenizer_sha256=sha256_file(TOKENIZER),
               best_epoch=summary["best_epoch"],
               context_mode=params.phase2.context_mode)
    write_json("metrics/phase2.json", summary)
    write_csv("metrics/phase2_epochs.csv", without_timing(result.history))
    run.log_metrics(summary)
    run.log_curves(result.history, "epoch")
    run.log_artifact("metrics/phase2_epochs.csv")
    report_timing("phase2", run, result.timing)
    remove(RESUME)

    if summary["best_epoch"]:
        best = summary["best"]
        print(f"best epoch {summary['best_epoch']}/{summary['epochs_run']}: val loss {best['val_loss']:.4f}, "
              f"acc {format_rate(best['val_correct'], best['val_predictions'])}, bpb {best['val_bpb']:.4f}")
    else:
        print(f"no epoch of {summary['epochs_run']} reached a finite validation loss; the initial weights are kept")
    print(f"skipped steps {summary['skipped_steps']}, {summary['trainable_parameters']} trainable parameters, "
          f"{result.timing['seconds']:.1f}s")


if __name__ == "__main__":
    run_stage("phase2", body, data_parallel=True)
