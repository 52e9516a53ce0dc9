"""DVC's remote workflow for a lab, with real DVC and real git, no mocks (README "Team setup", "DVC remote").

One tiny project (`helpers.TINY_PARAMS`), reproduced once (conftest's `reproduced`), is copied into a first clone
that gets a default DVC remote in a shared directory (as on a lab's shared filesystem) and a bare git repository as
`origin`. Fresh clones of `origin` then pull, reproduce, change a param, and exchange a queued experiment through
both remotes. Every command of the README section runs here; the counts of objects moved are printed (`pytest -s`)."""

import grp
import hashlib
import json
import os
import re
import stat
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import write_params
from helpers import TINY_PARAMS, copy_project, project_env, sh
from ruamel.yaml import YAML

STAGES = ["tokenizer", "cache", "carve", "phase1", "cstar", "phase2", "evaluate", "baselines", "compare"]
AFFECTED = ["phase2", "evaluate", "compare"]  # what a change of phase2.lr reruns, in order (dvc.yaml)
REMOTE = "lab"  # the project's default DVC remote, a shared directory
EXP, EXP_LR = "lab-lr", 0.01  # the queued experiment exchanged through origin
CHANGED_LR = 0.003  # the change another clone reproduces itself: in no run cache
SECRET = "dummy-secret-0123456789"  # a stand-in credential, never used to connect


def group_sh(args, cwd, env):
    """`sh` as a lab member runs DVC on the shared filesystem: with umask 002 (the run cache's folders follow it)."""
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=900, umask=0o002)
    assert done.returncode == 0, f"{' '.join(args)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def objects(store: Path) -> set[str]:
    """The content-addressed objects of a DVC cache or local remote (`files/md5/xx/...`)."""
    return {str(p.relative_to(store)) for p in (store / "files").rglob("*") if p.is_file()}


def run_cache(store: Path) -> set[str]:
    """The run-cache entries of a DVC cache or local remote (`runs/<key[:2]>/<key>/<value>`)."""
    return {str(p.relative_to(store)) for p in (store / "runs").rglob("*") if p.is_file()}


def cache(root: Path) -> Path:
    return root / ".dvc" / "cache"


def count(verb: str, out: str) -> int | None:
    """The number in DVC's summary line: count("pushed", "41 files pushed") == 41; None when there is none."""
    found = re.search(rf"(\d+) files? {verb}", out)
    return int(found.group(1)) if found else None


def ran(out: str) -> list[str]:
    """The stages DVC ran (not skipped, not restored from the run cache), in order."""
    return re.findall(r"Running stage '([^']+)'", out)


def status(root, env) -> dict:
    return json.loads(sh(["dvc", "status", "--json"], root, env) or "{}")


def load_yaml(path: Path):
    return YAML(typ="safe", pure=True).load(path.read_text())


def outputs(root: Path) -> dict[str, str | None]:
    """sha256 of every file of every output in dvc.lock (directory outputs file by file); None for a missing one."""
    digests = {}
    for stage in load_yaml(root / "dvc.lock")["stages"].values():
        for out in stage.get("outs", []):
            path = root / out["path"]
            for file in sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]:
                digest = hashlib.sha256(file.read_bytes()).hexdigest() if file.exists() else None
                digests[str(file.relative_to(root))] = digest
    return digests


def clone(lab, name) -> Path:
    sh(["git", "clone", "-q", str(lab.origin), name], lab.base, lab.env)
    return lab.base / name


def shown_experiment(shown: list, name: str) -> dict:
    """One experiment's params and metrics from `dvc exp show --json`."""
    found = [rev["data"] for baseline in shown for exp in baseline.get("experiments") or [] for rev in exp["revs"]
             if rev["name"] == name]
    assert len(found) == 1, [b.get("experiments") for b in shown]
    return found[0]


def shown_experiment_lr(data: dict) -> float:
    return data["params"]["params.yaml"]["data"]["phase2"]["lr"]


def metric_files(metrics: dict) -> dict:
    """{file: values} from the `metrics` of `dvc exp show --json` or of `dvc metrics show --json`."""
    return {name: entry["data"] for name, entry in metrics.items()}


class Clock:
    def __init__(self):
        self.start = time.monotonic()

    def __str__(self):
        return f"{time.monotonic() - self.start:.0f} s"


@pytest.fixture(scope="module")
def lab(tmp_path_factory, reproduced):
    """The first clone: the tiny project after `dvc repro` and a commit (a copy of conftest's pristine one, with its
    DVC cache and run cache), then `dvc remote add -d` a shared directory, `git push` to a bare origin. Nothing is
    pushed to the DVC remote yet."""
    clock = Clock()
    base = tmp_path_factory.mktemp("team-dvc")
    first, storage, origin = base / "first", base / "shared" / "dvc-storage", base / "origin.git"
    copy_project(reproduced.pristine, first)
    env = project_env()
    assert status(first, env) == {}  # reproduced: every stage's outputs in the cache
    # what the lab's admin does once: a folder of the lab's group (here: ours), setgid so that new files stay in it
    sh(["mkdir", "-p", str(storage)], base, env)
    sh(["chgrp", grp.getgrgid(os.getgid()).gr_name, str(storage)], base, env)
    sh(["chmod", "2775", str(storage)], base, env)
    sh(["dvc", "remote", "add", "-d", REMOTE, str(storage)], first, env)
    sh(["dvc", "remote", "modify", REMOTE, "shared", "group"], first, env)  # group-writable object folders
    sh(["git", "add", ".dvc/config"], first, env)
    sh(["git", "commit", "-qm", "DVC remote"], first, env)
    sh(["git", "init", "-q", "--bare", str(origin)], base, env)
    sh(["git", "remote", "add", "origin", str(origin)], first, env)
    branch = sh(["git", "symbolic-ref", "--short", "HEAD"], first, env).strip()
    sh(["git", "push", "-q", "origin", branch], first, env)
    sh(["git", "--git-dir", str(origin), "symbolic-ref", "HEAD", f"refs/heads/{branch}"], base, env)
    return SimpleNamespace(base=base, first=first, storage=storage, origin=origin, env=env, seconds=str(clock))


@pytest.fixture(scope="module")
def pushed(lab):
    """`dvc push --run-cache` from the first clone, with `dvc status --cloud` before and after, and what the
    first clone held then."""
    missing = json.loads(sh(["dvc", "status", "--cloud", "--json"], lab.first, lab.env))
    out = group_sh(["dvc", "push", "--run-cache"], lab.first, lab.env)
    return SimpleNamespace(
        out=out, missing=missing, after=json.loads(sh(["dvc", "status", "--cloud", "--json"], lab.first, lab.env)),
        objects=objects(lab.storage), runs=run_cache(lab.storage), local_objects=objects(cache(lab.first)),
        local_runs=run_cache(cache(lab.first)), outputs=outputs(lab.first))


@pytest.fixture(scope="module")
def second(lab, pushed):
    """A fresh clone of origin after `dvc pull` and `dvc repro`, recorded at once (the experiment fixture later
    applies an experiment in this clone)."""
    clock = Clock()
    root = clone(lab, "second")
    before = objects(cache(root))
    pull = sh(["dvc", "pull"], root, lab.env)
    return SimpleNamespace(root=root, before=before, pull=pull, objects=objects(cache(root)),
                           status=status(root, lab.env), repro=sh(["dvc", "repro"], root, lab.env),
                           outputs=outputs(root), seconds=str(clock))


@pytest.fixture(scope="module")
def queued(lab, pushed):
    """The first clone queues an experiment and starts the queue (the worker runs it in the background); at the
    end the worker is stopped, also when no test waited for the experiment (`-k`)."""
    sh(["dvc", "exp", "run", "--queue", "-n", EXP, "-S", f"phase2.lr={EXP_LR}"], lab.first, lab.env)
    # the worker daemon inherits stdout/stderr: capturing them would wait for the daemon, so they go to a file
    with open(lab.base / "queue-start.log", "w") as log:  # outside every workspace
        assert subprocess.run(["dvc", "queue", "start"], cwd=lab.first, env=lab.env, stdout=log, stderr=log,
                              stdin=subprocess.DEVNULL, timeout=120).returncode == 0
    yield Clock()
    subprocess.run(["dvc", "queue", "stop", "--kill"], cwd=lab.first, env=lab.env, capture_output=True, timeout=120)


@pytest.fixture(scope="module")
def third(lab, pushed, queued):
    """A fresh clone of origin, nothing pulled, after a phase2.lr change and `dvc repro --pull --allow-missing`.
    (It asks for `queued` only so that the experiment runs meanwhile: two single-threaded stages at once.)"""
    clock = Clock()
    root = clone(lab, "third")
    write_params(root / "params.yaml", {**TINY_PARAMS, "phase2.lr": CHANGED_LR})
    out = sh(["dvc", "repro", "--pull", "--allow-missing"], root, lab.env)
    return SimpleNamespace(root=root, out=out, objects=objects(cache(root)), outputs=outputs(root),
                           status=status(root, lab.env), seconds=str(clock))


@pytest.fixture(scope="module")
def experiment(lab, pushed, second, queued):
    """The queued experiment, once it succeeded: `dvc exp push`ed from the first clone to origin (git) and the
    DVC remote, then `dvc exp pull`ed into the second clone and applied there."""
    first, env = lab.first, lab.env
    try:
        deadline = time.monotonic() + 600
        while any(word in (queue := sh(["dvc", "queue", "status"], first, env)) for word in ("Running", "Queued")):
            assert time.monotonic() < deadline, queue
            time.sleep(2)
    finally:
        subprocess.run(["dvc", "queue", "stop"], cwd=first, env=env, capture_output=True, timeout=120)
    seconds = str(queued)
    assert queue.count("Success") == 1, queue
    shown = shown_experiment(json.loads(sh(["dvc", "exp", "show", "--json"], first, env)), EXP)
    refs = sh(["git", "for-each-ref", "--format=%(objectname) %(refname)", "refs/exps"], first, env).splitlines()
    (rev,) = [line.split()[0] for line in refs if line.endswith(f"/{EXP}")]
    remote_before, runs_before = objects(lab.storage), run_cache(lab.storage)
    push = group_sh(["dvc", "exp", "push", "--run-cache", "origin", EXP], first, env)
    remote_after, runs_after = objects(lab.storage), run_cache(lab.storage)
    assert runs_before <= runs_after

    root = second.root
    listed = sh(["dvc", "exp", "list", "origin"], root, env).split()
    cache_before = objects(cache(root))
    pull = sh(["dvc", "exp", "pull", "origin", EXP], root, env)
    pulled = objects(cache(root)) - cache_before
    shown_second = shown_experiment(json.loads(sh(["dvc", "exp", "show", "--json"], root, env)), EXP)
    apply = sh(["dvc", "exp", "apply", EXP], root, env)
    return SimpleNamespace(
        shown=shown, lock=sh(["git", "show", f"{rev}:dvc.lock"], first, env), push=push,
        pushed=remote_after - remote_before, pushed_runs=runs_after - runs_before, exp_objects=objects(cache(first)),
        listed=listed, pull=pull, pulled=pulled, shown_second=shown_second, apply=apply,
        params_diff=json.loads(sh(["dvc", "params", "diff", "--json"], root, env)),
        metrics=json.loads(sh(["dvc", "metrics", "show", "--json"], root, env)), status=status(root, env),
        second_lock=(root / "dvc.lock").read_text(), outputs=outputs(root), seconds=seconds)


@pytest.mark.slow
def test_push_sends_every_output_and_the_run_cache(lab, pushed):
    # before: every output of dvc.lock is missing from the remote; after: none is
    assert set(pushed.missing) >= set(pushed.outputs), pushed.missing
    assert set(pushed.missing.values()) == {"new"}
    assert pushed.after == {}
    # the remote holds exactly the first clone's objects, and one run-cache entry per stage
    assert pushed.objects == pushed.local_objects and len(pushed.objects) >= len(pushed.outputs)
    assert pushed.runs == pushed.local_runs and len(pushed.runs) == len(STAGES)
    assert count("pushed", pushed.out) == len(pushed.objects) + len(pushed.runs), pushed.out
    # several lab members push: `shared = group` makes the object folders group-writable (setgid), the run
    # cache's folders follow the umask (002)
    for folder in [lab.storage / "files", *(p for p in (lab.storage / "files").rglob("*") if p.is_dir())]:
        assert stat.S_IMODE(folder.stat().st_mode) == 0o2775, folder
    for folder in [lab.storage, lab.storage / "runs", *(p for p in (lab.storage / "runs").rglob("*") if p.is_dir())]:
        assert folder.stat().st_mode & stat.S_IWGRP, folder


@pytest.mark.slow
def test_a_fresh_clone_pulls_everything_and_is_up_to_date(lab, pushed, second):
    assert second.before == set()
    assert second.objects == pushed.objects
    assert count("fetched", second.pull) == len(pushed.objects), second.pull
    assert second.status == {}
    assert ran(second.repro) == [] and "Data and pipelines are up to date." in second.repro, second.repro
    for stage in STAGES:
        assert f"Stage '{stage}' didn't change, skipping" in second.repro, stage
    # byte for byte the first clone's outputs
    assert None not in second.outputs.values() and second.outputs == pushed.outputs
    print(f"\ndvc remote: pushed {len(pushed.objects)} objects (+{len(pushed.runs)} run-cache entries), pulled "
          f"{len(second.objects)} (DVC printed '{pushed.out.strip()}', '{second.pull.splitlines()[-1]}'); "
          f"first clone's repro + setup {lab.seconds}, clone + pull + repro {second.seconds}")


@pytest.mark.slow
def test_a_param_change_pulls_what_it_needs_and_reruns_only_its_stages(lab, pushed, third):
    assert ran(third.out) == AFFECTED, third.out
    for stage in STAGES:
        if stage not in AFFECTED:
            assert f"Stage '{stage}' didn't change, skipping" in third.out, stage
    first, here = pushed.outputs, third.outputs
    # the reran stages' outputs changed, those they read were pulled, byte for byte the first clone's
    for name in ("models/phase2.pt", "metrics/phase2.json", "metrics/eval.json", "metrics/compare.json"):
        assert here[name] is not None and here[name] != first[name], name
    assert load_yaml(third.root / "metrics" / "phase2.json") != load_yaml(lab.first / "metrics" / "phase2.json")
    for name in ("models/phase1.pt", "data/cstar/train.safetensors", "data/splits/val.safetensors", "models/gru.pt",
                 "metrics/baselines.json", "data/tokenizer/tokenizer.json"):
        assert here[name] == first[name], name
    # what no stage that ran reads was not pulled: unchanged stages stay as they were, their data on the remote
    assert here["data/corpus/documents.jsonl"] is None and here["data/cache/stream.safetensors"] is None
    assert 0 < len(third.objects - pushed.objects) < len(pushed.objects)  # the new outputs ...
    pulled = third.objects & pushed.objects  # ... and what was pulled
    assert 0 < len(pulled) < len(pushed.objects)
    # `dvc status` names only missing data of the stages that were skipped
    assert set(third.status).isdisjoint(AFFECTED), third.status
    for stage, changes in third.status.items():
        for change in changes:
            assert set(change) <= {"changed deps", "changed outs"}, (stage, change)
            assert set().union(*(c.values() for c in change.values())) <= {"not in cache", "deleted"}, (stage, change)
    print(f"\ndvc repro --pull --allow-missing: pulled {len(pulled)} of {len(pushed.objects)} objects, ran "
          f"{', '.join(ran(third.out))} ({third.seconds}, beside the queued experiment)")


@pytest.mark.slow
def test_an_experiment_travels_through_git_and_the_dvc_remote(lab, pushed, second, experiment):
    assert shown_experiment_lr(experiment.shown) == EXP_LR
    assert f"Pushed experiment {EXP} to Git remote 'origin'." in experiment.push, experiment.push
    # the experiment's new objects went to the DVC remote, with one run-cache entry per stage it reran
    assert experiment.pushed and experiment.pushed <= experiment.exp_objects - pushed.objects
    assert len(experiment.pushed_runs) == len(AFFECTED)
    # DVC's count: the new objects, plus every run-cache entry, the old ones copied again
    assert count("uploaded", experiment.push) == len(experiment.pushed) + len(pushed.runs) + len(AFFECTED)
    # the other clone sees it on origin, pulls its commit and exactly those objects
    assert EXP in experiment.listed
    assert f"Pulled experiment '['{EXP}']' from Git remote 'origin'." in experiment.pull, experiment.pull  # sic
    assert experiment.pulled == experiment.pushed
    assert shown_experiment_lr(experiment.shown_second) == EXP_LR
    assert metric_files(experiment.shown_second["metrics"]) == metric_files(experiment.shown["metrics"])
    # applied: its params and metrics, and its outputs checked out from the pulled cache
    assert "Changes for experiment 'lab-lr' have been applied" in experiment.apply
    (diff,) = experiment.params_diff.values()
    assert list(diff) == ["phase2.lr"] and diff["phase2.lr"]["new"] == EXP_LR, experiment.params_diff
    assert diff["phase2.lr"]["old"] == load_yaml(lab.first / "params.yaml")["phase2"]["lr"]
    assert metric_files(experiment.metrics[""]["data"]) == metric_files(experiment.shown["metrics"])
    assert experiment.second_lock == experiment.lock
    assert experiment.status == {}
    print(f"\ndvc exp push/pull: pushed {len(experiment.pushed)} objects (+{len(experiment.pushed_runs)} run-cache "
          f"entries; DVC printed '{experiment.push.splitlines()[-1]}'), pulled {len(experiment.pulled)}; "
          f"queue start to success {experiment.seconds}")


@pytest.mark.slow
def test_the_pushed_run_cache_spares_another_clone_the_run(lab, third, experiment):
    """The third clone sets the experiment's params: `dvc repro --pull` restores its stages from the run cache
    that `dvc exp push --run-cache` sent, and runs nothing."""
    clock = Clock()
    write_params(third.root / "params.yaml", {**TINY_PARAMS, "phase2.lr": EXP_LR})
    out = sh(["dvc", "repro", "--pull", "--allow-missing"], third.root, lab.env)
    assert ran(out) == [], out
    for stage in AFFECTED:
        assert f"Stage '{stage}' is cached - skipping run, checking out outputs" in out, out
    # the experiment's outputs, byte for byte, without computing them
    present = {name: digest for name, digest in outputs(third.root).items() if digest is not None}
    assert present.items() <= experiment.outputs.items()
    assert {"models/phase2.pt", "metrics/eval.json", "metrics/compare.json", "metrics/samples.md"} <= present.keys()
    print(f"\ndvc repro --pull with the experiment's params: {len(AFFECTED)} stages from the run cache, none run "
          f"({clock})")


@pytest.mark.slow
def test_credentials_go_to_config_local_which_git_ignores(lab):
    """S3 and SSH remotes are added for everyone (.dvc/config, committed); their credentials with `--local`."""
    root = clone(lab, "credentials")
    env = lab.env
    assert sh(["dvc", "remote", "default"], root, env).strip() == REMOTE
    sh(["dvc", "remote", "add", "-d", "lab-s3", "s3://lab-bucket/cvfp"], root, env)
    assert sh(["dvc", "remote", "default"], root, env).strip() == "lab-s3"
    sh(["dvc", "remote", "add", "-d", "lab-ssh", "ssh://storage.lab.example/srv/dvc/cvfp"], root, env)
    sh(["git", "commit", "-qam", "S3 and SSH remotes"], root, env)
    sh(["dvc", "remote", "modify", "--local", "lab-s3", "access_key_id", "AKIADUMMYEXAMPLE"], root, env)
    sh(["dvc", "remote", "modify", "--local", "lab-s3", "secret_access_key", SECRET], root, env)
    sh(["dvc", "remote", "modify", "--local", "lab-ssh", "user", "alice"], root, env)
    sh(["dvc", "remote", "modify", "--local", "lab-ssh", "keyfile", "/home/alice/.ssh/id_lab"], root, env)
    sh(["dvc", "remote", "modify", "--local", "lab-ssh", "password", SECRET], root, env)
    sh(["dvc", "remote", "modify", "--local", REMOTE, "jobs", "2"], root, env)  # a per-machine setting
    local, shared = (root / ".dvc" / "config.local").read_text(), (root / ".dvc" / "config").read_text()
    for value in ("AKIADUMMYEXAMPLE", SECRET, "alice", "id_lab", "jobs = 2"):
        assert value in local and value not in shared, value
    assert "s3://lab-bucket/cvfp" in shared and "s3://" not in local
    assert sh(["git", "status", "--porcelain", "--ignored=no"], root, env) == ""
    assert sh(["git", "check-ignore", ".dvc/config.local"], root, env).strip() == ".dvc/config.local"
    remotes = " ".join(sh(["dvc", "remote", "list"], root, env).split())  # it may wrap "(default)" onto a line
    assert remotes == f"{REMOTE} {lab.storage} lab-s3 s3://lab-bucket/cvfp " \
                      "lab-ssh ssh://storage.lab.example/srv/dvc/cvfp (default)", remotes
    assert sh(["dvc", "remote", "default"], root, env).strip() == "lab-ssh"
    # DVC merges both files: the credentials are in effect (and only in the git-ignored file)
    merged = sh(["dvc", "config", "--list", "--show-origin"], root, env)
    assert re.search(r"config\.local\s+remote\.lab-s3\.secret_access_key=" + SECRET, merged), merged
