import pytest
import torch

import cvfp.cstar as cstar
from cvfp.errors import ArtifactError
from cvfp.io import sha256_file
from cvfp.model import CVFPModel, ModelArgs


def tiny_model(seed=0, **overrides):
    torch.manual_seed(seed)
    args = dict(vocab_size=40, context_dim=6, embed_dim=4, hidden_dim=10, layer_structure=[1, 2])
    args.update(overrides)
    return CVFPModel(ModelArgs(**args))


def test_generate_cstar_is_the_naive_sequential_scan_from_zero():
    model = tiny_model()
    ids = torch.randint(0, 40, (50,))
    got = cstar.generate_cstar(model, ids, "cpu")
    context, naive = torch.zeros(1, 6), []
    with torch.no_grad():
        for t in range(50):
            context, _ = model.step(context, model.embed(ids[t:t + 1]))
            naive.append(context[0])
    assert got.dtype == torch.float32 and got.shape == (50, 6)
    torch.testing.assert_close(got, torch.stack(naive), rtol=0, atol=1e-5)


@pytest.mark.parametrize("mix", [1.0, 0.5])
def test_fast_scan_equals_model_scan(mix):
    model = tiny_model(context_dim=64, embed_dim=64, hidden_dim=128, layer_structure=[1] * 6, layernorm_mix=mix)
    embeddings = model.embed(torch.randint(0, 40, (300,))).detach()
    initial = torch.randn(64)
    for start in (None, initial):
        expected, expected_out = model.scan(embeddings, initial=start, with_token_out=True)
        for _ in range(3):  # TorchScript re-optimises after its first calls; the numbers must not move
            got, got_out = cstar.fast_scan(model, embeddings, initial=start, with_token_out=True)
            torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
            torch.testing.assert_close(got_out, expected_out, rtol=0, atol=1e-5)
        torch.testing.assert_close(cstar.fast_scan(model, embeddings, initial=start), expected, rtol=0, atol=1e-5)


def test_fast_scan_carries_the_context_across_chunks_and_without_torchscript(monkeypatch):
    model = tiny_model()
    embeddings = model.embed(torch.randint(0, 40, (30,))).detach()
    expected = model.scan(embeddings)
    monkeypatch.setattr(cstar, "SCAN_CHUNK", 7)
    torch.testing.assert_close(cstar.fast_scan(model, embeddings), expected, rtol=0, atol=1e-5)
    monkeypatch.setattr(cstar, "_compiled_scan", lambda: cstar._scan_states)
    torch.testing.assert_close(cstar.fast_scan(model, embeddings), expected, rtol=0, atol=1e-5)


@pytest.fixture
def saved(tmp_path):
    phase1 = tmp_path / "phase1.pt"
    phase1.write_bytes(b"phase-1 weights")
    path = tmp_path / "cstar" / "train.safetensors"
    contexts = torch.randn(20, 6)
    cstar.save_cstar(path, contexts, sha256_file(phase1), "tokenizer-hash")
    return path, phase1, contexts


def test_save_and_load_round_trip(saved):
    path, phase1, contexts = saved
    assert torch.equal(cstar.load_cstar(path, phase1), contexts)


def test_load_refuses_cstar_of_another_phase1_checkpoint(saved):
    path, phase1, _ = saved
    old = sha256_file(phase1)
    phase1.write_bytes(b"retrained phase-1 weights")
    with pytest.raises(ArtifactError) as err:
        cstar.load_cstar(path, phase1)
    message = str(err.value)
    assert old in message and sha256_file(phase1) in message and "rerun the 'cstar' stage" in message


def test_load_refuses_a_corrupted_or_truncated_file(saved):
    path, phase1, _ = saved
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF  # a flipped bit in the tensor data, header intact
    path.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="corrupted"):
        cstar.load_cstar(path, phase1)
    path.write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(ArtifactError, match="cstar"):
        cstar.load_cstar(path, phase1)
