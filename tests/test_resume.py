"""Reliability: a killed Phase 1/2 resumes to the same result; changed params start fresh; divergence stops."""

import io
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import write_params

import cvfp.phase1 as phase1
import cvfp.phase2 as phase2
from cvfp.params import Params, Phase1Params, Phase2Params
from cvfp.resume import checkpointer, fingerprint, load_resume_state
from cvfp.errors import StageError
from helpers import CONTEXT, VOCAB, all_scored, labelled, stream, tiny_model

REPO = Path(__file__).resolve().parents[1]


def quiet(_):
    pass


def roundtrip(state):
    """What a checkpoint file gives back: torch.save, then torch.load(weights_only=True)."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def untimed(rows):
    return [{k: v for k, v in row.items() if not k.endswith("seconds")} for row in rows]


def phase1_params(**overrides):
    base = dict(max_iterations=6, batch_tokens=7, min_converged_ratio=1.0, effective_rank_samples=0,
                diversity="ema_variance", lr=0.01)
    base.update(overrides)
    return Phase1Params(**base)


def test_phase1_resumes_bitwise_from_a_checkpoint():
    ids = torch.randint(0, 40, (23,), generator=torch.Generator().manual_seed(3))
    states = []
    full = phase1.train_phase1(tiny_model1(), ids, ids[:11], phase1_params(), seed=0, log=quiet,
                               checkpoint=lambda state: states.append(roundtrip(state)))
    assert [s["iteration"] for s in states] == [0, 1, 2, 3, 4]  # never after the last iteration
    lines = []
    torch.manual_seed(999)  # the global RNG is restored from the checkpoint, whatever it is now
    resumed = phase1.train_phase1(tiny_model1(seed=5), ids, ids[:11], phase1_params(), seed=0, log=lines.append,
                                  resume_state=states[2])
    assert any("resuming from iteration 3" in line for line in lines)
    assert resumed.summary == full.summary
    assert untimed(resumed.history) == untimed(full.history)
    assert torch.equal(resumed.train_contexts, full.train_contexts)
    assert torch.equal(resumed.val_contexts, full.val_contexts)


def test_phase2_resumes_bitwise_from_a_checkpoint():
    ids, val_ids = stream(60), stream(30, seed=2)
    cstar, val_cstar = torch.randn(60, CONTEXT), torch.randn(30, CONTEXT)
    params = Phase2Params(epochs=4, batch_size=8, lr=0.01, patience=4)
    states = []
    full_model = tiny_model2()
    val_scored, val_target_bytes = labelled(val_ids)
    full = phase2.train_phase2(full_model, ids, cstar, val_ids, val_cstar, val_scored, val_target_bytes, params, seed=0,
                               log=quiet, checkpoint=lambda state: states.append(roundtrip(state)))
    assert [s["epoch"] for s in states] == [1, 2, 3]
    lines = []
    torch.manual_seed(999)
    resumed_model = tiny_model2()
    resumed = phase2.train_phase2(resumed_model, ids, cstar, val_ids, val_cstar, val_scored, val_target_bytes, params,
                                  seed=0, log=lines.append, resume_state=states[1])
    assert any("resuming from epoch 3" in line for line in lines)
    assert resumed.summary == full.summary
    assert untimed(resumed.history) == untimed(full.history)
    for key, value in full_model.state_dict().items():
        assert torch.equal(resumed_model.state_dict()[key], value), key


def test_changed_params_are_not_resumed(tmp_path):
    path = tmp_path / "phase1.resume.pt"
    params = Params()
    current = fingerprint(params, ("seed", "model", "phase1"), {"train": "abc"})
    assert "phase1.checkpoint_interval" not in current  # saving more often does not change the result
    checkpointer(path, current)({"state_dict": {"w": torch.ones(2)}, "iteration": 1})
    assert load_resume_state(path, "phase1", current, log=quiet)["iteration"] == 1

    changed = Params.model_validate({"phase1": {"lr": 0.5}})
    lines = []
    assert load_resume_state(path, "phase1", fingerprint(changed, ("seed", "model", "phase1"), {"train": "abc"}),
                             log=lines.append) is None
    assert "phase1.lr" in lines[0] and "starting fresh" in lines[0]
    lines.clear()
    assert load_resume_state(path, "phase1", {**current, "input.train": "def"}, log=lines.append) is None
    assert "input.train" in lines[0]
    path.write_bytes(b"garbage")
    lines.clear()
    assert load_resume_state(path, "phase1", current, log=lines.append) is None
    assert "starting fresh" in lines[0]


def test_phase1_divergence_stops_naming_the_iteration(monkeypatch):
    real = phase1.context_losses

    def poisoned(contexts, previous, diversity, weight):
        losses = real(contexts, previous, diversity, weight)
        if contexts.requires_grad:
            losses["total_loss"] = losses["total_loss"] * float("nan")
        return losses

    monkeypatch.setattr(phase1, "context_losses", poisoned)
    ids = torch.randint(0, 40, (20,))
    saved = []
    with pytest.raises(StageError, match=r"iteration 2 .*max_nonfinite_steps=2"):
        phase1.train_phase1(tiny_model1(), ids, ids[:10], phase1_params(max_nonfinite_steps=2), seed=0, log=quiet,
                            checkpoint=saved.append)
    assert [s["iteration"] for s in saved] == [0]  # the last good state; none written while diverging


def test_phase2_divergence_stops_naming_the_epoch():
    ids = stream(40)
    cstar = torch.full((40, CONTEXT), float("nan"))
    params = Phase2Params(epochs=3, batch_size=8, lr=0.01, patience=3, max_nonfinite_steps=2)
    with pytest.raises(StageError, match=r"epoch 1, batch 2/5"):
        phase2.train_phase2(tiny_model2(), ids, cstar, ids, cstar, *all_scored(ids), params, seed=0, log=quiet)


# ---- the real stage, killed and rerun ----------------------------------------------------------------------------

TINY = {
    "device": "cpu", "data.num_samples": 8, "tokenizer.vocab_size": 320, "carve.val_fraction": 0.3,
    "carve.test_fraction": 0.3,  # train | val | test: each held-out part keeps at least one document
    "model.context_dim": 8, "model.embed_dim": 8, "model.hidden_dim": 16, "model.layer_structure": [1, 1],
    "phase1.max_iterations": 40, "phase1.batch_tokens": 512, "phase1.effective_rank_samples": 0,
    "phase1.min_converged_ratio": 1.0, "phase1.checkpoint_interval": 1,
    # patience = epochs: no early stop, so the stage is still training when it is killed
    "phase2.epochs": 40, "phase2.patience": 40, "phase2.batch_size": 256, "phase2.checkpoint_interval": 1,
}


def script(name):
    return str(REPO / "pipeline" / f"{name}.py")


def stage(root, name, env, **kwargs):
    return subprocess.run([sys.executable, script(name)], cwd=root, env=env,
                          capture_output=True, text=True, timeout=300, **kwargs)


def new_project(base, name, source=None, copied=()):
    """A folder with the TINY params and its own MLflow store; `copied` paths come from the project `source`."""
    root = base / name
    root.mkdir()
    write_params(root / "params.yaml", TINY)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    env.update(CVFP_NO_PROGRESS="1", MLFLOW_TRACKING_URI=f"sqlite:///{root / 'mlflow.db'}")
    for path in copied:
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        copy = shutil.copytree if (source / path).is_dir() else shutil.copy
        copy(source / path, root / path)
    return root, env


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A project holding the inputs of phase1 (data/) and of phase2 (also models/phase1.pt and data/cstar)."""
    root, env = new_project(tmp_path_factory.mktemp("resume"), "inputs")
    stages = [script(name) for name in ("tokenizer", "cache", "carve", "phase1", "cstar")]
    code = f"import runpy\nfor path in {stages!r}:\n    runpy.run_path(path, run_name='__main__')\n"
    done = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]  # the five stages in one interpreter: faster
    return root


def kill_after_first_checkpoint(root, env, name):
    """Start stage `name` in `root` and SIGKILL it as soon as its resume checkpoint exists; return that file."""
    resume_file = root / "models" / f"{name}.resume.pt"
    process = subprocess.Popen([sys.executable, script(name)], cwd=root, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not resume_file.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, f"{name} finished before it could be killed"
    assert resume_file.exists() and not (root / "metrics" / f"{name}.json").exists()
    return resume_file


def assert_killed_stage_resumes(base, inputs, name, copied, outputs, resumed_line):
    """Stage `name` run once uninterrupted and once killed after its first checkpoint and rerun:
    the rerun resumes and its `outputs` are the same bytes; the resume file is gone after both."""
    clean, env = new_project(base, "clean", inputs, copied)
    done = stage(clean, name, env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert not (clean / "models" / f"{name}.resume.pt").exists()  # removed on success

    killed, env = new_project(base, "killed", inputs, copied)
    resume_file = kill_after_first_checkpoint(killed, env, name)
    rerun = stage(killed, name, env)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert resumed_line in rerun.stdout
    for output in outputs:
        assert (killed / output).read_bytes() == (clean / output).read_bytes(), output
    assert not resume_file.exists()


@pytest.mark.slow
def test_killed_phase1_stage_resumes_to_the_same_metrics(tmp_path, inputs):
    assert_killed_stage_resumes(tmp_path, inputs, "phase1", ["data/tokenizer", "data/splits"],
                                ["metrics/phase1.json", "metrics/phase1_iterations.csv", "models/phase1.pt"],
                                "resuming from iteration")


@pytest.mark.slow
def test_killed_phase2_stage_resumes_to_the_same_metrics(tmp_path, inputs):
    assert_killed_stage_resumes(tmp_path, inputs, "phase2", ["data/tokenizer", "data/splits", "data/cstar",
                                                             "models/phase1.pt"],
                                ["metrics/phase2.json", "metrics/phase2_epochs.csv", "models/phase2.pt"],
                                "resuming from epoch")


def tiny_model1(seed=0, **overrides):
    return tiny_model(seed, **{"layer_structure": [1, 1], **overrides})


def tiny_model2(seed=0, **overrides):
    return tiny_model(seed, **{"vocab_size": VOCAB, **overrides})
