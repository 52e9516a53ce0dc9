"""The New-LLM / CVFP model (SPEC section 2).

One model step F(c, x) -> (c', x') runs every CVFPLayer of every block in order. The only
memory across tokens is the context vector c; a sequence is processed by scanning
c_t = F(c_{t-1}, e_t) from c_{-1} = 0.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from cvfp.errors import ArtifactError
from cvfp.io import load_checkpoint, save_checkpoint
from cvfp.runtime import progress


@dataclass
class ModelArgs:
    """Everything needed to rebuild the model; stored in every checkpoint."""

    vocab_size: int
    context_dim: int = 64
    embed_dim: int = 64
    hidden_dim: int = 128
    layer_structure: list[int] = field(default_factory=lambda: [1] * 6)
    layernorm_mix: float = 1.0
    init_std: float = 0.1
    bias_init_std: float = 0.01
    embedding_init_std: float = 1.0
    decoder: bool = False

    def __post_init__(self) -> None:
        if self.hidden_dim != self.context_dim + self.embed_dim:
            raise ValueError(f"model.hidden_dim ({self.hidden_dim}) must equal model.context_dim + model.embed_dim "
                             f"({self.context_dim} + {self.embed_dim})")

    @classmethod
    def from_params(cls, model_params, vocab_size: int) -> "ModelArgs":
        return cls(vocab_size=vocab_size, **model_params.model_dump())


class CVFPLayer(nn.Module):
    """h = ReLU(W[c; x] + b); (dc, dx) = split(h); residual; LayerNorm mixing with weight m."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.context_dim = args.context_dim
        self.mix = args.layernorm_mix
        self.fnn = nn.Linear(args.context_dim + args.embed_dim, args.hidden_dim)
        self.context_norm = nn.LayerNorm(args.context_dim)
        self.token_norm = nn.LayerNorm(args.embed_dim)
        nn.init.normal_(self.fnn.weight, 0.0, args.init_std)
        nn.init.normal_(self.fnn.bias, 0.0, args.bias_init_std)

    def forward(self, context: torch.Tensor, token: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """context (..., C), token (..., E) -> same shapes."""
        h = F.relu(self.fnn(torch.cat([context, token], dim=-1)))
        context = context + h[..., : self.context_dim]
        token = token + h[..., self.context_dim:]
        if self.mix == 1.0:  # the seeds' setting; skip the no-op blend
            return self.context_norm(context), self.token_norm(token)
        if self.mix > 0.0:
            context = (1 - self.mix) * context + self.mix * self.context_norm(context)
            token = (1 - self.mix) * token + self.mix * self.token_norm(token)
        return context, token


class CVFPBlock(nn.Module):
    """A sequence of CVFPLayers applied in order."""

    def __init__(self, args: ModelArgs, num_layers: int):
        super().__init__()
        self.layers = nn.ModuleList(CVFPLayer(args) for _ in range(num_layers))

    def forward(self, context: torch.Tensor, token: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        for layer in self.layers:
            context, token = layer(context, token)
        return context, token


class CVFPModel(nn.Module):
    """Embedding + embed_norm, the CVFP blocks (the step F), the output head, optional context decoder."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.token_embedding = nn.Embedding(args.vocab_size, args.embed_dim)
        nn.init.normal_(self.token_embedding.weight, 0.0, args.embedding_init_std)
        self.embed_norm = nn.LayerNorm(args.embed_dim)
        self.blocks = nn.ModuleList(CVFPBlock(args, n) for n in args.layer_structure)
        self.token_output = nn.Linear(args.context_dim + args.embed_dim, args.vocab_size)
        self.context_decoder = None
        if args.decoder:
            c, e = args.context_dim, args.embed_dim
            self.context_decoder = nn.Sequential(nn.Linear(c, 2 * c), nn.ReLU(), nn.Linear(2 * c, c + e))

    @property
    def context_dim(self) -> int:
        return self.args.context_dim

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (...,) -> normalised embeddings (..., E)."""
        return self.embed_norm(self.token_embedding(ids))

    def step(self, context: torch.Tensor, token: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One model step F: context (..., C), token embedding (..., E) -> (context', token_out)."""
        for block in self.blocks:
            context, token = block(context, token)
        return context, token

    def logits(self, context: torch.Tensor, token_out: torch.Tensor) -> torch.Tensor:
        """Head on [context; token_out]: (..., C), (..., E) -> (..., V)."""
        return self.token_output(torch.cat([context, token_out], dim=-1))

    @torch.no_grad()
    def scan(self, embeddings: torch.Tensor, initial: torch.Tensor | None = None,
             with_token_out: bool = False, progress_desc: str | None = None):
        """Exact sequential pass c_t = F(c_{t-1}, e_t): embeddings (N, E) -> contexts (N, C).

        `initial` is c_{-1} (zeros when None). With `with_token_out`, also returns the
        per-step token outputs (N, E), which the head needs for free-running prediction.
        """
        n = embeddings.shape[0]
        context = embeddings.new_zeros(1, self.context_dim) if initial is None else initial.reshape(1, -1)
        contexts = embeddings.new_empty(n, self.context_dim)
        token_outs = embeddings.new_empty(n, embeddings.shape[1]) if with_token_out else None
        steps = range(n)
        if progress_desc is not None:
            steps = progress(steps, total=n, desc=progress_desc, unit="tok")
        for t in steps:
            context, token_out = self.step(context, embeddings[t:t + 1])
            contexts[t] = context[0]
            if token_outs is not None:
                token_outs[t] = token_out[0]
        return (contexts, token_outs) if with_token_out else contexts

    def zero_head_(self) -> None:
        """Phase 1 has no next-token objective: the head is zero and frozen."""
        nn.init.zeros_(self.token_output.weight)
        nn.init.zeros_(self.token_output.bias)
        self.token_output.requires_grad_(False)

    def init_head_(self, seed: int) -> None:
        """Re-initialise the output head (zero and frozen since Phase 1) like every Linear in SPEC section 2.

        Weights normal(0, init_std), biases normal(0, bias_init_std), drawn on the CPU from a
        generator seeded with `seed`, so the start is the same on every device.
        """
        generator = torch.Generator().manual_seed(seed)
        head = self.token_output
        with torch.no_grad():
            head.weight.copy_(torch.empty(head.weight.shape).normal_(0.0, self.args.init_std, generator=generator))
            head.bias.copy_(torch.empty(head.bias.shape).normal_(0.0, self.args.bias_init_std, generator=generator))

    def set_trainable(self, freeze_context: bool, freeze_embedding: bool) -> list[nn.Parameter]:
        """Freeze what a Phase-2 variant says and return the parameters left to train.

        The head always trains; `freeze_context` freezes everything else (blocks and embedding);
        `freeze_embedding` freezes token_embedding and embed_norm. The context decoder is a
        Phase-1 device and never trains in Phase 2.
        """
        self.requires_grad_(not freeze_context)
        self.token_output.requires_grad_(True)
        if freeze_embedding:
            self.token_embedding.requires_grad_(False)
            self.embed_norm.requires_grad_(False)
        if self.context_decoder is not None:
            self.context_decoder.requires_grad_(False)
        return [p for p in self.parameters() if p.requires_grad]


def trainable_parameters(model: nn.Module) -> int:
    """The one count of trainable parameters (CVFP and the baselines): elements of parameters that require grad."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def phase2_trainable_parameters(args: ModelArgs, freeze_context: bool, freeze_embedding: bool) -> int:
    """What Phase 2 trains for these model args and freezing flags, counted on the meta device (no weights made)."""
    with torch.device("meta"):
        model = CVFPModel(args)
    model.set_trainable(freeze_context, freeze_embedding)
    return trainable_parameters(model)


def save_model(path: str | Path, model: CVFPModel, **extra: Any) -> None:
    """Checkpoint = weights + the ModelArgs that built them + any plain extra values."""
    save_checkpoint(path, {"model_args": asdict(model.args), "state_dict": model.state_dict(), **extra})


def load_model(path: str | Path, stage: str, device: torch.device | str = "cpu") -> tuple[CVFPModel, dict[str, Any]]:
    """Rebuild a CVFPModel from a checkpoint written by `save_model`; never restates shapes."""
    payload = load_checkpoint(path, stage)
    try:
        model = CVFPModel(ModelArgs(**payload["model_args"]))
        model.load_state_dict(payload["state_dict"])
    except (KeyError, TypeError, RuntimeError, ValueError) as err:
        raise ArtifactError(f"{path}: checkpoint does not match the model ({err}); rerun the '{stage}' stage") from None
    return model.to(device), payload
