"""The original code (rato-tokyo/new-llm at 645b6c0), run as it is, beside this pipeline, on one GPU.

    PYTHONPATH=src python benchmarks/original_side_by_side.py --part scan|compare|all \\
        [-S key=value ...] [--data DIR] [--original .original] [--json PATH]

The sizes and hyperparameters are the repository's validated params (`params.yaml` through
`cvfp.params.validate`), with DVC-style `-S key=value` overrides applied first (the README's GPU
profile is such a list). Nothing about the model is hard-coded here. The original's files are
loaded from `--original` (its `src/models/llm.py`, `src/trainers/phase1.py`,
`src/trainers/phase2.py`, `src/evaluation/metrics.py`, `config.py`, e.g. unpacked with
`git archive 645b6c0 src config.py`) and are called unchanged. Both models start from the same
weights: this pipeline's seeded initialisation, copied into the original's `LLM` (its state dict
differs only in the name `fnn.0` for `fnn`); the first steps of the two are compared before use.

--part scan (the exact scan per token; one table):
  the fused CUDA kernel (`cvfp.kernels.scan`, fp32 and bf16 weights), the CUDA-graph path
  (`cvfp.scan.graph_scan`, what the pipeline's C* runs on CUDA), the eager `model.scan`, and the
  original's two per-token loops: its Phase-1 iteration 0 (`forward_all_tokens_sequential`,
  training mode, autograd recording, as the original runs it) and its C*
  (`Phase2Trainer.initialize_target_contexts`, no_grad, one embedding lookup per token). The
  kernel and graph path run the whole `--scan-tokens` stream; the eager and original loops a
  `--prefix`. Max abs differences from the eager scan on the prefix, and the kernel's
  teacher-forced one-step error against float64.

--part compare (Phase 1, C*, one Phase-2 epoch; both codes, the same tokens and weights):
  ours: `cvfp.phase1.train_phase1` (the stage's call, with val mirrored as the stage does),
  `cvfp.cstar.generate_cstar`, and one Phase-2 epoch as `train_phase2`'s loop runs it
  (`cvfp.phase2.train_batch` over `sampler_batches`). Each is timed cold (the first call in the
  process: torch.compile included, as a stage pays it) and warm (again, from the same weights).
  The original: `phase1_train` (its early stop disabled by its own config's
  `phase1_min_converged_ratio`, so it runs the iterations asked for),
  `Phase2Trainer.initialize_target_contexts` and `Phase2Trainer.train_epoch`. Its per-token loops
  are timed on a short probe first; if the predicted total exceeds `--original-budget-s`, the
  token count is halved (for both codes) until it fits, and the JSON says so. Effective rank of
  the final Phase-1 contexts of both, by this pipeline's metric (`cvfp.metrics.effective_rank`,
  `phase1.effective_rank_samples` rows) and by the original's formula on all rows
  (`analyze_fixed_points`, verbatim, on the first `--original-metric-rows` rows, checks it);
  convergence rate of the last iteration of both (tokens whose mean squared change is below
  `phase1.convergence_threshold`; the original's is recorded by wrapping its
  `update_convergence`, which is still the function that runs).

Progress: one line per step, and a heartbeat line every 30 s during a long call.
Every timed region is synchronised on the device (CUDA events for the scans).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import hashlib
import importlib.util
import io
import json
import math
import os
import platform
import statistics
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from cvfp.metrics import format_rank, format_rate  # noqa: E402
from cvfp.params import read_yaml, validate  # noqa: E402

STARTED = time.perf_counter()


def log(*parts: Any) -> None:
    print(f"[{time.perf_counter() - STARTED:7.1f}s]", *parts, flush=True)


@contextlib.contextmanager
def heartbeat(what: str, every: float = 30.0):
    """A line every `every` seconds while the block runs (the original's loops print nothing inside)."""
    done = threading.Event()
    tick = time.perf_counter()

    def beat():
        while not done.wait(every):
            log(f"  ... {what}: {time.perf_counter() - tick:.0f} s so far")

    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def wall(fn: Callable[[], Any]) -> tuple[float, Any]:
    """Seconds of fn() with the device synchronised before and after, and its result."""
    sync()
    tick = time.perf_counter()
    out = fn()
    sync()
    return time.perf_counter() - tick, out


def events(fn: Callable[[], Any], repeats: int) -> tuple[list[float], Any]:
    """Seconds of each of `repeats` calls of fn (CUDA events), and the last result."""
    times, out = [], None
    for _ in range(repeats):
        sync()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = fn()
        end.record()
        sync()
        times.append(start.elapsed_time(end) / 1e3)
    return times, out


def deterministic(flag: bool) -> None:
    """torch's deterministic-kernels flag: on for this pipeline (its stages set it), off for the original."""
    torch._C._set_deterministic_algorithms(flag, warn_only=True)


# ---------- params: params.yaml, -S overrides, validated

def parse_value(text: str) -> Any:
    from ruamel.yaml import YAML

    return YAML(typ="safe", pure=True).load(text)


def load_params(path: Path, overrides: list[str]):
    raw = read_yaml(path)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            sys.exit(f"-S {item!r}: expected key=value")
        node = raw
        *parents, leaf = key.split(".")
        for name in parents:
            node = node.setdefault(name, {})
        node[leaf] = parse_value(value)
    return validate(raw, f"{path} with {' '.join('-S ' + o for o in overrides) or 'no overrides'}")


# ---------- the original's files, loaded by path (its package is also called `src`)

ORIGINAL_FILES = {"llm": "src/models/llm.py", "phase1": "src/trainers/phase1.py", "phase2": "src/trainers/phase2.py",
                  "metrics": "src/evaluation/metrics.py", "config": "config.py"}


def load_original(folder: Path) -> dict[str, Any]:
    modules = {}
    for name, rel in ORIGINAL_FILES.items():
        path = folder / rel
        if not path.is_file():
            sys.exit(f"{path}: missing; unpack the original first (git archive 645b6c0 src config.py)")
        spec = importlib.util.spec_from_file_location(f"original_{name}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        modules[name] = module
    return modules


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def provenance(folder: Path) -> dict[str, Any]:
    commit = (folder / "COMMIT").read_text().split() if (folder / "COMMIT").is_file() else []
    ours = sorted(p for p in (ROOT / "src" / "cvfp").rglob("*") if p.suffix in (".py", ".cu", ".cpp"))
    digest = hashlib.sha256()
    for p in ours:
        digest.update(str(p.relative_to(ROOT)).encode() + b"\0" + p.read_bytes())
    return {"original_commit": commit, "original_sha256": {rel: sha256(folder / rel) for rel in ORIGINAL_FILES.values()},
            "ours_src_sha256": digest.hexdigest(), "ours_src_files": len(ours),
            "this_script_sha256": sha256(Path(__file__))}


# ---------- models and tokens

def build_ours(params, vocab: int, device: torch.device):
    """This pipeline's model as the phase1 stage builds it: seeded, from the validated `model` section."""
    from cvfp.model import CVFPModel, ModelArgs
    from cvfp.runtime import seed_everything

    seed_everything(params.seed)
    return CVFPModel(ModelArgs.from_params(params.model, vocab)).to(device)


def build_original(orig, params, vocab: int, ours, device: torch.device):
    """The original's LLM of the same sizes, holding `ours`'s weights."""
    m = params.model
    model = orig["llm"].LLM(vocab_size=vocab, embed_dim=m.embed_dim, context_dim=m.context_dim, hidden_dim=m.hidden_dim,
                            layer_structure=list(m.layer_structure), layernorm_mix=m.layernorm_mix,
                            use_pretrained_embeddings=False)
    state = {}
    for key, value in ours.state_dict().items():
        if key.startswith("context_decoder"):
            continue
        if m.layernorm_mix == 0 and (".context_norm." in key or ".token_norm." in key):
            continue  # the original has no LayerNorms at mix 0
        state[key.replace(".fnn.", ".fnn.0.")] = value
    model.load_state_dict(state, strict=True)
    return model.to(device)


def same_start(ours, original, embeddings: torch.Tensor) -> dict[str, float]:
    """Max abs difference of the two codes' first steps from c = 0 on the same rows (should be 0 or rounding)."""
    with torch.no_grad():
        zero = embeddings.new_zeros(embeddings.shape[0], ours.context_dim)
        a_c, a_x = ours.step(zero, embeddings)
        b_c, b_x = original._update_context_one_step(embeddings, zero, return_token=True)
    return {"context_max_abs": float((a_c - b_c).abs().max()), "token_max_abs": float((a_x - b_x).abs().max()),
            "rows": int(embeddings.shape[0])}


def load_tokens(args, params) -> dict[str, Any]:
    """{ids, val_ids, vocab, source}: the carved splits in --data when present, else seeded random ids."""
    data = Path(args.data) if args.data else None
    if data is not None and (data / "train.safetensors").is_file() and (data / "tokenizer.json").is_file():
        from cvfp.data.carve import load_split

        train = load_split(data / "train.safetensors", data / "tokenizer.json")
        val = load_split(data / "val.safetensors", data / "tokenizer.json") if (data / "val.safetensors").is_file() else None
        return {"ids": train.ids, "val_ids": val.ids if val is not None else None, "vocab": train.vocab_size,
                "source": f"{data}/train.safetensors ({train.num_tokens} tokens, {train.num_docs} documents; "
                          f"tokenizer sha256 {train.tokenizer_sha256[:16]})",
                "val_source": f"{data}/val.safetensors ({val.num_tokens} tokens)" if val is not None else None,
                "train_sha256": sha256(data / "train.safetensors")}
    generator = torch.Generator().manual_seed(params.seed)
    vocab = params.tokenizer.vocab_size
    n = max(args.tokens, args.scan_tokens)
    return {"ids": torch.randint(0, vocab, (n,), generator=generator),
            "val_ids": torch.randint(0, vocab, (max(n // 4, 2),), generator=generator), "vocab": vocab,
            "source": f"random ids (seed {params.seed}, vocab {vocab}): no carved splits in {data}", "val_source": None}


# ---------- part 1: the exact scan, per token

def part_scan(args, params, orig, tokens, device, out: dict) -> None:
    from cvfp import kernels, scan
    from cvfp.kernels import fused

    res: dict[str, Any] = {}
    out["scan"] = res
    deterministic(True)
    model = build_ours(params, tokens["vocab"], device).eval()
    ids = tokens["ids"]
    n = min(args.scan_tokens, ids.numel())
    prefix = min(args.prefix, n)
    if n < args.scan_tokens:
        log(f"scan: only {n} tokens available (asked {args.scan_tokens})")
    ids = ids[:n].to(device)
    with torch.no_grad():
        emb = model.embed(ids).contiguous()
    res.update({"tokens": n, "prefix_tokens": prefix, "model": params.model.model_dump(), "vocab": tokens["vocab"],
                "ids": tokens["source"]})
    log(f"scan: {n} tokens, prefix {prefix}, model {params.model.model_dump()}")
    eager_ref = None

    def section(name: str, fn: Callable[[], dict]) -> None:
        tick = time.perf_counter()
        log(f"scan [{name}] ...")
        try:
            with heartbeat(f"scan {name}"):
                res[name] = fn()
            r = res[name]
            log(f"scan [{name}] {r.get('us_per_token', float('nan')):.2f} us/token "
                f"({time.perf_counter() - tick:.1f} s)")
        except Exception as err:
            res[name] = {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()[-2000:]}
            log(f"scan [{name}] FAILED: {type(err).__name__}: {err}")

    def eager():
        nonlocal eager_ref
        model.scan(emb[:16])
        sec, out_ = wall(lambda: model.scan(emb[:prefix]))
        eager_ref = out_
        return {"seconds": sec, "tokens": prefix, "us_per_token": sec / prefix * 1e6, "path": "model.scan (eager)"}

    section("eager", eager)

    def diff(a: torch.Tensor) -> dict:
        if eager_ref is None:
            return {}
        m = min(a.shape[0], eager_ref.shape[0])
        d = (a[:m].double() - eager_ref[:m].double())
        rel = d.norm(dim=1) / eager_ref[:m].double().norm(dim=1)
        hit = torch.nonzero(rel > 1e-3)
        return {"vs_eager_max_abs": float(d.abs().max()), "vs_eager_tokens": m,
                "vs_eager_first_token_rel_above_1e-3": int(hit[0, 0]) if hit.numel() else None}

    ok, reason = kernels.check(device)
    res["kernel_available"], res["kernel_reason"] = ok, reason
    res["kernel_stats_mode"], res["kernel_barrier_mode"] = fused.STATS_MODE, fused.BARRIER_MODE

    def kernel(weights: str, repeats: int):
        def go():
            tick = time.perf_counter()
            kernels.scan(model, emb[:1024], weights=weights, strict=True)  # builds (first use) and plans
            first = time.perf_counter() - tick
            times, got = events(lambda: kernels.scan(model, emb, weights=weights, strict=True), repeats)
            sec = statistics.median(times)
            r = {"seconds": sec, "repeats_s": times, "tokens": n, "us_per_token": sec / n * 1e6,
                 "first_call_s": first, "path": fused.last_path, "finite": bool(torch.isfinite(got).all()),
                 "plan": kernels.plan(model, device, weights)}
            r.update(diff(got))
            return r
        return go

    section("kernel_fp32", kernel("fp32", args.repeats))
    section("kernel_bf16", kernel("bf16", 1))

    def step_error():
        """The kernel's teacher-forced step (from the eager trajectory) vs float64, and fp32 model.step vs float64."""
        from cvfp.model import CVFPModel

        m = min(prefix, 1024)
        prev = torch.cat([emb.new_zeros(1, model.context_dim), eager_ref[:m - 1]])
        with torch.no_grad():
            k_c, _ = kernels.step(model, prev, emb[:m], strict=True)
            p_c, _ = model.step(prev, emb[:m])
            m64 = CVFPModel(model.args).to(device)
            m64.load_state_dict(model.state_dict())
            r_c, _ = m64.double().eval().step(prev.double(), emb[:m].double())

        def rel(a):
            e = (a.double() - r_c).norm(dim=1) / r_c.norm(dim=1)
            return {"max": float(e.max()), "median": float(e.median())}
        return {"tokens": m, "kernel_fp32_vs_float64": rel(k_c), "model_step_fp32_vs_float64": rel(p_c)}

    if ok and eager_ref is not None:
        section("kernel_step_error", step_error)

    def graph():
        scan.graph_scan(model, emb[:1024])  # cuBLAS handles; each call captures its graph again
        times, got = events(lambda: scan.graph_scan(model, emb), args.graph_repeats)
        sec = statistics.median(times)
        r = {"seconds": sec, "repeats_s": times, "tokens": n, "us_per_token": sec / n * 1e6,
             "path": "cvfp.scan.graph_scan (exact: the eager step's kernels in one CUDA graph per 256 tokens)"}
        r.update(diff(got))
        return r

    section("graph_path", graph)

    # the original's loops: same weights, its own embedding call, its own functions
    deterministic(False)
    original = build_original(orig, params, tokens["vocab"], model, device)
    res["same_start"] = same_start(model, original, emb[:64])
    log(f"scan: same start (ours vs original, first step, 64 rows): {res['same_start']}")

    def original_phase1_iteration0():
        original.train()  # as phase1_train runs it: training mode, no no_grad, autograd records
        with torch.no_grad():
            embeds = original.embed_norm(original.token_embedding(ids[:prefix].unsqueeze(0))).squeeze(0)
        seq = orig["phase1"].forward_all_tokens_sequential
        seq(original, embeds[:16], None, device)
        sec, got = wall(lambda: seq(original, embeds, None, device))
        r = {"seconds": sec, "tokens": prefix, "us_per_token": sec / prefix * 1e6,
             "path": "original src/trainers/phase1.py forward_all_tokens_sequential (train mode, autograd recording)"}
        r.update(diff(got.detach()))
        return r

    section("original_phase1_iteration0", original_phase1_iteration0)

    def original_cstar():
        with contextlib.redirect_stdout(io.StringIO()):  # its constructor and this call print a line each
            trainer = orig["phase2"].Phase2Trainer(original, learning_rate=params.phase2.lr,
                                                   freeze_context=params.phase2.freeze_context,
                                                   gradient_clip=params.phase2.grad_clip)
            trainer.initialize_target_contexts(ids[:16], device)
        with contextlib.redirect_stdout(io.StringIO()):
            sec, got = wall(lambda: trainer.initialize_target_contexts(ids[:prefix], device))
        r = {"seconds": sec, "tokens": prefix, "us_per_token": sec / prefix * 1e6,
             "path": "original src/trainers/phase2.py Phase2Trainer.initialize_target_contexts (no_grad)"}
        r.update(diff(got))
        return r

    section("original_cstar", original_cstar)
    deterministic(True)
    rows = [("fused CUDA kernel, fp32 weights", "kernel_fp32"), ("fused CUDA kernel, bf16 weights", "kernel_bf16"),
            ("CUDA-graph path (graph_scan; the pipeline's C* on CUDA)", "graph_path"),
            ("eager model.scan", "eager"),
            ("original: Phase-1 iteration 0 loop (autograd recording)", "original_phase1_iteration0"),
            ("original: C* loop (initialize_target_contexts)", "original_cstar")]
    refs = [res.get(key, {}).get("us_per_token") for key in ("original_phase1_iteration0", "original_cstar")]
    lines = ["| path | tokens timed | us/token | original iteration-0 loop / this | original C* loop / this "
             "| max abs diff vs eager model.scan (tokens compared) |", "|---|---|---|---|---|---|"]
    for label, key in rows:
        r = res.get(key, {})
        if "us_per_token" not in r:
            lines.append(f"| {label} | | {r.get('error', 'not run')[:60]} | | | |")
            continue
        ratios = [f"{ref / r['us_per_token']:.1f}x" if ref else "" for ref in refs]
        d = f"{r['vs_eager_max_abs']:.3g} ({r['vs_eager_tokens']})" if "vs_eager_max_abs" in r else ""
        lines.append(f"| {label} | {r['tokens']} | {r['us_per_token']:.2f} | {ratios[0]} | {ratios[1]} | {d} |")
    res["table"] = "\n".join(lines)
    del original, model
    torch.cuda.empty_cache()


# ---------- part 2: Phase 1, C*, a Phase-2 epoch: ours and the original

def effective_ranks(orig, contexts: torch.Tensor, params, original_rows: int) -> dict[str, Any]:
    """This pipeline's metric (sampled rows) and the original's formula (all rows; verbatim on a prefix)."""
    from cvfp.metrics import effective_rank

    dim = contexts.shape[1]
    c = contexts.detach().float()
    ours_metric = effective_rank(c, params.phase1.effective_rank_samples, params.seed)
    # the original's formula (src/evaluation/metrics.py analyze_fixed_points, section 4) on every row
    s = torch.linalg.svdvals(c)
    p = s / s.sum()
    original_all = float(torch.exp(-(p * torch.log(p + 1e-10)).sum()))
    rows = min(original_rows, c.shape[0])
    verbatim = orig["metrics"].analyze_fixed_points(c[:rows], verbose=False)["effective_rank"]
    return {"dim": dim, "rows": int(c.shape[0]),
            "pipeline_metric": ours_metric, "pipeline_metric_rows": min(params.phase1.effective_rank_samples or c.shape[0],
                                                                        c.shape[0]),
            "original_formula_all_rows": original_all,
            "original_analyze_fixed_points_first_rows": verbatim, "original_analyze_fixed_points_rows": rows}


def part_compare(args, params, orig, tokens, device, out: dict, save: Callable[[], None]) -> None:
    from cvfp import fast
    from cvfp.cstar import generate_cstar
    from cvfp.distributed import SINGLE, sampler_batches
    from cvfp.phase1 import train_phase1
    from cvfp.phase2 import train_batch

    res: dict[str, Any] = {}
    out["compare"] = res
    p1, p2 = params.phase1, params.phase2
    vocab = tokens["vocab"]
    all_ids = tokens["ids"]
    n = min(args.tokens, all_ids.numel())
    cfg = orig["config"].ResidualConfig
    res.update({"model": params.model.model_dump(), "vocab": vocab, "ids": tokens["source"],
                "val_ids": tokens["val_source"], "phase1": p1.model_dump(), "phase2": p2.model_dump(),
                "original_min_converged_ratio": cfg.phase1_min_converged_ratio,
                "original_min_converged_ratio_from": "original config.py ResidualConfig.phase1_min_converged_ratio"})

    # the original's per-token costs on a probe, to fit the token count into the budget
    deterministic(False)
    probe_model = build_ours(params, vocab, device)
    original = build_original(orig, params, vocab, probe_model, device)
    with torch.no_grad():
        probe_emb = probe_model.embed(all_ids[:64].to(device))
    res["same_start"] = same_start(probe_model, original, probe_emb)
    log(f"compare: same start (first step, 64 rows): {res['same_start']}")
    k = min(args.probe_tokens, n)
    probe_ids = all_ids[:k].to(device)
    original.train()
    with torch.no_grad():
        emb_o = original.embed_norm(original.token_embedding(probe_ids.unsqueeze(0))).squeeze(0)
    seq = orig["phase1"].forward_all_tokens_sequential
    seq(original, emb_o[:8], None, device)
    t_seq, _ = wall(lambda: seq(original, emb_o, None, device))
    with contextlib.redirect_stdout(io.StringIO()):
        trainer = orig["phase2"].Phase2Trainer(original, learning_rate=p2.lr, freeze_context=p2.freeze_context,
                                               gradient_clip=p2.grad_clip)
        trainer.initialize_target_contexts(probe_ids[:8], device)
        t_cstar, _ = wall(lambda: trainer.initialize_target_contexts(probe_ids, device))
    t_epoch, _ = wall(lambda: trainer.train_epoch(probe_ids, device))
    rates = {"phase1_iteration0_s_per_token": t_seq / k, "cstar_s_per_token": t_cstar / k,
             "phase2_epoch_s_per_token": t_epoch / (k - 1), "probe_tokens": k}
    per_token = rates["phase1_iteration0_s_per_token"] + rates["cstar_s_per_token"] + rates["phase2_epoch_s_per_token"]
    asked = n
    while n * per_token > args.original_budget_s and n // 2 >= args.min_tokens:
        n //= 2
    res["original_probe"] = rates
    res["tokens_asked"], res["tokens"] = asked, n
    res["original_predicted_seconds"] = n * per_token
    res["token_count_rule"] = (f"halved from {asked} while the original's predicted per-token loops "
                               f"({per_token * 1e3:.2f} ms/token from a {k}-token probe) exceeded "
                               f"--original-budget-s {args.original_budget_s:g}")
    log(f"compare: original probe {rates}; {n} tokens (asked {asked}), original predicted {n * per_token:.0f} s")
    del trainer, original, probe_model
    torch.cuda.empty_cache()

    ids = all_ids[:n]
    val_ids = tokens["val_ids"][:n] if tokens["val_ids"] is not None else all_ids[n:n + n // 4]
    res["val_tokens"] = int(val_ids.numel()) if val_ids is not None else 0

    # ---- ours
    deterministic(True)
    model = build_ours(params, vocab, device)
    init_state = copy.deepcopy(model.state_dict())
    ours: dict[str, Any] = {}
    res["ours"] = ours

    def phase1_run(label: str):
        log(f"ours: Phase 1 ({label}), {p1.max_iterations} iterations, {n} train / {res['val_tokens']} val tokens, "
            f"precision {p1.precision}")
        with heartbeat(f"ours phase1 {label}"):
            sec, result = wall(lambda: train_phase1(model, ids, val_ids, p1, params.seed,
                                                    log=lambda line: log("  " + line)))
        history = result.history
        train_s = sum(row.get("train_seconds", 0.0) for row in history)
        return sec, result, {"seconds": sec, "train_seconds": train_s,
                             "train_iteration0_seconds": history[0].get("train_seconds"),
                             "iterations": len(history), "summary": result.summary, "timing": result.timing,
                             "history": history}

    sec, result, ours["phase1_cold"] = phase1_run("cold: compile included")
    model.load_state_dict(init_state)  # same parameter objects: the compiled step is reused
    sec, result, ours["phase1_warm"] = phase1_run("warm")
    contexts_ours = result.train_contexts
    summary = result.summary["train"]
    ours["phase1_convergence"] = {"converged": summary.get("converged_tokens"), "tokens": summary["tokens"]}
    ours["phase1_effective_rank"] = effective_ranks(orig, contexts_ours, params, args.original_metric_rows)
    log(f"ours: Phase 1 train effective rank {format_rank(ours['phase1_effective_rank']['pipeline_metric'], model.context_dim)}"
        f", convergence {format_rate(summary.get('converged_tokens', 0), summary['tokens'])}")

    cstar_times = []
    for label in ("cold", "warm"):
        s, cstar = wall(lambda: generate_cstar(model, ids, device))
        cstar_times.append(s)
        log(f"ours: C* ({label}) {n} tokens {s:.2f} s ({s / n * 1e6:.1f} us/token)")
    ours["cstar_seconds"] = cstar_times
    cstar = cstar.to(device)
    ids_dev = ids.to(device)

    model.init_head_(params.seed)
    trainable = model.set_trainable(p2.freeze_context, p2.freeze_embedding)
    optimizer = fast.adam(trainable, p2.lr, device)
    epochs = []
    for epoch in (1, 2):
        def one_epoch():
            steps = 0
            for batch, count in sampler_batches(n - 1, p2.batch_size, params.seed, epoch, SINGLE):
                train_batch(model, optimizer, trainable, ids_dev, cstar, batch.to(device), count, p2, SINGLE)
                steps += 1
            return steps
        with heartbeat(f"ours phase2 epoch {epoch}"):
            s, steps = wall(one_epoch)
        epochs.append({"seconds": s, "steps": steps, "positions": n - 1, "batch_size": p2.batch_size})
        log(f"ours: Phase 2 epoch {epoch} ({'cold: compile included' if epoch == 1 else 'warm'}) {steps} steps "
            f"of {p2.batch_size}, {s:.2f} s")
    ours["phase2_epochs"] = epochs
    save()
    del model, optimizer, trainable, cstar, init_state
    torch.cuda.empty_cache()

    # ---- the original, as it is
    deterministic(False)
    start_model = build_ours(params, vocab, device)  # the same seeded weights ours started from
    original = build_original(orig, params, vocab, start_model, device)
    del start_model
    theirs: dict[str, Any] = {}
    res["original"] = theirs
    recorded: list[dict[str, Any]] = []
    o1 = orig["phase1"]
    inner_convergence, inner_sequential = o1.update_convergence, o1.forward_all_tokens_sequential

    def update_convergence(current, previous, threshold, num_tokens):  # the original's function, its result recorded
        rate = inner_convergence(current, previous, threshold, num_tokens)
        recorded.append({"rate": rate, "converged": int(round(rate * num_tokens)), "tokens": num_tokens})
        return rate

    def forward_all_tokens_sequential(*a, **kw):  # the original's function, timed
        s, got = wall(lambda: inner_sequential(*a, **kw))
        theirs["phase1_iteration0_seconds"] = s
        return got

    o1.update_convergence, o1.forward_all_tokens_sequential = update_convergence, forward_all_tokens_sequential
    ids_dev = ids.to(device)
    log(f"original: phase1_train, {p1.max_iterations} iterations on {n} tokens "
        f"(predicted {n * rates['phase1_iteration0_s_per_token']:.0f} s for iteration 0)")
    try:
        with heartbeat("original phase1_train"):
            sec, contexts_orig = wall(lambda: o1.phase1_train(
                original, ids_dev, device, max_iterations=p1.max_iterations,
                convergence_threshold=p1.convergence_threshold,
                min_converged_ratio=cfg.phase1_min_converged_ratio, learning_rate=p1.lr,
                dist_reg_weight=p1.dist_reg_weight, label="Train"))
    finally:
        o1.update_convergence, o1.forward_all_tokens_sequential = inner_convergence, inner_sequential
    theirs["phase1_seconds"] = sec
    theirs["phase1_iterations"] = 1 + len(recorded)
    theirs["phase1_convergence_per_iteration"] = recorded
    last = recorded[-1] if recorded else {"converged": None, "tokens": n}
    theirs["phase1_convergence"] = {"converged": last["converged"], "tokens": last["tokens"]}
    theirs["phase1_effective_rank"] = effective_ranks(orig, contexts_orig, params, args.original_metric_rows)
    log(f"original: Phase 1 {sec:.1f} s; effective rank "
        f"{format_rank(theirs['phase1_effective_rank']['pipeline_metric'], contexts_orig.shape[1])}"
        f" (pipeline metric), convergence {format_rate(last['converged'] or 0, last['tokens'])}")
    del contexts_orig
    save()

    with contextlib.redirect_stdout(io.StringIO()):
        trainer = orig["phase2"].Phase2Trainer(original, learning_rate=p2.lr, freeze_context=p2.freeze_context,
                                               gradient_clip=p2.grad_clip)
    log(f"original: C* (initialize_target_contexts), predicted {n * rates['cstar_s_per_token']:.0f} s")
    with heartbeat("original C*"), contextlib.redirect_stdout(io.StringIO()):
        theirs["cstar_seconds"], _ = wall(lambda: trainer.initialize_target_contexts(ids_dev, device, is_training=True))
    log(f"original: C* {theirs['cstar_seconds']:.1f} s")
    log(f"original: Phase 2 epoch (train_epoch), predicted {n * rates['phase2_epoch_s_per_token']:.0f} s")
    with heartbeat("original train_epoch"):
        theirs["phase2_epoch_seconds"], (loss, ppl) = wall(lambda: trainer.train_epoch(ids_dev, device))
    theirs["phase2_epoch_loss"], theirs["phase2_epoch_steps"] = loss, 1
    log(f"original: Phase 2 epoch {theirs['phase2_epoch_seconds']:.1f} s (one optimizer step over {n - 1} positions, "
        f"loss {loss:.4f})")
    del trainer, original
    torch.cuda.empty_cache()
    deterministic(True)

    dim = params.model.context_dim
    o_rank, u_rank = theirs["phase1_effective_rank"], ours["phase1_effective_rank"]
    oc, uc = theirs["phase1_convergence"], ours["phase1_convergence"]
    its = p1.max_iterations
    rows = [
        (f"Phase 1, {its} iterations, stage call: train + val mirrored + per-iteration metrics (s)",
         ours["phase1_warm"]["seconds"], ours["phase1_cold"]["seconds"], theirs["phase1_seconds"]),
        # the library's per-iteration train_seconds are read without a device sync (iteration 0's queued scan
        # finishes inside the metrics after it), so ours' iteration 0 is shown as the synchronised C* scan of the
        # same tokens by the same exact_scan (H200.md, 2026-12-02)
        ("Phase 1 iteration 0 = sequential scan of train (s; ours: the synchronised C* scan of the same tokens)",
         cstar_times[1], cstar_times[0], theirs.get("phase1_iteration0_seconds")),
        ("C* scan of train (s)", cstar_times[1], cstar_times[0], theirs["cstar_seconds"]),
        (f"Phase 2, one epoch over {n - 1} positions (s; ours {epochs[1]['steps']} steps of {p2.batch_size}, "
         f"original 1 step)", epochs[1]["seconds"], epochs[0]["seconds"], theirs["phase2_epoch_seconds"]),
    ]
    lines = [f"tokens: {n} ({tokens['source']}); model {params.model.context_dim}+{params.model.embed_dim}, "
             f"{len(params.model.layer_structure)} blocks, vocab {vocab}",
             "", "| stage | ours, warm | ours, cold (compile included) | original (645b6c0) | original / ours warm "
                 "| original / ours cold |", "|---|---|---|---|---|---|"]
    for label, warm, cold, theirs_s in rows:
        lines.append(f"| {label} | {warm:.3f} | {cold:.3f} | {theirs_s:.2f} | {theirs_s / warm:.1f}x | "
                     f"{theirs_s / cold:.1f}x |")
    lines += ["", "| Phase 1, train, last iteration | ours | original |", "|---|---|---|",
              f"| effective rank, pipeline metric ({u_rank['pipeline_metric_rows']} sampled rows) | "
              f"{format_rank(u_rank['pipeline_metric'], dim)} | {format_rank(o_rank['pipeline_metric'], dim)} |",
              f"| effective rank, original formula (all {u_rank['rows']} rows) | "
              f"{format_rank(u_rank['original_formula_all_rows'], dim)} | {format_rank(o_rank['original_formula_all_rows'], dim)} |",
              f"| convergence (mean sq. change < {p1.convergence_threshold:g}) | {format_rate(uc['converged'] or 0, uc['tokens'])}"
              f" | {format_rate(oc['converged'] or 0, oc['tokens'])} |"]
    res["table"] = "\n".join(lines)


def write(results: dict, path: str) -> None:
    text = json.dumps(results, indent=1, default=str)
    targets = [Path(path)]
    if os.environ.get("OUT"):
        targets.append(Path(os.environ["OUT"]) / Path(path).name)
    for target in targets:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", default="all", choices=["scan", "compare", "all"])
    parser.add_argument("--params", default=str(ROOT / "params.yaml"))
    parser.add_argument("-S", "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--original", default=str(ROOT / ".original"))
    parser.add_argument("--data", default=None, help="folder with train/val.safetensors and tokenizer.json")
    parser.add_argument("--scan-tokens", type=int, default=65536, help="tokens of the kernel and graph-path scans")
    parser.add_argument("--prefix", type=int, default=2048, help="tokens of the eager and original scan loops")
    parser.add_argument("--repeats", type=int, default=3, help="kernel fp32 repeats (median)")
    parser.add_argument("--graph-repeats", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=65536, help="compare: train tokens, before the budget rule")
    parser.add_argument("--min-tokens", type=int, default=8192)
    parser.add_argument("--probe-tokens", type=int, default=256)
    parser.add_argument("--original-budget-s", type=float, default=330.0)
    parser.add_argument("--original-metric-rows", type=int, default=8192)
    parser.add_argument("--json", default=str(ROOT / "benchmarks" / "original_side_by_side.json"))
    args = parser.parse_args(argv)

    params = load_params(Path(args.params), args.overrides)
    from cvfp.runtime import resolve_device

    device = resolve_device(params.device)
    if device.type != "cuda":
        log(f"warning: device {device}: the kernel rows need CUDA")
    orig = load_original(Path(args.original))
    props = torch.cuda.get_device_properties(0) if device.type == "cuda" else None
    results: dict[str, Any] = {
        "device": props.name if props else str(device), "sms": props.multi_processor_count if props else 0,
        "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
        "argv": sys.argv, "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
        "overrides": args.overrides, "provenance": provenance(Path(args.original)),
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32, "cpu_threads": torch.get_num_threads(),
    }
    log(f"{results['device']}, torch {torch.__version__}; overrides {args.overrides}")
    tokens = load_tokens(args, params)
    log(f"tokens: {tokens['source']}")
    try:
        if args.part in ("scan", "all"):
            part_scan(args, params, orig, tokens, device, results)
            write(results, args.json)
        if args.part in ("compare", "all"):
            part_compare(args, params, orig, tokens, device, results, lambda: write(results, args.json))
    except Exception as err:
        results["error"] = f"{type(err).__name__}: {err}"
        results["traceback"] = traceback.format_exc()[-4000:]
        log(f"FAILED: {results['error']}\n{results['traceback']}")
    results["seconds"] = time.perf_counter() - STARTED
    write(results, args.json)
    for part in ("scan", "compare"):
        if "table" in results.get(part, {}):
            print("\n" + results[part]["table"], flush=True)


if __name__ == "__main__":
    main()
