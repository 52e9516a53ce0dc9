"""Fast paths taken when the device is CUDA: compiled model steps and CUDA-graph replay.

On the CPU every stage runs the plain code, so CPU numbers never move. On CUDA the per-token
cost is kernel launches and the parallel passes are memory-bound between GEMMs, so there:
`compiled` wraps a function in `torch.compile` (fusing LayerNorm, ReLU and the residual adds
around the GEMMs) and falls back to the plain function if compilation fails; `replayable`
captures a fixed sequence of kernels once in a CUDA graph and replays it.
`CVFP_FAST=0` turns the fast paths off; `CVFP_FAST=1` turns them on for any device (tests).

Which variant of a fast path runs is a `FastOptions` value passed in by the caller (the
stages use the defaults; benchmarks pass others to compare them), never a module global.
"""

from __future__ import annotations

import functools
import os
import warnings
import weakref
from dataclasses import dataclass
from typing import Callable

import torch

COMPILE_BACKEND = "inductor"  # a test hook: tests on the CPU set "aot_eager" (same graph capture, no C++ build)


@dataclass(frozen=True)
class FastOptions:
    """Which variant of each fast path runs where the fast paths apply (defaults: the stages' choice).

    bf16_stream: with bf16 precision, keep the step's residual stream in bf16 (`bf16_stream_step`);
    fused_step: Phase 1's fused Adam with the skip decided on the device, and compiled losses;
    compile_mode: inductor's mode (None: its default; benchmarks try "max-autotune-no-cudagraphs").
    """

    bf16_stream: bool = True
    fused_step: bool = True
    compile_mode: str | None = None


DEFAULT = FastOptions()

_compiled: "weakref.WeakKeyDictionary[torch.nn.Module, dict[str, Callable]]" = weakref.WeakKeyDictionary()


def enabled(device: torch.device | str) -> bool:
    """Whether the fast paths apply on `device` (CUDA by default; see CVFP_FAST)."""
    flag = os.environ.get("CVFP_FAST", "")
    if flag in ("0", "1"):
        return flag == "1"
    return torch.device(device).type == "cuda"


class _Guarded:
    """A compiled function that falls back, once and for good, to the plain one if compiling fails."""

    def __init__(self, fn: Callable, name: str, mode: str | None):
        self.fn = fn
        self.name = name
        mode = mode if COMPILE_BACKEND == "inductor" else None
        if torch.are_deterministic_algorithms_enabled():  # seed_everything sets torch's flag, not inductor's
            import torch._inductor.config as inductor_config

            inductor_config.deterministic = True
        self.compiled = torch.compile(fn, backend=COMPILE_BACKEND, mode=mode, dynamic=False)
        self.failed = False

    def __call__(self, *args, **kwargs):
        if not self.failed:
            try:
                return self.compiled(*args, **kwargs)
            except torch.OutOfMemoryError:
                raise
            except Exception as err:  # a missing compiler or an unsupported op: run the plain code
                warnings.warn(f"torch.compile of {self.name} failed ({type(err).__name__}: {err}); running it uncompiled")
                self.failed = True
        return self.fn(*args, **kwargs)


def compiled(model: torch.nn.Module, name: str, fn: Callable, options: FastOptions = DEFAULT) -> Callable:
    """`fn` compiled once per (model, name, compile mode) when the fast paths apply to the model's device, else `fn`."""
    device = next(model.parameters()).device
    if not enabled(device):
        return fn
    table = _compiled.setdefault(model, {})
    key = (name, options.compile_mode)
    if key not in table:
        table[key] = _Guarded(fn, name, options.compile_mode)
    return table[key]


def bf16_stream_step(model, context: torch.Tensor, token: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """model.step under bf16 autocast with the residual stream stored in bf16 between layers.

    Autocast alone keeps LayerNorm outputs, and so the whole residual stream, in float32: at
    65,536 tokens × 1,536 features the parallel passes then move more bytes between the GEMMs
    than the GEMMs take time. Inside each fused kernel the arithmetic stays float32; only the
    stored activations round to bf16, as the GEMM outputs already do under autocast.
    """
    context, token = context.to(torch.bfloat16), token.to(torch.bfloat16)
    for block in model.blocks:
        for layer in block.layers:
            context, token = layer(context, token)
            context, token = context.to(torch.bfloat16), token.to(torch.bfloat16)
    return context, token


def adam(parameters: list[torch.nn.Parameter], lr: float, device: torch.device | str,
         options: FastOptions = DEFAULT) -> torch.optim.Adam:
    """Adam; where the fast paths apply, the fused kernel (one launch for every parameter).

    The fused kernel also takes a device-side `found_inf` flag and then leaves parameters and
    moments untouched, so a step can be skipped on a non-finite loss without the host first
    reading the loss back (Phase 1's single-pass update). Same update as the plain Adam.
    """
    return torch.optim.Adam(parameters, lr=lr, fused=bool(enabled(device) and options.fused_step))


def skip_on_device(optimizer: torch.optim.Optimizer) -> bool:
    """Whether `optimizer.step()` honours a device-side `optimizer.found_inf` flag (fused Adam)."""
    return bool(optimizer.defaults.get("fused"))


def step_function(model, precision: str = "fp32", options: FastOptions = DEFAULT) -> Callable:
    """model.step, compiled on CUDA (bf16: `bf16_stream_step`): (..., C), (..., E) -> ((..., C), (..., E))."""
    if not enabled(next(model.parameters()).device):
        return model.step
    if precision == "bf16" and options.bf16_stream:
        return compiled(model, "step_bf16_stream", functools.partial(bf16_stream_step, model), options)
    return compiled(model, "step", model.step, options)


def autocast(device: torch.device, precision: str):
    """bf16 autocast on `device` when `precision` is bf16, else a no-op context (the one autocast rule)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def replayable(run: Callable[[], torch.Tensor], device: torch.device) -> Callable[[], torch.Tensor]:
    """`run` reads static input buffers and returns a tensor; returns a function that re-runs it.

    On CUDA the kernels of one call are captured in a CUDA graph and the function replays
    them (the returned tensor is the graph's own output buffer, overwritten by each replay);
    elsewhere it simply calls `run`, so the surrounding buffer logic is testable on the CPU.
    """
    if device.type != "cuda":
        return run
    run()  # compiles and autotunes whatever `run` compiles, on the current stream
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):  # warm-up off the capture: cuBLAS handles, workspaces, compiled kernels
        run()
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        output = run()

    def replay() -> torch.Tensor:
        graph.replay()
        return output

    replay.graph = graph  # keeps the graph (and its memory pool) alive as long as the function
    return replay
