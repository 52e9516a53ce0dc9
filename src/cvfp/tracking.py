"""MLflow tracking shared by every stage, kept off the stage's critical path.

Store: `MLFLOW_TRACKING_URI` if set (any MLflow server; credentials from MLflow's own
`MLFLOW_TRACKING_USERNAME` / `MLFLOW_TRACKING_PASSWORD`, never from params.yaml), else a sqlite
database `mlflow.db` in the workspace root (artifacts in `mlartifacts/`), also for experiments
DVC runs in temporary copies.

How a stage logs: this module imports neither MLflow nor torch. `StageRun` starts one writer
process (`python -m cvfp.tracking_writer`) when the stage starts; the writer imports MLflow and
opens the store on the other core while the stage imports torch and works. Every call
(params, metrics, curves, artifacts, dataset inputs, the execution's headline results) is one
JSON line, sent to the writer and appended to the stage's *journal*
(`.cvfp/journal/<execution>/<stage>.jsonl` in the workspace root). `close()` waits for the
writer's report, so a stage still says, before it exits, what was not logged.

Grouping: one pipeline execution is one *parent* run with one *child* run per stage. The parent
is found, not passed: its key is a hash of the params file, the git commit and the DVC
experiment name (`DVC_EXP_NAME`). A stage joins the newest parent with its key unless that
parent already holds a child of the same stage (then a new execution starts). The parent spans
its stages (start of the first, end of the last) and carries the headline results.

Files are the source of truth: if the store fails (unreachable, locked, refused, corrupted), the
stage goes on and warns, at the end, with what was not logged. `cvfp log-runs` later replays the
journals (which point at the stage's metrics files, CSVs and plots) to the current store, without
duplicating runs already there.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import subprocess
import sys
import time
import uuid
import warnings
from pathlib import Path
from typing import Any, Iterable

from cvfp.runtime import configure_environment, project_root

EXPERIMENT_ENV = "CVFP_EXPERIMENT"
DEFAULT_EXPERIMENT = "cvfp"
KEY_TAG = "cvfp.pipeline_key"
STAGE_TAG = "cvfp.stage"
JOURNAL_TAG = "cvfp.journal"  # one stage execution: a replay finds its run by this id
LOGGED_TAG = "cvfp.logged"  # "complete" once every call of the stage landed
PARENT_STAGE = "pipeline"
JOURNAL_DIR = Path(".cvfp") / "journal"
WRITER_MODULE = "cvfp.tracking_writer"
SECRET_ENV = ("MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_CLIENT_CERT_PATH")
MAX_LISTED_FAILURES = 10


# MLflow's run page groups charts in sections (a key's part before the last "/"), sorted by name in character
# order, "Model metrics" (keys without "/") last: the quantities a researcher opens Phase 1 for get the first
# sections, each with its train and val curves side by side.
PHASE1_FIRST_CHARTS = ("effective_rank", "convergence_rate", "cvfp_loss")


def phase1_curve(split: str, quantity: str) -> str:
    """The MLflow key of a Phase-1 curve: ("train", "effective_rank") -> "1_effective_rank/train",
    ("val", "diversity_loss") -> "diversity_loss/val" (metrics/phase1.json names the final values `val.diversity_loss`)."""
    if quantity in PHASE1_FIRST_CHARTS:
        return f"{PHASE1_FIRST_CHARTS.index(quantity) + 1}_{quantity}/{split}"
    return f"{quantity}/{split}"


def tracking_uri() -> str:
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    return f"sqlite:///{project_root() / 'mlflow.db'}"


def redact(text: str) -> str:
    """`text` without credentials: no user:password@ in URLs, no value of MLflow's secret variables."""
    text = re.sub(r"(\w+://)[^/@\s]+@", r"\1***@", text)
    for name in SECRET_ENV:
        secret = os.environ.get(name)
        if secret:
            text = text.replace(secret, "***")
    return text


def _git_commit(root: Path) -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() if out.returncode == 0 else "none"
    except (OSError, subprocess.SubprocessError):
        return "none"


def pipeline_key(params_file: Path, commit: str, exp_name: str) -> str:
    digest = hashlib.sha256()
    digest.update(params_file.read_bytes() if params_file.is_file() else b"")
    digest.update(commit.encode())
    digest.update(exp_name.encode())
    return digest.hexdigest()[:16]


def journal_path(root: Path, exp_name: str, stage: str) -> Path:
    return root / JOURNAL_DIR / (exp_name or "workspace") / f"{stage}.jsonl"


def now_ms() -> int:
    return int(time.time() * 1000)


class StageRun:
    """One stage's MLflow child run, logged by a writer process; store failures become one warning at close."""

    def __init__(self, stage: str, flat_params: dict[str, Any], params_file: str | Path = "params.yaml",
                 background: bool = True):
        """`background=False` runs the same writer in this process (library use; a stage always uses a process)."""
        configure_environment()
        self.stage = stage
        self.failures: list[str] = []
        self.closed = False
        root = project_root()
        exp_name = os.environ.get("DVC_EXP_NAME", "")
        commit = _git_commit(root)
        key = pipeline_key(Path(params_file), commit, exp_name)
        self._journal = self._open_journal(journal_path(root, exp_name, stage))
        self._writer = _start_writer() if background else _InlineWriter()
        self._send({
            "op": "open", "stage": stage, "uri": redact(tracking_uri()), "root": str(root),
            "experiment": os.environ.get(EXPERIMENT_ENV, DEFAULT_EXPERIMENT), "key": key,
            "journal": uuid.uuid4().hex, "start_ms": now_ms(),
            "tags": {"git.commit": commit, "dvc.exp_name": exp_name or "workspace", KEY_TAG: key},
            "params": {name: str(value) for name, value in sorted(flat_params.items())},
        })

    # -- what a stage logs -------------------------------------------------------------------------------------

    def log_metrics(self, metrics: dict[str, Any], step: int | None = None) -> None:
        """Log numeric leaves of a (nested) metrics dict under dotted names; non-finite values are skipped."""
        rows = [[name, value] for name, value in numeric_leaves(metrics)]
        if rows:
            self._send({"op": "metrics", "rows": rows, "step": step or 0, "ms": now_ms()})

    def log_curves(self, rows: Iterable[dict[str, Any]], step_key: str) -> None:
        """Log a per-iteration / per-epoch table as step metrics (one MLflow curve per column)."""
        for row in rows:
            self.log_metrics({k: v for k, v in row.items() if k != step_key}, step=int(row[step_key]))

    def log_artifact(self, path: str | Path, folder: str | None = None) -> None:
        path = Path(path)
        if path.exists():
            self._send({"op": "artifact", "path": str(path.resolve()), "folder": folder})

    def log_dataset(self, name: str, path: str | Path, context: str, profile: dict[str, Any],
                    execution: bool = False) -> None:
        """Record a dataset input (the runs table's Dataset column): name, source file, digest, counts.

        `context` is MLflow's (training / validation / testing / corpus); `execution` also records it on the
        parent run, so the execution's row says what it was trained and tested on.
        """
        path = Path(path)
        self._send({"op": "dataset", "name": name, "source": str(path), "digest": file_digest(path),
                    "context": context, "profile": profile, "execution": execution})

    def log_headline(self, metrics: dict[str, Any]) -> None:
        """Log results on the execution's parent run, so executions compare without opening stage runs."""
        rows = [[name, value] for name, value in numeric_leaves(metrics)]
        if rows:
            self._send({"op": "headline", "rows": rows, "ms": now_ms()})

    # -- lifetime ----------------------------------------------------------------------------------------------

    def close(self, failed: bool = False) -> None:
        if self.closed:
            return
        self.closed = True
        self._send({"op": "close", "failed": failed, "end_ms": now_ms()})
        if self._journal is not None:
            self._journal.close()
        self.failures.extend(self._writer.finish())
        if self.failures:
            warnings.warn(redact(
                f"MLflow store {tracking_uri()} failed; not logged for stage '{self.stage}': "
                f"{summarize(self.failures)}. "
                f"The metrics files are complete; `cvfp log-runs` logs them once the store works."), stacklevel=2)
            print(f"WARNING: tracking incomplete for stage '{self.stage}' ({len(self.failures)} failed calls)",
                  file=sys.stderr)

    def __enter__(self) -> "StageRun":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(failed=exc_type is not None)

    def _send(self, message: dict[str, Any]) -> None:
        line = json.dumps(message)
        if self._journal is not None:
            try:
                self._journal.write(line + "\n")
                self._journal.flush()
            except OSError as err:
                self.failures.append(f"journal ({err})")
                self._journal = None
        self._writer.send(line)

    def _open_journal(self, path: Path):
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            return open(path, "w", encoding="utf-8")
        except OSError as err:
            self.failures.append(f"journal {path} ({err}; `cvfp log-runs` cannot replay this stage)")
            return None


class NullRun:
    """The run of a non-zero rank in a torchrun launch: rank 0 alone records to MLflow."""

    failures: list[str] = []

    def log_metrics(self, metrics: dict[str, Any], step: int | None = None) -> None:
        pass

    def log_curves(self, rows: Iterable[dict[str, Any]], step_key: str) -> None:
        pass

    def log_artifact(self, path: str | Path, folder: str | None = None) -> None:
        pass

    def log_dataset(self, name: str, path: str | Path, context: str, profile: dict[str, Any],
                    execution: bool = False) -> None:
        pass

    def log_headline(self, metrics: dict[str, Any]) -> None:
        pass

    def close(self, failed: bool = False) -> None:
        pass


class _ProcessWriter:
    """The writer process: JSON lines on its stdin, one JSON report on its stdout when stdin closes."""

    def __init__(self, process: subprocess.Popen | None, failure: str | None = None):
        self.process = process
        self.lost: list[str] = [failure] if failure else []
        self.sent = 0

    def send(self, line: str) -> None:
        if self.process is None or self.lost:
            return
        try:
            self.process.stdin.write(line + "\n")
            self.process.stdin.flush()
            self.sent += 1
        except (OSError, ValueError) as err:
            self.lost.append(f"writer process (pid {self.process.pid}) stopped reading ({type(err).__name__})")

    def finish(self) -> list[str]:
        if self.process is None:
            return self.lost
        try:
            self.process.stdin.close()
        except OSError:
            pass
        out = self.process.stdout.read()
        code = self.process.wait()
        try:
            report = json.loads(out.strip().splitlines()[-1])
            return self.lost + list(report["failures"])
        except (ValueError, IndexError, KeyError, TypeError):
            return self.lost + [f"every call after the writer process ended with exit code {code} before reporting "
                                f"(of {self.sent} calls sent)"]


class _InlineWriter:
    """The same writer, in this process."""

    def __init__(self):
        from cvfp.tracking_writer import Writer

        self.writer = Writer()

    def send(self, line: str) -> None:
        self.writer.handle(json.loads(line))

    def finish(self) -> list[str]:
        return self.writer.finish()


def _start_writer() -> _ProcessWriter:
    try:
        process = subprocess.Popen([sys.executable, "-m", WRITER_MODULE], stdin=subprocess.PIPE,
                                   stdout=subprocess.PIPE, text=True, encoding="utf-8", env=_writer_env())
    except OSError as err:
        return _ProcessWriter(None, f"everything: the writer process did not start ({err})")
    return _ProcessWriter(process)


def _writer_env() -> dict[str, str]:
    """The writer imports cvfp from where this process did (an editable install, or a test's copy of src/)."""
    env = dict(os.environ)
    here = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join([here, *filter(None, [env.get("PYTHONPATH")])])
    return env


BATCHED_KINDS = ("metrics", "headline", "params")  # one failure per batch: summarised as one item per kind


def summarize(failures: list[str]) -> str:
    """The failures in one line: each batched kind once (with its count and first reason), every other call
    (connect, artifact, dataset, run ends) by name, at most MAX_LISTED_FAILURES items."""
    items: list[str] = []
    batched: dict[str, list[str]] = {}
    for failure in failures:
        kind = failure.split(" ", 1)[0]
        if kind in BATCHED_KINDS:
            if kind not in batched:
                items.append(kind)  # placeholder, keeps the order of first appearance
            batched.setdefault(kind, []).append(failure)
        else:
            items.append(failure)
    lines = [f"{item} ({len(batched[item])} calls; first: {batched[item][0]})" if item in batched else item
             for item in items]
    more = len(lines) - MAX_LISTED_FAILURES
    return "; ".join(lines[:MAX_LISTED_FAILURES]) + (f"; ... and {more} more" if more > 0 else "")


def numeric_leaves(tree: dict[str, Any], prefix: str = "") -> list[tuple[str, float]]:
    """(dotted name, value) for each finite number or bool in a nested dict."""
    out: list[tuple[str, float]] = []
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.extend(numeric_leaves(value, f"{name}."))
        elif isinstance(value, bool):
            out.append((name, float(value)))
        elif isinstance(value, (int, float)) and math.isfinite(value):
            out.append((name, float(value)))
    return out


def file_digest(path: Path) -> str:
    """The first 16 hex digits of a file's sha256 (an MLflow dataset digest); "missing" if there is no file."""
    if not path.is_file():
        return "missing"
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]
