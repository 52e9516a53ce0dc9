"""Warm stage start (cvfp.warm): a stage forked from the warm server behaves as the process DVC started.

Each test runs a small stage script of its own through `run_stage`, as `python <script>`, warm (the default)
and, where the comparison matters, cold (CVFP_WARM_START=0). The byte-identity of a whole pipeline run warm
and cold is tests/test_pipeline.py::test_forced_rerun_gives_identical_outputs.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import socket_names_around_an_edit

from cvfp import warm

REPO = Path(__file__).resolve().parents[1]

PROBE = '''
import json, os, sys
from cvfp.errors import StageError
from cvfp.stage import run_stage


def body(params, run):
    mode = sys.argv[1]
    parent = open(f"/proc/{os.getppid()}/cmdline").read().split("\\0")
    if mode == "report":
        print(json.dumps({"pid": os.getpid(), "parent": parent, "argv": sys.argv, "cwd": os.getcwd(),
                          "probe": os.environ.get("PROBE"), "torch_before_body": "torch" in sys.modules,
                          "umask": os.umask(0o022),
                          "seed": params.seed}))
        print("to stderr", file=sys.stderr)
    elif mode == "known-error":
        raise StageError("the probe's input is bad")
    elif mode == "crash":
        raise RuntimeError("a bug in the probe")
    elif mode == "exit":
        sys.exit(int(sys.argv[2]))
    elif mode == "sleep":
        with open("started", "w") as handle:
            handle.write(str(os.getpid()))
        import time
        time.sleep(120)


if __name__ == "__main__":
    run_stage("probe", body)
'''


@pytest.fixture
def probe(tmp_path):
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_", "CVFP_WARM"))}
    env.update(DVC_ROOT=str(tmp_path), CVFP_NO_PROGRESS="1")

    def run(*args, cold=False, umask=0o022, **extra):
        return subprocess.run([sys.executable, str(script), *args], cwd=tmp_path, capture_output=True, text=True,
                              timeout=300, env={**env, **extra, **({warm.WARM_ENV: "0"} if cold else {})},
                              preexec_fn=lambda: os.umask(umask))

    run.env, run.script = env, script
    return run


def test_a_stage_runs_in_a_child_of_the_warm_server_with_its_argv_env_folder_and_pipes(probe, tmp_path):
    first = probe("report", "x", PROBE="seen")
    assert first.returncode == 0, first.stderr
    report = json.loads(first.stdout.splitlines()[-1])
    assert "cvfp.warm" in report["parent"] and "--serve" in report["parent"]
    assert report["argv"][1:] == ["report", "x"] and report["probe"] == "seen" and report["cwd"] == str(tmp_path)
    assert report["torch_before_body"]  # the server had imported it
    assert "to stderr" in first.stderr and "to stderr" not in first.stdout
    cold = probe("report", "x", PROBE="seen", cold=True)
    cold_report = json.loads(cold.stdout.splitlines()[-1])
    assert "cvfp.warm" not in cold_report["parent"] and cold_report["seed"] == report["seed"]
    again = json.loads(probe("report", "y", umask=0o002).stdout.splitlines()[-1])
    assert again["parent"] == report["parent"] and again["pid"] != report["pid"]  # one server, a child per stage
    assert (report["umask"], again["umask"]) == (0o022, 0o002)  # the stage process's, not the server's


@pytest.mark.parametrize("mode, args, code, message", [
    ("known-error", [], 2, "error in stage 'probe': the probe's input is bad"),
    ("crash", [], 1, "RuntimeError: a bug in the probe"),
    ("exit", ["3"], 3, ""),
])
def test_exit_codes_and_errors_are_the_cold_ones(probe, mode, args, code, message):
    served, cold = probe(mode, *args), probe(mode, *args, cold=True)
    assert served.returncode == cold.returncode == code
    assert message in served.stderr and message in cold.stderr


def test_bad_params_fail_the_same_way_warm(probe, tmp_path):
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text().replace("seed:", "seed: x\nunused:", 1))
    served = probe("report")
    assert served.returncode == 2 and "error in stage 'probe'" in served.stderr and "seed" in served.stderr


def _wait_for(path, seconds=120):
    deadline = time.monotonic() + seconds
    while not path.is_file() or not path.read_text():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)
    return int(path.read_text())


def _gone(pid, seconds=30):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            return True
        if state == "Z":
            return True
        time.sleep(0.05)
    return False


@pytest.mark.parametrize("number", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_to_the_stage_process_reaches_the_stage(probe, tmp_path, number):
    process = subprocess.Popen([sys.executable, str(probe.script), "sleep"], cwd=tmp_path, env=probe.env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    child = _wait_for(tmp_path / "started")
    assert child != process.pid
    process.send_signal(number)
    out, err = process.communicate(timeout=60)
    assert _gone(child)
    assert process.returncode != 0
    if number == signal.SIGINT:  # the stage itself got it: run_stage closed its run as failed, as a cold one does
        assert "KeyboardInterrupt" in err
        journal = (tmp_path / ".cvfp" / "journal" / "workspace" / "probe.jsonl").read_text().splitlines()
        assert json.loads(journal[-1]) == {**json.loads(journal[-1]), "op": "close", "failed": True}
    else:
        assert process.returncode == -signal.SIGTERM  # as a cold stage killed by SIGTERM


def test_a_killed_stage_process_takes_its_child_along(probe, tmp_path):
    process = subprocess.Popen([sys.executable, str(probe.script), "sleep"], cwd=tmp_path, env=probe.env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    child = _wait_for(tmp_path / "started")
    process.kill()
    process.wait()
    assert _gone(child)


def test_an_edited_library_gets_a_server_of_its_own(tmp_path):
    names = socket_names_around_an_edit(tmp_path, "cvfp.warm.server_name", "phase1.py", {"OMP_NUM_THREADS": "7"})
    assert len(set(names)) == 3  # before, after the edit, and after it under another import-time environment


def test_the_server_imports_and_runs_nothing():
    """After preload: no tensor was made by it, no random number drawn, one thread for torch; CUDA untouched."""
    script = ("import random, torch\nstate = torch.get_rng_state().clone(); r = random.getstate()\n"
              "from cvfp.warm import preload\npreload()\n"
              "print(torch.equal(state, torch.get_rng_state()), r == random.getstate(),"
              " torch.cuda.is_initialized())")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["True", "True", "False"]


def test_a_stage_run_by_a_driver_script_runs_in_the_driver(probe, tmp_path):
    """`runpy` from another script (several stages in one interpreter) is not handed over: the driver goes on."""
    driver = ("import runpy, sys\nsys.argv = ['driver', 'report']\n"
              f"for _ in range(2):\n    runpy.run_path({str(probe.script)!r}, run_name='__main__')\n"
              "print('driver done')")
    done = subprocess.run([sys.executable, "-c", driver], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env=probe.env)
    assert done.returncode == 0, done.stderr
    reports = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert len(reports) == 2 and "driver done" in done.stdout
    assert all("cvfp.warm" not in report["parent"] for report in reports)


def test_cvfp_servers_lists_the_warm_server_and_stops_it(probe):
    assert probe("report").returncode == 0  # a warm stage: its server is up
    listed = subprocess.run(["cvfp", "servers"], capture_output=True, text=True, check=True).stdout
    name = warm.server_name()
    line = next(row for row in listed.splitlines() if name in row)
    server = int(line.split()[0])
    assert "warm stage server" in line and "--serve" in Path(f"/proc/{server}/cmdline").read_text()
    stopped = subprocess.run(["cvfp", "servers", "--stop"], capture_output=True, text=True, check=True).stdout
    assert "stopped" in stopped and _gone(server)
    assert probe("report").returncode == 0  # the next stage starts a new one
