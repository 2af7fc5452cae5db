"""The MLflow UI in a real browser: ``make ui`` on a store holding a real sweep shows the sweep's
parent run, its child runs nested under it, and the swept factor as a column."""

from __future__ import annotations

import os
import signal
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support import expected_conditions as ec
from selenium.webdriver.support.ui import WebDriverWait

from cnnlab.tracking.runs import experiment_link
from tests.browser import Unavailable, chromium, runs_table
from tests.conftest import REPO, run_sweep
from tests.servers import assert_loopback_only, free_port

pytestmark = pytest.mark.slow

SCREENSHOT = REPO / "test-output" / "mlflow_ui.png"
CHILDREN = {f"pooling={p}-s{s}": p for p in ("max", "avg") for s in (0, 1)}
FACTOR = "factor.model.pooling"
WAIT_S = 90  # the first render loads a large bundle; two CPU cores can be slow


def all_shown(rows: list[tuple[str | None, ...]] | None) -> list[tuple[str | None, ...]] | None:
    """``rows`` once every cell of theirs is on screen (the grid renders in steps)."""
    return rows if rows and all(None not in row for row in rows) else None


@dataclass
class Sweep:
    uri: str
    experiment_id: str
    parent: str  # the parent run's name


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[WebDriver]:
    try:
        driver = chromium(tmp_path / "chromium-profile")
    except Unavailable as error:
        pytest.skip(str(error))
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def sweep(tmp_path: Path) -> Sweep:
    result, _, parent, children = run_sweep(
        tmp_path, "experiment=pooling_ablation", "model.pooling=max,avg", "seed=0,1"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(children) == len(CHILDREN)
    return Sweep(f"sqlite:///{tmp_path}/mlflow.db", parent.info.experiment_id, parent.info.run_name)


@pytest.fixture
def ui(sweep: Sweep) -> Iterator[str]:
    """``make ui`` on the sweep's store, as a user starts it; its address."""
    port = free_port()
    server = subprocess.Popen(
        ["make", "--no-print-directory", "ui", f"UI_PORT={port}"],
        cwd=REPO,
        # No usage reports from a test's server.
        env={**os.environ, "MLFLOW_TRACKING_URI": sweep.uri, "MLFLOW_DISABLE_TELEMETRY": "true"},
        start_new_session=True,  # its own process group: make, mlflow and the workers stop together
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    address = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + WAIT_S
        while True:
            assert server.poll() is None, f"make ui exited with {server.returncode}"
            try:
                with urllib.request.urlopen(f"{address}/health", timeout=2):
                    break
            except OSError:
                assert time.monotonic() < deadline, f"make ui did not answer on {address}"
                time.sleep(1)
        assert_loopback_only(port)
        yield address
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


def test_the_ui_shows_the_sweep_its_nested_children_and_the_factor_column(
    browser: WebDriver, sweep: Sweep, ui: str
) -> None:
    wait = WebDriverWait(browser, WAIT_S)
    # MLflow 3.17 opens an experiment on its GenAI overview (#/experiments/<id>/overview/...)
    # unless the link asks for the machine-learning view, as every link cnnlab prints does
    # (the experiment's mlflow.experimentKind tag is not read for it): the runs table.
    browser.get(experiment_link(ui, sweep.experiment_id))
    try:
        # The table has loaded all five runs, yet shows one row: the children are nested under
        # the collapsed parent. Runs that were not its children would show as rows of their own.
        total = f"{1 + len(CHILDREN)} matching runs"
        wait.until(
            ec.visibility_of_element_located((By.XPATH, f"//*[normalize-space()='{total}']")),
            f"the runs table never said '{total}'",
        )
        assert f"/experiments/{sweep.experiment_id}/runs?" in browser.current_url  # not overview
        assert sweep.parent.startswith("sweep-")
        shown = wait.until(lambda d: runs_table(d, "Run Name"), "the runs table shows no rows")
        assert shown == [(sweep.parent,)]

        # The parent's run-name cell holds the expander (a "+" box) that unfolds its children.
        parent_cell = f"//*[@role='gridcell'][.//a[normalize-space()='{sweep.parent}']]"
        wait.until(ec.element_to_be_clickable((By.XPATH, f"{parent_cell}//button"))).click()
        wait.until(
            lambda d: len(runs_table(d, "Run Name") or []) == 1 + len(CHILDREN),
            "expanding the parent did not show its children",
        )
        names = [name for (name,) in runs_table(browser, "Run Name")]
        assert names[0] == sweep.parent
        assert sorted(names[1:]) == sorted(CHILDREN)

        # Tags are hidden by default: show the factor's column from the "Columns" selector.
        browser.find_element(By.XPATH, "//button[normalize-space()='Columns']").click()
        search = wait.until(
            ec.visibility_of_element_located(
                (By.CSS_SELECTOR, "input[placeholder='Search columns']")
            )
        )
        search.send_keys(FACTOR)
        option = f"//*[@data-testid='column-selector-tree']//*[normalize-space()='{FACTOR}']"
        wait.until(
            ec.element_to_be_clickable((By.XPATH, option)),
            f"the column selector offers no '{FACTOR}' column",
        ).click()
        search.send_keys(Keys.ESCAPE)
        rows = wait.until(
            lambda d: all_shown(runs_table(d, "Run Name", FACTOR)),
            f"no '{FACTOR}' column is shown next to every run",
        )
        # Each child shows its own value; the parent, which swept them all, shows none.
        assert dict(rows) == {sweep.parent: "-", **CHILDREN}
    finally:
        SCREENSHOT.parent.mkdir(exist_ok=True)
        browser.save_screenshot(str(SCREENSHOT))
        print(f"screenshot: {SCREENSHOT}")
