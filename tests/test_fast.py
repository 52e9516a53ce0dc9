"""The fast paths (cvfp.fast) against the plain code: each compiled or fused variant gives the plain numbers.

On the CPU the fast paths are forced on (CVFP_FAST=1) and compiled with inductor's `aot_eager`
backend, which captures the same graphs without a C++ build.
"""

import copy

import pytest
import torch

import cvfp.fast as fast
import cvfp.phase1 as phase1
import cvfp.phase2 as phase2
from cvfp.params import Phase1Params, Phase2Params
from helpers import VOCAB, tiny_model
from helpers import stream as periodic_stream

PHASE2_VOCAB = VOCAB  # ids of the periodic toy stream lie in [0, VOCAB)


@pytest.fixture
def fast_on_cpu(monkeypatch):
    """The CUDA fast paths, run on the CPU: compiled with a backend that needs no C++ build."""
    monkeypatch.setenv("CVFP_FAST", "1")
    monkeypatch.setattr(fast, "COMPILE_BACKEND", "aot_eager")


def test_fast_paths_apply_to_cuda_only_unless_forced(monkeypatch):
    monkeypatch.delenv("CVFP_FAST", raising=False)
    assert fast.enabled("cuda") and not fast.enabled("cpu")
    monkeypatch.setenv("CVFP_FAST", "0")
    assert not fast.enabled("cuda")
    model = tiny_model()
    assert fast.step_function(model) == model.step  # plain on the CPU: CPU numbers never move


def test_fast_options_choose_the_variant(fast_on_cpu):
    """A FastOptions value, not a module global, picks the variant: bf16 stream, fused step, compile mode."""
    model = tiny_model()
    parameters = list(model.parameters())
    assert fast.adam(parameters, 1e-3, "cpu").defaults["fused"]
    assert not fast.adam(parameters, 1e-3, "cpu", fast.FastOptions(fused_step=False)).defaults["fused"]
    assert fast.step_function(model, "bf16").name == "step_bf16_stream"
    assert fast.step_function(model, "bf16", fast.FastOptions(bf16_stream=False)).name == "step"
    autotuned = fast.FastOptions(compile_mode="max-autotune-no-cudagraphs")
    assert fast.compiled(model, "step", model.step, autotuned) is not fast.compiled(model, "step", model.step)
    assert fast.compiled(model, "step", model.step) is fast.step_function(model)  # one compiled copy per variant


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
        contexts, values, skipped = phase1.jacobi_step(model, embeddings, previous, loss, p, optimizer=optimizer)
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
    phase1.jacobi_step(model, embeddings, previous, phase1.DiversityLoss(p.diversity, 0.99), p, optimizer=optimizer)
    weights = copy.deepcopy(model.state_dict())
    moments = copy.deepcopy(optimizer.state_dict()["state"])
    previous[3, 2] = float("nan")  # the CVFP loss becomes NaN
    _, values, skipped = phase1.jacobi_step(model, embeddings, previous,
                                            phase1.DiversityLoss(p.diversity, 0.99), p, optimizer=optimizer)
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
    model.init_head_(seed=1)
    plain_model = copy.deepcopy(model)
    ids, cstar_ = torch.randint(0, 40, (30,)), torch.randn(30, 6)
    positions = torch.tensor([0, 3, 9, 28])
    got = phase2.phase2_losses(model, ids, cstar_, positions, context_mode, 0.7)
    got["objective"].backward()  # what training back-propagates
    monkeypatch.setenv("CVFP_FAST", "0")
    expected = phase2.phase2_losses(plain_model, ids, cstar_, positions, context_mode, 0.7)
    expected["objective"].backward()
    assert set(got) == set(expected) == {"objective", "loss", "stability", "logits"}
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


def assert_same_summary(got, want, where="summary"):
    """Floats within float32 rounding, everything else exactly, nested sections included."""
    assert got.keys() == want.keys(), where
    for key, value in want.items():
        if isinstance(value, dict):
            assert_same_summary(got[key], value, f"{where}.{key}")
        elif isinstance(value, float):
            assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-7), f"{where}.{key}"
        else:
            assert got[key] == value, f"{where}.{key}"


def test_phase2_training_on_the_fast_path_equals_plain(fast_on_cpu, monkeypatch):
    """train_phase2 end to end: compiled losses and fused Adam (CVFP_FAST=1) against the plain path."""
    ids, val_ids = periodic_stream(60), periodic_stream(30, seed=2)
    generator = torch.Generator().manual_seed(4)
    cstar, val_cstar = torch.randn(60, 6, generator=generator), torch.randn(30, 6, generator=generator)
    val_scored = val_ids[1:] != 0  # target 0 plays a marker: not scored, 0 bytes
    val_target_bytes = torch.where(val_scored, 1 + val_ids[1:] % 3, 0)
    runs = []
    for flag in ("0", "1"):
        monkeypatch.setenv("CVFP_FAST", flag)
        model = tiny_model(vocab_size=PHASE2_VOCAB)
        result = phase2.train_phase2(model, ids, cstar, val_ids, val_cstar, val_scored, val_target_bytes,
                                     Phase2Params(epochs=3, batch_size=8), seed=0, log=lambda _: None)
        runs.append((result.summary, model.state_dict()))
    (plain, plain_state), (fast_summary, fast_state) = runs
    assert plain["epochs_run"] == fast_summary["epochs_run"] == 3
    assert plain["best"]["val_predictions"] == int(val_scored.sum()) < 29
    assert_same_summary(fast_summary, plain)
    for name, tensor in plain_state.items():
        torch.testing.assert_close(fast_state[name], tensor, rtol=1e-4, atol=1e-6, msg=name)
