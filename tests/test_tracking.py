import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import socket_names_around_an_edit
from mlflow.tracking import MlflowClient

from cvfp import service, tracking
from cvfp.params import Params
from cvfp.runtime import project_root


@pytest.fixture(scope="module")
def empty_store(tmp_path_factory):
    """An initialised sqlite store, copied into each workspace (creating one runs MLflow's migrations)."""
    folder = tmp_path_factory.mktemp("store")
    MlflowClient(tracking_uri=f"sqlite:///{folder / 'mlflow.db'}").search_experiments()
    return folder / "mlflow.db"


@pytest.fixture
def workspace(tmp_path, monkeypatch, empty_store):
    """A project folder with its own sqlite store (the default location, no env override)."""
    shutil.copy(empty_store, tmp_path / "mlflow.db")
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    (tmp_path / "params.yaml").write_text("seed: 1\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    return tmp_path


def runs(root):
    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(tracking.DEFAULT_EXPERIMENT)
    return client, client.search_runs([experiment.experiment_id])


def test_stages_of_one_execution_share_a_parent(workspace):
    flat = Params().flat()
    for stage in ("tokenizer", "cache"):
        with tracking.StageRun(stage, flat, background=False) as run:
            run.log_metrics({"train": {"tokens": 10, "rate": 0.5}})
            run.log_curves([{"iteration": 0, "loss": 1.0}, {"iteration": 1, "loss": 0.5}], "iteration")
        assert not run.failures
    client, found = runs(workspace)
    parents = [r for r in found if r.data.tags[tracking.STAGE_TAG] == "pipeline"]
    children = [r for r in found if r.data.tags[tracking.STAGE_TAG] != "pipeline"]
    assert len(parents) == 1 and len(children) == 2
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parents[0].info.run_id}
    child = children[0]
    assert child.data.params["phase1.dist_reg_weight"] == str(Params().phase1.dist_reg_weight)
    assert child.data.metrics["train.tokens"] == 10
    history = client.get_metric_history(child.info.run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(0, 1.0), (1, 0.5)]


def test_rerunning_a_stage_starts_a_new_execution(workspace):
    flat = Params().flat()
    for _ in range(2):
        tracking.StageRun("carve", flat, background=False).close()
    _, found = runs(workspace)
    assert sum(r.data.tags[tracking.STAGE_TAG] == "pipeline" for r in found) == 2


def test_experiment_name_and_params_change_the_group(workspace, monkeypatch):
    flat = Params().flat()
    tracking.StageRun("carve", flat, background=False).close()
    monkeypatch.setenv("DVC_EXP_NAME", "exp-a")
    tracking.StageRun("phase1", flat, background=False).close()
    _, found = runs(workspace)
    parents = [r for r in found if r.data.tags[tracking.STAGE_TAG] == "pipeline"]
    assert sorted(p.data.tags["dvc.exp_name"] for p in parents) == ["exp-a", "workspace"]


def test_experiment_temp_copies_log_to_the_workspace(tmp_path, monkeypatch):
    workspace = tmp_path / "ws"
    temp_copy = workspace / ".dvc" / "tmp" / "exps" / "tmpabc123"
    temp_copy.mkdir(parents=True)
    (temp_copy / "dvc.yaml").write_text("stages: {}\n")
    monkeypatch.delenv("DVC_ROOT", raising=False)
    monkeypatch.chdir(temp_copy)
    assert project_root() == workspace
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking.tracking_uri() == f"sqlite:///{workspace / 'mlflow.db'}"


def test_broken_store_warns_and_the_stage_goes_on(workspace, monkeypatch):
    bad = workspace / "not-a-db"
    bad.mkdir()  # sqlite cannot open a directory
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{bad}")
    run = tracking.StageRun("carve", Params().flat())
    run.log_metrics({"x": 1.0})
    with pytest.warns(UserWarning, match="not logged for stage 'carve'"):
        run.close()
    assert run.failures


def test_the_parent_spans_its_stages_and_holds_the_headline(workspace):
    """Parent start = first stage's start, parent end = last stage's end; headline results land on the parent."""
    flat = Params().flat()
    with tracking.StageRun("tokenizer", flat, background=False):
        time.sleep(0.05)
    with tracking.StageRun("compare", flat, background=False) as run:
        time.sleep(0.05)
        run.log_headline({"test_bpb": {"gru": 2.5, "cvfp_fixed": 2.75}})
    client, found = runs(workspace)
    parent = next(r for r in found if r.data.tags[tracking.STAGE_TAG] == "pipeline")
    children = [r for r in found if r.data.tags[tracking.STAGE_TAG] != "pipeline"]
    assert parent.info.start_time == min(c.info.start_time for c in children)
    assert parent.info.end_time == max(c.info.end_time for c in children)
    assert parent.info.end_time - parent.info.start_time >= 100  # two stages of >= 50 ms each
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics == {"test_bpb.gru": 2.5, "test_bpb.cvfp_fixed": 2.75}
    assert all("test_bpb.gru" not in c.data.metrics for c in children)
    assert {c.data.tags[tracking.LOGGED_TAG] for c in children} == {"complete"}


def test_the_experiment_is_a_model_training_experiment(workspace):
    """The MLflow UI opens an experiment by its kind: ours must open on the runs, not the GenAI overview."""
    from cvfp.tracking_writer import EXPERIMENT_KIND, EXPERIMENT_KIND_TAG

    tracking.StageRun("carve", Params().flat(), background=False).close()
    client = MlflowClient(tracking_uri=f"sqlite:///{workspace / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(tracking.DEFAULT_EXPERIMENT)
    assert experiment.tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND == "custom_model_development"
    client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, "genai_development")
    tracking.StageRun("cache", Params().flat(), background=False).close()  # an older store is corrected
    assert client.get_experiment(experiment.experiment_id).tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND


def test_dataset_inputs_name_the_split_with_digest_and_counts(workspace):
    data = workspace / "train.safetensors"
    data.write_bytes(b"tokens" * 100)
    with tracking.StageRun("carve", Params().flat(), background=False) as run:
        run.log_dataset("train", data, "training", {"tokens": 600, "documents": 3}, execution=True)
    with tracking.StageRun("phase1", Params().flat(), background=False) as run:
        run.log_dataset("train", data, "training", {"tokens": 600, "documents": 3})
    client, found = runs(workspace)
    by_stage = {r.data.tags[tracking.STAGE_TAG]: client.get_run(r.info.run_id) for r in found}
    for stage in ("carve", "phase1", "pipeline"):
        inputs = by_stage[stage].inputs.dataset_inputs
        assert len(inputs) == 1, stage
        dataset = inputs[0].dataset
        assert dataset.name == "train" and dataset.digest == tracking.file_digest(data)
        assert json.loads(dataset.profile) == {"tokens": 600, "documents": 3}
        assert json.loads(dataset.source)["uri"].endswith("train.safetensors")
        assert {t.key: t.value for t in inputs[0].tags}["mlflow.data.context"] == "training"


def test_a_journal_replays_once_into_a_store_that_was_down(workspace, monkeypatch):
    """The store fails during a stage; `cvfp log-runs` logs the stage from its journal, and only once."""
    bad = workspace / "not-a-db"
    bad.mkdir()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{bad}")
    (workspace / "curve.csv").write_text("iteration,loss\n0,1.0\n")
    with tracking.StageRun("phase1", Params().flat(), background=False) as run:
        run.log_curves([{"iteration": 0, "loss": 1.0}, {"iteration": 1, "loss": 0.5}], "iteration")
        run.log_metrics({"train": {"effective_rank": 3.5}})
        run.log_artifact(workspace / "curve.csv")
    assert any("connect" in failure for failure in run.failures)
    monkeypatch.delenv("MLFLOW_TRACKING_URI")

    def log_runs():
        return subprocess.run([sys.executable, "-m", "cvfp.cli", "log-runs"], cwd=workspace, capture_output=True,
                              text=True, timeout=300, env={**os.environ, "DVC_ROOT": str(workspace)})

    first = log_runs()
    assert first.returncode == 0, first.stderr
    assert "workspace/phase1: logged" in first.stdout
    client, found = runs(workspace)
    assert sorted(r.data.tags[tracking.STAGE_TAG] for r in found) == ["phase1", "pipeline"]
    child = next(r for r in found if r.data.tags[tracking.STAGE_TAG] == "phase1")
    assert [(m.step, m.value) for m in client.get_metric_history(child.info.run_id, "loss")] == [(0, 1.0), (1, 0.5)]
    assert child.data.metrics["train.effective_rank"] == 3.5
    assert child.data.params["phase1.lr"] == str(Params().phase1.lr)
    assert [a.path for a in client.list_artifacts(child.info.run_id)] == ["curve.csv"]
    assert child.info.status == "FINISHED"

    second = log_runs()
    assert second.returncode == 0 and "workspace/phase1: already there" in second.stdout, second.stdout
    assert len(runs(workspace)[1]) == 2


def test_an_incomplete_run_is_replaced_whole_by_the_replay(workspace):
    """A run the live writer could not finish (server gone mid-stage) is deleted and logged again in full."""
    from cvfp.tracking_writer import journals, replay

    with tracking.StageRun("phase2", Params().flat(), background=False) as run:
        run.log_metrics({"val_loss": 2.0})
    client, found = runs(workspace)
    child = next(r for r in found if r.data.tags[tracking.STAGE_TAG] == "phase2")
    client.set_tag(child.info.run_id, tracking.LOGGED_TAG, "incomplete")
    outcome, failures = replay(journals(workspace)[0], tracking.tracking_uri())
    assert (outcome, failures) == ("logged", [])
    _, found = runs(workspace)
    children = [r for r in found if r.data.tags[tracking.STAGE_TAG] == "phase2"]
    assert len(children) == 1 and children[0].info.run_id != child.info.run_id
    assert children[0].data.metrics == {"val_loss": 2.0}
    assert client.get_run(child.info.run_id).info.lifecycle_stage == "deleted"


def test_a_replay_does_not_log_the_headline_a_second_time(workspace):
    """compare's run was left incomplete after its headline reached the parent: the replay adds no second point
    (it logs the journal's own timestamps, so the store sees the same point again, not a new one)."""
    from cvfp.tracking_writer import journals, replay

    with tracking.StageRun("compare", Params().flat(), background=False) as run:
        run.log_headline({"test_bpb": {"gru": 2.5}})
    client, found = runs(workspace)
    child = next(r for r in found if r.data.tags[tracking.STAGE_TAG] == "compare")
    parent = next(r for r in found if r.data.tags[tracking.STAGE_TAG] == "pipeline")
    client.set_tag(child.info.run_id, tracking.LOGGED_TAG, "incomplete")
    assert replay(journals(workspace)[0], tracking.tracking_uri()) == ("logged", [])
    assert [m.value for m in client.get_metric_history(parent.info.run_id, "test_bpb.gru")] == [2.5]


def test_credentials_never_reach_the_warning(workspace, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://alice:s3cret-pw@127.0.0.1:9")  # nothing listens on port 9
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "other-secret")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    run = tracking.StageRun("carve", Params().flat(), background=False)
    run.log_metrics({"x": 1.0})
    with pytest.warns(UserWarning) as caught:
        run.close()
    message = str(caught[0].message)
    assert "not logged for stage 'carve'" in message and "127.0.0.1:9" in message
    assert "s3cret-pw" not in message and "other-secret" not in message
    journal = tracking.journal_path(workspace, "", "carve").read_text()
    assert "s3cret-pw" not in journal and "other-secret" not in journal
    assert tracking.redact("see http://u:pw@host:1/x and other-secret") == "see http://***@host:1/x and ***"


@pytest.mark.parametrize("service", ["1", "0"], ids=["forked-by-the-service", "own-process"])
def test_a_dead_writer_process_is_reported_not_hidden(workspace, monkeypatch, service):
    """If the writer dies mid-stage (one the service forked, or the stage's own), the stage still closes and
    says what may be missing."""
    monkeypatch.setenv(tracking.SERVICE_ENV, service)
    run = tracking.StageRun("evaluate", Params().flat())
    assert run._writer.connected.wait(tracking.SERVICE_START_S) and run._writer.pid
    os.kill(run._writer.pid, signal.SIGKILL)
    time.sleep(0.2)
    run.log_metrics({"test": {"bpb": 2.5}})
    with pytest.warns(UserWarning, match="not logged for stage 'evaluate'"):
        run.close()
    assert any("writer" in failure and "pid" in failure for failure in run.failures), run.failures


# -- the tracking service ------------------------------------------------------------------------------------------


def _parent_pid(pid):
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def _served_run(stage):
    """A background StageRun, its writer's pid and the pid of the process that forked it."""
    run = tracking.StageRun(stage, Params().flat())
    assert run._writer.connected.wait(tracking.SERVICE_START_S)
    return run, run._writer.pid, _parent_pid(run._writer.pid)


def test_one_service_forks_a_writer_per_stage_with_the_stage_environment(workspace, tmp_path_factory, monkeypatch):
    """Two stages, two stores (chosen by the stages' own MLFLOW_TRACKING_URI): one service, two writer processes,
    each run in its own stage's store."""
    first, writer_a, service_a = _served_run("tokenizer")
    first.log_metrics({"x": 1.0})
    first.close()
    other = tmp_path_factory.mktemp("other") / "mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{other}")
    second, writer_b, service_b = _served_run("cache")
    second.log_metrics({"y": 2.0})
    second.close()
    assert not first.failures and not second.failures
    assert service_a == service_b and writer_a != writer_b
    assert "--serve" in Path(f"/proc/{service_a}/cmdline").read_text()
    _, here = runs(workspace)
    assert [r.data.metrics for r in here if r.data.tags[tracking.STAGE_TAG] == "tokenizer"] == [{"x": 1.0}]
    there = MlflowClient(tracking_uri=f"sqlite:///{other}")
    found = there.search_runs([there.get_experiment_by_name(tracking.DEFAULT_EXPERIMENT).experiment_id])
    assert sorted(r.data.tags[tracking.STAGE_TAG] for r in found) == ["cache", "pipeline"]


def test_without_the_service_a_stage_starts_its_own_writer(workspace, monkeypatch):
    monkeypatch.setenv(tracking.SERVICE_ENV, "0")
    run, writer, parent = _served_run("carve")
    command = Path(f"/proc/{writer}/cmdline").read_text().split("\0")
    run.close()
    assert parent == os.getpid() and "cvfp.tracking_writer" in command and "--serve" not in command
    assert not run.failures
    assert [r.data.tags[tracking.STAGE_TAG] for r in runs(workspace)[1]].count("carve") == 1


def test_a_stage_killed_mid_run_leaves_a_failed_run(workspace):
    """The service's writer sees the stage's end of the socket close without `close`: the run ends FAILED."""
    script = ("import os, signal, time\n"
              "from cvfp import tracking\nfrom cvfp.params import Params\n"
              "run = tracking.StageRun('phase1', Params().flat())\n"
              "run.log_metrics({'loss': 1.5}, step=1)\n"
              "run._writer.connected.wait(60)\n"
              "time.sleep(1.0)\n"
              "os.kill(os.getpid(), signal.SIGKILL)\n")
    done = subprocess.run([sys.executable, "-c", script], cwd=workspace, timeout=120)
    assert done.returncode == -signal.SIGKILL
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        stage = [r for r in runs(workspace)[1] if r.data.tags[tracking.STAGE_TAG] == "phase1"]
        if stage and stage[0].info.status == "FAILED":
            break
        time.sleep(0.2)
    assert stage and stage[0].info.status == "FAILED" and stage[0].data.metrics == {"loss": 1.5}


def test_the_service_name_follows_the_writer_code(tmp_path):
    """An edited writer gets a service of its own: a running one never serves stale code."""
    before, after = socket_names_around_an_edit(tmp_path, "cvfp.tracking.service_name", "tracking_writer.py")
    assert before != after and tracking.service_name() not in (before, after)


def test_the_service_runs_only_code_its_name_covers():
    """The service's name hashes SERVICE_SOURCES: every cvfp module the service loads must be one of them."""
    script = ("import sys\nfrom cvfp.tracking_writer import preload\npreload()\n"
              "print(' '.join(sorted(m.__file__ for n, m in sys.modules.items() if n.split('.')[0] == 'cvfp')))")
    loaded = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout.split()
    assert loaded and {Path(path).name for path in loaded} <= set(tracking.SERVICE_SOURCES)


def test_an_idle_service_exits(tmp_path):
    name = f"cvfp-test-{os.getpid()}-{time.monotonic_ns()}"
    server = subprocess.Popen([sys.executable, "-m", "cvfp.tracking_writer", "--serve", name, "--idle", "1"])
    try:
        deadline = time.monotonic() + 60
        while True:  # it listens before it imports MLflow; a connection is served once the import is done
            try:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.connect("\0" + name)
                break
            except ConnectionRefusedError:
                sock.close()
                assert time.monotonic() < deadline and server.poll() is None
                time.sleep(0.05)
        with sock, sock.makefile("rb") as reader:
            assert reader.readline().split()[0] == service.READY
        assert server.wait(timeout=30) == 0
    finally:
        server.kill()


def test_a_bad_idle_setting_is_named_and_the_default_used(monkeypatch):
    monkeypatch.setenv(tracking.SERVICE_IDLE_ENV, "soon")
    with pytest.warns(UserWarning, match=f"{tracking.SERVICE_IDLE_ENV}='soon'"):
        assert service.idle_seconds(tracking.SERVICE_IDLE_ENV, 7.5) == 7.5
    monkeypatch.setenv(tracking.SERVICE_IDLE_ENV, "2.5")
    assert service.idle_seconds(tracking.SERVICE_IDLE_ENV, 7.5) == 2.5
