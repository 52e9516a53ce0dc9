"""The tracking writer: one stage's journal lines (see `cvfp.tracking`) turned into MLflow calls.

Run three ways:
- `python -m cvfp.tracking_writer --serve NAME`: the tracking service. It listens on the local
  socket NAME, imports MLflow and its stores once, and then forks one writer per stage that
  connects (see `tracking`): the writer says `ready <pid>`, takes the stage's environment and
  working directory from its first line, carries out the rest, and answers one JSON report when
  the stage closes its end. Nothing of the store is opened before the fork, so each stage's writer
  starts from a clean slate, as a process of its own would.
- `python -m cvfp.tracking_writer`: one stage's writer on its own (lines on stdin, the report on
  stdout), when the service cannot be used.
- in-process, by `cvfp log-runs` to replay journals.
It is the only module that imports MLflow.

Every store call degrades to a recorded failure. After the first failure the store is taken as
down and the remaining calls are recorded, not attempted: a dead server then costs one timeout,
not one per call, and a replay (`cvfp log-runs`) logs the stage whole instead of patching holes.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

from cvfp import service
from cvfp.tracking import (JOURNAL_TAG, KEY_TAG, LOGGED_TAG, PARENT_STAGE, STAGE_TAG, journal_path, now_ms, redact,
                           tracking_uri)

LOCK_WAIT_S = 120.0  # how long one store call waits out "database is locked" before giving up
SQLITE_TIMEOUT_S = 5.0
MAX_PARAMS_PER_BATCH = 100  # MLflow's log_batch limits
MAX_METRICS_PER_BATCH = 900
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"  # the UI opens a model-training experiment on its runs table
DATASET_CONTEXT_TAG = "mlflow.data.context"
USER_TAG = "mlflow.user"  # the runs table's User column


def _user() -> str:
    """Who logged: the tracking server's user when there is one, else this machine's."""
    import getpass

    return os.environ.get("MLFLOW_TRACKING_USERNAME") or getpass.getuser()


class Writer:
    """Carries out one stage's journal: open, metrics, curves, artifact, dataset, headline, close."""

    def __init__(self, uri: str | None = None, replay: bool = False):
        """`uri`: the store (default: this process's `tracking.tracking_uri()`, which the stage shares)."""
        self.uri = uri
        self.replay = replay
        self.failures: list[str] = []
        self.client = None
        self.experiment_id: str | None = None
        self.run_id: str | None = None
        self.parent_id: str | None = None
        self.down: str | None = None
        self.opened: dict[str, Any] | None = None
        self.closed = False
        self.outcome = "not opened"  # for a replay: "logged", "already there", or what went wrong
        self.last_ms = now_ms()

    # -- dispatch ----------------------------------------------------------------------------------------------

    def handle(self, message: dict[str, Any]) -> None:
        op = message.get("op")
        self.last_ms = message.get("ms", message.get("end_ms", message.get("start_ms", self.last_ms)))
        if self.outcome == "already there" or (self.opened is None and op != "open"):
            return
        handler = getattr(self, f"_{op}", None)
        if handler is None:
            self.failures.append(f"unknown journal entry {op!r}")
            return
        try:
            handler(message)
        except Exception as err:  # a bug here must not stop the stage either
            self.failures.append(f"{op} (writer error {type(err).__name__}: {err})")

    def finish(self) -> list[str]:
        """End the run if the journal ended without `close` (the stage died); return the failures."""
        if self.opened is not None and not self.closed and self.outcome != "already there":
            if not self.replay:  # live: the stage process died; a replay logs a dead stage's journal as FAILED
                self.failures.append("close (the stage ended without closing its run; marked FAILED)")
            self._close({"failed": True, "end_ms": self.last_ms})
        return [redact(failure) for failure in self.failures]

    # -- store calls -------------------------------------------------------------------------------------------

    def _call(self, what: str, fn: Callable[[], Any]) -> Any:
        """One store call, waiting out sqlite locks; a failure is recorded and marks the store down."""
        if self.down is not None:
            self.failures.append(f"{what} (not attempted: {self.down})")
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
                reason = f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"
                self.failures.append(f"{what} ({reason})")
                self.down = f"the store failed earlier at '{what}'"
                return None

    def _open(self, message: dict[str, Any]) -> None:
        self.opened = message
        connected = self._call("connect", lambda: self._connect(message))
        if connected is None:
            return
        if self.replay:
            found = self._call("search", lambda: self.client.search_runs(
                [self.experiment_id], filter_string=f"tags.`{JOURNAL_TAG}` = '{message['journal']}'"))
            if found is None:
                return
            if any(run.data.tags.get(LOGGED_TAG) == "complete" for run in found):
                self.outcome = "already there"
                return
            for run in found:  # a run the live writer could not finish: replaced whole
                self._call(f"delete incomplete run {run.info.run_id}", lambda run=run: self.client.delete_run(run.info.run_id))
        self.parent_id = self._call("parent run", lambda: self._find_or_create_parent(message))
        tags = {**message["tags"], STAGE_TAG: message["stage"], JOURNAL_TAG: message["journal"], USER_TAG: _user()}
        if self.parent_id:
            tags["mlflow.parentRunId"] = self.parent_id
        run = self._call("stage run", lambda: self.client.create_run(
            self.experiment_id, start_time=message["start_ms"], run_name=message["stage"], tags=tags))
        if run is None:
            return
        self.run_id = run.info.run_id
        self._log_params(self.run_id, message["params"])

    def _connect(self, message: dict[str, Any]) -> bool:
        from mlflow.tracking import MlflowClient  # the one MLflow import

        uri = self.uri or tracking_uri()  # the journal holds only a redacted copy
        _preflight_sqlite(uri, Path(message["root"]))
        self.client = MlflowClient(tracking_uri=uri)
        experiment = self.client.get_experiment_by_name(message["experiment"])
        if experiment is None:
            artifacts = (Path(message["root"]) / "mlartifacts").as_uri() if uri.startswith("sqlite:") else None
            self.experiment_id = self.client.create_experiment(
                message["experiment"], artifact_location=artifacts, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
        else:
            self.experiment_id = experiment.experiment_id
            if experiment.tags.get(EXPERIMENT_KIND_TAG) != EXPERIMENT_KIND:
                self.client.set_experiment_tag(self.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        return True

    def _find_or_create_parent(self, message: dict[str, Any]) -> str:
        key, stage = message["key"], message["stage"]
        parents = self.client.search_runs(
            [self.experiment_id], filter_string=f"tags.`{KEY_TAG}` = '{key}' and tags.`{STAGE_TAG}` = '{PARENT_STAGE}'",
            order_by=["attributes.start_time DESC"], max_results=1)
        if parents:
            parent = parents[0].info.run_id
            taken = self.client.search_runs(
                [self.experiment_id],
                filter_string=f"tags.`mlflow.parentRunId` = '{parent}' and tags.`{STAGE_TAG}` = '{stage}'",
                max_results=1)
            if not taken:
                self.client.update_run(parent, status="RUNNING")
                return parent
        exp_name = message["tags"]["dvc.exp_name"]
        label = exp_name if exp_name != "workspace" else time.strftime(
            "repro-%Y%m%d-%H%M%S", time.localtime(message["start_ms"] / 1000))
        run = self.client.create_run(self.experiment_id, start_time=message["start_ms"], run_name=label,
                                     tags={**message["tags"], STAGE_TAG: PARENT_STAGE, USER_TAG: _user()})
        self._log_params(run.info.run_id, message["params"])
        return run.info.run_id

    def _log_params(self, run_id: str, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        rows = [Param(name, value[:6000]) for name, value in params.items()]
        for start in range(0, len(rows), MAX_PARAMS_PER_BATCH):
            chunk = rows[start:start + MAX_PARAMS_PER_BATCH]
            self._call(f"params {chunk[0].key}..", lambda chunk=chunk: self.client.log_batch(run_id, params=chunk))

    def _log_rows(self, run_id: str | None, rows: list, step: int, ms: int, what: str) -> None:
        from mlflow.entities import Metric

        if run_id is None:
            self.failures.append(f"{what} {rows[0][0]}.. ({self.down or 'no run to log to'})")
            return
        # a row is [name, value] (at `step`) or [name, value, step] (a curve's point)
        metrics = [Metric(row[0], float(row[1]), ms, int(row[2]) if len(row) > 2 else step) for row in rows]
        for start in range(0, len(metrics), MAX_METRICS_PER_BATCH):
            chunk = metrics[start:start + MAX_METRICS_PER_BATCH]
            label = f"{what} {chunk[0].key}.." + (f" step {chunk[0].step}" if chunk[0].step else "")
            self._call(label, lambda chunk=chunk: self.client.log_batch(run_id, metrics=chunk))

    # -- journal entries ---------------------------------------------------------------------------------------

    def _metrics(self, message: dict[str, Any]) -> None:
        self._log_rows(self.run_id, message["rows"], message["step"], message["ms"], "metrics")

    def _curves(self, message: dict[str, Any]) -> None:
        self._log_rows(self.run_id, message["rows"], 0, message["ms"], "curves")

    def _headline(self, message: dict[str, Any]) -> None:
        self._log_rows(self.parent_id, message["rows"], 0, message["ms"], "headline")

    def _artifact(self, message: dict[str, Any]) -> None:
        path, folder = message["path"], message["folder"]
        if not Path(path).is_file():
            self.failures.append(f"artifact {path} (the file is gone)")
            return
        if self.run_id is None:
            self.failures.append(f"artifact {path} ({self.down or 'no run to log to'})")
            return
        self._call(f"artifact {Path(path).name}", lambda: self.client.log_artifact(self.run_id, path, folder))

    def _dataset(self, message: dict[str, Any]) -> None:
        from mlflow.entities import Dataset, DatasetInput, InputTag

        dataset = Dataset(name=message["name"], digest=message["digest"], source_type="local",
                          source=json.dumps({"uri": message["source"]}), profile=json.dumps(message["profile"]))
        inputs = [DatasetInput(dataset=dataset, tags=[InputTag(key=DATASET_CONTEXT_TAG, value=message["context"])])]
        targets = [self.run_id] + ([self.parent_id] if message["execution"] else [])
        for run_id in targets:
            if run_id is None:
                self.failures.append(f"dataset {message['name']} ({self.down or 'no run to log to'})")
                continue
            self._call(f"dataset {message['name']}", lambda run_id=run_id: self.client.log_inputs(run_id, inputs))

    def _close(self, message: dict[str, Any]) -> None:
        self.closed = True
        status = "FAILED" if message["failed"] else "FINISHED"
        if self.run_id is not None:
            complete = not self.failures
            self._call("logged tag", lambda: self.client.set_tag(self.run_id, LOGGED_TAG,
                                                                 "complete" if complete else "incomplete"))
            self._call("end run", lambda: self.client.set_terminated(self.run_id, status, end_time=message["end_ms"]))
        if self.parent_id is not None:  # the parent spans its stages: it ends when its latest stage does
            self._call("end parent run", lambda: self.client.set_terminated(
                self.parent_id, status, end_time=message["end_ms"]))
        if self.replay:
            self.outcome = "logged" if not self.failures else "incomplete"


def _preflight_sqlite(uri: str, root: Path) -> None:
    """Fail fast on a sqlite store that cannot work (MLflow itself retries for minutes)."""
    if not uri.startswith("sqlite:///"):
        return
    import sqlite3  # only for a sqlite store

    path = Path(uri[len("sqlite:///"):])
    if not path.exists():
        if not os.access(path.parent if path.parent.exists() else root, os.W_OK):
            raise OSError(f"cannot create {path}")
        return
    if not path.is_file():
        raise OSError(f"{path} is not a file")
    connection = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=SQLITE_TIMEOUT_S)
    try:
        connection.execute("select count(*) from sqlite_master").fetchone()
    finally:
        connection.close()


def replay(journal: Path, uri: str) -> tuple[str, list[str]]:
    """Log one stage journal to `uri` unless a complete run of it is already there: (outcome, failures)."""
    writer = Writer(uri, replay=True)
    feed(writer, journal.read_text(encoding="utf-8").splitlines(), str(journal))
    failures = writer.finish()
    if writer.opened is None:
        return "empty journal", failures
    return (writer.outcome if not failures or writer.outcome == "already there" else "incomplete"), failures


def journals(root: Path) -> list[Path]:
    """Every stage journal under the workspace, oldest stage first."""
    folder = journal_path(root, "", "x").parent.parent
    found = list(folder.glob("*/*.jsonl")) if folder.is_dir() else []
    return sorted(found, key=_start_ms)


def _start_ms(path: Path) -> int:
    try:
        with open(path, encoding="utf-8") as handle:
            return int(json.loads(handle.readline())["start_ms"])
    except (OSError, ValueError, KeyError):
        return 0


def feed(writer: Writer, lines, source: str) -> None:
    """Hand each JSON line to the writer; a line that is not JSON (a journal cut short) is a recorded failure."""
    for number, line in enumerate(lines, 1):
        try:
            message = json.loads(line)
        except ValueError:
            writer.failures.append(f"{source} line {number} is not JSON: {line[:80]!r}")
            continue
        writer.handle(message)


def report(writer: Writer) -> str:
    return json.dumps({"failures": writer.finish(), "run_id": writer.run_id}) + "\n"


def preload() -> None:
    """Import what a writer uses (MLflow's client, entities, the sqlite and REST stores and their artifact
    repositories), without opening any store: forked writers start with it loaded."""
    import getpass  # noqa: F401
    import sqlite3  # noqa: F401

    import mlflow.store.artifact.local_artifact_repo  # noqa: F401
    import mlflow.store.artifact.mlflow_artifacts_repo  # noqa: F401
    import mlflow.store.tracking.rest_store  # noqa: F401
    import mlflow.store.tracking.sqlalchemy_store  # noqa: F401
    from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param  # noqa: F401
    from mlflow.tracking import MlflowClient  # noqa: F401


def _session(conn: socket.socket) -> int:
    """One stage's writer, in a process the service forked: the stage's environment and folder, then its lines."""
    try:
        lines = conn.makefile("r", encoding="utf-8")
        header = lines.readline()
        if not header:
            return 0  # the stage went away before saying anything
        context = json.loads(header)
        os.environ.clear()
        os.environ.update(context["env"])
        os.chdir(context["cwd"])
        writer = Writer()
        feed(writer, lines, "the stage's socket")
        conn.sendall(report(writer).encode("utf-8"))
        return 0
    except Exception:
        traceback.print_exc()
        return 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cvfp.tracking_writer")
    parser.add_argument("--serve", metavar="NAME", help="run the tracking service on the local socket NAME")
    parser.add_argument("--idle", type=float, default=None, help="seconds without a stage before the service exits")
    args = parser.parse_args(argv)
    if args.serve:
        if args.idle is None or not args.idle > 0:
            parser.error(f"--idle must be a positive number of seconds, got {args.idle}")
        conn = service.serve(args.serve, args.idle, preload)
        if conn is None:
            return 0  # the service ends: idle, or another one holds the name
        os._exit(_session(conn))  # a forked writer: nothing of the service's to clean up
    writer = Writer()
    feed(writer, sys.stdin, "the stage's pipe")
    sys.stdout.write(report(writer))
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
