"""The same small training problems run by one process (in the tests) and by two (under torchrun).

`python -m torch.distributed.run --nproc_per_node=2 tests/distributed_cases.py OUT` runs every
case on a gloo process group and rank 0 saves their results to OUT (torch.save); the tests run
each case in-process with world size 1 and compare. Each case builds its inputs from fixed
seeds, so both sides start from identical models and data.

`python tests/distributed_cases.py --stage PARAMS FAIL_RANK OUT` runs a stage through
`cvfp.stage.run_stage` (it re-launches itself under torchrun when PARAMS asks for more than
one process); the rank FAIL_RANK raises a StageError, rank 0 would write OUT.
"""

import os
import sys

import torch

import cvfp.phase1 as phase1
import cvfp.phase2 as phase2
from cvfp import baselines, distributed, fast
from cvfp.distributed import Shard, World, gather_rows
from cvfp.params import BaselinesParams, Phase1Params, Phase2Params
from helpers import CONTEXT, VOCAB, labelled, stream, tiny_model

STREAM = 13  # odd, so the two shards differ in size


def phase1_model(seed=0, **overrides):
    return tiny_model(seed, **{"layer_structure": [1, 1], **overrides})


def phase2_model(seed=0, **overrides):
    return tiny_model(seed, **{"vocab_size": VOCAB, **overrides})


def quiet(_):
    pass


def untimed(rows):
    return [{k: v for k, v in row.items() if not k.endswith("seconds")} for row in rows]


def phase1_gradient(world: World, diversity: str, batch_tokens: int, recon: bool, fast_path: bool) -> dict:
    """Two Phase-1 train steps (lr 0, so the second sees a primed EMA); the second step's gradient."""
    os.environ["CVFP_FAST"] = "1" if fast_path else "0"
    fast.COMPILE_BACKEND = "aot_eager"
    try:
        model = phase1_model(decoder=recon)
        ids = torch.randint(0, 40, (STREAM,), generator=torch.Generator().manual_seed(1))
        previous = torch.randn(STREAM, 6, generator=torch.Generator().manual_seed(2))
        with torch.no_grad():
            embeddings = model.embed(ids)
        part = Shard(STREAM, world)
        loss = phase1.DiversityLoss(diversity, 0.9, part)
        params = Phase1Params(batch_tokens=batch_tokens, recon_weight=0.5 if recon else 0.0)
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
        for _ in range(2):
            contexts, values, skipped = phase1.jacobi_step(
                model, embeddings[part.lo:part.hi], previous[part.lo:part.hi], loss, params, previous[part.lo - 1],
                optimizer)
        grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
        return {"grads": grads, "values": values, "skipped": skipped, "contexts": gather_rows(contexts, STREAM, world)}
    finally:
        os.environ.pop("CVFP_FAST", None)


def phase1_run(world: World, diversity: str) -> dict:
    ids = torch.randint(0, 40, (23,), generator=torch.Generator().manual_seed(3))
    params = Phase1Params(max_iterations=5, batch_tokens=4, min_converged_ratio=1.0, effective_rank_samples=0,
                          diversity=diversity, lr=0.01)
    result = phase1.train_phase1(phase1_model(), ids, ids[:11], params, seed=0, log=quiet, world=world)
    return {"summary": result.summary, "history": untimed(result.history), "train": result.train_contexts,
            "val": result.val_contexts}


def phase2_run(world: World) -> dict:
    ids, val_ids = stream(60), stream(30, seed=2)  # 59 positions: the last global batch of 8 has 3
    generator = torch.Generator().manual_seed(4)
    cstar, val_cstar = torch.randn(60, CONTEXT, generator=generator), torch.randn(30, CONTEXT, generator=generator)
    model = phase2_model()
    params = Phase2Params(epochs=3, batch_size=8, lr=0.01, patience=4)
    # some validation predictions unscored: each rank counts the scored ones of its shard, the sums are reduced
    result = phase2.train_phase2(model, ids, cstar, val_ids, val_cstar, *labelled(val_ids), params, seed=0, log=quiet,
                                 world=world)
    return {"summary": result.summary, "history": untimed(result.history), "state": model.state_dict()}


def phase2_evaluate(world: World) -> dict:
    """evaluate_fixed's counts over a stream with unscored predictions: each rank counts its shard's scored ones."""
    ids = stream(STREAM * 2 + 1, seed=3)
    cstar = torch.randn(ids.numel(), CONTEXT, generator=torch.Generator().manual_seed(5))
    model = phase2_model()
    model.init_head_(seed=1)
    return phase2.evaluate_fixed(model, ids, cstar, *labelled(ids), 4, "stability", world=world)


def baseline_run(world: World, kind: str) -> dict:
    params = BaselinesParams.model_validate(dict(seq_len=4, batch_size=4, patience=5, gru={"layers": 1, "lr": 0.01},
                                                 transformer={"layers": 1, "heads": 2, "ffn_mult": 2, "lr": 0.01}))
    torch.manual_seed(0)
    model = baselines.build(kind, baselines.baseline_args(kind, 8, 12, params))
    ids, val_ids = stream(59) % 12, stream(30, seed=2) % 12
    # a budget that ends inside epoch 2: the masking of targets past it is decided on the global batch
    result = baselines.train_baseline(model, ids, val_ids, *labelled(val_ids), params, 0.01, 80, seed=0,
                                      name=kind, log=quiet, world=world)
    return {"summary": result.summary, "history": untimed(result.history), "state": model.state_dict()}


CASES = {
    **{f"phase1_gradient[{d}-{b}-{'recon' if r else 'plain'}-{'fast' if f else 'plain'}]":
       (phase1_gradient, (d, b, r, f))
       for d in ("global_deviation", "ema_variance") for b, f in ((3, False), (64, True)) for r in (False, True)},
    "phase1_run[global_deviation]": (phase1_run, ("global_deviation",)),
    "phase1_run[ema_variance]": (phase1_run, ("ema_variance",)),
    "phase2_run": (phase2_run, ()),
    "phase2_evaluate": (phase2_evaluate, ()),
    "baseline_run[gru]": (baseline_run, ("gru",)),
    "baseline_run[transformer]": (baseline_run, ("transformer",)),
}


def run_case(name: str, world: World) -> dict:
    fn, args = CASES[name]
    return fn(world, *args)


def _stage(params_file: str, fail_rank: int, out: str) -> None:
    from cvfp.io import write_json
    from cvfp.errors import StageError
    from cvfp.stage import run_stage

    def body(params, run):
        world = distributed.current()
        if world.rank == fail_rank:
            raise StageError(f"injected failure on rank {world.rank}")
        total = distributed.sum_numbers([1.0], world)  # waits for every rank
        if world.is_main:
            write_json(out, {"processes": total[0]})

    run_stage("demo", body, params_file=params_file, data_parallel=True)


if __name__ == "__main__":
    if sys.argv[1] == "--stage":
        _stage(sys.argv[2], int(sys.argv[3]), sys.argv[4])
    else:
        world = distributed.setup("cpu")
        results = {name: run_case(name, world) for name in CASES}
        if world.is_main:
            torch.save(results, sys.argv[1])
        distributed.teardown()
