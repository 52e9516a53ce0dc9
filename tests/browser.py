"""Helpers for tests/test_mlflow_ui.py: an `mlflow ui` server on a project's sqlite store, and Debian's chromium
driven by Playwright's sync API (launched by path: no `playwright install`, no browser download).

What the selectors rely on (MLflow 3.17.2's UI; found by reading its bundled JS and pages, see the test module):
- the sidebar's GenAI / Model training switch, not the experiment tag `mlflow.experimentKind`, decides the
  experiment page's view: `?workflowType=machine_learning` in the URL, else localStorage `mlflow.workflowType_v1`,
  else `genai` (the GenAI overview);
- the runs table is an ag-grid: one row element per run (`row-id` = run id) in the pinned-left part (run name)
  and one in the centre part (dataset, duration, ...); a parent's children show after its expander is clicked;
- a run's "Model metrics" tab has one card per metric (`h4[title=<metric key>]`), plotted with plotly
  (`.js-plotly-plot svg.main-svg`; a curve is a `path.js-line`, a single value a bar), cards out of view are
  not rendered until scrolled to; the search box filters them.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
INSTALL = ("Install the browser with `apt-get install -y chromium` (Debian's package, /usr/bin/chromium) and the "
           "driver with `pip install playwright` (it is in the `test` extra: `pip install -e '.[test]'`); "
           "`playwright install` is not needed, the test launches the system chromium by path.")
TIMEOUT_MS = 120_000  # per wait: the machine is slow (2 shared cores) and the UI's first load compiles a lot of JS
STARTUP_S = 240.0
VIEWPORT = {"width": 1600, "height": 1000}
TALL_VIEWPORT = {"width": 1600, "height": 2200}  # the metric charts page: more charts rendered per screenshot
ML_VIEW = "workflowType=machine_learning"  # the sidebar's "Model training" switch, as the UI's own links carry it

# localStorage set in every page: the MLflow Assistant panel opens itself once per browser and covers a third of
# the page otherwise (key from the UI's useLocalStorage: `<key>_v<version>`)
NO_ASSISTANT = 'window.localStorage.setItem("mlflow.assistant.fab.autoOpenedOnFirstLoad_v1", "true")'

RUNS_VIEW = '.ag-header-cell[col-id="attributes.`Run Name`"]'
GENAI_OVERVIEW = '[data-component-id="mlflow.experiment.overview.tabs"]'
CHART_CARD = '[data-testid="experiment-view-compare-runs-card"]'
SECTION_HEADER = '[data-testid="experiment-view-compare-runs-section-header"]'
PLOT = ".js-plotly-plot svg.main-svg"
SKELETON = '[class*="skeleton" i], [data-testid*="skeleton" i]'
DURATION_COL = "duration"
DATASET_COL = "attributes.`Dataset`"
NAME_COL = "attributes.`Run Name`"


def screenshot_dir() -> Path:
    folder = Path(os.environ.get("CVFP_UI_SCREENSHOTS") or REPO / "build" / "ui-screenshots")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def chromium_path() -> str:
    """The system chromium, or a test failure that says how to install it."""
    candidates = ["/usr/bin/chromium", shutil.which("chromium"), shutil.which("chromium-browser")]
    for candidate in candidates:
        if candidate and os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    pytest.fail(f"no chromium executable (looked for /usr/bin/chromium, chromium, chromium-browser on PATH). {INSTALL}",
                pytrace=False)


def sync_playwright():
    try:
        from playwright.sync_api import sync_playwright as start
    except ImportError as err:
        pytest.fail(f"Python playwright is not importable ({err}). {INSTALL}", pytrace=False)
    return start


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as err:
        return f"(no log: {err})"


class MlflowUI:
    """`mlflow ui` on a sqlite store, in its own process group (the uvicorn worker is its child)."""

    def __init__(self, store: Path, workdir: Path, experiment: str = "cvfp"):
        self.store = store
        self.experiment = experiment
        self.workdir = workdir
        self.log_path = workdir / "mlflow-ui.log"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self) -> "MlflowUI":
        # no artifact flags: the runs' artifact URIs are absolute file:// URIs, which the server lists and serves
        # as they are; cwd is a scratch folder so that nothing the server creates (./mlartifacts) lands in the project
        if not self.store.is_file():  # the server would create an empty store and show nothing
            pytest.fail(f"no MLflow store at {self.store}: the pipeline run logged nothing", pytrace=False)
        command = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", f"sqlite:///{self.store}",
                   "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"]
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(command, cwd=self.workdir, env=env, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, start_new_session=True)
        self._wait_healthy(" ".join(command))
        self._check_store()
        return self

    def _check_store(self) -> None:
        """/health answers before the store is opened: one API call proves the server reads the pipeline's store."""
        url = f"{self.url}/api/2.0/mlflow/experiments/get-by-name?experiment_name={self.experiment}"
        try:
            with urllib.request.urlopen(url, timeout=120) as response:
                response.read()
        except OSError as err:
            detail = err.read().decode(errors="replace")[:500] if hasattr(err, "read") else ""
            self.stop()
            self.fail(f"the server is up but does not show experiment {self.experiment!r} of sqlite:///{self.store}: "
                      f"GET {url} -> {err} {detail}")

    def _wait_healthy(self, command: str) -> None:
        deadline = time.monotonic() + STARTUP_S
        error = "no answer yet"
        while time.monotonic() < deadline:
            code = self.process.poll()
            if code is not None:
                self.fail(f"`{command}` exited with code {code} before answering /health")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=5) as response:
                    if response.status == 200:
                        return
                    error = f"HTTP {response.status}"
            except OSError as err:
                error = str(err)
            time.sleep(0.5)  # polling an HTTP endpoint: there is no event to wait on
        self.stop()
        self.fail(f"`{command}` did not answer {self.url}/health within {STARTUP_S:.0f}s (last: {error})")

    def fail(self, message: str) -> None:
        pytest.fail(f"MLflow UI: {message}\n--- {self.log_path} (last lines) ---\n{tail(self.log_path)}", pytrace=False)

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        group = os.getpgid(self.process.pid)  # the group this Popen started (start_new_session): the server and its worker
        os.killpg(group, signal.SIGTERM)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(group, signal.SIGKILL)
            self.process.wait(timeout=30)


class Browser:
    """One headless chromium for the module; each page gets a fresh context (fresh localStorage)."""

    def __init__(self, server: MlflowUI):
        self.server = server
        executable = chromium_path()
        self._playwright = sync_playwright()().start()
        try:
            self.browser = self._playwright.chromium.launch(executable_path=executable, args=["--no-sandbox"],
                                                            headless=True, timeout=TIMEOUT_MS)
        except Exception as err:
            self._playwright.stop()
            pytest.fail(f"could not launch {executable} with Playwright: {err}. {INSTALL}", pytrace=False)
        self.shots: list[Path] = []

    def page(self, route: str, viewport: dict | None = None, model_training: bool = True):
        """A new page at `#/<route>`; `model_training` adds the sidebar switch's `workflowType=machine_learning`."""
        context = self.browser.new_context(viewport=viewport or VIEWPORT)
        context.set_default_timeout(TIMEOUT_MS)
        context.add_init_script(NO_ASSISTANT)
        page = context.new_page()
        page.goto(self.url(route, model_training), wait_until="domcontentloaded")
        return page

    def url(self, route: str, model_training: bool = True) -> str:
        route = route.lstrip("/")
        if model_training:
            route += ("&" if "?" in route else "?") + ML_VIEW
        return f"{self.server.url}/#/{route}"

    def wait(self, page, selector: str, what: str, state: str = "visible"):
        """Wait for `selector`; on a timeout fail with what was expected, the page's URL, a screenshot and the server log."""
        locator = page.locator(selector).first
        try:
            locator.wait_for(state=state, timeout=TIMEOUT_MS)
        except Exception as err:
            self.fail(page, f"{what}: `{selector}` not {state} after {TIMEOUT_MS // 1000}s ({type(err).__name__})")
        return locator

    def fail(self, page, message: str) -> None:
        name = "failure-" + re.sub(r"[^a-z0-9]+", "-", message.lower())[:60].strip("-") + ".png"
        try:
            shot = self.screenshot(page, name)
        except Exception as err:  # the page itself may be gone
            shot = f"(no screenshot: {err})"
        try:
            body = page.inner_text("body", timeout=5_000)[:1500]
        except Exception:
            body = "(page text unavailable)"
        self.server.fail(f"{message}\nURL: {page.url}\nscreenshot: {shot}\npage text: {body!r}")

    def screenshot(self, page, name: str) -> Path:
        path = screenshot_dir() / name
        page.screenshot(path=str(path))
        self.shots.append(path)
        print(f"\nscreenshot: {path}")
        return path

    def close(self) -> None:
        try:
            self.browser.close()
        finally:
            self._playwright.stop()


SETTLE_S = 2.0  # a view counts once it has stayed this long: the UI may show one view, then switch to the URL's


def landing_view(browser: Browser, page) -> str:
    """Which view the experiment page settles on: 'runs' (training runs table) or 'genai-overview'."""
    browser.wait(page, f"{RUNS_VIEW}, {GENAI_OVERVIEW}", "the experiment page (runs table or GenAI overview)")
    deadline = time.monotonic() + TIMEOUT_MS / 1000
    seen, since = None, time.monotonic()
    while time.monotonic() < deadline:
        view = ("runs" if page.locator(RUNS_VIEW).count() else
                "genai-overview" if page.locator(GENAI_OVERVIEW).count() else None)
        if view != seen:
            seen, since = view, time.monotonic()
        elif view is not None and time.monotonic() - since >= SETTLE_S:
            return view
        page.wait_for_timeout(100)
    return seen or "neither"


def row(page, run_id: str, part: str = "left"):
    """The ag-grid row of a run: part 'left' holds the run name, 'center' the dataset and duration cells."""
    container = ".ag-pinned-left-cols-container" if part == "left" else ".ag-center-cols-container"
    return page.locator(f'{container} [role="row"][row-id="{run_id}"]')


def cell_text(page, run_id: str, col_id: str) -> str:
    cell = row(page, run_id, "center").locator(f'[col-id="{col_id}"]')
    return " ".join(cell.inner_text().split())


def expand(browser: Browser, page, parent_id: str, child_ids: list[str]) -> bool:
    """Show the children of a parent row; True when they were nested (hidden until its expander is clicked)."""
    if all(row(page, child).count() for child in child_ids):
        return False
    button = row(page, parent_id).locator(f'[col-id="{NAME_COL}"] button').first
    try:
        button.click()
    except Exception as err:
        browser.fail(page, f"the expander of the parent run {parent_id} ({type(err).__name__})")
    for child in child_ids:
        browser.wait(page, f'.ag-pinned-left-cols-container [role="row"][row-id="{child}"]', f"child run {child}")
    return True


def chart_card(page, key: str):
    return page.locator(CHART_CARD).filter(has=page.locator(f'h4[title="{key}"]'))


def wait_rendered_chart(browser: Browser, page, key: str, curve: bool) -> None:
    """A chart card titled `key` with a drawn plotly figure: a line for a curve, no loading skeleton."""
    card = chart_card(page, key)
    try:
        card.first.wait_for(state="visible", timeout=TIMEOUT_MS)
        card.first.scroll_into_view_if_needed()
        card.first.locator(PLOT).first.wait_for(state="visible", timeout=TIMEOUT_MS)
        if curve:
            card.first.locator("path.js-line").first.wait_for(state="attached", timeout=TIMEOUT_MS)
    except Exception as err:
        browser.fail(page, f"chart {key} not rendered ({type(err).__name__})")
    assert card.first.locator(SKELETON).count() == 0, f"chart {key} still shows a loading skeleton"


def search_charts(page, text: str) -> None:
    page.get_by_placeholder("Search metric charts").fill(text)


def section_title(text: str) -> str:
    """A chart section header's text, "Model metrics (33)" (without its "Add chart" button)."""
    return re.sub(r"\s*Add chart\s*$", "", " ".join(text.split()))


def chart_layout(page) -> list[tuple[str, list[str]]]:
    """The rendered sections and, in each, the metric keys of the rendered chart cards, in page order."""
    items = page.evaluate(
        """([header, card]) => Array.from(document.querySelectorAll(`${header}, ${card} h4[title]`)).map(
               e => e.tagName === "H4" ? ["chart", e.getAttribute("title")] : ["section", e.innerText])""",
        [SECTION_HEADER, CHART_CARD])
    layout: list[tuple[str, list[str]]] = []
    for kind, text in items:
        if kind == "section":
            layout.append((section_title(text), []))
        elif layout:
            layout[-1][1].append(text)
    return layout


def expected_chart_layout(keys) -> list[tuple[str, list[str]]]:
    """MLflow 3.17's default run-page layout for metric keys (model tab): its getBaseChartAndSectionConfigs.

    A key's section is everything before its last '/' (none: "Model metrics"); sections are sorted by name
    (JS default sort: code units, so digits < upper case < '_' < lower case) and "Model metrics" comes last;
    charts are sorted by key within a section. Keys under "system/" are on the System metrics tab."""
    sections: dict[str, list[str]] = {}
    for key in sorted(k for k in keys if not k.startswith("system/")):
        prefix = "/".join(key.split("/")[:-1])
        sections.setdefault(prefix or "Model metrics", []).append(key)
    order = sorted(s for s in sections if s != "Model metrics") + (["Model metrics"] if "Model metrics" in sections else [])
    return [(name, sections[name]) for name in order]


def format_duration(ms: float) -> str:
    """MLflow's Utils.formatDuration (the runs table's Duration column)."""
    if ms < 500:
        return f"{int(ms)}ms"
    for limit, unit, scale in ((6e4, "s", 1e3), (36e5, "min", 6e4), (864e5, "h", 36e5)):
        if ms < limit:
            return f"{ms / scale:.1f}{unit}"
    return f"{ms / 864e5:.1f}d"


UNITS_MS = {"ms": 1.0, "s": 1e3, "min": 6e4, "h": 36e5, "d": 864e5}


def parse_duration(text: str) -> tuple[float, float]:
    """A Duration cell ("2.0min") as (milliseconds, rounding error in ms)."""
    match = re.fullmatch(r"\s*([0-9.]+)\s*(ms|s|min|h|d)\s*", text)
    assert match, f"not a duration: {text!r}"
    scale = UNITS_MS[match.group(2)]
    return float(match.group(1)) * scale, (0.5 if match.group(2) == "ms" else 0.05 * scale)
