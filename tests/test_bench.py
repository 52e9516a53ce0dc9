import copy
import json

import pytest
import torch

import cvfp.cstar as cstar
import cvfp.fast as fast
import cvfp.phase1 as phase1
import cvfp.phase2 as phase2
from cvfp import bench
from cvfp.model import CVFPModel, ModelArgs
from cvfp.params import Phase1Params


def tiny_model(seed=0, **overrides):
    torch.manual_seed(seed)
    args = dict(vocab_size=40, context_dim=6, embed_dim=4, hidden_dim=10, layer_structure=[1, 2])
    args.update(overrides)
    return CVFPModel(ModelArgs(**args))


@pytest.fixture
def fast_on_cpu(monkeypatch):
    """The CUDA fast paths, run on the CPU: compiled with a backend that needs no C++ build."""
    monkeypatch.setenv("CVFP_FAST", "1")
    monkeypatch.setattr(fast, "COMPILE_BACKEND", "aot_eager")


def test_bench_runs_tiny_and_writes_every_key(tmp_path):
    out = tmp_path / "bench.json"
    report = bench.main(["--blocks", "2", "--dim", "8", "--vocab", "64", "--tokens", "1024", "--ref-tokens", "16",
                         "--ref-scan-tokens", "64", "--repeats", "1", "--scan-repeats", "1", "--p2-batch", "256",
                         "--eval-batch", "512", "--json", str(out)])
    written = json.loads(out.read_text())
    assert written["errors"] == {} and report["errors"] == {}
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


def test_fast_paths_apply_to_cuda_only_unless_forced(monkeypatch):
    monkeypatch.delenv("CVFP_FAST", raising=False)
    assert fast.enabled("cuda") and not fast.enabled("cpu")
    monkeypatch.setenv("CVFP_FAST", "0")
    assert not fast.enabled("cuda")
    model = tiny_model()
    assert fast.step_function(model) == model.step  # plain on the CPU: CPU numbers never move


@pytest.mark.parametrize("diversity", ["global_deviation", "ema_variance"])
@pytest.mark.parametrize("recon", [0.0, 0.5])
def test_single_pass_step_equals_two_pass(fast_on_cpu, monkeypatch, diversity, recon):
    embeddings, previous = torch.randn(23, 4), torch.randn(23, 6)
    results = []
    for flag in ("0", "1"):  # plain two passes, then the compiled single pass
        monkeypatch.setenv("CVFP_FAST", flag)
        model = tiny_model(decoder=recon > 0)
        p = Phase1Params(batch_tokens=32, diversity=diversity, recon_weight=recon, lr=1e-3)
        optimizer = fast.adam(list(model.parameters()), 1e-3, embeddings.device)  # fused on the fast path
        assert optimizer.defaults["fused"] == (flag == "1")
        loss = phase1.DiversityLoss(diversity, p.ema_momentum)
        contexts, values, skipped = phase1.train_step(model, optimizer, embeddings, previous, loss, p)
        assert not skipped
        # a compiled backward returns zeros where eager leaves None (the last token_norm feeds no loss)
        results.append((contexts, values, {n: torch.zeros_like(q) if q.grad is None else q.grad.clone()
                                           for n, q in model.named_parameters() if q.requires_grad},
                        [q.detach().clone() for q in model.parameters()]))
    (c0, v0, g0, w0), (c1, v1, g1, w1) = results
    torch.testing.assert_close(c1, c0)
    assert v0.keys() == v1.keys()
    for key in v0:
        assert v1[key] == pytest.approx(v0[key], rel=1e-5, abs=1e-7), key
    assert g0.keys() == g1.keys() and any(g.abs().sum() > 0 for g in g0.values())
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], atol=1e-6, rtol=1e-5)
    for a, b in zip(w1, w0):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_fused_step_skips_a_non_finite_loss_on_the_device(fast_on_cpu):
    """The compiled single pass with fused Adam: a NaN loss leaves weights and Adam moments untouched."""
    model = tiny_model()
    p = Phase1Params(batch_tokens=32, lr=1e-2)
    optimizer = fast.adam(list(model.parameters()), p.lr, "cpu")
    embeddings, previous = torch.randn(23, 4), torch.randn(23, 6)
    phase1.train_step(model, optimizer, embeddings, previous, phase1.DiversityLoss(p.diversity, 0.99), p)
    weights = copy.deepcopy(model.state_dict())
    moments = copy.deepcopy(optimizer.state_dict()["state"])
    previous[3, 2] = float("nan")  # the CVFP loss becomes NaN
    _, values, skipped = phase1.train_step(model, optimizer, embeddings, previous,
                                           phase1.DiversityLoss(p.diversity, 0.99), p)
    assert skipped and values["total_loss"] != values["total_loss"]
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, weights[name]), name
    for index, state in optimizer.state_dict()["state"].items():
        for key, tensor in state.items():
            assert torch.equal(tensor, moments[index][key]), (index, key)  # the step counter included


def test_compiled_parallel_pass_equals_plain(fast_on_cpu):
    model = tiny_model()
    embeddings, inputs = torch.randn(17, 4), torch.randn(17, 6)
    got = phase1.parallel_pass(model, embeddings, inputs, chunk=5)
    expected = model.step(inputs, embeddings)[0].detach()
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("context_mode", ["stability", "replace"])
def test_compiled_phase2_losses_equal_plain(fast_on_cpu, monkeypatch, context_mode):
    model = tiny_model()
    phase2.init_head_(model, seed=1)
    plain_model = copy.deepcopy(model)
    ids, cstar_ = torch.randint(0, 40, (30,)), torch.randn(30, 6)
    positions = torch.tensor([0, 3, 9, 28])
    got = phase2.batch_losses(model, ids, cstar_, positions, context_mode, 0.7)
    got["loss"].backward()
    monkeypatch.setenv("CVFP_FAST", "0")
    expected = phase2.batch_losses(plain_model, ids, cstar_, positions, context_mode, 0.7)
    expected["loss"].backward()
    for key in expected:
        torch.testing.assert_close(got[key].detach(), expected[key].detach())
    for a, b in zip(model.parameters(), plain_model.parameters()):
        if b.grad is not None:
            torch.testing.assert_close(a.grad, b.grad)
        elif a.grad is not None:
            assert not a.grad.any()


def test_a_failing_compile_falls_back_to_the_plain_function(fast_on_cpu, monkeypatch):
    def broken_backend(graph, example_inputs):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(fast, "COMPILE_BACKEND", broken_backend)
    model = tiny_model()
    step = fast.compiled(model, "broken_step", model.step)
    context, token = torch.randn(3, 6), torch.randn(3, 4)
    with pytest.warns(UserWarning, match="running it uncompiled"):
        got = step(context, token)
    torch.testing.assert_close(got[0], model.step(context, token)[0])
    assert step.failed


def test_bf16_stream_step_stays_within_bf16_rounding_of_the_plain_step(fast_on_cpu, monkeypatch):
    model = tiny_model(context_dim=16, embed_dim=16, hidden_dim=32, layer_structure=[1] * 3)
    embeddings, inputs = torch.randn(64, 16), torch.randn(64, 16)
    got = phase1.parallel_pass(model, embeddings, inputs, chunk=64, precision="bf16")
    assert got.dtype == torch.float32
    monkeypatch.setenv("CVFP_FAST", "0")
    autocast_only = phase1.parallel_pass(model, embeddings, inputs, chunk=64, precision="bf16")
    exact = phase1.parallel_pass(model, embeddings, inputs, chunk=64, precision="fp32")
    scale = exact.norm()
    assert (got - exact).norm() / scale < 2e-2  # bf16 operands: relative error between 1e-3 and 1e-2
    assert (autocast_only - exact).norm() / scale < 2e-2


def test_phase2_training_on_the_fast_path_equals_plain(fast_on_cpu, monkeypatch):
    """train_phase2 end to end: compiled losses and fused Adam (CVFP_FAST=1) against the plain path."""
    from test_phase2 import CONTEXT, stream
    from test_phase2 import tiny_model as phase2_model

    from cvfp.params import Phase2Params

    ids, val_ids = stream(60), stream(30, seed=2)
    generator = torch.Generator().manual_seed(4)
    cstar, val_cstar = torch.randn(60, CONTEXT, generator=generator), torch.randn(30, CONTEXT, generator=generator)
    runs = []
    for flag in ("0", "1"):
        monkeypatch.setenv("CVFP_FAST", flag)
        model = phase2_model()
        result = phase2.train_phase2(model, ids, cstar, val_ids, val_cstar, 100, Phase2Params(epochs=3, batch_size=8),
                                     seed=0, log=lambda _: None)
        runs.append((result.summary, model.state_dict()))
    (plain, plain_state), (fast_summary, fast_state) = runs
    assert plain["epochs_run"] == fast_summary["epochs_run"] == 3
    for key, value in plain.items():
        if isinstance(value, float):
            assert fast_summary[key] == pytest.approx(value, rel=1e-5, abs=1e-7), key
        else:
            assert fast_summary[key] == value, key
    for name, tensor in plain_state.items():
        torch.testing.assert_close(fast_state[name], tensor, rtol=1e-4, atol=1e-6, msg=name)
