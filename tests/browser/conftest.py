"""Fixtures for the console's browser tests: the release binary with the ops console and the
tenant portal on, and a headless Chromium from Debian's packages driven by Selenium (the system
chromedriver is named, so Selenium never downloads one)."""

import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BIN = os.environ.get("IMAGEGATE_BIN", str(ROOT / "target" / "release" / "imagegate"))
SHOTS = Path(os.environ.get("IMAGEGATE_SCREENSHOTS", ROOT / "target" / "browser-screenshots"))
ADMIN_TOKEN = "browser-admin-token-0123456789"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url, timeout=20):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            urllib.request.urlopen(url, timeout=1)
            return
        except Exception:
            time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer")


class Gateway:
    def __init__(self, main, admin):
        self.main = main
        self.admin = admin

    def admin_api(self, method, path, body=None):
        """The admin API, for setting up what a test needs without the browser."""
        req = urllib.request.Request(
            self.admin + "/admin/v1" + path, method=method,
            data=None if body is None else json.dumps(body).encode(),
            headers={"authorization": f"Bearer {ADMIN_TOKEN}", "content-type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as resp:
            return json.loads(resp.read())


@pytest.fixture(scope="session")
def gateway():
    data = tempfile.mkdtemp(prefix="imagegate-browser-")
    token_hash = subprocess.run([BIN, "hash-key"], input=ADMIN_TOKEN, capture_output=True,
                                text=True, check=True).stdout.strip()
    port, admin_port = free_port(), free_port()
    config = Path(data) / "gateway.yaml"
    config.write_text(f"""
listen: 127.0.0.1:{port}
public_url: http://127.0.0.1:{port}
data_dir: {data}
state: {{store: sqlite}}
admin: {{listen: "127.0.0.1:{admin_port}", tokens_sha256: ["{token_hash}"]}}
console: {{portal: true, login_attempts_per_minute: 1000}}
backends:
  sandbox: {{kind: sandbox}}
models:
  dall-e-2: {{rules: dall-e-2, route: {{targets: [{{backend: sandbox}}]}}}}
  dall-e-3: {{rules: dall-e-3, route: {{targets: [{{backend: sandbox}}]}}}}
tenants:
  demo: {{models: [dall-e-2, dall-e-3]}}
""")
    log = open(Path(data) / "gateway.log", "w")
    proc = subprocess.Popen([BIN, "serve", "--config", str(config)], stdout=log, stderr=log)
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz")
        wait_http(f"http://127.0.0.1:{admin_port}/healthz")
        yield Gateway(f"http://127.0.0.1:{port}", f"http://127.0.0.1:{admin_port}")
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()
        if os.environ.get("KEEP_DATA") is None:
            shutil.rmtree(data, ignore_errors=True)


def chromium_paths():
    browser = shutil.which("chromium") or "/usr/bin/chromium"
    driver = shutil.which("chromedriver") or "/usr/bin/chromedriver"
    return browser, driver


@pytest.fixture(scope="session")
def browser_factory():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    made = []
    binary, driver = chromium_paths()
    if not (os.path.exists(binary) and os.path.exists(driver)):
        pytest.fail("Debian's chromium and chromium-driver are needed (apt-get install chromium chromium-driver)")

    def make(width=1280, height=900):
        options = webdriver.ChromeOptions()
        options.binary_location = binary
        for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                    f"--window-size={width},{height}", "--disable-extensions"):
            options.add_argument(arg)
        options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
        d = webdriver.Chrome(service=Service(executable_path=driver), options=options)
        d.set_page_load_timeout(30)
        made.append(d)
        return d

    yield make
    for d in made:
        d.quit()


@pytest.fixture(scope="session")
def shots():
    SHOTS.mkdir(parents=True, exist_ok=True)

    def save(driver, name):
        # The whole page, not only the window.
        height = driver.execute_script("return document.documentElement.scrollHeight")
        width = driver.get_window_size()["width"]
        driver.set_window_size(width, max(600, min(height + 100, 4000)))
        driver.save_screenshot(str(SHOTS / f"{name}.png"))
    return save
