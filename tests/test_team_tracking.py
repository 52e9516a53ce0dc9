"""The team tracking setup, for real: PostgreSQL, `mlflow server` (plain and basic-auth), no mocks.

One tiny project (`helpers.TINY_PARAMS`) is reproduced once against a PostgreSQL-backed server; two queued
experiments then log to the same server at once. Copies of that project (its files, none of its tracking
state) run single stages against a basic-auth server and against a server that is killed mid-stage and
restarted, after which `cvfp log-runs` logs what the dead server missed. Every command of the README's
"Tracking server" section runs here (tests/servers.py starts the servers with the same flags)."""

import csv
import json
import math
import os
import re
import signal
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import write_params
from helpers import (POINTS_SQL, TINY_PARAMS, artifact_files, assert_experiments_logged_like_the_workspace, copy_project,
                     make_project, metric_points, run_queued, sh)
from mlflow.tracking import MlflowClient
from servers import (auth_server, fault_server, listening_addresses, mlflow_server, postgres,  # noqa: F401 (fixtures)
                     team_servers)

STAGES = ["tokenizer", "cache", "carve", "phase1", "cstar", "phase2", "evaluate", "baselines", "compare"]
EXPERIMENT = "cvfp"
CREDENTIALS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")
FAULT_ITERATIONS = 12  # phase1.max_iterations of the fault test (the tiny params' 3, and no early stop)


def run(args, cwd, env, timeout=900):
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


def succeeded(done):
    assert done.returncode == 0, f"{' '.join(done.args)}: exit {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


@contextmanager
def signed_in(user):
    """MLflow's client in this process sends `user`'s credentials (it reads these variables per request)."""
    saved = {name: os.environ.get(name) for name in CREDENTIALS}
    os.environ.update(zip(CREDENTIALS, user))
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def all_runs(client):
    experiment = client.get_experiment_by_name(EXPERIMENT)
    return [] if experiment is None else client.search_runs([experiment.experiment_id], max_results=5000)


def read_table(path):
    with open(path) as handle:
        return list(csv.DictReader(handle))


def curves_of_table(client, run, table, step_key):
    """{CSV column: the run's metric holding exactly that column as a curve, point by point (step, value)}; a
    column no metric matches is absent. By value, not by name: the MLflow names of curves are the pipeline's."""
    def close(a, b):
        return math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-12)

    histories = {key: sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
                 for key in run.data.metrics}
    found = {}
    for column in table[0]:
        if column == step_key:
            continue
        expected = [(int(row[step_key]), float(row[column])) for row in table if row[column] not in ("", "nan")]
        for key, points in histories.items():
            if [s for s, _ in points] == [s for s, _ in expected] and all(
                    close(a, b) for (_, a), (_, b) in zip(points, expected)):
                found[column] = key
                break
    return found


def unmatched(client, run, table, matched):
    """For an assertion message: each unmatched column's values beside the (step, value) points of the run's
    metrics of a similar name."""
    lines = []
    for column in sorted(set(table[0]) - set(matched) - {"iteration", "epoch"}):
        word = column.split("_")[-1]
        lines.append(f"CSV column {column}: {[row[column] for row in table]}")
        lines += [f"  metric {key}: {sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))}"
                  for key in run.data.metrics if word in key]
    return "no metric holds the curve of\n" + "\n".join(lines)


def read_metrics(root, name):
    return json.loads((root / "metrics" / name).read_text())


@pytest.fixture(scope="module")
def team_project(tmp_path_factory, mlflow_server):
    """The tiny project after one `dvc repro` logged to the plain PostgreSQL-backed server, committed."""
    root = tmp_path_factory.mktemp("team") / "project"
    root.mkdir()
    env = make_project(root, TINY_PARAMS)
    env["MLFLOW_TRACKING_URI"] = mlflow_server.url
    start = time.monotonic()
    done = succeeded(run(["dvc", "repro"], root, env))
    seconds = time.monotonic() - start
    sh(["git", "add", "-A"], root, env)
    sh(["git", "commit", "-qm", "repro"], root, env)  # dvc exp needs the baseline committed
    return SimpleNamespace(root=root, env=env, out=done.stdout, err=done.stderr, seconds=seconds)


def workspace_runs(client):
    return [r for r in all_runs(client) if r.data.tags.get("dvc.exp_name") == "workspace"]


@pytest.mark.slow
def test_repro_logs_one_execution_to_the_postgres_server(team_project, mlflow_server, postgres):
    root = team_project.root
    print(f"\n[team] dvc repro against {mlflow_server.url}: {team_project.seconds:.0f}s")
    assert "not logged" not in team_project.err and "tracking incomplete" not in team_project.err, team_project.err[-3000:]
    assert not (root / "mlflow.db").exists()
    assert not [p for p in root.rglob("mlflow.db*")], "a local sqlite store was written"
    assert listening_addresses(mlflow_server.port) == {"127.0.0.1"}

    client = MlflowClient(tracking_uri=mlflow_server.url)
    found = workspace_runs(client)
    parents = [r for r in found if r.data.tags.get("cvfp.stage") == "pipeline"]
    assert len(parents) == 1, [r.data.tags.get("cvfp.stage") for r in found]
    parent = parents[0]
    children = [r for r in found if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(r.data.tags["cvfp.stage"] for r in children) == sorted(STAGES)
    assert len(found) == len(STAGES) + 1
    assert {r.info.status for r in found} == {"FINISHED"}
    assert {r.data.tags["cvfp.pipeline_key"] for r in found} == {parent.data.tags["cvfp.pipeline_key"]}
    phase1 = next(r for r in children if r.data.tags["cvfp.stage"] == "phase1")
    assert phase1.data.params["model.layer_structure"] == "[1, 1]"
    compare = next(r for r in children if r.data.tags["cvfp.stage"] == "compare")
    for name in ("cvfp_fixed", "cvfp_free", "gru", "transformer"):
        assert compare.data.metrics[f"{name}.bpb"] == read_metrics(root, "compare.json")["models"][name]["bpb"]

    # the runs are rows of the PostgreSQL database itself
    rows = dict(postgres.query("team", "select run_uuid, status from runs"))
    assert {r.info.run_id: r.info.status for r in found}.items() <= rows.items()

    # every per-iteration curve is metrics/phase1_iterations.csv's column, point by point
    table = read_table(root / "metrics" / "phase1_iterations.csv")
    assert len(table) == read_metrics(root, "phase1.json")["iterations"]
    matched = curves_of_table(client, phase1, table, "iteration")
    assert set(matched) == set(table[0]) - {"iteration"}, unmatched(client, phase1, table, matched)


@pytest.mark.slow
def test_artifacts_are_stored_by_the_server(team_project, mlflow_server):
    """The server keeps the artifacts (--artifacts-destination), not a folder on the machine that ran the stage."""
    client = MlflowClient(tracking_uri=mlflow_server.url)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    assert experiment.artifact_location.startswith("mlflow-artifacts:"), experiment.artifact_location
    assert not (team_project.root / "mlartifacts").exists()
    on_server = {str(p.relative_to(mlflow_server.artifacts)) for p in mlflow_server.artifacts.rglob("*") if p.is_file()}
    counted = 0
    for run in workspace_runs(client):
        for path in artifact_files(client, run.info.run_id):
            assert f"{experiment.experiment_id}/{run.info.run_id}/artifacts/{path}" in on_server, (run.data.tags, path)
            counted += 1
    assert counted >= 10, counted  # every stage but cache and cstar logs at least one file; evaluate its plots
    print(f"\n[team] {counted} artifact files of the workspace execution found under --artifacts-destination")


@pytest.mark.slow
def test_queued_experiments_land_on_the_server(team_project, mlflow_server, postgres):
    """Two queued experiments at once (`dvc queue start -j 2`): every run, param, metric point and artifact lands."""
    root, env = team_project.root, team_project.env
    start = time.monotonic()
    status = run_queued(root, env, ("0.01", "0.0003"))
    assert status.count("Success") == 2, status
    assert not [p for p in root.rglob("mlflow.db*")], "a local sqlite store was written"

    client = MlflowClient(tracking_uri=mlflow_server.url)
    found = all_runs(client)
    names = sorted({r.data.tags["dvc.exp_name"] for r in found} - {"workspace"})
    assert len(names) == 2, names
    for name in names:
        stages = sorted(r.data.tags["cvfp.stage"] for r in found if r.data.tags["dvc.exp_name"] == name)
        assert stages == ["compare", "evaluate", "phase2", "pipeline"], (name, stages)  # what the change reruns
        keys = {r.data.tags["cvfp.pipeline_key"] for r in found if r.data.tags["dvc.exp_name"] == name}
        assert len(keys) == 1, (name, keys)
    lrs = {name: {r.data.params.get("phase2.lr") for r in found if r.data.tags["dvc.exp_name"] == name}
           for name in names}
    assert sorted(map(tuple, lrs.values())) == [("0.0003",), ("0.01",)], lrs

    points = metric_points(postgres.query("team", POINTS_SQL))  # the server's backend database, read directly
    logged_runs = assert_experiments_logged_like_the_workspace(client, found, names, stages, points)
    totals = {"runs": len(logged_runs), "params": sum(len(logged["params"]) for logged in logged_runs),
              "metric points": sum(sum(logged["metrics"].values()) for logged in logged_runs),
              "artifacts": sum(len(logged["artifacts"]) for logged in logged_runs)}
    print(f"\n[team] 2 queued experiments on {mlflow_server.url} in {time.monotonic() - start:.0f}s: "
          + ", ".join(f"{value} {name}" for name, value in totals.items())
          + " landed, each equal to the workspace run of the same stage")


# -- access control: the basic-auth server ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def auth_project(team_project, tmp_path_factory):
    """A copy of the reproduced project whose `carve` stage reruns alone against the basic-auth server."""
    root = tmp_path_factory.mktemp("auth") / "project"
    copy_project(team_project.root, root)
    env = {k: v for k, v in team_project.env.items() if not k.startswith("MLFLOW_")}
    env["DVC_ROOT"] = str(root)
    return root, env


def run_carve(root, env, server, user=None):
    """`python pipeline/carve.py` in `root` against `server`, as `user` (username, password) or anonymously;
    metrics/data.json is removed first, so that its presence afterwards shows this run wrote it."""
    (root / "metrics" / "data.json").unlink(missing_ok=True)
    env = {**env, "MLFLOW_TRACKING_URI": server.url, **(dict(zip(CREDENTIALS, user)) if user else {})}
    start = time.monotonic()
    done = run(["python", "pipeline/carve.py"], root, env, timeout=600)
    return done, time.monotonic() - start


def files_holding(root: Path, secret: str) -> list[str]:
    """Every file under `root` (git objects aside) whose bytes hold `secret`."""
    needle = secret.encode()
    return [str(p.relative_to(root)) for p in root.rglob("*")
            if p.is_file() and ".git" not in p.relative_to(root).parts[:1] and needle in p.read_bytes()]


@pytest.mark.slow
def test_the_auth_server_refuses_requests_without_valid_credentials(auth_server):
    alice = auth_server.create_user("alice")
    search = "/api/2.0/mlflow/experiments/search?max_results=10"
    assert auth_server.request("GET", search)[0] == 401
    assert auth_server.request("GET", search, user=(alice[0], alice[1] + "x"))[0] == 401
    assert auth_server.request("GET", search, user=("nobody", alice[1]))[0] == 401
    assert auth_server.request("GET", search, user=alice)[0] == 200
    status, _ = auth_server.request("POST", "/api/2.0/mlflow/users/create",
                                    {"username": "mallory", "password": "a-long-enough-password"}, user=alice)
    assert status == 403  # a normal user cannot create users


@pytest.mark.slow
def test_a_stage_with_credentials_logs_to_the_auth_server(auth_project, auth_server):
    root, env = auth_project
    admin = MlflowClient(tracking_uri=auth_server.url)
    bob = auth_server.create_user("bob")
    done, seconds = run_carve(root, env, auth_server, bob)
    print(f"\n[team] carve as bob on the basic-auth server: {seconds:.1f}s")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "not logged" not in done.stderr and "tracking incomplete" not in done.stderr, done.stderr[-3000:]
    assert bob[1] not in done.stdout + done.stderr
    assert files_holding(root, bob[1]) == []
    with signed_in(auth_server.admin):
        found = all_runs(admin)
        assert sorted(r.data.tags.get("cvfp.stage") for r in found) == ["carve", "pipeline"]
        carve = next(r for r in found if r.data.tags["cvfp.stage"] == "carve")
        assert carve.info.status == "FINISHED"
        data = read_metrics(root, "data.json")
        assert carve.data.metrics["train_tokens"] == data["train_tokens"]
        assert carve.data.params["carve.val_fraction"] == str(TINY_PARAMS["carve.val_fraction"])
        assert "data.json" in " ".join(artifact_files(admin, carve.info.run_id))
        logged = json.dumps({"params": carve.data.params, "tags": carve.data.tags})
        assert bob[1] not in logged and auth_server.admin[1] not in logged
        print(f"[team] bob's carve run: user_id {carve.info.user_id!r}, tag mlflow.user "
              f"{carve.data.tags.get('mlflow.user')!r}")
        experiment_id = carve.info.experiment_id
    # another member logs into the experiment bob's stage created (default_permission = EDIT); with READ: 403
    carol = auth_server.create_user("carol")
    status, answer = auth_server.request("POST", "/api/2.0/mlflow/runs/create",
                                         {"experiment_id": experiment_id, "run_name": "carol"}, user=carol)
    assert status == 200, answer
    auth_server.request("POST", "/api/2.0/mlflow/runs/delete", {"run_id": answer["run"]["info"]["run_id"]},
                        user=carol)


@pytest.mark.slow
@pytest.mark.parametrize("who", ["anonymous", "wrong password"])
def test_a_refused_stage_still_writes_its_files_and_says_what_was_not_logged(auth_project, auth_server, who):
    root, env = auth_project
    admin = MlflowClient(tracking_uri=auth_server.url)
    with signed_in(auth_server.admin):
        before = len(all_runs(admin))
    secret = None
    if who == "wrong password":
        name, password = auth_server.create_user(f"dave{os.getpid()}")
        secret = password[::-1] + "-wrong"
        user = (name, secret)
    else:
        user = None
    done, seconds = run_carve(root, env, auth_server, user)
    print(f"\n[team] carve refused ({who}): {seconds:.1f}s")
    assert done.returncode == 0, done.stderr[-3000:]
    data = read_metrics(root, "data.json")  # written by this run: run_carve removed it first
    assert data["train_tokens"] > 0 and {"val_tokens", "test_tokens"} <= data.keys()
    for split in ("train", "val", "test"):
        assert (root / "data" / "splits" / f"{split}.safetensors").is_file()
    warning = [line for line in done.stderr.splitlines() if "not logged for stage 'carve'" in line]
    assert len(warning) == 1, done.stderr[-3000:]
    assert f"MLflow store {auth_server.url} failed" in warning[0], warning[0]
    assert "metrics" in warning[0] and "data.json" in warning[0], warning[0]  # what was not logged
    assert "401" in warning[0] or "authenticat" in warning[0].lower(), warning[0]  # and why
    assert re.search(r"WARNING: tracking incomplete for stage 'carve' \(\d+ failed calls\)", done.stderr), done.stderr
    print(f"[team] its warning: {warning[0][warning[0].index('MLflow store'):][:400]}")
    with signed_in(auth_server.admin):
        assert len(all_runs(admin)) == before  # nothing was written by a refused stage
    if secret is not None:
        assert secret not in done.stdout + done.stderr
        assert files_holding(root, secret) == []


# -- faults: the server dies in the middle of a stage ---------------------------------------------------------

def stage_lines(out: str, stage: str) -> list[str]:
    """The lines of `cvfp log-runs` about `stage` (not MLflow's own "View run <name> at: <url>" lines)."""
    return [line for line in out.splitlines() if re.search(rf"\b{stage}\b", line) and "View run" not in line]


def leaves(tree, prefix=""):
    """The finite numbers of a nested metrics dict under dotted names (bools as 0/1)."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(leaves(value, f"{prefix}{key}."))
        elif isinstance(value, (int, float)) and math.isfinite(value):
            out[f"{prefix}{key}"] = float(value)
    return out


def finished_run(client, stage, key):
    return [r for r in all_runs(client) if r.data.tags.get("cvfp.stage") == stage
            and r.data.tags.get("cvfp.pipeline_key") == key and r.info.status == "FINISHED"]


@pytest.fixture(scope="module")
def killed_mid_stage(team_project, fault_server, tmp_path_factory):
    """`python pipeline/phase1.py` (more iterations, in a copy of the project) loses its server mid-stage: the
    moment phase1's run exists on the server, the stage is frozen (SIGSTOP), the server SIGKILLed, the stage
    let go on (SIGCONT), so the kill lands inside the stage however fast the machine is. The server stays down."""
    root = tmp_path_factory.mktemp("faults") / "project"
    copy_project(team_project.root, root)
    write_params(root / "params.yaml", {**TINY_PARAMS, "phase1.max_iterations": FAULT_ITERATIONS,
                                        "phase1.min_converged_ratio": 1.0})  # no early stop: every iteration runs
    # started cold: SIGSTOP freezes the process it is sent to, and a warm stage's work runs in a child of the warm
    # server (cvfp.warm), which SIGSTOP (it cannot be caught, so not forwarded) would not reach
    env = {**team_project.env, "MLFLOW_TRACKING_URI": fault_server.url, "DVC_ROOT": str(root), "CVFP_WARM_START": "0"}
    client = MlflowClient(tracking_uri=fault_server.url)
    log_path = root.parent / "phase1.log"
    start = time.monotonic()
    with open(log_path, "w") as log:
        stage = subprocess.Popen(["python", "pipeline/phase1.py"], cwd=root, env=env, stdout=log,
                                 stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        live = []
        while not live:
            assert stage.poll() is None, f"phase1 ended before its run appeared:\n{log_path.read_text()[-3000:]}"
            assert time.monotonic() < deadline, log_path.read_text()[-3000:]
            live = client.search_runs([e.experiment_id for e in client.search_experiments()],
                                      filter_string="tags.`cvfp.stage` = 'phase1'")
            time.sleep(0.2)
        stage.send_signal(signal.SIGSTOP)
        try:
            fault_server.kill()
        finally:
            stage.send_signal(signal.SIGCONT)
        killed_at = time.monotonic() - start
        code = stage.wait(timeout=600)
    finally:
        if stage.poll() is None:
            stage.kill()
    print(f"\n[team] server killed {killed_at:.1f}s into phase1 (its run {live[0].info.run_id[:8]} live); "
          f"stage done after {time.monotonic() - start:.0f}s")
    return SimpleNamespace(root=root, env=env, client=client, code=code, out=log_path.read_text(), live=live[0])


@pytest.mark.slow
def test_a_stage_whose_server_dies_completes_and_says_what_was_not_logged(killed_mid_stage, fault_server):
    root, out = killed_mid_stage.root, killed_mid_stage.out
    assert killed_mid_stage.code == 0, out[-4000:]
    phase1 = read_metrics(root, "phase1.json")  # the stage's files are complete
    assert phase1["iterations"] == FAULT_ITERATIONS
    assert {"train", "val"} <= phase1.keys() and "convergence_rate" in phase1["train"]
    assert len(read_table(root / "metrics" / "phase1_iterations.csv")) == FAULT_ITERATIONS
    assert (root / "models" / "phase1.pt").is_file()
    warning = [line for line in out.splitlines() if "not logged for stage 'phase1'" in line]
    assert len(warning) == 1, out[-4000:]
    print(f"\n[team] its warning: {warning[0][warning[0].index('MLflow store'):][:1500]}")
    assert f"MLflow store {fault_server.url} failed" in warning[0], warning[0]
    assert re.search(r"WARNING: tracking incomplete for stage 'phase1' \(\d+ failed calls\)", out), out[-3000:]
    # what was not logged: the curves and final values, and the artifact
    assert "metrics" in warning[0] and "phase1_iterations.csv" in warning[0], warning[0]


@pytest.mark.slow
def test_log_runs_logs_what_a_dead_server_missed_once(killed_mid_stage, fault_server, mlflow_server):
    """A server restarted on the same backend store gets the stage from `cvfp log-runs`; a second call adds nothing."""
    root, env, client, live = killed_mid_stage.root, killed_mid_stage.env, killed_mid_stage.client, killed_mid_stage.live
    assert killed_mid_stage.code == 0, killed_mid_stage.out[-4000:]
    phase1 = read_metrics(root, "phase1.json")
    table = read_table(root / "metrics" / "phase1_iterations.csv")
    # a server on the same backend store comes back; `cvfp log-runs` logs what it missed, once
    restart = time.monotonic()
    fault_server.start()
    print(f"[team] server restarted on the same backend in {time.monotonic() - restart:.0f}s")
    key = live.data.tags["cvfp.pipeline_key"]
    assert [r.info.run_id for r in all_runs(client) if r.data.tags.get("cvfp.stage") == "phase1"] == [live.info.run_id]
    assert not finished_run(client, "phase1", key)  # the live run never ended
    first = succeeded(run(["cvfp", "log-runs"], root, env, timeout=600))
    print(first.stdout)
    lines = {name: stage_lines(first.stdout, name) for name in STAGES}
    assert len(lines["phase1"]) == 1 and "logged" in lines["phase1"][0] and "already there" not in lines["phase1"][0], first.stdout
    assert all(len(found) <= 1 and ("logged" in found[0] or "already there" in found[0])
               for found in lines.values() if found), first.stdout

    relogged = finished_run(client, "phase1", key)
    assert len(relogged) == 1, [(r.info.status, r.data.tags) for r in all_runs(client)]
    relogged = relogged[0]
    parent = client.get_run(relogged.data.tags["mlflow.parentRunId"])
    assert parent.data.tags["cvfp.stage"] == "pipeline" and parent.data.tags["cvfp.pipeline_key"] == key
    # the curves, point by point as in metrics/phase1_iterations.csv
    matched = curves_of_table(client, relogged, table, "iteration")  # asserted last: the rest is checked first
    assert "phase1_iterations.csv" in " ".join(artifact_files(client, relogged.info.run_id))
    workspace_phase1 = next(r for r in workspace_runs(MlflowClient(tracking_uri=mlflow_server.url))
                            if r.data.tags.get("cvfp.stage") == "phase1")
    assert sorted(relogged.data.params) == sorted(workspace_phase1.data.params)  # every param, as a live stage logs
    # every number of metrics/phase1.json is in the run: a metric of its name, or a curve's last point
    last_points = [float(table[-1][column]) for column in matched]
    missing = {name: value for name, value in leaves(phase1).items()
               if not math.isclose(relogged.data.metrics.get(name, math.inf), value, rel_tol=1e-6, abs_tol=1e-12)
               and not any(math.isclose(last, value, rel_tol=1e-6, abs_tol=1e-12) for last in last_points)}
    assert not missing, missing
    assert relogged.data.params["phase1.max_iterations"] == str(FAULT_ITERATIONS)

    count = len(all_runs(client))
    second = succeeded(run(["cvfp", "log-runs"], root, env, timeout=600))
    print(second.stdout)
    again = {name: stage_lines(second.stdout, name) for name in STAGES}
    assert again["phase1"] and all(len(found) == 1 and "already there" in found[0]
                                   for found in again.values() if found), second.stdout
    assert len(all_runs(client)) == count, "a second `cvfp log-runs` created runs"
    print(f"[team] log-runs: {count} runs on the restarted server, unchanged by a second log-runs")
    assert set(matched) == set(table[0]) - {"iteration"}, unmatched(client, relogged, table, matched)
