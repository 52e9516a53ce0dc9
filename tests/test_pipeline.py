"""End to end: the real `dvc repro` of all seven stages on a tiny params set, in a copy of the repo."""

import json
import re

import pytest
from conftest import write_params
from helpers import TINY_PARAMS, assert_experiments_logged_like_the_workspace, run_queued, sh, sqlite_metric_points
from mlflow.tracking import MlflowClient

STAGES = ["tokenizer", "cache", "carve", "phase1", "cstar", "phase2", "evaluate", "baselines", "compare"]










def read(root, name):
    return json.loads((root / "metrics" / name).read_text())


@pytest.mark.slow
def test_repro_writes_every_metric(project):
    root, _, log = project
    data = read(root, "data.json")
    for split in ("train", "val", "test"):
        for key in ("tokens", "docs", "bytes"):
            assert f"{split}_{key}" in data, (split, key)
    phase1 = read(root, "phase1.json")
    for split in ("train", "val"):
        for key in ("effective_rank", "effective_rank_ratio", "convergence_rate", "converged_tokens", "tokens",
                    "cvfp_loss", "diversity_loss", "relative_residual"):
            assert key in phase1[split], (split, key)
    assert phase1["train"]["tokens"] == data["train_tokens"]
    evaluation = read(root, "eval.json")
    for split in ("test", "val"):
        for mode in ("fixed", "free"):
            assert {"loss", "ppl", "acc", "bpb", "predictions", "bytes"} <= evaluation[split][mode].keys()
    assert {"train", "val"} <= evaluation["effective_rank"].keys()
    for suffix in ("", "_phase1"):
        assert {"mean_context_norm", "mean_step_cosine", "passed"} <= evaluation[f"identity{suffix}"].keys()
    assert {"final_diff", "slope", "verdict"} <= evaluation["convergence_check"].keys()
    assert (root / "models" / "phase2.pt").is_file()
    assert (root / "metrics" / "phase1_iterations.csv").is_file()
    compare = read(root, "compare.json")
    assert list(compare["models"]) == ["cvfp_fixed", "cvfp_free", "gru", "transformer"]
    for name, row in compare["models"].items():
        assert {"loss", "ppl", "acc", "bpb", "trainable_parameters", "train_tokens_seen"} <= row.keys()
        assert row["predictions"] == evaluation["test"]["free"]["predictions"] <= data["test_tokens"] - 1, name
    for kind in ("gru", "transformer"):
        assert abs(compare["parameter_ratio"][kind] - 1) <= 0.10
        assert (root / "models" / f"{kind}.pt").is_file()
    assert evaluation["test"]["free"]["bpb"] == compare["models"]["cvfp_free"]["bpb"]
    assert compare["split"] == "test"
    assert "seconds" not in json.dumps(compare)  # wall clock stays out of DVC-tracked metrics
    assert "| GRU " in log and "| Transformer " in log  # `dvc repro` prints the comparison table
    assert "**transformer:**" in (root / "metrics" / "samples.md").read_text()


@pytest.mark.slow
def test_repro_is_clean_and_idempotent(project):
    root, env, _ = project
    assert json.loads(sh(["dvc", "status", "--json"], root, env) or "{}") == {}
    second = sh(["dvc", "repro"], root, env)
    assert "Running stage" not in second


@pytest.mark.slow
def test_one_parent_run_with_a_child_per_stage(project):
    root, _, _ = project
    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("cvfp")
    found = client.search_runs([experiment.experiment_id])
    parents = [r for r in found if r.data.tags.get("cvfp.stage") == "pipeline"]
    assert len(parents) == 1
    children = [r for r in found if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert sorted(r.data.tags["cvfp.stage"] for r in children) == sorted(STAGES)
    phase1 = next(r for r in children if r.data.tags["cvfp.stage"] == "phase1")
    assert phase1.data.params["phase1.dist_reg_weight"] == "0.1"
    assert phase1.data.params["model.layer_structure"] == "[1, 1]"
    curve = client.get_metric_history(phase1.info.run_id, "1_effective_rank/train")
    assert len(curve) == read(root, "phase1.json")["iterations"]
    compare = next(r for r in children if r.data.tags["cvfp.stage"] == "compare")
    for name in ("cvfp_fixed", "cvfp_free", "gru", "transformer"):
        assert compare.data.metrics[f"{name}.bpb"] == read(root, "compare.json")["models"][name]["bpb"]
    assert "training_seconds.gru" in compare.data.metrics
    artifacts = {a.path for a in client.list_artifacts(compare.info.run_id)}
    assert {"compare.json", "samples.md", "compare_table.md"} <= artifacts
    baselines = next(r for r in children if r.data.tags["cvfp.stage"] == "baselines")
    curve = client.get_metric_history(baselines.info.run_id, "gru_val_loss")
    assert len(curve) == read(root, "baselines.json")["gru"]["epochs_run"]


@pytest.mark.slow
def test_a_param_change_reruns_only_its_stage(project):
    root, env, _ = project
    params = (root / "params.yaml").read_text()
    try:
        write_params(root / "params.yaml", {**TINY_PARAMS, "carve.max_unscored_fraction": 0.4})
        assert list(json.loads(sh(["dvc", "status", "--json"], root, env))) == ["carve"]
        write_params(root / "params.yaml", {**TINY_PARAMS, "carve.val_fraction": 0.2})  # the tokenizer's split too
        assert sorted(json.loads(sh(["dvc", "status", "--json"], root, env))) == ["carve", "tokenizer"]
        write_params(root / "params.yaml", {**TINY_PARAMS, "phase2.lr": 0.003})
        assert list(json.loads(sh(["dvc", "status", "--json"], root, env))) == ["phase2"]
        write_params(root / "params.yaml", {**TINY_PARAMS, "phase1.dist_reg_weight": 0.5})
        assert list(json.loads(sh(["dvc", "status", "--json"], root, env))) == ["phase1"]
        write_params(root / "params.yaml", {**TINY_PARAMS, "baselines.gru.lr": 0.01})
        assert list(json.loads(sh(["dvc", "status", "--json"], root, env))) == ["baselines"]
        write_params(root / "params.yaml", {**TINY_PARAMS, "phase2.epochs": 3})  # the baselines' budget follows
        assert sorted(json.loads(sh(["dvc", "status", "--json"], root, env))) == ["baselines", "phase2"]
        write_params(root / "params.yaml", {**TINY_PARAMS, "compare.temperature": 0.0})
        assert list(json.loads(sh(["dvc", "status", "--json"], root, env))) == ["compare"]
    finally:
        (root / "params.yaml").write_text(params)


COLD_RERUN = ["phase1", "phase2"]  # the seeded training stages, rerun cold too


@pytest.mark.slow
def test_forced_rerun_gives_identical_outputs(project):
    """Same params, same machine: every stage rerun gives byte-identical metrics/*.json and dvc.lock hashes.

    Both runs fork their stages from the warm server (cvfp.warm). Before the rerun, the training stages run once
    more each, started cold, so this also shows that a warm start changes no byte (nine cold starts would cost
    ~40 s more). The full rerun comes last: the queued-experiment test compares with the newest workspace runs."""
    root, env, _ = project
    names = sorted(str(p.relative_to(root)) for p in (root / "metrics").glob("*.json")) + ["dvc.lock"]
    assert "metrics/phase1.json" in names and "metrics/eval.json" in names
    before = {name: (root / name).read_bytes() for name in names}
    for stage in COLD_RERUN:
        log = sh(["dvc", "repro", "-f", "-s", stage], root, {**env, "CVFP_WARM_START": "0"})
        assert re.findall(r"Running stage '([^']+)'", log) == [stage]
        for name, content in before.items():
            assert (root / name).read_bytes() == content, (stage, name)
    log = sh(["dvc", "repro", "-f"], root, env)
    assert sorted(re.findall(r"Running stage '([^']+)'", log)) == sorted(STAGES)
    for name, content in before.items():
        assert (root / name).read_bytes() == content, name


@pytest.mark.slow
def test_report_prints_the_results_table(project):
    root, env, _ = project
    out = sh(["cvfp", "report"], root, env)
    assert "Effective Rank" in out and "identity-mapping check" in out and "test bits per byte, free" in out
    assert out.index("held-out test split") < out.index("data")  # the report leads with test
    assert "| CVFP free-running" in out and "| GRU" in out and "| Transformer" in out
    # every rate is printed with its denominator
    assert f"/{read(root, 'data.json')['train_tokens']})" in out


@pytest.mark.slow
def test_queued_experiments_land_in_the_workspace_store(project):
    """`dvc exp run --queue` runs in temporary copies; both must log to the workspace's sqlite store."""
    root, env, _ = project
    status = run_queued(root, env, ("0.01", "0.0003"))
    assert status.count("Success") == 2, status
    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("cvfp")
    found = client.search_runs([experiment.experiment_id])
    names = sorted({r.data.tags["dvc.exp_name"] for r in found} - {"workspace"})
    assert len(names) == 2
    for name in names:
        stages = sorted(r.data.tags["cvfp.stage"] for r in found if r.data.tags["dvc.exp_name"] == name)
        # only the stages the change reruns
        assert stages == ["compare", "evaluate", "phase2", "pipeline"], (name, stages)
        lrs = {r.data.params.get("phase2.lr") for r in found if r.data.tags["dvc.exp_name"] == name}
        assert lrs <= {"0.01", "0.0003"}
        evaluate = next(r for r in found if r.data.tags["dvc.exp_name"] == name and r.data.tags["cvfp.stage"] == "evaluate")
        assert "test.fixed.bpb" in evaluate.data.metrics and "test.free.bpb" in evaluate.data.metrics

    assert_experiments_logged_like_the_workspace(client, found, names, stages, sqlite_metric_points(root / "mlflow.db"))
