import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
from mlflow.tracking import MlflowClient

from cvfp import tracking
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


def test_a_dead_writer_process_is_reported_not_hidden(workspace):
    """If the writer process dies mid-stage, the stage still closes and says what may be missing."""
    run = tracking.StageRun("evaluate", Params().flat())
    os.kill(run._writer.process.pid, signal.SIGKILL)
    run._writer.process.wait()
    run.log_metrics({"test": {"bpb": 2.5}})
    with pytest.warns(UserWarning, match="not logged for stage 'evaluate'"):
        run.close()
    assert any("writer process" in failure for failure in run.failures)
