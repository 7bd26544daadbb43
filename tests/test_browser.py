"""Chapter 00 in a real browser: JupyterLab driven by Playwright in Debian's Chromium.

The notebook is run from the Lab UI, then the debugger widget's "Next token" button is
clicked three times, as a learner would. The counter and the text shown are read back
from the page and compared with the engine; a screenshot is kept as a test artifact.

Needs ``/usr/bin/chromium`` (``apt-get install -y chromium``) and Playwright for Python
(``pip install playwright``); no browser is ever downloaded. ``bash scripts/dev.sh test``
installs both where it can; without them the test is skipped. It is a ``slow`` test (``CYCLELAB_SLOW=1``).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from playwright.sync_api import Locator, Page

# slow: the whole chapter run in Lab costs about a minute; tests/test_browser_view.py keeps the debugger's
# clicks in Lab and Notebook 7 in the test command.
pytestmark = [pytest.mark.browser, pytest.mark.slow]

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = "00_the_clock_cycle.ipynb"
CHROMIUM = Path("/usr/bin/chromium")
TINY = ROOT / "data" / "tiny" / "config.json"
ARTIFACTS = ROOT / "tests" / "artifacts" / "browser"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
# Lab settings for a quiet, complete page: no news toast, every cell attached to the DOM.
LAB_SETTINGS = {
    "@jupyterlab/apputils-extension/notification": {"fetchNews": "false", "checkForUpdates": False},
    "@jupyterlab/notebook-extension/tracker": {"windowingMode": "none"},
}
# The notebook's own kernel is up and idle (running cells before that starts a second kernel).
KERNEL_READY = """() => {
    const context = window.jupyterapp && window.jupyterapp.shell.currentWidget
        && window.jupyterapp.shell.currentWidget.sessionContext;
    const kernel = context && context.isReady && context.session && context.session.kernel;
    return Boolean(kernel) && kernel.status === 'idle';
}"""
CLICKS = 3
TIMEOUT_MS = 90_000  # one wait (the whole notebook's run included); the test takes far less


@dataclass(frozen=True)
class Lab:
    """A running JupyterLab server: where to reach it and where it serves from."""

    url: str
    token: str
    root: Path
    log: Path

    def page(self, path: str) -> str:
        """The address of ``path`` (``lab/tree/…`` or ``api/…``) with the token."""
        return f"{self.url}/{path}?token={self.token}"


def free_port() -> int:
    """A TCP port nobody listens on right now (the server is told not to try others)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def notebook_prompt(path: Path) -> str:
    """The ``prompt`` set in the notebook's ``parameters`` cell."""
    cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
    source = next("".join(c["source"]) for c in cells if "parameters" in c.get("metadata", {}).get("tags", []))
    values: dict = {}
    exec(source, {}, values)  # plain assignments of literals
    return values["prompt"]


def shown(text: str) -> str:
    """Text as the debugger's text view shows it (a newline as ⏎ and a line break), whitespace runs collapsed."""
    return collapsed(text.replace("\n", "⏎\n"))


def collapsed(text: str) -> str:
    """``text`` with every run of whitespace made one space (the page and Python break lines apart)."""
    return " ".join(text.split())


def browser_api():
    """Playwright's sync API, or a skip that says how to get it and Chromium."""
    if not CHROMIUM.exists():
        pytest.skip(
            f"no Chromium at {CHROMIUM}: as root, `apt-get update && apt-get install -y chromium` "
            "(bash scripts/dev.sh test does it when it can)"
        )
    try:
        from playwright import sync_api
    except ImportError:
        pytest.skip(
            "Playwright for Python is missing: `.venv/bin/python -m pip install playwright` "
            "(it is in the dev extra; no browser download is needed)"
        )
    if not TINY.exists():
        pytest.skip("the tiny model is not trained yet (data/tiny/config.json): run `cyclelab train-tiny`")
    return sync_api


@pytest.fixture
def playwright_api():
    """Playwright's sync API, or a skip that says how to get it and Chromium."""
    return browser_api()


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    """``jupyter lab`` on a copy of notebooks/ (Lab autosaves what it opens); always stopped after."""
    root = tmp_path / "notebooks"
    shutil.copytree(ROOT / "notebooks", root, ignore=shutil.ignore_patterns(".ipynb_checkpoints"))
    with running_lab(root, tmp_path) as server:
        yield server


@contextmanager
def running_lab(root: Path, tmp: Path) -> Iterator[Lab]:
    """A ``jupyter lab`` server on ``root`` (its settings, runtime and log under ``tmp``), stopped on exit.
    The same server also serves Jupyter Notebook 7's pages (``notebooks/…``) where that is installed."""
    settings = tmp / "lab-settings"
    for name, values in LAB_SETTINGS.items():
        target = settings / f"{name}.jupyterlab-settings"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(values))
    port, token = free_port(), secrets.token_hex(16)
    command = [
        sys.executable,
        "-m",
        "jupyter",
        "lab",
        "--no-browser",
        "--ServerApp.ip=127.0.0.1",
        f"--ServerApp.port={port}",
        "--ServerApp.port_retries=0",
        f"--IdentityProvider.token={token}",
        f"--ServerApp.root_dir={root}",
        "--LabApp.expose_app_in_browser=True",
        "--JupyterNotebookApp.expose_app_in_browser=True",  # Notebook 7's pages, where it is installed
        f"--LabApp.user_settings_dir={settings}",
        f"--LabApp.workspaces_dir={tmp / 'workspaces'}",
    ]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        command.append("--allow-root")
    env = {**os.environ, "JUPYTER_RUNTIME_DIR": str(tmp / "runtime"), "PYTHONUNBUFFERED": "1"}
    log = tmp / "jupyter-lab.log"
    with log.open("wb") as out:
        server = subprocess.Popen(
            command, cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    lab = Lab(f"http://127.0.0.1:{port}", token, root, log)
    try:
        wait_for_server(lab, server)
        yield lab
    finally:
        stop(server)


def wait_for_server(lab: Lab, server: subprocess.Popen, timeout: float = 60) -> None:
    """Poll ``/api/status`` until the server answers; fail with its log if it dies or stays silent."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"jupyter lab exited with {server.returncode}:\n{lab.log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(lab.page("api/status"), timeout=2) as answer:
                if answer.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    pytest.fail(f"jupyter lab did not answer in {timeout:.0f} s:\n{lab.log.read_text()[-3000:]}")


def stop(server: subprocess.Popen) -> None:
    """Stop the server we started (SIGTERM: it shuts its kernels down), then anything left in its group."""
    if server.poll() is None:
        server.terminate()
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=5)
    try:
        os.killpg(server.pid, signal.SIGKILL)  # a kernel left behind: its group is the server's own
    except (ProcessLookupError, PermissionError):
        pass


def test_chapter00_debugger_next_token_three_times(playwright_api, lab: Lab, tiny_engine, tmp_path: Path) -> None:
    """Run chapter 00 in Lab, click "Next token" three times: cycle 3, and the engine's three tokens shown."""
    expect = playwright_api.expect
    prompt = notebook_prompt(lab.root / NOTEBOOK)
    tokens = [r.token for r in tiny_engine.generate(prompt, CLICKS, stop_at_eos=False).records]
    started = time.monotonic()
    with playwright_api.sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"),
            executable_path=str(CHROMIUM),
            args=CHROMIUM_ARGS,
            headless=True,
            viewport={"width": 1400, "height": 1800},
        )  # tall: the whole widget in view
        try:
            page = context.pages[0] if context.pages else context.new_page()
            page.set_default_timeout(TIMEOUT_MS)
            expect.set_options(timeout=TIMEOUT_MS)
            page.goto(lab.page(f"lab/tree/{NOTEBOOK}"))
            page.wait_for_function(KERNEL_READY)  # the indicator reads idle before a kernel even starts
            page.evaluate("window.jupyterapp.shell.collapseLeft()")
            page.evaluate("window.jupyterapp.commands.execute('notebook:run-all-cells')")

            next_token = page.get_by_role("button", name="Next token", exact=True)
            expect(next_token).to_be_visible()
            wait_until_every_cell_ran(page)

            widget = page.locator(".jp-OutputArea-output", has=next_token)
            counter = widget.get_by_text(re.compile(r"^cycle \d+$"))
            text_view = widget.locator(".widget-html-content div[style*='pre-wrap']")
            expect(counter).to_have_text("cycle 0")
            before = text_view.inner_text()
            assert collapsed(before) == shown(prompt)

            for n in range(1, CLICKS + 1):
                next_token.click()
                expect(counter).to_have_text(f"cycle {n}")
            expect(text_view.locator("span[title^='#']")).to_have_count(CLICKS)
            after = text_view.inner_text()
            assert collapsed(after) == shown(prompt + "".join(tokens)), (before, after, tokens)
            expect(widget.get_by_text("⚠")).to_have_count(0)  # the error label and the views' warnings

            screenshot = save_screenshot(page, widget)
            print(f"\nscreenshot: {screenshot}  ({time.monotonic() - started:.1f} s in the browser)")
        finally:
            context.close()


def wait_until_every_cell_ran(page: Page) -> None:
    """Wait until every code cell has an execution count (run-all clears them) and the kernel is idle."""
    page.wait_for_function("""() => {
        const panel = window.jupyterapp.shell.currentWidget;
        const cells = panel.content.widgets.filter(cell => cell.model.type === 'code');
        const kernel = panel.sessionContext.session.kernel;
        return cells.length > 0 && cells.every(cell => cell.model.executionCount !== null) && kernel.status === 'idle';
    }""")


def save_screenshot(page: Page, widget: Locator) -> Path:
    """A screenshot of the debugger ``widget`` (its output area) in tests/artifacts/browser/."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / "chapter00-debugger.png"
    for close in page.locator(".jp-Notification-Toast-Close").all():  # none expected: LAB_SETTINGS mute the news
        close.click()
    widget.scroll_into_view_if_needed()
    widget.screenshot(path=str(path))
    return path
