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
pixels). No endpoint takes a server-side path.

Under load: decoding and preprocessing run in a thread pool beside the model; the model runs
in one thread (:class:`MicroBatcher`), which stacks the images of concurrent requests into one
forward pass (dynamic micro-batching, ``max_batch`` / ``max_wait_ms``). ``serve(workers=N)``
runs N such processes on one port (uvicorn's workers, built by :func:`app_from_env`), each held
to cores / N threads. With a token (``--token-file``) everything but ``/health`` answers 401
without it: the API wants ``Authorization: Bearer <token>``; the page and the docs ask the browser
for it once (HTTP Basic, the token as password), and its later calls carry it.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import ipaddress
import json
import logging
import math
import os
import queue
import secrets
import stat
import threading
import time
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from fastapi import Depends, FastAPI, File, HTTPException, Query, Request, Security, UploadFile
from fastapi.params import Depends as DependsParam
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles
from fastapi_offline import FastAPIOffline
from pydantic import BaseModel, Field
from starlette.datastructures import Headers

from cxr_pneumonia import __version__, rundir
from cxr_pneumonia.config import StageConfig, from_dict
from cxr_pneumonia.cores import available_cores, limit_threads
from cxr_pneumonia.explain import Explainer, encode_png, overlay
from cxr_pneumonia.header import DicomHeader
from cxr_pneumonia.io import (
    DEFAULT_MAX_PIXELS,
    DICOM_SUFFIXES,
    ImageReadError,
    ImageTooLargeError,
    NotAnImageError,
    load_image_bytes_and_header,
    sniff_format,
)
from cxr_pneumonia.predict import Prediction, Run
from cxr_pneumonia.preprocess import PreprocessError
from cxr_pneumonia.rundir import DISCLAIMER
from cxr_pneumonia.runtime import RuntimeKind

log = logging.getLogger(__name__)

DEFAULT_MAX_UPLOAD_BYTES = 20 * 1024 * 1024
# Batching knobs: 16 images of 224 px are one efficient forward pass on a CPU; 5 ms is small
# next to one pass (tens of ms) yet long enough for requests sent together to meet.
DEFAULT_MAX_BATCH = 16
DEFAULT_MAX_WAIT_MS = 5.0
PREDICT_PATH = "/v1/predict"
STATIC_DIR = Path(__file__).resolve().parent / "static"
# uvicorn's worker processes build their app from this variable (a ServeConfig as JSON).
SERVE_CONFIG_ENV = "CXR_PNEUMONIA_SERVE_CONFIG"
# An oversized body up to this many times the limit is read and dropped before the 413.
DRAIN_FACTOR = 4
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


class ServeConfig(StageConfig):
    """How the server runs; validated when built. ``serve --workers N`` hands it to each worker
    process as JSON in ``$CXR_PNEUMONIA_SERVE_CONFIG`` (the token itself never travels: each
    worker reads ``token_file``)."""

    run: Path = Field(description="The run directory.")
    runtime: RuntimeKind = "auto"
    gate: bool = Field(True, description="The input check's default for requests.")
    max_upload_bytes: int = Field(DEFAULT_MAX_UPLOAD_BYTES, ge=1)
    max_batch: int = Field(
        DEFAULT_MAX_BATCH, ge=1, le=256, description="Most images in one forward pass (1: no batching)."
    )
    max_wait_ms: float = Field(
        DEFAULT_MAX_WAIT_MS, ge=0, le=60_000, description="Longest a request waits for others to join it."
    )
    token_file: Path | None = Field(None, description="File holding the bearer token; None: no auth.")
    workers: int = Field(1, ge=1, le=64, description="Server processes.")
    threads: int | None = Field(None, ge=1, description="Model threads per process (None: cores / workers).")
    warm_up: bool = Field(True, description="Run each batch size once before serving.")
    operating_point: str | None = Field(
        None, description="A point saved by calibrate (None: the threshold chosen on validation)."
    )


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
        "model was trained on: score 48.1, limit 12.3, largest on the symmetry check' (the check that "
        "lay furthest from the training images); null without a gate.",
    )
    unusual: bool = Field(
        default=False,
        description="True when the image lies beyond most of the training population (accepted or not).",
    )
    gated: bool = Field(
        default=True,
        description="Whether the input check decided what is shown: false for every answer with "
        "gate=false, and for a run without a gate unless the DICOM header ruled the image out.",
    )
    model: ModelRef
    disclaimer: str
    heatmap_png_base64: str | None = Field(
        default=None,
        description="Grad-CAM overlay on the preprocessed image (PNG, base64); with heatmap=true, "
        "for a classified image (a rejected one only with gate=false).",
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


def _decode_upload(data: bytes, filename: str, max_pixels: int) -> tuple[np.ndarray, DicomHeader | None]:
    """The upload as a uint8 grayscale array and its DICOM header (None for PNG/JPEG), or the
    HTTPException that refuses it."""
    if not data:
        raise HTTPException(422, f"{filename}: empty file (0 bytes)")
    kind = upload_kind(data, filename)
    if kind is None:
        reason = f"unsupported file type (starts with {bytes(data[:8])!r}); send {SUPPORTED_TYPES}"
        raise HTTPException(415, f"{filename}: {reason}")
    try:
        return load_image_bytes_and_header(data, name=filename, max_pixels=max_pixels)
    except ImageTooLargeError as e:
        raise HTTPException(413, str(e)) from e
    except NotAnImageError as e:
        if kind == "dicom?":  # only the name said DICOM; the bytes are not an image at all
            raise HTTPException(415, f"{e}; send {SUPPORTED_TYPES}") from e
        raise HTTPException(422, str(e)) from e
    except ImageReadError as e:
        raise HTTPException(422, str(e)) from e


async def _read_upload(file: UploadFile, max_bytes: int) -> bytes:
    """The uploaded bytes; 413 when there are more than ``max_bytes`` (reads at most one more)."""
    data = await file.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise HTTPException(413, _too_large_detail(max_bytes))
    return data


def _too_large_detail(max_bytes: int) -> str:
    return f"upload larger than the limit of {max_bytes:,} bytes ({max_bytes / 2**20:.1f} MiB)"


class BodyLimitMiddleware:
    """Refuse request bodies over ``limit`` bytes on ``paths`` with a JSON 413, before parsing.

    A declared ``Content-Length`` over the limit is refused without parsing the body; a body
    without one (chunked) is counted as it arrives and cut off at the limit. This keeps a huge
    upload from being spooled to disk by the multipart parser before the endpoint sees it.

    Before the 413 goes out, the rest of the body is read and dropped (up to ``DRAIN_FACTOR`` ×
    the limit): a server that closes a connection with unread data resets it (TCP RST), and a
    client still sending may then never see the 413 (nginx's "lingering close" does the same).
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
            if declared <= DRAIN_FACTOR * self.limit:
                await _drain(receive, declared)
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
            await _drain(receive, DRAIN_FACTOR * self.limit - received)
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


async def _drain(receive: Receive, budget: int) -> None:
    """Read and drop request body messages until the body ends or ``budget`` bytes are read."""
    while budget > 0:
        message = await receive()
        if message["type"] != "http.request":
            return
        budget -= len(message.get("body", b""))
        if not message.get("more_body", False):
            return


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


# --- dynamic micro-batching ----------------------------------------------------------------


@dataclass(eq=False)
class _Request:
    """One image waiting for the model, and where its answer goes."""

    image: np.ndarray
    gate: bool
    heatmap: bool
    source: str
    header: DicomHeader | None
    future: asyncio.Future[Any]
    loop: asyncio.AbstractEventLoop
    arrived: float


class MicroBatcher:
    """The model's one thread: concurrent requests share forward passes (dynamic micro-batching).

    The pattern of Ray Serve's ``@serve.batch`` (``max_batch_size``, ``batch_wait_timeout_s``) and
    Triton's dynamic batcher (``max_queue_delay_microseconds``): a request's preprocessed image
    goes into a queue; the model thread takes the first waiting image, lets others join until
    ``max_batch`` are there or ``max_wait_ms`` has passed since the first arrived (requests
    that queued up during the previous pass join at once), runs ONE
    :meth:`Run.classify_preprocessed` (gate + model) on the stack and resolves each request's
    future. A forward pass of 16 images costs far less than 16 passes of one, so under load
    throughput grows while a lone request waits at most ``max_wait_ms`` more. A batch is padded
    to the next of a few allowed sizes (1, 2, 4, ..., ``max_batch``), as TF Serving's
    ``allowed_batch_sizes`` do, so the CPU kernels built per shape are few and warmed up once.

    One thread also keeps the model (and Grad-CAM) single-threaded: a Keras model is not
    guaranteed to be thread-safe. Requests whose ``gate`` differs go in separate passes (the
    flag is per call). Grad-CAM runs after the batch's other requests are answered. An
    exception answers the requests of its pass (retried one by one, so one bad image fails
    alone); the thread itself never dies. ``max_batch=1`` turns batching off.
    """

    def __init__(
        self, run: Run, *, max_batch: int = DEFAULT_MAX_BATCH, max_wait_ms: float = DEFAULT_MAX_WAIT_MS
    ):
        if max_batch < 1 or max_wait_ms < 0:
            raise ValueError(f"max_batch must be >= 1 and max_wait_ms >= 0, got {max_batch}, {max_wait_ms}")
        self.run = run
        self.max_batch = max_batch
        self.max_wait_ms = max_wait_ms
        # 1, 2, 4, ... up to max_batch: the only batch sizes the model sees (see _forward).
        self.allowed_sizes = sorted(
            {*(2**k for k in range(max_batch.bit_length()) if 2**k < max_batch), max_batch}
        )
        # The number of requests in every forward pass lately (tests read it).
        self.batch_sizes: collections.deque[int] = collections.deque(maxlen=10_000)
        self._queue: queue.SimpleQueue[_Request] = queue.SimpleQueue()
        self._explainer: Explainer | None = None
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()

    async def submit(
        self,
        image: np.ndarray,
        *,
        gate: bool = True,
        heatmap: bool = False,
        source: str = "<upload>",
        header: DicomHeader | None = None,
    ) -> tuple[Prediction, np.ndarray | None]:
        """The image's prediction and, with ``heatmap`` and a classified image, its Grad-CAM map.
        ``header``: the upload's DICOM header (:meth:`Run.classify_preprocessed`)."""
        self._start()
        loop = asyncio.get_running_loop()
        # bool(): the worker groups requests by `gate is True/False`; a truthy 1 would fit neither.
        request = _Request(
            image, bool(gate), heatmap, source, header, loop.create_future(), loop, time.monotonic()
        )
        self._queue.put(request)
        return await request.future

    def _start(self) -> None:
        with self._start_lock:  # started on first use: an app that is never called needs no thread
            if self._thread is None:
                self._thread = threading.Thread(target=self._work, name="cxr-model", daemon=True)
                self._thread.start()

    def _work(self) -> None:
        while True:
            batch = self._collect()
            try:
                self._serve(batch)
            except Exception as e:  # a bug here must not stop every later request
                log.exception("model thread failed on a batch of %d", len(batch))
                for request in batch:
                    _settle(request, e)

    def _collect(self) -> list[_Request]:
        """The next batch: the first waiting request and those that join it in time."""
        batch = [self._queue.get()]
        deadline = batch[0].arrived + self.max_wait_ms / 1000
        while len(batch) < self.max_batch:
            remaining = deadline - time.monotonic()
            try:
                batch.append(
                    self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
                )
            except queue.Empty:
                break
        return batch

    def _serve(self, batch: list[_Request]) -> None:
        outcomes: dict[int, Prediction | Exception] = {}
        for gate in (True, False):
            members = [r for r in batch if r.gate is gate]
            if members:
                outcomes.update(zip(map(id, members), self._classify(members, gate=gate), strict=True))
        explain = []
        for request in batch:
            outcome = outcomes[id(request)]
            if isinstance(outcome, Prediction) and request.heatmap and outcome.probability is not None:
                explain.append((request, outcome))
            else:
                _settle(request, outcome if isinstance(outcome, Exception) else (outcome, None))
        for request, prediction in explain:
            try:
                _settle(request, (prediction, self._cam(request.image)))
            except Exception as e:
                _settle(request, e)

    def _classify(self, requests: Sequence[_Request], *, gate: bool) -> list[Prediction | Exception]:
        """One forward pass for ``requests``; on an error, each again alone."""
        self.batch_sizes.append(len(requests))
        try:
            return self._forward(
                [r.image for r in requests], [r.source for r in requests], gate=gate,
                headers=[r.header for r in requests],
            )  # fmt: skip
        except Exception as e:
            if len(requests) == 1:
                return [e]
            log.warning("a batch of %d failed (%s); answering its requests one by one", len(requests), e)
            return [outcome for r in requests for outcome in self._classify([r], gate=gate)]

    def _forward(
        self,
        images: Sequence[np.ndarray],
        sources: list[str],
        *,
        gate: bool,
        headers: Sequence[DicomHeader | None] | None = None,
    ) -> list[Any]:
        """``classify_preprocessed`` on the images, padded to the next allowed batch size.

        The CPU kernels (oneDNN, OpenVINO) are built per input shape on first use, which costs
        more than the pass itself: a handful of sizes (TF Serving's ``allowed_batch_sizes``),
        built once by :meth:`warm_up`, keeps that out of the requests. Padding repeats the last
        image, whose answers are dropped; every image's answer is its own (no layer mixes them).
        """
        n = len(images)
        size = next(s for s in self.allowed_sizes if s >= n)
        stack = np.stack([*images, *[images[-1]] * (size - n)])
        padded = [*sources, *["<padding>"] * (size - n)]
        padded_headers = [*(headers or [None] * n), *[None] * (size - n)]
        return self.run.classify_preprocessed(
            stack, gate=gate, sources=padded, batch_size=size, headers=padded_headers
        )[:n]

    def warm_up(self) -> None:
        """Run every allowed batch size once, before the first request (call before serving)."""
        blank = np.zeros((self.run.image_size, self.run.image_size), np.uint8)
        started = time.perf_counter()
        for size in self.allowed_sizes:
            self._forward([blank] * size, ["<warm-up>"] * size, gate=True)
        log.info(
            "model warmed up for batches of %s in %.1f s", self.allowed_sizes, time.perf_counter() - started
        )

    def _cam(self, image: np.ndarray) -> np.ndarray:
        if self._explainer is None:  # built on first use: plain predictions never need it
            self._explainer = Explainer(self.run)
        return self._explainer.cam(image)


def _settle(request: _Request, outcome: Any) -> None:
    """Hand ``outcome`` (an answer or an exception) to the request's event loop."""

    def settle() -> None:
        if request.future.done():  # the client went away and the request was cancelled
            return
        if isinstance(outcome, BaseException):
            request.future.set_exception(outcome)
        else:
            request.future.set_result(outcome)

    with contextlib.suppress(RuntimeError):  # that loop is closed: nobody is waiting any more
        request.loop.call_soon_threadsafe(settle)


# --- bearer token --------------------------------------------------------------------------


class TokenFileError(ValueError):
    """The token file is missing, unreadable, empty, malformed or readable by every user."""


def read_token(path: str | Path) -> str:
    """The bearer token in ``path`` (surrounding whitespace stripped).

    Refuses, with a one-line message, a file that is missing, unreadable, empty, holds more
    than one printable ASCII word (a header cannot carry the rest), or that every user on the
    machine may read (``chmod 600`` it): a secret readable by all is not one.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise TokenFileError(f"{path}: token file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise TokenFileError(
            f"{path}: cannot read the token file ({getattr(e, 'strerror', None) or e})"
        ) from None
    token = text.strip()
    if not token:
        raise TokenFileError(f"{path}: the token file is empty")
    if not (token.isascii() and token.isprintable()) or any(c.isspace() for c in token):
        raise TokenFileError(f"{path}: the token must be one word of printable ASCII characters")
    if os.name == "posix" and mode & stat.S_IROTH:
        raise TokenFileError(f"{path}: the token file is readable by every user; chmod 600 it")
    if len(token) < 16:
        log.warning("%s: a token of %d characters is easy to guess; use 32 random ones", path, len(token))
    return token


API_PREFIX = "/v1/"
BASIC_REALM = 'Basic realm="cxr-pneumonia: user name anything, password the access token", charset="UTF-8"'


def token_matches(authorization: str | None, expected: str) -> bool:
    """Whether an ``Authorization`` header carries the token: ``Bearer <token>`` (API clients) or
    HTTP Basic with the token as password, any user name (what a browser sends after asking once).
    The comparison takes the same time however much of the token is right."""
    scheme, _, value = (authorization or "").strip().partition(" ")
    given = value.strip()
    if scheme.lower() == "basic":
        try:
            given = base64.b64decode(given, validate=True).decode("utf-8").partition(":")[2]
        except (ValueError, UnicodeDecodeError):
            return False
    elif scheme.lower() != "bearer":
        return False
    return secrets.compare_digest(given.encode(), expected.encode())


def _auth(token: str | None) -> list[DependsParam]:
    """The dependency of every API operation that answers 401 unless the token comes (none
    without a token). HTTPBearer puts the scheme into the OpenAPI schema, so /docs offers an
    'Authorize' button."""
    if token is None:
        return []
    bearer = HTTPBearer(
        scheme_name="bearer", description="The token in the server's --token-file.", auto_error=False
    )

    def require_token(request: Request, _: HTTPAuthorizationCredentials | None = Security(bearer)) -> None:
        authorization = request.headers.get("authorization")
        if not token_matches(authorization, token):
            raise HTTPException(401, _bearer_refusal(authorization), headers={"WWW-Authenticate": "Bearer"})

    return [Depends(require_token)]


def _bearer_refusal(authorization: str | None) -> str:
    return "missing bearer token" if not authorization else "wrong bearer token"


class PageAuthMiddleware:
    """With a token, everything but ``/health`` answers 401 unless the token comes: the API as
    :func:`_auth` does (a JSON ``detail``, ``WWW-Authenticate: Bearer``), here before its body is
    read, so an anonymous upload is never parsed or spooled to disk; the page, its files, /docs,
    /redoc and /openapi.json with an HTTP Basic challenge. A browser then asks for the token once
    (password: the token) and sends it with every later request, the page's API calls included."""

    def __init__(self, app: Callable[..., Awaitable[None]], *, token: str) -> None:
        self.app, self.token = app, token

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        authorization = Headers(scope=scope).get("authorization") if scope["type"] == "http" else None
        if scope["type"] != "http" or path == "/health" or token_matches(authorization, self.token):
            await self.app(scope, receive, send)
            return
        refusal = (
            JSONResponse(
                {"detail": _bearer_refusal(authorization)},
                status_code=401,
                headers={"WWW-Authenticate": "Bearer"},
            )
            if path.startswith(API_PREFIX)
            else PlainTextResponse(
                "This server wants its access token (user name: anything; password: the token).\n",
                status_code=401,
                headers={"WWW-Authenticate": BASIC_REALM},
            )
        )
        await refusal(scope, receive, send)


# --- the app -------------------------------------------------------------------------------


def _prepare(run: Run, data: bytes, filename: str, max_pixels: int) -> tuple[np.ndarray, DicomHeader | None]:
    """Decode and preprocess one upload (in a pool thread), with its DICOM header; or the
    HTTPException that refuses it."""
    image, header = _decode_upload(data, filename, max_pixels)
    try:
        return run.preprocess(image, source=filename), header
    except PreprocessError as e:
        raise HTTPException(422, str(e)) from e


def _answer(
    prediction: Prediction, cam: np.ndarray | None, preprocessed: np.ndarray | None
) -> dict[str, Any]:
    """The gate's verdict, probability, label and threshold (``Prediction.to_dict`` less the path
    and error); with ``preprocessed`` (heatmap asked for) also the input and the overlay as PNGs."""
    result = {k: v for k, v in prediction.to_dict().items() if k not in ("path", "error")}
    if cam is not None and preprocessed is not None:
        result["heatmap_png_base64"] = _b64(encode_png(overlay(preprocessed, cam)))
    if preprocessed is not None:
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
    max_batch: int = DEFAULT_MAX_BATCH,
    max_wait_ms: float = DEFAULT_MAX_WAIT_MS,
    token: str | None = None,
) -> FastAPI:
    """The API and web page for ``run`` (loaded once, shared by every request).

    ``gate``: whether the input check refuses images by default (a request's ``?gate=`` wins).
    ``max_batch``, ``max_wait_ms``: see :class:`MicroBatcher` (``app.state.batcher``).
    ``token``: when given, everything but ``/health`` answers 401 without it: the API wants
    ``Authorization: Bearer <token>`` (or HTTP Basic with the token as password), the page and
    the docs HTTP Basic (:class:`PageAuthMiddleware`), which a browser asks for once.
    """
    if max_upload_bytes < 1:
        raise ValueError(f"max_upload_bytes must be positive, got {max_upload_bytes}")
    # FastAPIOffline serves Swagger UI and ReDoc from the package, not a CDN: /docs works offline.
    app = FastAPIOffline(
        title="cxr-pneumonia",
        version=__version__,
        description=f"Pneumonia probability and Grad-CAM heatmap for a chest X-ray. **{DISCLAIMER}**",
    )
    app.state.batcher = MicroBatcher(run, max_batch=max_batch, max_wait_ms=max_wait_ms)
    # Uploads are decoded in a pool of their own, one thread per core: a 50 MP 16-bit PNG holds
    # about a gigabyte while it is decoded, and the loop's default pool (cores + 4 threads, up to
    # 32) would let that many decode at once. More threads would not decode faster anyway.
    app.state.decoders = ThreadPoolExecutor(max_workers=available_cores(), thread_name_prefix="cxr-decode")
    app.add_middleware(
        BodyLimitMiddleware,
        limit=max_upload_bytes + _MULTIPART_SLACK,
        paths=frozenset({PREDICT_PATH}),
        detail=_too_large_detail(max_upload_bytes),
    )
    if token is not None:
        app.add_middleware(PageAuthMiddleware, token=token)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    auth = _auth(token)

    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", headers=PAGE_HEADERS)

    @app.get("/health")
    def health() -> dict[str, str]:
        """Liveness: the model is loaded and the server answers (no token needed)."""
        return {"status": "ok", "model": run.name}

    @app.get("/v1/model", dependencies=auth, responses=_auth_responses(token is not None))
    def model_info() -> dict[str, Any]:
        """The model card: name, version, configs, threshold and validation metrics."""
        return _json_safe(run.info())

    _add_predict(app, run, max_upload_bytes=max_upload_bytes, max_pixels=max_pixels, gate=gate, auth=auth)
    _with_response_examples(app, run if token is None else None)
    return app


def _add_predict(
    app: FastAPI, run: Run, *, max_upload_bytes: int, max_pixels: int, gate: bool, auth: list[DependsParam]
) -> None:
    """``POST /v1/predict``: read, decode and preprocess in a pool thread, then the batcher."""
    batcher: MicroBatcher = app.state.batcher
    model_ref = ModelRef(
        name=run.name, version=run.config.get("package_version"), trained_at=run.config.get("created_at")
    )
    default_gate = gate

    @app.post(
        PREDICT_PATH,
        response_model=PredictionResponse,
        response_model_exclude_unset=True,
        responses={**_predict_responses(), **_auth_responses(bool(auth))},
        dependencies=auth,
    )
    async def predict(
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
        data = await _read_upload(file, max_upload_bytes)
        loop = asyncio.get_running_loop()
        # The event loop only waits: decoding, preprocessing and PNG encoding run in the decoding
        # pool (OpenCV and the decoders release the GIL) while the model thread works.
        image, header = await loop.run_in_executor(
            app.state.decoders, _prepare, run, data, filename, max_pixels
        )
        gate_on = default_gate if gate is None else gate
        prediction, cam = await batcher.submit(
            image, gate=gate_on, heatmap=heatmap, source=filename, header=header
        )
        if heatmap:
            result = await loop.run_in_executor(app.state.decoders, _answer, prediction, cam, image)
        else:
            result = _answer(prediction, None, None)
        # DEBUG, not INFO: upload names can carry patient identifiers.
        log.debug("%s: %s p=%s %s", filename, result["status"], result["probability"], result["label"])
        return {**result, "model": model_ref, "disclaimer": DISCLAIMER}


def _auth_responses(protected: bool) -> dict[int | str, dict[str, Any]]:
    """The 401 in the OpenAPI description of an operation that wants the token."""
    if not protected:
        return {}
    return {401: {"model": ErrorResponse, "description": "Missing or wrong bearer token."}}


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


def _with_response_examples(app: FastAPI, run: Run | None) -> None:
    """Add examples of the 200 answers to /v1/predict in the OpenAPI schema, after it is built:
    FastAPI drops every null from the schema, and a rejection's nulls are the point. ``run``
    None: placeholders instead of the run's name and threshold (the schema is public, the
    model card is not)."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        schema = build()
        answer = schema["paths"][PREDICT_PATH]["post"]["responses"]["200"]
        answer.setdefault("content", {}).setdefault("application/json", {})["examples"] = _response_examples(
            run
        )
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def _response_examples(run: Run | None) -> dict[str, Any]:
    """OpenAPI examples of the three kinds of 200 answer (values are illustrative)."""
    threshold, name = (run.threshold, run.name) if run is not None else (0.5, "model")
    base = {"threshold": threshold, "model": {"name": name}, "disclaimer": DISCLAIMER}
    rejected_reason = (
        "not like the frontal chest X-rays this model was trained on: score 48.1, limit 12.3, "
        "largest on the symmetry check"
    )
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


# --- processes and threads -----------------------------------------------------------------


def worker_threads(workers: int, cores: int | None = None) -> int:
    """Model threads for each of ``workers`` processes: the cores shared out, at least one."""
    return max(1, (cores or available_cores()) // max(1, workers))


def build_app(cfg: ServeConfig) -> FastAPI:
    """Load the run and build its app as ``cfg`` says (every worker process does this once)."""
    threads = cfg.threads or (worker_threads(cfg.workers) if cfg.workers > 1 else None)
    if threads is not None:
        limit_threads(threads)
    token = read_token(cfg.token_file) if cfg.token_file is not None else None
    run = Run.load(cfg.run, runtime=cfg.runtime, threads=threads, operating_point=cfg.operating_point)
    app = create_app(
        run,
        max_upload_bytes=cfg.max_upload_bytes,
        gate=cfg.gate,
        max_batch=cfg.max_batch,
        max_wait_ms=cfg.max_wait_ms,
        token=token,
    )
    if cfg.warm_up:
        app.state.batcher.warm_up()
    return app


def app_from_env() -> FastAPI:
    """The app factory of ``serve --workers N``: uvicorn starts worker processes from an import
    string (``cxr_pneumonia.serve:app_from_env``, ``factory=True``), so each one reads its
    :class:`ServeConfig` from ``$CXR_PNEUMONIA_SERVE_CONFIG`` (JSON) and loads the run itself."""
    raw = os.environ.get(SERVE_CONFIG_ENV)
    if not raw:
        raise RuntimeError(f"${SERVE_CONFIG_ENV} is not set; start the server with `cxr-pneumonia serve`")
    return build_app(from_dict(ServeConfig, json.loads(raw)))


def serve(
    run_dir: str | Path,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    max_upload_mb: float = DEFAULT_MAX_UPLOAD_BYTES / 2**20,
    log_level: str = "info",
    runtime: RuntimeKind = "auto",
    gate: bool = True,
    workers: int = 1,
    max_batch: int = DEFAULT_MAX_BATCH,
    max_wait_ms: float = DEFAULT_MAX_WAIT_MS,
    token_file: str | Path | None = None,
    threads: int | None = None,
    operating_point: str | None = None,
) -> None:
    """Load the run (at ``operating_point``, a point saved by ``calibrate``, when given; the model
    card ``/v1/model`` names it) and serve the API and web page with uvicorn until interrupted.

    ``gate=False`` makes the server classify images its input check rejects (marked as such)
    unless a request asks ``?gate=true``. ``workers`` > 1: that many processes share the port,
    each with its own model and ``threads`` (default cores / workers) threads.

    Raises:
        ConfigError, TokenFileError (ValueError) and RunError: with a one-line message, before
        anything listens.
    """
    import uvicorn

    if max_upload_mb <= 0:
        raise ValueError(f"max_upload_mb must be positive, got {max_upload_mb}")
    cfg = ServeConfig(
        run=Path(run_dir), runtime=runtime, gate=gate, max_upload_bytes=int(max_upload_mb * 2**20),
        max_batch=max_batch, max_wait_ms=max_wait_ms, token_file=token_file, workers=workers, threads=threads,
        operating_point=operating_point,
    )  # fmt: skip
    token = read_token(cfg.token_file) if cfg.token_file is not None else None  # refused here, once
    _warn_about_exposure(host, authenticated=token is not None, gate=gate)
    if cfg.workers == 1:
        app = build_app(cfg)
        log.info("serving %s on http://%s:%d (%s)", cfg.run, host, port, DISCLAIMER)
        uvicorn.run(app, host=host, port=port, log_level=log_level)
        return
    rundir.check_complete(cfg.run)  # a broken run fails here once, not in every worker
    os.environ[SERVE_CONFIG_ENV] = cfg.model_dump_json()  # the spawned workers inherit it
    log.info("serving %s on http://%s:%d with %d workers (%s)", cfg.run, host, port, cfg.workers, DISCLAIMER)
    uvicorn.run(
        f"{__name__}:app_from_env",
        factory=True,
        workers=cfg.workers,
        host=host,
        port=port,
        log_level=log_level,
    )


def _warn_about_exposure(host: str, *, authenticated: bool, gate: bool) -> None:
    if not is_loopback(host) and not authenticated:
        log.warning(
            "binding to %s: the API has no authentication (--token-file); expose it only on a trusted "
            "network",
            host,
        )
    elif not is_loopback(host):
        log.warning(
            "binding to %s: put TLS in front (a reverse proxy): a bearer token travels in clear", host
        )
    if not gate:
        log.warning("input check off (--no-gate): images unlike the training data are classified anyway")
