"""The app in a real browser: `streamlit run` on a free port, headless Chromium driven by Selenium.

Setup installs Debian's `chromium` and `chromium-driver` when they are missing (root and apt-get needed).
Screenshots go to `artifacts/screenshots/` (kept by CI, named in the README).
"""

from __future__ import annotations

import re
import shutil
import sys
import time
from pathlib import Path

import pytest

selenium = pytest.importorskip("selenium", reason="selenium is in requirements.txt; run `make test`")
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from app_browser import (BrowserSetupError, app_server, ensure_chromium, is_idle, make_driver,  # noqa: E402
                         move_sparsity, texts, wait_metric)

LOAD_TIMEOUT = 420  # seconds; the first page computes scores, runs and recovers the network on 2 shared cores


@pytest.fixture(scope="module")
def results_table(root, tmp_path_factory) -> Path:
    """A scratch copy of the shipped results table and its checkpoints: the pages show the shipped runs, and the
    fine-tuning job started from the page writes its row and network here, not into cached_runs/."""
    shipped = root / "cached_runs" / "results"
    table = tmp_path_factory.mktemp("results") / "sweeps.jsonl"
    shutil.copy2(shipped / "sweeps.jsonl", table)
    shutil.copytree(shipped / "checkpoints", table.parent / "checkpoints")
    return table


@pytest.fixture(scope="module")
def server(root, tmp_path_factory, results_table):
    """One `streamlit run` for every test here (each start imports torch and loads the network again: tens of
    seconds on 2 shared cores), on the scratch results table, with a 6-step fine-tuning budget on offer."""
    env = {"JPQ_RESULTS": str(results_table), "JPQ_JOB_BUDGETS": "6,300"}
    try:
        with app_server(root, log_dir=tmp_path_factory.mktemp("streamlit"), env=env) as url:
            yield url
    except BrowserSetupError as exc:
        pytest.fail(str(exc))


@pytest.fixture(scope="module")
def screenshots(root):
    folder = root / "artifacts" / "screenshots"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture
def browser():
    try:
        chromium, driver_path = ensure_chromium()
    except BrowserSetupError as exc:
        pytest.fail(str(exc))
    drivers = []

    def make():
        drivers.append(make_driver(chromium, driver_path))
        return drivers[-1]

    yield make
    for d in drivers:
        d.quit()


def _wait_metric(driver, label: str, other_than: str | None = None) -> str:
    return wait_metric(driver, label, other_than, timeout=LOAD_TIMEOUT)


def _page_paths(root) -> list[str]:
    """URL paths Streamlit gives the pages: the file name without its number prefix and extension."""
    return [""] + [re.sub(r"^\d+_", "", p.stem) for p in sorted((root / "pages").glob("*.py"))]


def test_every_page_loads_without_an_exception(root, server, browser, screenshots):
    """Without recovery (it is Explore's alone, and in a browser it is the fine-tuning test below that waits for
    the default, recovered, view): the pages themselves are what this test opens."""
    driver = browser()
    for path in _page_paths(root):
        driver.get(f"{server}/{path}?network=resnet20&criterion=magnitude&recovery=none")
        WebDriverWait(driver, LOAD_TIMEOUT, poll_frequency=0.5).until(
            lambda d: is_idle(d) and d.find_elements(By.CSS_SELECTOR, "h1"))
        time.sleep(1.0)
        WebDriverWait(driver, LOAD_TIMEOUT, poll_frequency=0.5).until(is_idle)
        driver.save_screenshot(str(screenshots / f"page-{path or 'Explore'}.png"))
        errors = driver.find_elements(By.CSS_SELECTOR, '[data-testid="stException"]')
        assert not errors, f"page /{path} shows an exception: {errors[0].text[:500]}"


def test_moving_the_sparsity_slider_changes_the_numbers(server, browser, screenshots):
    driver = browser()
    driver.get(f"{server}/?network=resnet20&criterion=magnitude&sparsity=0.5&wbits=8&recovery=none")
    memory = _wait_metric(driver, "Weight memory")
    driver.save_screenshot(str(screenshots / "explore-before.png"))
    move_sparsity(driver, 8)  # 50% -> 90% (5% stops)
    after = _wait_metric(driver, "Weight memory", other_than=memory)
    driver.save_screenshot(str(screenshots / "explore-after.png"))
    assert float(after.split()[0].replace(",", "")) < float(memory.split()[0].replace(",", ""))
    assert "sparsity=0.9" in driver.current_url  # the link follows the sliders


def test_two_browser_sessions_do_not_see_each_others_sliders(server, browser):
    first, second = browser(), browser()
    first.get(f"{server}/?network=resnet20&criterion=magnitude&sparsity=0.5&recovery=none")
    second.get(f"{server}/?network=resnet20&criterion=magnitude&sparsity=0.95&recovery=none")
    first_memory = _wait_metric(first, "Weight memory")
    second_memory = _wait_metric(second, "Weight memory")
    assert first_memory != second_memory
    move_sparsity(first, 2)
    changed = _wait_metric(first, "Weight memory", other_than=first_memory)
    second.refresh()
    assert _wait_metric(second, "Weight memory") == second_memory
    assert changed != first_memory


def test_the_page_benchmark_produces_numbers(root):
    """The browser benchmark in its quick mode (the 1.5 s goal is checked by running it, not here): ResNet-20
    without recovery, whose seconds per render and move would time recovery, not the benchmark."""
    import json
    import subprocess

    out = subprocess.run([sys.executable, "scripts/bench_page.py", "--network", "resnet20", "--moves", "2", "--recovery", "none",
                          "--json"],
                         cwd=root, capture_output=True, text=True, timeout=1200)
    assert out.returncode == 0, out.stderr[-3000:]
    tree = json.loads(out.stdout)["trees"]["this tree"]
    assert tree["first_render_cold_s"] > 0 and tree["first_render_warm_s"] > 0
    assert len(tree["moves"]) == 2 and all(m["idle_s"] >= m["answered_s"] > 0 for m in tree["moves"])
    assert tree["median_idle_s"] > 0


def test_a_fine_tuning_job_started_on_the_page_shows_progress_then_its_row(server, results_table, browser, screenshots):
    """Explore on ResNet-20 (its default, recovered, view) on the scratch results table: start a 6-step job, see
    its progress bar move, see it finish and its row appear among the configuration's fine-tuned runs (and the job
    token in the link)."""
    from jpq_core.jobs import JobQueue
    from jpq_core.sweeps import read_rows

    shipped_rows = len(read_rows(results_table)[0])
    try:
        driver = browser()
        driver.get(f"{server}/?network=resnet20&criterion=magnitude&sparsity=0.5&wbits=8&abits=8")
        _wait_metric(driver, "Weight memory")
        assert "Fine-tuned runs of this configuration (cached): 0" in driver.page_source
        start = driver.find_element(By.XPATH, "//button[.//p[normalize-space()='Fine-tune']]")
        driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", start)
        start.click()
        bars, deadline = set(), time.time() + LOAD_TIMEOUT
        while time.time() < deadline and "finished; its row" not in driver.page_source:
            bars |= set(texts(driver, '[data-testid="stProgress"]'))
            time.sleep(0.25)
        driver.save_screenshot(str(screenshots / "explore-fine-tuning-job.png"))
        steps = {int(m.group(1)) for text in bars if (m := re.search(r"step (\d+) of 6", text))}
        assert steps and max(steps) >= 1, f"no progress seen: {bars}"
        WebDriverWait(driver, LOAD_TIMEOUT, poll_frequency=0.5).until(
            lambda d: "Fine-tuned runs of this configuration (cached): 1" in d.page_source)
        assert "job_owner=" in driver.current_url
        assert not driver.find_elements(By.CSS_SELECTOR, '[data-testid="stException"]')
    finally:  # no job process outlives the test
        queue = JobQueue(results_table)
        for job in queue._read_all()[0]:
            queue.cancel(job.owner, job.id)
    rows = read_rows(results_table)[0]
    assert len(rows) == shipped_rows + 1  # the job's row, once
    assert rows[-1]["budget"] == 6 and rows[-1]["grid"] == "page"
