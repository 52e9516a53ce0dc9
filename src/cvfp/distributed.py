"""Data parallelism through torch.distributed, launched by torchrun (NCCL on GPUs, gloo on the CPU).

`distributed.nproc_per_node` in params.yaml sets the number of processes. A stage that
supports it (phase1, phase2, baselines) re-launches itself under
`python -m torch.distributed.run --standalone --nproc_per_node=N` when that number is above
one, so `dvc repro` and `dvc exp run` work unchanged. Only rank 0 writes outputs, metrics
files and MLflow records; a failing rank fails the whole launch (torchrun stops the others).

The convention every training loop here follows, so that N processes compute the same
loss and the same gradient as one:

- Every rank computes the *whole* loss. Sums over tokens are taken across ranks with
  `all_sum`, whose backward is again a sum across ranks (each rank's graph holds only the
  consumers of its own rows).
- After backward, `average_gradients` all-reduces the parameter gradients and divides by
  the world size, as DistributedDataParallel does. Together these give exactly the
  one-process gradient (up to float summation order); `tests/test_distributed.py` checks it.

This is what DistributedDataParallel's reducer does for the parameters, written out because
the losses here are normalised by global counts (tokens per batch differ between ranks, Phase
1's losses are norms over all tokens) and Phase 1 back-propagates in two passes.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.utils.data.distributed import DistributedSampler

from cvfp.runtime import launched



@dataclass(frozen=True)
class World:
    """This process's place in the launch: rank in [0, size)."""

    rank: int = 0
    size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.size > 1


SINGLE = World()


def current() -> World:
    """The world of the initialised process group, or SINGLE when there is none."""
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size())
    return SINGLE


def main_only(log, world: World):
    """`log` on rank 0; a function that prints nothing on the other ranks (one copy of each line)."""
    return log if world.is_main else (lambda line: None)


def relaunch(nproc: int, argv: list[str] | None = None) -> int:
    """Run this script again under torchrun with `nproc` processes; its exit code."""
    argv = list(sys.argv if argv is None else argv)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *argv]
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    return subprocess.run(command, env=env).returncode


def setup(device_type: str, backend: str | None = None) -> World:
    """Join the process group torchrun describes (NCCL for CUDA, else gloo); SINGLE outside torchrun.

    `backend="gloo"` with CUDA leaves every process on the current GPU (a check of the CUDA
    code paths with several processes on a one-GPU machine; NCCL refuses to share a GPU).
    """
    if not launched() or int(os.environ["WORLD_SIZE"]) == 1:
        return SINGLE
    backend = backend or ("nccl" if device_type == "cuda" else "gloo")
    if device_type == "cuda" and backend == "nccl":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group(backend=backend)
    return current()


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def shard(n: int, world: World) -> tuple[int, int]:
    """This rank's contiguous slice [lo, hi) of n items; sizes differ by at most one, in rank order."""
    base, extra = divmod(n, world.size)
    lo = world.rank * base + min(world.rank, extra)
    return lo, lo + base + (world.rank < extra)


@dataclass(frozen=True)
class Shard:
    """The rows [lo, hi) of an n-row stream that this rank holds (all of them in one process)."""

    n: int
    world: World = SINGLE

    @property
    def lo(self) -> int:
        return shard(self.n, self.world)[0]

    @property
    def hi(self) -> int:
        return shard(self.n, self.world)[1]

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """`all_sum`: a per-rank partial sum over rows -> the sum over all n rows (differentiable)."""
        return all_sum(tensor, self.world)


class _AllSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        out = tensor.clone()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad


def all_sum(tensor: torch.Tensor, world: World) -> torch.Tensor:
    """Sum of `tensor` over ranks, differentiable (see the module's convention); `tensor` itself at world size 1."""
    return _AllSum.apply(tensor) if world.active else tensor


def sum_numbers(values: dict[str, float] | list[float], world: World, dtype=torch.float64) -> dict[str, float] | list:
    """Plain named numbers (counts, sums for logging) summed over ranks, in one collective; the same keys back."""
    if not world.active:
        return dict(values) if isinstance(values, dict) else list(values)
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    numbers = list(values.values()) if isinstance(values, dict) else list(values)
    tensor = torch.tensor(numbers, dtype=dtype, device=device)
    dist.all_reduce(tensor)
    return dict(zip(values, tensor.tolist())) if isinstance(values, dict) else tensor.tolist()


def average_gradients(parameters: list[torch.nn.Parameter], world: World) -> None:
    """All-reduce the gradients of `parameters` in one flat buffer and divide by the world size.

    A parameter without a gradient on every rank keeps none (the optimizer skips it, as in one
    process); one without a gradient on this rank only (an empty local batch) counts as zero.
    """
    if not world.active or not parameters:
        return
    device = parameters[0].device
    present = torch.tensor([p.grad is not None for p in parameters], dtype=torch.int32, device=device)
    dist.all_reduce(present, op=dist.ReduceOp.MAX)
    used = [p for p, flag in zip(parameters, present.tolist()) if flag]
    for p in used:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    if not used:
        return
    flat = torch.cat([p.grad.reshape(-1) for p in used])
    dist.all_reduce(flat)
    flat /= world.size
    offset = 0
    for p in used:
        p.grad.copy_(flat[offset:offset + p.numel()].view_as(p.grad))
        offset += p.numel()


def backward_and_step(loss: torch.Tensor, optimizer: torch.optim.Optimizer, parameters: list[torch.nn.Parameter],
                      grad_clip: float, world: World) -> bool:
    """Back-propagate a finite `loss` (the same on every rank), average the gradients, clip, step.

    Returns False, with nothing stepped and the gradients cleared, when the clipped gradient's
    norm is not finite (the norm is taken after averaging, so every rank decides alike).
    """
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    average_gradients(parameters, world)
    if not torch.isfinite(torch.nn.utils.clip_grad_norm_(parameters, grad_clip)):
        optimizer.zero_grad(set_to_none=True)
        return False
    optimizer.step()
    return True


def broadcast_module(module: torch.nn.Module, world: World) -> None:
    """Copy rank 0's parameters and buffers to every rank (a common start, as DDP does)."""
    if not world.active:
        return
    with torch.no_grad():
        for tensor in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(tensor.data, src=0)


def broadcast(tensor: torch.Tensor, world: World) -> torch.Tensor:
    """Rank 0's `tensor` on every rank (other ranks pass a buffer of the same shape and dtype)."""
    if world.active:
        dist.broadcast(tensor, src=0)
    return tensor


def gather_rows(local: torch.Tensor, n: int, world: World) -> torch.Tensor:
    """The full (n, ...) matrix from each rank's contiguous `shard` of rows, on every rank."""
    if not world.active:
        return local
    sizes = [hi - lo for lo, hi in (shard(n, World(rank, world.size)) for rank in range(world.size))]
    # gloo and NCCL all_gather need equal sizes: pad to the largest shard
    padded = local.new_zeros((max(sizes), *local.shape[1:]))
    padded[:local.shape[0]] = local
    buffers = [torch.empty_like(padded) for _ in range(world.size)]
    dist.all_gather(buffers, padded)
    return torch.cat([buffer[:size] for buffer, size in zip(buffers, sizes)])


def select_rows(local: torch.Tensor, lo: int, indices: torch.Tensor, world: World) -> torch.Tensor:
    """Rows `indices` (sorted, global) of the sharded matrix whose rows [lo, lo+len(local)) this rank holds."""
    if not world.active:
        return local if indices.numel() == local.shape[0] else local[indices.to(local.device)]
    out = local.new_zeros((indices.numel(), *local.shape[1:]))
    mine = (indices >= lo) & (indices < lo + local.shape[0])
    out[mine.to(local.device)] = local[(indices[mine] - lo).to(local.device)]
    dist.all_reduce(out)  # every row is held by exactly one rank; the others add zeros
    return out


def previous_rank_rows(row: torch.Tensor, world: World) -> torch.Tensor:
    """Rank r receives rank r-1's `row` (rank 0 receives the last rank's): one vector per rank."""
    if not world.active:
        return row
    rows = [torch.empty_like(row) for _ in range(world.size)]
    dist.all_gather(rows, row.contiguous())
    return rows[(world.rank - 1) % world.size]


def sampler_batches(n: int, batch_size: int, seed: int, epoch: int, world: World):
    """One epoch of shuffled global batches of `batch_size` of the items 0..n-1, as this rank's parts.

    Yields (local indices (b,), global batch size) for each of the ceil(n / batch_size) global
    batches; every rank yields the same number of batches (a local part may be empty).
    The order is DistributedSampler's (seeded with `seed`, `set_epoch(epoch)`); rank r holds
    items r, r + N, r + 2N, ... of the permutation (minus the sampler's padding duplicates), so
    with batch_size divisible by the world size N a global batch is the same set of items at
    any N: the union of the ranks' local batches of batch_size / N.
    """
    if batch_size % world.size:
        raise ValueError(f"batch size {batch_size} is not divisible by {world.size} processes")
    sampler = DistributedSampler(range(n), num_replicas=world.size, rank=world.rank, shuffle=True, seed=seed)
    sampler.set_epoch(epoch)
    local = torch.tensor(list(sampler), dtype=torch.long)[:len(range(world.rank, n, world.size))]
    per_rank = batch_size // world.size
    for k in range(-(-n // batch_size)):
        yield local[k * per_rank:(k + 1) * per_rank], min(batch_size, n - k * batch_size)
