"""The app in a real browser: `streamlit run` on a free port, headless Chromium driven by Selenium.

Setup installs Debian's `chromium` and `chromium-driver` when they are missing (root and apt-get needed).
Screenshots go to `artifacts/screenshots/` (kept by CI, named in the README).
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

selenium = pytest.importorskip("selenium", reason="selenium is in requirements.txt; run `make test`")
from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

LOAD_TIMEOUT = 240  # seconds; the first stereo page computes scores and runs the network on 2 cores


def _ensure_chromium() -> tuple[str, str]:
    if not (shutil.which("chromium") and shutil.which("chromedriver")):
        if os.geteuid() != 0 or not shutil.which("apt-get"):
            pytest.fail("chromium and chromium-driver are missing and cannot be installed here "
                        "(needs root and apt-get): `apt-get install chromium chromium-driver`.")
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        subprocess.run(["apt-get", "update", "-qq"], check=True, env=env, capture_output=True, timeout=600)
        subprocess.run(["apt-get", "install", "-y", "-qq", "chromium", "chromium-driver"], check=True, env=env,
                       capture_output=True, timeout=900)
    return shutil.which("chromium"), shutil.which("chromedriver")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(root, tmp_path_factory):
    port = _free_port()
    log = open(tmp_path_factory.mktemp("streamlit") / "server.log", "w+b")  # a file, so the server never blocks on a full pipe
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", "app.py", "--server.port", str(port), "--server.headless", "true",
         "--browser.gatherUsageStats", "false"], cwd=root, stdout=log, stderr=subprocess.STDOUT,
        env=dict(os.environ, PYTHONPATH=str(root)))
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if urllib.request.urlopen(url + "/_stcore/health", timeout=2).status == 200:
                break
        except OSError:
            time.sleep(0.5)
    else:
        proc.kill()
        log.seek(0)
        pytest.fail("streamlit did not start:\n" + log.read().decode(errors="replace")[-3000:])
    yield url
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:  # busy in a script run: it would finish it first
        proc.kill()
        proc.wait(timeout=15)
    log.close()


@pytest.fixture(scope="module")
def screenshots(root):
    folder = root / "artifacts" / "screenshots"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture
def browser():
    chromium, driver_path = _ensure_chromium()
    drivers = []

    def make():
        options = webdriver.ChromeOptions()
        options.binary_location = chromium
        for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1500,1100"):
            options.add_argument(arg)
        driver = webdriver.Chrome(service=Service(driver_path), options=options)
        drivers.append(driver)
        return driver

    yield make
    for d in drivers:
        d.quit()


def _idle(driver) -> bool:
    """Streamlit has finished its script run: no 'Running...' status, and the app is rendered."""
    return (driver.find_elements(By.CSS_SELECTOR, '[data-testid="stApp"]')
            and not driver.find_elements(By.CSS_SELECTOR, '[data-testid="stStatusWidget"] button')
            and not driver.find_elements(By.CSS_SELECTOR, '[data-testid="stSkeleton"]'))


def _metric(driver, label: str) -> str | None:
    for m in driver.find_elements(By.CSS_SELECTOR, '[data-testid="stMetric"]'):
        if m.find_element(By.CSS_SELECTOR, '[data-testid="stMetricLabel"]').text.strip() == label:
            return m.find_element(By.CSS_SELECTOR, '[data-testid="stMetricValue"]').text
    return None


def _wait_metric(driver, label: str, other_than: str | None = None) -> str:
    WebDriverWait(driver, LOAD_TIMEOUT, poll_frequency=0.5).until(
        lambda d: _idle(d) and _metric(d, label) not in (None, other_than))
    return _metric(driver, label)


def _page_paths(root) -> list[str]:
    """URL paths Streamlit gives the pages: the file name without its number prefix and extension."""
    return [""] + [re.sub(r"^\d+_", "", p.stem) for p in sorted((root / "pages").glob("*.py"))]


def test_every_page_loads_without_an_exception(root, server, browser, screenshots):
    driver = browser()
    for path in _page_paths(root):
        driver.get(f"{server}/{path}?network=resnet20&criterion=magnitude")
        WebDriverWait(driver, LOAD_TIMEOUT, poll_frequency=0.5).until(
            lambda d: _idle(d) and d.find_elements(By.CSS_SELECTOR, "h1"))
        time.sleep(1.0)
        WebDriverWait(driver, LOAD_TIMEOUT, poll_frequency=0.5).until(_idle)
        driver.save_screenshot(str(screenshots / f"page-{path or 'Explore'}.png"))
        errors = driver.find_elements(By.CSS_SELECTOR, '[data-testid="stException"]')
        assert not errors, f"page /{path} shows an exception: {errors[0].text[:500]}"


def _move_sparsity(driver, steps: int) -> None:
    sliders = driver.find_elements(By.CSS_SELECTOR, '[data-testid="stSidebar"] [data-testid="stSlider"]')
    sparsity = next(s for s in sliders if s.text.startswith("Sparsity"))
    thumb = sparsity.find_element(By.CSS_SELECTOR, 'input[type="range"]')  # the slider's keyboard handle
    driver.execute_script("arguments[0].focus()", thumb)
    thumb.send_keys(*([Keys.ARROW_RIGHT] * steps))


def test_moving_the_sparsity_slider_changes_the_numbers(server, browser, screenshots):
    driver = browser()
    driver.get(f"{server}/?network=resnet20&criterion=magnitude&sparsity=0.5&wbits=8")
    memory = _wait_metric(driver, "Weight memory")
    driver.save_screenshot(str(screenshots / "explore-before.png"))
    _move_sparsity(driver, 8)  # 50% -> 90% (5% stops)
    after = _wait_metric(driver, "Weight memory", other_than=memory)
    driver.save_screenshot(str(screenshots / "explore-after.png"))
    assert float(after.split()[0].replace(",", "")) < float(memory.split()[0].replace(",", ""))
    assert "sparsity=0.9" in driver.current_url  # the link follows the sliders


def test_two_browser_sessions_do_not_see_each_others_sliders(server, browser):
    first, second = browser(), browser()
    first.get(f"{server}/?network=resnet20&criterion=magnitude&sparsity=0.5")
    second.get(f"{server}/?network=resnet20&criterion=magnitude&sparsity=0.95")
    first_memory = _wait_metric(first, "Weight memory")
    second_memory = _wait_metric(second, "Weight memory")
    assert first_memory != second_memory
    _move_sparsity(first, 2)
    changed = _wait_metric(first, "Weight memory", other_than=first_memory)
    second.refresh()
    assert _wait_metric(second, "Weight memory") == second_memory
    assert changed != first_memory
