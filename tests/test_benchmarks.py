"""The benchmark scripts (benchmarks/bench.py, benchmarks/bench_parallel.py) run at tiny sizes and write every number."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"


def script_env():
    """The environment a benchmark runs in: one thread per process, no fast-path override, quiet progress."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CVFP_FAST")}
    env.update(OMP_NUM_THREADS="1", CVFP_NO_PROGRESS="1")
    return env


def python(script, args, cwd):
    return subprocess.run([sys.executable, str(BENCHMARKS / script), *args], cwd=cwd, env=script_env(),
                          capture_output=True, text=True, timeout=600)


def torchrun(script, args, cwd, nproc):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               str(BENCHMARKS / script), *args]
    return subprocess.run(command, cwd=cwd, env=script_env(), capture_output=True, text=True, timeout=600)


@pytest.fixture
def bench(monkeypatch):
    """benchmarks/bench.py imported by path (with its folder on sys.path, as when it runs as a script)."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location("bench", BENCHMARKS / "bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_runs_tiny_and_writes_every_key(tmp_path, bench):
    out = tmp_path / "bench.json"
    done = python("bench.py", ["--blocks", "2", "--dim", "8", "--vocab", "64", "--tokens", "1024", "--ref-tokens", "16",
                               "--ref-scan-tokens", "64", "--repeats", "1", "--scan-repeats", "1", "--p2-batch", "256",
                               "--eval-batch", "512", "--json", str(out)], ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "error in" not in done.stdout and f"wrote {out}" in done.stdout
    written = json.loads(out.read_text())
    assert written["errors"] == {}
    for key in ("command", "date", "device", "torch", "config", "flops", "peak", "phase1", "cstar", "phase2", "gru",
                "targets", "table"):
        assert key in written, key
    for key in ("iteration0_seconds", "parallel_iteration_seconds", "token_iterations_per_second", "parallel_mfu",
                "total_mfu", "ratio", "reference"):
        assert key in written["phase1"], key
    for key in ("tokens_per_second", "max_abs_diff_vs_plain", "ratio", "reference"):
        assert key in written["cstar"], key
    for key in ("train_tokens_per_second", "train_mfu", "eval_tokens_per_second", "train_ratio", "eval_ratio"):
        assert key in written["phase2"], key
    assert written["cstar"]["max_abs_diff_vs_plain"] <= 1e-5
    assert set(written["targets"]) == set(bench.TARGETS)
    assert written["peak"]["tflops"] > 0 and written["phase1"]["parallel_mfu"] > 0
    assert written["command"].startswith("python benchmarks/bench.py --blocks 2")


def test_parallel_bench_runs_at_one_and_two_processes_and_compares(tmp_path):
    tiny = ["--blocks", "2", "--dim", "8", "--vocab", "64", "--tokens", "512", "--p2-batch", "128", "--repeats", "1"]
    for nproc in (1, 2):
        done = torchrun("bench_parallel.py", [*tiny, "--json", str(tmp_path / f"{nproc}.json")], tmp_path, nproc)
        assert done.returncode == 0, done.stderr[-3000:]
    two = json.loads((tmp_path / "2.json").read_text())
    assert (two["world_size"], two["backend"]) == (2, "gloo")
    assert two["phase1"]["tokens_per_rank"] == 256 and two["phase2"]["batch_per_rank"] == 64
    assert two["phase1"]["parallel_iteration_seconds"] > 0 and two["phase2"]["train_tokens_per_second"] > 0
    done = python("bench_parallel.py", ["--compare", str(tmp_path / "2.json"), str(tmp_path / "1.json")], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [line for line in done.stdout.splitlines() if line.startswith("| 1 |") or line.startswith("| 2 |")]
    assert len(rows) == 2 and rows[0].count("100.0%") == 2  # one process is the efficiency's baseline


def test_parallel_bench_check_finds_the_gradients_equal(tmp_path):
    tiny = ["--check", "--blocks", "2", "--dim", "8", "--vocab", "64", "--tokens", "258", "--p2-batch", "4096"]
    done = torchrun("bench_parallel.py", tiny, tmp_path, 2)
    assert done.returncode == 0, done.stderr[-3000:]
    errors = [float(line.split("relative error ")[1].split()[0]) for line in done.stdout.splitlines()
              if "relative error" in line]
    assert len(errors) == 2 and all(error < 1e-5 for error in errors), done.stdout
