"""Data-parallel speed: Phase-1 parallel iterations and Phase-2 training steps at N processes.

Run it under torchrun once per process count, then compare:

    torchrun --standalone --nproc_per_node=1 benchmarks/bench_parallel.py --json one.json
    torchrun --standalone --nproc_per_node=2 benchmarks/bench_parallel.py --json two.json
    python benchmarks/bench_parallel.py --compare one.json two.json      # the table, with scaling efficiency
    torchrun --standalone --nproc_per_node=2 benchmarks/bench_parallel.py --check [--same-device]

`--check` instead compares, on this device and precision, the gradient of one Phase-1
iteration and of one Phase-2 step computed by N processes with the one-process gradient
(rank 0 recomputes it alone afterwards): relative error ||g_N - g_1|| / ||g_1|| over all
parameters. `--same-device` puts every process on GPU 0 with gloo, to check the CUDA code
paths with several processes on a one-GPU machine.

Each process takes one GPU (NCCL) or CPU cores (gloo) and times, after warm-up, the median of
`--repeats` of the very code the stages run: `phase1.jacobi_step` on its shard of `--tokens`
(losses summed over ranks, gradients averaged), and `phase2.train_batch` on its share of a
global batch of `--p2-batch` positions (DistributedSampler's order). The model and sizes are
benchmarks/bench.py's (6 blocks x 768, vocab 8192, 65,536 tokens, bf16 on CUDA), the
hyperparameters the validated `phase1` and `phase2` sections' defaults. Rank 0 writes the JSON.

Scaling efficiency = (rate at N processes) / (N x rate at one process), for a fixed total
problem (strong scaling): the same 65,536 tokens per Phase-1 iteration, the same global batch.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path
from typing import Any

import torch

from common import (build_model, device_name, load_ids, median, model_section, prepare_phase1, prepare_phase2,
                    resolve_precision, timed)
from cvfp import distributed, fast, phase1, phase2
from cvfp.distributed import SINGLE, Shard, World
from cvfp.params import Phase1Params, Phase2Params
from cvfp.runtime import resolve_device


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python benchmarks/bench_parallel.py", description=__doc__.split("\n")[0])
    parser.add_argument("--blocks", type=int, default=6)
    parser.add_argument("--dim", type=int, default=768, help="context_dim = embed_dim")
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--tokens", type=int, default=65536, help="Phase-1 stream length (all ranks together)")
    parser.add_argument("--p2-batch", type=int, default=65536, help="Phase-2 global batch (all ranks together)")
    parser.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="output file (default metrics/timing/bench-parallel-<N>.json)")
    parser.add_argument("--compare", nargs="+", metavar="JSON", help="print the table of earlier runs and exit")
    parser.add_argument("--check", action="store_true", help="compare N-process gradients with one process's")
    parser.add_argument("--same-device", action="store_true", help="every process on GPU 0, gloo (with --check)")
    return parser.parse_args(argv)


def global_batch(args, ids: torch.Tensor, world: World) -> int:
    """The Phase-2 global batch: --p2-batch, at most the N-1 positions, a multiple of the process count."""
    return min(args.p2_batch, ids.numel() - 1) // world.size * world.size


def _streams(args, ids: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded stand-ins, the same on every rank: the previous iteration's contexts (Phase 1) and C* (Phase 2)."""
    generator = torch.Generator().manual_seed(args.seed)
    return tuple(torch.randn(ids.numel(), args.dim, generator=generator).to(device) for _ in range(2))


def _phase1_setup(args, device, precision, ids, previous, world: World):
    """A fresh model and this rank's arguments of `phase1.jacobi_step`: (model, trainable, step_args)."""
    model = build_model(model_section(args.blocks, args.dim), args.vocab, args.seed, device)
    trainable = prepare_phase1(model)
    part = Shard(ids.numel(), world)
    # one chunk per rank: the single-pass step, as the stage runs it
    params = Phase1Params(batch_tokens=part.hi - part.lo, precision=precision)
    with torch.no_grad():
        embeddings = model.embed(ids[part.lo:part.hi])
    step_args = (embeddings, previous[part.lo:part.hi].contiguous(),
                 phase1.DiversityLoss(params.diversity, params.ema_momentum, part), params,
                 previous[part.lo - 1].clone())
    return model, trainable, step_args


def _phase2_setup(args, device, precision):
    """A fresh model with Phase 2's head and trainable set: (model, trainable, params)."""
    model = build_model(model_section(args.blocks, args.dim), args.vocab, args.seed, device)
    params = Phase2Params(precision=precision)
    return model, prepare_phase2(model, params, args.seed), params


def bench_phase1(args, device, precision, ids, world: World) -> dict[str, Any]:
    previous, _ = _streams(args, ids, device)
    model, trainable, step_args = _phase1_setup(args, device, precision, ids, previous, world)
    optimizer = fast.adam(trainable, step_args[3].lr, device)

    def iteration():
        phase1.jacobi_step(model, *step_args, optimizer=optimizer)

    seconds = median(timed(iteration, device, args.repeats, warmup=2))
    local = step_args[0].shape[0]
    return {"parallel_iteration_seconds": seconds, "tokens": ids.numel(), "tokens_per_rank": local,
            "token_iterations_per_second": ids.numel() / seconds}


def bench_phase2(args, device, precision, ids, world: World) -> dict[str, Any]:
    _, cstar = _streams(args, ids, device)
    model, trainable, params = _phase2_setup(args, device, precision)
    optimizer = fast.adam(trainable, params.lr, device)
    batch = global_batch(args, ids, world)
    batches = [(b.to(device), count) for b, count in
               distributed.sampler_batches(ids.numel() - 1, batch, args.seed, 0, world) if count == batch]
    state = {"i": 0}

    def step():
        positions, count = batches[state["i"] % len(batches)]
        state["i"] += 1
        phase2.train_batch(model, optimizer, trainable, ids, cstar, positions, count, params, world)

    seconds = median(timed(step, device, args.repeats, warmup=2))
    return {"train_step_seconds": seconds, "global_batch": batch, "batch_per_rank": batch // world.size,
            "train_tokens_per_second": batch / seconds}


def _gradients(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.grad.float().clone() for name, p in model.named_parameters() if p.grad is not None}


def check_gradients(args, device, precision, ids, world: World) -> dict[str, Any] | None:
    """Relative error of the N-process gradients (Phase-1 iteration, Phase-2 step) against one process's."""
    previous, cstar = _streams(args, ids, device)
    batch = global_batch(args, ids, world)

    def phase1_gradient(w: World) -> dict[str, torch.Tensor]:
        model, trainable, step_args = _phase1_setup(args, device, precision, ids, previous, w)
        phase1.jacobi_step(model, *step_args, optimizer=torch.optim.SGD(trainable, lr=0.0))  # lr 0: the gradient only
        return _gradients(model)

    def phase2_gradient(w: World) -> dict[str, torch.Tensor]:
        model, trainable, params = _phase2_setup(args, device, precision)
        positions, count = next(iter(distributed.sampler_batches(ids.numel() - 1, batch, args.seed, 0, w)))
        phase2.train_batch(model, torch.optim.SGD(trainable, lr=0.0), trainable, ids, cstar, positions.to(device),
                           count, params, w)
        return _gradients(model)

    sharded = {"phase1": phase1_gradient(world), "phase2": phase2_gradient(world)}
    distributed.teardown()
    if not world.is_main:
        return None
    out = {}
    for name, fn in (("phase1", phase1_gradient), ("phase2", phase2_gradient)):
        whole, got = fn(SINGLE), sharded[name]
        flat_whole = torch.cat([g.reshape(-1) for g in whole.values()])
        flat_got = torch.cat([got[key].reshape(-1) for key in whole])
        per_tensor = {key: float((got[key] - g).norm() / g.norm().clamp_min(1e-30)) for key, g in whole.items()}
        out[name] = {"relative_error": float((flat_got - flat_whole).norm() / flat_whole.norm()),
                     "gradient_norm": float(flat_whole.norm()), "elements": flat_whole.numel(),
                     "worst_tensors": sorted(per_tensor.items(), key=lambda item: -item[1])[:4]}
    return out


def compare(paths: list[str]) -> str:
    """Markdown table of runs at different process counts, with scaling efficiency against the 1-process run."""
    runs = sorted((json.loads(Path(p).read_text()) for p in paths), key=lambda r: r["world_size"])
    base = runs[0]
    if base["world_size"] != 1:
        raise SystemExit("--compare needs a run with one process (the baseline of the efficiency)")
    lines = [f"{base['device']} x N, torch {base['torch']}, {base['config']}",
             "| processes | Phase-1 parallel iteration (ms) | token-iterations/s | efficiency | "
             "Phase-2 train step (ms) | Phase-2 tokens/s | efficiency |",
             "|---|---|---|---|---|---|---|"]
    for run in runs:
        n, p1, p2 = run["world_size"], run["phase1"], run["phase2"]
        e1 = p1["token_iterations_per_second"] / (n * base["phase1"]["token_iterations_per_second"])
        e2 = p2["train_tokens_per_second"] / (n * base["phase2"]["train_tokens_per_second"])
        lines.append(f"| {n} | {p1['parallel_iteration_seconds'] * 1e3:.2f} | {p1['token_iterations_per_second']:,.0f}"
                     f" | {e1:.1%} | {p2['train_step_seconds'] * 1e3:.2f} | {p2['train_tokens_per_second']:,.0f}"
                     f" | {e2:.1%} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    args = parse_args(argv)
    if args.compare:
        print(compare(args.compare))
        return None
    device = resolve_device("auto")  # under torchrun: this process's GPU
    if args.same_device and device.type == "cuda":
        device = torch.device("cuda", 0)
    world = distributed.setup(device.type, "gloo" if args.same_device else None)
    precision = resolve_precision(args.precision, device)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.manual_seed(args.seed)
    ids, source = load_ids(args.tokens, args.vocab, args.seed)
    ids = ids.to(device)
    report: dict[str, Any] = {
        "command": " ".join(["python benchmarks/bench_parallel.py", *(sys.argv[1:] if argv is None else argv)]),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": device_name(device), "torch": torch.__version__, "world_size": world.size,
        "backend": torch.distributed.get_backend() if world.active else "none",
        "config": {"blocks": args.blocks, "dim": args.dim, "vocab": args.vocab, "tokens": args.tokens,
                   "p2_batch": args.p2_batch, "precision": precision, "data": source}}
    if args.check:
        report["check"] = check_gradients(args, device, precision, ids, world)
        if world.is_main:
            for name, result in report["check"].items():
                print(f"{name}: {world.size} processes vs 1, {precision} on {report['device']}: gradient relative "
                      f"error {result['relative_error']:.2e} (|g| {result['gradient_norm']:.3e}, "
                      f"{result['elements']:,} elements); worst tensors {result['worst_tensors']}")
        return report
    try:
        report["phase1"] = bench_phase1(args, device, precision, ids, world)
        report["phase2"] = bench_phase2(args, device, precision, ids, world)
    finally:
        distributed.teardown()
    if world.is_main:
        path = Path(args.json or f"metrics/timing/bench-parallel-{world.size}.json")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2) + "\n")
        print(f"{world.size} process(es) on {report['device']}: Phase-1 parallel iteration "
              f"{report['phase1']['parallel_iteration_seconds'] * 1e3:.2f} ms, Phase-2 "
              f"{report['phase2']['train_tokens_per_second']:,.0f} tokens/s; wrote {path}")
    return report


if __name__ == "__main__":
    main()
