"""Helpers shared by the test modules (no test module imports another test module)."""

import importlib.util
import os
import shutil
import subprocess
import sys
import time
from contextlib import closing
from pathlib import Path

import torch

from conftest import write_params

from cvfp.model import CVFPModel, ModelArgs

REPO = Path(__file__).resolve().parents[1]
COPIED = ["dvc.yaml", "pipeline", "src", ".dvc/config", ".dvc/.gitignore", ".dvcignore", ".gitignore"]
VOCAB, CONTEXT, EMBED = 12, 6, 4  # the Phase-2 tests' toy sizes (tiny_model(vocab_size=VOCAB))


def tiny_model(seed: int = 0, **overrides) -> CVFPModel:
    """A seeded CVFPModel small enough for exact checks; `hidden_dim` follows context + embed unless given."""
    torch.manual_seed(seed)
    args = dict(vocab_size=40, context_dim=6, embed_dim=4, layer_structure=[1, 2])
    args.update(overrides)
    args.setdefault("hidden_dim", args["context_dim"] + args["embed_dim"])
    return CVFPModel(ModelArgs(**args))


def load_stage(name):
    """pipeline/<name>.py as a module (its body is called directly, without run_stage's MLflow run)."""
    spec = importlib.util.spec_from_file_location(f"stage_{name}", REPO / "pipeline" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class NoRun:
    """The stage's MLflow run, recording nothing."""

    def __getattr__(self, name):
        return lambda *args, **kwargs: None


def stream(length, seed=1):
    """A periodic token stream (learnable) with a little noise, and its C* from the model."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.arange(length) % 5
    noise = torch.rand(length, generator=generator) < 0.1
    return torch.where(noise, torch.randint(0, VOCAB, (length,), generator=generator), ids)


def all_scored(ids):
    """scored and target_bytes of a stream whose N-1 predictions all count, one byte each."""
    return torch.ones(ids.numel() - 1, dtype=torch.bool), torch.ones(ids.numel() - 1, dtype=torch.int64)


SPECIAL, UNSEEN = 0, 3  # in `labelled`: a role/boundary marker, and an id that stands for one unseen in train


def labelled(ids):
    """scored and target_bytes as carve gives them, with every kind of prediction: a target SPECIAL is a marker
    (0 bytes, not scored), a target UNSEEN has real bytes but is not scored, any other target is scored with
    1 + id % 3 bytes (so the bytes depend on which token is the target)."""
    targets = ids[1:]
    target_bytes = torch.where(targets == SPECIAL, 0, 1 + targets % 3).long()
    return (targets != SPECIAL) & (targets != UNSEEN), target_bytes


TINY_PARAMS = {
    "device": "cpu", "data.num_samples": 21, "tokenizer.vocab_size": 320, "carve.val_fraction": 0.1,
    "carve.test_fraction": 0.1,
    "model.context_dim": 8, "model.embed_dim": 8, "model.hidden_dim": 16, "model.layer_structure": [1, 1],
    "phase1.max_iterations": 3, "phase1.batch_tokens": 512, "phase1.effective_rank_samples": 0,
    "phase2.epochs": 2, "phase2.batch_size": 256, "phase2.patience": 1,
    "evaluate.batch_size": 512, "evaluate.identity_samples": 32, "evaluate.num_trials": 3,
    "evaluate.contraction_samples": 4, "evaluate.contraction_power_iterations": 5,
    "evaluate.lyapunov_steps": 40, "evaluate.lyapunov_blocks": 4,
    "baselines.seq_len": 16, "baselines.batch_size": 16, "baselines.transformer.layers": 1,
    "baselines.transformer.heads": 1, "compare.sample_prompts": 2, "compare.max_new_tokens": 8,
}


def sh(args, cwd, env):
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"{' '.join(args)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def project_env() -> dict[str, str]:
    """The environment a test project's commands run in: no MLFLOW_/DVC_ settings of the caller, one thread, a git
    identity."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    # one thread per stage: queued experiments run two stages at once, and two 2-thread torch processes on
    # 2 cores spin-wait each other ~50x slower (tiny tensors gain nothing from a second thread anyway)
    env.update(OMP_NUM_THREADS="1", CVFP_NO_PROGRESS="1", GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t",
               GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@t")
    return env


def copy_project(source: Path, target: Path) -> None:
    """The project's files, git and DVC state (its cache and run cache), without its tracking state (journals,
    stores) or DVC's tmp/."""
    def ignore(folder, names):
        here = Path(folder)
        skip = {".cvfp", "mlflow.db", "mlartifacts"} if here == source else set()
        return (skip | ({"tmp"} if here == source / ".dvc" else set())) & set(names)

    shutil.copytree(source, target, symlinks=True, ignore=ignore)


def make_project(root, overrides):
    """Copy this repo's pipeline into `root` as a fresh, committed git + DVC project with params.yaml =
    the repo's plus `overrides`; returns the environment to run its stages in."""
    for name in COPIED:
        source, target = REPO / name, root / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy(source, target)
    write_params(root / "params.yaml", overrides)
    env = project_env()
    sh(["git", "init", "-q"], root, env)
    sh(["git", "add", "-A"], root, env)
    sh(["git", "commit", "-qm", "init"], root, env)
    return env


def run_queued(root, env, values, param="phase2.lr", jobs=2, timeout=600):
    """Queue one `dvc exp run -S param=value` per value, run them `jobs` at a time, wait; the final `dvc queue status`.

    `dvc queue start` leaves worker daemons behind that inherit its stdout/stderr: capturing them would wait for
    the daemons to exit (seen once: a worker lingered after the queue ran dry), so they write to a file outside
    the workspace."""
    for value in values:
        sh(["dvc", "exp", "run", "--queue", "-S", f"{param}={value}"], root, env)
    with open(Path(root).parent / "queue-start.log", "w") as out:
        assert subprocess.run(["dvc", "queue", "start", "-j", str(jobs)], cwd=root, env=env, stdout=out, stderr=out,
                              stdin=subprocess.DEVNULL, timeout=120).returncode == 0
    try:
        deadline = time.monotonic() + timeout
        while True:
            status = sh(["dvc", "queue", "status"], root, env)
            if not any(word in status for word in ("Running", "Queued")):
                return status
            assert time.monotonic() < deadline, status
            time.sleep(1)
    finally:
        subprocess.run(["dvc", "queue", "stop"], cwd=root, env=env, capture_output=True, timeout=120)


def artifact_files(client, run_id, folder=None):
    files = []
    for entry in client.list_artifacts(run_id, folder):
        files += artifact_files(client, run_id, entry.path) if entry.is_dir else [entry.path]
    return sorted(files)


POINTS_SQL = "select run_uuid, key, count(*) from metrics group by run_uuid, key"  # MLflow's SQL schema


def metric_points(rows) -> dict[str, dict[str, int]]:
    """{run id: {metric: number of points}} from the rows of POINTS_SQL, run on the store's database (sqlite or
    PostgreSQL): one query instead of a `get_metric_history` request per metric of every run."""
    points: dict[str, dict[str, int]] = {}
    for run_id, key, count in rows:
        points.setdefault(run_id, {})[key] = count
    return points


def sqlite_metric_points(path) -> dict[str, dict[str, int]]:
    import sqlite3

    with closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as connection:
        return metric_points(connection.execute(POINTS_SQL).fetchall())


def stored(client, run, points):
    """What the store holds of one run: its status, param names, artifact files and the points of each metric
    (`points`: metric_points of the store); every metric the run reports has its points in the database."""
    counts = points.get(run.info.run_id, {})
    assert set(run.data.metrics) == set(counts), (run.info.run_id, sorted(run.data.metrics), sorted(counts))
    return {"status": run.info.status, "params": sorted(run.data.params),
            "artifacts": artifact_files(client, run.info.run_id), "metrics": counts}


def assert_experiments_logged_like_the_workspace(client, found, names, stages, points):
    """Each experiment's run of each stage holds what the same stage logged when it ran alone (the workspace's
    `dvc repro`): every param, artifact and metric, each metric with as many points, and is finished; the two
    experiments agree. A write lost to "database is locked" (or to a server) would leave a hole. `points`: the
    store's metric_points, read after the runs. Returns what each experiment run holds (`stored`), for totals."""
    runs = {(r.data.tags["dvc.exp_name"], r.data.tags["cvfp.stage"]): r for r in reversed(found)}  # newest wins

    def without_timing_files(logged):
        # compare's training_seconds.* come from metrics/timing/, git-ignored and so absent from the
        # temporary copies the experiments run in (the two experiments must still agree on them)
        return {**logged, "metrics": {k: v for k, v in logged["metrics"].items() if not k.startswith("training_seconds.")}}

    logged_runs = []
    for stage in stages:
        alone = stored(client, runs["workspace", stage], points)
        assert alone["status"] == "FINISHED" and alone["params"], stage
        assert stage == "pipeline" or (alone["metrics"] and alone["artifacts"]), stage
        first, second = (stored(client, runs[name, stage], points) for name in names)
        assert first == second, stage
        assert without_timing_files(first) == without_timing_files(alone), stage
        logged_runs += [first, second]
    # the per-epoch curves are part of what is compared
    assert max(stored(client, runs["workspace", "phase2"], points)["metrics"].values()) > TINY_PARAMS["phase2.epochs"]
    return logged_runs


def socket_names_around_an_edit(tmp_path, function, edited, more_env=None):
    """A server's socket name (`function`, e.g. "cvfp.warm.server_name") computed on a copy of src/cvfp before and
    after a comment is appended to `edited` (a file of the package); with `more_env`, a third name: after the edit,
    under that extra environment."""
    copy = Path(tmp_path) / "src"
    shutil.copytree(REPO / "src" / "cvfp", copy / "cvfp", ignore=shutil.ignore_patterns("__pycache__"))
    module, name = function.rsplit(".", 1)
    ask = [sys.executable, "-c", f"from {module} import {name}; print({name}())"]
    env = {**os.environ, "PYTHONPATH": str(copy)}
    names = [subprocess.run(ask, env=env, capture_output=True, text=True, check=True).stdout.strip()]
    with open(copy / "cvfp" / edited, "a") as handle:
        handle.write("# edited\n")
    for extra in ({}, *([more_env] if more_env else [])):
        names.append(subprocess.run(ask, env={**env, **extra}, capture_output=True, text=True, check=True).stdout.strip())
    return names
