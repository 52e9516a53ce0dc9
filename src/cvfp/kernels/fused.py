"""The exact scan through the persistent CUDA kernel (scan.cu), with a fallback to `model.scan`.

`scan(model, embeddings)` runs c_t = F(c_{t-1}, e_t) for the whole stream in one cooperative
launch when the kernel is available for the embeddings' device (`check`), and calls
`model.scan` otherwise, so the same call works on the CPU. The kernel's arithmetic is fp32
(fp32 or bf16 weights) in another order than cuBLAS, so it is equal to `model.scan` per step
within fp32 rounding, not to the bit; on a chaotic model the difference grows along the
stream (tests/test_scan_kernel.py and benchmarks/scan_kernel.py measure both).

Only `cvfp.model` and torch are imported from outside this package.
"""

from __future__ import annotations

import os
import weakref
from typing import Optional

import torch

from cvfp.kernels import _build

TIMEOUT_S = 10.0  # a grid barrier that waits longer aborts the launch (error, not a hang)
BARRIER_MODE = 0  # scan.cu grid_arrive_wait: 0 release/acquire (fastest on the H200), 1 cooperative groups, 2 timer, 3 relaxed
# scan.cu's stats_mode: 1 = warp 0 merges the LayerNorm partials and broadcasts them (the default: on the H200
# 35.5 us/token at 6 x 768 against 54.8 for mode 0 in the same run, the same bits, all 25 tests passed);
# 0 = every warp merges them (the first version). CVFP_KERNEL_STATS=0 selects mode 0.
STATS_MODE = int(os.environ.get("CVFP_KERNEL_STATS", "1") or 1)

_packed: "weakref.WeakKeyDictionary[torch.nn.Module, dict]" = weakref.WeakKeyDictionary()
last_path: str = ""  # "kernel-fp32", "kernel-bf16" or "model.scan (<reason>)": what the last scan() ran


def check(device) -> tuple[bool, str]:
    """(whether the kernel can run on `device`, the reason when not). Builds it on first CUDA call."""
    if os.environ.get("CVFP_KERNEL", "") == "0":
        return False, "disabled by CVFP_KERNEL=0"
    device = torch.device(device)
    if device.type != "cuda":
        return False, f"device is {device.type}: the scan kernel runs on CUDA only (model.scan is used instead)"
    if not torch.cuda.is_available():
        return False, "CUDA is not available in this torch build or machine"
    index = device.index if device.index is not None else torch.cuda.current_device()
    major, minor = torch.cuda.get_device_capability(index)
    if (major, minor) != (9, 0):
        return False, f"built for sm_90a (Hopper) only; this device is sm_{major}{minor}"
    try:
        _build.load()
    except _build.KernelUnavailable as err:
        return False, str(err)
    return True, ""


def available(device) -> bool:
    """Whether `scan` runs the kernel on `device` (False on the CPU, without nvcc, or if the build fails)."""
    return check(device)[0]


def _layers(model):
    return [layer for block in model.blocks for layer in block.layers]


def _signature(model) -> tuple:
    return tuple((p.data_ptr(), p._version, p.dtype, p.device) for p in model.blocks.parameters())


def pack(model, weights: str = "fp32") -> dict:
    """The layers' tensors stacked as the kernel reads them, cached until a parameter changes."""
    if weights not in ("fp32", "bf16"):
        raise ValueError(f"weights must be 'fp32' or 'bf16', got {weights!r}")
    table = _packed.setdefault(model, {})
    sig = _signature(model)
    hit = table.get(weights)
    if hit is not None and hit["signature"] == sig:
        return hit
    layers = _layers(model)
    with torch.no_grad():
        W = torch.stack([layer.fnn.weight.detach().float() for layer in layers]).contiguous()
        packed = {
            "signature": sig,
            "W": W.to(torch.bfloat16).contiguous() if weights == "bf16" else W,
            "bias": torch.stack([layer.fnn.bias.detach().float() for layer in layers]).contiguous(),
            "gc": torch.stack([layer.context_norm.weight.detach().float() for layer in layers]).contiguous(),
            "bc": torch.stack([layer.context_norm.bias.detach().float() for layer in layers]).contiguous(),
            "gx": torch.stack([layer.token_norm.weight.detach().float() for layer in layers]).contiguous(),
            "bx": torch.stack([layer.token_norm.bias.detach().float() for layer in layers]).contiguous(),
            "eps_c": layers[0].context_norm.eps,
            "eps_x": layers[0].token_norm.eps,
            "mix": float(model.args.layernorm_mix),
        }
    table[weights] = packed
    return packed


def unsupported(model, embeddings: torch.Tensor) -> Optional[str]:
    """Why this model/input cannot take the kernel (shapes, dtypes, per-layer eps), or None."""
    layers = _layers(model)
    if not layers:
        return "the model has no layers"
    if embeddings.dtype != torch.float32 or any(p.dtype != torch.float32 for p in model.blocks.parameters()):
        return "the kernel takes float32 embeddings and parameters"
    c, e = model.args.context_dim, model.args.embed_dim
    if c % 4 or e % 4:
        return "context_dim and embed_dim must be multiples of 4"
    if any(l.context_norm.eps != layers[0].context_norm.eps or l.token_norm.eps != layers[0].token_norm.eps
           for l in layers):
        return "the kernel takes one LayerNorm eps for every layer"
    if any(l.context_norm.weight is None or l.token_norm.weight is None for l in layers):
        return "the kernel needs affine LayerNorms"
    return None


def plan(model, device, weights: str = "fp32", resident_rows: int = -1) -> dict:
    """The kernel's launch plan for this model on `device` (CTAs, rows, resident weight rows, shared memory)."""
    module = _build.load()
    device = torch.device(device)
    index = device.index if device.index is not None else torch.cuda.current_device()
    d = model.args.context_dim + model.args.embed_dim
    return dict(module.plan(d, len(_layers(model)), 4 if weights == "fp32" else 2, index, resident_rows))


def _launch(model, embeddings, prev, initial, with_token_out, weights, skip_matvec=0, resident_rows=-1,
            barrier_mode=None, stats_mode=None):
    module = _build.load()
    p = pack(model, weights)
    emb = embeddings.contiguous()
    empty = emb.new_empty(0)
    init = empty if initial is None else initial.reshape(-1).to(emb).contiguous()
    prv = empty if prev is None else prev.to(emb).contiguous()
    contexts, token_out, error = module.scan(
        emb, prv, init, p["W"], p["bias"], p["gc"], p["bc"], p["gx"], p["bx"], float(p["eps_c"]),
        float(p["eps_x"]), p["mix"], bool(with_token_out), int(skip_matvec), int(resident_rows), TIMEOUT_S,
        int(BARRIER_MODE if barrier_mode is None else barrier_mode), int(STATS_MODE if stats_mode is None else stats_mode))
    return contexts, token_out, error


def barrier_bench(iters: int = 20000, mode: int = 0, ctas: int = 128, threads: int = 768, device=None) -> dict:
    """Grid barriers alone (`mode` as BARRIER_MODE; -1 = __syncthreads only): us per barrier and the SM clock."""
    index = torch.cuda.current_device() if device is None else torch.device(device).index or 0
    cycles, ns, err = _build.load().barrier_bench(iters, mode, ctas, threads, index)
    return {"mode": mode, "ctas": ctas, "threads": threads, "iters": iters, "us_per_barrier": ns / iters / 1e3,
            "sm_clock_ghz": cycles / ns if ns else float("nan"), "error": int(err)}


def _raise_on_error(error: torch.Tensor) -> None:
    if int(error.item()) != 0:
        raise RuntimeError(f"cvfp scan kernel: a grid barrier waited more than {TIMEOUT_S} s (launch aborted)")


def _refusal(model, embeddings: torch.Tensor) -> str:
    """Why the kernel cannot run this model on these inputs (device, build, shapes), or "" when it can."""
    ok, reason = check(embeddings.device)
    return (unsupported(model, embeddings) or "") if ok else reason


@torch.no_grad()
def scan(model, embeddings: torch.Tensor, initial: Optional[torch.Tensor] = None, with_token_out: bool = False,
         weights: str = "fp32", strict: bool = False, **kernel_options):
    """Exact sequential pass c_t = F(c_{t-1}, e_t): embeddings (N, E) -> contexts (N, C) [, token outputs (N, E)].

    The kernel where `check(embeddings.device)` allows it (fp32 arithmetic; `weights="bf16"`
    rounds the weights to bf16), else `model.scan` (then `weights` is ignored). `strict`
    raises instead of falling back. `initial` (C,) or (1, C) is c_{-1}, zeros when None.
    `cvfp.kernels.fused.last_path` says which path ran.
    """
    global last_path
    reason = _refusal(model, embeddings)
    if reason:
        if strict:
            raise _build.KernelUnavailable(reason)
        last_path = f"model.scan ({reason})"
        return model.scan(embeddings, initial=initial, with_token_out=with_token_out)
    contexts, token_out, error = _launch(model, embeddings, None, initial, with_token_out, weights, **kernel_options)
    _raise_on_error(error)
    last_path = f"kernel-{weights}"
    return (contexts, token_out) if with_token_out else contexts


@torch.no_grad()
def step(model, contexts: torch.Tensor, embeddings: torch.Tensor, weights: str = "fp32", strict: bool = False,
         **kernel_options):
    """Teacher-forced steps: row t of the result is F(contexts[t], embeddings[t]) -> (contexts', token_out).

    The kernel runs every row as a one-token scan from the given context (one launch for all
    rows); elsewhere this is the batched `model.step`.
    """
    reason = _refusal(model, embeddings)
    if reason:
        if strict:
            raise _build.KernelUnavailable(reason)
        return model.step(contexts, embeddings)
    out_c, out_x, error = _launch(model, embeddings, contexts, None, True, weights, **kernel_options)
    _raise_on_error(error)
    return out_c, out_x
