import pytest
import torch

from cvfp.errors import ArtifactError
from cvfp.model import CVFPLayer, CVFPModel, ModelArgs, load_model, save_model


def tiny_args(**overrides):
    args = dict(vocab_size=50, context_dim=6, embed_dim=4, hidden_dim=10, layer_structure=[2, 1])
    args.update(overrides)
    return ModelArgs(**args)


def test_hidden_dim_must_be_context_plus_embed():
    with pytest.raises(ValueError, match="hidden_dim"):
        tiny_args(hidden_dim=11)


def _layer_norm(z, gain, bias, eps=1e-5):
    """LN(z) = (z - mean(z)) / sqrt(var(z) + eps) * gain + bias, over the last dimension (population variance)."""
    mean = z.mean(-1, keepdim=True)
    var = ((z - mean) ** 2).mean(-1, keepdim=True)
    return (z - mean) / torch.sqrt(var + eps) * gain + bias


@pytest.mark.parametrize("mix", [0.0, 0.3, 1.0])
def test_layer_matches_the_written_formula(mix):
    """SPEC 2: h = ReLU(W [c; x] + b), (dc, dx) = split(h), c' = c + dc, x' = x + dx,
    then c' = (1-m) c' + m LN_c(c') and x' likewise."""
    torch.manual_seed(0)
    layer = CVFPLayer(tiny_args(layernorm_mix=mix))
    with torch.no_grad():  # LayerNorm gains and biases away from (1, 0), so a missing or extra norm shows
        for norm in (layer.context_norm, layer.token_norm):
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.normal_(0.0, 0.3)
    c, x = torch.randn(3, 6), torch.randn(3, 4)
    h = torch.relu(torch.cat([c, x], -1) @ layer.fnn.weight.T + layer.fnn.bias)
    c1, x1 = c + h[:, :6], x + h[:, 6:]
    c1 = (1 - mix) * c1 + mix * _layer_norm(c1, layer.context_norm.weight, layer.context_norm.bias)
    x1 = (1 - mix) * x1 + mix * _layer_norm(x1, layer.token_norm.weight, layer.token_norm.bias)
    got_c, got_x = layer(c, x)
    torch.testing.assert_close(got_c, c1)
    torch.testing.assert_close(got_x, x1)


def test_layer_structure_builds_blocks_of_layers():
    model = CVFPModel(tiny_args(layer_structure=[2, 3]))
    assert [len(block.layers) for block in model.blocks] == [2, 3]


def test_scan_equals_per_token_loop():
    torch.manual_seed(1)
    model = CVFPModel(tiny_args())
    embeddings = model.embed(torch.randint(0, 50, (9,))).detach()
    context = torch.zeros(1, 6)
    expected = []
    for t in range(9):
        context, _ = model.step(context, embeddings[t:t + 1])
        expected.append(context[0])
    torch.testing.assert_close(model.scan(embeddings), torch.stack(expected))


def test_checkpoint_round_trip_and_corruption(tmp_path):
    torch.manual_seed(2)
    model = CVFPModel(tiny_args(decoder=True))
    path = tmp_path / "m.pt"
    save_model(path, model, note="x")
    loaded, payload = load_model(path, "phase1")
    assert payload["note"] == "x" and loaded.args == model.args
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], tensor)
    data = bytearray(path.read_bytes())
    path.write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(ArtifactError, match="m.pt"):
        load_model(path, "phase1")
