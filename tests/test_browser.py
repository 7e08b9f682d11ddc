"""End-to-end: the real server on a free localhost port, driven in headless Debian Chromium.

Skipped when Chromium (Debian's ``chromium`` package) or the ``playwright`` package is missing;
``.ci/run`` installs Chromium. Playwright never downloads a browser here: it launches the system
one. Set ``CXR_PNEUMONIA_SAVE_SCREENSHOT=1`` to also copy the screenshots to
``docs/screenshot_web.png`` and ``docs/screenshot_rejected.png`` (for the README).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cxr_pneumonia.io import load_image
from cxr_pneumonia.predict import Run

REPO = Path(__file__).resolve().parents[1]
SCREENSHOT_ENV = "CXR_PNEUMONIA_SAVE_SCREENSHOT"
UPLOAD_LIMIT = 1_000_000  # small, so the 413 path is exercised with a 3 MB file
# No internet on CI machines: everything that phones home stays off.
CHROMIUM_ARGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-default-apps",
    "--disable-extensions",
]


def _chromium() -> str | None:
    for candidate in ("/usr/bin/chromium", shutil.which("chromium")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


CHROMIUM = _chromium()
# Checked at collection, so a machine without a browser does not even start the server.
sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.browser,
    # the test alone: fixture setup may train the session's tiny run first (minutes on a busy CPU)
    pytest.mark.timeout(240, func_only=True),
    pytest.mark.skipif(CHROMIUM is None, reason="Debian chromium is not installed: apt-get install chromium"),
]


@pytest.fixture(scope="module")
def gate_probes(
    tiny_run: Path,
    sample_dir: Path,
    non_cxr_dir: Path,
    make_run_copy,
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, Path]:
    """The served run (the tiny run with its gate's unusual level moved so that exactly one known
    sample X-ray is unusual) and the uploads: an ordinary X-ray, the unusual one, a text page."""
    xrays = sorted((sample_dir / "test").rglob("*.jpeg"))
    predictions = Run.load(tiny_run).classify_images([load_image(x) for x in xrays])
    # only X-rays the gate accepts can be "unusual" (a tiny run's gate may refuse one outright)
    accepted = [(x, p.domain_score) for x, p in zip(xrays, predictions, strict=True) if p.status == "ok"]
    xrays, scores = [x for x, _ in accepted], [score for _, score in accepted]
    order = np.argsort(scores)
    level = (scores[order[-1]] + scores[order[-2]]) / 2
    folder = tmp_path_factory.mktemp("gate_probes")
    return {
        "run": make_run_copy(tiny_run, folder / "run", unusual_level=level),
        "usual": xrays[order[0]],
        "unusual": xrays[order[-1]],
        "not_an_xray": non_cxr_dir / "scanned_page_0.png",
    }


@contextmanager
def _serving(app: Any) -> Iterator[str]:
    """``app`` served by uvicorn in a background thread on a free 127.0.0.1 port; its URL."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))  # handing uvicorn the bound socket avoids a port race
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if json.load(response)["status"] == "ok":
                    break
        except OSError:
            if time.monotonic() > deadline or not thread.is_alive():
                raise RuntimeError(f"the test server did not start on {url}") from None
            time.sleep(0.1)
    try:
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


@pytest.fixture(scope="module")
def served_run(gate_probes: dict[str, Path]) -> Run:
    return Run.load(gate_probes["run"])


@pytest.fixture(scope="module")
def server_url(served_run: Run) -> Iterator[str]:
    from cxr_pneumonia.serve import create_app

    with _serving(create_app(served_run, max_upload_bytes=UPLOAD_LIMIT)) as url:
        yield url


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """One headless Chromium for the module's tests (each gets its own page)."""
    with sync_api.sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            yield launched
        finally:
            launched.close()


@pytest.fixture
def new_page(browser: Any) -> Iterator[Callable[..., Any]]:
    """``new_page(**context options) -> (page, script errors so far)``; closed after the test."""
    pages = []

    def open_page(**options: Any) -> tuple[Any, list[str]]:
        context = browser.new_context(**options)  # a fresh context: no credentials or storage carried over
        pages.append(context)
        page, errors = context.new_page(), []
        page.on("pageerror", lambda error: errors.append(str(error)))
        return page, errors

    yield open_page
    for context in pages:
        context.close()


def _api_probability(url: str, path: Path, token: str | None = None) -> float:
    """The API's answer for ``path``, posted without a browser (multipart by hand)."""
    boundary = "cxr-test-boundary"
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{path.name}"\r\n'
            f"Content-Type: application/octet-stream\r\n\r\n"
        ).encode()
        + path.read_bytes()
        + f"\r\n--{boundary}--\r\n".encode()
    )
    headers = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(f"{url}/v1/predict", data=body, headers=headers)
    with urllib.request.urlopen(request, timeout=60) as response:
        return float(json.load(response)["probability"])


def test_upload_in_the_browser_shows_probability_and_heatmap(
    server_url: str, new_page: Callable[..., Any], sample_dir: Path, tmp_path: Path
) -> None:
    xray = sorted((sample_dir / "test" / "PNEUMONIA").glob("*.jpeg"))[0]
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("radiologist notes, not an image\n")
    too_big = tmp_path / "huge.png"
    too_big.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(3 * UPLOAD_LIMIT))
    screenshot = tmp_path / "screenshot_web.png"
    error_screenshot = tmp_path / "screenshot_web_error.png"
    expected = _api_probability(server_url, xray)

    page, page_errors = new_page(viewport={"width": 1100, "height": 1000})
    page.goto(f"{server_url}/")
    expect = sync_api.expect

    notice = page.locator("#notice")
    expect(notice).to_be_visible()
    expect(notice).to_contain_text("Research use only")
    expect(notice).to_contain_text("not a medical device")
    expect(page.locator("#model-info")).to_contain_text("threshold")

    page.set_input_files("#file-input", str(xray))
    probability = page.locator("#probability")
    expect(probability).to_have_text(re.compile(r"^\d\.\d{3}$"), timeout=60_000)
    probability_text = probability.inner_text()
    assert float(probability_text) == pytest.approx(expected, abs=5e-4)
    label = re.compile(r"^(PNEUMONIA|NORMAL) \(threshold \d\.\d{3}\)$")
    expect(page.locator("#label")).to_have_text(label)
    for image_id in ("#heatmap", "#preprocessed"):
        image = page.locator(image_id)
        expect(image).to_be_visible()
        expect(image).to_have_attribute("src", re.compile(r"^data:image/png;base64,.+"))
        # naturalWidth > 0: the browser decoded the PNG, not just received a src.
        assert image.evaluate("el => el.complete && el.naturalWidth") > 0
    expect(page.locator("#error")).to_be_hidden()
    page.screenshot(path=str(screenshot), full_page=True)

    page.set_input_files("#file-input", str(not_an_image))
    error = page.locator("#error")
    expect(error).to_be_visible(timeout=30_000)
    expect(error).to_contain_text("415")
    expect(error).to_contain_text("unsupported file type")
    expect(page.locator("#result")).to_be_hidden()  # no stale result beside the error
    page.screenshot(path=str(error_screenshot))

    page.set_input_files("#file-input", str(too_big))
    expect(error).to_contain_text("413", timeout=30_000)
    expect(error).to_contain_text("limit")

    # The server keeps answering after the bad uploads, and the error is cleared.
    page.set_input_files("#file-input", str(xray))
    expect(probability).to_have_text(probability_text, timeout=60_000)
    expect(error).to_be_hidden()
    assert page_errors == []

    assert screenshot.stat().st_size > 10_000
    if os.environ.get(SCREENSHOT_ENV) == "1":
        target = REPO / "docs" / "screenshot_web.png"
        target.parent.mkdir(exist_ok=True)
        shutil.copyfile(screenshot, target)


def test_the_page_shows_rejections_unusual_images_and_gate_off(
    server_url: str, new_page: Callable[..., Any], gate_probes: dict[str, Path], tmp_path: Path
) -> None:
    screenshot = tmp_path / "screenshot_rejected.png"
    page, page_errors = new_page(viewport={"width": 1000, "height": 900})
    page.goto(f"{server_url}/")
    expect = sync_api.expect
    result, rejection, note = (
        page.locator("#result"),
        page.locator("#rejection"),
        page.locator("#domain-note"),
    )

    # Not a chest X-ray: its own message, no probability, no label, no red PNEUMONIA.
    page.set_input_files("#file-input", str(gate_probes["not_an_xray"]))
    expect(rejection).to_be_visible(timeout=60_000)
    expect(rejection).to_contain_text("Not analysed: this does not look like a frontal chest X-ray")
    expect(rejection).to_contain_text("not like the frontal chest X-rays this model was trained on")
    expect(rejection).to_contain_text("limit")
    expect(page.locator("#scores")).to_be_hidden()
    expect(page.locator("#heatmap-figure")).to_be_hidden()
    expect(page.locator("#preprocessed")).to_be_visible()
    assert "PNEUMONIA" not in result.inner_text() and page.locator(".label-pneumonia").count() == 0
    expect(page.locator("#notice")).to_contain_text("Research use only")
    expect(page.locator("#error")).to_be_hidden()
    page.screenshot(path=str(screenshot), full_page=True)

    # The same picture with the check off: classified, and the result says it is unreliable.
    page.check("#gate-off")
    page.set_input_files("#file-input", str(gate_probes["not_an_xray"]))
    expect(page.locator("#probability")).to_have_text(re.compile(r"^\d\.\d{3}$"), timeout=60_000)
    expect(rejection).to_be_hidden()
    expect(note).to_contain_text("Input check off")
    expect(note).to_contain_text("classified anyway: gate off")
    expect(note).to_contain_text("unreliable")
    page.uncheck("#gate-off")

    # An accepted X-ray unlike most of the training population: classified, with a note.
    page.set_input_files("#file-input", str(gate_probes["unusual"]))
    expect(note).to_contain_text("Unusual image", timeout=60_000)
    expect(note).to_contain_text("unlike most of the training")
    expect(page.locator("#label")).to_have_text(re.compile(r"^(PNEUMONIA|NORMAL) \(threshold"))

    # An ordinary X-ray: no rejection, no note.
    page.set_input_files("#file-input", str(gate_probes["usual"]))
    expect(note).to_be_hidden(timeout=60_000)
    expect(page.locator("#probability")).to_have_text(re.compile(r"^\d\.\d{3}$"))
    expect(rejection).to_be_hidden()
    expect(page.locator("#heatmap")).to_be_visible()
    expect(page.locator("#notice")).to_be_visible()
    assert page_errors == []

    assert 10_000 < screenshot.stat().st_size < 200_000
    if os.environ.get(SCREENSHOT_ENV) == "1":
        target = REPO / "docs" / "screenshot_rejected.png"
        target.parent.mkdir(exist_ok=True)
        shutil.copyfile(screenshot, target)


def test_swagger_docs_render_without_internet(server_url: str, new_page: Callable[..., Any]) -> None:
    """/docs draws the operations from this server's own assets (no CDN on these machines)."""
    page, _ = new_page()
    outside: list[str] = []
    page.on(
        "request",
        lambda request: (
            outside.append(request.url) if not request.url.startswith((server_url, "data:")) else None
        ),
    )
    page.goto(f"{server_url}/docs")
    sync_api.expect(page.locator(".opblock-summary-path").first).to_be_visible(timeout=30_000)
    paths = page.locator(".opblock-summary-path").all_inner_texts()
    assert any("/v1/predict" in p for p in paths), paths
    assert outside == []


BROWSER_TOKEN = "browser-test-token-5f2a9c7e"


@pytest.fixture(scope="module")
def token_server_url(served_run: Run) -> Iterator[str]:
    """The same run served with a bearer token (``--token-file``)."""
    from cxr_pneumonia.serve import create_app

    with _serving(create_app(served_run, token=BROWSER_TOKEN)) as url:
        yield url


def test_the_browser_asks_for_the_token_once_and_the_page_works(
    token_server_url: str, new_page: Callable[..., Any], sample_dir: Path
) -> None:
    """With a token nothing but /health answers without it: the page answers an HTTP Basic
    challenge (the browser's own dialog; Playwright's ``http_credentials`` answers it), and the
    page's API calls then carry the token the browser was given."""
    xray = sorted((sample_dir / "test" / "NORMAL").glob("*.jpeg"))[0]
    expected = _api_probability(token_server_url, xray, token=BROWSER_TOKEN)
    expect = sync_api.expect

    page, _ = new_page()  # no token: headless Chromium answers the challenge with nothing
    with pytest.raises(sync_api.Error, match="ERR_INVALID_AUTH_CREDENTIALS"):
        page.goto(f"{token_server_url}/")
    page, _ = new_page(http_credentials={"username": "anyone", "password": "not-the-token"})
    answer = page.goto(f"{token_server_url}/")  # a wrong token: the 401's text, not the page
    assert answer is not None and answer.status == 401
    expect(page.locator("body")).to_contain_text("access token")
    expect(page.locator("#notice")).to_have_count(0)

    page, page_errors = new_page(http_credentials={"username": "radiologist", "password": BROWSER_TOKEN})
    answer = page.goto(f"{token_server_url}/")
    assert answer is not None and answer.status == 200
    expect(page.locator("#model-info")).to_contain_text("threshold")
    page.set_input_files("#file-input", str(xray))
    probability = page.locator("#probability")
    expect(probability).to_have_text(re.compile(r"^\d\.\d{3}$"), timeout=60_000)
    assert float(probability.inner_text()) == pytest.approx(expected, abs=5e-4)
    page.goto(f"{token_server_url}/docs")
    expect(page.locator(".opblock-summary-path").first).to_be_visible(timeout=30_000)
    assert page_errors == []
