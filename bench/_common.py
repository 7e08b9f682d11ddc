"""Helpers shared by the benchmark scripts: paths, peak memory, timing, sub-processes, output.

Every script prints a short human-readable summary and then its figures as one JSON object
(also written to ``--json PATH`` when given). Speed figures are ratios of two measurements
taken in the same run on the same machine.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn

import numpy as np

# TensorFlow's C++ start-up chatter would bury the figures; set before anything imports TF
# (child processes inherit it).
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = REPO_ROOT.parent / "shared"
FULLRES_DIR = SHARED / "data" / "kermany-fullres"
KERMANY224_TRAIN = SHARED / "data" / "kermany224" / "train"
CLI = (sys.executable, "-m", "cxr_pneumonia.cli")


def fail(message: str, code: int = 1) -> NoReturn:
    """One line on stderr, then exit non-zero."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


def require_dir(path: Path, what: str) -> Path:
    if not Path(path).is_dir():
        fail(f"{path}: {what} not found (no such folder)")
    return Path(path)


def require_run(path: Path) -> Path:
    """A complete run directory (``model.keras`` is written last), or exit."""
    if not (Path(path) / "model.keras").is_file():
        fail(f"{path}: not a trained run directory (no model.keras)")
    return Path(path)


def peak_rss_mb(who: str = "self") -> float:
    """Peak resident memory in MiB of this process (``"self"``) or of its waited-for children.

    ``ru_maxrss`` of ``RUSAGE_CHILDREN`` is the largest single child, not a sum.
    """
    which = resource.RUSAGE_SELF if who == "self" else resource.RUSAGE_CHILDREN
    maxrss = resource.getrusage(which).ru_maxrss
    return maxrss / 2**20 if sys.platform == "darwin" else maxrss / 1024  # bytes on macOS, KiB on Linux


def cpu_seconds() -> float:
    """User + system CPU time of this process so far."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class Timer:
    """``with Timer() as t: ...`` then ``t.seconds``."""

    def __enter__(self) -> Timer:
        self.start = time.perf_counter()
        self.seconds = 0.0
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self.start


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or not denominator:
        return None
    return round(numerator / denominator, 2)


def per_second(count: int, seconds: float | None) -> float | None:
    return round(count / seconds, 2) if seconds else None


def latency_stats(seconds: Sequence[float]) -> dict[str, float]:
    """p50 / p95 / max / mean in milliseconds."""
    ms = np.asarray(seconds, dtype=np.float64) * 1000.0
    return {
        "p50_ms": round(float(np.percentile(ms, 50)), 1),
        "p95_ms": round(float(np.percentile(ms, 95)), 1),
        "max_ms": round(float(ms.max()), 1),
        "mean_ms": round(float(ms.mean()), 1),
    }


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def warm_page_cache(paths: Iterable[Path]) -> None:
    """Read every file once, so neither side of a comparison pays the first disk read."""
    for path in paths:
        Path(path).read_bytes()


def run_side(script: Path, args: Sequence[str], json_path: Path, *, label: str) -> dict[str, Any]:
    """Run ``script`` again in a fresh interpreter (own ``ru_maxrss``) and read its figures.

    The child's output goes to our stderr, so our stdout keeps only the summary and the JSON.
    """
    command = [sys.executable, str(script), *args, "--json", str(json_path)]
    result = subprocess.run(command, stdout=sys.stderr, check=False)
    if result.returncode != 0 or not json_path.is_file():
        fail(f"{label}: the child process failed (exit {result.returncode}); see its output above")
    return json.loads(json_path.read_text(encoding="utf-8"))


def add_json_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", type=Path, default=None, help="Also write the figures to this file.")


def emit(figures: dict[str, Any], summary: Sequence[str], json_path: Path | None = None) -> None:
    """Print the summary lines, then the figures as one JSON object (the last thing on stdout)."""
    text = json.dumps(figures, indent=2, sort_keys=True, default=str)
    if json_path is not None:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(text + "\n", encoding="utf-8")
    for line in summary:
        print(line)
    print(text, flush=True)


@contextmanager
def child_figures(json_path: Path | None) -> Iterator[dict[str, Any]]:
    """For a ``--side`` child: collect figures, then write them (with peak RSS and CPU time)."""
    figures: dict[str, Any] = {}
    yield figures
    figures.update(peak_rss_mb=round(peak_rss_mb("self"), 1), cpu_s=round(cpu_seconds(), 1))
    emit(figures, [], json_path)


def paired_patient_bootstrap(
    y: np.ndarray,
    patients: np.ndarray,
    columns: dict[str, np.ndarray],
    n_bootstrap: int = 1000,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """ROC-AUC of every column on the same patient resamples, from the package's bootstrap
    (``evaluate.bootstrap_auc``, the one behind every interval ``evaluate`` reports): its
    resamples depend on labels, patients and seed only, so the columns' values are paired."""
    from cxr_pneumonia.evaluate import bootstrap_auc

    return {
        name: bootstrap_auc(y, scores, groups=patients, n_bootstrap=n_bootstrap, seed=seed)
        for name, scores in columns.items()
    }


def interval95(values: np.ndarray) -> list[float]:
    return [round(float(v), 4) for v in np.percentile(values, [2.5, 97.5])]
