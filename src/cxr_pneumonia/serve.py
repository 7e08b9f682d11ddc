"""REST API and web page: upload an X-ray, get the probability, label and Grad-CAM heatmap.

``create_app(run)`` builds a FastAPI app around one loaded :class:`~cxr_pneumonia.predict.Run`:

- ``POST /v1/predict`` (multipart field ``file``: PNG, JPEG or DICOM; ``?heatmap=true`` adds
  the Grad-CAM overlay and the preprocessed image as base64 PNGs). The run's gate checks every
  image first: one unlike the frontal chest X-rays the model was trained on is answered with
  200 and ``status: "rejected"``, a reason and no probability or label (``?gate=false``
  classifies it anyway and marks the answer);
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
from typing import Any, Literal

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
from cxr_pneumonia.predict import Run
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
    """One image's answer: the gate's verdict, then the prediction at the operating threshold.

    ``status`` is ``"ok"`` for an image the gate accepts, ``"rejected"`` for one unlike the
    frontal chest X-rays the model was trained on. A rejected image gets no probability and no
    label (both null), unless the request said ``gate=false``: then it is classified anyway and
    ``gated`` is false. The status code stays 200 either way: a rejection is an answer.
    """

    status: Literal["ok", "rejected"] = Field(
        description='"ok": accepted by the input check; "rejected": not like the frontal chest X-rays '
        "the model was trained on (no probability or label unless gate=false)."
    )
    probability: float | None = Field(
        description="P(pneumonia), in [0, 1]; null when the image was rejected (gate on)."
    )
    label: Literal["NORMAL", "PNEUMONIA"] | None = Field(
        description="PNEUMONIA when probability >= threshold, else NORMAL; null when rejected (gate on)."
    )
    threshold: float = Field(description="The operating threshold chosen on validation data.")
    domain_score: float | None = Field(
        default=None,
        description="How unlike the training images the image is (higher: further); null without a gate.",
    )
    domain_limit: float | None = Field(
        default=None, description="Images scoring above this are rejected; null without a gate."
    )
    reason: str | None = Field(
        default=None,
        description="The input check's verdict in words, e.g. 'not like the frontal chest X-rays this "
        "model was trained on: score 48.1, limit 12.3'; null without a gate.",
    )
    unusual: bool = Field(
        default=False,
        description="True when the image lies beyond most of the training population (accepted or not).",
    )
    gated: bool = Field(default=True, description="False when gate=false classified a rejected image anyway.")
    model: ModelRef
    disclaimer: str
    heatmap_png_base64: str | None = Field(
        default=None,
        description="Grad-CAM overlay on the preprocessed image (PNG, base64); with heatmap=true, "
        "not for a rejected image.",
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

    def predict(
        self, preprocessed: np.ndarray, *, heatmap: bool, gate: bool = True, source: str = "<upload>"
    ) -> dict[str, Any]:
        """The gate's verdict, probability, label and threshold (``Prediction.to_dict`` less the
        path and error); with ``heatmap`` also the overlay (not for a rejected image) and the
        input as PNG base64."""
        with self._lock:
            prediction = self.run.classify_preprocessed(preprocessed[None], gate=gate, sources=[source])[0]
            cam = None
            if heatmap and prediction.probability is not None:
                if self._explainer is None:  # built on first use: plain predictions never need it
                    self._explainer = Explainer(self.run)
                cam = self._explainer.cam(preprocessed)
        result = {k: v for k, v in prediction.to_dict().items() if k not in ("path", "error")}
        if cam is not None:
            result["heatmap_png_base64"] = _b64(encode_png(overlay(preprocessed, cam)))
        if heatmap:
            result["preprocessed_png_base64"] = _b64(encode_png(preprocessed))
        return _json_safe(result)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def create_app(
    run: Run,
    *,
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    gate: bool = True,
) -> FastAPI:
    """The API and web page for ``run`` (loaded once, shared by every request).

    ``gate``: whether the input check refuses images by default (a request's ``?gate=`` wins).
    """
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
    default_gate = gate
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

    @app.post(
        PREDICT_PATH,
        response_model=PredictionResponse,
        response_model_exclude_unset=True,
        responses=_predict_responses(),
    )
    def predict(
        file: UploadFile = File(..., description=f"A chest X-ray: {SUPPORTED_TYPES}."),
        heatmap: bool = Query(False, description="Add the Grad-CAM overlay and the preprocessed image."),
        gate: bool | None = Query(
            None,
            description="false: classify an image the input check rejects anyway (the answer says so). "
            f"Default: {str(gate).lower()} (the server's setting).",
        ),
    ) -> dict[str, Any]:
        """The input check's verdict, then the probability of pneumonia and the label at the
        model's threshold for one frontal chest X-ray."""
        filename = Path(file.filename or "").name or "<upload>"
        image = _decode_upload(_read_upload(file, max_upload_bytes), filename, max_pixels)
        try:
            preprocessed = run.preprocess(image, source=filename)
        except PreprocessError as e:
            raise HTTPException(422, str(e)) from e
        gate_on = default_gate if gate is None else gate
        result = predictor.predict(preprocessed, heatmap=heatmap, gate=gate_on, source=filename)
        # DEBUG, not INFO: upload names can carry patient identifiers.
        log.debug("%s: %s p=%s %s", filename, result["status"], result["probability"], result["label"])
        return {**result, "model": model_ref, "disclaimer": DISCLAIMER}

    _with_response_examples(app, run)
    return app


def _predict_responses() -> dict[int | str, dict[str, Any]]:
    """The OpenAPI description of /v1/predict's answers: the 200 (accepted or rejected) and the 4xx."""
    return {
        200: {
            "description": 'The answer: status "ok" with probability and label, or status "rejected" '
            "(not like the frontal chest X-rays the model was trained on) with a reason and no "
            "probability or label. A rejection is an answer, not an error: it keeps the 200.",
        },
        413: {"model": ErrorResponse, "description": "Upload over the size (or pixel) limit."},
        415: {"model": ErrorResponse, "description": f"Not a {SUPPORTED_TYPES} file."},
        422: {"description": "Unreadable image (empty, truncated, corrupt) or missing file field."},
    }


def _with_response_examples(app: FastAPI, run: Run) -> None:
    """Add examples of the 200 answers to /v1/predict in the OpenAPI schema, after it is built:
    FastAPI drops every null from the schema, and a rejection's nulls are the point."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        schema = build()
        answer = schema["paths"][PREDICT_PATH]["post"]["responses"]["200"]
        answer.setdefault("content", {}).setdefault("application/json", {})["examples"] = _response_examples(
            run
        )
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def _response_examples(run: Run) -> dict[str, Any]:
    """OpenAPI examples of the three kinds of 200 answer (values are illustrative)."""
    base = {"threshold": run.threshold, "model": {"name": run.name}, "disclaimer": DISCLAIMER}
    rejected_reason = "not like the frontal chest X-rays this model was trained on: score 48.1, limit 12.3"
    return {
        "accepted": {
            "summary": "Accepted and classified",
            "value": {
                "status": "ok", "probability": 0.91, "label": "PNEUMONIA", "domain_score": 1.2,
                "domain_limit": 12.3, "reason": "like the training images: score 1.2", "unusual": False,
                "gated": True, **base,
            },
        },
        "rejected": {
            "summary": "Rejected by the input check: no probability, no label",
            "value": {
                "status": "rejected", "probability": None, "label": None, "domain_score": 48.1,
                "domain_limit": 12.3, "reason": rejected_reason, "unusual": True, "gated": True, **base,
            },
        },
        "rejected_gate_off": {
            "summary": "Rejected, classified anyway (gate=false)",
            "value": {
                "status": "rejected", "probability": 0.88, "label": "PNEUMONIA", "domain_score": 48.1,
                "domain_limit": 12.3, "reason": rejected_reason + " (classified anyway: gate off)",
                "unusual": True, "gated": False, **base,
            },
        },
    }  # fmt: skip


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
    gate: bool = True,
    operating_point: str | None = None,
) -> None:
    """Load the run once (at ``operating_point``, a point saved by ``calibrate``, when given; the
    model card ``/v1/model`` names it) and serve the API and web page with uvicorn until interrupted.

    ``gate=False`` makes the server classify images its input check rejects (marked as such)
    unless a request asks ``?gate=true``."""
    import uvicorn

    if max_upload_mb <= 0:
        raise ValueError(f"max_upload_mb must be positive, got {max_upload_mb}")
    run = Run.load(run_dir, runtime=runtime, operating_point=operating_point)
    if not is_loopback(host):
        log.warning("binding to %s: the API has no authentication; expose it only on a trusted network", host)
    if not gate:
        log.warning("input check off (--no-gate): images unlike the training data are classified anyway")
    app = create_app(run, max_upload_bytes=int(max_upload_mb * 2**20), gate=gate)
    log.info("serving %s on http://%s:%d (%s)", run.name, host, port, DISCLAIMER)
    uvicorn.run(app, host=host, port=port, log_level=log_level)
