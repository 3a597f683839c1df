"""Real app, real browser: `python app.py` on a free port, driven by Debian's chromium through Playwright.

Chromium comes from apt (`apt-get install -y chromium`), never from `playwright install`. Without it the
browser tests skip on a developer machine and fail under CI (CI=true), where a skip would hide a broken UI.
Screenshots and app logs go to test-artifacts/ (or $E2E_ARTIFACTS).
"""
from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path

import pytest

from tools.live_app import live_app

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = os.environ.get("E2E_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",  # CI containers run as root
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def _unavailable(reason: str):
    if in_ci():
        pytest.fail(f"{reason}; CI must run the browser tests (apt-get install -y chromium)", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def artifacts() -> Path:
    path = Path(os.environ.get("E2E_ARTIFACTS") or ROOT / "test-artifacts")
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="session")
def browser():
    if not Path(CHROMIUM).is_file():
        _unavailable(f"chromium not found at {CHROMIUM}")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _unavailable("playwright (Python) is not installed: pip install -r requirements-dev.txt")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield browser
        browser.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1100, "height": 900})
    context.set_default_timeout(20_000)
    page = context.new_page()
    yield page
    context.close()


@pytest.fixture(scope="session")
def serve_app(artifacts):
    """serve_app(name, env, timeout) -> context manager yielding the URL of a running `python app.py`."""
    return lambda name, env, timeout=90.0: running_app(name, artifacts, env, timeout)


@contextmanager
def running_app(name: str, artifacts: Path, env: dict[str, str], timeout: float = 90.0):
    """`python app.py` with a clean CHATBOT_* environment plus `env` (tools/live_app.py); yields its URL once it
    answers HTTP. Its log is test-artifacts/app-NAME.log."""
    with live_app(env, artifacts / f"app-{name}.log", timeout=timeout) as app:
        yield app.url
