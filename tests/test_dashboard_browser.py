"""The dashboard in a real browser: `python -m diffaudit dashboard` on a free port, headless Chromium
through selenium, every page visited through the sidebar, visible content checked, screenshots saved
under the test's temp folder. Skips only when the chromium / chromedriver binaries are absent."""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from fixtures_runs import build_runs_dir, gender_attribute

from diffaudit.runs import Run

pytestmark = pytest.mark.browser

CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--no-first-run", "--window-size=1400,1800")


def browser_binaries() -> tuple[str, str]:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not chromium or not driver:
        pytest.skip("needs the chromium and chromedriver binaries (Debian: apt-get install chromium chromium-driver)")
    return chromium, driver


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def dashboard_server(runs_dir: Path, log: Path) -> Iterator[str]:
    """`python -m diffaudit dashboard RUNS_DIR --port P` until healthy; stopped (and waited for) on exit."""
    port = free_port()
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "diffaudit", "dashboard", str(runs_dir), "--port", str(port)],
                                stdout=out, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 90
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"dashboard exited with {proc.returncode}: {log.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.time() > deadline:
                raise AssertionError(f"dashboard did not answer in 90 s: {log.read_text()[-2000:]}")
            time.sleep(0.3)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def chromium(tmp_path: Path):
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    binary, driver_path = browser_binaries()
    options = Options()
    options.binary_location = binary
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path / 'chromium-profile'}")
    driver = webdriver.Chrome(options=options, service=Service(driver_path))
    try:
        yield driver
    finally:
        driver.quit()


def wait_for_text(driver, *needles: str, timeout: float = 60) -> str:
    """The page's visible text once it contains every needle (Streamlit renders asynchronously)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    def ready(d):
        body = d.find_element(By.TAG_NAME, "body").text
        running = d.find_elements(By.CSS_SELECTOR, '[data-testid="stStatusWidget"]')
        return body if all(n in body for n in needles) and not running else False

    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.2).until(ready)
    except Exception as e:
        body = driver.find_element(By.TAG_NAME, "body").text
        raise AssertionError(f"page never showed {needles}; it shows:\n{body[:3000]}") from e


def open_page(driver, title: str) -> None:
    from selenium.webdriver.common.by import By

    links = driver.find_elements(By.CSS_SELECTOR, '[data-testid="stSidebarNav"] a')
    link = next(a for a in links if a.text.strip().endswith(title))
    link.click()


def loaded_images(driver) -> int:
    return driver.execute_script(
        "return Array.from(document.querySelectorAll('[data-testid=\"stMain\"] img'))"
        ".filter(i => i.complete && i.naturalWidth > 0).length")


def wait_for_images(driver, count: int, timeout: float = 30) -> None:
    deadline = time.time() + timeout
    while loaded_images(driver) < count and time.time() < deadline:
        time.sleep(0.2)
    assert loaded_images(driver) >= count


def test_every_page_in_a_real_browser(tmp_path):
    browser_binaries()
    runs_dir = build_runs_dir(tmp_path / "runs", images_per_prompt=10, size=128)
    base = Run.open(runs_dir / "tiny-base")
    s = base.read_table("bias/summary")
    woman = s[(s["attribute"] == gender_attribute()) & (s["template"] == "all") & (s["label"] == "woman")]
    top = woman.loc[woman["gap"].abs().idxmax()]
    interval = f"[{top['ci_low']:.2f}, {top['ci_high']:.2f}]"
    match = base.read_table("memorization/matches").iloc[0]
    shots = tmp_path / "screenshots"
    shots.mkdir()

    with dashboard_server(runs_dir, tmp_path / "server.log") as url, chromium(tmp_path) as driver:
        driver.get(f"{url}/?run=tiny-base&run=tiny-mitigated")
        wait_for_text(driver, "Runs", "tiny-base", "tiny-mitigated", "images 120", "stage", "generate",
                      "memorization", "provenance")
        driver.save_screenshot(str(shots / "runs.png"))

        open_page(driver, "Bias")
        text = wait_for_text(driver, "Largest gaps", str(top["subject"]), interval, "Images of one occupation")
        assert f"{top['reference_share']:.2f}" in text
        assert len(driver.find_elements("css selector", '[data-testid="stVegaLiteChart"]')) >= 2
        driver.save_screenshot(str(shots / "bias.png"))
        wait_for_images(driver, 20)  # the first occupation's 20 thumbnails
        grid = driver.find_element("xpath", "//*[normalize-space(text())='Images of one occupation']")
        driver.execute_script("arguments[0].scrollIntoView()", grid)
        time.sleep(0.5)
        driver.save_screenshot(str(shots / "bias-images.png"))

        open_page(driver, "Memorization")
        wait_for_text(driver, "Matches: generated | training", f"generated · {match['image_id']}",
                      f"training · {match['train_key']}", "Hamming 2")
        wait_for_images(driver, 5)  # 3 generated + 2 training evidence images
        driver.save_screenshot(str(shots / "memorization.png"))

        open_page(driver, "Provenance")
        wait_for_text(driver, "Stamped images", "Invalid", "the image bytes changed after signing", "Verify a file")
        driver.save_screenshot(str(shots / "provenance.png"))

        open_page(driver, "Compare")
        wait_for_text(driver, "A = tiny-base", "B = tiny-mitigated", "delta", str(top["subject"]))
        driver.save_screenshot(str(shots / "compare.png"))

    for name in ("runs", "bias", "bias-images", "memorization", "provenance", "compare"):
        assert (shots / f"{name}.png").stat().st_size > 10_000
