"""MLflow tracking shared by every stage, kept off the stage's critical path.

Store: `MLFLOW_TRACKING_URI` if set (any MLflow server; credentials from MLflow's own
`MLFLOW_TRACKING_USERNAME` / `MLFLOW_TRACKING_PASSWORD`, never from params.yaml), else a sqlite
database `mlflow.db` in the workspace root (artifacts in `mlartifacts/`), also for experiments
DVC runs in temporary copies.

How a stage logs: this module imports neither MLflow nor torch. Every call (params, metrics,
curves, artifacts, dataset inputs, the execution's headline results) is one JSON line, appended
to the stage's *journal* (`.cvfp/journal/<execution>/<stage>.jsonl` in the workspace root) and
sent, from a thread, to a *writer*: a process of its own that turns lines into MLflow calls.
`close()` waits for the writer's report, so a stage still says, before it exits, what was not
logged.

Where the writer comes from: importing MLflow and its store takes ~3 s of CPU, more than many
stages' work. So on Linux a *tracking service* (`python -m cvfp.tracking_writer --serve`) does it
once: the first stage starts it (detached, in its own session), it imports MLflow and then forks
one fresh writer per stage that connects to it (a local socket, same user only), so each stage
still gets a process of its own, with the stage's environment and working directory, and no
store state shared between stages. The service exits after `CVFP_TRACKING_SERVICE_IDLE_S`
seconds (default `SERVICE_IDLE_S`) without a stage; one service exists per Python, cvfp source
and user (the socket's name hashes them, so an edited writer is never served stale). Where the
service cannot be reached (`CVFP_TRACKING_SERVICE=0`, not Linux, it did not come up within
`SERVICE_START_S`), the stage starts a writer process of its own, as it always could.

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
import queue
import re
import socket
import subprocess
import sys
import threading
import time
import uuid
import warnings
from pathlib import Path
from typing import Any, Iterable

from cvfp import service
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
SERVICE_ENV = "CVFP_TRACKING_SERVICE"  # "0": every stage starts a writer process of its own
SERVICE_IDLE_ENV = "CVFP_TRACKING_SERVICE_IDLE_S"
SERVICE_IDLE_S = 600.0  # the service exits after this long without a stage (a researcher's edit-and-rerun gap)
SERVICE_START_S = 60.0  # how long a stage waits for the service to listen before starting its own writer
SERVICE_SOURCES = ("__init__.py", "errors.py", "runtime.py", "service.py", "tracking.py", "tracking_writer.py")


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
        self._writer = _ThreadWriter() if background else _InlineWriter()
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
        """Log a per-iteration / per-epoch table as step metrics (one MLflow curve per column), in one call: the
        writer sends it in as few store requests as MLflow's batch limit allows, not one per row."""
        points = [[name, value, int(row[step_key])] for row in rows
                  for name, value in numeric_leaves({k: v for k, v in row.items() if k != step_key})]
        if points:
            self._send({"op": "curves", "rows": points, "ms": now_ms()})

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
        self.pid = process.pid if process is not None else None
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


class _ThreadWriter:
    """Lines go to a queue; a thread hands them to the service's forked writer (or a writer process of
    the stage's own), so neither starting the writer nor a slow store holds the stage up."""

    def __init__(self):
        self.lines: queue.SimpleQueue = queue.SimpleQueue()
        self.failures: list[str] = []
        self.pid: int | None = None  # the writer's process, once connected
        self.connected = threading.Event()
        self.thread = threading.Thread(target=self._pump, name="cvfp-tracking", daemon=True)
        self.thread.start()

    def send(self, line: str) -> None:
        self.lines.put(line)

    def finish(self) -> list[str]:
        self.lines.put(None)
        self.thread.join()
        return self.failures

    def _pump(self) -> None:
        try:
            sink = _connect_service() or _start_writer()
            self.pid = sink.pid
            self.connected.set()
            while (line := self.lines.get()) is not None:
                sink.send(line)
            self.failures.extend(sink.finish())
        except Exception as err:  # nothing in tracking may stop a stage
            self.failures.append(f"everything after the writer thread failed ({type(err).__name__}: {err})")
        finally:
            self.connected.set()


class _SocketWriter:
    """A writer the tracking service forked for this stage, at the other end of a connected socket."""

    def __init__(self, sock: socket.socket, reader, pid: int):
        self.sock, self.reader, self.pid = sock, reader, pid
        self.lost: list[str] = []
        self.sent = 0

    def send(self, line: str) -> None:
        if self.lost:
            return
        try:
            self.sock.sendall((line + "\n").encode("utf-8"))
            self.sent += 1
        except OSError as err:
            self.lost.append(f"everything after call {self.sent}: the writer (pid {self.pid}) stopped reading "
                             f"({type(err).__name__})")

    def finish(self) -> list[str]:
        try:
            if not self.lost:
                self.sock.shutdown(socket.SHUT_WR)
            answer = self.reader.readline()
        except OSError:
            answer = b""
        finally:
            self.sock.close()
        try:
            return self.lost + list(json.loads(answer)["failures"])
        except (ValueError, KeyError, TypeError):
            return self.lost + [f"every call after the writer (pid {self.pid}) ended before reporting "
                                f"(of {self.sent} calls sent)"]


def service_name() -> str:
    """The tracking service's socket name: it covers the Python, the cvfp code the service runs, and the user."""
    here = Path(__file__).resolve().parent
    return service.socket_name("tracking", [here / name for name in SERVICE_SOURCES], ("PYTHONPATH",))


def _connect_service() -> _SocketWriter | None:
    """A writer forked for this stage by the tracking service (started here if none is up), or None."""
    if not service.enabled(SERVICE_ENV):
        return None
    name = service_name()
    idle = service.idle_seconds(SERVICE_IDLE_ENV, SERVICE_IDLE_S)
    connection = service.connect(name, [sys.executable, "-m", WRITER_MODULE, "--serve", name, "--idle", str(idle)],
                                 service.child_env(), SERVICE_START_S)
    if connection is None:
        return None
    connection.sock.sendall((json.dumps({"env": dict(os.environ), "cwd": os.getcwd()}) + "\n").encode("utf-8"))
    return _SocketWriter(connection.sock, connection.reader, connection.pid)


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
    """A writer process of this stage's own; it imports cvfp from where this process did (an editable install,
    or a test's copy of src/)."""
    try:
        process = subprocess.Popen([sys.executable, "-m", WRITER_MODULE], stdin=subprocess.PIPE,
                                   stdout=subprocess.PIPE, text=True, encoding="utf-8", env=service.child_env())
    except OSError as err:
        return _ProcessWriter(None, f"everything: the writer process did not start ({err})")
    return _ProcessWriter(process)


BATCHED_KINDS = ("metrics", "curves", "headline", "params")  # one failure per batch: summarised as one item per kind


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
