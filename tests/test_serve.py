"""Tests for serve: the REST API with FastAPI's TestClient (uploads, errors, concurrency, page)."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from fastapi.testclient import TestClient

from cxr_pneumonia import serve
from cxr_pneumonia.io import load_image
from cxr_pneumonia.predict import Run
from cxr_pneumonia.rundir import DISCLAIMER

IO_DATA = Path(__file__).resolve().parent / "data" / "io"


@pytest.fixture(scope="module")
def run(tiny_run: Path) -> Run:
    return Run.load(tiny_run)


@pytest.fixture(scope="module")
def client(run: Run) -> Iterator[TestClient]:
    # raise_server_exceptions=False: a server error must show up as a 500 the tests can see.
    with TestClient(serve.create_app(run), raise_server_exceptions=False) as test_client:
        yield test_client


@pytest.fixture(scope="module")
def images(sample_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Valid uploads of every supported kind, written to files so the reference can read them too."""
    folder = tmp_path_factory.mktemp("uploads")
    normal = sorted((sample_dir / "test" / "NORMAL").glob("*.jpeg"))[0]
    pneumonia = sorted((sample_dir / "test" / "PNEUMONIA").glob("*.jpeg"))[0]
    gray = load_image(pneumonia)
    png = folder / "scan.png"
    png.write_bytes(cv2.imencode(".png", load_image(normal))[1].tobytes())
    png16 = folder / "scan16.png"
    png16.write_bytes(cv2.imencode(".png", gray.astype(np.uint16) * 64)[1].tobytes())
    small = folder / "small.png"  # under the 2,000-byte limit of small_limit_client
    thumbnail = cv2.resize(gray, (40, 40), interpolation=cv2.INTER_AREA)
    small.write_bytes(cv2.imencode(".png", thumbnail)[1].tobytes())
    return {
        "jpeg": normal,
        "jpeg_pneumonia": pneumonia,
        "png": png,
        "png16": png16,
        "dicom": IO_DATA / "mono2_rescale.dcm",
        "dicom_no_preamble": IO_DATA / "no_preamble.dcm",
        "small_png": small,
    }


def _post(client: TestClient, name: str, data: bytes, *, query: str = "", content_type: str = "") -> Any:
    files = {"file": (name, data, content_type or "application/octet-stream")}
    return client.post(f"/v1/predict{query}", files=files)


def _reference(run: Run, path: Path) -> float:
    return float(run.predict_images([load_image(path)])[0])


def _decode_png(b64: str) -> np.ndarray:
    data = base64.b64decode(b64)
    assert data.startswith(b"\x89PNG")
    return cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)


# --- valid uploads --------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["jpeg", "jpeg_pneumonia", "png", "png16", "dicom", "dicom_no_preamble"])
def test_predict_equals_the_python_api(
    client: TestClient, run: Run, images: dict[str, Path], kind: str
) -> None:
    path = images[kind]
    # gate=false: every image gets its probability (the test DICOMs are not chest X-rays)
    response = _post(client, path.name, path.read_bytes(), query="?gate=false")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["probability"] == pytest.approx(_reference(run, path), abs=1e-5)
    [expected] = run.classify_images([load_image(path)], gate=False)
    assert body["status"] == expected.status and body["reason"] == expected.reason
    assert body["domain_score"] == pytest.approx(expected.domain_score, abs=1e-4)
    assert body["domain_limit"] == pytest.approx(run.gate.limit)
    assert body["threshold"] == run.threshold
    assert body["label"] == ("PNEUMONIA" if body["probability"] >= run.threshold else "NORMAL")
    assert body["model"] == {
        "name": run.name,
        "version": run.config["package_version"],
        "trained_at": run.config["created_at"],
    }
    assert body["disclaimer"] == DISCLAIMER
    assert "heatmap_png_base64" not in body  # only on request


def test_type_is_decided_by_content_not_by_name(client: TestClient, images: dict[str, Path]) -> None:
    data = images["png"].read_bytes()
    plain = _post(client, "scan.png", data, content_type="image/png").json()
    disguised = _post(client, "report.pdf", data, content_type="application/pdf")
    assert disguised.status_code == 200
    assert disguised.json()["probability"] == plain["probability"]


def test_heatmap_returns_decodable_pngs(client: TestClient, run: Run, images: dict[str, Path]) -> None:
    path = images["jpeg_pneumonia"]
    plain = _post(client, path.name, path.read_bytes()).json()
    response = _post(client, path.name, path.read_bytes(), query="?heatmap=true")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["probability"] == plain["probability"]
    size = run.image_size
    overlay = _decode_png(body["heatmap_png_base64"])
    assert overlay.shape == (size, size, 3)
    preprocessed = _decode_png(body["preprocessed_png_base64"])
    np.testing.assert_array_equal(preprocessed, run.preprocess(load_image(path)))
    assert not np.array_equal(overlay[..., 0], overlay[..., 2])  # coloured, not the gray input


# --- bad uploads ----------------------------------------------------------------------------


def _png_header(width: int, height: int) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    return b"\x89PNG\r\n\x1a\n" + struct.pack(">I", len(ihdr)) + chunk + struct.pack(">I", zlib.crc32(chunk))


def _truncated_jpeg(images: dict[str, Path]) -> bytes:
    data = images["jpeg"].read_bytes()
    return data[: len(data) // 2]


BAD_UPLOADS = [
    # (id, file name, bytes (or a builder taking the images), expected status, text in detail)
    ("gif", "scan.gif", b"GIF89a\x01\x00\x01\x00\x80\x00\x00\xff\xff\xff\x00!\xf9\x04", 415, "unsupported"),
    ("pdf", "scan.pdf", b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\n%%EOF\n", 415, "unsupported"),
    ("text-as-png", "scan.png", b"radiologist notes, not an image\n", 415, "PNG, JPEG or DICOM"),
    ("zip", "scans.zip", b"PK\x03\x04\x14\x00\x00\x00\x08\x00" + bytes(64), 415, "unsupported"),
    ("text-as-dicom", "scan.dcm", b"this is not a dicom file at all" * 8, 415, "PNG, JPEG or DICOM"),
    ("empty", "scan.jpeg", b"", 422, "empty"),
    ("truncated-jpeg", "scan.jpeg", _truncated_jpeg, 422, "cut short"),
    ("corrupt-jpeg", "scan.jpeg", b"\xff\xd8\xff\xe0" + bytes(200), 422, "JPEG"),
    ("corrupt-png", "scan.png", _png_header(64, 64) + b"\x00\x00\x00\x04IDATjunk" + b"IEND", 422, "PNG"),
    ("png-no-end", "scan.png", _png_header(64, 64), 422, "IEND"),
    ("dicom-no-pixels", "scan.dcm", lambda _: (IO_DATA / "no_pixels.dcm").read_bytes(), 422, "no pixel data"),
    ("pixel-bomb", "bomb.png", _png_header(100_000, 100_000) + b"IEND", 413, "pixels"),
]


@pytest.mark.parametrize(
    ("name", "payload", "status", "detail"),
    [case[1:] for case in BAD_UPLOADS],
    ids=[case[0] for case in BAD_UPLOADS],
)
def test_bad_uploads_get_their_4xx(
    client: TestClient, images: dict[str, Path], name: str, payload: Any, status: int, detail: str
) -> None:
    data = payload(images) if callable(payload) else payload
    response = _post(client, name, data)
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    assert detail in response.json()["detail"]


def test_missing_file_field_is_422(client: TestClient) -> None:
    response = client.post("/v1/predict", data={"other": "x"})
    assert response.status_code == 422
    assert any("file" in error["loc"] for error in response.json()["detail"])


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize(
    "magic", [b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", bytes(128) + b"DICM"], ids=["png", "jpeg", "dicom"]
)
def test_garbage_after_a_signature_is_a_4xx(client: TestClient, magic: bytes, seed: int) -> None:
    garbage = np.random.default_rng(seed).integers(0, 256, 50 + 200 * seed, dtype=np.uint8).tobytes()
    response = _post(client, "fuzz.bin", magic + garbage)
    assert 400 <= response.status_code < 500, response.text
    assert isinstance(response.json()["detail"], str)


@pytest.mark.parametrize(
    "image",
    [np.zeros((1, 1), np.uint8), np.zeros((300, 200), np.uint8), np.full((16, 512), 255, np.uint8)],
    ids=["one-pixel", "all-black", "thin-white"],
)
def test_odd_but_valid_images_are_answered(client: TestClient, image: np.ndarray) -> None:
    response = _post(client, "odd.png", cv2.imencode(".png", image)[1].tobytes())
    assert response.status_code in (200, 422), response.text
    if response.status_code == 200:
        body = response.json()
        assert body["status"] in ("ok", "rejected")
        assert (
            body["probability"] is None if body["status"] == "rejected" else 0.0 <= body["probability"] <= 1
        )


@pytest.fixture(scope="module")
def small_limit_client(run: Run) -> Iterator[TestClient]:
    app = serve.create_app(run, max_upload_bytes=2000)
    with TestClient(app, raise_server_exceptions=False) as test_client:
        yield test_client


def test_upload_over_the_limit_is_413(small_limit_client: TestClient, images: dict[str, Path]) -> None:
    data = images["jpeg"].read_bytes()
    assert len(data) > 2000
    response = _post(small_limit_client, "big.jpeg", data)
    assert response.status_code == 413
    assert "2,000 bytes" in response.json()["detail"]
    assert _post(small_limit_client, "ok.dcm", images["dicom"].read_bytes()[:1999]).status_code == 422


def test_huge_declared_body_is_refused_before_reading(small_limit_client: TestClient) -> None:
    response = _post(small_limit_client, "huge.png", b"\x89PNG\r\n\x1a\n" + bytes(300_000))
    assert response.status_code == 413
    assert "limit" in response.json()["detail"]


def test_huge_streamed_body_without_length_is_cut_off(small_limit_client: TestClient) -> None:
    boundary = "cxrboundary"
    chunks_sent = []

    def body() -> Iterator[bytes]:
        yield (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\n'
            "Content-Type: image/png\r\n\r\n"
        ).encode()
        for _ in range(40):  # 40 × 8 KiB, well over limit + multipart slack
            chunks_sent.append(1)
            yield b"\x89PNG" + bytes(8188)
        yield f"\r\n--{boundary}--\r\n".encode()

    response = small_limit_client.post(
        "/v1/predict", content=body(), headers={"content-type": f"multipart/form-data; boundary={boundary}"}
    )
    assert response.status_code == 413
    assert "limit" in response.json()["detail"]


def _asgi_call(
    middleware_limit: int, chunks: list[bytes], headers: list[tuple[bytes, bytes]]
) -> tuple[list[dict[str, Any]], list[int], int]:
    """Drive BodyLimitMiddleware around an app that reads the whole body; (messages sent, chunk
    sizes the app read, chunks nobody read)."""
    read: list[int] = []

    async def inner_app(scope: Any, receive: Any, send: Any) -> None:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise ConnectionError("client disconnected")  # what Starlette's parser does
            read.append(len(message["body"]))
            if not message.get("more_body"):
                break
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": str(sum(read)).encode()})

    last = len(chunks) - 1
    pending = [{"type": "http.request", "body": c, "more_body": i < last} for i, c in enumerate(chunks)]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        assert not sent, "the body is read before the answer, not after"
        return pending.pop(0) if pending else {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    middleware = serve.BodyLimitMiddleware(
        inner_app, limit=middleware_limit, paths=frozenset({"/v1/predict"}), detail="too big"
    )
    scope = {"type": "http", "path": "/v1/predict", "headers": headers}
    asyncio.run(middleware(scope, receive, send))
    return sent, read, len(pending)


@pytest.mark.parametrize(
    ("chunks", "headers", "status", "chunks_read", "left"),
    [
        ([b"x" * 1000] * 2, [(b"content-length", b"2000")], 200, 2, 0),
        # chunked: the app reads two chunks, the third is cut off; the rest is drained, then the 413
        ([b"x" * 1000] * 10, [], 413, 2, 0),
        ([b"x" * 1000] * 10, [(b"content-length", b"10000")], 413, 0, 0),  # refused unparsed, drained
        ([b"x" * 1000] * 12, [], 413, 2, 2),  # drained up to 4 × the limit only
        ([b"x" * 1000] * 12, [(b"content-length", b"12000")], 413, 0, 12),  # too big to drain
    ],
    ids=["under-limit", "streamed-over-limit", "declared-over-limit", "streamed-huge", "declared-huge"],
)
def test_body_limit_middleware(
    chunks: list[bytes], headers: list[tuple[bytes, bytes]], status: int, chunks_read: int, left: int
) -> None:
    sent, read, unread = _asgi_call(2500, chunks, headers)
    assert sent[0]["status"] == status
    assert len(read) == chunks_read and unread == left
    assert len([m for m in sent if m["type"] == "http.response.start"]) == 1
    if status == 413:
        assert json.loads(sent[1]["body"]) == {"detail": "too big"}


def test_server_keeps_answering_after_bad_uploads(
    client: TestClient, small_limit_client: TestClient, run: Run, images: dict[str, Path]
) -> None:
    for _, name, payload, _, _ in BAD_UPLOADS:
        _post(client, name, payload(images) if callable(payload) else payload)
    _post(small_limit_client, "big.png", bytes(500_000))
    for test_client, kind in ((client, "dicom"), (small_limit_client, "small_png")):
        response = _post(test_client, kind, images[kind].read_bytes(), query="?gate=false")
        assert response.status_code == 200, response.text
        assert response.json()["probability"] == pytest.approx(_reference(run, images[kind]), abs=1e-5)
    assert client.get("/health").json()["status"] == "ok"


# --- other endpoints ------------------------------------------------------------------------


def test_health(client: TestClient, run: Run) -> None:
    assert client.get("/health").json() == {"status": "ok", "model": run.name}


def test_model_card(client: TestClient, run: Run) -> None:
    body = client.get("/v1/model").json()
    assert body["name"] == run.name
    assert body["threshold"]["threshold"] == run.threshold
    assert body["config"]["model"]["backbone"] == run.config["model"]["backbone"]
    assert body["config"]["preprocess"]["size"] == run.image_size
    assert body["disclaimer"] == DISCLAIMER
    assert "metrics_val" in body


def test_model_card_survives_non_finite_metrics() -> None:
    assert serve._json_safe({"a": [1.0, float("nan")], "b": {"c": float("inf")}, "d": "x"}) == {
        "a": [1.0, None],
        "b": {"c": None},
        "d": "x",
    }


def test_docs_and_openapi(client: TestClient) -> None:
    docs = client.get("/docs")
    assert docs.status_code == 200
    # Swagger UI comes from this server, not a CDN, so /docs works without internet
    assets = re.findall(r'(?:src|href)="([^"]+swagger-ui[^"]*)"', docs.text)
    assert len(assets) == 2 and all(a.startswith("/") for a in assets), assets
    for asset in assets:
        answer = client.get(asset)
        assert answer.status_code == 200 and len(answer.content) > 10_000
    schema = client.get("/openapi.json").json()
    operation = schema["paths"]["/v1/predict"]["post"]
    assert {"413", "415", "422"} <= set(operation["responses"])
    assert "/health" in schema["paths"] and "/v1/model" in schema["paths"]


def test_page_and_static_files(client: TestClient) -> None:
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "Research use only" in page.text and "not a medical device" in page.text
    for name in ("app.js", "style.css"):
        assert client.get(f"/static/{name}").status_code == 200
    script = client.get("/static/app.js").text
    assert "/v1/predict?${query}" in script and '"heatmap=true"' in script and '"&gate=false"' in script
    # The page calls the API on its own origin only, where a browser that was asked for the
    # token (HTTP Basic) sends it again; it handles no token itself.
    assert sorted(re.findall(r"fetch\([`\"](/[^`\"?]*)", script)) == ["/v1/model", "/v1/predict"]
    assert "Authorization" not in script and "sessionStorage" not in script


@pytest.mark.parametrize(
    "path", ["/static/../predict.py", "/static/%2e%2e/predict.py", "/static/..%2fpredict.py", "/etc/passwd"]
)
def test_no_server_side_paths(client: TestClient, path: str) -> None:
    response = client.get(path)
    assert response.status_code == 404
    assert "Run.load" not in response.text


def test_page_has_a_content_security_policy(client: TestClient) -> None:
    policy = client.get("/").headers["content-security-policy"]
    assert "default-src 'self'" in policy and "img-src 'self' data:" in policy


@pytest.mark.parametrize(("host", "max_mb", "warns"), [("127.0.0.1", 20.0, False), ("0.0.0.0", 0.5, True)])
def test_serve_loads_the_run_and_starts_uvicorn(
    tiny_run: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    host: str,
    max_mb: float,
    warns: bool,
) -> None:
    import uvicorn

    calls: list[dict[str, Any]] = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: calls.append({"app": app, **kwargs}))
    monkeypatch.setattr(serve.MicroBatcher, "warm_up", lambda batcher: None)  # seconds, tested apart
    with caplog.at_level("WARNING", logger="cxr_pneumonia.serve"):
        serve.serve(tiny_run, host=host, port=8123, max_upload_mb=max_mb)
    [call] = calls
    assert (call["host"], call["port"]) == (host, 8123)
    assert ("no authentication" in caplog.text) is warns
    with TestClient(call["app"]) as served:
        assert served.get("/health").json()["status"] == "ok"
        over = bytes(int(max_mb * 2**20) + 1)
        assert _post(served, "big.png", b"\x89PNG\r\n\x1a\n" + over).status_code == 413


def test_serve_binds_localhost_by_default() -> None:
    import inspect

    assert inspect.signature(serve.serve).parameters["host"].default == "127.0.0.1"


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("localhost", True),
        ("::1", True),
        ("0.0.0.0", False),
        ("192.168.1.5", False),
        ("example.org", False),
    ],
)
def test_is_loopback(host: str, loopback: bool) -> None:
    assert serve.is_loopback(host) is loopback


@pytest.mark.parametrize(
    ("data", "name", "kind"),
    [
        (b"\x89PNG\r\n\x1a\nrest", "x", "png"),
        (b"\xff\xd8\xffrest", "x.png", "jpeg"),
        (bytes(128) + b"DICMrest", "x.jpg", "dicom"),
        (b"\x08\x00\x05\x00", "x.DCM", "dicom?"),
        (b"GIF89a", "x.png", None),
        (b"", "x.png", None),
    ],
)
def test_upload_kind_reads_the_bytes(data: bytes, name: str, kind: str | None) -> None:
    assert serve.upload_kind(data, name) == kind


# --- concurrency ----------------------------------------------------------------------------


def test_concurrent_clients_get_the_single_threaded_answers(
    run: Run, images: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    kinds = ["jpeg", "jpeg_pneumonia", "png16", "dicom"]
    payloads = {kind: images[kind].read_bytes() for kind in kinds}
    app = serve.create_app(run, gate=False)  # the DICOM is not a chest X-ray: classify it anyway
    with TestClient(app) as single:
        expected = {kind: _post(single, kind, data).json()["probability"] for kind, data in payloads.items()}
    assert len(set(expected.values())) > 1  # different images, different answers: the test can fail

    # Count model calls in flight: the model thread must keep them to one at a time.
    original = run.classify_preprocessed
    active, peak, guard = 0, 0, threading.Lock()

    def counting(batch: np.ndarray, **kwargs: Any) -> Any:
        nonlocal active, peak
        with guard:
            active += 1
            peak = max(peak, active)
        try:
            time.sleep(0.002)  # widen the window in which an overlap would be seen
            return original(batch, **kwargs)
        finally:
            with guard:
                active -= 1

    monkeypatch.setattr(run, "classify_preprocessed", counting)

    def client_thread(index: int) -> list[tuple[str, float]]:
        answers = []
        with TestClient(app) as own_client:
            for request in range(10):
                kind = kinds[(index + request) % len(kinds)]
                response = _post(own_client, kind, payloads[kind])
                assert response.status_code == 200, response.text
                answers.append((kind, response.json()["probability"]))
        return answers

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = [answer for answers in pool.map(client_thread, range(8)) for answer in answers]

    assert len(results) == 80
    # Batched answers equal the one-by-one ones up to float32 summation order.
    assert all(probability == pytest.approx(expected[kind], abs=1e-6) for kind, probability in results)
    assert peak == 1  # one model thread: never two forward passes at once


def _concurrently(app: Any, uploads: list[tuple[str, bytes, str]]) -> list[Any]:
    """POST every (name, bytes, query) at once from one event loop; the responses in order."""
    import httpx2 as httpx

    async def post_all() -> list[Any]:
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as async_client:
            return await asyncio.gather(
                *(
                    async_client.post(f"/v1/predict{query}", files={"file": (name, data, "image/png")})
                    for name, data, query in uploads
                )
            )

    return asyncio.run(post_all())


# A wait bound far beyond the test: a batch runs when max_batch requests are there, never early.
PATIENT = {"max_wait_ms": 60_000}


def _record_forward_sizes(run: Run, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The batch size of every ``run.classify_preprocessed`` call from now on."""
    original, sizes = run.classify_preprocessed, []

    def recording(batch: np.ndarray, **kwargs: Any) -> Any:
        sizes.append(len(batch))
        return original(batch, **kwargs)

    monkeypatch.setattr(run, "classify_preprocessed", recording)
    return sizes


def test_concurrent_requests_share_a_forward_pass_and_get_the_one_by_one_answers(
    run: Run, images: dict[str, Path], not_an_xray: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    read = {kind: images[kind].read_bytes() for kind in images}
    good = [
        ("normal.jpeg", read["jpeg"], ""),
        ("pneumonia.jpeg", read["jpeg_pneumonia"], ""),
        ("scan.png", read["png"], ""),
        ("scan16.png", read["png16"], ""),
        ("page.png", not_an_xray, ""),  # rejected: no probability
        ("scan.dcm", read["dicom"], "?gate=false"),  # a second pass: the gate flag differs
        ("page-anyway.png", not_an_xray, "?gate=false"),
    ]
    with TestClient(serve.create_app(run, max_batch=1)) as one_by_one:
        expected = [_post(one_by_one, name, data, query=query).json() for name, data, query in good]
    assert len({answer["probability"] for answer in expected}) > 3  # the answers differ: the test can fail

    app = serve.create_app(run, max_batch=7, **PATIENT)
    forward_sizes = _record_forward_sizes(run, monkeypatch)
    # A broken upload among them is answered alone and does not hold up the batch.
    truncated = ("cut.jpeg", read["jpeg"][: len(read["jpeg"]) // 2], "")
    responses = _concurrently(app, [*good[:3], truncated, *good[3:]])
    assert responses[3].status_code == 422 and "cut short" in responses[3].json()["detail"]
    answers = [r.json() for r in responses[:3] + responses[4:]]
    assert all(r.status_code == 200 for r in responses[:3] + responses[4:])
    # The seven meet in one batch: five gated in one pass, the two with gate=false in another.
    assert list(app.state.batcher.batch_sizes) == [5, 2]
    assert forward_sizes == [7, 2]  # padded to the allowed sizes 1, 2, 4, 7; the padding's answers dropped
    for got, want in zip(answers, expected, strict=True):
        assert (got["probability"] is None) == (want["probability"] is None)
        if want["probability"] is not None:
            assert got["probability"] == pytest.approx(want["probability"], abs=1e-6)
        # The domain score is a distance over float32 features: the same to 1e-5, relatively.
        assert got["domain_score"] == pytest.approx(want["domain_score"], rel=1e-5)
        for field in (
            "status",
            "label",
            "reason",
            "gated",
            "unusual",
            "threshold",
        ):
            assert got.get(field) == want.get(field), field
    assert answers[4]["status"] == "rejected" and answers[4]["probability"] is None
    assert answers[6]["gated"] is False and answers[6]["probability"] is not None


def test_without_batching_every_request_has_its_own_pass(run: Run, images: dict[str, Path]) -> None:
    app = serve.create_app(run, max_batch=1, **PATIENT)
    data = images["png"].read_bytes()
    responses = _concurrently(app, [("scan.png", data, "")] * 4)
    assert [r.status_code for r in responses] == [200] * 4
    assert list(app.state.batcher.batch_sizes) == [1, 1, 1, 1]


def test_a_failing_batch_is_retried_one_by_one(
    run: Run, images: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The model fails on one image: that request gets a 500, the others their answers."""
    original = run.classify_preprocessed

    def fails_on_poison(batch: np.ndarray, **kwargs: Any) -> Any:
        if "poison.png" in kwargs["sources"]:
            raise ValueError("the model choked")
        return original(batch, **kwargs)

    monkeypatch.setattr(run, "classify_preprocessed", fails_on_poison)
    app = serve.create_app(run, max_batch=3, **PATIENT)
    data = images["png"].read_bytes()
    responses = _concurrently(app, [("a.png", data, ""), ("poison.png", data, ""), ("b.png", data, "")])
    assert [r.status_code for r in responses] == [200, 500, 200]
    assert responses[0].json()["probability"] == pytest.approx(_reference(run, images["png"]), abs=1e-6)
    assert list(app.state.batcher.batch_sizes) == [3, 1, 1, 1]
    # The model thread survived: the next request is answered.
    assert [r.status_code for r in _concurrently(app, [("c.png", data, "")] * 3)] == [200] * 3


def test_uploads_are_decoded_at_most_one_per_core_at_a_time(
    run: Run, images: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 50 MP upload holds about a gigabyte while it is decoded; the loop's default pool (cores + 4
    threads) let six decode at once on 2 cores. Six uploads at once, "2 cores": two at a time."""
    original, lock, active, peak = serve._prepare, threading.Lock(), [0], [0]

    def slow_prepare(*args: Any) -> Any:
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        try:
            time.sleep(0.2)
            return original(*args)
        finally:
            with lock:
                active[0] -= 1

    monkeypatch.setattr(serve, "_prepare", slow_prepare)
    monkeypatch.setattr(serve, "available_cores", lambda: 2)
    app = serve.create_app(run)
    data = images["png"].read_bytes()
    responses = _concurrently(app, [(f"{i}.png", data, "") for i in range(6)])
    assert [r.status_code for r in responses] == [200] * 6
    assert peak[0] == 2


def test_a_truthy_gate_from_the_python_api_is_the_gate_on(run: Run, images: dict[str, Path]) -> None:
    """The worker groups a batch by ``gate is True`` / ``is False``: a ``gate=1`` request once fitted
    neither group and failed its whole batch with a KeyError."""
    x = run.preprocess(load_image(images["png"]), source="a.png")
    batcher = serve.MicroBatcher(run, max_batch=2, max_wait_ms=200)

    async def both() -> list[Any]:
        return await asyncio.gather(batcher.submit(x, gate=1), batcher.submit(x, gate=True))

    (truthy, _), (plain, _) = asyncio.run(both())
    assert truthy == plain and truthy.gated and truthy.status in ("ok", "rejected")


@pytest.mark.parametrize(
    ("max_batch", "allowed"), [(1, [1]), (2, [1, 2]), (12, [1, 2, 4, 8, 12]), (16, [1, 2, 4, 8, 16])]
)
def test_batches_take_a_few_allowed_sizes(run: Run, max_batch: int, allowed: list[int]) -> None:
    assert serve.MicroBatcher(run, max_batch=max_batch).allowed_sizes == allowed


def test_warm_up_runs_every_allowed_size_once(run: Run, monkeypatch: pytest.MonkeyPatch) -> None:
    forward_sizes = _record_forward_sizes(run, monkeypatch)
    serve.MicroBatcher(run, max_batch=6).warm_up()
    assert forward_sizes == [1, 2, 4, 6]


@pytest.mark.parametrize(("max_batch", "max_wait_ms"), [(0, 5.0), (4, -1.0)])
def test_batcher_refuses_bad_knobs(run: Run, max_batch: int, max_wait_ms: float) -> None:
    with pytest.raises(ValueError, match="max_batch"):
        serve.MicroBatcher(run, max_batch=max_batch, max_wait_ms=max_wait_ms)


# --- bearer token ---------------------------------------------------------------------------

TOKEN = "k3Q9-test-token-4c1e2b7a9d0f"


@pytest.fixture(scope="module")
def token_client(run: Run) -> Iterator[TestClient]:
    with TestClient(serve.create_app(run, token=TOKEN), raise_server_exceptions=False) as test_client:
        yield test_client


WRONG_CREDENTIALS = {
    "none": {},
    "wrong": {"Authorization": "Bearer not-the-token"},
    "prefix": {"Authorization": f"Bearer {TOKEN[:-1]}"},
    "longer": {"Authorization": f"Bearer {TOKEN}x"},
    "basic": {"Authorization": f"Basic {TOKEN}"},
    "basic-wrong": {"Authorization": "Basic " + base64.b64encode(b"anyone:not-the-token").decode()},
    "basic-no-password": {"Authorization": "Basic " + base64.b64encode(TOKEN.encode()).decode()},
    "bare": {"Authorization": TOKEN},
}
BASIC = {"Authorization": "Basic " + base64.b64encode(f"radiologist:{TOKEN}".encode()).decode()}
BEARER = {"Authorization": f"Bearer {TOKEN}"}


@pytest.mark.parametrize("credentials", list(WRONG_CREDENTIALS))
def test_api_without_the_token_is_401(
    token_client: TestClient, images: dict[str, Path], credentials: str
) -> None:
    headers = WRONG_CREDENTIALS[credentials]
    upload = {"file": ("scan.png", images["png"].read_bytes(), "image/png")}
    for response in (
        token_client.get("/v1/model", headers=headers),
        token_client.post("/v1/predict", files=upload, headers=headers),
        token_client.post("/v1/predict", data={"other": "x"}, headers=headers),  # 401 before 422
    ):
        assert response.status_code == 401, response.text
        assert response.headers["www-authenticate"] == "Bearer"
        assert "bearer token" in response.json()["detail"]


def test_an_upload_without_the_token_is_refused_before_its_body_is_read(run: Run) -> None:
    """The API's own check runs after FastAPI has parsed the multipart body (spooling it to disk);
    the middleware refuses first. The body's receive() is never called."""
    app = serve.create_app(run, token=TOKEN)
    reads: list[int] = []
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        reads.append(1)
        return {"type": "http.request", "body": b"--x\r\n" + b"\0" * 1000, "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
        "path": "/v1/predict", "raw_path": b"/v1/predict", "query_string": b"", "root_path": "",
        "headers": [(b"content-type", b"multipart/form-data; boundary=x"), (b"content-length", b"1006")],
        "client": ("127.0.0.1", 5000), "server": ("127.0.0.1", 8000),
    }  # fmt: skip
    asyncio.run(app(scope, receive, send))
    assert sent[0]["status"] == 401 and (b"www-authenticate", b"Bearer") in sent[0]["headers"]
    assert json.loads(sent[1]["body"]) == {"detail": "missing bearer token"}
    assert reads == []


def test_api_with_the_token_answers(token_client: TestClient, run: Run, images: dict[str, Path]) -> None:
    headers = {"Authorization": f"Bearer {TOKEN}"}
    assert token_client.get("/v1/model", headers=headers).json()["name"] == run.name
    upload = {"file": ("scan.png", images["png"].read_bytes(), "image/png")}
    body = token_client.post("/v1/predict?gate=false", files=upload, headers=headers).json()
    assert body["probability"] == pytest.approx(_reference(run, images["png"]), abs=1e-6)
    # the scheme's name is case-insensitive (RFC 7235); a browser's HTTP Basic (any user name) counts
    assert token_client.get("/v1/model", headers={"Authorization": f"bearer {TOKEN}"}).status_code == 200
    assert token_client.get("/v1/model", headers=BASIC).json()["name"] == run.name


def test_every_api_operation_but_health_wants_the_token(token_client: TestClient, run: Run) -> None:
    schema = token_client.get("/openapi.json", headers=BEARER).json()
    assert schema["components"]["securitySchemes"]["bearer"] == {
        "type": "http",
        "scheme": "bearer",
        "description": "The token in the server's --token-file.",
    }
    operations = [(path, method) for path, item in schema["paths"].items() for method in item]
    assert ("/v1/predict", "post") in operations and ("/v1/model", "get") in operations
    for path, method in operations:
        response = token_client.request(method.upper(), path)
        if path == "/health":
            assert response.status_code == 200 and "security" not in schema["paths"][path][method]
        else:
            assert response.status_code == 401, (path, method)
            assert schema["paths"][path][method]["security"] == [{"bearer": []}]
            assert "401" in schema["paths"][path][method]["responses"]
    # The schema's examples do not carry the run's name or threshold (the model card wants the token).
    assert run.name not in json.dumps(schema)


@pytest.mark.parametrize("credentials", list(WRONG_CREDENTIALS))
def test_nothing_but_health_answers_without_the_token(token_client: TestClient, credentials: str) -> None:
    """The page, its files and the docs too: they answer an HTTP Basic challenge, which makes a
    browser ask for the token once (password: the token) and send it with the page's API calls."""
    pages = ("/", "/static/app.js", "/static/style.css", "/docs", "/redoc", "/openapi.json", "/no-such-page")
    for path in pages:
        refused = token_client.get(path, headers=WRONG_CREDENTIALS[credentials])
        assert refused.status_code == 401, path
        assert refused.headers["www-authenticate"].startswith('Basic realm="cxr-pneumonia')
        assert "access token" in refused.text
    assert token_client.get("/health", headers=WRONG_CREDENTIALS[credentials]).status_code == 200


def test_the_page_and_docs_answer_with_the_token(token_client: TestClient) -> None:
    for headers in (BASIC, BEARER):
        for path in ("/", "/static/app.js", "/docs", "/openapi.json"):
            assert token_client.get(path, headers=headers).status_code == 200, (path, headers)
        assert token_client.get("/no-such-page", headers=headers).status_code == 404


def test_without_a_token_nothing_asks_for_one(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    assert "securitySchemes" not in schema.get("components", {})
    assert client.get("/v1/model").status_code == 200


@pytest.mark.parametrize(
    ("content", "mode", "problem"),
    [
        (None, 0o600, "not found"),
        ("", 0o600, "empty"),
        ("  \n", 0o600, "empty"),
        ("two words\n", 0o600, "one word"),
        ("tök-en-with-umlaut", 0o600, "printable ASCII"),
        (TOKEN, 0o644, "readable by every user"),
    ],
    ids=["missing", "empty", "blank", "two-words", "non-ascii", "world-readable"],
)
def test_read_token_refuses_bad_files(tmp_path: Path, content: str | None, mode: int, problem: str) -> None:
    path = tmp_path / "token"
    if content is not None:
        path.write_text(content, encoding="utf-8")
        path.chmod(mode)
    with pytest.raises(serve.TokenFileError, match=problem) as refused:
        serve.read_token(path)
    assert str(path) in str(refused.value) and "\n" not in str(refused.value)


def test_read_token_strips_the_line_end(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text(f"{TOKEN}\n")
    path.chmod(0o640)  # group-readable is the owner's call
    assert serve.read_token(path) == TOKEN


# --- workers: the factory, the environment, the threads -------------------------------------


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "token"
    path.write_text(TOKEN + "\n")
    path.chmod(0o600)
    return path


def test_app_from_env_builds_the_configured_app(
    tiny_run: Path, token_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    limited: list[int] = []
    monkeypatch.setattr(serve, "limit_threads", limited.append)  # the test process keeps its threads
    warmed: list[Any] = []
    monkeypatch.setattr(serve.MicroBatcher, "warm_up", lambda batcher: warmed.append(batcher))
    monkeypatch.setattr(serve, "available_cores", lambda: 8)
    cfg = serve.ServeConfig(run=tiny_run, max_batch=4, max_wait_ms=2.5, token_file=token_file, workers=2)
    monkeypatch.setenv(serve.SERVE_CONFIG_ENV, cfg.model_dump_json())
    app = serve.app_from_env()
    assert limited == [4]  # 8 cores / 2 workers
    assert warmed == [app.state.batcher]  # every batch size built before the first request
    assert (app.state.batcher.max_batch, app.state.batcher.max_wait_ms) == (4, 2.5)
    with TestClient(app) as worker:
        assert worker.get("/v1/model").status_code == 401
        assert worker.get("/v1/model", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200


def test_app_from_env_without_the_variable_says_how_to_start(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(serve.SERVE_CONFIG_ENV, raising=False)
    with pytest.raises(RuntimeError, match="cxr-pneumonia serve"):
        serve.app_from_env()


def test_serve_with_workers_hands_uvicorn_the_factory(
    tiny_run: Path, token_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import uvicorn

    calls: list[tuple[Any, dict[str, Any]]] = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: calls.append((app, kwargs)))
    monkeypatch.setattr(serve, "build_app", lambda cfg: pytest.fail("the parent must not load the model"))
    monkeypatch.delenv(serve.SERVE_CONFIG_ENV, raising=False)  # restored after the test
    serve.serve(tiny_run, port=8124, workers=2, max_batch=8, token_file=token_file, threads=1)
    [(app, kwargs)] = calls
    assert app == "cxr_pneumonia.serve:app_from_env"
    assert kwargs["factory"] is True and kwargs["workers"] == 2 and kwargs["port"] == 8124
    cfg = serve.ServeConfig(**json.loads(os.environ[serve.SERVE_CONFIG_ENV]))
    assert (cfg.run, cfg.workers, cfg.max_batch, cfg.token_file, cfg.threads) == (
        tiny_run,
        2,
        8,
        token_file,
        1,
    )
    assert TOKEN not in os.environ[serve.SERVE_CONFIG_ENV]  # the secret stays in its file


@pytest.mark.parametrize(
    ("options", "problem"),
    [
        ({"token_file": "missing-token"}, "token file not found"),
        ({"workers": 0}, "workers"),
        ({"max_batch": 0}, "max_batch"),
        ({"max_wait_ms": -1}, "max_wait_ms"),
    ],
)
def test_serve_refuses_bad_options_before_listening(
    tiny_run: Path, monkeypatch: pytest.MonkeyPatch, options: dict[str, Any], problem: str
) -> None:
    import uvicorn

    monkeypatch.setattr(uvicorn, "run", lambda *a, **k: pytest.fail("must not start"))
    with pytest.raises(ValueError, match=problem):
        serve.serve(tiny_run, **options)


def test_cli_serve_refuses_a_missing_token_file_in_one_line(
    tiny_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from cxr_pneumonia import cli

    assert cli.main(["serve", str(tiny_run), "--token-file", str(tmp_path / "nope")]) == 1
    err = capsys.readouterr().err.strip()
    assert err == f"error: {tmp_path / 'nope'}: token file not found"


@pytest.mark.parametrize(("workers", "cores", "threads"), [(1, 8, 8), (2, 8, 4), (3, 8, 2), (4, 2, 1)])
def test_worker_threads_share_out_the_cores(workers: int, cores: int, threads: int) -> None:
    assert serve.worker_threads(workers, cores) == threads


def test_limit_threads_sets_the_pools(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "TF_NUM_INTRAOP_THREADS",
                 "TF_NUM_INTEROP_THREADS"):  # fmt: skip
        monkeypatch.delenv(name, raising=False)  # restored after the test
    before = cv2.getNumThreads()
    try:
        serve.limit_threads(1)
        assert cv2.getNumThreads() == 1
    finally:
        cv2.setNumThreads(before)
    assert os.environ["OMP_NUM_THREADS"] == os.environ["TF_NUM_INTRAOP_THREADS"] == "1"
    assert os.environ["TF_NUM_INTEROP_THREADS"] == "1"


# --- the input check (gate) -----------------------------------------------------------------

REJECTED_REASON = "not like the frontal chest X-rays this model was trained on"


@pytest.fixture(scope="module")
def not_an_xray(non_cxr_dir: Path) -> bytes:
    return (non_cxr_dir / "scanned_page_0.png").read_bytes()


def test_a_chest_xray_is_accepted_with_its_domain_score(
    client: TestClient, run: Run, images: dict[str, Path]
) -> None:
    body = _post(client, "scan.jpeg", images["jpeg"].read_bytes()).json()
    assert body["status"] == "ok" and body["gated"] is True
    assert body["domain_score"] <= body["domain_limit"] == pytest.approx(run.gate.limit)
    assert body["reason"].startswith(("like the training images", "accepted, but unlike"))
    assert body["label"] in ("NORMAL", "PNEUMONIA") and 0 <= body["probability"] <= 1


def test_a_rejected_image_is_a_200_without_probability_or_label(
    client: TestClient, not_an_xray: bytes
) -> None:
    response = _post(client, "page.png", not_an_xray, query="?heatmap=true")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["status"] == "rejected" and body["probability"] is None and body["label"] is None
    assert body["reason"].startswith(REJECTED_REASON) and "limit" in body["reason"]
    assert body["domain_score"] > body["domain_limit"] and body["unusual"] is True and body["gated"] is True
    assert "heatmap_png_base64" not in body  # no evidence map for an answer that was not given
    assert _decode_png(body["preprocessed_png_base64"]).ndim == 2  # what the check looked at
    assert body["disclaimer"] == DISCLAIMER


def test_gate_false_classifies_a_rejected_image_and_marks_it(
    client: TestClient, run: Run, not_an_xray: bytes
) -> None:
    refused = _post(client, "page.png", not_an_xray).json()
    body = _post(client, "page.png", not_an_xray, query="?gate=false&heatmap=true").json()
    assert body["status"] == "rejected" and body["gated"] is False
    assert body["reason"] == refused["reason"] + " (classified anyway: gate off)"
    assert body["domain_score"] == refused["domain_score"]
    image = cv2.imdecode(np.frombuffer(not_an_xray, np.uint8), cv2.IMREAD_GRAYSCALE)
    assert body["probability"] == pytest.approx(float(run.predict_images([image])[0]), abs=1e-5)
    assert body["label"] == ("PNEUMONIA" if body["probability"] >= run.threshold else "NORMAL")
    assert _decode_png(body["heatmap_png_base64"]).shape[2] == 3


def test_a_server_started_without_the_gate_classifies_unless_asked(run: Run, not_an_xray: bytes) -> None:
    with TestClient(serve.create_app(run, gate=False)) as open_client:
        assert _post(open_client, "page.png", not_an_xray).json()["gated"] is False
        assert _post(open_client, "page.png", not_an_xray, query="?gate=true").json()["probability"] is None


def test_a_run_without_a_gate_answers_ok_without_domain_fields(ungated_run: Path, not_an_xray: bytes) -> None:
    with TestClient(serve.create_app(Run.load(ungated_run))) as plain:
        body = _post(plain, "page.png", not_an_xray).json()
    assert body["status"] == "ok" and 0 <= body["probability"] <= 1
    assert body["domain_score"] is None and body["domain_limit"] is None and body["reason"] is None


def test_openapi_describes_the_rejection(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    answer = schema["components"]["schemas"]["PredictionResponse"]["properties"]
    assert answer["status"]["enum"] == ["ok", "rejected"]
    assert {"type": "null"} in answer["probability"]["anyOf"] and {"type": "null"} in answer["label"]["anyOf"]
    assert {"domain_score", "domain_limit", "reason", "unusual", "gated"} <= set(answer)
    operation = schema["paths"]["/v1/predict"]["post"]
    ok = operation["responses"]["200"]
    assert "rejected" in ok["description"] and "200" in ok["description"]
    rejected = ok["content"]["application/json"]["examples"]["rejected"]["value"]
    assert rejected["status"] == "rejected" and rejected["probability"] is None
    gate = next(p for p in operation["parameters"] if p["name"] == "gate")
    assert gate["in"] == "query" and "false" in gate["description"]
