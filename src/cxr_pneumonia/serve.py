"""REST API and web page: upload an X-ray, get the probability, label and Grad-CAM heatmap.

``create_app(run)`` builds a FastAPI app around one loaded :class:`~cxr_pneumonia.predict.Run`:

- ``POST /v1/predict`` (multipart field ``file``: PNG, JPEG or DICOM; ``?heatmap=true`` adds
  the Grad-CAM overlay and the preprocessed image as base64 PNGs);
- ``GET /health``, ``GET /v1/model`` (the run's model card), ``/docs`` (OpenAPI);
- ``GET /`` the web page (``static/``).

Uploads are recognised by their bytes, never by the client's content type or file name alone.
Bad uploads get a JSON ``{"detail": ...}`` with 415 (not PNG/JPEG/DICOM), 413 (over the size
limit, in bytes or in pixels) or 422 (unreadable: empty, truncated, corrupt, DICOM without
pixels). Decoding and preprocessing run in parallel threads; the model (and Grad-CAM) run one
request at a time behind a lock, because a Keras model is not guaranteed to be thread-safe.
No endpoint takes a server-side path.
"""

from __future__ import annotations

import base64
import ipaddress
import json
import logging
import math
import threading
from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, File, HTTPException, Query, UploadFile
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles
from fastapi_offline import FastAPIOffline
from pydantic import BaseModel, Field

from cxr_pneumonia import __version__
from cxr_pneumonia.explain import Explainer, encode_png, overlay
from cxr_pneumonia.io import (
    DEFAULT_MAX_PIXELS,
    DICOM_SUFFIXES,
    ImageReadError,
    ImageTooLargeError,
    NotAnImageError,
    load_image_bytes,
    sniff_format,
)
from cxr_pneumonia.predict import Run, label_for
from cxr_pneumonia.preprocess import PreprocessError
from cxr_pneumonia.rundir import DISCLAIMER

log = logging.getLogger(__name__)

DEFAULT_MAX_UPLOAD_BYTES = 20 * 1024 * 1024
PREDICT_PATH = "/v1/predict"
STATIC_DIR = Path(__file__).resolve().parent / "static"
# Room for the multipart boundary and part headers around the file itself.
_MULTIPART_SLACK = 64 * 1024
SUPPORTED_TYPES = "PNG, JPEG or DICOM"
# The page loads only its own script and style; results come back as data: URIs.
PAGE_HEADERS = {
    "Cache-Control": "no-cache",
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; object-src 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
}

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


# --- response schemas (also document the API at /docs) ------------------------------------


class ModelRef(BaseModel):
    """Which model answered."""

    name: str
    version: str | None = None
    trained_at: str | None = None


class PredictionResponse(BaseModel):
    """One image's prediction at the model's operating threshold."""

    probability: float = Field(description="P(pneumonia), in [0, 1].")
    label: str = Field(description="PNEUMONIA when probability >= threshold, else NORMAL.")
    threshold: float = Field(description="The operating threshold chosen on validation data.")
    model: ModelRef
    disclaimer: str
    heatmap_png_base64: str | None = Field(
        default=None,
        description="Grad-CAM overlay on the preprocessed image (PNG, base64); with heatmap=true.",
    )
    preprocessed_png_base64: str | None = Field(
        default=None, description="The preprocessed model input (PNG, base64); with heatmap=true."
    )


class ErrorResponse(BaseModel):
    """Why a request was refused."""

    detail: str


# --- uploads -------------------------------------------------------------------------------


def upload_kind(data: bytes, filename: str) -> str | None:
    """``"png"``, ``"jpeg"``, ``"dicom"`` from the leading bytes; None when it is none of them.

    A ``.dcm``/``.dicom`` name makes a file without the DICOM preamble worth trying
    (``"dicom?"``): decoding then decides whether it is one.
    """
    kind = sniff_format(data)
    if kind is not None:
        return kind
    if Path(filename).suffix.lower() in DICOM_SUFFIXES:
        return "dicom?"
    return None


def _decode_upload(data: bytes, filename: str, max_pixels: int) -> np.ndarray:
    """The upload as a uint8 grayscale array, or the HTTPException that refuses it."""
    if not data:
        raise HTTPException(422, f"{filename}: empty file (0 bytes)")
    kind = upload_kind(data, filename)
    if kind is None:
        reason = f"unsupported file type (starts with {bytes(data[:8])!r}); send {SUPPORTED_TYPES}"
        raise HTTPException(415, f"{filename}: {reason}")
    try:
        return load_image_bytes(data, name=filename, max_pixels=max_pixels)
    except ImageTooLargeError as e:
        raise HTTPException(413, str(e)) from e
    except NotAnImageError as e:
        if kind == "dicom?":  # only the name said DICOM; the bytes are not an image at all
            raise HTTPException(415, f"{e}; send {SUPPORTED_TYPES}") from e
        raise HTTPException(422, str(e)) from e
    except ImageReadError as e:
        raise HTTPException(422, str(e)) from e


def _read_upload(file: UploadFile, max_bytes: int) -> bytes:
    """The uploaded bytes; 413 when there are more than ``max_bytes`` (reads at most one more)."""
    data = file.file.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise HTTPException(413, _too_large_detail(max_bytes))
    return data


def _too_large_detail(max_bytes: int) -> str:
    return f"upload larger than the limit of {max_bytes:,} bytes ({max_bytes / 2**20:.1f} MiB)"


class BodyLimitMiddleware:
    """Refuse request bodies over ``limit`` bytes on ``paths`` with a JSON 413, before parsing.

    A declared ``Content-Length`` over the limit is refused without reading the body; a body
    without one (chunked) is counted as it arrives and cut off at the limit. This keeps a huge
    upload from being spooled to disk by the multipart parser before the endpoint sees it.
    """

    def __init__(
        self, app: Callable[..., Awaitable[None]], *, limit: int, paths: frozenset[str], detail: str
    ) -> None:
        self.app = app
        self.limit = limit
        self.paths = paths
        self.detail = detail

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path") not in self.paths:
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.limit:
            await self._refuse(send)
            return
        received = 0
        exceeded = started = False

        async def counting_receive() -> Message:
            nonlocal received, exceeded
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    exceeded = True
                    # The parser stops on a disconnect; its error response is replaced below.
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if exceeded:
                return
            started = True
            await send(message)

        try:
            await self.app(scope, counting_receive, guarded_send)
        except Exception:
            # Once the body was cut off, the parser's complaint about it is replaced by the 413.
            if not exceeded or started:
                raise
        if exceeded and not started:
            await self._refuse(send)

    async def _refuse(self, send: Send) -> None:
        body = json.dumps({"detail": self.detail}).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


def _content_length(scope: Scope) -> int | None:
    for key, value in scope.get("headers", []):
        if key.lower() == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def _json_safe(value: Any) -> Any:
    """``value`` with NaN and infinities replaced by None (strict JSON has neither)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


# --- the app -------------------------------------------------------------------------------


class Predictor:
    """The run behind a lock: one model call (prediction or Grad-CAM) at a time."""

    def __init__(self, run: Run) -> None:
        self.run = run
        self._lock = threading.Lock()
        self._explainer: Explainer | None = None

    def predict(self, preprocessed: np.ndarray, *, heatmap: bool) -> dict[str, Any]:
        """Probability, label and threshold; with ``heatmap`` also the overlay and input as PNG base64."""
        with self._lock:
            probability = float(self.run.predict_preprocessed(preprocessed[None])[0])
            if heatmap:
                if self._explainer is None:  # built on first use: plain predictions never need it
                    self._explainer = Explainer(self.run)
                cam = self._explainer.cam(preprocessed)
        result: dict[str, Any] = {
            "probability": probability,
            "label": label_for(probability, self.run.threshold),
            "threshold": self.run.threshold,
        }
        if heatmap:
            result["heatmap_png_base64"] = _b64(encode_png(overlay(preprocessed, cam)))
            result["preprocessed_png_base64"] = _b64(encode_png(preprocessed))
        return result


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def create_app(
    run: Run,
    *,
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> FastAPI:
    """The API and web page for ``run`` (loaded once, shared by every request)."""
    if max_upload_bytes < 1:
        raise ValueError(f"max_upload_bytes must be positive, got {max_upload_bytes}")
    predictor = Predictor(run)
    model_ref = ModelRef(
        name=run.name, version=run.config.get("package_version"), trained_at=run.config.get("created_at")
    )
    # FastAPIOffline serves Swagger UI and ReDoc from the package, not a CDN: /docs works offline.
    app = FastAPIOffline(
        title="cxr-pneumonia",
        version=__version__,
        description=f"Pneumonia probability and Grad-CAM heatmap for a chest X-ray. **{DISCLAIMER}**",
    )
    app.state.predictor = predictor
    app.add_middleware(
        BodyLimitMiddleware,
        limit=max_upload_bytes + _MULTIPART_SLACK,
        paths=frozenset({PREDICT_PATH}),
        detail=_too_large_detail(max_upload_bytes),
    )
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", headers=PAGE_HEADERS)

    @app.get("/health")
    def health() -> dict[str, str]:
        """Liveness: the model is loaded and the server answers."""
        return {"status": "ok", "model": run.name}

    @app.get("/v1/model")
    def model_info() -> dict[str, Any]:
        """The model card: name, version, configs, threshold and validation metrics."""
        return _json_safe(run.info())

    errors: dict[int | str, dict[str, Any]] = {
        413: {"model": ErrorResponse, "description": "Upload over the size (or pixel) limit."},
        415: {"model": ErrorResponse, "description": f"Not a {SUPPORTED_TYPES} file."},
        422: {"description": "Unreadable image (empty, truncated, corrupt) or missing file field."},
    }

    @app.post(
        PREDICT_PATH, response_model=PredictionResponse, response_model_exclude_unset=True, responses=errors
    )
    def predict(
        file: UploadFile = File(..., description=f"A chest X-ray: {SUPPORTED_TYPES}."),
        heatmap: bool = Query(False, description="Add the Grad-CAM overlay and the preprocessed image."),
    ) -> dict[str, Any]:
        """Probability of pneumonia and the label at the model's threshold for one X-ray."""
        filename = Path(file.filename or "").name or "<upload>"
        image = _decode_upload(_read_upload(file, max_upload_bytes), filename, max_pixels)
        try:
            preprocessed = run.preprocess(image, source=filename)
        except PreprocessError as e:
            raise HTTPException(422, str(e)) from e
        result = predictor.predict(preprocessed, heatmap=heatmap)
        # DEBUG, not INFO: upload names can carry patient identifiers.
        log.debug("%s: p=%.4f %s", filename, result["probability"], result["label"])
        return {**result, "model": model_ref, "disclaimer": DISCLAIMER}

    return app


def is_loopback(host: str) -> bool:
    """Whether ``host`` only accepts connections from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(
    run_dir: str | Path,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    max_upload_mb: float = DEFAULT_MAX_UPLOAD_BYTES / 2**20,
    log_level: str = "info",
    runtime: str = "auto",
) -> None:
    """Load the run once and serve the API and web page with uvicorn until interrupted."""
    import uvicorn

    if max_upload_mb <= 0:
        raise ValueError(f"max_upload_mb must be positive, got {max_upload_mb}")
    run = Run.load(run_dir, runtime=runtime)
    if not is_loopback(host):
        log.warning("binding to %s: the API has no authentication; expose it only on a trusted network", host)
    app = create_app(run, max_upload_bytes=int(max_upload_mb * 2**20))
    log.info("serving %s on http://%s:%d (%s)", run.name, host, port, DISCLAIMER)
    uvicorn.run(app, host=host, port=port, log_level=log_level)
