"""The exact-scan engine (cvfp.scan) against the plain reference, model.scan."""

import pytest
import torch

import cvfp.fast as fast
import cvfp.scan as scan
from helpers import tiny_model


@pytest.mark.parametrize("mix", [1.0, 0.5])
def test_exact_scan_equals_model_scan(mix):
    model = tiny_model(context_dim=64, embed_dim=64, layer_structure=[1] * 6, layernorm_mix=mix)
    embeddings = model.embed(torch.randint(0, 40, (300,))).detach()
    initial = torch.randn(64)
    for start in (None, initial):
        expected, expected_out = model.scan(embeddings, initial=start, with_token_out=True)
        for _ in range(3):  # TorchScript re-optimises after its first calls; the numbers must not move
            got, got_out = scan.exact_scan(model, embeddings, initial=start, with_token_out=True)
            torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
            torch.testing.assert_close(got_out, expected_out, rtol=0, atol=1e-5)
        torch.testing.assert_close(scan.exact_scan(model, embeddings, initial=start), expected, rtol=0, atol=1e-5)


def test_exact_scan_carries_the_context_across_chunks_and_without_torchscript(monkeypatch):
    model = tiny_model()
    embeddings = model.embed(torch.randint(0, 40, (30,))).detach()
    expected = model.scan(embeddings)
    monkeypatch.setattr(scan, "SCAN_CHUNK", 7)
    torch.testing.assert_close(scan.exact_scan(model, embeddings), expected, rtol=0, atol=1e-5)
    monkeypatch.setattr(scan, "_compiled_scan", lambda: scan._scan_states)
    torch.testing.assert_close(scan.exact_scan(model, embeddings), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("with_token_out", [False, True])
def test_graph_scan_equals_model_scan_across_blocks(monkeypatch, with_token_out):
    monkeypatch.setenv("CVFP_FAST", "1")  # the CUDA path, run on the CPU
    monkeypatch.setattr(fast, "COMPILE_BACKEND", "aot_eager")  # same graph capture, no C++ build
    model = tiny_model(context_dim=16, embed_dim=16, layer_structure=[1] * 3)
    embeddings = model.embed(torch.randint(0, 40, (101,))).detach()
    monkeypatch.setattr(scan, "GRAPH_TOKENS", 16)  # 101 tokens: six full blocks and a short last one
    for initial in (None, torch.randn(16)):
        expected = model.scan(embeddings, initial=initial, with_token_out=with_token_out)
        got = scan.exact_scan(model, embeddings, initial=initial, with_token_out=with_token_out)  # takes graph_scan
        compiled = scan.graph_scan(model, embeddings, initial=initial, with_token_out=with_token_out,
                                   compiled_step=True)
        for a, b, c in zip(*(x if with_token_out else (x,) for x in (got, compiled, expected))):
            torch.testing.assert_close(a, c, rtol=0, atol=0)  # the very same kernels: equal to the bit
            torch.testing.assert_close(b, c, rtol=0, atol=1e-5)
