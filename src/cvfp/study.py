"""`cvfp study`: one report, STUDY.md with its PNGs, from a set of DVC experiments.

The grid is defined and run by DVC (`dvc exp run --queue -S ...`, `dvc queue start -j N`);
this module only reads what the runs left behind:

- `dvc exp show --json` in the repository: every experiment's params and metrics files, the
  final numbers (metrics/phase1.json, metrics/eval.json, metrics/compare.json);
- the MLflow store: the per-iteration Phase-1 curves, from each experiment's newest finished
  `phase1` run tagged `dvc.exp_name=<name>` (a plain `dvc repro` tags `workspace`).

A piece that is not there (a metrics file, a key, a run, a curve) is listed as missing in the
report and printed as n/a, never filled in. Nothing here knows the grid: the table's param
columns are whichever params differ between the experiments (`varying`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from cvfp.io import atomic_path, write_text
from cvfp.metrics import format_number, format_rate
from cvfp.plots import DPI, FIGSIZE
from cvfp.tracking import phase1_curve

WORKSPACE = "workspace"  # DVC's name for the working tree, and the tracking tag of a plain `dvc repro`
DEFAULT_PARAMS_FILE = "params.yaml"  # `dvc params diff` names its keys without the file
CURVES = ("train.convergence_rate", "val.convergence_rate", "train.cvfp_loss", "val.cvfp_loss")
PHASE1, EVAL, COMPARE = "metrics/phase1.json", "metrics/eval.json", "metrics/compare.json"
MODELS = {"cvfp_fixed": "CVFP fixed", "cvfp_free": "CVFP free", "gru": "GRU", "transformer": "Transformer"}
LYAPUNOV_BOOKKEEPING = {"steps", "burn_in", "blocks", "stderr", "samples"}  # shown with the exponent or not at all
FILES = {"curves": "phase1_curves.png", "final": "phase1_final.png", "bpb": "test_bpb.png"}


class StudyError(RuntimeError):
    """The study cannot be built (no experiments, no dvc, unreadable output); reported in one line, exit 2."""


def default_tracking_uri(repo: Path) -> str:
    """The store the stages log to: MLFLOW_TRACKING_URI if set, else the repository's sqlite mlflow.db."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(repo).resolve() / 'mlflow.db'}"


def collect(repo: Path, tracking_uri: str | None = None, all_commits: bool = False) -> list[dict[str, Any]]:
    """One record per DVC experiment of `repo` (and the workspace), with its Phase-1 curves from MLflow.

    A record: name, rev, baseline (the commit it derives from), status (`done`, or DVC's executor
    state: queued, running, failed), params and metrics (flat dotted keys; metrics prefixed by
    their file, `metrics/eval.json:test.free.bpb`), curves ({name: [[iteration, value], ...]}),
    curves_run (the MLflow run id or None), missing and notes (lines for the report).
    `all_commits` reads the experiments of every commit (`dvc exp show -A`), not only HEAD's.
    """
    repo = Path(repo)
    command = ["dvc", "exp", "show", "--json", *(["--all-commits"] if all_commits else [])]
    try:
        done = subprocess.run(command, cwd=repo, capture_output=True, text=True)
    except FileNotFoundError:
        raise StudyError("dvc not found on PATH (pip install dvc)") from None
    except NotADirectoryError:
        raise StudyError(f"{repo} is not a directory") from None
    if done.returncode != 0:
        lines = [line.strip() for line in done.stderr.splitlines() if line.strip()]
        reason = lines[0] if lines else f"exit code {done.returncode}"
        raise StudyError(f"`{' '.join(command)}` failed in {repo}: {reason}")
    records = records_from_exp_show(done.stdout)
    add_curves(records, tracking_uri or default_tracking_uri(repo))
    return records


def records_from_exp_show(text: str) -> list[dict[str, Any]]:
    """Records (without curves) from the stdout of `dvc exp show --json` (DVC 3).

    Its shape: a list of commits; the first is {"rev": "workspace", "name": null, "data": ...,
    "experiments": null}, each baseline commit is {"rev", "name" (branch), "data", "error",
    "experiments": [{"name", "executor": null | {"state": ...}, "revs": [{"rev", "name", "data",
    "error"}, ...]}]}, where data = {"params": {file: {"data": tree} | {"error": ...}},
    "metrics": {file: {"data": tree} | {"error": {"type", "msg"}}}, ...}. Baseline commits are
    not experiments and give no record.
    """
    try:
        commits = json.loads(text)
    except json.JSONDecodeError as err:
        raise StudyError(f"unreadable JSON from `dvc exp show --json` ({err})") from None
    if not isinstance(commits, list):
        raise StudyError(f"unexpected `dvc exp show --json` output: a {type(commits).__name__}, not a list")
    records = []
    for commit in commits:
        if not isinstance(commit, dict):
            raise StudyError(f"unexpected `dvc exp show --json` entry: {str(commit)[:80]}")
        if commit.get("rev") == WORKSPACE:
            head = next((c.get("rev") for c in commits if isinstance(c, dict) and c.get("rev") != WORKSPACE), None)
            records.append(_record(WORKSPACE, WORKSPACE, head, None, commit))
            continue
        for experiment in commit.get("experiments") or []:
            revs = experiment.get("revs") or []
            if not revs:
                continue
            tip = revs[0]  # newer DVC lists one rev per experiment; the first is its result
            name = experiment.get("name") or tip.get("name") or tip.get("rev", "")[:7]
            records.append(_record(name, tip.get("rev"), commit.get("rev"), experiment.get("executor"), tip))
    return records


def _record(name: str, rev: str | None, baseline: str | None, executor: dict | None, entry: dict) -> dict[str, Any]:
    state = (executor or {}).get("state")
    record = {"name": name, "rev": rev, "baseline": baseline,
              "status": "done" if state in (None, "success") else state,
              "params": {}, "metrics": {}, "curves": {}, "curves_run": None, "missing": [], "notes": []}
    if entry.get("error"):
        record["missing"].append(f"dvc: {_error_text(entry['error'])}")
    data = entry.get("data") or {}
    for path, content in (data.get("params") or {}).items():
        if "data" in content:
            record["params"].update(flatten(content["data"], "" if path == DEFAULT_PARAMS_FILE else f"{path}:"))
        else:
            record["missing"].append(f"{path}: {_error_text(content.get('error'))}")
    for path, content in (data.get("metrics") or {}).items():
        if "data" in content:
            record["metrics"].update(flatten(content["data"], f"{path}:"))
        else:
            record["missing"].append(f"{path}: {_error_text(content.get('error'))}")
    return record


def _error_text(error: Any) -> str:
    """DVC's {"type", "msg"} error as one line."""
    if not isinstance(error, dict):
        return str(error)
    message = str(error.get("msg") or "").strip().splitlines()
    return f"{error.get('type', 'error')}: {message[0] if message else ''}"


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts to dotted keys, as `dvc params diff` names them; lists stay values (`model.layer_structure`)."""
    if not isinstance(tree, dict):
        return {prefix.rstrip("."): tree} if prefix else {}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def add_curves(records: list[dict[str, Any]], tracking_uri: str) -> None:
    """Fill each done record's `curves` from its newest finished phase1 run in the store (in place).

    Runs whose `git.commit` tag is the record's baseline are preferred; another commit's run is
    used only when there is none, with a note. A missing store, run or curve is recorded as missing.
    """
    wanted = [record for record in records if record["status"] == "done"]
    for record in wanted:
        record["tracking_uri"] = tracking_uri
    if tracking_uri.startswith("sqlite:///") and not Path(tracking_uri[len("sqlite:///"):]).is_file():
        for record in wanted:  # opening a sqlite URI would create an empty store
            record["missing"].append(f"MLflow: no store at {tracking_uri}; no Phase-1 curves")
        return
    try:
        from mlflow.tracking import MlflowClient  # heavy, and only needed once there is a store to read

        client = MlflowClient(tracking_uri=tracking_uri)
        experiment_ids = [experiment.experiment_id for experiment in client.search_experiments()]
    except Exception as err:  # MLflow raises many types for a broken or unreachable store
        for record in wanted:
            record["missing"].append(f"MLflow: store {tracking_uri} unreadable ({type(err).__name__}); "
                                     f"no Phase-1 curves")
        return
    for record in wanted:
        name = record["name"]
        if not experiment_ids:
            record["missing"].append(f"MLflow: no experiments in store {tracking_uri}; no Phase-1 curves")
            continue
        if "'" in name:  # the search filter has no escape for a quote
            record["missing"].append(f"MLflow: cannot search for the name {name!r}; no Phase-1 curves")
            continue
        runs = client.search_runs(
            experiment_ids, filter_string=f"tags.`cvfp.stage` = 'phase1' and tags.`dvc.exp_name` = '{name}' "
                                          f"and attributes.status = 'FINISHED'",
            order_by=["attributes.start_time DESC"])
        if not runs:
            record["missing"].append(f"MLflow: no finished phase1 run tagged dvc.exp_name={name}")
            continue
        run = next((r for r in runs if r.data.tags.get("git.commit") == record["baseline"]), runs[0])
        commit = run.data.tags.get("git.commit")
        if record["baseline"] and commit != record["baseline"]:
            record["notes"].append(f"curves from run {run.info.run_id} at commit {str(commit)[:7]}, not the "
                                   f"experiment's baseline {record['baseline'][:7]} (no run at that commit)")
        record["curves_run"] = run.info.run_id
        for key in CURVES:
            split, _, quantity = key.partition(".")
            history = client.get_metric_history(run.info.run_id, phase1_curve(split, quantity)) or \
                client.get_metric_history(run.info.run_id, key)  # the name before the curves had chart sections
            history = sorted(history, key=lambda m: (m.step, m.timestamp))
            points = {m.step: m.value for m in history}  # a step logged twice keeps its last value
            if points:
                record["curves"][key] = [[step, value] for step, value in sorted(points.items())]
            else:
                record["missing"].append(f"MLflow: no {key} curve in phase1 run {run.info.run_id}")


def select(records: list[dict[str, Any]], names: list[str] | None) -> list[dict[str, Any]]:
    """The records named (by experiment name or a rev prefix of 7+ characters); all if None."""
    if not names:
        return records
    chosen = []
    for name in names:
        found = [r for r in records if r["name"] == name or (len(name) >= 7 and str(r["rev"]).startswith(name))]
        if not found:
            known = ", ".join(r["name"] for r in records[:10]) + (", ..." if len(records) > 10 else "")
            raise StudyError(f"no experiment named {name!r} (known: {known})")
        chosen.extend(r for r in found if r not in chosen)
    return chosen


def varying(records: list[dict[str, Any]]) -> list[str]:
    """The param keys whose values differ between the records (absent counts as a value): the grid's axes."""
    keys = list(dict.fromkeys(key for record in records for key in record["params"]))
    return [key for key in keys
            if len({json.dumps(record["params"].get(key, "<absent>"), sort_keys=True) for record in records}) > 1]


def _number(record: dict[str, Any], key: str) -> float | None:
    value = record["metrics"].get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def _convergence(record: dict[str, Any], split: str) -> str:
    """`p% (k/N)` from metrics/phase1.json; the rate alone if the counts are missing; n/a if neither."""
    converged, tokens = (_number(record, f"{PHASE1}:{split}.{key}") for key in ("converged_tokens", "tokens"))
    if converged is not None and tokens:
        return format_rate(int(converged), int(tokens))
    rate = _number(record, f"{PHASE1}:{split}.convergence_rate")
    return "n/a" if rate is None else f"{100 * rate:.1f}%"


def lyapunov_keys(records: list[dict[str, Any]]) -> list[str]:
    """The numeric metrics/eval.json keys naming a Lyapunov exponent, whatever the evaluation wrote."""
    keys = []
    for record in records:
        for key in record["metrics"]:
            if (key.startswith(f"{EVAL}:") and "lyapunov" in key.lower() and key not in keys
                    and key.rsplit(".", 1)[-1] not in LYAPUNOV_BOOKKEEPING and _number(record, key) is not None):
                keys.append(key)
    return keys


def _in_file(key: str) -> str:
    """`metrics/eval.json:lyapunov.final.exponent` -> `lyapunov.final.exponent`."""
    return key.split(":", 1)[-1]


def _lyapunov(record: dict[str, Any], key: str) -> str:
    value = _number(record, key)
    if value is None:
        return "n/a"
    stderr = _number(record, key.rsplit(".", 1)[0] + ".stderr") if "." in key else None
    return format_number(value, "+.4f") + ("" if stderr is None else f" ± {stderr:.4f}")


def _bpb(record: dict[str, Any], model: str) -> float | None:
    return _number(record, f"{COMPARE}:models.{model}.bpb")


def _value(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def _sort_key(record: dict[str, Any], axes: list[str]) -> tuple:
    """Workspace first, then the grid in order of its axes (numbers numerically)."""
    values = tuple((0, float(v), "") if isinstance(v, (int, float)) and not isinstance(v, bool) else (1, 0.0, _value(v))
                   for v in (record["params"].get(key) for key in axes))
    return (record["name"] != WORKSPACE, values, record["name"])


def _label(record: dict[str, Any]) -> str:
    same = record.get("same_as")
    return f"{record['name']} (= {same})" if same else record["name"]


def summary_table(records: list[dict[str, Any]], axes: list[str]) -> str:
    """The markdown summary: one row per record."""
    lyapunov = lyapunov_keys(records)
    header = ["experiment", *axes, "Phase-1 iterations", "Phase-1 convergence, train", "Phase-1 convergence, val",
              *(f"Lyapunov `{_in_file(key)}`" for key in lyapunov),
              *(f"test bpb {label}" for label in MODELS.values()), "gap CVFP free - GRU"]
    rows = []
    for record in records:
        iterations = _number(record, f"{PHASE1}:iterations")
        bpb = {model: _bpb(record, model) for model in MODELS}
        gap = None if bpb["cvfp_free"] is None or bpb["gru"] is None else bpb["cvfp_free"] - bpb["gru"]
        rows.append([_label(record), *(_value(record["params"].get(key, "n/a")) for key in axes),
                     "n/a" if iterations is None else str(int(iterations)),
                     _convergence(record, "train"), _convergence(record, "val"),
                     *(_lyapunov(record, key) for key in lyapunov),
                     *(format_number(value) for value in bpb.values()), format_number(gap, "+.4f")])
    lines = ["| " + " | ".join(cells) + " |" for cells in (header, *rows)]
    lines.insert(1, "|" + "|".join("---" for _ in header) + "|")
    return "\n".join(lines)


def write_report(records: list[dict[str, Any]], out_dir: Path, title: str, command: str | None = None) -> Path:
    """Write out_dir/STUDY.md and its PNGs from the done records; returns the STUDY.md path.

    `command` is the command line stated in the report (default: this process's).
    """
    out_dir = Path(out_dir)
    done = [dict(record) for record in records if record["status"] == "done"]  # copies: labels are added
    if not done:
        raise StudyError("no finished experiments to report")
    _mark_workspace_duplicate(done)
    axes = varying(done)
    done.sort(key=lambda record: _sort_key(record, axes))
    plot_curves(done, _plot_labels(done, axes), out_dir / FILES["curves"])
    names = [_label(record) for record in done]  # the x axes: names; the table maps them to params
    plot_final(done, names, out_dir / FILES["final"])
    plot_bpb(done, names, out_dir / FILES["bpb"])

    command = command or "cvfp study " + shlex.join(sys.argv[1:])
    baselines = sorted({str(record["baseline"])[:7] for record in done if record["baseline"]})
    runs = {record["name"]: record["curves_run"] for record in done}
    splits = sorted({str(record["metrics"].get(f"{COMPARE}:split", "not stated")) for record in done})
    lyapunov = lyapunov_keys(done)
    stores = sorted({record["tracking_uri"] for record in done if record.get("tracking_uri")})
    lines = [
        f"# {title}", "",
        f"Produced by `{command}` from {len(done)} experiment(s) of `dvc exp show --json` "
        f"(baseline commit {', '.join(baselines) or 'none'}). Rerun it to regenerate this file and its plots.", "",
        "## Summary", "",
        "Param columns: the params that differ between these experiments "
        f"({', '.join(f'`{key}`' for key in axes) or 'none'}).",
        "",
        summary_table(done, axes), "",
        f"- Phase-1 iterations and convergence: `{PHASE1}` (`iterations`; `train`/`val`: "
        "`converged_tokens`/`tokens`), "
        f"the final iteration's share of tokens whose context's mean squared change from the previous iteration "
        f"is below `phase1.convergence_threshold`.",
        f"- Lyapunov: `{EVAL}`, " + (f"keys {', '.join(f'`{_in_file(key)}`' for key in lyapunov)} (± its `stderr`); "
                                     "negative: perturbations of the context die out."
                                     if lyapunov else "no key naming a Lyapunov exponent in any experiment."),
        f"- Bits per byte: `{COMPARE}` `models.<model>.bpb`, split {', '.join(f'`{s}`' for s in splits)}; "
        "every model of one experiment is scored on the same tokens. The gap is CVFP free-running minus the GRU "
        "(negative: CVFP is better).",
        "- n/a: not in that experiment's files or runs (see Missing).", "",
        "## Phase-1 convergence and cvfp loss per iteration", "",
        "Per-iteration curves of each experiment's newest finished `phase1` MLflow run tagged "
        "`dvc.exp_name=<experiment>` (`workspace` for a plain `dvc repro`); steps are iterations. Iteration 1 "
        "replays the scan's own contexts, so its convergence is close to 100% by construction.", "",
        f"![Phase-1 curves]({FILES['curves']})", "",
        "## Final Phase-1 convergence and Lyapunov exponent", "",
        f"![Final Phase-1 convergence and Lyapunov exponent]({FILES['final']})", "",
        "## Test bits per byte", "",
        "CVFP fixed (contexts = C*) and free-running per experiment; the GRU and the Transformer trained on "
        "the same tokens are the reference lines.", "",
        f"![Test bits per byte]({FILES['bpb']})", "",
        "## Missing", "",
    ]
    missing = [f"- {_label(record)}: {line}" for record in done
               for line in record["missing"] + _absent_keys(record, lyapunov)]
    lines += missing or ["Nothing: every experiment has every file, key and curve read here."]
    skipped = [record for record in records if record["status"] != "done"]
    if skipped:
        lines += ["", "Not included (not finished): "
                  + ", ".join(f"{record['name']} ({record['status']})" for record in skipped) + "."]
    notes = [f"- {_label(record)}: {line}" for record in done for line in record["notes"]]
    lines += ["", "## Sources", "",
              "- params and final metrics: `dvc exp show --json` (params flattened as `dvc params diff` names them).",
              "- curves: MLflow store " + (", ".join(f"`{_display_uri(uri)}`" for uri in stores) or "none")
              + ", runs " + ", ".join(f"{name} `{run}`" if run else f"{name} none" for name, run in runs.items()) + ".",
              *notes]
    path = out_dir / "STUDY.md"
    write_text(path, "\n".join(lines) + "\n")
    return path


def _absent_keys(record: dict[str, Any], lyapunov: list[str]) -> list[str]:
    """Lines naming the metrics this report reads that the record lacks (files already reported are skipped)."""
    wanted = {PHASE1: ["iterations", *(f"{split}.{key}" for split in ("train", "val")
                                       for key in ("converged_tokens", "tokens"))],
              EVAL: [_in_file(key) for key in lyapunov],
              COMPARE: [f"models.{model}.bpb" for model in MODELS]}
    lines = []
    for path, keys in wanted.items():
        if not keys or any(line.startswith(f"{path}:") for line in record["missing"]):
            continue
        if not any(key.startswith(f"{path}:") for key in record["metrics"]):
            lines.append(f"{path}: not among this experiment's DVC metrics")
            continue
        absent = [key for key in keys if _number(record, f"{path}:{key}") is None]
        if absent:
            lines.append(f"{path}: no {', '.join(absent)}")
    return lines


def _display_uri(uri: str) -> str:
    """A sqlite store under the current folder as a relative URI (what a rerun from here would pass)."""
    if uri.startswith("sqlite:///"):
        path = Path(uri[len("sqlite:///"):])
        if path.is_absolute() and path.is_relative_to(Path.cwd()):
            return f"sqlite:///{path.relative_to(Path.cwd())}"
    return uri


def _mark_workspace_duplicate(records: list[dict[str, Any]]) -> None:
    """Label the workspace with the experiment it equals (a `dvc exp run` leaves its result there)."""
    for record in records:
        if record["name"] == WORKSPACE:
            record["same_as"] = next((other["name"] for other in records if other is not record
                                      and other["params"] == record["params"]
                                      and other["metrics"] == record["metrics"]), None)


def _plot_labels(records: list[dict[str, Any]], axes: list[str]) -> list[str]:
    """Experiment names, with the varying params' values while there are few enough to read."""
    if not axes or len(axes) > 4:
        return [_label(record) for record in records]

    def values(record: dict[str, Any]) -> str:
        return ", ".join(f"{key.rsplit('.', 1)[-1]}={_value(record['params'].get(key, 'n/a'))}" for key in axes)

    return [f"{_label(record)} ({values(record)})" for record in records]


def _figure(rows: int, columns: int, width: float | None = None) -> tuple[Figure, Any]:
    figure = Figure(figsize=(width or FIGSIZE[0] * columns, FIGSIZE[1] * rows), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)  # an Agg canvas of its own: no pyplot, no global backend
    return figure, figure.subplots(rows, columns, squeeze=False)


def _save(figure: Figure, path: Path) -> Path:
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png")
    return path


def _style(index: int) -> dict[str, Any]:
    """Ten colours, then the next line style: a grid of 40 stays tellable apart."""
    return {"color": f"C{index % 10}", "linestyle": ("-", "--", ":", "-.")[(index // 10) % 4]}


def plot_curves(records: list[dict[str, Any]], labels: list[str], path: Path) -> Path:
    """Convergence rate (%) and cvfp loss per Phase-1 iteration: rows quantities, columns train / val."""
    figure, axes = _figure(2, 2)
    for row, (quantity, ylabel, scale) in enumerate((("convergence_rate", "convergence rate (%)", 100.0),
                                                     ("cvfp_loss", "cvfp loss", 1.0))):
        for column, split in enumerate(("train", "val")):
            axis = axes[row][column]
            for index, (record, label) in enumerate(zip(records, labels)):
                points = record["curves"].get(f"{split}.{quantity}")
                if points:
                    axis.plot([p[0] for p in points], [scale * p[1] for p in points], marker=".", label=label,
                              **_style(index))
            axis.set_title(f"{split} {quantity}")
            axis.set_xlabel("iteration")
            axis.set_ylabel(ylabel)
            axis.xaxis.set_major_locator(MaxNLocator(integer=True))
            axis.grid(alpha=0.3)
            if not axis.lines:
                axis.text(0.5, 0.5, "no curves in the MLflow store", ha="center", va="center", transform=axis.transAxes)
    handles, names = next(((h, n) for h, n in (ax.get_legend_handles_labels() for ax in axes.flat) if h), ([], []))
    if handles:
        figure.legend(handles, names, loc="outside right upper", fontsize="small")
    return _save(figure, path)


def _experiment_axis(axis, labels: list[str]) -> None:
    axis.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize="small")
    axis.set_xlim(-0.6, len(labels) - 0.4)
    axis.grid(alpha=0.3, axis="y")


def _width(count: int) -> float:
    """Wide enough for one tick label per experiment."""
    return max(FIGSIZE[0], 0.45 * count + 2.5)


def plot_final(records: list[dict[str, Any]], labels: list[str], path: Path) -> Path:
    """Final Phase-1 convergence (train and val bars, %) and the Lyapunov exponents, per experiment."""
    figure, ((rates,), (lyapunov,)) = _figure(2, 1, width=_width(len(records)))
    for offset, split in ((-0.2, "train"), (0.2, "val")):
        points = [(i + offset, 100 * rate) for i, record in enumerate(records)
                  if (rate := _number(record, f"{PHASE1}:{split}.convergence_rate")) is not None]
        if points:
            rates.bar([p[0] for p in points], [p[1] for p in points], width=0.4, label=split)
    rates.set_ylabel("final Phase-1 convergence (%)")
    rates.set_title("Phase-1 convergence at the last iteration")
    _experiment_axis(rates, labels)
    if rates.patches:
        rates.legend()
    keys = lyapunov_keys(records)
    for index, key in enumerate(keys):
        shift = (index - (len(keys) - 1) / 2) * 0.15
        found = [(i + shift, value, _number(record, key.rsplit(".", 1)[0] + ".stderr") or 0.0)
                 for i, record in enumerate(records) if (value := _number(record, key)) is not None]
        lyapunov.errorbar([f[0] for f in found], [f[1] for f in found], yerr=[f[2] for f in found], fmt="o",
                          capsize=3, label=_in_file(key))
    if keys:
        lyapunov.axhline(0.0, color="black", linewidth=0.8)  # the sign is what matters: below 0 perturbations die out
        lyapunov.legend(fontsize="small")
    else:
        lyapunov.text(0.5, 0.5, f"no Lyapunov exponent in {EVAL}", ha="center", va="center",
                      transform=lyapunov.transAxes)
    lyapunov.set_ylabel("Lyapunov exponent per step")
    lyapunov.set_title("Lyapunov exponent of the scan")
    _experiment_axis(lyapunov, labels)
    return _save(figure, path)


def plot_bpb(records: list[dict[str, Any]], labels: list[str], path: Path) -> Path:
    """Test bits per byte per experiment: CVFP fixed and free as points, the GRU and Transformer as reference lines."""
    figure, ((axis,),) = _figure(1, 1, width=_width(len(records)) + 1.5)  # + the legend
    for model, style in (("gru", {"color": "C2", "linestyle": "-"}),
                         ("transformer", {"color": "C3", "linestyle": "--"})):
        first = True
        for i, record in enumerate(records):
            value = _bpb(record, model)
            if value is not None:
                axis.hlines(value, i - 0.4, i + 0.4, linewidth=2, label=MODELS[model] if first else None, **style)
                first = False
    for model, marker in (("cvfp_fixed", "o"), ("cvfp_free", "s")):
        points = [(i, value) for i, record in enumerate(records) if (value := _bpb(record, model)) is not None]
        if points:
            axis.plot([p[0] for p in points], [p[1] for p in points], marker, label=MODELS[model],
                      color="C0" if model == "cvfp_fixed" else "C1")
    axis.set_ylabel("test bits per byte (lower: better)")
    axis.set_title("Test bits per byte (lines: baselines on the same tokens)")
    _experiment_axis(axis, labels)
    if axis.get_legend_handles_labels()[0]:
        figure.legend(loc="outside right upper", fontsize="small")
    else:
        axis.text(0.5, 0.5, f"no bits per byte in {COMPARE}", ha="center", va="center", transform=axis.transAxes)
    return _save(figure, path)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--repo", type=Path, default=Path("."), help="the DVC repository (default: .)")
    parser.add_argument("--out", type=Path, default=Path("study"),
                        help="folder for STUDY.md and its PNGs (default: study/)")
    parser.add_argument("--tracking-uri",
                        help="MLflow store (default: MLFLOW_TRACKING_URI, else sqlite:///<repo>/mlflow.db)")
    parser.add_argument("--title", default="CVFP study", help="the report's heading (default: CVFP study)")
    parser.add_argument("--experiments", nargs="+", metavar="NAME",
                        help="only these experiments (`workspace` is the working tree); default: all")
    parser.add_argument("--all-commits", action="store_true",
                        help="experiments of every commit (dvc exp show -A), not only those derived from HEAD")


def command_line(args: argparse.Namespace) -> str:
    """The canonical `cvfp study ...` that `args` stands for, stated in the report."""
    parts = ["cvfp", "study", "--repo", str(args.repo), "--out", str(args.out)]
    if args.tracking_uri:
        parts += ["--tracking-uri", args.tracking_uri]
    if args.title != "CVFP study":
        parts += ["--title", args.title]
    if args.experiments:
        parts += ["--experiments", *args.experiments]
    if args.all_commits:
        parts.append("--all-commits")
    return shlex.join(parts)


def run(args: argparse.Namespace) -> int:
    """Collect, write the report, print its path; a study that cannot be built is a one-line error (exit 2)."""
    try:
        records = select(collect(args.repo, args.tracking_uri, all_commits=args.all_commits), args.experiments)
        if not any(record["metrics"] for record in records if record["status"] == "done"):
            raise StudyError(f"no experiments with metrics in {args.repo} (run some with `dvc exp run`, "
                             f"or pass --all-commits for those of earlier commits)")
        path = write_report(records, args.out, args.title, command=command_line(args))
    except (StudyError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {path} ({len([r for r in records if r['status'] == 'done'])} experiments)")
    return 0


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m cvfp.study", description=__doc__.split("\n")[0])
    add_arguments(parser)
    raise SystemExit(run(parser.parse_args(argv)))


if __name__ == "__main__":
    main()
