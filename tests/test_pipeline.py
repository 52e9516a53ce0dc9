"""End to end: the real `dvc repro` of all seven stages on a tiny params set, in a copy of the repo."""

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

REPO = Path(__file__).resolve().parents[1]
COPIED = ["dvc.yaml", "pipeline", "src", ".dvc/config", ".dvc/.gitignore", ".dvcignore", ".gitignore"]
STAGES = ["tokenizer", "cache", "carve", "phase1", "cstar", "phase2", "evaluate"]

TINY_PARAMS = """
seed: 0
device: cpu
data: {source: chitchat, num_samples: 24}
tokenizer: {vocab_size: 320, min_frequency: 2}
carve: {method: tail, val_fraction: 0.25, unseen: drop_docs}
model: {context_dim: 8, embed_dim: 8, hidden_dim: 16, layer_structure: [1, 1], embedding_init_std: 1.0}
phase1: {max_iterations: 3, batch_tokens: 512, effective_rank_samples: 0}
phase2: {epochs: 2, batch_size: 256, patience: 1}
evaluate: {batch_size: 512, identity_samples: 32, num_trials: 3, contraction_samples: 4, contraction_power_iterations: 5}
"""


def sh(args, cwd, env):
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"{' '.join(args)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A fresh git + DVC project holding this repo's pipeline, after one `dvc repro`."""
    root = tmp_path_factory.mktemp("project")
    for name in COPIED:
        source, target = REPO / name, root / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy(source, target)
    (root / "params.yaml").write_text(TINY_PARAMS)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    env.update(CVFP_NO_PROGRESS="1", GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t",
               GIT_COMMITTER_EMAIL="t@t")
    sh(["git", "init", "-q"], root, env)
    sh(["git", "add", "-A"], root, env)
    sh(["git", "commit", "-qm", "init"], root, env)
    log = sh(["dvc", "repro"], root, env)
    return root, env, log


def read(root, name):
    return json.loads((root / "metrics" / name).read_text())


@pytest.mark.slow
def test_repro_writes_every_metric(project):
    root, _, log = project
    data = read(root, "data.json")
    for key in ("train_tokens", "val_tokens", "train_docs", "val_docs", "val_docs_dropped", "val_coverage",
                "vocab_size", "train_bytes", "val_bytes"):
        assert key in data, key
    phase1 = read(root, "phase1.json")
    for split in ("train", "val"):
        for key in ("effective_rank", "effective_rank_ratio", "convergence_rate", "converged_tokens", "tokens",
                    "cvfp_loss", "diversity_loss", "relative_residual"):
            assert key in phase1[split], (split, key)
    assert phase1["train"]["tokens"] == data["train_tokens"]
    evaluation = read(root, "eval.json")
    for mode in ("fixed", "free"):
        assert {"val_loss", "val_ppl", "val_acc", "val_bpb"} <= evaluation[mode].keys()
    assert {"train", "val"} <= evaluation["effective_rank"].keys()
    assert {"mean_context_norm", "mean_step_cosine", "passed"} <= evaluation["identity"].keys()
    assert {"final_diff", "slope", "verdict"} <= evaluation["convergence_check"].keys()
    assert (root / "models" / "phase2.pt").is_file()
    assert (root / "metrics" / "phase1_iterations.csv").is_file()


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
    assert phase1.data.params["phase1.dist_reg_weight"] == "0.9"
    assert phase1.data.params["model.layer_structure"] == "[1, 1]"
    curve = client.get_metric_history(phase1.info.run_id, "train_effective_rank")
    assert len(curve) == read(root, "phase1.json")["iterations"]


@pytest.mark.slow
def test_a_param_change_reruns_only_its_stage(project):
    root, env, _ = project
    params = (root / "params.yaml").read_text()
    try:
        (root / "params.yaml").write_text(params.replace("val_fraction: 0.25", "val_fraction: 0.3"))
        assert list(json.loads(sh(["dvc", "status", "--json"], root, env))) == ["carve"]
        (root / "params.yaml").write_text(params.replace("phase2: {epochs: 2,", "phase2: {lr: 0.003, epochs: 2,"))
        assert list(json.loads(sh(["dvc", "status", "--json"], root, env))) == ["phase2"]
    finally:
        (root / "params.yaml").write_text(params)


@pytest.mark.slow
def test_report_prints_the_results_table(project):
    root, env, _ = project
    out = sh(["cvfp", "report"], root, env)
    assert "Effective Rank" in out and "identity-mapping check" in out and "val bits per byte, free" in out
    # every rate is printed with its denominator
    assert f"/{read(root, 'data.json')['train_tokens']})" in out
