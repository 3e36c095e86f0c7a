"""The web chat page at `/`, end to end in headless Chromium (Debian's `chromium`, driven by Playwright):
pick a model, send a message, watch the reply stream in, press stop. `.ci/run` installs chromium."""

from __future__ import annotations

import shutil
import time

import pytest

pytest.importorskip("fastapi")
sync_api = pytest.importorskip("playwright.sync_api")

from tiny_models import tiny_llama_folder  # noqa: E402
from tiny_server import running, serve_folders, slowed  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.mark.skipif(CHROMIUM is None, reason="needs the chromium package (apt-get install chromium; .ci/run does)")
def test_chat_page_streams_a_reply_and_stop_cancels_it(tmp_path):
    folders = {"alpha": tiny_llama_folder(tmp_path / "alpha"), "beta": tiny_llama_folder(tmp_path / "beta", seed=1)}
    app = serve_folders(folders)
    engine = app.state.models["beta"].engine
    slowed(engine, 0.025)  # ~40 tokens/s: slow enough for a person (and the test) to press stop
    with running(app) as url, sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            page = browser.new_page()
            page.goto(url + "/")
            page.wait_for_function("document.querySelectorAll('#model option').length === 2")
            page.select_option("#model", "beta")
            page.fill("#max-tokens", "200")
            page.fill("#temperature", "0")
            page.fill("#input", "Hello there")
            page.click("#send")
            assert page.text_content(".msg.user") == "Hello there"
            reply = page.locator(".msg.assistant")
            page.wait_for_function("document.querySelector('.msg.assistant').textContent.length > 3", timeout=15000)
            assert page.is_enabled("#stop") and not page.is_enabled("#send")  # still streaming
            page.click("#stop")
            page.wait_for_function("document.getElementById('status').textContent === 'stopped'", timeout=5000)
            assert len(reply.text_content()) > 3
            assert page.is_enabled("#send")
            t0 = time.time()
            while engine.active and time.time() - t0 < 10:  # the server noticed the hang-up and freed the row
                time.sleep(0.05)
            assert engine.active == 0
        finally:
            browser.close()
