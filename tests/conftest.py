"""Shared test set-up: a private HuggingFace cache, quiet progress bars, a toy corpus."""

import atexit
import os
import shutil
import tempfile

import pytest

# Set before `datasets` is imported (it reads the cache location once): tests never touch ~/.cache.
_HF_HOME = tempfile.mkdtemp(prefix="cvfp-test-hf-")
atexit.register(shutil.rmtree, _HF_HOME, ignore_errors=True)
os.environ["HF_HOME"] = _HF_HOME
os.environ["HF_DATASETS_CACHE"] = os.path.join(_HF_HOME, "datasets")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("CVFP_NO_PROGRESS", "1")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # two workers share 2 cores: a second torch thread per worker would only spin-wait against the other worker
    os.environ.setdefault("OMP_NUM_THREADS", "1")

UNICODE_SAMPLES = [
    "emoji \U0001F600\U0001F44D\U0001F3FD",
    "RTL \u05e9\u05dc\u05d5\u05dd \u0645\u0631\u062d\u0628\u0627",
    "NUL \x00 inside",
    "line\u2028separator",
    "tab\tand\r\nnewline",
]


def toy_documents():
    """Small conversations: repeated words (so BPE merges exist), roles, and unusual Unicode."""
    documents = []
    for i in range(12):
        unusual = UNICODE_SAMPLES[i % len(UNICODE_SAMPLES)]
        messages = [
            {"role": "user", "content": f"hello there number {i}, how are you doing today?"},
            {"role": "assistant", "content": f"I am doing fine, thank you. {unusual}"},
        ]
        if i % 4 == 0:
            messages.insert(0, {"role": "system", "content": "be brief"})
        documents.append({"messages": messages})
    return documents


@pytest.fixture
def documents():
    return toy_documents()


REPO_PARAMS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "params.yaml")


def write_params(path, overrides):
    """Write a complete params.yaml: the repository's, with dotted-key overrides ({"carve.val_fraction": 0.3})."""
    from ruamel.yaml import YAML

    from cvfp.params import read_yaml

    tree = read_yaml(REPO_PARAMS)
    for dotted, value in overrides.items():
        *sections, key = dotted.split(".")
        node = tree
        for section in sections:
            node = node[section]
        node[key] = value
    yaml = YAML(typ="safe", pure=True)
    yaml.default_flow_style = False
    with open(path, "w", encoding="utf-8") as handle:
        yaml.dump(tree, handle)


@pytest.fixture(scope="session")
def reproduced(tmp_path_factory):
    """One tiny run (helpers.TINY_PARAMS, about half a minute): a fresh git + DVC project holding this repo's
    pipeline, after `dvc repro` and a commit. `root` is shared by the end-to-end modules (test_pipeline, the MLflow
    UI test), which run in it; `pristine` is a copy taken at once (helpers.copy_project: git and DVC state, no
    tracking state) that nothing runs in, for modules that need a reproduced project of their own (copy it)."""
    from types import SimpleNamespace

    import helpers  # helpers imports write_params from this module

    root = tmp_path_factory.mktemp("project")
    env = helpers.make_project(root, helpers.TINY_PARAMS)
    log = helpers.sh(["dvc", "repro"], root, env)
    helpers.sh(["git", "add", "-A"], root, env)
    helpers.sh(["git", "commit", "-qm", "repro"], root, env)  # dvc exp needs the baseline committed
    pristine = tmp_path_factory.mktemp("pristine") / "project"
    helpers.copy_project(root, pristine)
    return SimpleNamespace(root=root, env=env, log=log, pristine=pristine)


@pytest.fixture(scope="session")
def project(reproduced):
    """(root, env, `dvc repro`'s output) of the shared tiny run (`reproduced`)."""
    return reproduced.root, reproduced.env, reproduced.log


# The suite runs on two workers (pyproject's addopts: pytest-xdist `-n 2 --dist loadgroup --no-loadscope-reorder`).
# A worker is handed whole groups, in the order they first appear: every test of a module is one group, so that a
# module's fixtures are built once, and every test that uses the shared tiny run (`reproduced`) is one group, so
# that the run is made once. The groups are ordered longest first (the order of HEAVY, measured serially with
# --durations in session 8: shared ~360 s, team_tracking 151 s, distributed ~70 s ...), so that the short ones fill
# in at the end instead of one long group starting last.
SHARED = "reproduced"
HEAVY = [SHARED, "test_team_tracking.py", "test_distributed.py", "test_warm.py", "test_benchmarks.py",
         "test_reliability.py", "test_tracking.py", "test_resume.py", "test_carve.py", "test_study.py"]


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook, which reads the marks into the test ids
def pytest_collection_modifyitems(config, items):
    groups = {item: SHARED if "reproduced" in item.fixturenames else item.path.name for item in items}
    for item, group in groups.items():
        item.add_marker(pytest.mark.xdist_group(group))
    rank = {name: i for i, name in enumerate(HEAVY)}
    items.sort(key=lambda item: rank.get(groups[item], len(HEAVY)))  # stable: a group keeps its tests' order


def pytest_sessionstart(session):
    from cvfp import service

    session.config.cvfp_servers_before = {pid for pid, _, _ in service.servers()}


def pytest_sessionfinish(session, exitstatus):
    """Stop the warm stage servers and tracking services this session's stages started: a test run leaves none."""
    from cvfp import service

    if hasattr(session.config, "workerinput"):
        return  # an xdist worker: the controlling process stops them once both workers are done
    before = getattr(session.config, "cvfp_servers_before", set())
    service.stop(pid for pid, _, _ in service.servers() if pid not in before)
