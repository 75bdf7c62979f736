"""The web page in headless Chromium (Debian's ``chromium``, driven by Playwright) against a live server on
the tiny CosyVoice2 model with an API key: synthesize in three modes (streamed PCM through Web Audio, WAV
through the audio element), store a voice from an upload and from the (fake) microphone, delete them.

The screenshot is kept as a test artefact: ``$COSYSERVE_ARTIFACTS_DIR`` or ``tests/artifacts/`` (ignored by git).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import requests
from api_helpers import LiveServer
from golden import REPO, golden_root, manifest, model_dir
from resources import import_or_missing, needs

from cosyserve.api import create_app
from cosyserve.engine.pipeline import load_model
from cosyserve.settings import Settings

CHROMIUM = os.environ.get("COSYSERVE_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--autoplay-policy=no-user-gesture-required",
    "--use-fake-device-for-media-stream",  # a beeping fake microphone, granted without a prompt
    "--use-fake-ui-for-media-stream",
]
KEY = "web-page-test-key"
MODEL = "v2-tiny"
TIMEOUT_MS = 120_000

sync_api = import_or_missing("playwright.sync_api", "playwright is not installed (pip install -e .[test])")
pytestmark = [
    pytest.mark.slow,
    needs(Path(CHROMIUM).exists(), f"no Chromium at {CHROMIUM} (apt-get install chromium)"),
    needs(MODEL in manifest()["models"], f"no golden {MODEL} in {golden_root()}"),
]


def artifacts_dir() -> Path:
    path = Path(os.environ.get("COSYSERVE_ARTIFACTS_DIR") or REPO / "tests" / "artifacts")
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Any:
    data_dir = tmp_path_factory.mktemp("web-voices")
    model = load_model(model_dir(MODEL), text_frontend="none", data_dir=data_dir)
    app = create_app(model, Settings(api_keys=(KEY,), data_dir=str(data_dir)))
    with LiveServer(app) as live:
        yield live


@pytest.fixture(scope="module")
def page(server: LiveServer) -> Any:
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, timeout=60_000)
        try:
            context = browser.new_context(viewport={"width": 1280, "height": 1000})
            page = context.new_page()
            page.set_default_timeout(30_000)
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(server.url + "/")  # redirects to /web/
            yield page
            assert not errors, f"JavaScript errors on the page: {errors}"
        finally:
            browser.close()


def _prompt_wav() -> Path:
    name = manifest().get("inputs", {}).get("e2e", {}).get("prompt_wav", "zero_shot_prompt")
    return golden_root() / "audio" / f"{name}.wav"


def _speak(page: Any, mode: str, fmt: str) -> dict[str, Any]:
    page.select_option("#mode", mode)
    page.select_option("#format", fmt)
    before = page.evaluate("window.cosyPlayer.requests")
    page.click("#speak")
    page.wait_for_function(
        f"window.cosyPlayer.requests > {before} && (window.cosyPlayer.done || window.cosyPlayer.error)",
        timeout=TIMEOUT_MS,
    )
    counters = page.evaluate("({...window.cosyPlayer})")
    assert counters["error"] is None, f"{mode}/{fmt}: {counters['error']}"
    assert counters["bytes"] > 0 and counters["lastMode"] == mode
    assert page.is_hidden("#error"), page.inner_text("#error")
    return counters


def test_web_page_with_api_key(page: Any, server: LiveServer) -> None:
    assert page.url == server.url + "/web/"
    page.wait_for_selector("#model-status .badge")
    assert "cosyvoice2" in page.inner_text("#model-status")
    modes = page.eval_on_selector_all("#mode option", "options => options.map(o => o.value)")
    assert modes == ["sft", "zero_shot", "cross_lingual", "instruct2", "vc"]

    # Without the key the library cannot load: the page says why.
    page.wait_for_selector("#error:not([hidden])")
    assert "API key" in page.inner_text("#error")
    page.fill("#api-key", KEY)
    page.click("#key-form button")
    page.wait_for_selector("#voice option[value='中文女']", state="attached")
    assert page.is_hidden("#error")
    assert page.evaluate("localStorage.getItem('cosyserve.apiKey')") == KEY

    # 1. A built-in speaker, raw PCM streamed into Web Audio: every chunk is scheduled and then played.
    page.fill("#text", "今天天气真好。")
    page.select_option("#voice", "中文女")
    pcm = _speak(page, "sft", "pcm")
    assert pcm["samples"] > 0 and pcm["sampleRate"] == 24000 and pcm["bytes"] == 2 * pcm["samples"]
    page.wait_for_function("window.cosyPlayer.sourcesEnded >= window.cosyPlayer.chunks", timeout=30_000)
    played = page.evaluate("window.cosyPlayer.playedSeconds")
    assert played == pytest.approx(pcm["samples"] / 24000, rel=1e-3)
    assert page.is_visible("#download")

    # The text preview shows the segments the server's preview route answers for the same body.
    ssml = '<speak>今天天气真好。<break time="300ms"/>I have <foo>three</foo> apples.</speak>'
    page.fill("#text", ssml)
    page.click("#preview-text")
    page.wait_for_function("window.cosyPreview")
    shown = page.eval_on_selector_all("#preview li .preview-text", "items => items.map(i => i.textContent)")
    direct = requests.post(
        server.url + "/v1/text/preview",
        json={"input": ssml, "voice": "中文女", "speed": 1},
        headers={"Authorization": f"Bearer {KEY}"},
        timeout=30,
    )
    assert direct.status_code == 200, direct.text
    assert shown == [s["text"] for s in direct.json()["segments"]] and len(shown) == 2
    assert "pause 300 ms after" in page.inner_text("#preview")
    summary = page.inner_text("#preview-summary")
    assert "sft · 2 segments" in summary and "ignored SSML: foo" in summary
    page.locator("#text-field").screenshot(path=str(artifacts_dir() / "web_page_preview.png"))
    page.fill("#text", "<speak>broken")
    page.click("#preview-text")
    page.wait_for_function("document.getElementById('preview-summary').textContent.includes('line 1')")
    assert page.is_hidden("#preview")

    # 2. Store a voice from an uploaded recording with its transcript (recordings belong to the cloning modes).
    page.select_option("#mode", "zero_shot")
    page.click("label[for=src-recording]")
    page.set_input_files("#prompt-file", str(_prompt_wav()))
    page.fill("#prompt-text", manifest().get("inputs", {}).get("prompt_text", "希望你以后能够做的比我还好呦。"))
    page.fill("#voice-name", "Web Voice")
    page.click("#save-voice")
    page.wait_for_selector("#voice-list li[data-voice='Web Voice']")
    assert page.is_hidden("#error"), page.inner_text("#error")

    # 3. zero_shot from the recording itself, as WAV through the audio element, which plays it.
    page.fill("#text", "你好。")
    wav = _speak(page, "zero_shot", "wav")
    assert wav["chunks"] == 1
    page.wait_for_function(
        "(() => { const a = document.getElementById('player');"
        " return a.duration > 0 && a.played.length > 0 && a.played.end(0) > 0; })()",
        timeout=30_000,
    )

    # 4. instruct2 with the stored voice from the library, streamed again.
    page.select_option("#mode", "instruct2")
    page.click("#voice-list li[data-voice='Web Voice'] button:text('Use')")
    assert page.input_value("#voice") == "Web Voice"
    page.fill("#instruct", "用四川话说这句话<|endofprompt|>")
    streamed = _speak(page, "instruct2", "pcm")
    assert streamed["samples"] > 0

    # 5. A recording from the (fake) microphone, stored too.
    page.select_option("#mode", "cross_lingual")
    page.click("label[for=src-recording]")
    page.click("#record")
    page.wait_for_timeout(1500)
    page.click("#record")
    page.wait_for_selector("#record-status:text('Recorded')")
    page.fill("#voice-name", "Mic Voice")
    page.fill("#prompt-text", "")
    page.click("#save-voice")
    page.wait_for_selector("#voice-list li[data-voice='Mic Voice']")

    page.screenshot(path=str(artifacts_dir() / "web_page.png"), full_page=True)
    print(f"screenshot: {artifacts_dir() / 'web_page.png'}")

    # 6. Delete both (two clicks each: the first only arms the button).
    for name in ("Web Voice", "Mic Voice"):
        button = f"#voice-list li[data-voice='{name}'] button.danger"
        page.click(button)
        page.click(button)
        page.wait_for_selector(f"#voice-list li[data-voice='{name}']", state="detached")
    assert page.evaluate("[...document.querySelectorAll('#voice option')].map(o => o.value)").count("Web Voice") == 0
