"""The MLflow UI in a real browser, on the store of the tiny pipeline run (conftest's `project`).

One `mlflow ui` server and one headless chromium (Debian's, driven by Playwright) for the module. Screenshots go
to $CVFP_UI_SCREENSHOTS, default build/ui-screenshots/ (git-ignored); their paths are printed (`-s` shows them).

The first group checks what the UI must show today: the execution and its stages in the runs table, Phase 1's
effective-rank and convergence curves as drawn charts, its artifact served. The last group checks what the
tracking module is meant to give the UI: the training-runs view as the experiment's landing page, a parent run
whose Duration spans its stages, the Dataset column filled, headline metrics on the parent.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from browser import (DATASET_COL, DURATION_COL, NAME_COL, SECTION_HEADER, TALL_VIEWPORT, Browser, MlflowUI,
                     cell_text, chart_layout, chromium_path, expand, expected_chart_layout, format_duration,
                     landing_view, parse_duration, row, search_charts, section_title, sync_playwright,
                     wait_rendered_chart)
from mlflow.tracking import MlflowClient

pytestmark = pytest.mark.slow

STAGES = ["tokenizer", "cache", "carve", "phase1", "cstar", "phase2", "evaluate", "baselines", "compare"]
KIND_TAG = "mlflow.experimentKind"


@pytest.fixture(scope="module")
def browser_available():
    """Fail (not skip) before the project is built when chromium or playwright is missing."""
    chromium_path()
    sync_playwright()


class UI:
    """The server, the browser and what the store says about the execution the pages should show."""

    def __init__(self, root, server: MlflowUI, browser: Browser):
        self.root, self.server, self.browser = root, server, browser
        self.client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
        self.experiment = self.client.get_experiment_by_name("cvfp")
        assert self.experiment is not None, "the tiny pipeline logged no experiment `cvfp`"
        self.experiment_id = self.experiment.experiment_id
        runs = self.client.search_runs([self.experiment_id], max_results=1000)
        parents = sorted((r for r in runs if r.data.tags.get("cvfp.stage") == "pipeline"
                          and (r.info.run_name or "").startswith("repro-")), key=lambda r: r.info.start_time)
        assert parents, f"no parent run (tag cvfp.stage=pipeline, named repro-...) among {len(runs)} runs"
        self.parent = parents[0]  # the fixture's `dvc repro`; later modules may add executions
        self.children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == self.parent.info.run_id]
        self.stage_runs = {r.data.tags.get("cvfp.stage"): r for r in self.children}
        self._landing = None
        self._runs_table = None

    def route(self, *parts: str) -> str:
        return "/".join(["experiments", self.experiment_id, *parts])

    def landing(self):
        """The bare experiment URL in a fresh browser (no localStorage): (view, screenshot); opened once."""
        if self._landing is None:
            page = self.browser.page(self.route(), model_training=False)
            view = landing_view(self.browser, page)
            shot = self.browser.screenshot(page, "experiment-landing.png")
            print(f"experiment landing page #/experiments/{self.experiment_id} -> {view} (URL now {page.url}); "
                  f"experiment tags: {self.experiment.tags}")
            page.context.close()
            self._landing = (view, shot)
        return self._landing

    def runs_table(self):
        """open_runs_table's (page, nested), opened once for the tests that only read it (a load costs ~5 s)."""
        if self._runs_table is None:
            self._runs_table = open_runs_table(self)
        return self._runs_table

    def close(self):
        if self._runs_table is not None:
            self._runs_table[0].context.close()


@pytest.fixture(scope="module")
def ui(browser_available, project, tmp_path_factory):
    root, _, _ = project
    server = MlflowUI(root / "mlflow.db", tmp_path_factory.mktemp("mlflow-ui")).start()
    try:
        browser = Browser(server)
        try:
            shown = UI(root, server, browser)
            try:
                yield shown
            finally:
                shown.close()
        finally:
            browser.close()
    finally:
        server.stop()


def open_runs_table(ui: UI):
    """The runs table (Model training view) with the execution's parent row expanded."""
    page = ui.browser.page(ui.route("runs"))
    parent_id = ui.parent.info.run_id
    ui.browser.wait(page, f'.ag-pinned-left-cols-container [role="row"][row-id="{parent_id}"]',
                    f"the parent run {ui.parent.info.run_name} in the runs table")
    nested = expand(ui.browser, page, parent_id, [r.info.run_id for r in ui.children])
    return page, nested


def run_name_shown(page, run_id: str) -> str:
    """The run name as its row's link shows it (the name cell also holds the run's colour label)."""
    link = row(page, run_id).locator(f'[col-id="{NAME_COL}"] a[href*="/runs/{run_id}"]')
    return " ".join(link.first.inner_text().split())


def metric_charts_page(ui: UI, run_id: str):
    page = ui.browser.page(ui.route("runs", run_id, "model-metrics"), viewport=TALL_VIEWPORT)
    ui.browser.wait(page, SECTION_HEADER, f"the Model metrics tab of run {run_id}")
    return page


def curves(ui: UI, run, word: str) -> list[str]:
    """The run's metric keys containing `word` that are curves (more than one point): those are line charts."""
    return sorted(key for key in run.data.metrics
                  if word in key and len(ui.client.get_metric_history(run.info.run_id, key)) > 1)


# --- what the UI shows today -----------------------------------------------------------------------------------

def test_chromium_and_playwright_are_installed():
    """A missing browser or driver is a failure with the install line (the fixtures fail the same way)."""
    assert chromium_path()
    assert sync_playwright()


def test_experiment_lists_the_execution_and_its_stages(ui):
    assert sorted(ui.stage_runs) == sorted(STAGES), f"stage runs under the parent: {sorted(ui.stage_runs)}"
    page, nested = ui.runs_table()
    assert run_name_shown(page, ui.parent.info.run_id) == ui.parent.info.run_name
    shown = {run_name_shown(page, run.info.run_id): run for run in ui.children}
    assert sorted(shown) == sorted(STAGES), f"stage rows shown under {ui.parent.info.run_name}: {sorted(shown)}"
    print(f"runs table: {ui.parent.info.run_name} with {len(shown)} stage runs "
          f"({'nested: shown after expanding the parent' if nested else 'shown without expanding'})")
    ui.browser.screenshot(page, "runs-table-parent-expanded.png")


def test_phase1_run_shows_effective_rank_and_convergence_charts(ui):
    phase1 = ui.stage_runs["phase1"]
    ranks, convergence = curves(ui, phase1, "effective_rank"), curves(ui, phase1, "convergence")
    assert len(ranks) >= 2, f"phase1 effective-rank curves in the store: {ranks}"
    assert len(convergence) >= 2, f"phase1 convergence curves in the store: {convergence}"
    page = metric_charts_page(ui, phase1.info.run_id)
    try:
        headers = [section_title(t) for t in page.locator(SECTION_HEADER).all_inner_texts()]
        shown = sum(int(h.rsplit("(", 1)[1].split(")")[0]) for h in headers if "(" in h)
        metrics = [k for k in phase1.data.metrics if not k.startswith("system/")]
        assert shown == len(metrics), f"sections {headers} count {shown} charts, the run has {len(metrics)} metrics"
        ui.browser.screenshot(page, "phase1-metric-charts.png")
        for word, keys in (("effective_rank", ranks), ("convergence", convergence)):
            search_charts(page, word)
            for key in keys:
                wait_rendered_chart(ui.browser, page, key, curve=True)
            ui.browser.screenshot(page, f"phase1-charts-{word}.png")
        print(f"phase1: {shown} metric charts ({len(headers)} section(s): {headers}); drawn curves: {ranks + convergence}")
    finally:
        page.context.close()


def test_phase1_opens_on_effective_rank_convergence_and_cvfp_loss(ui):
    """The first charts of the Phase-1 run are the curves a researcher opens it for, train and val side by side.

    MLflow 3.17 orders a run's charts (see expected_chart_layout) by section, the key's prefix before its last
    '/', sorted, "Model metrics" (no prefix) last, and by key within a section; the phase1 stage names its curves
    for that (`cvfp.tracking.phase1_curve`)."""
    phase1 = ui.stage_runs["phase1"]
    expected = expected_chart_layout(phase1.data.metrics)
    first = [(name, keys) for name, keys in expected[:3]]
    assert first == [(f"{n}_{q}", [f"{n}_{q}/train", f"{n}_{q}/val"])
                     for n, q in ((1, "effective_rank"), (2, "convergence_rate"), (3, "cvfp_loss"))], first
    page = metric_charts_page(ui, phase1.info.run_id)
    try:
        wait_rendered_chart(ui.browser, page, expected[0][1][0], curve=True)
        layout = chart_layout(page)  # cards out of view are not rendered: compare the rendered prefix of each section
        print("phase1 chart layout as rendered: " + "; ".join(f"{name}: {', '.join(keys)}" for name, keys in layout))
        assert [name.rsplit(" (", 1)[0] for name, _ in layout] == [name for name, _ in expected]
        for (name, keys), (_, want) in zip(layout, expected):
            assert keys == want[:len(keys)], f"section {name}: rendered {keys}, expected the order {want}"
        assert layout[0][1] == ["1_effective_rank/train", "1_effective_rank/val"], layout[0]
        ui.browser.screenshot(page, "phase1-first-charts.png")
    finally:
        page.context.close()


def test_phase1_artifact_is_served(ui):
    phase1 = ui.stage_runs["phase1"]
    files = [a.path for a in ui.client.list_artifacts(phase1.info.run_id)]
    assert "phase1_iterations.csv" in files, f"phase1 artifacts in the store: {files}"
    page = ui.browser.page(ui.route("runs", phase1.info.run_id, "artifacts"))
    try:
        ui.browser.wait(page, 'text="phase1_iterations.csv"', "phase1_iterations.csv in the artifact tree").click()
        ui.browser.wait(page, 'text="train_effective_rank"', "the preview of phase1_iterations.csv (read from "
                        f"{phase1.info.artifact_uri})")
    finally:
        page.context.close()


def test_landing_page_opens(ui):
    view, shot = ui.landing()
    assert view in ("runs", "genai-overview") and shot.is_file()


def test_model_training_link_lands_on_runs(ui):
    """`#/experiments/<id>?workflowType=machine_learning` (the sidebar's "Model training" switch) opens the runs."""
    page = ui.browser.page(ui.route())
    try:
        assert landing_view(ui.browser, page) == "runs"
    finally:
        page.context.close()


# --- what the tracking changes are meant to give the UI ---------------------------------------------------------
# (the landing-view test is last: under `-x` it would otherwise hide the results of the others)

def test_parent_duration_spans_its_stages(ui):
    start = min(r.info.start_time for r in ui.children)
    end = max(r.info.end_time or 0 for r in ui.children)
    span = end - start
    page, _ = ui.runs_table()
    shown = cell_text(page, ui.parent.info.run_id, DURATION_COL)
    stages = {r.info.run_name: cell_text(page, r.info.run_id, DURATION_COL) for r in ui.children}
    print(f"Duration: parent {shown}, stages {stages}; stages span {format_duration(span)}")
    ms, rounding = parse_duration(shown)
    assert ms >= 0.98 * span - rounding, (
        f"the parent's Duration {shown} does not span its stages ({format_duration(span)}, first stage start to "
        f"last stage end); parent start/end in the store: {ui.parent.info.start_time}/{ui.parent.info.end_time}")


def test_dataset_column_is_filled(ui):
    page, _ = ui.runs_table()
    for run in (ui.stage_runs["phase1"], ui.parent):
        inputs = run.inputs.dataset_inputs if run.inputs else []
        text = cell_text(page, run.info.run_id, DATASET_COL)
        print(f"Dataset column of {run.info.run_name}: {text!r}")
        assert inputs, f"run {run.info.run_name} has no dataset inputs in the store (client.log_inputs)"
        first = inputs[0].dataset
        assert f"{first.name} ({first.digest})" in text, (
            f"Dataset cell of {run.info.run_name} is {text!r}; the store has {[d.dataset.name for d in inputs]}")


def test_parent_shows_headline_metrics(ui):
    metrics = sorted(ui.parent.data.metrics)
    assert metrics, f"the parent run {ui.parent.info.run_name} has no metrics"
    assert any("bpb" in key for key in metrics), f"no bits-per-byte headline among the parent's metrics {metrics}"
    page = metric_charts_page(ui, ui.parent.info.run_id)
    try:
        first = expected_chart_layout(metrics)[0][1][0]
        wait_rendered_chart(ui.browser, page, first, curve=False)
        print(f"parent {ui.parent.info.run_name}: {len(metrics)} metrics {metrics}")
        ui.browser.screenshot(page, "parent-metric-charts.png")
    finally:
        page.context.close()


def test_the_link_cvfp_ui_prints_opens_on_the_runs(ui):
    """`cvfp ui` prints the experiment's link; in a fresh browser (no switch remembered) it opens on the runs.

    The bare `#/experiments/<id>` opens on the GenAI overview whatever the experiment's tag says: MLflow 3.17's UI
    takes the view from its sidebar switch (URL ?workflowType=, else localStorage mlflow.workflowType_v1, else
    genai). The tag is still set, for MLflow versions that read it.
    """
    assert ui.experiment.tags.get(KIND_TAG) == "custom_model_development"
    env = {**os.environ, "DVC_ROOT": str(ui.root)}
    env.pop("MLFLOW_TRACKING_URI", None)
    done = subprocess.run([sys.executable, "-m", "cvfp.cli", "ui", "--url-only", "--port", str(ui.server.port)],
                          cwd=ui.root, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    link = done.stdout.strip()
    assert link == f"{ui.server.url}/#/experiments/{ui.experiment_id}/runs?workflowType=machine_learning"
    page = ui.browser.page(link.split("/#/", 1)[1], model_training=False)
    try:
        view = landing_view(ui.browser, page)
        shot = ui.browser.screenshot(page, "experiment-via-cvfp-ui-link.png")
        assert view == "runs", f"{link} opened on the {view} view (screenshot {shot})"
    finally:
        page.context.close()
