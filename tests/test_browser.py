"""The chat page in Debian's headless Chromium against the real local stack (`overlord-agent run` in demo mode:
the real pinned CLI answering through the offline stand-in, which waits a few seconds per reply so that a
question can be canceled while it runs). OVERLORD_UPDATE_SCREENSHOT=1 refreshes docs/screenshot.png."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Page, expect, sync_playwright

from tests.local_stack import RunningStack

pytestmark = [pytest.mark.browser, pytest.mark.real_cli, pytest.mark.timeout(900)]

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SCREENSHOT = ROOT / "docs" / "screenshot.png"
STANDIN_DELAY_S = "3"
ANSWER_TIMEOUT_MS = 60_000


def ensure_chromium() -> Path:
    """Debian's Chromium (Playwright cannot download browsers here): installed with apt when missing, or fail."""
    if CHROMIUM.exists():
        return CHROMIUM
    sudo = [] if os.geteuid() == 0 else ["sudo", "-n"]
    if not shutil.which("apt-get") or (sudo and not shutil.which("sudo")):
        pytest.fail(f"{CHROMIUM} is missing and cannot be installed here (needs apt-get, as root or with sudo)")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (["apt-get", "update"], ["apt-get", "install", "-y", "chromium"]):
        done = subprocess.run([*sudo, *cmd], env=env, capture_output=True, text=True, timeout=900, check=False)
        if done.returncode != 0:
            pytest.fail(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    if not CHROMIUM.exists():
        pytest.fail(f"apt-get installed chromium but {CHROMIUM} is still missing")
    return CHROMIUM


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[RunningStack]:
    running = RunningStack(tmp_path, {"AGENT_CLAUDE_DEMO": "true", "OVERLORD_STANDIN_DELAY_S": STANDIN_DELAY_S})
    try:
        yield running
    finally:
        running.close()


@pytest.fixture
def page(stack: RunningStack) -> Iterator[Page]:
    chromium = ensure_chromium()
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(chromium), args=CHROMIUM_ARGS, headless=True)
        try:
            yield browser.new_page(viewport={"width": 1100, "height": 720}, device_scale_factor=1)
        finally:
            browser.close()


def send(page: Page, text: str) -> None:
    page.locator("#message").fill(text)
    page.locator("#send").click()


def test_ask_reload_cancel_in_chromium(stack: RunningStack, page: Page, tmp_path: Path) -> None:
    base = stack.wait_ready()
    page.goto(f"{base}/agent/")
    expect(page.locator("#demo-banner")).to_be_visible()
    expect(page.locator("#user")).to_have_text("dev")

    question = "Which rivers flow through Paris?"
    send(page, question)
    answers = page.locator("#messages .msg.assistant")
    expect(answers).to_have_count(1, timeout=ANSWER_TIMEOUT_MS)
    expect(answers.first).to_contain_text("not a real model")
    expect(answers.first).to_contain_text(f"You said: {question}")
    expect(page.locator("#status")).to_have_text(re.compile(r"^Answered"))
    answer = answers.first.inner_text()

    page.reload()
    expect(page.locator("#demo-banner")).to_be_visible()
    expect(page.locator("#messages .msg.user")).to_have_text([question])
    expect(answers).to_have_text([answer])

    slow = "Tell me a very long story (I will cancel it)"
    send(page, slow)
    cancel = page.locator("#cancel")
    expect(cancel).to_be_visible()
    expect(cancel).to_be_enabled()
    cancel.click()
    expect(page.locator("#status")).to_have_text("Canceled", timeout=30_000)
    expect(cancel).to_be_hidden()
    expect(page.locator("#messages .msg.user")).to_have_text([question, slow])
    page.wait_for_timeout(int(float(STANDIN_DELAY_S) * 1000) + 1000)  # the stand-in's reply would have come by now
    expect(answers).to_have_count(1)
    expect(page.locator("#messages .msg.error")).to_have_count(0)

    page.reload()  # the history still holds only the answered turn (the canceled one may show as a lone question)
    expect(answers).to_have_text([answer])

    page.reload()
    expect(answers).to_have_count(1)
    shot = tmp_path / "screenshot.png"
    page.screenshot(path=str(shot))
    assert shot.stat().st_size > 10_000
    if os.environ.get("OVERLORD_UPDATE_SCREENSHOT"):  # refresh README's picture on purpose, not on every run
        shutil.copyfile(shot, SCREENSHOT)

    page.close()
    assert stack.stop(signal.SIGTERM) == 0, stack.log()
    assert stack.leftovers() == [], stack.log()
