"""Drive the app in a real browser: `streamlit run` on a loopback port, headless Chromium through Selenium.

Shared by the browser tests (tests/test_browser.py) and the page benchmark (scripts/bench_page.py), so both
start, wait and read the page the same way. Chromium and chromedriver come from Debian
(`apt-get install chromium chromium-driver`); `ensure_chromium` installs them when run as root.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait

ROOT = Path(__file__).resolve().parents[1]


class BrowserSetupError(RuntimeError):
    """Chromium or the app server could not be started; the message says what to do."""


def ensure_chromium() -> tuple[str, str]:
    """Paths of chromium and chromedriver, installed from Debian first when missing (root and apt-get needed)."""
    if not (shutil.which("chromium") and shutil.which("chromedriver")):
        if os.geteuid() != 0 or not shutil.which("apt-get"):
            raise BrowserSetupError("chromium and chromium-driver are missing and cannot be installed here "
                                    "(needs root and apt-get): `apt-get install chromium chromium-driver`.")
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        subprocess.run(["apt-get", "update", "-qq"], check=True, env=env, capture_output=True, timeout=600)
        subprocess.run(["apt-get", "install", "-y", "-qq", "chromium", "chromium-driver"], check=True, env=env,
                       capture_output=True, timeout=900)
    return shutil.which("chromium"), shutil.which("chromedriver")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def app_server(root: Path = ROOT, python: str = sys.executable, log_dir: Path | None = None, env: dict | None = None):
    """The app from `root` as `make app` starts it (`python -m app_support.serve`, i.e. `streamlit run app.py`
    with the imports done first) on a free loopback port; yields its URL, stops it on exit.
    `env`: environment variables to add for the server (e.g. JPQ_RESULTS, a scratch results table)."""
    port = free_port()
    log_dir = Path(log_dir or tempfile.mkdtemp(prefix="streamlit-"))
    log = open(log_dir / "server.log", "w+b")  # a file, so the server never blocks on a full pipe
    launcher = ["-m", "app_support.serve"] if (root / "app_support" / "serve.py").exists() else ["-m", "streamlit", "run", "app.py"]
    proc = subprocess.Popen(
        [python, *launcher, "--server.port", str(port), "--server.address", "127.0.0.1",
         "--server.headless", "true", "--browser.gatherUsageStats", "false"], cwd=root, stdout=log,
        stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONPATH=str(root), **(env or {})))
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                if urllib.request.urlopen(url + "/_stcore/health", timeout=2).status == 200:
                    break
            except OSError:
                time.sleep(0.3)
        else:
            log.seek(0)
            raise BrowserSetupError("streamlit did not start:\n" + log.read().decode(errors="replace")[-3000:])
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:  # busy in a script run: it would finish it first
            proc.kill()
            proc.wait(timeout=15)
        log.close()


def make_driver(chromium: str, chromedriver: str, width: int = 1500, height: int = 1100):
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", f"--window-size={width},{height}"):
        options.add_argument(arg)
    return webdriver.Chrome(service=Service(chromedriver), options=options)


def is_idle(driver) -> bool:
    """Streamlit has finished its script run: no 'Running...' status, and the app is rendered."""
    return bool(driver.find_elements(By.CSS_SELECTOR, '[data-testid="stApp"]')
                and not driver.find_elements(By.CSS_SELECTOR, '[data-testid="stStatusWidget"] button')
                and not driver.find_elements(By.CSS_SELECTOR, '[data-testid="stSkeleton"]'))


_METRICS_JS = """
const out = {};
for (const m of document.querySelectorAll('[data-testid="stMetric"]')) {
  const label = m.querySelector('[data-testid="stMetricLabel"]');
  const value = m.querySelector('[data-testid="stMetricValue"]');
  if (label && value) out[label.innerText.trim()] = value.innerText.trim();
}
return out;
"""


def metrics(driver) -> dict[str, str]:
    """Every metric card on the page, label -> shown value (one round trip to the browser)."""
    return driver.execute_script(_METRICS_JS)


def texts(driver, css: str) -> list[str]:
    """The text of every element matching `css`, read in one round trip (elements that Streamlit replaces
    between a find and a read would otherwise raise StaleElementReferenceException)."""
    return driver.execute_script("return Array.from(document.querySelectorAll(arguments[0]), e => e.innerText);", css)


def metric(driver, label: str) -> str | None:
    return metrics(driver).get(label)


def wait_metric(driver, label: str, other_than: str | None = None, timeout: float = 240, poll: float = 0.5) -> str:
    """The value of card `label` once the page is idle and shows it (and it differs from `other_than`)."""
    WebDriverWait(driver, timeout, poll_frequency=poll).until(
        lambda d: is_idle(d) and metric(d, label) not in (None, other_than))
    return metric(driver, label)


def sparsity_thumb(driver):
    """The keyboard handle of the sidebar's sparsity slider, focused."""
    sliders = driver.find_elements(By.CSS_SELECTOR, '[data-testid="stSidebar"] [data-testid="stSlider"]')
    sparsity = next(s for s in sliders if s.text.startswith("Sparsity"))
    thumb = sparsity.find_element(By.CSS_SELECTOR, '[role="slider"], input[type="range"]')
    driver.execute_script("arguments[0].focus()", thumb)
    return thumb


def move_sparsity(driver, steps: int) -> None:
    """Move the sparsity slider `steps` stops to the right with the keyboard."""
    sparsity_thumb(driver).send_keys(*([Keys.ARROW_RIGHT] * steps))
