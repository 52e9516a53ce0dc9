"""DVC stage `evaluate`: next-token metrics (fixed and free-running) and context checks (SPEC section 7)."""

from cvfp.stage import log_split, report_timing, run_stage

TOKENIZER = "data/tokenizer/tokenizer.json"
PHASE1, PHASE2 = "models/phase1.pt", "models/phase2.pt"


def body(params, run):
    # the library is imported here, after the tracking writer has started (start-up order: cvfp.stage)
    from cvfp.cstar import load_cstar
    from cvfp.data.carve import load_split
    from cvfp.evaluate import HeldOut, context_mode_of, evaluate_all, json_ready, results_table
    from cvfp.io import require_fresh, sha256_file, write_csv, write_json
    from cvfp.model import load_model
    from cvfp.plots import evaluation_plots
    from cvfp.runtime import resolve_device

    device = resolve_device(params.device)
    phase1_model, phase1_payload = load_model(PHASE1, "phase1", device)
    final_model, final_payload = load_model(PHASE2, "phase2", device)
    tokenizer_sha256 = sha256_file(TOKENIZER)
    require_fresh(PHASE1, "phase1", {"tokenizer": (phase1_payload.get("tokenizer_sha256"), tokenizer_sha256)},
                  unrecorded_ok=True)
    require_fresh(PHASE2, "phase2", {"tokenizer": (final_payload.get("tokenizer_sha256"), tokenizer_sha256),
                                     "Phase-1 checkpoint": (final_payload.get("phase1_sha256"), sha256_file(PHASE1))},
                  unrecorded_ok=True)
    context_mode = context_mode_of(final_payload, PHASE2)
    held_out = {}
    for name in ("test", "val"):
        split = load_split(f"data/splits/{name}.safetensors", TOKENIZER)
        log_split(run, f"data/splits/{name}.safetensors", split)
        held_out[name] = HeldOut(split.ids, load_cstar(f"data/cstar/{name}.safetensors", PHASE1), split.scored,
                                 split.target_bytes)
        print(f"evaluate on {device}: {name} {split.ids.numel()} tokens, {int(split.scored.sum())}/"
              f"{split.ids.numel() - 1} scored predictions, context_mode {context_mode}")
    train = load_split("data/splits/train.safetensors", TOKENIZER)
    train_cstar = load_cstar("data/cstar/train.safetensors", PHASE1)

    result = evaluate_all(final_model, phase1_model, context_mode, held_out, train.ids, train_cstar, params.evaluate,
                          params.seed)

    metrics = json_ready(result.metrics)
    write_json("metrics/eval.json", metrics)
    write_csv("metrics/eval_spectrum.csv", result.spectrum)
    trial_mses = {label: metrics[key]["trial_mse"] for label, key in
                  (("phase1", "convergence_check_phase1"), ("final", "convergence_check"))}
    figures = evaluation_plots("metrics/plots", result.spectrum, trial_mses,
                               "metrics/phase1_iterations.csv", "metrics/phase2_epochs.csv")
    run.log_metrics(metrics)
    for key in ("convergence_check", "convergence_check_phase1"):
        for trial, mse in enumerate(metrics[key]["trial_mse"], start=2):  # trial 1 has no MSE
            run.log_metrics({f"{key}.trial_mse": mse}, step=trial)
    for path in ("metrics/eval.json", "metrics/eval_spectrum.csv"):
        run.log_artifact(path)
    for path in figures:
        run.log_artifact(path, "plots")
    report_timing("evaluate", run, result.timing)

    print(results_table(metrics, params.evaluate))


if __name__ == "__main__":
    run_stage("evaluate", body)
