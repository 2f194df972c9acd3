"""End to end in a real headless browser: the demo page, driven with Playwright and Debian's chromium.

Starts ``python -m vlm_compress.demo`` on a free local port, runs two budgets on an example image, checks the two
answers, the two overlays and the uncompressed answer, uploads a non-image file and checks the message, takes a
screenshot into the test's temp dir, and stops the server by its process id. Needs the ``demo`` extra, the
``playwright`` package and a chromium executable (``CHROMIUM`` or ``/usr/bin/chromium``); the CI installs them.
"""

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.browser
CHROMIUM = os.environ.get("CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def server(tmp_path):
    port = free_port()
    log = open(tmp_path / "server.log", "w")
    process = subprocess.Popen([sys.executable, "-m", "vlm_compress.demo", "--port", str(port)], stdout=log,
                               stderr=subprocess.STDOUT, env={**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"})
    url = f"http://127.0.0.1:{port}/"
    try:
        for _ in range(240):
            if process.poll() is not None:
                raise RuntimeError(f"the demo exited: {(tmp_path / 'server.log').read_text()[-2000:]}")
            try:
                if urllib.request.urlopen(url, timeout=2).status == 200:
                    break
            except OSError:
                time.sleep(0.5)
        else:
            raise RuntimeError("the demo did not answer within 2 minutes")
        yield url
    finally:
        os.kill(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.kill(process.pid, signal.SIGKILL)
        log.close()


def test_two_budgets_overlays_and_a_bad_upload_in_a_real_browser(server, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    assert Path(CHROMIUM).exists(), f"no chromium at {CHROMIUM}: apt-get install chromium, or set CHROMIUM"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1400, "height": 1600})
        page.goto(server)
        page.get_by_label("ShapesVQA scene 2").check()
        page.get_by_label("Question").fill("what color is the circle ?")
        for budget in ("0.5", "0.22"):  # the two defaults: make sure both are on
            box = page.get_by_label(budget, exact=True)
            if not box.is_checked():
                box.check()
        page.locator("#run").click()
        expect(page.locator("#reference")).to_contain_text("Uncompressed answer:", timeout=120_000)
        expect(page.locator("#overlays img")).to_have_count(2, timeout=30_000)
        captions = page.locator("#overlays").inner_text()  # "cls_attn @ 0.5: <answer>" under each overlay
        answers = [line.split(":", 1)[1].strip() for line in captions.splitlines() if " @ " in line]
        assert len(answers) == 2 and all(answers), captions
        table = page.locator("#results").inner_text()
        assert "0.5" in table and "0.22" in table and "cls_attn" in table, table
        page.screenshot(path=str(tmp_path / "demo.png"), full_page=True)

        bad = tmp_path / "notes.txt"
        bad.write_text("this is not an image")
        page.locator("#upload input[type=file]").set_input_files(str(bad))
        page.locator("#run").click()
        expect(page.locator("#status")).to_contain_text("notes.txt is not an image", timeout=60_000)
        page.screenshot(path=str(tmp_path / "demo_error.png"), full_page=True)
        browser.close()
    assert (tmp_path / "demo.png").stat().st_size > 10_000
