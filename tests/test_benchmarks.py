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
    phase1 = written["phase1"]
    # two references, each labelled: the original algorithm (one step per iteration) and seed 004's per-token loop
    original = phase1["reference_original"]
    for key in ("iteration0_seconds_per_token", "iteration0_seconds_extrapolated", "parallel_iteration_seconds",
                "total_seconds_extrapolated"):
        assert original[key] > 0, key
    assert original["iteration0_tokens_timed"] == 64 and original["parallel_iteration_tokens"] == 1024
    assert "original code" in original["algorithm"] and "seed 004" in phase1["reference"]["algorithm"]
    for key in ("ratio_vs_original", "iteration0_ratio_vs_original", "parallel_iteration_ratio_vs_original",
                "ratio_vs_seed004_loop", "parallel_iteration_ratio_vs_seed004_loop"):
        assert phase1[key] > 0, key
    assert phase1["ratio_vs_seed004_loop"] == phase1["ratio"]
    assert original["total_seconds_extrapolated"] == pytest.approx(
        original["iteration0_seconds_extrapolated"] + 9 * original["parallel_iteration_seconds"])
    assert phase1["ratio_vs_original"] == pytest.approx(
        original["total_seconds_extrapolated"] / phase1["total_seconds"])
    assert written["targets"]["phase1_ratio"]["against"].startswith("seed-004")
    header = written["table"].splitlines()[0]
    assert "original algorithm" in header and "ours ÷ original" in header and "per-token loop" in header
    for key in ("tokens_per_second", "max_abs_diff_vs_plain", "ratio", "reference"):
        assert key in written["cstar"], key
    for key in ("train_tokens_per_second", "train_mfu", "eval_tokens_per_second", "train_ratio", "eval_ratio"):
        assert key in written["phase2"], key
    assert written["cstar"]["max_abs_diff_vs_plain"] <= 1e-5
    assert set(written["targets"]) == set(bench.TARGETS)
    assert written["peak"]["tflops"] > 0 and written["phase1"]["parallel_mfu"] > 0
    assert written["command"].startswith("python benchmarks/bench.py --blocks 2")


def test_original_reference_makes_the_pipelines_update_per_iteration(bench):
    """The original-algorithm reference: its two timed iterations leave the weights where two jacobi_steps do."""
    import copy

    import torch
    from common import build_model, model_section, prepare_phase1
    from cvfp import phase1
    from cvfp.params import Phase1Params

    device = torch.device("cpu")
    model = build_model(model_section(2, 8), 64, 0, device)
    original = copy.deepcopy(model)
    ids = torch.randint(0, 64, (96,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        embeddings = model.embed(ids)
        previous = model.scan(embeddings)
    params = Phase1Params(batch_tokens=96)
    got = bench.original_phase1_iteration(original, embeddings, previous, 16, device, params, repeats=1)
    assert got["iteration0_tokens_timed"] == 16 and got["parallel_iteration_seconds"] > 0
    optimizer = torch.optim.Adam(prepare_phase1(model), lr=params.lr)
    diversity = phase1.DiversityLoss(params.diversity, params.ema_momentum)
    state = previous
    for _ in range(2):  # warm-up + one timed repeat
        state, _, skipped = phase1.jacobi_step(model, embeddings, state, diversity, params, optimizer=optimizer)
        assert not skipped
    def gap(x, y):
        return max(float((a - b).detach().abs().max()) for a, b in zip(x.parameters(), y.parameters()))

    assert gap(model, original) < 1e-5
    assert gap(model.blocks, build_model(model_section(2, 8), 64, 0, device).blocks) > 1e-4  # both did train


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
