"""Serving throughput and latency under concurrent clients: batching on and off, 1 or N workers.

For each server setting (every combination of ``--max-batch`` and ``--workers``) it starts
``cxr-pneumonia serve RUN`` on a free loopback port (``--token-file`` passed through), waits for
``/health`` and warms up; then, for each level of ``--clients`` (default 1, 16, 64), that many
clients post ``--n`` images in all (at least 2 per client), each client sending its next
request as soon as its answer comes (a closed loop, as `wrk` or `hey -c` do), cycling over the
images of ``--images``. Every answer must be 200 with a probability in [0, 1] (or a rejection).
Latency is measured at the client: upload, decoding, preprocessing, waiting for a batch, the
model and the JSON.

The acceptance figure is ``speedup_16_vs_1``: requests/s with 16 clients ÷ with 1, on the same
server and machine (≥ 1.6). The clients run on the same machine as the server and take CPU too.

After the concurrency levels, the first setting also sends ``--n-heatmap`` sequential
``?heatmap=true`` requests, one upload of each bad class (text named .png -> 415, empty -> 422,
truncated JPEG -> 422, 25 MiB body -> 413) and a last request that must still succeed.

    python bench/serve_latency.py runs/xception-default                     # batching, 1 worker
    python bench/serve_latency.py runs/xception-default --max-batch 16,1 --workers 1,2
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
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
    ratio,
    require_dir,
    require_run,
)

PREDICT = "/v1/predict"
OVERSIZE_BYTES = 25 * 2**20  # over the server's default 20 MiB limit
Images = list[tuple[str, bytes]]


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


def is_prediction(status: int | str, body: dict, heatmap: bool = False) -> bool:
    """A 200 with a probability in [0, 1] (with a heatmap when asked), or a gate rejection."""
    probability = body.get("probability")
    if status == 200 and body.get("status") == "rejected" and not heatmap:
        return True
    ok = status == 200 and isinstance(probability, int | float) and 0.0 <= probability <= 1.0
    return ok and (not heatmap or bool(body.get("heatmap_png_base64")))


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


async def closed_loop(
    base: str, headers: dict[str, str], images: Images, clients: int, n: int
) -> tuple[list[float], int, float]:
    """``clients`` concurrent clients post ``n`` images in all; (latencies, bad answers, seconds)."""
    counter = itertools.count()
    latencies: list[float] = []
    bad = 0
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(
        base_url=base, headers=headers, timeout=600.0, limits=limits, trust_env=False
    ) as client:

        async def one_client() -> None:
            nonlocal bad
            while (i := next(counter)) < n:
                name, data = images[i % len(images)]
                started = time.perf_counter()
                try:
                    response = await client.post(
                        PREDICT, files={"file": (name, data, "application/octet-stream")}
                    )
                    ok = is_prediction(response.status_code, response.json())
                except (httpx.TransportError, ValueError):
                    ok = False
                latencies.append(time.perf_counter() - started)
                bad += not ok

        with Timer() as total:
            await asyncio.gather(*(one_client() for _ in range(clients)))
    return latencies, bad, total.seconds


def concurrency_levels(base: str, headers: dict[str, str], images: Images, levels: list[int], n: int) -> dict:
    """Throughput and latency at each level of concurrent clients, after a warm-up burst."""
    # Warm-up: the first requests trace the model; a burst then meets every batch size once.
    asyncio.run(closed_loop(base, headers, images, 1, 4))
    asyncio.run(closed_loop(base, headers, images, max(levels), 2 * max(levels)))
    results = {}
    for clients in levels:
        count = max(n, 2 * clients)
        latencies, bad, seconds = asyncio.run(closed_loop(base, headers, images, clients, count))
        results[str(clients)] = {
            "clients": clients,
            "n": count,
            "n_bad": bad,
            "requests_per_s": round(count / seconds, 2),
            **latency_stats(latencies),
        }
    return results


def bad_uploads(jpeg: bytes) -> list[tuple[str, str, bytes, int]]:
    """(case, filename, body, expected status) for each class of bad upload."""
    return [
        ("text_as_png", "notes.png", b"this is not an image\n" * 20, 415),
        ("empty", "empty.png", b"", 422),
        ("truncated_jpeg", "cut.jpeg", jpeg[: len(jpeg) // 2], 422),
        ("oversize_25mib", "huge.jpeg", b"\xff\xd8\xff" + bytes(OVERSIZE_BYTES), 413),
    ]


def robustness(client: httpx.Client, images: Images, jpeg: bytes, n_heatmap: int) -> dict[str, Any]:
    """Sequential heatmaps, each bad upload class, then a request that must still succeed."""
    name, data = images[0]
    results: dict[str, Any] = {}
    if n_heatmap:
        status, body, first = post(client, name, data, heatmap="true")  # builds Grad-CAM
        latencies, bad = [], int(not is_prediction(status, body, heatmap=True))
        for i in range(n_heatmap):
            status, body, seconds = post(client, *images[i % len(images)], heatmap="true")
            latencies.append(seconds)
            bad += not is_prediction(status, body, heatmap=True)
        results["heatmap"] = {"n": n_heatmap, "n_bad": bad, "first_ms": round(first * 1000, 1)}
        results["heatmap"].update(latency_stats(latencies))
    results["bad_uploads"] = {}
    for case, filename, payload, expected in bad_uploads(jpeg):
        status, body, _ = post(client, filename, payload)
        results["bad_uploads"][case] = {"status": status, "expected": expected, "ok": status == expected}
    try:
        health_ok = client.get("/health").status_code == 200
    except httpx.TransportError:
        health_ok = False
    status, body, _ = post(client, name, data)
    results["healthy_after"] = health_ok and is_prediction(status, body)
    return results


@contextmanager
def running_server(run: Path, options: list[str], startup_timeout: float) -> Iterator[tuple[str, float]]:
    """``cxr-pneumonia serve RUN OPTIONS`` on a free loopback port: (base URL, startup seconds)."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        log = Path(tmp) / "server.log"
        command = [*CLI, "serve", str(run), "--host", "127.0.0.1", "--port", str(port), *options]
        with open(log, "wb") as log_file:
            server = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT)
        try:
            with httpx.Client(base_url=base, timeout=60.0, trust_env=False) as probe:
                startup = wait_until_healthy(probe, server, log, startup_timeout)
            yield base, startup
        finally:
            server.send_signal(signal.SIGINT)  # uvicorn's graceful shutdown (workers too)
            try:
                server.wait(timeout=60)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()


def measure_setting(
    args: argparse.Namespace, images: Images, jpeg: bytes, *, max_batch: int, workers: int, first: bool
) -> dict[str, Any]:
    """One server setting: its concurrency levels (and, for the first, the robustness checks)."""
    options = [
        "--max-batch",
        str(max_batch),
        "--max-wait-ms",
        str(args.max_wait_ms),
        "--workers",
        str(workers),
    ]
    if args.threads is not None:
        options += ["--threads", str(args.threads)]
    headers = {}
    if args.token_file is not None:
        options += ["--token-file", str(args.token_file)]
        headers["Authorization"] = f"Bearer {args.token_file.read_text().strip()}"
    with running_server(args.run, options, args.startup_timeout) as (base, startup):
        figures: dict[str, Any] = {"max_batch": max_batch, "workers": workers, "startup_s": round(startup, 1)}
        figures["levels"] = concurrency_levels(base, headers, images, args.clients, args.n)
        if first:
            with httpx.Client(base_url=base, headers=headers, timeout=300.0, trust_env=False) as client:
                figures.update(robustness(client, images, jpeg, args.n_heatmap))
    levels = figures["levels"]
    rate = {k: v["requests_per_s"] for k, v in levels.items()}
    if "1" in rate and "16" in rate:
        figures["speedup_16_vs_1"] = ratio(rate["16"], rate["1"])
    return figures


def summary_lines(run: Path, settings: list[dict[str, Any]]) -> list[str]:
    lines = [f"server {run}: requests/s (p50 / p95 ms) by concurrent clients"]
    for s in settings:
        cells = []
        for k, v in s["levels"].items():
            bad = f" ({v['n_bad']} BAD)" if v["n_bad"] else ""
            cells.append(f"{k} clients {v['requests_per_s']} ({v['p50_ms']:.0f} / {v['p95_ms']:.0f}){bad}")
        speedup = f"; 16 vs 1 clients: {s['speedup_16_vs_1']}x" if "speedup_16_vs_1" in s else ""
        lines.append(f"  max-batch {s['max_batch']}, {s['workers']} worker(s): " + ", ".join(cells) + speedup)
        if "bad_uploads" in s:
            lines.append(
                "  bad uploads: "
                + ", ".join(f"{k} -> {v['status']}" for k, v in s["bad_uploads"].items())
                + f"; healthy afterwards: {s['healthy_after']}"
            )
    return lines


def checks(settings: list[dict[str, Any]]) -> dict[str, bool]:
    """Every answer good, every bad upload refused with its code, healthy afterwards."""
    result = {}
    for s in settings:
        tag = f"b{s['max_batch']}_w{s['workers']}"
        result[f"{tag}_all_answers_good"] = all(v["n_bad"] == 0 for v in s["levels"].values())
        if "bad_uploads" in s:
            result.update({f"bad_upload_{k}": v["ok"] for k, v in s["bad_uploads"].items()})
            result["healthy_after_bad_uploads"] = s["healthy_after"]
            if "heatmap" in s:
                result["all_heatmaps_good"] = s["heatmap"]["n_bad"] == 0
    return result


def int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected integers >= 1, got {text!r}")
    return values


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("run", type=Path, help="Run directory.")
    parser.add_argument("--images", type=Path, default=FULLRES_DIR, help="Folder of images to send.")
    parser.add_argument("--clients", type=int_list, default=[1, 16, 64], help="Concurrency levels (1,16,64).")
    parser.add_argument("--n", type=int, default=128, help="Requests per level (at least 2 per client).")
    parser.add_argument("--max-batch", type=int_list, default=[16], help="Server --max-batch values (16,1).")
    parser.add_argument("--max-wait-ms", type=float, default=5.0, help="Server --max-wait-ms.")
    parser.add_argument("--workers", type=int_list, default=[1], help="Server --workers values (1,2).")
    parser.add_argument(
        "--threads", type=int, default=None, help="Server --threads (default: cores / workers)."
    )
    parser.add_argument("--token-file", type=Path, default=None, help="Serve with this bearer token.")
    parser.add_argument("--n-heatmap", type=int, default=20, help="Sequential heatmap requests (0: none).")
    parser.add_argument("--startup-timeout", type=float, default=300.0, help="Seconds to wait for /health.")
    add_json_argument(parser)
    args = parser.parse_args()
    if args.n < 1 or args.n_heatmap < 0:
        fail("--n must be >= 1 and --n-heatmap >= 0")
    args.run = require_run(args.run)
    images = [(p.name, p.read_bytes()) for p in list_images(require_dir(args.images, "image folder"))]
    jpegs = [data for _, data in images if data.startswith(b"\xff\xd8\xff")]
    if not jpegs:
        fail(f"{args.images}: no JPEG images (one is cut short for the truncated-upload check)")
    settings = [
        measure_setting(args, images, jpegs[0], max_batch=b, workers=w, first=i == 0)
        for i, (b, w) in enumerate(itertools.product(args.max_batch, args.workers))
    ]
    figures = {
        "run": str(args.run),
        "images": str(args.images),
        "n_images": len(images),
        "settings": settings,
        "server_peak_rss_mb": round(peak_rss_mb("children"), 1),
        "checks": checks(settings),
    }
    emit(figures, summary_lines(args.run, settings), args.json)
    failed = [name for name, ok in figures["checks"].items() if not ok]
    if failed:
        fail(f"checks failed: {', '.join(failed)}")


def list_images(folder: Path) -> list[Path]:
    from cxr_pneumonia.io import list_image_files

    return list_image_files(folder)


if __name__ == "__main__":
    main()
