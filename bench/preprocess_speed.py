"""Preprocessing speed: 1 worker against N workers, and a rerun that finds everything done.

Runs ``cxr-pneumonia preprocess SRC DST --workers W`` as a fresh process each time (the CLI
forks its workers, which is only safe from a fresh process) into new temporary folders, best of
``--repeat``, then reruns it into an output that is already complete (expects 0 processed).

Two times per run: the wall time of the whole command (interpreter start-up, imports, hashing,
writing the manifest) and the batch time the CLI itself reports in its summary line
("... processed, ..., X.X s"), which is the image work only.

    python bench/preprocess_speed.py ../shared/data/kermany-fullres --workers 2 --repeat 3
"""

from __future__ import annotations

import argparse
import re
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from _common import (
    CLI,
    FULLRES_DIR,
    Timer,
    add_json_argument,
    emit,
    fail,
    per_second,
    ratio,
    require_dir,
)

# The CLI's last line: "DST: 40 processed, 0 skipped (already done), 0 failed, ..., 12.3 s"
SUMMARY = re.compile(r"(\d+) processed, (\d+) skipped .*?(\d+) failed.*?([\d.]+) s\s*$", re.MULTILINE)


def run_preprocess(src: Path, dst: Path, workers: int) -> dict[str, Any]:
    """One CLI run: wall time, the CLI's batch time and its counts."""
    command = [*CLI, "preprocess", str(src), str(dst), "--workers", str(workers)]
    with Timer() as timer:
        result = subprocess.run(command, capture_output=True, text=True, check=False)
    match = SUMMARY.search(result.stdout)
    if result.returncode not in (0, 2) or match is None:
        tail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no output"]
        fail(f"preprocess {src} -> {dst} failed (exit {result.returncode}): {tail[0]}")
    processed, skipped, failed, batch = match.groups()
    return {
        "wall_s": round(timer.seconds, 3),
        "batch_s": float(batch),
        "processed": int(processed),
        "skipped": int(skipped),
        "failed": int(failed),
    }


def best_of(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Fastest wall time and fastest batch time (each its own minimum) and the counts of the first."""
    return {
        **runs[0],
        "wall_s": min(r["wall_s"] for r in runs),
        "batch_s": min(r["batch_s"] for r in runs),
        "wall_s_all": [r["wall_s"] for r in runs],
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("src", nargs="?", type=Path, default=FULLRES_DIR, help="Folder of images.")
    parser.add_argument("--workers", type=int, default=2, help="N for the N-worker runs (default 2).")
    parser.add_argument("--repeat", type=int, default=3, help="Runs per setting; the best counts.")
    add_json_argument(parser)
    args = parser.parse_args()
    src = require_dir(args.src, "image folder")
    if args.workers < 2 or args.repeat < 1:
        fail("--workers must be >= 2 and --repeat >= 1")

    with tempfile.TemporaryDirectory(prefix="bench-preprocess-") as tmp:
        results: dict[int, dict[str, Any]] = {}
        for workers in (1, args.workers):
            runs = [run_preprocess(src, Path(tmp) / f"w{workers}-{i}", workers) for i in range(args.repeat)]
            results[workers] = best_of(runs)
        # Rerun into the output of the last N-worker run: every file is already done.
        done = Path(tmp) / f"w{args.workers}-{args.repeat - 1}"
        first_wall = runs[-1]["wall_s"]
        reruns = best_of([run_preprocess(src, done, args.workers) for _ in range(args.repeat)])

    one, many = results[1], results[args.workers]
    n = one["processed"]
    figures = {
        "src": str(src),
        "n_images": n,
        "n_failed": one["failed"],
        "repeat": args.repeat,
        "workers": args.workers,
        "one_worker": {
            **one,
            "images_per_s_wall": per_second(n, one["wall_s"]),
            "images_per_s_batch": per_second(n, one["batch_s"]),
        },
        "n_workers": {
            **many,
            "images_per_s_wall": per_second(n, many["wall_s"]),
            "images_per_s_batch": per_second(n, many["batch_s"]),
        },
        "speedup_wall": ratio(one["wall_s"], many["wall_s"]),
        "speedup_batch": ratio(one["batch_s"], many["batch_s"]),
        "rerun": {**reruns, "first_run_wall_s": first_wall},
        "rerun_fraction_of_first": round(reruns["wall_s"] / first_wall, 3),
        "first_over_rerun": ratio(first_wall, reruns["wall_s"]),
    }
    summary = [
        f"{n} images from {src} ({one['failed']} failed), best of {args.repeat}",
        f"1 worker : {one['wall_s']:.2f} s wall, {one['batch_s']:.1f} s batch "
        f"({figures['one_worker']['images_per_s_batch']} images/s)",
        f"{args.workers} workers: {many['wall_s']:.2f} s wall, {many['batch_s']:.1f} s batch "
        f"({figures['n_workers']['images_per_s_batch']} images/s)",
        f"speed-up {args.workers}/1: {figures['speedup_batch']}× batch, {figures['speedup_wall']}× wall",
        f"rerun: {reruns['processed']} processed in {reruns['wall_s']:.2f} s wall = "
        f"{100 * figures['rerun_fraction_of_first']:.1f} % of the first run ({first_wall:.2f} s), "
        f"{figures['first_over_rerun']}× faster",
    ]
    emit(figures, summary, args.json)


if __name__ == "__main__":
    main()
