"""What benchmarks/bench.py and benchmarks/bench_parallel.py share: the timer, the data, the model.

The model is built the way the stages build it, from a validated `model` section
(`--blocks` one-layer blocks, context_dim = embed_dim = `--dim`, hidden H = 2·dim).
"""

from __future__ import annotations

import contextlib
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.nn as nn
from safetensors.torch import load_file

from cvfp.model import CVFPModel, ModelArgs
from cvfp.params import ModelParams

CACHE = Path("data/cache/stream.safetensors")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device, repeats: int, warmup: int = 1) -> list[float]:
    """Seconds of each of `repeats` calls of fn after `warmup` calls, device synchronised around each."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    seconds = []
    for _ in range(repeats):
        tick = time.perf_counter()
        fn()
        synchronize(device)
        seconds.append(time.perf_counter() - tick)
    return seconds


def median(values: list[float]) -> float:
    return statistics.median(values)


@contextlib.contextmanager
def plain_path() -> Iterator[None]:
    """The stages' plain code on any device (CVFP_FAST=0, cvfp.fast's override): eager, two-pass Phase 1."""
    before = os.environ.get("CVFP_FAST")
    os.environ["CVFP_FAST"] = "0"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("CVFP_FAST")
        else:
            os.environ["CVFP_FAST"] = before


def resolve_precision(name: str, device: torch.device) -> str:
    """`auto`: bf16 on CUDA, fp32 on the CPU."""
    return name if name != "auto" else ("bf16" if device.type == "cuda" else "fp32")


def load_ids(tokens: int, vocab: int, seed: int) -> tuple[torch.Tensor, str]:
    """`tokens` ids: the cached real stream (repeated to length, ids mod vocab) when present, else random."""
    if CACHE.is_file():
        try:
            stream = load_file(str(CACHE))["ids"].long()
            reps = math.ceil(tokens / stream.numel())
            ids = stream.repeat(reps)[:tokens] % vocab
            return ids, f"{CACHE} ({stream.numel()} real tokens{', repeated' if reps > 1 else ''})"
        except Exception as err:  # an unreadable file: fall back to random ids
            print(f"bench: could not read {CACHE} ({err}); using random ids", file=sys.stderr)
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (tokens,), generator=generator), f"random ids (seed {seed})"


def model_section(blocks: int, dim: int) -> ModelParams:
    """The `model` section of the benchmark's model; every other key keeps its schema default."""
    return ModelParams.model_validate({"context_dim": dim, "embed_dim": dim, "hidden_dim": 2 * dim,
                                       "layer_structure": [1] * blocks})


def build_model(model_params: ModelParams, vocab: int, seed: int, device: torch.device) -> CVFPModel:
    """A freshly initialised model, seeded, as the phase1 stage builds it."""
    torch.manual_seed(seed)
    return CVFPModel(ModelArgs.from_params(model_params, vocab)).to(device)


def prepare_phase1(model: CVFPModel) -> list[nn.Parameter]:
    """What `phase1.train_phase1` does before iterating (zero frozen head, frozen embedding); the trainable list."""
    model.zero_head_()
    model.token_embedding.requires_grad_(False)
    model.embed_norm.requires_grad_(False)
    return [p for p in model.parameters() if p.requires_grad]


def prepare_phase2(model: CVFPModel, phase2_params, seed: int) -> list[nn.Parameter]:
    """What `phase2.train_phase2` does before its first epoch (seeded head, freezing); the trainable list."""
    model.init_head_(seed)
    return model.set_trainable(phase2_params.freeze_context, phase2_params.freeze_embedding)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.processor() or platform.machine()} ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"
