"""Serving latency: sequential requests to ``cxr-pneumonia serve`` on 127.0.0.1, and bad uploads.

Starts ``cxr-pneumonia serve RUN`` on a free loopback port, waits for ``/health``, sends one
warm-up request (reported apart), then ``--n`` sequential ``POST /v1/predict`` requests cycling
over the images of ``--images`` and ``--n-heatmap`` more with ``?heatmap=true``. Every answer
must be 200 with a probability in [0, 1]. Then one upload of each bad class (text named .png
-> 415, empty -> 422, truncated JPEG -> 422, 25 MiB body -> 413) and a last request that must
still succeed. Latency is measured at the client (upload, decode, preprocessing, model, JSON).

    python bench/serve_latency.py runs/quality-xception --n 200
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx2 as httpx  # the maintained httpx (what starlette's TestClient uses too)

from _common import (
    CLI,
    FULLRES_DIR,
    Timer,
    add_json_argument,
    emit,
    fail,
    free_port,
    latency_stats,
    peak_rss_mb,
    require_dir,
    require_run,
)

PREDICT = "/v1/predict"
OVERSIZE_BYTES = 25 * 2**20  # over the server's default 20 MiB limit


def last_line(log: Path) -> str:
    """The server's last error line (else its last line), for a one-line failure message."""
    lines = log.read_text(errors="replace").strip().splitlines()
    errors = [line for line in lines if line.lower().startswith("error")]
    return (errors or lines or ["no output"])[-1].strip()


def wait_until_healthy(client: httpx.Client, server: subprocess.Popen, log: Path, timeout: float) -> float:
    """Seconds until ``/health`` answers 200; exit with the server's last log line if it dies."""
    with Timer() as timer:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if server.poll() is not None:
                fail(f"the server exited with code {server.returncode}: {last_line(log)}")
            try:
                if client.get("/health", timeout=5.0).status_code == 200:
                    break
            except httpx.TransportError:
                pass  # not listening yet
            time.sleep(0.5)
        else:
            fail(f"the server did not answer /health within {timeout:.0f} s: {last_line(log)}")
    return timer.seconds


def post(client: httpx.Client, name: str, data: bytes, **params: str) -> tuple[int | str, dict, float]:
    """(status or transport error name, JSON body or {}, seconds) of one upload."""
    started = time.perf_counter()
    try:
        response = client.post(
            PREDICT, files={"file": (name, data, "application/octet-stream")}, params=params
        )
    except httpx.TransportError as e:  # a server may close the socket on a huge body
        return type(e).__name__, {}, time.perf_counter() - started
    seconds = time.perf_counter() - started
    try:
        body = response.json()
    except ValueError:
        body = {}
    return response.status_code, body, seconds


def is_prediction(status: int | str, body: dict, heatmap: bool = False) -> bool:
    probability = body.get("probability")
    ok = status == 200 and isinstance(probability, int | float) and 0.0 <= probability <= 1.0
    return ok and (not heatmap or bool(body.get("heatmap_png_base64")))


def timed_requests(
    client: httpx.Client, images: list[tuple[str, bytes]], n: int, *, heatmap: bool
) -> tuple[list[float], int, float]:
    """Latencies of ``n`` sequential predictions, the number of bad answers, and the total time."""
    params = {"heatmap": "true"} if heatmap else {}
    latencies, bad = [], 0
    with Timer() as total:
        for i in range(n):
            name, data = images[i % len(images)]
            status, body, seconds = post(client, name, data, **params)
            latencies.append(seconds)
            bad += not is_prediction(status, body, heatmap)
    return latencies, bad, total.seconds


def bad_uploads(jpeg: bytes) -> list[tuple[str, str, bytes, int]]:
    """(case, filename, body, expected status) for each class of bad upload."""
    return [
        ("text_as_png", "notes.png", b"this is not an image\n" * 20, 415),
        ("empty", "empty.png", b"", 422),
        ("truncated_jpeg", "cut.jpeg", jpeg[: len(jpeg) // 2], 422),
        ("oversize_25mib", "huge.jpeg", b"\xff\xd8\xff" + bytes(OVERSIZE_BYTES), 413),
    ]


def load_images(folder: Path) -> list[tuple[str, bytes]]:
    from cxr_pneumonia.io import list_image_files

    return [(p.name, p.read_bytes()) for p in list_image_files(folder)]


def measure(
    client: httpx.Client, images: list[tuple[str, bytes]], jpeg: bytes, n: int, n_heatmap: int
) -> dict[str, Any]:
    """Warm-up, timed predictions with and without heatmaps, bad uploads, health afterwards."""
    name, data = images[0]
    status, body, first = post(client, name, data)
    first_ok = is_prediction(status, body)
    results: dict[str, Any] = {"first_request_ms": round(first * 1000, 1)}
    for key, count, heatmap in (("predict", n, False), ("predict_heatmap", n_heatmap, True)):
        if heatmap:  # the first Grad-CAM builds the explainer: warm it up outside the timing
            status, body, seconds = post(client, name, data, heatmap="true")
            results["first_heatmap_ms"] = round(seconds * 1000, 1)
        latencies, bad, total = timed_requests(client, images, count, heatmap=heatmap)
        results[key] = {
            "n": count,
            "n_bad": bad,
            "requests_per_s": round(count / total, 2),
            **latency_stats(latencies),
        }
    results["bad_uploads"] = {}
    for case, filename, payload, expected in bad_uploads(jpeg):
        status, body, _ = post(client, filename, payload)
        results["bad_uploads"][case] = {
            "status": status,
            "expected": expected,
            "ok": status == expected,
            "detail": str(body.get("detail", ""))[:120],
        }
    try:
        health_ok = client.get("/health").status_code == 200
    except httpx.TransportError:
        health_ok = False
    status, body, _ = post(client, name, data)
    results["healthy_after"] = health_ok and is_prediction(status, body)
    results["checks"] = {
        "first_request_200": first_ok,
        "all_predictions_200": results["predict"]["n_bad"] == 0,
        "all_heatmaps_200": results["predict_heatmap"]["n_bad"] == 0,
        **{f"bad_upload_{case}": row["ok"] for case, row in results["bad_uploads"].items()},
        "healthy_after_bad_uploads": results["healthy_after"],
    }
    return results


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("run", type=Path, help="Run directory.")
    parser.add_argument("--images", type=Path, default=FULLRES_DIR, help="Folder of images to send.")
    parser.add_argument("--n", type=int, default=200, help="Sequential prediction requests.")
    parser.add_argument("--n-heatmap", type=int, default=40, help="Sequential requests with heatmap=true.")
    parser.add_argument("--port", type=int, default=0, help="Port on 127.0.0.1 (0: a free one).")
    parser.add_argument("--startup-timeout", type=float, default=300.0, help="Seconds to wait for /health.")
    add_json_argument(parser)
    args = parser.parse_args()
    if args.n < 1 or args.n_heatmap < 1:
        fail("--n and --n-heatmap must be >= 1")
    run = require_run(args.run)
    images = load_images(require_dir(args.images, "image folder"))
    if not images:
        fail(f"{args.images}: no images found")
    jpegs = [data for _, data in images if data.startswith(b"\xff\xd8\xff")]
    if not jpegs:
        fail(f"{args.images}: no JPEG to cut short for the truncated-upload check")
    port = args.port or free_port()
    base = f"http://127.0.0.1:{port}"

    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        log = Path(tmp) / "server.log"
        command = [*CLI, "serve", str(run), "--host", "127.0.0.1", "--port", str(port)]
        with open(log, "wb") as log_file:
            server = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT)
        # trust_env=False: a proxy from the environment must never see loopback traffic.
        client = httpx.Client(base_url=base, timeout=120.0, trust_env=False)
        try:
            startup_s = wait_until_healthy(client, server, log, args.startup_timeout)
            figures = measure(client, images, jpegs[0], args.n, args.n_heatmap)
        finally:
            client.close()
            server.send_signal(signal.SIGINT)  # uvicorn's graceful shutdown
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
    figures.update(
        run=str(run),
        images=str(args.images),
        n_images=len(images),
        startup_s=round(startup_s, 1),
        server_peak_rss_mb=round(peak_rss_mb("children"), 1),
    )
    plain, heat = figures["predict"], figures["predict_heatmap"]
    summary = [
        f"server {run} up in {figures['startup_s']} s; first request {figures['first_request_ms']} ms",
        f"{args.n} sequential predictions: p50 {plain['p50_ms']} ms, p95 {plain['p95_ms']} ms, "
        f"max {plain['max_ms']} ms, {plain['requests_per_s']} requests/s, {plain['n_bad']} bad answers",
        f"{args.n_heatmap} with heatmap: p50 {heat['p50_ms']} ms, p95 {heat['p95_ms']} ms, "
        f"{heat['n_bad']} bad answers",
        "bad uploads: "
        + ", ".join(
            f"{k} -> {v['status']} ({'ok' if v['ok'] else 'expected ' + str(v['expected'])})"
            for k, v in figures["bad_uploads"].items()
        ),
        f"healthy afterwards: {figures['healthy_after']}; "
        f"server peak RSS {figures['server_peak_rss_mb']} MiB",
    ]
    emit(figures, summary, args.json)
    failed = [name for name, ok in figures["checks"].items() if not ok]
    if failed:
        fail(f"checks failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
