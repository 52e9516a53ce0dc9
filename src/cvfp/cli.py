"""`cvfp` command line: `cvfp report` prints the results of the last `dvc repro` from metrics/*.json;
`cvfp generate` continues a prompt with a trained model; `cvfp study` collects DVC experiments into STUDY.md;
`cvfp log-runs` logs the stages' journals to the tracking store (after the store was down).

Each command imports what it needs when it runs (torch only for `report` and `generate`)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


SQLITE = "sqlite:///"  # MLflow's URI of a local store file
STUDY_HELP = "collect DVC experiments (and their MLflow curves) into STUDY.md with plots"


def _load(folder: Path, name: str) -> dict | None:
    path = folder / name
    return json.loads(path.read_text()) if path.is_file() else None


def report(folder: Path, params_file: Path) -> int:
    """Print the results, test first: the comparison, then data, Phase 1, C*, Phase 2 and the evaluation table.

    Exit 1 if the pipeline has not run.
    """
    from cvfp.compare import comparison_table, training_seconds
    from cvfp.evaluate import results_table
    from cvfp.metrics import format_number, format_rank, format_rate
    from cvfp.params import load_params

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


def log_runs(root: Path | None) -> int:
    """Log every stage journal under `root` to the current tracking store, skipping stages already complete there.

    `root` is the workspace (None: the project around the current folder). One line per stage journal. Exit 0
    when every journal is there afterwards, 1 otherwise (the store is still failing: the reason is printed), 2
    when there is nothing to log.
    """
    from cvfp.runtime import configure_environment, project_root
    from cvfp.tracking import redact, tracking_uri
    from cvfp.tracking_writer import journals, replay

    configure_environment()
    root = project_root() if root is None else root.resolve()
    found = journals(root)
    if not found:
        print(f"no stage journals under {root}/.cvfp/journal: no stage has run here since journals were kept",
              file=sys.stderr)
        return 2
    uri = tracking_uri()
    print(f"logging {len(found)} stage journal(s) to {redact(uri)}")
    failed = 0
    for journal in found:
        outcome, failures = replay(journal, uri)
        label = f"{journal.parent.name}/{journal.stem}"
        print(f"  {label}: {outcome}" + (f" ({'; '.join(failures[:3])})" if failures else ""))
        failed += outcome not in ("logged", "already there")
    return 1 if failed else 0


UI_VIEW = "workflowType=machine_learning"  # MLflow 3.17's UI opens an experiment on its GenAI overview without it


def ui_url(base: str, tracking: str) -> str:
    """The runs table of the pipeline's experiment in the MLflow UI at `base` (the store is `tracking`).

    MLflow's UI picks the experiment page's view from its sidebar's GenAI / Model training switch (the URL's
    `workflowType`, else what this browser chose last, else GenAI), not from the experiment's
    `mlflow.experimentKind` tag: the link says `machine_learning`, so it opens on the runs.
    """
    from cvfp.tracking import DEFAULT_EXPERIMENT, EXPERIMENT_ENV

    name = os.environ.get(EXPERIMENT_ENV, DEFAULT_EXPERIMENT)
    if tracking.startswith(SQLITE):
        experiment_id = _sqlite_experiment_id(Path(tracking[len(SQLITE):]), name)
    else:
        from mlflow.tracking import MlflowClient

        experiment = MlflowClient(tracking_uri=tracking).get_experiment_by_name(name)
        experiment_id = None if experiment is None else experiment.experiment_id
    if experiment_id is None:
        raise SystemExit(f"no experiment {name!r} in {tracking}: run `dvc repro` first")
    return f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs?{UI_VIEW}"


def _sqlite_experiment_id(path: Path, name: str) -> str | None:
    """The id of the active experiment `name` in MLflow's sqlite store at `path`, read-only with sqlite3.

    MLflow's client would first import its SQLAlchemy store and check the schema (about 7 s on 2 cores) and
    would create a missing file; the `experiments` table (id, name, lifecycle_stage) is MLflow's since 1.0."""
    import sqlite3
    from contextlib import closing

    if not path.is_file():
        raise SystemExit(f"no MLflow store {path}: run `dvc repro` first")
    try:
        with closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as store:
            row = store.execute("select experiment_id from experiments where name = ? and lifecycle_stage = 'active'",
                                (name,)).fetchone()
    except sqlite3.Error as err:
        raise SystemExit(f"{path} is not a readable MLflow store: {err}") from None
    return None if row is None else str(row[0])


def ui(host: str, port: int, url_only: bool) -> int:
    """Print the link to the runs table; start `mlflow ui` on the local store unless the store is a server."""
    from cvfp.runtime import configure_environment
    from cvfp.tracking import redact, tracking_uri

    configure_environment()
    store = tracking_uri()
    if store.startswith(("http://", "https://")):
        print(redact(ui_url(store, store)))
        return 0
    print(ui_url(f"http://{host}:{port}", store))
    if url_only:
        return 0
    sys.stdout.flush()
    os.execvp("mlflow", ["mlflow", "ui", "--backend-store-uri", store, "--host", host, "--port", str(port)])


def servers(stop: bool) -> int:
    """List this user's warm stage servers and tracking services; with `stop`, stop them (the next stage starts
    what it needs again)."""
    from cvfp import service

    running = service.servers()
    for pid, kind, name in running:
        print(f"{pid:>8}  {kind:<18} {name}  log: {service.log_path(name)}")
    if not running:
        print("no cvfp server is running")
    if stop and running:
        print(f"stopped {service.stop(pid for pid, _, _ in running)}/{len(running)}")
    return 0


def _command(argv: list[str]) -> str | None:
    """The subcommand `argv` names: its first word that is not an option (`cvfp` itself has only -h)."""
    return next((word for word in argv if not word.startswith("-")), None)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    command = _command(argv)
    parser = argparse.ArgumentParser(prog="cvfp", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    show = commands.add_parser("report", help="print the results of the last pipeline run")
    show.add_argument("--metrics", default="metrics", type=Path, help="metrics folder (default: metrics)")
    show.add_argument("--params", default="params.yaml", type=Path)
    # generate and study import torch and matplotlib with their modules (~4 s): only their own command loads them
    sample = commands.add_parser("generate", help="continue a prompt with the final CVFP model or a baseline")
    gather = commands.add_parser("study", help=STUDY_HELP)
    if command == "generate":
        from cvfp.generate import add_arguments

        add_arguments(sample)
    elif command == "study":
        from cvfp.study import add_arguments

        add_arguments(gather)
    relog = commands.add_parser("log-runs", help="log the stages' journals to the tracking store "
                                                 "(MLFLOW_TRACKING_URI or mlflow.db), skipping what is there")
    relog.add_argument("--root", type=Path, default=None, help="workspace root (default: the project around cwd)")
    view = commands.add_parser("ui", help="open the MLflow UI on the runs table: print its link, start `mlflow ui` "
                                          "on the local store (bound to 127.0.0.1)")
    view.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1: not on the network)")
    view.add_argument("--port", type=int, default=5000)
    view.add_argument("--url-only", action="store_true", help="print the link, start nothing")
    running = commands.add_parser("servers", help="list the warm stage servers and tracking services (cvfp.warm, "
                                                  "cvfp.tracking_writer) of this user")
    running.add_argument("--stop", action="store_true", help="stop them (stages they started go on)")
    args = parser.parse_args(argv)
    if args.command == "servers":
        raise SystemExit(servers(args.stop))
    if args.command == "ui":
        raise SystemExit(ui(args.host, args.port, args.url_only))
    if args.command == "report":
        raise SystemExit(report(args.metrics, args.params))
    if args.command == "generate":
        from cvfp import generate

        raise SystemExit(generate.run(args))
    if args.command == "study":
        from cvfp import study

        raise SystemExit(study.run(args))
    if args.command == "log-runs":
        raise SystemExit(log_runs(args.root))


if __name__ == "__main__":
    main()
