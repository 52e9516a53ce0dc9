"""Fast exact scans of the CVFP step (issue 18).

- `scan(model, embeddings, initial=None, with_token_out=False)`: the whole stream in one
  persistent cooperative CUDA kernel (scan.cu) where `available(device)`, else `model.scan`.
- `step(model, contexts, embeddings)`: teacher-forced single steps through the same kernel.
- `check(device) -> (ok, reason)` / `available(device)`: False on the CPU, on a GPU other than
  Hopper (the build targets sm_90a), without nvcc or ninja, or when the build fails.
- `jacobi_scan`: the parallel exact solve by certified Jacobi sweeps (pure torch, any device).
- `lyapunov`: the scan's top Lyapunov exponent along a trajectory, with a standard error.

Importing this package compiles nothing: the extension is built on the first CUDA use.
"""

from cvfp.kernels.jacobi import default_tol, jacobi_scan
from cvfp.kernels.lyapunov import lyapunov
from cvfp.kernels.fused import available, check, pack, plan, scan, step, unsupported

__all__ = ["available", "check", "default_tol", "jacobi_scan", "lyapunov", "pack", "plan", "scan", "step",
           "unsupported"]
