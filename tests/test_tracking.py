import shutil

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
        with tracking.StageRun(stage, flat) as run:
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
        tracking.StageRun("carve", flat).close()
    _, found = runs(workspace)
    assert sum(r.data.tags[tracking.STAGE_TAG] == "pipeline" for r in found) == 2


def test_experiment_name_and_params_change_the_group(workspace, monkeypatch):
    flat = Params().flat()
    tracking.StageRun("carve", flat).close()
    monkeypatch.setenv("DVC_EXP_NAME", "exp-a")
    tracking.StageRun("phase1", flat).close()
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
