"""Speed of the three hot stages against the seeds' plain per-token loops: `python benchmarks/bench.py`.

Builds a model of `--blocks` one-layer blocks with context_dim = embed_dim = `--dim`
(hidden H = 2·dim) and vocabulary `--vocab` on `--tokens` token ids (the real stream from
data/cache/stream.safetensors when present, repeated to length; else seeded random ids), and
times on whatever device it finds, after warm-up, with the device synchronised around every
timed region, the median of `--repeats`:

- Phase 1: iteration 0 (`scan.exact_scan`) and one parallel iteration (`phase1.jacobi_step`);
- C*: the exact scan, and its max abs difference from the plain scan (`model.scan`);
- Phase 2: a training step (`phase2.train_batch`, the body of `train_phase2`'s loop) and
  evaluation (`phase2.evaluate_fixed`);

and the same work written as the seeds wrote it: per-token eager loops in float32 (Phase 1:
forward + backward + optimizer step per token, seed 004's `_train_one_token`; C*: one
`model.step` per token; Phase 2: forward + backward + step per token). The reference loops run
on the first `--ref-tokens` tokens only and are extrapolated per token.

Phase 1 has a second reference, the original code's algorithm (rato-tokyo/new-llm,
src/trainers/phase1.py; `original_phase1_iteration`), plain eager float32: iteration 0 a
sequential per-token pass from c = 0 (timed on the first `--ref-scan-tokens` tokens,
extrapolated per token), every later iteration one batched forward over all tokens with the
shifted previous contexts, its losses, one backward, clipping and one Adam step (timed on the
whole stream). The seed-004 loop makes one Adam step per token, the original one per
iteration; the JSON and the table keep the two apart (`phase1.reference` is the seed-004 loop,
`phase1.reference_original` the original algorithm) and give the ratios against each.

The hyperparameters are validated params sections (`cvfp.params`): the schema's defaults,
with the sizes and precision from the flags. Variants of the fast paths are `cvfp.fast.FastOptions`
values passed to the library; the plain path is the library's CVFP_FAST=0 override.

FLOPs (multiply-adds count 2; only the matrix products, which are all but a few percent):
  P = L·(C+E)·H, the block weights (L layers); one model step F is 2·P FLOPs per token.
  Phase 1 parallel iteration: 6·P·N (forward + backward = 3 forward); iteration 0: 2·P·N.
  Phase 2 training: 6·(P + (C+E)·V) per token (blocks + head); evaluation: 2·(P + (C+E)·V).
MFU = those FLOPs / elapsed / the device's dense peak, measured here with the largest matrix
product of `--precision`'s dtype (bf16 8192³ on CUDA, fp32 1024³ on the CPU).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import platform
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from common import (build_model, device_name, load_ids, median, model_section, plain_path, prepare_phase1,
                    prepare_phase2, resolve_precision, synchronize, timed)
from cvfp import baselines, fast, phase1, phase2, scan
from cvfp.distributed import SINGLE, backward_and_step
from cvfp.model import CVFPModel, trainable_parameters
from cvfp.params import BaselinesParams, GRUBaselineParams, Phase1Params, Phase2Params

TARGETS = {"phase1_ratio": 200.0, "phase1_parallel_mfu": 0.45, "cstar_ratio": 100.0,
           "phase2_train_ratio": 2000.0, "phase2_train_mfu": 0.40}
GRU_SEQ_LEN = 512  # positions per window of the GRU comparison line
GRU_LAYERS = 2


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python benchmarks/bench.py", description=__doc__.split("\n")[0])
    parser.add_argument("--blocks", type=int, default=6)
    parser.add_argument("--dim", type=int, default=768, help="context_dim = embed_dim")
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--tokens", type=int, default=65536)
    parser.add_argument("--iterations", type=int, default=10, help="Phase-1 iterations, iteration 0 included")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"],
                        help="parallel passes; auto: bf16 on CUDA, fp32 on the CPU")
    parser.add_argument("--batch-tokens", type=int, default=0, help="Phase-1 chunk; 0: all tokens in one chunk")
    parser.add_argument("--p2-batch", type=int, default=65536, help="Phase-2 training positions per step")
    parser.add_argument("--eval-batch", type=int, default=65536)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--scan-repeats", type=int, default=2)
    parser.add_argument("--ref-tokens", type=int, default=512, help="tokens the training reference loops time")
    parser.add_argument("--ref-scan-tokens", type=int, default=2048,
                        help="tokens the plain scan times; the fast scans are compared with it over them")
    parser.add_argument("--threads", type=int, default=0,
                        help="CPU threads for torch (0: torch's default); 1 keeps a shared CPU from stalling barriers")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-gru", action="store_true")
    parser.add_argument("--no-variants", action="store_true", help="skip the plain-path and compiled-scan variants")
    parser.add_argument("--tuning", action="store_true",
                        help="after the table: profile a Phase-1 iteration and try inductor's max-autotune (CUDA)")
    parser.add_argument("--json", default=None, help="output file (default metrics/timing/bench-<device>.json)")
    return parser.parse_args(argv)


# ---------- the plain references: per-token eager loops in float32, as the seeds wrote them

def reference_phase1_iteration(model: CVFPModel, embeddings: torch.Tensor, previous: torch.Tensor,
                               tokens: int, device: torch.device, params: Phase1Params) -> float:
    """Seconds per token of the seed's `_train_one_token` loop: one forward, backward and Adam step per token."""
    trainable = prepare_phase1(model)
    optimizer = torch.optim.Adam(trainable, lr=params.lr)
    weight, momentum = params.dist_reg_weight, params.ema_momentum
    state: dict[str, torch.Tensor] = {}
    context = previous[-1:].clone()

    def one_token(t: int) -> torch.Tensor:
        new_context, _ = model.step(context.detach(), embeddings[t:t + 1])
        cvfp = F.mse_loss(new_context, previous[t:t + 1])
        flat = new_context[0]
        if not state:
            state["mean"], state["var"] = flat.detach(), torch.ones_like(flat)
            diversity = torch.zeros((), device=device)
        else:
            diversity = 1.0 / (state["var"].mean() + 1e-6)
            with torch.no_grad():
                deviation = flat - state["mean"]
                state["mean"] = momentum * state["mean"] + (1 - momentum) * flat
                state["var"] = momentum * state["var"] + (1 - momentum) * deviation ** 2
        total = (1 - weight) * cvfp + weight * diversity
        optimizer.zero_grad()
        total.backward()
        torch.nn.utils.clip_grad_norm_(trainable, params.grad_clip)
        optimizer.step()
        return new_context

    for t in range(8):  # warm-up
        context = one_token(t)
    synchronize(device)
    tick = time.perf_counter()
    for t in range(tokens):
        context = one_token(t)
    synchronize(device)
    return (time.perf_counter() - tick) / tokens


def original_phase1_iteration(model: CVFPModel, embeddings: torch.Tensor, previous: torch.Tensor, scan_tokens: int,
                              device: torch.device, params: Phase1Params, repeats: int) -> dict[str, Any]:
    """The original code's Phase 1 (rato-tokyo/new-llm, src/trainers/phase1.py), timed as plain eager float32.

    Iteration 0, as the original's sequential pass: from c = 0, one `model.step` per token in a
    Python loop, the contexts stacked at the end. The original runs it in training mode without
    `torch.no_grad`, so autograd records a graph that is then dropped; so does this. Seconds per
    token over the first `scan_tokens` tokens (after 8 tokens of warm-up).

    Iterations >= 1, as the original's parallel iterations: one batched forward of `model.step` over
    all N tokens, token t's input context the previous iteration's c_{t-1} and token 0's its last;
    the CVFP loss `F.mse_loss(C, previous)` and the diversity loss -||C - mean(C)||_F / N, combined
    (1 - w)·cvfp + w·diversity with w = `params.dist_reg_weight`; the original's finite check on the
    loss, one backward, gradient clipping to `params.grad_clip`, one Adam step (lr `params.lr`) over
    the trainable parameters; the new contexts are the next iteration's previous ones. Seconds per
    iteration over the whole stream, the median of `repeats` after one warm-up iteration.
    `embeddings` (N, E) and `previous` (N, C) are the whole stream; the model is modified.
    """
    trainable = prepare_phase1(model)
    optimizer = torch.optim.Adam(trainable, lr=params.lr)
    weight = params.dist_reg_weight
    model.train()
    scan_tokens = min(scan_tokens, embeddings.shape[0])

    def sequential(count: int) -> torch.Tensor:
        context = torch.zeros(1, model.context_dim, device=device)
        contexts = []
        for t in range(count):
            context, _ = model.step(context, embeddings[t:t + 1])
            contexts.append(context.squeeze(0))
        return torch.stack(contexts).detach()

    sequential(8)  # warm-up
    synchronize(device)
    tick = time.perf_counter()
    sequential(scan_tokens)
    synchronize(device)
    scan_per_token = (time.perf_counter() - tick) / scan_tokens

    state = {"previous": previous}

    def iteration() -> None:
        before = state["previous"]
        inputs = torch.zeros_like(before)
        inputs[1:] = before[:-1]
        inputs[0] = before[-1]
        contexts, _ = model.step(inputs, embeddings)
        cvfp = F.mse_loss(contexts, before)
        diversity = -torch.norm(contexts - contexts.mean(dim=0), p=2) / contexts.shape[0]
        total = (1 - weight) * cvfp + weight * diversity
        if not torch.isnan(total) and not torch.isinf(total):
            optimizer.zero_grad()
            total.backward()
            torch.nn.utils.clip_grad_norm_(trainable, params.grad_clip)
            optimizer.step()
        state["previous"] = contexts.detach()

    iteration_seconds = median(timed(iteration, device, repeats, warmup=1))
    return {"iteration0_seconds_per_token": scan_per_token, "iteration0_tokens_timed": scan_tokens,
            "parallel_iteration_seconds": iteration_seconds, "parallel_iteration_tokens": embeddings.shape[0],
            "parallel_iteration_repeats": repeats, "autograd_in_iteration0": True,
            "algorithm": "original code (rato-tokyo/new-llm src/trainers/phase1.py): iteration 0 a sequential "
                         "per-token pass from c = 0; each later iteration one batched Jacobi forward over all "
                         "tokens, one backward, clipping, one Adam step; eager fp32"}


def reference_phase2(model: CVFPModel, ids: torch.Tensor, cstar: torch.Tensor, tokens: int,
                     device: torch.device, train: bool, params: Phase2Params, seed: int) -> float:
    """Seconds per token of a per-token Phase-2 loop: forward (+ backward + Adam step when training)."""
    trainable = prepare_phase2(model, params, seed)
    optimizer = torch.optim.Adam(trainable, lr=params.lr)
    zero = torch.zeros(1, cstar.shape[1], device=device)
    nats = torch.zeros((), device=device)

    def one_token(t: int) -> None:
        nonlocal nats
        context_in = cstar[t - 1:t] if t > 0 else zero
        context_out, token_out = model.step(context_in, model.embed(ids[t:t + 1]))
        logits = model.logits(context_out, token_out)
        loss = (F.cross_entropy(logits, ids[t + 1:t + 2])
                + params.context_stability_weight * F.mse_loss(context_out, cstar[t:t + 1]))
        if train:
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, params.grad_clip)
            optimizer.step()
        else:
            nats = nats + loss.detach()

    with torch.set_grad_enabled(train):
        for t in range(8):
            one_token(t)
        synchronize(device)
        tick = time.perf_counter()
        for t in range(tokens):
            one_token(t)
        synchronize(device)
    return (time.perf_counter() - tick) / tokens


# ---------- the stages as the pipeline runs them

def bench_phase1(args, device, precision, ids, report) -> torch.Tensor:
    """Iteration 0 and parallel iterations; returns the scan's contexts (reused as C*)."""
    model = build_model(model_section(args.blocks, args.dim), args.vocab, args.seed, device)
    reference_model = copy.deepcopy(model).float()
    original_model = copy.deepcopy(model).float()
    params = Phase1Params(batch_tokens=args.batch_tokens or args.tokens, precision=precision)
    trainable = prepare_phase1(model)
    optimizer = fast.adam(trainable, params.lr, device)  # as train_phase1 builds it
    with torch.no_grad():
        embeddings = model.embed(ids)
    n = embeddings.shape[0]

    scan.exact_scan(model, embeddings[:4 * scan.GRAPH_TOKENS])  # warm-up
    scan_seconds = median(timed(lambda: scan.exact_scan(model, embeddings), device, args.scan_repeats, warmup=0))
    contexts = scan.exact_scan(model, embeddings)

    diversity = phase1.DiversityLoss(params.diversity, params.ema_momentum)
    state = {"previous": contexts}

    def iterations(adam: torch.optim.Optimizer, options: fast.FastOptions = fast.DEFAULT):
        def iteration():
            state["previous"], _, _ = phase1.jacobi_step(model, embeddings, state["previous"], diversity, params,
                                                         optimizer=adam, options=options)
        return iteration

    iteration = iterations(optimizer)
    tick = time.perf_counter()
    iteration()  # compiles on CUDA
    synchronize(device)
    first_call = time.perf_counter() - tick
    iteration_seconds = median(timed(iteration, device, args.repeats, warmup=1))

    flops_iteration = 6 * report["flops"]["P"] * n
    flops_scan = 2 * report["flops"]["P"] * n
    rest = args.iterations - 1
    total = scan_seconds + rest * iteration_seconds
    peak = report["peak"]["tflops"] * 1e12
    out = {"iteration0_seconds": scan_seconds, "parallel_iteration_seconds": iteration_seconds,
           "parallel_iteration_first_call_seconds": first_call, "iterations": args.iterations,
           "total_seconds": total, "token_iterations_per_second": n * args.iterations / total,
           "parallel_mfu": flops_iteration / iteration_seconds / peak,
           "total_mfu": (flops_scan + rest * flops_iteration) / total / peak,
           "batch_tokens": params.batch_tokens, "precision": precision}

    if not args.no_variants:
        with plain_path():  # the plain pipeline path on this device: two passes, eager, same chunk
            out["plain_path_parallel_iteration_seconds"] = median(timed(iteration, device, max(2, args.repeats // 2)))
        if fast.enabled(device) and precision == "bf16":
            # compiled, single pass, but the residual stream in float32 (autocast only)
            autocast_only = iterations(optimizer, fast.FastOptions(bf16_stream=False))
            out["autocast_only_parallel_iteration_seconds"] = median(timed(autocast_only, device, args.repeats, 1))
            # the previous step: foreach Adam, the skip decided on the host, eager losses
            unfused = fast.FastOptions(fused_step=False)
            unfused_step = iterations(fast.adam(trainable, params.lr, device, unfused), unfused)
            out["unfused_step_parallel_iteration_seconds"] = median(timed(unfused_step, device, args.repeats, 1))

    if precision == "bf16":  # how far the bf16 fast pass lands from float32 (‖Δ‖ / ‖ref‖)
        inputs = phase1.shifted_inputs(state["previous"])
        got = phase1.parallel_pass(model, embeddings, inputs, params.batch_tokens, precision)
        with plain_path():
            exact = phase1.parallel_pass(model, embeddings, inputs, params.batch_tokens, "fp32")
        out["bf16_relative_error_vs_fp32"] = float((got - exact).norm() / exact.norm())

    ref_tokens = min(args.ref_tokens, n - 8)
    with torch.no_grad():
        ref_embeddings = reference_model.embed(ids[:ref_tokens + 8])
    ref_train = reference_phase1_iteration(reference_model, ref_embeddings, contexts[:ref_tokens + 8].float(),
                                           ref_tokens, device, params)
    out["reference"] = {"train_seconds_per_token": ref_train, "tokens_timed": ref_tokens,
                        "algorithm": "seed 004's per-token loop (_train_one_token): one forward, backward and Adam "
                                     "step per token; iteration 0 = the plain scan (cstar.reference); eager fp32"}

    # the original algorithm: its sequential iteration 0, then one batched step per iteration (whole stream)
    with torch.no_grad():
        original_embeddings = original_model.embed(ids)
    original = original_phase1_iteration(original_model, original_embeddings, contexts.float(),
                                         args.ref_scan_tokens, device, params, max(2, args.repeats // 2))
    original["iteration0_seconds_extrapolated"] = n * original["iteration0_seconds_per_token"]
    original["total_seconds_extrapolated"] = (original["iteration0_seconds_extrapolated"]
                                              + rest * original["parallel_iteration_seconds"])
    out["reference_original"] = original
    out["ratio_vs_original"] = original["total_seconds_extrapolated"] / total
    out["iteration0_ratio_vs_original"] = original["iteration0_seconds_extrapolated"] / scan_seconds
    out["parallel_iteration_ratio_vs_original"] = original["parallel_iteration_seconds"] / iteration_seconds
    report["phase1"] = out
    return contexts


def bench_cstar(args, device, ids, report) -> None:
    model = build_model(model_section(args.blocks, args.dim), args.vocab, args.seed, device)
    with torch.no_grad():
        embeddings = model.embed(ids)
    n = embeddings.shape[0]
    check = min(args.ref_scan_tokens, n)
    model.scan(embeddings[:8])
    synchronize(device)
    tick = time.perf_counter()
    plain = model.scan(embeddings[:check])  # the reference: one eager model.step per token
    synchronize(device)
    ref_per_token = (time.perf_counter() - tick) / check

    scan.exact_scan(model, embeddings[:4 * scan.GRAPH_TOKENS])
    seconds = median(timed(lambda: scan.exact_scan(model, embeddings), device, args.scan_repeats, warmup=0))
    exact = scan.exact_scan(model, embeddings[:check])
    out = {"seconds": seconds, "tokens": n, "tokens_per_second": n / seconds,
           "microseconds_per_token": 1e6 * seconds / n,
           "max_abs_diff_vs_plain": float((exact - plain).abs().max()), "compared_tokens": check,
           "path": "cuda_graph" if fast.enabled(device) else "torchscript",
           "reference": {"seconds_per_token": ref_per_token, "tokens_timed": check, "path": "model.scan (eager)"},
           "variants": {}}
    out["ratio"] = ref_per_token / (seconds / n)
    if not args.no_variants:
        variants = out["variants"]
        with plain_path():  # the previous pipeline path on this device: TorchScript loop, one launch per op
            plain_seconds = median(timed(lambda: scan.exact_scan(model, embeddings[:check]), device, 1))
            variants["torchscript_microseconds_per_token"] = 1e6 * plain_seconds / check
        if fast.enabled(device):
            try:
                compiled = lambda m: scan.graph_scan(model, embeddings[:m], compiled_step=True)  # noqa: E731
                got = compiled(check)
                variants["compiled_graph_max_abs_diff_vs_plain"] = float((got - plain).abs().max())
                cseconds = median(timed(lambda: compiled(n), device, args.scan_repeats, warmup=0))
                variants["compiled_graph_microseconds_per_token"] = 1e6 * cseconds / n
            except Exception as err:
                variants["compiled_graph_error"] = f"{type(err).__name__}: {err}"
    report["cstar"] = out


def bench_phase2(args, device, precision, ids, cstar, report) -> None:
    model = build_model(model_section(args.blocks, args.dim), args.vocab, args.seed, device)
    reference_model = copy.deepcopy(model).float()
    params = Phase2Params(precision=precision)
    trainable = prepare_phase2(model, params, args.seed)
    optimizer = fast.adam(trainable, params.lr, device)  # as train_phase2 builds it
    n = ids.shape[0]
    batch = min(args.p2_batch, n - 1)
    generator = torch.Generator().manual_seed(args.seed)
    order = torch.randperm(n - 1, generator=generator).to(device)
    batches = order[:(n - 1) // batch * batch].split(batch)
    state = {"i": 0}

    def train_steps(options: fast.FastOptions = fast.DEFAULT):
        def train_batch():  # the body of train_phase2's loop
            positions = batches[state["i"] % len(batches)]
            state["i"] += 1
            phase2.train_batch(model, optimizer, trainable, ids, cstar, positions, positions.numel(), params, SINGLE,
                               options)
        return train_batch

    train_batch = train_steps()
    tick = time.perf_counter()
    train_batch()
    synchronize(device)
    first_call = time.perf_counter() - tick
    step_seconds = median(timed(train_batch, device, args.repeats, warmup=1))
    per_token = report["flops"]["P"] + report["flops"]["head"]
    peak = report["peak"]["tflops"] * 1e12
    # every prediction scored, one byte each: the counting work of a split whose predictions all count
    scored = torch.ones(n - 1, dtype=torch.bool, device=ids.device)
    target_bytes = torch.ones(n - 1, dtype=torch.int64, device=ids.device)
    evaluate = lambda: phase2.evaluate_fixed(model, ids, cstar, scored, target_bytes,  # noqa: E731
                                             args.eval_batch, params.context_mode, precision)
    tick = time.perf_counter()
    evaluate()
    synchronize(device)
    eval_first_call = time.perf_counter() - tick
    eval_seconds = median(timed(evaluate, device, max(2, args.repeats // 2), warmup=0))

    out = {"train_batch": batch, "train_step_seconds": step_seconds, "train_first_call_seconds": first_call,
           "train_tokens_per_second": batch / step_seconds, "train_mfu": 6 * per_token * batch / step_seconds / peak,
           "eval_seconds": eval_seconds, "eval_first_call_seconds": eval_first_call,
           "eval_tokens_per_second": (n - 1) / eval_seconds, "eval_mfu": 2 * per_token * (n - 1) / eval_seconds / peak,
           "precision": precision}
    if not args.no_variants:
        with plain_path():
            out["plain_path_train_step_seconds"] = median(timed(train_batch, device, max(2, args.repeats // 2)))
        if fast.enabled(device) and precision == "bf16":
            autocast_only = train_steps(fast.FastOptions(bf16_stream=False))
            out["autocast_only_train_step_seconds"] = median(timed(autocast_only, device, args.repeats, 1))
            small = batch // 4  # how the rate falls with the batch (the optimizer step is per batch)
            if small >= 1024:
                batches = order[:small].split(small)
                seconds = median(timed(train_batch, device, args.repeats, 1))
                out["quarter_batch"] = {"batch": small, "tokens_per_second": small / seconds,
                                        "mfu": 6 * per_token * small / seconds / peak}

    ref_tokens = min(args.ref_tokens, n - 2)
    ref_train = reference_phase2(copy.deepcopy(reference_model), ids, cstar.float(), ref_tokens, device, True,
                                 params, args.seed)
    ref_eval = reference_phase2(reference_model, ids, cstar.float(), min(2 * ref_tokens, n - 2), device, False,
                                params, args.seed)
    out["reference"] = {"train_seconds_per_token": ref_train, "eval_seconds_per_token": ref_eval,
                        "tokens_timed": ref_tokens, "eval_tokens_timed": min(2 * ref_tokens, n - 2)}
    out["train_ratio"] = out["train_tokens_per_second"] * ref_train
    out["eval_ratio"] = out["eval_tokens_per_second"] * ref_eval
    report["phase2"] = out


def bench_tuning(args, device, precision, ids, report) -> None:
    """Where a parallel Phase-1 iteration spends its time (profiler), and inductor's max-autotune mode."""
    model = build_model(model_section(args.blocks, args.dim), args.vocab, args.seed, device)
    params = Phase1Params(batch_tokens=args.batch_tokens or args.tokens, precision=precision)
    trainable = prepare_phase1(model)
    optimizer = fast.adam(trainable, params.lr, device)
    with torch.no_grad():
        embeddings = model.embed(ids)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    previous = torch.randn(embeddings.shape[0], args.dim, device=device, generator=generator)
    diversity = phase1.DiversityLoss(params.diversity, params.ema_momentum)

    def iterations(options: fast.FastOptions):
        return lambda: phase1.jacobi_step(model, embeddings, previous, diversity, params, optimizer=optimizer,
                                          options=options)

    iteration = iterations(fast.DEFAULT)
    out: dict[str, Any] = {}
    timed(iteration, device, 1, warmup=2)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        iteration()
        synchronize(device)
    kernels = [e for e in prof.key_averages() if e.device_type.name == "CUDA"]
    total = sum(e.self_device_time_total for e in kernels)
    gemm = sum(e.self_device_time_total for e in kernels
               if any(w in e.key.lower() for w in ("gemm", "nvjet", "cutlass", "sm90_xmma", "mm_")))
    out["profile"] = {"kernel_ms": total / 1e3, "gemm_ms": gemm / 1e3, "kernels": sum(e.count for e in kernels),
                      "top": [(e.key[:90], round(e.self_device_time_total / 1e3, 3), e.count)
                              for e in sorted(kernels, key=lambda e: -e.self_device_time_total)[:14]]}
    report["tuning"] = out
    autotuned = iterations(fast.FastOptions(compile_mode="max-autotune-no-cudagraphs"))
    tick = time.perf_counter()
    autotuned()
    synchronize(device)
    out["max_autotune_first_call_seconds"] = time.perf_counter() - tick
    seconds = median(timed(autotuned, device, args.repeats, warmup=1))
    out["max_autotune_parallel_iteration_seconds"] = seconds
    out["max_autotune_parallel_mfu"] = 6 * report["flops"]["P"] * embeddings.shape[0] / seconds / (
        report["peak"]["tflops"] * 1e12)


def bench_gru(args, device, precision, ids, report) -> None:
    """Tokens per second of the baselines stage's GRU LM, sized to as many trainable parameters as Phase 2 trains."""
    params = BaselinesParams(seq_len=GRU_SEQ_LEN, gru=GRUBaselineParams(layers=GRU_LAYERS))
    width, _ = baselines.match_width("gru", report["phase2_trainable_parameters"], args.vocab, params)
    model = baselines.build("gru", baselines.baseline_args("gru", width, args.vocab, params)).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=params.gru.lr)  # as train_baseline builds it
    seq = params.seq_len
    rows = max(1, min(args.p2_batch, ids.shape[0] - 1) // seq)
    inputs = ids[:rows * seq].reshape(rows, seq)
    targets = ids[1:rows * seq + 1].reshape(rows, seq)

    def step():  # train_baseline's step on a full batch (no padded targets)
        with fast.autocast(device, precision):
            logits, _ = model(inputs)
        loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
        backward_and_step(loss, optimizer, list(model.parameters()), params.grad_clip, SINGLE)

    seconds = median(timed(step, device, args.repeats, warmup=2))
    report["gru"] = {"width": width, "layers": params.gru.layers, "parameters": trainable_parameters(model),
                     "batch": [rows, seq], "train_tokens_per_second": rows * seq / seconds,
                     "backend": "cuDNN" if device.type == "cuda" else "torch CPU", "precision": precision}


def summarise(report: dict[str, Any]) -> None:
    """Ratios and targets from the measured numbers (also when a section failed, with what is there)."""
    p1, cs, p2 = report.get("phase1"), report.get("cstar"), report.get("phase2")
    if p1 and cs:
        n, rest = report["config"]["tokens"], p1["iterations"] - 1
        ref_total = n * (cs["reference"]["seconds_per_token"] + rest * p1["reference"]["train_seconds_per_token"])
        p1["reference"]["total_seconds_extrapolated"] = ref_total
        p1["reference"]["iteration0_seconds_per_token"] = cs["reference"]["seconds_per_token"]
        p1["ratio"] = ref_total / p1["total_seconds"]
        p1["parallel_iteration_ratio"] = (n * p1["reference"]["train_seconds_per_token"]) / p1["parallel_iteration_seconds"]
        # the same two ratios under names that say what they are measured against
        p1["ratio_vs_seed004_loop"] = p1["ratio"]
        p1["parallel_iteration_ratio_vs_seed004_loop"] = p1["parallel_iteration_ratio"]
    met = {}
    if p1 and "ratio" in p1:
        met["phase1_ratio"] = p1["ratio"]
        met["phase1_parallel_mfu"] = p1["parallel_mfu"]
    if cs:
        met["cstar_ratio"] = cs["ratio"]
    if p2:
        met["phase2_train_ratio"] = p2["train_ratio"]
        met["phase2_train_mfu"] = p2["train_mfu"]
    report["targets"] = {k: {"target": TARGETS[k], "measured": v, "met": v >= TARGETS[k]} for k, v in met.items()}
    if "phase1_ratio" in report["targets"]:  # the target was set against the seed-004 loop
        report["targets"]["phase1_ratio"]["against"] = "seed-004 per-token loop (phase1.reference)"
        if p1 and "ratio_vs_original" in p1:
            report["targets"]["phase1_ratio"]["measured_vs_original"] = p1["ratio_vs_original"]


def table(report: dict[str, Any]) -> str:
    """The Markdown table BENCHMARKS.md keeps: ours beside each reference, each ratio labelled by its reference.

    Two references: the original code's algorithm (Phase 1 only; `phase1.reference_original`) and the
    seeds' per-token eager loops (seed 004's one-Adam-step-per-token loop for Phase 1, the plain scan for
    C*, per-token Phase-2 loops). Ratios are the reference's time over ours.
    """
    rows = [("stage", "ours", "original algorithm (eager fp32)", "ours ÷ original",
             "seeds' per-token loop (eager fp32)", "ours ÷ per-token loop", "MFU")]
    p1, cs, p2, gru = (report.get(k) for k in ("phase1", "cstar", "phase2", "gru"))
    fmt = lambda v, spec: "n/a" if v is None else format(v, spec)  # noqa: E731
    times = lambda v: "n/a" if v is None else format(v, ".1f" if v < 10 else ",.0f") + "×"  # noqa: E731
    if p1:
        ref, orig = p1["reference"], p1.get("reference_original", {})
        n = report["config"]["tokens"]
        rows += [
            (f"Phase 1, {p1['iterations']} iterations (s)", fmt(p1.get("total_seconds"), ".3f"),
             fmt(orig.get("total_seconds_extrapolated"), ".2f"), times(p1.get("ratio_vs_original")),
             fmt(ref.get("total_seconds_extrapolated"), ".1f"), times(p1.get("ratio")),
             fmt(p1.get("total_mfu"), ".1%")),
            ("Phase 1 iteration 0 = exact scan (s)", fmt(p1["iteration0_seconds"], ".3f"),
             fmt(orig.get("iteration0_seconds_extrapolated"), ".2f"), times(p1.get("iteration0_ratio_vs_original")),
             fmt(ref.get("iteration0_seconds_per_token", 0) * n, ".1f"), "", ""),
            ("Phase 1 parallel iteration (s)", fmt(p1["parallel_iteration_seconds"], ".4f"),
             fmt(orig.get("parallel_iteration_seconds"), ".4f"),
             times(p1.get("parallel_iteration_ratio_vs_original")),
             fmt(ref["train_seconds_per_token"] * n, ".1f"), times(p1.get("parallel_iteration_ratio")),
             fmt(p1["parallel_mfu"], ".1%")),
            ("Phase 1 token-iterations/s", fmt(p1["token_iterations_per_second"], ".3g"), "", "", "", "", ""),
        ]
    if cs:
        rows.append(("C* exact scan (tokens/s)", fmt(cs["tokens_per_second"], ".4g"), "", "",
                     fmt(1 / cs["reference"]["seconds_per_token"], ".4g"), times(cs["ratio"]),
                     f"max |Δ| vs plain {cs['max_abs_diff_vs_plain']:.1e}"))
    if p2:
        ref = p2["reference"]
        rows += [("Phase 2 training (tokens/s)", fmt(p2["train_tokens_per_second"], ".4g"), "", "",
                  fmt(1 / ref["train_seconds_per_token"], ".4g"), times(p2["train_ratio"]),
                  fmt(p2["train_mfu"], ".1%")),
                 ("Phase 2 evaluation (tokens/s)", fmt(p2["eval_tokens_per_second"], ".4g"), "", "",
                  fmt(1 / ref["eval_seconds_per_token"], ".4g"), times(p2["eval_ratio"]),
                  fmt(p2["eval_mfu"], ".1%"))]
    if gru:
        rows.append((f"{gru['backend']} GRU LM, {gru['parameters'] / 1e6:.1f} M params (tokens/s)",
                     fmt(gru["train_tokens_per_second"], ".4g"), "", "", "", "", ""))
    lines = ["| " + " | ".join(r) + " |" for r in rows]
    lines.insert(1, "|" + "---|" * len(rows[0]))
    return "\n".join(lines)


def measure_peak(device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """The dense matrix-product rate this device reaches: median of square products, two input sets rotated."""
    n = 8192 if device.type == "cuda" else 1024
    generator = torch.Generator(device=device).manual_seed(0)
    pairs = [(torch.randn(n, n, device=device, dtype=dtype, generator=generator),
              torch.randn(n, n, device=device, dtype=dtype, generator=generator)) for _ in range(2)]
    state = {"i": 0}

    def product():
        a, b = pairs[state["i"] % 2]
        state["i"] += 1
        torch.mm(a, b)

    seconds = median(timed(product, device, repeats=20 if device.type == "cuda" else 5, warmup=3))
    return {"tflops": 2 * n ** 3 / seconds / 1e12, "dtype": str(dtype).replace("torch.", ""),
            "method": f"torch.mm {n}x{n}x{n}, random inputs, median"}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else \
        torch.device(args.device)
    precision = resolve_precision(args.precision, device)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.backends.cuda.matmul.allow_tf32 = False  # float32 means float32 (the references, the exact scan)
    torch.backends.cudnn.allow_tf32 = False
    c = e = args.dim
    h = c + e
    flops = {"P": args.blocks * (c + e) * h, "head": (c + e) * args.vocab,
             "formulas": {"P": "L·(C+E)·H block weights; one step F = 2·P FLOPs/token",
                          "phase1_parallel_iteration": "6·P·N", "phase1_iteration0": "2·P·N",
                          "phase2_train": "6·(P + (C+E)·V)·B", "phase2_eval": "2·(P + (C+E)·V)·N"}}
    ids, source = load_ids(args.tokens, args.vocab, args.seed)
    ids = ids.to(device)
    report: dict[str, Any] = {
        "command": " ".join(["python benchmarks/bench.py", *(sys.argv[1:] if argv is None else argv)]),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": device_name(device), "torch": torch.__version__, "python": platform.python_version(),
        "fast_paths": fast.enabled(device),
        "config": {"blocks": args.blocks, "dim": args.dim, "vocab": args.vocab, "tokens": args.tokens,
                   "iterations": args.iterations, "precision": precision, "data": source},
        "flops": flops, "errors": {}}
    peak_dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    report["peak"] = measure_peak(device, peak_dtype)
    report["phase2_trainable_parameters"] = baselines.cvfp_trainable_parameters(
        model_section(args.blocks, args.dim), Phase2Params(precision=precision), args.vocab)

    path = Path(args.json or f"metrics/timing/bench-{device.type}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    def save(section: str) -> None:  # after every section, so a run cut short still leaves its numbers
        print(f"bench: {section} done at {time.perf_counter() - started:.0f}s", file=sys.stderr, flush=True)
        path.write_text(json.dumps(report, indent=2) + "\n")

    cstar_contexts = None
    sections = [("phase1", lambda: bench_phase1(args, device, precision, ids, report)),
                ("cstar", lambda: bench_cstar(args, device, ids, report))]
    for name, run in sections:
        try:
            result = run()
            if name == "phase1":
                cstar_contexts = result
        except Exception as err:
            report["errors"][name] = f"{type(err).__name__}: {err}\n{traceback.format_exc(limit=6)}"
        save(name)
    if cstar_contexts is None:
        model = build_model(model_section(args.blocks, args.dim), args.vocab, args.seed, device)
        with torch.no_grad():
            cstar_contexts = scan.exact_scan(model, model.embed(ids))
    try:
        bench_phase2(args, device, precision, ids, cstar_contexts.float(), report)
    except Exception as err:
        report["errors"]["phase2"] = f"{type(err).__name__}: {err}\n{traceback.format_exc(limit=6)}"
    save("phase2")
    if not args.no_gru:
        try:
            bench_gru(args, device, precision, ids, report)
        except Exception as err:
            report["errors"]["gru"] = f"{type(err).__name__}: {err}"
    summarise(report)
    report["table"] = table(report)
    save("all")
    if args.tuning and fast.enabled(device):
        try:
            bench_tuning(args, device, precision, ids, report)
        except Exception as err:
            report["errors"]["tuning"] = f"{type(err).__name__}: {err}"
        save("tuning")
        print(json.dumps(report.get("tuning"), indent=1))
    print(f"{report['device']}, torch {report['torch']}, {report['date']}, peak {report['peak']['tflops']:.1f} "
          f"TFLOP/s ({report['peak']['dtype']})")
    print(report["table"])
    for name, target in report["targets"].items():
        print(f"target {name}: {target['measured']:.3g} vs {target['target']:g} -> {'met' if target['met'] else 'NOT met'}")
    for name, err in report["errors"].items():
        print(f"error in {name}: {err}")
    print(f"wrote {path}")
    return report


if __name__ == "__main__":
    main()
