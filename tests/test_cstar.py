import pytest
import torch

import cvfp.cstar as cstar
from cvfp.errors import ArtifactError
from cvfp.io import sha256_file
from helpers import tiny_model


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
