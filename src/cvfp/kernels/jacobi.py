"""A parallel exact solve of the scan by Jacobi sweeps, certified by its residual.

The scan's contexts C = (c_0 .. c_{N-1}) are the solution of c_t = F(c_{t-1}, x_t) with c_{-1}
given. A sweep evaluates F on every token at once (one batched `model.step`: GEMMs) from the
current iterate and measures the residual r_t = ||c_t - F(c_{t-1}, x_t)||. Where the map
contracts, the error shrinks geometrically per sweep; on any map the first unconverged token
becomes exact each sweep, so the solve always progresses.

Bookkeeping that keeps the certificate sound: rows before the first row whose residual
exceeds `tol` are left unchanged (their inputs are unchanged, so their measured residuals stay
valid), and only the rows from there on take the new values; the next sweep starts one row
later (that row is now exactly F of its unchanged input). The solve stops when every row's
residual is <= tol: max_t r_t <= tol is the certificate. If `max_sweeps` pass first, the
uncertified suffix is finished by the sequential scan from the last certified context (the
kernel where it is available, else `model.scan`), and the result says so.

Pure torch: runs on the CPU and on CUDA.
"""

from __future__ import annotations

import time
from typing import Callable, Optional

import torch

EPS32 = float(torch.finfo(torch.float32).eps)


def default_tol(model) -> float:
    """Rounding level of one fp32 step: 16 ulp of a LayerNorm'ed context's norm (sqrt(C) at gain 1)."""
    return 16 * EPS32 * float(model.args.context_dim) ** 0.5


@torch.no_grad()
def jacobi_scan(model, embeddings: torch.Tensor, initial: Optional[torch.Tensor] = None,
                warm: Optional[torch.Tensor] = None, max_sweeps: int = 64, tol: Optional[float] = None,
                chunk: int = 65536, sequential: Optional[Callable] = None, step: Optional[Callable] = None):
    """Contexts (N, C) of the scan by certified Jacobi sweeps, and a report dict.

    warm: a starting iterate (N, C), e.g. the previous pass's contexts (zeros when None).
    tol: the residual certificate, absolute, per token (default `default_tol(model)`).
    sequential(embeddings, initial) -> contexts: the fallback for the uncertified suffix
    (default: `cvfp.kernels.scan`, which is the kernel on CUDA and model.scan elsewhere).
    step(contexts, embeddings) -> (contexts', token_out): the batched F (default model.step).
    Report: sweeps, certified, residual (max_t r_t as last measured, before any fallback), tol, fallback_tokens,
    rows_evaluated (total F evaluations, in tokens), seconds (wall, synchronised on CUDA).
    """
    if sequential is None:
        from cvfp.kernels.fused import scan as kernel_scan

        def sequential(emb, init):
            return kernel_scan(model, emb, initial=init)
    step = step or model.step
    tol = default_tol(model) if tol is None else float(tol)
    n = embeddings.shape[0]
    c_dim = model.args.context_dim
    device = embeddings.device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    start_time = time.perf_counter()
    c0 = embeddings.new_zeros(1, c_dim) if initial is None else initial.reshape(1, c_dim).to(embeddings)
    contexts = embeddings.new_zeros(n, c_dim) if warm is None else warm.to(embeddings).clone()
    residual = torch.zeros(n, device=device, dtype=torch.float32)
    start = 0  # rows [0, start) are certified and fixed
    sweeps = 0
    rows = 0
    certified = n == 0
    while not certified and sweeps < max_sweeps:
        sweeps += 1
        first_bad = None
        new_rows = []
        for lo in range(start, n, chunk):  # chunks share the iterate of this sweep (Jacobi, not Gauss-Seidel)
            hi = min(n, lo + chunk)
            prev = torch.cat([c0 if lo == 0 else contexts[lo - 1:lo], contexts[lo:hi - 1]], 0)
            f, _ = step(prev, embeddings[lo:hi])
            r = (contexts[lo:hi] - f).norm(dim=1)
            residual[lo:hi] = r
            new_rows.append((lo, hi, f))
            rows += hi - lo
            if first_bad is None:
                bad = torch.nonzero(r > tol)
                if bad.numel():
                    first_bad = lo + int(bad[0, 0])
        if first_bad is None:
            certified = True
            break
        for lo, hi, f in new_rows:  # rows >= first_bad take the new values
            if hi > first_bad:
                a = max(lo, first_bad)
                contexts[a:hi] = f[a - lo:]
        residual[first_bad] = 0.0  # F of its unchanged input, just evaluated
        start = first_bad + 1
        if start >= n:
            certified = True
    residual_at_stop = float(residual.max()) if n else 0.0
    fallback_tokens = 0
    if not certified:
        fallback_tokens = n - start
        init = c0 if start == 0 else contexts[start - 1:start]
        contexts[start:] = sequential(embeddings[start:], init.reshape(-1))
        residual[start:] = 0.0
    sync()
    report = {
        "sweeps": sweeps,
        "certified": bool(certified),
        "residual": residual_at_stop,
        "tol": tol,
        "fallback_tokens": int(fallback_tokens),
        "certified_prefix": int(n - fallback_tokens),
        "rows_evaluated": int(rows),
        "seconds": time.perf_counter() - start_time,
    }
    return contexts, report
