"""Harness for issue 18: the fused scan kernel beside the CUDA-graph path, the eager scan and the
Jacobi solve, on one GPU, in one run.

    PYTHONPATH=src python benchmarks/scan_kernel.py [--tokens 65536] [--json benchmarks/h200-scan.json]

Per model (6 x 768 random init = chaotic; 6 x 768 with the context columns of W scaled down =
contracting; optionally the trained toy Phase-1 checkpoint), it records:
- us/token of `cvfp.kernels.scan` (fp32 and bf16 weights), of the graph path (`graph_scan`
  from cvfp.scan or cvfp.cstar, whichever imports; bit-equal to model.scan), of the eager
  `model.scan` on a prefix, and of the Jacobi solve (sweeps, seconds, certified or not);
- the kernel's per-step (teacher-forced) error against fp32 `model.step` and float64;
- the drift of the kernel's whole-stream contexts from the graph path's;
- the scan's top Lyapunov exponent along the graph path's trajectory (blocks, standard error).
Before any timing it writes down the predicted floor of the kernel (bytes per token from shared
memory and from L2, grid barriers per token) with the constants it assumes, and afterwards the
measured/predicted ratio. Every timed region is synchronised (CUDA events); kernel figures
are medians of repeats after a warm-up. Imports from the project: cvfp.model, cvfp.kernels,
and the graph path behind a guard.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

from cvfp import kernels
from cvfp.kernels import fused
from cvfp.model import CVFPModel, ModelArgs

ROOT = Path(__file__).resolve().parents[1]
DEVICE = torch.device("cuda")
STRICT = True  # kernel calls raise instead of falling back; --cpu-dry-run (harness self-check) turns it off

# Constants the floor assumes (leads, not readings; see benchmarks/H200.md)
ASSUMED = {
    "sm_clock_ghz": 1.98,              # boost clock seen under load on this kind (KINDS.md)
    "smem_bytes_per_clk_per_sm": 128,  # shared-memory read bandwidth per SM
    "l2_tb_per_s": 7.0,                # L2 read bandwidth, all SMs together (not measured here)
    "barrier_us": 0.8,                 # grid barrier: release-add + acquire-poll, ~2 L2 round trips
    "exchange_us": 0.35,               # reading u (D floats) and G partial statistics: 1 L2 round trip
    "layernorm_us": 0.15,              # Chan merge (shuffles), normalise, __syncthreads
}


def log(*args):
    print(*args, flush=True)


def graph_path():
    """(name, graph_scan) from whichever module holds it now, or (reason, None)."""
    errors = []
    for module in ("cvfp.scan", "cvfp.cstar"):
        try:
            fn = getattr(importlib.import_module(module), "graph_scan")
            return f"{module}.graph_scan", fn
        except Exception as err:  # moved or broken by a refactor: the harness carries on without it
            errors.append(f"{module}: {type(err).__name__}: {err}")
    return "; ".join(errors), None


def timed(fn, repeats=1, warmup=0):
    """Median seconds of `fn()` over repeats (CUDA events), and the last result."""
    for _ in range(warmup):
        fn()
    times, out = [], None
    if DEVICE.type != "cuda":
        for _ in range(repeats):
            t0 = time.perf_counter()
            out = fn()
            times.append(time.perf_counter() - t0)
        return statistics.median(times), times, out
    for _ in range(repeats):
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times), times, out


def make_model(c, e, layers, vocab, seed, context_scale=None):
    torch.manual_seed(seed)
    model = CVFPModel(ModelArgs(vocab_size=vocab, context_dim=c, embed_dim=e, hidden_dim=c + e,
                                layer_structure=[1] * layers))
    if context_scale is not None:
        with torch.no_grad():
            for block in model.blocks:
                for layer in block.layers:
                    layer.fnn.weight[:, :c] *= context_scale
    return model.eval()


def load_phase1(path: Path):
    payload = torch.load(path, map_location="cpu", weights_only=False)
    model = CVFPModel(ModelArgs(**payload["model_args"]))
    model.load_state_dict(payload["state_dict"])
    return model.eval()


def predict(plan: dict, d: int, layers: int, wbytes: int) -> dict:
    """Floor of one token, from the launch plan: bytes from shared memory and L2, barriers."""
    g, rmax, res = plan["ctas"], plan["rows_per_cta"], plan["resident_rows_per_cta"]
    row = d * wbytes
    base, extra = divmod(res, layers)
    smem_bw = ASSUMED["smem_bytes_per_clk_per_sm"] * ASSUMED["sm_clock_ghz"] * 1e9
    sync_us = ASSUMED["barrier_us"] + ASSUMED["exchange_us"] + ASSUMED["layernorm_us"]
    per_layer, smem_tok, l2_tok = [], 0, 0
    for l in range(layers):
        resident = min(rmax, base + (1 if l < extra else 0))
        streamed = rmax - resident
        smem_bytes = resident * row + rmax * d * 4  # resident weight rows + each row's read of z (fp32)
        l2_bytes = g * streamed * row
        smem_us = smem_bytes / smem_bw * 1e6
        l2_us = l2_bytes / (ASSUMED["l2_tb_per_s"] * 1e12) * 1e6
        per_layer.append(sync_us + smem_us + max(0.0, l2_us - sync_us))  # the stream hides behind the barrier
        smem_tok += g * smem_bytes
        l2_tok += l2_bytes
    return {"us_per_token": sum(per_layer), "barriers_per_token": layers, "smem_bytes_per_token": smem_tok,
            "l2_weight_bytes_per_token": l2_tok, "weight_bytes_per_token": layers * d * d * wbytes,
            "resident_weight_fraction": 1 - l2_tok / (layers * d * d * wbytes), "per_layer_us": per_layer,
            "sync_us_per_layer": sync_us}


def drift(a: torch.Tensor, ref: torch.Tensor) -> dict:
    """Relative per-token error ||a_t - ref_t|| / ||ref_t|| along the stream."""
    e = ((a.double() - ref.double()).norm(dim=1) / ref.double().norm(dim=1)).cpu()
    n = e.numel()
    out = {"max": float(e.max()), "median": float(e.median()), "final": float(e[-1]),
           "max_abs": float((a - ref).abs().max())}
    for thr in (1e-5, 1e-3, 1e-1):
        hit = torch.nonzero(e > thr)
        out[f"first_token_above_{thr:g}"] = int(hit[0, 0]) if hit.numel() else None
    out["at_token"] = {str(t): float(e[t]) for t in [2 ** k for k in range(0, 17)] + [n - 1] if t < n}
    return out


@torch.no_grad()
def step_error(model, prev, emb, weights):
    """Teacher-forced one-step error (max and median over tokens) vs float64, for the kernel and fp32 model.step."""
    k_c, k_x = kernels.step(model, prev, emb, weights=weights, strict=STRICT)
    p_c, p_x = model.step(prev, emb)
    m64 = CVFPModel(model.args).to(prev.device)
    m64.load_state_dict(model.state_dict())
    m64 = m64.double().eval()
    r_c, r_x = m64.step(prev.double(), emb.double())

    def rel(a, r):
        e = (a.double() - r).norm(dim=1) / r.norm(dim=1)
        return {"max": float(e.max()), "median": float(e.median())}

    return {"kernel_context": rel(k_c, r_c), "kernel_token_out": rel(k_x, r_x), "plain_context": rel(p_c, r_c),
            "plain_token_out": rel(p_x, r_x), "kernel_vs_plain_max_abs": float((k_c - p_c).abs().max())}


def diagnostics(model, emb) -> dict:
    """Where the kernel's time goes: grid barriers alone, then the scan with parts left out; picks the barrier."""
    out = {"barrier_bench": [fused.barrier_bench(20000, mode) for mode in (-1, 0, 1, 2, 3)]}
    for b in out["barrier_bench"]:
        log(f"  barrier mode {b['mode']:+d}: {b['us_per_barrier']:.3f} us/barrier, SM clock {b['sm_clock_ghz']:.3f} GHz")
    n = emb.shape[0]
    variants = {}
    for name, opts in (("mode0", dict(barrier_mode=0)), ("mode1", dict(barrier_mode=1)), ("mode2", dict(barrier_mode=2)),
                       ("mode3", dict(barrier_mode=3)),
                       ("mode0_stats1", dict(barrier_mode=0, stats_mode=1)),
                       ("mode0_stats1_skip_matvec", dict(barrier_mode=0, stats_mode=1, skip_matvec=1)),
                       ("mode0_stats1_skip_barrier", dict(barrier_mode=0, stats_mode=1, skip_matvec=4)),
                       ("mode0_skip_matvec", dict(barrier_mode=0, skip_matvec=1)),
                       ("mode0_skip_matvec_merge", dict(barrier_mode=0, skip_matvec=3)),
                       ("mode0_skip_matvec_merge_barrier", dict(barrier_mode=0, skip_matvec=7)),
                       ("mode0_skip_barrier", dict(barrier_mode=0, skip_matvec=4))):
        kernels.scan(model, emb[:256], strict=True, **opts)
        sec, _, _ = timed(lambda: kernels.scan(model, emb, strict=True, **opts), repeats=1)
        variants[name] = sec / n * 1e6
        log(f"  scan {name}: {variants[name]:.2f} us/token ({n} tokens)")
    out["scan_us_per_token"] = variants
    best = min((0, 1, 3), key=lambda m: variants[f"mode{m}"])
    fused.BARRIER_MODE = best
    out["barrier_mode_chosen"] = best
    # stats_mode 1 (warp 0 merges the LayerNorm partials; the library's default) is kept only if it gives the same
    # bits as stats_mode 0 and is faster; otherwise the rest of the run uses mode 0
    same = torch.equal(kernels.scan(model, emb[:512], strict=True, stats_mode=1),
                       kernels.scan(model, emb[:512], strict=True, stats_mode=0))
    out["stats1_bit_equal_to_stats0"] = bool(same)
    fused.STATS_MODE = 1 if same and variants["mode0_stats1"] < variants["mode0"] else 0
    out["stats_mode_chosen"] = fused.STATS_MODE
    log(f"  chosen: barrier mode {best}, stats mode {fused.STATS_MODE} (stats1 bit-equal to stats0: {same})")
    return out


def section(results: dict, name: str, fn):
    t0 = time.perf_counter()
    try:
        results[name] = fn()
    except Exception as err:
        results[name] = {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()[-2000:]}
        log(f"  [{name}] FAILED: {type(err).__name__}: {err}")
    log(f"  [{name}] {time.perf_counter() - t0:.1f} s")


def bench_model(label, model, ids, args, graph_scan, extras: bool):
    device = DEVICE
    model = model.to(device)
    with torch.no_grad():
        emb = model.embed(ids.to(device)).contiguous()
    n, d, layers = emb.shape[0], model.args.context_dim + model.args.embed_dim, len(model.blocks)
    r: dict = {"label": label, "tokens": n, "context_dim": model.args.context_dim, "embed_dim": model.args.embed_dim,
               "layers": layers, "weights_mb_fp32": layers * d * d * 4 / 1e6}
    log(f"== {label}: {n} tokens, D = {d}, L = {layers}")
    if DEVICE.type == "cuda":
        r["plan_fp32"] = kernels.plan(model, device, "fp32")
        r["plan_bf16"] = kernels.plan(model, device, "bf16")
    else:  # dry run: the H200's plan for these sizes (132 SMs, 227 KB of shared memory per block)
        rmax = -(-d // 132)
        for w, b in (("fp32", 4), ("bf16", 2)):
            res = min(layers * rmax, (232448 - 1024 - (2 * d + 32 + 2 * 128) * 4) // (d * b))
            r[f"plan_{w}"] = {"ctas": -(-d // rmax), "rows_per_cta": rmax, "resident_rows_per_cta": res}
    r["predicted_fp32"] = predict(r["plan_fp32"], d, layers, 4)
    r["predicted_bf16"] = predict(r["plan_bf16"], d, layers, 2)
    log(f"  plan fp32 {r['plan_fp32']}\n  predicted floor: fp32 {r['predicted_fp32']['us_per_token']:.2f} us/token, "
        f"bf16 {r['predicted_bf16']['us_per_token']:.2f} us/token")
    ctx = {}

    def run_kernel(weights, keep=None, **opts):
        """Times the whole stream; `keep` names the result in ctx (and times it with all the repeats)."""
        def go():
            kernels.scan(model, emb[:1024], weights=weights, strict=STRICT, **opts)  # warm-up (plan, first launch)
            sec, all_sec, out = timed(lambda: kernels.scan(model, emb, weights=weights, strict=STRICT, **opts),
                                      repeats=args.repeats if (keep or not opts) else 1)
            name = keep or (f"kernel_{weights}" if not opts else None)
            if name:
                ctx[name] = out
            return {"seconds": sec, "repeats_s": all_sec, "us_per_token": sec / n * 1e6, "barrier_mode": fused.BARRIER_MODE,
                    "stats_mode": opts.get("stats_mode", fused.STATS_MODE),
                    "finite": bool(torch.isfinite(out).all())}
        return go

    if extras and DEVICE.type == "cuda":
        section(r, "diagnostics", lambda: diagnostics(model, emb[:min(n, 16384)]))
    if args.stats_modes and DEVICE.type == "cuda":  # fp32, each stats mode named, whole stream, all repeats
        for sm in (0, 1):
            section(r, f"kernel_fp32_stats{sm}", run_kernel("fp32", keep=f"stats{sm}", stats_mode=sm))
        if "stats0" in ctx and "stats1" in ctx:
            r["stats1_bit_equal_to_stats0_whole_stream"] = bool(torch.equal(ctx["stats0"], ctx["stats1"]))
            log(f"  stats mode 1 == stats mode 0 over all {n} tokens, to the bit: "
                f"{r['stats1_bit_equal_to_stats0_whole_stream']}")
        ctx.pop("stats0", None)
        ctx.pop("stats1", None)
    section(r, "kernel_fp32", run_kernel("fp32"))
    section(r, "kernel_bf16", run_kernel("bf16"))
    if extras:
        section(r, "kernel_fp32_all_weights_from_l2", run_kernel("fp32", resident_rows=0))

    if graph_scan is not None:
        def graph():
            graph_scan(model, emb[:1024])  # warm-up: cuBLAS handles; each call captures its graph again
            sec, _, out = timed(lambda: graph_scan(model, emb))
            ctx["graph"] = out
            return {"seconds": sec, "us_per_token": sec / n * 1e6}
        section(r, "graph_path", graph)

    prefix = min(n, args.eager_prefix)
    if extras or "graph" not in ctx:
        def eager():
            model.scan(emb[:64])
            sec, _, out = timed(lambda: model.scan(emb[:prefix]))
            ctx["eager_prefix"] = out
            res = {"tokens": prefix, "seconds": sec, "us_per_token": sec / prefix * 1e6}
            if "graph" in ctx:
                res["graph_vs_eager_max_abs"] = float((ctx["graph"][:prefix] - out).abs().max())
            return res
        section(r, "eager_prefix", eager)

    ref = ctx.get("graph")
    if ref is None and "eager_prefix" in ctx:
        ref = ctx["eager_prefix"]
    if ref is not None:
        m = ref.shape[0]
        for w in ("fp32", "bf16"):
            if f"kernel_{w}" in ctx:
                section(r, f"drift_{w}", lambda w=w: drift(ctx[f"kernel_{w}"][:m], ref))
        tf = min(m, args.teacher_tokens)
        prev = torch.cat([emb.new_zeros(1, model.args.context_dim), ref[:tf - 1]])
        section(r, "step_error_fp32", lambda: step_error(model, prev, emb[:tf], "fp32"))
        section(r, "step_error_bf16", lambda: step_error(model, prev, emb[:tf], "bf16"))

    def jacobi(warm=None, max_sweeps=args.max_sweeps):
        def go():
            out, rep = kernels.jacobi_scan(model, emb, warm=warm, max_sweeps=max_sweeps)
            rep["us_per_token"] = rep["seconds"] / n * 1e6
            if ref is not None:
                rep["vs_exact_max_abs"] = float((out[:ref.shape[0]] - ref).abs().max())
            rep["path_of_fallback"] = fused.last_path if rep["fallback_tokens"] else None
            return rep
        return go

    if args.jacobi:
        section(r, "jacobi_cold", jacobi())
    if args.jacobi and ref is not None and ref.shape[0] == n:
        # warm start as a training loop would have it: the previous pass's contexts (weights before a small update)
        def perturbed_contexts():
            prev_model = CVFPModel(model.args).to(device)
            prev_model.load_state_dict(model.state_dict())
            gen = torch.Generator(device="cpu").manual_seed(7)
            with torch.no_grad():
                for p in prev_model.blocks.parameters():
                    p.mul_(1 + 1e-3 * torch.randn(p.shape, generator=gen).to(device))
            return kernels.scan(prev_model.eval(), emb, strict=STRICT)
        try:
            warm = perturbed_contexts()
            r["jacobi_warm_start"] = "contexts of the same model with every block parameter scaled by (1 + 1e-3 N(0,1))"
            section(r, "jacobi_warm", jacobi(warm=warm))
        except Exception as err:
            r["jacobi_warm"] = {"error": f"{type(err).__name__}: {err}"}

    if args.lyapunov and ref is not None and ref.shape[0] >= args.lyap_blocks * (args.lyap_burn_in + 16):
        section(r, "lyapunov", lambda: kernels.lyapunov(model, emb[:ref.shape[0]], ref, blocks=args.lyap_blocks,
                                                          burn_in=args.lyap_burn_in))
        ly = r["lyapunov"]
        if "lambda" in ly:
            log(f"  lyapunov {ly['lambda']:+.4f} +- {ly['se']:.4f} per token")
    for key in ("kernel_fp32_stats0", "kernel_fp32_stats1", "kernel_fp32", "kernel_bf16"):
        w = key.split("_")[1]
        if "us_per_token" in r.get(key, {}):
            r[key]["measured_over_predicted"] = r[key]["us_per_token"] / r[f"predicted_{w}"]["us_per_token"]
    model.cpu()
    return r


def summary(results: dict) -> str:
    lines = ["", "| model | path | us/token | vs graph path | note |", "|---|---|---|---|---|"]
    for m in results["models"]:
        g = m.get("graph_path", {}).get("us_per_token")
        rows = []
        for key, name in (("kernel_fp32_stats0", "kernel fp32, stats mode 0"),
                          ("kernel_fp32_stats1", "kernel fp32, stats mode 1"),
                          ("kernel_fp32", "kernel fp32"), ("kernel_bf16", "kernel bf16"),
                          ("kernel_fp32_all_weights_from_l2", "kernel fp32, no resident rows"),
                          ("graph_path", "graph path (exact)"), ("eager_prefix", "eager model.scan"),
                          ("jacobi_cold", "Jacobi, cold"), ("jacobi_warm", "Jacobi, warm")):
            v = m.get(key)
            if not v:
                continue
            if "error" in v:
                rows.append((name, "error", "", v["error"][:60]))
                continue
            us = v.get("us_per_token")
            note = ""
            if key.startswith("kernel") and "measured_over_predicted" in v:
                note = f"predicted {m['predicted_' + key.split('_')[1]]['us_per_token']:.2f}"
            if key.startswith("kernel"):
                note = (note + f"; stats mode {v.get('stats_mode')}").lstrip("; ")
            if key == "kernel_fp32_stats1" and "stats1_bit_equal_to_stats0_whole_stream" in m:
                note += f"; bit-equal to mode 0: {m['stats1_bit_equal_to_stats0_whole_stream']}"
            if key.startswith("jacobi"):
                note = f"{v['sweeps']} sweeps, certified={v['certified']}, fallback {v['fallback_tokens']} tok"
            if key == "eager_prefix":
                note = f"{v['tokens']}-token prefix"
            ratio = f"{g / us:.1f}x" if g and us else ""
            rows.append((name, f"{us:.2f}" if us is not None else "", ratio, note))
        for name, us, ratio, note in rows:
            lines.append(f"| {m['label']} | {name} | {us} | {ratio} | {note} |")
        ly = m.get("lyapunov", {})
        dr = m.get("drift_fp32", {})
        if "lambda" in ly or "max" in dr:
            lines.append(f"| {m['label']} | lambda {ly.get('lambda', float('nan')):+.4f} +- {ly.get('se', float('nan')):.4f}"
                         f" | drift fp32 max {dr.get('max', float('nan')):.2e} | first > 1e-3 at "
                         f"{dr.get('first_token_above_0.001')} | |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=65536)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--eager-prefix", type=int, default=2048)
    parser.add_argument("--teacher-tokens", type=int, default=4096)
    parser.add_argument("--max-sweeps", type=int, default=32)
    parser.add_argument("--lyap-blocks", type=int, default=256)
    parser.add_argument("--lyap-burn-in", type=int, default=32)
    parser.add_argument("--contracting-scale", type=float, default=0.1)
    parser.add_argument("--weak-scale", type=float, default=None, help="also a weakly contracting model")
    parser.add_argument("--phase1", default=str(ROOT / ".orig" / "phase1.pt"))
    parser.add_argument("--stream", default=str(ROOT / ".orig" / "stream_ids.pt"))
    parser.add_argument("--models", default="random,contracting,phase1")
    parser.add_argument("--json", default=str(ROOT / "benchmarks" / "h200-scan.json"))
    parser.add_argument("--no-lyapunov", dest="lyapunov", action="store_false",
                        help="skip the Lyapunov estimate (a property of the model's trajectory, not of the kernel)")
    parser.add_argument("--no-jacobi", dest="jacobi", action="store_false", help="skip the Jacobi solves")
    parser.add_argument("--no-stats-modes", dest="stats_modes", action="store_false",
                        help="skip timing fp32 in stats modes 0 and 1 by name (whole stream, with the bit check)")
    parser.add_argument("--cpu-dry-run", action="store_true", help="check the harness itself on the CPU (fallbacks)")
    args = parser.parse_args(argv)

    global DEVICE, STRICT
    if args.cpu_dry_run:
        DEVICE, STRICT = torch.device("cpu"), False
    elif not torch.cuda.is_available():
        sys.exit("needs a CUDA device")
    props = torch.cuda.get_device_properties(0) if DEVICE.type == "cuda" else None
    results = {
        "device": props.name if props else "cpu (dry run)", "sms": props.multi_processor_count if props else 0,
        "l2_mb": getattr(props, "L2_cache_size", 0) / 2 ** 20,
        "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
        "argv": sys.argv, "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
        "commit": os.environ.get("CVFP_COMMIT", ""), "assumed": ASSUMED, "models": [],
    }
    ok, reason = kernels.check(DEVICE)
    results["kernel_available"], results["kernel_reason"] = ok, reason
    name, graph_scan = graph_path()
    results["graph_path"] = name
    log(f"device {results['device']}, {results['sms']} SMs; kernel available: {ok} {reason}; graph path: {name}")
    if not ok:
        log("kernel unavailable: " + reason)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    gen = torch.Generator().manual_seed(0)
    n = args.tokens
    wanted = [m.strip() for m in args.models.split(",") if m.strip()]
    specs = []
    if "random" in wanted:
        specs.append((f"random {args.layers}x{args.dim}", dict(context_scale=None)))
    if "contracting" in wanted:
        specs.append((f"contracting {args.layers}x{args.dim} (W[:, :C] x {args.contracting_scale:g})",
                      dict(context_scale=args.contracting_scale)))
    if args.weak_scale is not None:
        specs.append((f"weakly contracting {args.layers}x{args.dim} (W[:, :C] x {args.weak_scale:g})",
                      dict(context_scale=args.weak_scale)))
    ids = torch.randint(0, args.vocab, (n,), generator=gen)
    for i, (label, kw) in enumerate(specs):
        model = make_model(args.dim, args.dim, args.layers, args.vocab, seed=0, **kw)
        results["models"].append(bench_model(label, model, ids, args, graph_scan, extras=(i == 0)))
        write(results, args.json)
    if "phase1" in wanted and Path(args.phase1).is_file():
        model = load_phase1(Path(args.phase1))
        stream_ids = torch.load(args.stream) if Path(args.stream).is_file() else \
            torch.randint(0, model.args.vocab_size, (n,), generator=gen)
        stream_ids = stream_ids[:n]
        label = (f"trained Phase-1 toy {len(model.blocks)}x{model.args.context_dim} "
                 f"({Path(args.phase1).name}, real stream)")
        results["models"].append(bench_model(label, model, stream_ids, args, graph_scan, extras=True))
    results["table"] = summary(results)
    write(results, args.json)
    log(results["table"])


def write(results, path):
    text = json.dumps(results, indent=1, default=str)
    targets = [Path(path)]
    if os.environ.get("OUT") and DEVICE.type == "cuda":
        targets.append(Path(os.environ["OUT"]) / Path(path).name)
    for t in targets:
        t.parent.mkdir(parents=True, exist_ok=True)
        t.write_text(text)


if __name__ == "__main__":
    main()
