"""DVC stage `phase1`: learn fixed-point contexts (SPEC section 4); writes models/phase1.pt."""

from cvfp.stage import log_split, report_timing, run_stage, without_timing
from cvfp.tracking import phase1_curve

TOKENIZER = "data/tokenizer/tokenizer.json"
RESUME = "models/phase1.resume.pt"  # not a DVC out: DVC would delete it before rerunning the stage


def body(params, run):
    # the library is imported here, after the tracking writer has started (start-up order: cvfp.stage)
    from cvfp import distributed
    from cvfp.data.carve import load_split
    from cvfp.io import sha256_file, write_csv, write_json
    from cvfp.model import CVFPModel, ModelArgs, save_model, trainable_parameters
    from cvfp.params import flatten
    from cvfp.phase1 import train_phase1
    from cvfp.resume import checkpointer, fingerprint, load_resume_state, remove
    from cvfp.runtime import resolve_device

    device = resolve_device(params.device)
    world = distributed.current()
    train = load_split("data/splits/train.safetensors", TOKENIZER)
    val = load_split("data/splits/val.safetensors", TOKENIZER)
    log_split(run, "data/splits/train.safetensors", train)
    log_split(run, "data/splits/val.safetensors", val)
    model = CVFPModel(ModelArgs.from_params(params.model, train.vocab_size)).to(device)
    if world.is_main:
        print(f"phase1 on {device} x {world.size} process(es): {trainable_parameters(model)} parameters, "
              f"{train.ids.numel()} train / {val.ids.numel()} val tokens")

    current = fingerprint(params, ("seed", "model", "phase1"),
                          {name: sha256_file(path) for name, path in (("tokenizer", TOKENIZER),
                                                                      ("train", "data/splits/train.safetensors"),
                                                                      ("val", "data/splits/val.safetensors"))})
    resume = load_resume_state(RESUME, "phase1", current, log=distributed.main_only(print, world))
    result = train_phase1(model, train.ids, val.ids, params.phase1, params.seed,
                          checkpoint=checkpointer(RESUME, current) if world.is_main else None,
                          resume_state=resume)
    if not world.is_main:  # rank 0 writes every output
        return

    save_model("models/phase1.pt", model, tokenizer_sha256=sha256_file(TOKENIZER))
    write_json("metrics/phase1.json", result.summary)
    write_csv("metrics/phase1_iterations.csv", without_timing(result.history))
    # a final value that is a curve's last point is not logged a second time
    run.log_curves([{curve_name(key): value for key, value in row.items()} for row in result.history], "iteration")
    curves = {summary_name(column) for row in result.history for column in row}
    run.log_metrics({key: value for key, value in flatten(result.summary).items() if key not in curves})
    run.log_artifact("metrics/phase1_iterations.csv")
    report_timing("phase1", run, result.timing)
    remove(RESUME)

    print(f"iterations {result.summary['iterations']}/{params.phase1.max_iterations}, "
          f"skipped steps {result.summary['skipped_steps']}/{result.summary['iterations'] - 1}, "
          f"{result.timing['seconds']:.1f}s")


def summary_name(column: str) -> str:
    """The metrics/phase1.json key of a per-iteration column's final value (`train_effective_rank` ->
    `train.effective_rank`; `skipped_steps` stays)."""
    split, _, quantity = column.partition("_")
    return f"{split}.{quantity}" if split in ("train", "val") and quantity else column


def curve_name(column: str) -> str:
    """The MLflow curve of a per-iteration column (`train_effective_rank` -> `1_effective_rank/train`)."""
    split, _, quantity = column.partition("_")
    return phase1_curve(split, quantity) if split in ("train", "val") and quantity else column


if __name__ == "__main__":
    run_stage("phase1", body, data_parallel=True)
