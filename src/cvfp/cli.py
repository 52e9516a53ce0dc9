"""`cvfp` command line: `cvfp report` prints the results of the last `dvc repro` from metrics/*.json;
`cvfp generate` continues a prompt with a trained model; `cvfp study` collects DVC experiments into STUDY.md."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from cvfp import generate, study
from cvfp.compare import comparison_table, training_seconds
from cvfp.evaluate import results_table
from cvfp.metrics import format_number, format_rank, format_rate
from cvfp.params import load_params


def _load(folder: Path, name: str) -> dict | None:
    path = folder / name
    return json.loads(path.read_text()) if path.is_file() else None


def report(folder: Path, params_file: Path) -> int:
    """Print the results, test first: the comparison, then data, Phase 1, C*, Phase 2 and the evaluation table.

    Exit 1 if the pipeline has not run.
    """
    data = _load(folder, "data.json")
    if data is None:
        print(f"no results in {folder}/: run `dvc repro` first", file=sys.stderr)
        return 1
    compare = _load(folder, "compare.json")
    if compare:
        print("CVFP against the baselines on the held-out test split (metrics/compare.json; samples: "
              "metrics/samples.md)")
        print(comparison_table(compare, training_seconds(folder / "timing")))
        print()
    print("data")
    for split in ("train", "val", "test"):
        line = (f"  {split}: {data[f'{split}_tokens']} tokens / {data[f'{split}_docs']} docs / "
                f"{data[f'{split}_bytes']} bytes")
        if f"{split}_scored_predictions" in data:
            line += (f"; scored predictions {format_rate(data[f'{split}_scored_predictions'], data[f'{split}_predictions'])}"
                     f" ({data[f'{split}_scored_bytes']} bytes)")
        print(line)
    for split in ("val", "test"):
        if f"{split}_unscored_unseen" in data:
            print(f"  {split}: unscored because of ids unseen in train: "
                  f"{format_rate(data[f'{split}_unscored_unseen'], data[f'{split}_predictions_before_policy'])}; "
                  f"coverage {100 * data[f'{split}_coverage']:.2f}%; policy {data.get('unseen_policy', 'n/a')}")
    phase1 = _load(folder, "phase1.json")
    if phase1:
        print(f"phase1 ({phase1['iterations']} iterations, {phase1['skipped_steps']} skipped steps)")
        for split in ("train", "val"):
            s = phase1[split]
            line = f"  {split}: Effective Rank {format_rank(s['effective_rank'], phase1['context_dim'])}"
            if "effective_rank_initial" in s:
                line += f" (untrained: {format_rank(s['effective_rank_initial'], phase1['context_dim'])})"
            print(line + f", convergence {format_rate(s['converged_tokens'], s['tokens'])}, "
                         f"cvfp loss {s['cvfp_loss']:.3e}")
    cstar = _load(folder, "cstar.json")
    if cstar:
        for split in ("train", "val", "test"):
            if split in cstar:
                print(f"C* {split}: Effective Rank {format_rank(cstar[split]['effective_rank'], cstar['context_dim'])}")
    phase2 = _load(folder, "phase2.json")
    if phase2:
        best = phase2["best"]
        print(f"phase2 ({phase2['context_mode']}): best epoch {phase2['best_epoch']}/{phase2['epochs_run']} by val loss, "
              f"val loss {format_number(best['val_loss'])} (objective {format_number(best['val_objective'])}), "
              f"val accuracy {format_rate(best['val_correct'], best['val_predictions'])}, "
              f"val bpb {format_number(best['val_bpb'])}")
    evaluation = _load(folder, "eval.json")
    if evaluation:
        print()
        print(results_table(evaluation, load_params(params_file).evaluate))
    timing_dir = folder / "timing"
    if timing_dir.is_dir():
        times = {}
        for path in sorted(timing_dir.glob("*.json")):
            timing = json.loads(path.read_text())
            times[path.stem] = timing.get("seconds", sum(v for k, v in timing.items() if k.endswith("_seconds")))
        print("\nstage seconds (work only, without start-up): " + ", ".join(f"{k} {v:.1f}" for k, v in times.items()))
    return 0


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="cvfp", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    show = commands.add_parser("report", help="print the results of the last pipeline run")
    show.add_argument("--metrics", default="metrics", type=Path, help="metrics folder (default: metrics)")
    show.add_argument("--params", default="params.yaml", type=Path)
    sample = commands.add_parser("generate", help="continue a prompt with the final CVFP model or a baseline")
    generate.add_arguments(sample)
    study.add_arguments(commands.add_parser("study", help=study.HELP))
    args = parser.parse_args(argv)
    if args.command == "report":
        raise SystemExit(report(args.metrics, args.params))
    if args.command == "generate":
        raise SystemExit(generate.run(args))
    if args.command == "study":
        raise SystemExit(study.run(args))


if __name__ == "__main__":
    main()
