"""MLflow tracking shared by every stage.

Store: `MLFLOW_TRACKING_URI` if set, else a sqlite database `mlflow.db` in the workspace
root (artifacts in `mlartifacts/`), also for experiments DVC runs in temporary copies.

Grouping: one pipeline execution is one *parent* run with one *child* run per stage. Each
stage is its own process, so the parent is found, not passed: its key is a hash of the
params file, the git commit and the DVC experiment name (`DVC_EXP_NAME`, set by
`dvc exp run`). A stage joins the newest parent with its key unless that parent already
holds a child of the same stage (then this is a new execution and a new parent starts).

Files are the source of truth: if the store fails (unreachable, locked, corrupted), the
stage goes on, and a warning at the end says what was not logged.
"""

from __future__ import annotations

import hashlib
import math
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable

from cvfp.runtime import configure_environment, project_root

EXPERIMENT_ENV = "CVFP_EXPERIMENT"
DEFAULT_EXPERIMENT = "cvfp"
KEY_TAG = "cvfp.pipeline_key"
STAGE_TAG = "cvfp.stage"
LOCK_WAIT_S = 120.0  # how long one store call waits out "database is locked" before giving up
SQLITE_TIMEOUT_S = 5.0


def tracking_uri() -> str:
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    return f"sqlite:///{project_root() / 'mlflow.db'}"


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


class StageRun:
    """One stage's MLflow child run; every call degrades to a recorded warning if the store fails."""

    def __init__(self, stage: str, flat_params: dict[str, Any], params_file: str | Path = "params.yaml"):
        self.stage = stage
        self.failures: list[str] = []
        self.client = None
        self.run_id: str | None = None
        self.parent_id: str | None = None
        self._open(flat_params, Path(params_file))

    def _call(self, what: str, fn: Callable[[], Any]) -> Any:
        """Run one store call, retrying while sqlite reports a lock; record a failure otherwise."""
        if self.client is None and self.run_id is None and what != "connect":
            self.failures.append(what)
            return None
        delay = 0.05
        deadline = time.monotonic() + LOCK_WAIT_S
        while True:
            try:
                return fn()
            except Exception as err:  # the store can fail in many ways; none may stop the stage
                if "locked" in str(err).lower() and time.monotonic() + delay < deadline:
                    time.sleep(delay)  # another process (a parallel experiment) holds the sqlite write lock
                    delay = min(2 * delay, 2.0)
                    continue
                self.failures.append(f"{what} ({type(err).__name__}: {str(err).splitlines()[0][:200]})")
                return None

    def _open(self, flat_params: dict[str, Any], params_file: Path) -> None:
        configure_environment()
        root = project_root()

        def connect():
            from mlflow.tracking import MlflowClient  # inside the guarded call: a broken MLflow install warns, never stops the stage

            _preflight_sqlite(tracking_uri())

            client = MlflowClient(tracking_uri=tracking_uri())
            name = os.environ.get(EXPERIMENT_ENV, DEFAULT_EXPERIMENT)
            experiment = client.get_experiment_by_name(name)
            if experiment is None:
                experiment_id = client.create_experiment(name, artifact_location=(root / "mlartifacts").as_uri())
            else:
                experiment_id = experiment.experiment_id
            return client, experiment_id

        connected = self._call("connect", connect)
        if connected is None:
            return
        self.client, experiment_id = connected
        commit = _git_commit(root)
        exp_name = os.environ.get("DVC_EXP_NAME", "")
        key = pipeline_key(params_file, commit, exp_name)
        tags = {"git.commit": commit, "dvc.exp_name": exp_name or "workspace", KEY_TAG: key}

        def find_or_create_parent() -> str:
            parents = self.client.search_runs(
                [experiment_id], filter_string=f"tags.`{KEY_TAG}` = '{key}' and tags.`{STAGE_TAG}` = 'pipeline'",
                order_by=["attributes.start_time DESC"], max_results=1)
            if parents:
                parent = parents[0].info.run_id
                taken = self.client.search_runs(
                    [experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent}' and tags.`{STAGE_TAG}` = '{self.stage}'",
                    max_results=1)
                if not taken:
                    return parent
            label = exp_name or time.strftime("repro-%Y%m%d-%H%M%S")
            run = self.client.create_run(experiment_id, run_name=label, tags={**tags, STAGE_TAG: "pipeline"})
            self.client.log_batch(run.info.run_id, params=_params(flat_params))
            self.client.set_terminated(run.info.run_id, "FINISHED")
            return run.info.run_id

        self.parent_id = self._call("parent run", find_or_create_parent)
        child_tags = {**tags, STAGE_TAG: self.stage}
        if self.parent_id:
            child_tags["mlflow.parentRunId"] = self.parent_id
        run = self._call("stage run", lambda: self.client.create_run(experiment_id, run_name=self.stage, tags=child_tags))
        if run is None:
            return
        self.run_id = run.info.run_id
        self._call("params", lambda: self.client.log_batch(self.run_id, params=_params(flat_params)))

    def log_metrics(self, metrics: dict[str, Any], step: int | None = None) -> None:
        """Log numeric leaves of a (nested) metrics dict under dotted names; non-finite values are skipped."""
        from mlflow.entities import Metric  # mlflow is imported only once the store is open (see connect)

        stamp = int(time.time() * 1000)
        rows = [Metric(key, float(value), stamp, step or 0) for key, value in _numeric(metrics)]
        for start in range(0, len(rows), 900):
            chunk = rows[start:start + 900]
            self._call(f"metrics {chunk[0].key}..", lambda chunk=chunk: self.client.log_batch(self.run_id, metrics=chunk))

    def log_curves(self, rows: Iterable[dict[str, Any]], step_key: str) -> None:
        """Log a per-iteration / per-epoch table as step metrics (one MLflow curve per column)."""
        for row in rows:
            step = int(row[step_key])
            self.log_metrics({k: v for k, v in row.items() if k != step_key}, step=step)

    def log_artifact(self, path: str | Path, folder: str | None = None) -> None:
        if Path(path).exists():
            self._call(f"artifact {path}", lambda: self.client.log_artifact(self.run_id, str(path), folder))

    def close(self, failed: bool = False) -> None:
        if self.run_id is not None:
            self._call("end run", lambda: self.client.set_terminated(self.run_id, "FAILED" if failed else "FINISHED"))
        if self.failures:
            warnings.warn(
                f"MLflow store {tracking_uri()} failed; not logged for stage '{self.stage}': "
                + "; ".join(self.failures[:10]) + (" ..." if len(self.failures) > 10 else "")
                + ". The metrics files are complete.", stacklevel=2)
            print(f"WARNING: tracking incomplete for stage '{self.stage}' ({len(self.failures)} failed calls)",
                  file=sys.stderr)

    def __enter__(self) -> "StageRun":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(failed=exc_type is not None)


class NullRun:
    """The run of a non-zero rank in a torchrun launch: rank 0 alone records to MLflow."""

    failures: list[str] = []

    def log_metrics(self, metrics: dict[str, Any], step: int | None = None) -> None:
        pass

    def log_curves(self, rows: Iterable[dict[str, Any]], step_key: str) -> None:
        pass

    def log_artifact(self, path: str | Path, folder: str | None = None) -> None:
        pass

    def close(self, failed: bool = False) -> None:
        pass


def _preflight_sqlite(uri: str) -> None:
    """Fail fast on a sqlite store that cannot work (MLflow itself retries for minutes)."""
    if not uri.startswith("sqlite:///"):
        return
    import sqlite3  # only for a sqlite store

    path = Path(uri[len("sqlite:///"):])
    if not path.exists():
        if not os.access(path.parent if path.parent.exists() else project_root(), os.W_OK):
            raise OSError(f"cannot create {path}")
        return
    if not path.is_file():
        raise OSError(f"{path} is not a file")
    connection = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=SQLITE_TIMEOUT_S)
    try:
        connection.execute("select count(*) from sqlite_master").fetchone()
    finally:
        connection.close()


def _params(flat_params: dict[str, Any]):
    from mlflow.entities import Param  # mlflow is imported only once the store is open (see connect)

    return [Param(key, str(value)[:6000]) for key, value in sorted(flat_params.items())]


def _numeric(tree: dict[str, Any], prefix: str = "") -> list[tuple[str, float]]:
    out: list[tuple[str, float]] = []
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.extend(_numeric(value, f"{name}."))
        elif isinstance(value, bool):
            out.append((name, float(value)))
        elif isinstance(value, (int, float)) and math.isfinite(value):
            out.append((name, float(value)))
    return out
