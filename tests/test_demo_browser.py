"""End to end in a real headless browser: the demo page, driven with Playwright and Debian's chromium.

Starts ``python -m vlm_compress.demo`` on a free local port, runs two budgets on an example image, checks the two
answers, the two overlays and the uncompressed answer, uploads a non-image file and checks the message; in the Video
tab, runs QuoTA and its uniform split on a bundled clip, checks the two frame strips and the table, uploads a PNG
and checks the message; in the Tokenizers tab, reconstructs a bundled scene with FlexTok (32 tokens) and SEED, checks
the three images and the two summary lines, uploads a non-image file and checks the message. Screenshots go into the
test's temp dir; the server is stopped by its process id. The page serves its defaults, the embedded tiny-llava,
tiny-onevision, tiny-flextok and tiny-seed. Needs the ``demo`` extra, the ``playwright`` package and a chromium executable (``CHROMIUM`` or
``/usr/bin/chromium``); the CI installs them.
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
from PIL import Image

from vlm_compress.demo.examples import example_clips

pytestmark = pytest.mark.browser
CHROMIUM = os.environ.get("CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def server(tmp_path):
    """The demo's URL (the page's defaults: tiny-llava in the Image tab, tiny-onevision in the Video tab)."""
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


def test_quota_strips_and_a_bad_upload_in_the_video_tab(server, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    assert Path(CHROMIUM).exists(), f"no chromium at {CHROMIUM}: apt-get install chromium, or set CHROMIUM"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1400, "height": 1600})
        page.goto(server)
        page.get_by_role("tab", name="Video").click()
        page.get_by_label("ShapesVideo clip 2").check()
        question = example_clips()["ShapesVideo clip 2"].question
        expect(page.get_by_label("Question about the video")).to_have_value(question)  # prefilled from the clip
        for method in ("quota", "quota:assign=uniform"):  # the two defaults: make sure both are on
            box = page.locator("#video-methods").get_by_label(method, exact=True)
            if not box.is_checked():
                box.check()
        budgets = page.locator("#video-budgets")
        for budget in ("0.5", "0.25", "0.1"):  # one budget
            box = budgets.get_by_label(budget, exact=True)
            if box.is_checked() != (budget == "0.25"):
                box.click()
        page.locator("#video-run").click()
        expect(page.locator("#video-reference")).to_contain_text("Uncompressed answer:", timeout=120_000)
        expect(page.locator("#video-strips img")).to_have_count(2, timeout=30_000)
        captions = page.locator("#video-strips").inner_text()
        assert "quota @ 0.25" in captions and "quota:assign=uniform @ 0.25" in captions, captions
        table = page.locator("#video-results").inner_text()
        assert "quota:assign=uniform" in table and "0.25" in table and "·" in table, table  # tokens per frame
        page.screenshot(path=str(tmp_path / "video.png"), full_page=True)

        bad = tmp_path / "x.png"
        Image.new("RGB", (32, 32), "red").save(bad)
        page.locator("#video-upload input[type=file]").set_input_files(str(bad))
        page.locator("#video-run").click()
        expect(page.locator("#video-status")).to_contain_text("x.png is not a video this demo can read",
                                                              timeout=60_000)
        expect(page.locator("#video-status")).to_contain_text("upload an MP4, WebM or AVI")
        page.screenshot(path=str(tmp_path / "video_error.png"), full_page=True)
        browser.close()
    assert (tmp_path / "video.png").stat().st_size > 10_000


def test_flextok_and_seed_reconstructions_and_a_bad_upload_in_the_tokenizers_tab(server, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    assert Path(CHROMIUM).exists(), f"no chromium at {CHROMIUM}: apt-get install chromium, or set CHROMIUM"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1400, "height": 1600})
        page.goto(server)
        page.get_by_role("tab", name="Tokenizers").click()
        page.locator("#tok-scene").get_by_label("Test scene 2").check()
        page.locator("#tok-count").get_by_label("32", exact=True).check()
        page.locator("#tok-run").click()
        summary = page.locator("#tok-summary")
        expect(summary).to_contain_text("SEED: 32 tokens", timeout=120_000)
        expect(summary).to_contain_text("FlexTok: 32 tokens")
        assert summary.inner_text().count("PSNR") == 2 and "bits" in summary.inner_text(), summary.inner_text()
        for elem_id in ("tok-input", "tok-flextok", "tok-seed"):
            expect(page.locator(f"#{elem_id} img")).to_have_count(1, timeout=30_000)
        expect(page.locator("#tok-flextok")).to_contain_text("FlexTok, 32 tokens:")  # the label carries the PSNR
        expect(page.locator("#tok-status")).to_have_text("")
        page.screenshot(path=str(tmp_path / "tokenizers.png"), full_page=True)

        bad = tmp_path / "notes.txt"
        bad.write_text("this is not an image")
        page.locator("#tok-upload input[type=file]").set_input_files(str(bad))
        page.locator("#tok-run").click()
        expect(page.locator("#tok-status")).to_contain_text("notes.txt is not an image", timeout=60_000)
        page.screenshot(path=str(tmp_path / "tokenizers_error.png"), full_page=True)
        browser.close()
    assert (tmp_path / "tokenizers.png").stat().st_size > 10_000
