"""Every module that can change a stage's outputs is in that stage's `deps` in dvc.yaml.

The closure is computed from the AST of `pipeline/<stage>.py`: every `import cvfp...` and
`from cvfp... import ...`, at any depth (imports inside functions included), followed through
the library. Edit a module a stage imports and `dvc repro` must rerun that stage; a module
missing from `deps` would leave "up to date" over outputs the new code would not produce.
"""

import ast
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src"

# The deliberate exclusions, each with the reason it cannot change a stage's outputs.
NOT_DEPS = {
    "src/cvfp/__init__.py": "the package marker: a docstring and nothing else",
    "src/cvfp/data/__init__.py": "the subpackage marker: a docstring and nothing else",
    "src/cvfp/tracking.py": "only logs to MLflow; the stages' files never depend on it",
    "src/cvfp/tracking_writer.py": "the tracking writer process: only logs to MLflow",
    "src/cvfp/service.py": "process plumbing (which process runs the code), never what the code computes",
    "src/cvfp/warm.py": "where a stage's process comes from (forked from a server that imported the library); "
                        "test_pipeline's forced rerun, warm then cold, shows it changes no byte",
}


def _module_file(name: str) -> Path | None:
    """src/cvfp/a/b.py or src/cvfp/a/b/__init__.py for the dotted name cvfp.a.b; None if neither exists."""
    base = SRC.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _imported_modules(path: Path) -> set[str]:
    """Dotted names of the cvfp modules (and packages) `path` imports anywhere in its body."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names if alias.name.split(".")[0] == "cvfp")
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "cvfp":
            names.add(node.module)
            # `from cvfp import distributed` imports a module, `from cvfp.model import CVFPModel` a name
            names.update(f"{node.module}.{alias.name}" for alias in node.names
                         if _module_file(f"{node.module}.{alias.name}") is not None)
    expanded = set(names)
    for name in names:  # importing cvfp.data.cache runs cvfp/__init__.py and cvfp/data/__init__.py first
        parts = name.split(".")
        expanded.update(".".join(parts[:i]) for i in range(1, len(parts)))
    return expanded


def import_closure(script: Path) -> set[str]:
    """Repository-relative paths of every library file `script` imports, directly or through other modules."""
    seen: set[Path] = set()
    todo = [script]
    while todo:
        for name in _imported_modules(todo.pop()):
            found = _module_file(name)
            if found is not None and found not in seen:
                seen.add(found)
                todo.append(found)
    return {str(path.relative_to(REPO)) for path in seen}


def stage_problems(stages: dict) -> list[str]:
    """For each `python pipeline/<name>.py` stage: library modules its code imports but `deps` lacks, and
    library modules `deps` lists that its code no longer imports (an edit there reruns it for nothing)."""
    problems = []
    for name, stage in stages.items():
        script = REPO / "pipeline" / f"{name}.py"
        assert stage["cmd"] == f"python pipeline/{name}.py", f"stage {name}: unexpected cmd {stage['cmd']!r}"
        deps = {str(dep) for dep in stage.get("deps", [])}
        needed = import_closure(script) - set(NOT_DEPS)
        if f"pipeline/{name}.py" not in deps:
            problems.append(f"{name}: misses its own script pipeline/{name}.py")
        problems += [f"{name}: misses {module}" for module in sorted(needed - deps)]
        listed = {dep for dep in deps if dep.startswith("src/")}
        problems += [f"{name}: lists {module}, which it does not import" for module in sorted(listed - needed)]
    return problems


@pytest.fixture(scope="module")
def stages():
    return yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


def test_every_imported_module_is_a_dep(stages):
    problems = stage_problems(stages)
    assert not problems, "dvc.yaml deps out of date:\n  " + "\n  ".join(problems)


def test_a_removed_dep_is_found(stages):
    """The check itself can fail: drop one library dep of a stage and it is named."""
    name = "phase1"
    removed = next(dep for dep in stages[name]["deps"] if dep.startswith("src/cvfp/"))
    broken = {name: {**stages[name], "deps": [dep for dep in stages[name]["deps"] if dep != removed]}}
    assert stage_problems(broken) == [f"{name}: misses {removed}"]


def test_the_closure_follows_lazy_and_package_imports(tmp_path):
    closure = import_closure(REPO / "pipeline" / "evaluate.py")
    assert "src/cvfp/scan.py" in closure  # reached only through evaluate -> scan
    assert "src/cvfp/data/__init__.py" in closure  # a package runs its __init__ first
    for reason in NOT_DEPS.values():
        assert reason  # every exclusion states why
