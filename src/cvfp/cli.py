"""`cvfp` command line: `cvfp report` prints the results of the last `dvc repro` from metrics/*.json;
`cvfp generate` continues a prompt with a trained model."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from cvfp import generate
from cvfp.compare import comparison_table, training_seconds
from cvfp.evaluate import results_table
from cvfp.metrics import format_rank, format_rate
from cvfp.params import load_params


def _load(folder: Path, name: str) -> dict | None:
    path = folder / name
    return json.loads(path.read_text()) if path.is_file() else None


def report(folder: Path, params_file: Path) -> int:
    """Print data, Phase 1, C*, Phase 2 and evaluation results; exit 1 if the pipeline has not run."""
    data = _load(folder, "data.json")
    if data is None:
        print(f"no results in {folder}/: run `dvc repro` first", file=sys.stderr)
        return 1
    print("data")
    print(f"  train {data['train_tokens']} tokens / {data['train_docs']} docs / {data['train_bytes']} bytes; "
          f"val {data['val_tokens']} tokens / {data['val_docs']} docs / {data['val_bytes']} bytes")
    print(f"  val docs dropped for unseen ids: {data['val_docs_dropped']}/{data['val_docs'] + data['val_docs_dropped']}; "
          f"val coverage {100 * data['val_coverage']:.2f}%; vocab {data['vocab_size']}")
    phase1 = _load(folder, "phase1.json")
    if phase1:
        print(f"phase1 ({phase1['iterations']} iterations, {phase1['skipped_steps']} skipped steps)")
        for split in ("train", "val"):
            s = phase1[split]
            print(f"  {split}: Effective Rank {format_rank(s['effective_rank'], phase1['context_dim'])}, "
                  f"convergence {format_rate(s['converged_tokens'], s['tokens'])}, cvfp loss {s['cvfp_loss']:.3e}")
    cstar = _load(folder, "cstar.json")
    if cstar:
        for split in ("train", "val"):
            print(f"C* {split}: Effective Rank {format_rank(cstar[split]['effective_rank'], cstar['context_dim'])}")
    phase2 = _load(folder, "phase2.json")
    if phase2:
        best = phase2["best"]
        print(f"phase2 ({phase2['context_mode']}): best epoch {phase2['best_epoch']}/{phase2['epochs_run']}, "
              f"val loss {best['val_loss']:.4f}, val ppl {best['val_ppl']:.2f}, "
              f"val accuracy {format_rate(best['val_correct'], best['val_predictions'])}, val bpb {best['val_bpb']:.4f}")
    evaluation = _load(folder, "eval.json")
    if evaluation:
        print()
        print(results_table(evaluation, load_params(params_file).evaluate))
    compare = _load(folder, "compare.json")
    if compare:
        print("\nCVFP against the baselines (metrics/compare.json; samples: metrics/samples.md)")
        print(comparison_table(compare, training_seconds(folder / "timing")))
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
    args = parser.parse_args(argv)
    if args.command == "report":
        raise SystemExit(report(args.metrics, args.params))
    if args.command == "generate":
        raise SystemExit(generate.run(args))


if __name__ == "__main__":
    main()
