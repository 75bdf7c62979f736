"""The web page's long-form jobs list in headless Chromium (Playwright) against a live server on the tiny
CosyVoice2 model with an API key: a job submitted from the page shows its progress until it completes,
matches what ``GET /v1/audio/jobs`` answers, downloads, and is deleted from the page."""

from __future__ import annotations

from typing import Any

import pytest
import requests
from api_helpers import LiveServer
from golden import golden_root, manifest, model_dir
from resources import needs
from test_web_page import CHROMIUM, CHROMIUM_ARGS, TIMEOUT_MS, sync_api

from cosyserve.api import create_app
from cosyserve.api.job_runner import cut_segments
from cosyserve.engine.pipeline import load_model
from cosyserve.settings import Settings

KEY = "web-jobs-test-key"
MODEL = "v2-tiny"
TEXT = "今天天气真好。我们一起去公园散步吧。明天我们去爬山。后天我们去海边看日出。春天来了，花都开了。明天见。"

pytestmark = [pytest.mark.slow, needs(MODEL in manifest()["models"], f"no golden {MODEL} in {golden_root()}")]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Any:
    data_dir = tmp_path_factory.mktemp("web-jobs")
    model = load_model(model_dir(MODEL), text_frontend="none", data_dir=data_dir)
    app = create_app(model, Settings(api_keys=(KEY,), data_dir=str(data_dir)))
    with LiveServer(app) as live:
        yield live


def test_web_page_lists_jobs_with_their_progress(server: LiveServer) -> None:
    headers = {"Authorization": f"Bearer {KEY}"}
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, timeout=60_000)
        try:
            page = browser.new_context(viewport={"width": 1280, "height": 1400}).new_page()
            page.set_default_timeout(30_000)
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(server.url + "/web/")
            page.fill("#api-key", KEY)
            page.click("#key-form button")
            page.wait_for_selector("#voice option[value='中文女']", state="attached")
            page.wait_for_selector("#job-list li.empty")
            page.fill("#text", TEXT)
            page.select_option("#voice", "中文女")
            page.select_option("#format", "wav")
            page.click("#submit-job")
            item = page.wait_for_selector("#job-list li[data-job]")
            job_id = item.get_attribute("data-job")
            listed = requests.get(server.url + "/v1/audio/jobs", headers=headers, timeout=30).json()["data"]
            assert [j["id"] for j in listed] == [job_id]
            total = len(cut_segments(TEXT, 5000))
            assert listed[0]["progress"]["segments_total"] == total >= 2

            # The list refreshes itself while the job runs: its bar only rises, to 100 % once completed.
            seen = []
            selector = f"#job-list li[data-job='{job_id}']"
            while True:
                row = page.wait_for_selector(selector)
                seen.append(float(page.eval_on_selector(f"{selector} progress", "bar => bar.value")))
                if row.get_attribute("data-status") == "completed":
                    break
                assert row.get_attribute("data-status") in ("queued", "running")
                page.wait_for_timeout(250)
                assert len(seen) < TIMEOUT_MS / 250, seen
            assert seen == sorted(seen) and seen[-1] == 100
            text = page.inner_text(selector)
            assert f"{total}/{total} segments" in text and "completed" in text
            job = requests.get(f"{server.url}/v1/audio/jobs/{job_id}", headers=headers, timeout=30).json()
            assert f"{job['progress']['audio_seconds']:.1f} s audio" in text

            with page.expect_download() as download:
                page.click(f"{selector} button:text('Download')")
            assert download.value.suggested_filename == f"{job_id}.wav"
            page.click(f"{selector} button:text('Delete')")
            page.wait_for_selector("#job-list li.empty")
            assert requests.get(f"{server.url}/v1/audio/jobs/{job_id}", headers=headers, timeout=30).status_code == 404
            assert not errors, f"JavaScript errors on the page: {errors}"
        finally:
            browser.close()
