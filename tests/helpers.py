"""Helpers shared by the test modules (no test module imports another test module)."""

import torch

from cvfp.model import CVFPModel, ModelArgs


def tiny_model(seed: int = 0, **overrides) -> CVFPModel:
    """A seeded CVFPModel small enough for exact checks; `hidden_dim` follows context + embed unless given."""
    torch.manual_seed(seed)
    args = dict(vocab_size=40, context_dim=6, embed_dim=4, layer_structure=[1, 2])
    args.update(overrides)
    args.setdefault("hidden_dim", args["context_dim"] + args["embed_dim"])
    return CVFPModel(ModelArgs(**args))
