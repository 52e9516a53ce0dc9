"""DVC stage `phase1`: learn fixed-point contexts (SPEC section 4); writes models/phase1.pt."""

from cvfp import distributed
from cvfp.data.carve import load_split
from cvfp.io import sha256_file, write_csv, write_json
from cvfp.model import CVFPModel, ModelArgs, save_model, trainable_parameters
from cvfp.params import flatten
from cvfp.phase1 import train_phase1
from cvfp.resume import checkpointer, fingerprint, load_resume_state, remove
from cvfp.runtime import resolve_device
from cvfp.stage import report_timing, run_stage, without_timing

TOKENIZER = "data/tokenizer/tokenizer.json"
RESUME = "models/phase1.resume.pt"  # not a DVC out: DVC would delete it before rerunning the stage


def body(params, run):
    device = resolve_device(params.device)
    world = distributed.current()
    train = load_split("data/splits/train.safetensors", TOKENIZER)
    val = load_split("data/splits/val.safetensors", TOKENIZER)
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
    # one MLflow name per quantity: the curves carry the metrics file's names (train.effective_rank, ...), and a
    # final value that is a curve's last point is not logged a second time
    curves = [{_mlflow_name(key): value for key, value in row.items()} for row in result.history]
    run.log_curves(curves, "iteration")
    logged = {key for row in curves for key in row}
    run.log_metrics({key: value for key, value in flatten(result.summary).items() if key not in logged})
    run.log_artifact("metrics/phase1_iterations.csv")
    report_timing("phase1", run, result.timing)
    remove(RESUME)

    print(f"iterations {result.summary['iterations']}/{params.phase1.max_iterations}, "
          f"skipped steps {result.summary['skipped_steps']}/{result.summary['iterations'] - 1}, "
          f"{result.timing['seconds']:.1f}s")


def _mlflow_name(column: str) -> str:
    """A per-iteration column `train_effective_rank` as the metrics file names it: `train.effective_rank`."""
    split, _, quantity = column.partition("_")
    return f"{split}.{quantity}" if split in ("train", "val") and quantity else column


if __name__ == "__main__":
    run_stage("phase1", body, data_parallel=True)
