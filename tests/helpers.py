"""Helpers shared by the test modules (no test module imports another test module)."""

import importlib.util
from pathlib import Path

import torch

from cvfp.model import CVFPModel, ModelArgs

REPO = Path(__file__).resolve().parents[1]


def tiny_model(seed: int = 0, **overrides) -> CVFPModel:
    """A seeded CVFPModel small enough for exact checks; `hidden_dim` follows context + embed unless given."""
    torch.manual_seed(seed)
    args = dict(vocab_size=40, context_dim=6, embed_dim=4, layer_structure=[1, 2])
    args.update(overrides)
    args.setdefault("hidden_dim", args["context_dim"] + args["embed_dim"])
    return CVFPModel(ModelArgs(**args))


def load_stage(name):
    """pipeline/<name>.py as a module (its body is called directly, without run_stage's MLflow run)."""
    spec = importlib.util.spec_from_file_location(f"stage_{name}", REPO / "pipeline" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class NoRun:
    """The stage's MLflow run, recording nothing."""

    def __getattr__(self, name):
        return lambda *args, **kwargs: None
