"""`cvfp study` on a real scratch git + DVC repository with two `dvc exp run -S` experiments and a real
sqlite MLflow store holding phase1 runs tagged as the pipeline tags them."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from cvfp import study
from cvfp.tracking import phase1_curve

PARAMS = """\
phase1:
  dist_reg_weight: 0.9
  max_iterations: 3
data:
  num_samples: 10
model:
  layer_structure: [1, 1]
"""

# Metrics shaped like the pipeline's, computed from the params: convergence 1 - dist_reg_weight of 100 train and
# 40 val tokens; a Lyapunov exponent only where data.num_samples > 10 (so one experiment has none)
STAGE = """\
import json, os
from ruamel.yaml import YAML
p = YAML(typ="safe").load(open("params.yaml"))
w, n = p["phase1"]["dist_reg_weight"], p["data"]["num_samples"]
os.makedirs("metrics", exist_ok=True)
split = lambda tokens: {"converged_tokens": round(tokens * (1 - w)), "tokens": tokens, "convergence_rate": round(tokens * (1 - w)) / tokens}
json.dump({"iterations": p["phase1"]["max_iterations"], "train": split(100), "val": split(40)}, open("metrics/phase1.json", "w"))
json.dump({"split": "test", "models": {"cvfp_fixed": {"bpb": 2.6 + w}, "cvfp_free": {"bpb": 2.5 + w},
           "gru": {"bpb": 2.25}, "transformer": {"bpb": 2.5}}}, open("metrics/compare.json", "w"))
lyapunov = {"lyapunov": {"final": {"exponent": -w, "stderr": 0.01, "steps": 9, "burn_in": 1, "blocks": 8}}}
json.dump(lyapunov if n > 10 else {"identity": {"passed": True}}, open("metrics/eval.json", "w"))
"""

DVC_YAML = """\
stages:
  train:
    cmd: python stage.py
    deps: [stage.py]
    params: [phase1, data, model]
    metrics:
      - metrics/phase1.json: {cache: false}
      - metrics/compare.json: {cache: false}
      - metrics/eval.json: {cache: false}
"""

EXPERIMENTS = {"exp-a": ["phase1.dist_reg_weight=0.5"],
               "exp-b": ["phase1.dist_reg_weight=0.1", "data.num_samples=20"]}
CURVE = {"train.convergence_rate": [1.0, 0.4, 0.5], "val.convergence_rate": [0.3, 0.35, 0.5],
         "train.cvfp_loss": [0.0, 0.03, 0.02], "val.cvfp_loss": [0.03, 0.025, 0.02]}


def sh(args, cwd, env):
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"{' '.join(args)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
    return done.stdout.strip()


def log_phase1(client, experiment_id, name, commit, curves, start_time, status="FINISHED", legacy=False):
    """A pipeline parent run with one phase1 child run, tagged as cvfp.tracking tags them; curves at steps 1..

    The curves are named as the phase1 stage names them (`2_convergence_rate/train`), or with `legacy` as runs
    logged before the chart sections were (`train.convergence_rate`)."""
    tags = {"git.commit": commit, "dvc.exp_name": name}
    parent = client.create_run(experiment_id, run_name=name, start_time=start_time,
                               tags={**tags, "cvfp.stage": "pipeline"}).info.run_id
    client.set_terminated(parent, "FINISHED")
    run = client.create_run(experiment_id, run_name="phase1", start_time=start_time,
                            tags={**tags, "cvfp.stage": "phase1", "mlflow.parentRunId": parent}).info.run_id
    name = (lambda key: key) if legacy else (lambda key: phase1_curve(*key.split(".", 1)))
    metrics = [Metric(name(key), value, start_time + step, step) for key, values in curves.items()
               for step, value in enumerate(values, start=1)]
    client.log_batch(run, metrics=metrics)
    client.set_terminated(run, status)
    return run


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    """The scratch repository after two experiments, its MLflow store, and the collected records."""
    root = tmp_path_factory.mktemp("study-repo")
    (root / "params.yaml").write_text(PARAMS)
    (root / "stage.py").write_text(STAGE)
    (root / "dvc.yaml").write_text(DVC_YAML)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    env.update(DVC_NO_ANALYTICS="1", GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t",
               GIT_COMMITTER_EMAIL="t@t", PATH=os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", ""))
    sh(["git", "init", "-q"], root, env)
    sh(["dvc", "init", "-q"], root, env)
    sh(["git", "add", "-A"], root, env)
    sh(["git", "commit", "-qm", "init"], root, env)
    for name, sets in EXPERIMENTS.items():  # run now, not queued: two quick experiments
        sh(["dvc", "exp", "run", "-q", "-n", name, *(arg for value in sets for arg in ("-S", value))], root, env)
    head = sh(["git", "rev-parse", "HEAD"], root, env)

    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment("cvfp", artifact_location=(root / "mlartifacts").as_uri())
    stale = {key: [0.0, 0.0, 0.0] for key in CURVE}
    log_phase1(client, experiment, "exp-a", head, stale, start_time=1_000)  # older: not the one to read
    newest = log_phase1(client, experiment, "exp-a", head, CURVE, start_time=2_000)
    log_phase1(client, experiment, "exp-a", head, stale, start_time=3_000, status="FAILED")  # not finished
    without_val_loss = {key: values for key, values in CURVE.items() if key != "val.cvfp_loss"}
    log_phase1(client, experiment, "exp-b", head, without_val_loss, start_time=2_500, legacy=True)

    with pytest.MonkeyPatch.context() as patch:
        for key in [k for k in os.environ if k.startswith(("MLFLOW_", "DVC_"))]:
            patch.delenv(key)
        patch.setenv("DVC_NO_ANALYTICS", "1")
        records = study.collect(root, uri)
    return {"root": root, "uri": uri, "head": head, "newest": newest, "env": env,
            "records": {record["name"]: record for record in records}}


def test_collect_reads_every_experiment_with_flat_params_and_metrics(scratch):
    records, head = scratch["records"], scratch["head"]
    assert set(records) == {"workspace", "exp-a", "exp-b"}
    a = records["exp-a"]
    assert a["status"] == "done" and a["baseline"] == head and len(a["rev"]) == 40
    assert a["params"] == {"phase1.dist_reg_weight": 0.5, "phase1.max_iterations": 3, "data.num_samples": 10,
                           "model.layer_structure": [1, 1]}
    assert a["metrics"]["metrics/phase1.json:train.converged_tokens"] == 50
    assert a["metrics"]["metrics/compare.json:models.gru.bpb"] == 2.25
    assert a["metrics"]["metrics/eval.json:identity.passed"] is True
    assert records["exp-b"]["metrics"]["metrics/eval.json:lyapunov.final.exponent"] == -0.1
    assert records["workspace"]["rev"] == "workspace"
    assert records["workspace"]["params"] == records["exp-b"]["params"]  # `dvc exp run` leaves its result there


def test_curves_come_from_the_newest_finished_phase1_run(scratch):
    a = scratch["records"]["exp-a"]
    assert a["curves_run"] == scratch["newest"]
    assert a["curves"]["val.convergence_rate"] == [[1, 0.3], [2, 0.35], [3, 0.5]]
    assert set(a["curves"]) == set(study.CURVES) and a["missing"] == [] and a["notes"] == []


def test_a_missing_curve_or_run_is_reported_not_invented(scratch):
    b, workspace = scratch["records"]["exp-b"], scratch["records"]["workspace"]
    assert "val.cvfp_loss" not in b["curves"]
    assert any("no val.cvfp_loss curve in phase1 run" in line for line in b["missing"])
    assert workspace["curves"] == {} and workspace["curves_run"] is None
    assert any("no finished phase1 run tagged dvc.exp_name=workspace" in line for line in workspace["missing"])


def test_varying_names_the_grid_axes(scratch):
    records = list(scratch["records"].values())
    assert study.varying(records) == ["phase1.dist_reg_weight", "data.num_samples"]  # in params.yaml's order
    assert study.varying([scratch["records"]["exp-b"], scratch["records"]["workspace"]]) == []


def table_rows(text):
    """The summary table of STUDY.md as {first cell: cells}, with its header under 'header'."""
    lines = [line for line in text.split("## Summary", 1)[1].splitlines() if line.startswith("|")]
    cells = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines if not line.startswith("|---")]
    return {"header": cells[0], **{row[0]: row for row in cells[1:]}}


def test_write_report_table_plots_and_missing(scratch, tmp_path):
    path = study.write_report(list(scratch["records"].values()), tmp_path / "study", "Tiny grid",
                              command="cvfp study --repo scratch")
    text = path.read_text()
    assert text.startswith("# Tiny grid\n") and "`cvfp study --repo scratch`" in text
    rows = table_rows(text)
    assert rows["header"] == [
        "experiment", "phase1.dist_reg_weight", "data.num_samples", "Phase-1 iterations",
        "Phase-1 convergence, train", "Phase-1 convergence, val", "Lyapunov `lyapunov.final.exponent`",
        "test bpb CVFP fixed", "test bpb CVFP free", "test bpb GRU", "test bpb Transformer", "gap CVFP free - GRU"]
    assert rows["exp-a"] == ["exp-a", "0.5", "10", "3", "50.0% (50/100)", "50.0% (20/40)", "n/a",
                             "3.1000", "3.0000", "2.2500", "2.5000", "+0.7500"]
    assert rows["exp-b"] == ["exp-b", "0.1", "20", "3", "90.0% (90/100)", "90.0% (36/40)", "-0.1000 ± 0.0100",
                             "2.7000", "2.6000", "2.2500", "2.5000", "+0.3500"]
    assert rows["workspace (= exp-b)"][1:] == rows["exp-b"][1:]
    assert list(rows)[1:] == ["workspace (= exp-b)", "exp-b", "exp-a"]  # workspace first, then along the axes
    missing = text.split("## Missing", 1)[1].split("## Sources", 1)[0]
    assert "- exp-b: MLflow: no val.cvfp_loss curve in phase1 run" in missing
    assert "- exp-a: metrics/eval.json: no lyapunov.final.exponent" in missing  # the table's n/a
    assert "- workspace (= exp-b): MLflow: no finished phase1 run tagged dvc.exp_name=workspace" in missing
    assert f"exp-a `{scratch['newest']}`" in text
    for name in study.FILES.values():
        assert f"]({name})" in text
        assert (tmp_path / "study" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name


def test_no_store_means_no_curves_and_no_new_file(scratch, tmp_path):
    records = [dict(record, curves={}, missing=[]) for record in scratch["records"].values()]
    study.add_curves(records, f"sqlite:///{tmp_path / 'absent.db'}")
    assert all(r["curves"] == {} and "no store at" in r["missing"][0] for r in records)
    assert not (tmp_path / "absent.db").exists()


def test_cli_writes_the_report_and_errors_are_one_line(scratch, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DVC_NO_ANALYTICS", "1")
    root, out = scratch["root"], tmp_path / "out"
    argv = ["--repo", str(root), "--out", str(out), "--tracking-uri", scratch["uri"], "--experiments", "exp-a", "exp-b"]
    with pytest.raises(SystemExit) as done:
        study.main(argv)
    assert done.value.code == 0, capsys.readouterr().err
    text = (out / "STUDY.md").read_text()
    assert f"`cvfp study --repo {root} --out {out} --tracking-uri {scratch['uri']} --experiments exp-a exp-b`" in text
    assert "workspace" not in table_rows(text)["header"][0] and len(table_rows(text)) == 3
    capsys.readouterr()

    empty = tmp_path / "empty"  # a DVC repository where nothing has run
    empty.mkdir()
    sh(["git", "init", "-q"], empty, scratch["env"])
    sh(["dvc", "init", "-q"], empty, scratch["env"])
    failures = {
        "no experiment named 'nosuch'": argv[:6] + ["--experiments", "nosuch"],
        "not inside of a DVC repository": ["--repo", str(tmp_path / "out"), "--out", str(out)],
        "no experiments with metrics in": ["--repo", str(empty), "--out", str(out)],
    }
    for message, args in failures.items():
        with pytest.raises(SystemExit) as done:
            study.main(args)
        err = capsys.readouterr().err
        assert done.value.code == 2 and message in err and err.count("\n") == 1, err
    monkeypatch.setenv("PATH", str(tmp_path))  # no dvc on PATH
    with pytest.raises(SystemExit) as done:
        study.main(["--repo", str(root)])
    assert done.value.code == 2 and capsys.readouterr().err == "error: dvc not found on PATH (pip install dvc)\n"


def test_unreadable_exp_show_json_is_a_study_error():
    with pytest.raises(study.StudyError, match="unreadable JSON"):
        study.records_from_exp_show("{not json")
    with pytest.raises(study.StudyError, match="not a list"):
        study.records_from_exp_show(json.dumps({"rev": "workspace"}))
    assert study.records_from_exp_show(textwrap.dedent("""\
        [{"rev": "workspace", "name": null, "data": {"params": {}, "metrics":
          {"metrics/eval.json": {"error": {"type": "FileNotFoundError", "msg": "no such file"}}}},
          "error": null, "experiments": null}]"""))[0]["missing"] == ["metrics/eval.json: FileNotFoundError: no such file"]
