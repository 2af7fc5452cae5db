"""Headless Chromium (Debian's ``chromium`` and ``chromium-driver``) driven by Selenium, and
what a user sees in the MLflow UI's runs table."""

from __future__ import annotations

import shutil
from pathlib import Path

from selenium import webdriver
from selenium.common.exceptions import WebDriverException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.remote.webdriver import WebDriver

# Quiet and self-contained: no sandbox (tests run as root), no GPU, no calls home, a fresh profile.
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    # Wide enough for the runs table's columns next to the UI's assistant panel: the table
    # renders only the columns that fit, so a narrow window hides the last ones.
    "--window-size=2560,1200",
]


class Unavailable(Exception):
    """Chromium or its driver cannot be found or started here; the message says why."""


def chromium(profile: Path) -> WebDriver:
    """Headless Chromium with a fresh user-data dir at ``profile``."""
    browser = shutil.which("chromium") or "/usr/bin/chromium"
    driver = shutil.which("chromedriver") or "/usr/bin/chromedriver"
    for path, package in ((browser, "chromium"), (driver, "chromium-driver")):
        if not Path(path).is_file():
            raise Unavailable(f"{path} not found (apt: {package})")
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in [*FLAGS, f"--user-data-dir={profile}"]:
        options.add_argument(flag)
    try:
        # An explicit driver path: Selenium Manager then downloads nothing.
        return webdriver.Chrome(service=Service(executable_path=driver), options=options)
    except WebDriverException as error:
        raise Unavailable(f"Chromium did not start: {error.msg}") from error


# The runs table is an ag-grid: a row is split between a pinned and a scrolling container, both
# with the row's index; a cell names its column in col-id. A cell counts as shown when it lies
# inside the window. A link's text is what the user reads (a run-name cell also holds a hidden
# colour label).
_TABLE_JS = """
const titles = arguments[0];
const shown = (el) => {
  const r = el.getBoundingClientRect();
  return r.width > 0 && r.height > 0 && r.left >= 0 && r.top >= 0
    && r.right <= window.innerWidth && r.bottom <= window.innerHeight;
};
const text = (el) => ((el.querySelector('a') || el).innerText || '').trim();
const headers = [...document.querySelectorAll('.ag-header-cell[col-id]')].filter(shown);
const columns = titles.map((title) => {
  const header = headers.find((h) => h.innerText.trim() === title);
  return header ? header.getAttribute('col-id') : null;
});
if (columns.includes(null)) return null;
const indices = [...new Set(
  [...document.querySelectorAll('.ag-row[row-index]')].map((r) => r.getAttribute('row-index'))
)].sort((a, b) => a - b);
return indices.map((i) => columns.map((id) => {
  const cell = document.querySelector(
    `.ag-row[row-index="${i}"] [role=gridcell][col-id="${CSS.escape(id)}"]`);
  return cell && shown(cell) ? text(cell) : null;
}));
"""


def runs_table(driver: WebDriver, *titles: str) -> list[tuple[str | None, ...]] | None:
    """The runs table's rows, top to bottom, as the texts shown under the columns headed
    ``titles`` (None for a cell outside the window); None while a column is not shown."""
    rows = driver.execute_script(_TABLE_JS, list(titles))
    return None if rows is None else [tuple(row) for row in rows]
