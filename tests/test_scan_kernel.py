"""cvfp.kernels: the CPU fallback, the certified Jacobi solve, the Lyapunov estimate, and (on a
Hopper GPU) the fused scan kernel against the fp32 plain step.

Correctness of the kernel is defined per step, teacher-forced: from given contexts, the
kernel's one-step output against the fp32 `model.step` and a float64 reference. Stated
tolerance (fp32 weights): relative error per step vs float64 <= 1e-5 and at most 4x the fp32
plain step's own error + 1e-6; bf16 weights: <= 2e-2. The kernel's fused sums round
differently from cuBLAS, so whole-stream equality is only expected where the scan contracts.
"""

import subprocess
import sys

import pytest
import torch

from cvfp import kernels
from cvfp.kernels import _build, fused
from cvfp.model import CVFPModel, ModelArgs


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny per-token loops: one intra-op thread (with two on a shared 2-core machine they ran ~30x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_model(c=32, e=32, layers=3, mix=1.0, std=0.1, context_scale=None, seed=0, vocab=97):
    """A random CVFP model; `context_scale` shrinks the weights acting on c (a contracting scan)."""
    torch.manual_seed(seed)
    model = CVFPModel(ModelArgs(vocab_size=vocab, context_dim=c, embed_dim=e, hidden_dim=c + e,
                                layer_structure=[1] * layers, layernorm_mix=mix, init_std=std))
    with torch.no_grad():
        for block in model.blocks:
            for layer in block.layers:
                layer.context_norm.weight.uniform_(0.8, 1.2)  # non-trivial affine parameters
                layer.context_norm.bias.uniform_(-0.1, 0.1)
                layer.token_norm.weight.uniform_(0.8, 1.2)
                layer.token_norm.bias.uniform_(-0.1, 0.1)
                if context_scale is not None:
                    layer.fnn.weight[:, :c] *= context_scale
    return model.eval()


def stream(model, n, seed=1, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.args.vocab_size, (n,), generator=gen)
    with torch.no_grad():
        return model.embed(ids.to(device))


# ---------------------------------------------------------------- CPU: selection and fallback

def test_unavailable_on_cpu_with_reason():
    ok, reason = kernels.check("cpu")
    assert not ok and "cpu" in reason and "CUDA" in reason
    assert kernels.available("cpu") is False


def test_import_and_cpu_use_compile_nothing():
    code = ("import torch; from cvfp import kernels; from cvfp.kernels import _build; from cvfp.model import *; "
            "m = CVFPModel(ModelArgs(vocab_size=5, context_dim=4, embed_dim=4, hidden_dim=8)); "
            "kernels.scan(m, torch.randn(3, 4)); kernels.check('cpu'); print(_build.loaded())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_disabled_by_environment(monkeypatch):
    monkeypatch.setenv("CVFP_KERNEL", "0")
    assert kernels.check("cuda") == (False, "disabled by CVFP_KERNEL=0")


def test_cpu_fallback_equals_model_scan_exactly():
    model = make_model(mix=0.5)
    emb = stream(model, 64)
    initial = torch.randn(model.args.context_dim)
    ref_c, ref_x = model.scan(emb, initial=initial, with_token_out=True)
    got_c, got_x = kernels.scan(model, emb, initial=initial, with_token_out=True)
    assert torch.equal(got_c, ref_c) and torch.equal(got_x, ref_x)
    assert fused.last_path.startswith("model.scan (device is cpu")
    assert torch.equal(kernels.scan(model, emb), model.scan(emb))
    with pytest.raises(_build.KernelUnavailable):
        kernels.scan(model, emb, strict=True)


def test_cpu_step_fallback_is_the_batched_step():
    model = make_model()
    emb = stream(model, 16)
    prev = torch.randn(16, model.args.context_dim)
    got = kernels.step(model, prev, emb)
    ref = model.step(prev, emb)
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])


def test_unsupported_shapes_are_named():
    model = make_model(c=30, e=34)
    assert "multiples of 4" in kernels.unsupported(model, stream(model, 4))
    model = make_model()
    assert kernels.unsupported(model, stream(model, 4)) is None
    assert "float32" in kernels.unsupported(model, stream(model, 4).double())


def test_pack_follows_parameter_changes():
    model = make_model()
    first = kernels.pack(model)
    assert kernels.pack(model) is first  # cached
    with torch.no_grad():
        model.blocks[0].layers[0].fnn.weight.add_(1.0)
    second = kernels.pack(model)
    assert second is not first
    assert torch.equal(second["W"][0], model.blocks[0].layers[0].fnn.weight)
    bf16 = kernels.pack(model, "bf16")
    assert bf16["W"].dtype == torch.bfloat16 and bf16["W"].shape == (3, 64, 64)


# ---------------------------------------------------------------- CPU: Jacobi solve

def test_jacobi_certifies_a_contracting_scan_and_matches_model_scan():
    model = make_model(std=0.5, context_scale=0.1)
    emb = stream(model, 384)
    ref = model.scan(emb)
    got, report = kernels.jacobi_scan(model, emb, max_sweeps=60)
    assert report["certified"] and report["fallback_tokens"] == 0
    assert report["residual"] <= report["tol"] == kernels.default_tol(model)
    assert report["sweeps"] < 60
    assert (got - ref).abs().max() < 1e-4  # float32 rounding, not amplified: the map contracts
    # warm-started from the solution: one sweep certifies it
    again, warm_report = kernels.jacobi_scan(model, emb, warm=got)
    assert warm_report["certified"] and warm_report["sweeps"] == 1 and torch.equal(again, got)


def test_jacobi_with_initial_context():
    model = make_model(std=0.5, context_scale=0.1)
    emb = stream(model, 128)
    initial = torch.randn(model.args.context_dim)
    got, report = kernels.jacobi_scan(model, emb, initial=initial)
    assert report["certified"]
    assert (got - model.scan(emb, initial=initial)).abs().max() < 1e-4


def test_jacobi_falls_back_on_a_chaotic_scan_and_says_so():
    model = make_model()  # random init, init_std 0.1: chaotic
    emb = stream(model, 256)
    calls = []

    def sequential(e, init):
        calls.append(e.shape[0])
        return model.scan(e, initial=init)

    got, report = kernels.jacobi_scan(model, emb, max_sweeps=6, sequential=sequential)
    assert not report["certified"] and report["fallback_tokens"] > 0 and report["sweeps"] == 6
    start = report["certified_prefix"]
    assert calls == [256 - start] and start >= 6  # each sweep makes at least one more token exact
    ref = model.scan(emb)
    assert (got[:start] - ref[:start]).abs().max() < 1e-4
    assert torch.equal(got[start:], model.scan(emb[start:], initial=got[start - 1]))


# ---------------------------------------------------------------- CPU: Lyapunov exponent

def test_lyapunov_sign():
    contracting = make_model(std=0.5, context_scale=0.1)
    emb = stream(contracting, 512)
    neg = kernels.lyapunov(contracting, emb, contracting.scan(emb), blocks=8, burn_in=16)
    assert neg["lambda"] < -0.1 and neg["se"] < 0.1 and len(neg["per_block"]) == 8
    # a linear-in-c check: F(c) = LN(c) scaled keeps lambda near 0 for std -> 0 (neutral, not contracting)
    neutral = make_model(std=0.001)
    neu = kernels.lyapunov(neutral, emb, neutral.scan(emb), blocks=8, burn_in=16)
    assert abs(neu["lambda"]) < 0.1


# ---------------------------------------------------------------- GPU: the kernel itself

needs_kernel = pytest.mark.skipif(not torch.cuda.is_available() or not kernels.available("cuda"),
                                  reason="needs a Hopper GPU with nvcc (the fused scan kernel)")


@torch.no_grad()
def step_errors(model, prev, emb, weights="fp32", stats_mode=0):
    """Max over tokens of ||out - ref64|| / ||ref64|| for the kernel and the fp32 plain step (contexts, token_out)."""
    k_c, k_x = kernels.step(model, prev, emb, weights=weights, strict=True, stats_mode=stats_mode)
    p_c, p_x = model.step(prev, emb)
    m64 = make_copy(model).double()
    r_c, r_x = m64.step(prev.double(), emb.double())

    def rel(a, r):
        return float(((a.double() - r).norm(dim=1) / r.norm(dim=1)).max())

    return {"kernel_c": rel(k_c, r_c), "kernel_x": rel(k_x, r_x), "plain_c": rel(p_c, r_c), "plain_x": rel(p_x, r_x),
            "finite": bool(torch.isfinite(k_c).all() and torch.isfinite(k_x).all())}


def make_copy(model):
    clone = CVFPModel(model.args).to(next(model.parameters()).device)
    clone.load_state_dict(model.state_dict())
    return clone.eval()


STATS_MODES = pytest.mark.parametrize("stats_mode", [0, 1])  # scan.cu's two ways to merge the LayerNorm partials


@needs_kernel
@STATS_MODES
@pytest.mark.parametrize("c,e,layers,mix", [(768, 768, 6, 1.0), (64, 64, 3, 0.5), (32, 96, 2, 0.0), (128, 64, 4, 1.0)])
def test_kernel_teacher_forced_step_fp32(c, e, layers, mix, stats_mode):
    model = make_model(c=c, e=e, layers=layers, mix=mix).cuda()
    emb = stream(model, 512, device="cuda")
    # contexts on the plain scan's own trajectory (not with mix 0: without LayerNorm it overflows) and arbitrary ones
    on_path = model.scan(emb[:256]) if mix > 0 else torch.randn(256, c, device="cuda")
    prev = torch.cat([on_path, torch.randn(256, c, device="cuda")])
    err = step_errors(model, prev, emb, stats_mode=stats_mode)
    assert err["finite"]
    for part in ("c", "x"):
        assert err[f"kernel_{part}"] <= 1e-5, err
        assert err[f"kernel_{part}"] <= 4 * err[f"plain_{part}"] + 1e-6, err


@needs_kernel
def test_kernel_teacher_forced_step_bf16():
    model = make_model(c=768, e=768, layers=6).cuda()
    emb = stream(model, 256, device="cuda")
    prev = model.scan(emb)
    err = step_errors(model, prev, emb, weights="bf16")
    assert err["finite"] and err["kernel_c"] <= 2e-2 and err["kernel_x"] <= 2e-2, err


@needs_kernel
@STATS_MODES
def test_kernel_scan_is_its_own_teacher_forced_step(stats_mode):
    """Scan and step run the same arithmetic: c_t from the scan == step(c_{t-1}, x_t), to the bit."""
    model = make_model(c=768, e=768, layers=6).cuda()
    emb = stream(model, 300, device="cuda")
    initial = torch.randn(768, device="cuda")
    c, x = kernels.scan(model, emb, initial=initial, with_token_out=True, strict=True, stats_mode=stats_mode)
    assert fused.last_path == "kernel-fp32"
    prev = torch.cat([initial[None], c[:-1]])
    sc, sx = kernels.step(model, prev, emb, strict=True, stats_mode=stats_mode)
    assert torch.equal(sc, c) and torch.equal(sx, x)
    if stats_mode:  # same merge order in both modes: the same bits
        assert torch.equal(c, kernels.scan(model, emb, initial=initial, strict=True, stats_mode=0))


@needs_kernel
def test_kernel_streamed_weights_equal_resident_weights():
    model = make_model(c=768, e=768, layers=6).cuda()
    emb = stream(model, 200, device="cuda")
    resident = kernels.scan(model, emb, strict=True)
    streamed = kernels.scan(model, emb, strict=True, resident_rows=0)
    assert torch.equal(resident, streamed)
    assert kernels.plan(model, "cuda")["resident_rows_per_cta"] > 0


@needs_kernel
def test_kernel_whole_stream_drift():
    """Contracting model: the whole stream stays at rounding level. Chaotic (random init at 6 x 768: lambda ~ +0.64
    per token on the H200 run): only the first few tokens do, the difference then grows ~e^(0.64 t)."""
    model = make_model(c=768, e=768, layers=6, context_scale=0.05).cuda()
    emb = stream(model, 1024, device="cuda")
    drift = (kernels.scan(model, emb, strict=True) - model.scan(emb)).abs().max()
    assert drift < 1e-4, float(drift)
    chaotic = make_model(c=768, e=768, layers=6).cuda()
    emb = stream(chaotic, 64, device="cuda")
    diff = (kernels.scan(chaotic, emb, strict=True) - chaotic.scan(emb)).abs().amax(dim=1)
    assert diff[:4].max() < 1e-3, diff[:8].tolist()


@needs_kernel
def test_kernel_jacobi_on_cuda_falls_back_to_the_kernel():
    model = make_model(c=768, e=768, layers=6).cuda()
    emb = stream(model, 256, device="cuda")
    got, report = kernels.jacobi_scan(model, emb, max_sweeps=4)
    assert not report["certified"] and report["fallback_tokens"] > 0 and fused.last_path == "kernel-fp32"
    assert torch.isfinite(got).all()
