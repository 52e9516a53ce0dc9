"""Start-up cost of the pipeline's stages: wall time minus the work their timing files report.

    python benchmarks/startup.py [--checkout DIR] [--runs 5] [--default] [--out FILE.json]

In a fresh copy of this repository's pipeline (a temporary git + DVC project, params.yaml =
the repository's plus `benchmarks/startup.yaml`'s overrides, validated like any params file):

- **per stage:** `python pipeline/<stage>.py`, each stage `--runs` times after one warm-up
  `dvc repro`; overhead = wall − the stage's `metrics/timing/<stage>.json` seconds; once with the
  warm server and the tracking service up (what every stage after the first of a `dvc repro`
  sees), once *cold* (`CVFP_WARM_START=0 CVFP_TRACKING_SERVICE=0`: each stage imports torch and
  starts a writer process of its own);
- **`dvc repro -f`:** the whole pipeline, `--runs` times; overhead = wall − Σ stage work; with
  the servers up, and *first start*: with no server running (stopped before each run), so the
  run pays their start, as the first `dvc repro` after a code change does;
- **`dvc exp run -S phase2.lr=0.003`** after the default run (the run-cache is emptied first so
  the three affected stages really run), `--runs` times; overhead likewise;
- **no-change `dvc repro`:** wall (DVC alone: nothing runs);
- with `--default`, one `dvc repro -f` on the repository's own params (no overrides), the same
  overhead rule: what the default run pays.

`--checkout DIR` takes the pipeline, params and library from another checkout (e.g. an older
commit's `git worktree`), its `src/` ahead of the installed package, to measure before and after a
change on the same machine. A stage without a timing file (older code) counts its work as 0, so
its overhead is an upper bound; the JSON marks it. Medians are printed with
min and max; a JSON with every run goes to `--out`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ruamel.yaml import YAML

REPO = Path(__file__).resolve().parents[1]
SETTINGS = Path(__file__).with_name("startup.yaml")
COPIED = ["dvc.yaml", "pipeline", "src", ".dvc/config", ".dvc/.gitignore", ".dvcignore", ".gitignore"]
STAGES = ["tokenizer", "cache", "carve", "phase1", "cstar", "phase2", "evaluate", "baselines", "compare"]
EXP_STAGES = ["phase2", "evaluate", "compare"]  # what `dvc exp run -S phase2.lr=...` reruns


def load_settings(path: Path) -> dict:
    settings = YAML(typ="safe", pure=True).load(path.read_text())
    for key in ("runs", "params", "exp_param"):
        if key not in settings:
            raise SystemExit(f"{path}: missing key '{key}'")
    return settings


def write_params(checkout: Path, target: Path, overrides: dict) -> None:
    """The checkout's params.yaml with dotted overrides, validated before anything runs."""
    from cvfp.params import load_params, read_yaml

    tree = read_yaml(checkout / "params.yaml")
    for dotted, value in overrides.items():
        *sections, key = dotted.split(".")
        node = tree
        for section in sections:
            node = node[section]
        if key not in node:
            raise SystemExit(f"{SETTINGS}: params override '{dotted}' names no key of params.yaml")
        node[key] = value
    yaml = YAML(typ="safe", pure=True)
    yaml.default_flow_style = False
    with open(target, "w", encoding="utf-8") as handle:
        yaml.dump(tree, handle)
    load_params(target)  # a bad override stops here, with the key named


def run(args: list[str], cwd: Path, env: dict) -> float:
    tick = time.perf_counter()
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - tick
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed ({done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    return seconds


UNTIMED: set[str] = set()  # stages that wrote no timing file


def work_seconds(project: Path, stage: str) -> float:
    path = project / "metrics" / "timing" / f"{stage}.json"
    if not path.is_file():
        UNTIMED.add(stage)
        return 0.0
    timing = json.loads(path.read_text())
    return timing.get("seconds", sum(v for k, v in timing.items() if k.endswith("_seconds")))


def make_project(root: Path, overrides: dict, checkout: Path) -> dict:
    for name in COPIED:
        source, target = checkout / name, root / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy(source, target)
    write_params(checkout, root / "params.yaml", overrides)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    env.update(CVFP_NO_PROGRESS="1", GIT_AUTHOR_NAME="bench", GIT_AUTHOR_EMAIL="bench@localhost",
               GIT_COMMITTER_NAME="bench", GIT_COMMITTER_EMAIL="bench@localhost")
    if checkout.resolve() != REPO:
        env["PYTHONPATH"] = os.pathsep.join([str((checkout / "src").resolve()), *filter(None, [env.get("PYTHONPATH")])])
    for args in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "init"]):
        run(args, root, env)
    return env


def summary(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": values}


COLD = {"CVFP_WARM_START": "0", "CVFP_TRACKING_SERVICE": "0"}  # how a stage started before the servers


def stop_servers() -> int:
    """Stop every running warm server and tracking service of this user (what a code change or 10 idle
    minutes amounts to): the next stage starts them again. Returns how many were stopped."""
    from cvfp import service

    stopped = service.stop(pid for pid, _, _ in service.servers())
    time.sleep(0.5)
    return stopped


def measure_stages(project: Path, env: dict, runs: int, say, label: str) -> tuple[dict, dict]:
    per_stage: dict[str, list[float]] = {stage: [] for stage in STAGES}
    walls: dict[str, list[float]] = {stage: [] for stage in STAGES}
    for number in range(runs):
        for stage in STAGES:
            wall = run([sys.executable, f"pipeline/{stage}.py"], project, {**env, "DVC_ROOT": str(project)})
            walls[stage].append(wall)
            per_stage[stage].append(wall - work_seconds(project, stage))
        say(f"stages ({label}), run {number + 1}/{runs}: overhead " +
            ", ".join(f"{s} {per_stage[s][-1]:.2f}" for s in STAGES))
    return ({stage: summary(values) for stage, values in per_stage.items()},
            {stage: summary(values) for stage, values in walls.items()})


def measure_repro(project: Path, env: dict, runs: int, say, first_start: bool) -> tuple[dict, dict]:
    walls, overheads = [], []
    for number in range(runs):
        if first_start:
            stop_servers()
        wall = run(["dvc", "repro", "-f"], project, env)
        walls.append(wall)
        overheads.append(wall - sum(work_seconds(project, stage) for stage in STAGES))
        say(f"dvc repro -f{' (first start)' if first_start else ''}, run {number + 1}/{runs}: wall {wall:.1f} s, "
            f"overhead {overheads[-1]:.1f} s")
    return summary(walls), summary(overheads)


def measure(project: Path, env: dict, runs: int, exp_param: str, say) -> dict:
    results: dict = {}
    say("warm-up: dvc repro")
    run(["dvc", "repro"], project, env)
    run(["git", "add", "-A"], project, env)
    run(["git", "commit", "-qm", "baseline"], project, env)

    results["stage_overhead"], results["stage_wall"] = measure_stages(project, env, runs, say, "servers up")
    results["stage_overhead_cold"], results["stage_wall_cold"] = measure_stages(project, {**env, **COLD}, runs,
                                                                                say, "cold")
    results["repro_wall"], results["repro_overhead"] = measure_repro(project, env, runs, say, first_start=False)
    results["repro_first_wall"], results["repro_first_overhead"] = measure_repro(project, env, runs, say,
                                                                                 first_start=True)

    nochange = [run(["dvc", "repro"], project, env) for _ in range(runs)]
    results["nochange_repro_wall"] = summary(nochange)
    say(f"no-change dvc repro: median {statistics.median(nochange):.2f} s")

    exp_wall, exp_overhead = [], []
    for number in range(runs):
        run(["git", "checkout", "-q", "--", "params.yaml", "dvc.lock"], project, env)
        run(["dvc", "checkout", "-q", "--force"], project, env)
        shutil.rmtree(project / ".dvc" / "cache" / "runs", ignore_errors=True)  # else DVC restores, not runs
        wall = run(["dvc", "exp", "run", "-S", exp_param], project, env)
        exp_wall.append(wall)
        exp_overhead.append(wall - sum(work_seconds(project, stage) for stage in EXP_STAGES))
        say(f"dvc exp run -S {exp_param}, run {number + 1}/{runs}: wall {wall:.1f} s, overhead {exp_overhead[-1]:.1f} s")
    results["exp_run_wall"], results["exp_run_overhead"] = summary(exp_wall), summary(exp_overhead)
    return results


def measure_default(project: Path, env: dict, say) -> dict:
    say("default params: dvc repro -f (one run, servers stopped first: it pays their start)")
    stop_servers()
    wall = run(["dvc", "repro", "-f"], project, env)
    work = {stage: work_seconds(project, stage) for stage in STAGES}
    say(f"default dvc repro -f: wall {wall:.1f} s, work {sum(work.values()):.1f} s")
    return {"wall": wall, "work": work, "overhead": wall - sum(work.values())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python benchmarks/startup.py", description=__doc__.split("\n")[0])
    parser.add_argument("--checkout", type=Path, default=REPO, help="the checkout to measure (default: this one)")
    parser.add_argument("--runs", type=int, default=None, help="runs per figure (default: startup.yaml's)")
    parser.add_argument("--default", action="store_true", help="also one dvc repro -f on the default params")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    settings = load_settings(SETTINGS)
    runs = args.runs or settings["runs"]
    say = lambda text: print(f"startup: {text}", file=sys.stderr, flush=True)  # noqa: E731
    results = {"machine": f"{platform.machine()} {os.cpu_count()} cores, Python {platform.python_version()}",
               "checkout": str(args.checkout), "runs": runs, "overrides": settings["params"],
               "date": time.strftime("%Y-%m-%d %H:%M")}
    with tempfile.TemporaryDirectory(prefix="cvfp-startup-") as folder:
        project = Path(folder) / "project"
        project.mkdir()
        env = make_project(project, settings["params"], args.checkout)
        results.update(measure(project, env, runs, settings["exp_param"], say))
        if args.default:
            default = Path(folder) / "default"
            default.mkdir()
            results["default_repro"] = measure_default(default, make_project(default, {}, args.checkout), say)
    results["untimed_stages"] = sorted(UNTIMED)
    print(report(results))
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    return 0


def report(results: dict) -> str:
    def cell(entry: dict) -> str:
        return f"{entry['median']:.2f} ({entry['min']:.2f}–{entry['max']:.2f})"

    lines = [f"start-up ({results['checkout']}; untimed, overhead includes their work: "
             f"{', '.join(results['untimed_stages']) or 'none'}; {results['machine']}; median (min–max) of {results['runs']} runs, seconds)",
             "| stage | overhead | wall | overhead, cold | wall, cold |", "|---|---|---|---|---|"]
    cold = "stage_overhead_cold" in results
    for stage in STAGES:
        row = f"| {stage} | {cell(results['stage_overhead'][stage])} | {cell(results['stage_wall'][stage])} |"
        if cold:
            row += f" {cell(results['stage_overhead_cold'][stage])} | {cell(results['stage_wall_cold'][stage])} |"
        lines.append(row)
    lines.append(f"| `dvc repro -f` (tiny) | {cell(results['repro_overhead'])} | {cell(results['repro_wall'])} |")
    if "repro_first_overhead" in results:
        lines.append(f"| `dvc repro -f` (tiny), first start | {cell(results['repro_first_overhead'])} | "
                     f"{cell(results['repro_first_wall'])} |")
    lines.append(f"| `dvc exp run -S …` | {cell(results['exp_run_overhead'])} | {cell(results['exp_run_wall'])} |")
    lines.append(f"| no-change `dvc repro` | — | {cell(results['nochange_repro_wall'])} |")
    if "default_repro" in results:
        d = results["default_repro"]
        lines.append(f"| `dvc repro -f` (default params, 1 run) | {d['overhead']:.1f} | {d['wall']:.1f} "
                     f"(work {sum(d['work'].values()):.1f}) |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
