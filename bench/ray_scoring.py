"""Archive scoring on Ray Data (`predict --engine ray`) against plain `predict`, and a killed job.

All sides score the same images (``--images``, the first ``--limit`` of them in listing order),
each in its own fresh process, with the same runtime (``--runtime``):

* plain: ``Run.load(RUN, runtime=...).predict_paths(paths)``, what the ``predict`` command runs
  (decoding threads beside the model, every core for the model);
* ray-1: ``archive.score_archive`` on a local Ray with 1 model actor held to one core (Ray
  ``num_cpus=1``, TensorFlow/OpenVINO/OpenMP threads 1), decoding in Ray tasks;
* ray-2: the same with 2 actors, each held to one core;
* ray-machine: the engine's defaults on this machine (one single-threaded actor per core).

Reported per side: end-to-end seconds (process start to answer: TensorFlow import, Ray start,
model loads), plain's steady rate (the timed ``predict_paths`` after a warm-up batch), the largest
|Δp| against plain, and whether the Parquet has one row per image. The ratios are end to end,
start-up included: Ray hands parts back in bursts, so rates taken from part times mislead. Then, unless
``--no-kill-test``, a job started from the command line is killed (SIGKILL to its process group)
as soon as its first part is on disk, and rerun: every image must end up scored exactly once.

    python bench/ray_scoring.py runs/xception-default            # 5,216 shared train images
    nice -n 10 python bench/ray_scoring.py RUN --limit 200       # a quick look
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from _common import (
    CLI,
    KERMANY224_TRAIN,
    Timer,
    add_json_argument,
    child_figures,
    emit,
    per_second,
    ratio,
    require_dir,
    require_run,
    run_side,
    warm_page_cache,
)

SIDES = {"ray-1": (1, 1), "ray-2": (2, 1), "ray-machine": (None, 1)}  # (actors, threads each)


def plain_side(args: argparse.Namespace, paths: list[str], figures: dict[str, Any]) -> dict[str, float]:
    from cxr_pneumonia.predict import Run

    run = Run.load(args.run, runtime=args.runtime)
    figures["runtime"] = run.runtime
    run.predict_paths(paths[: args.batch_size + 1], batch_size=args.batch_size)  # traces, warms
    with Timer() as timed:
        predictions = run.predict_paths(paths, batch_size=args.batch_size)
    figures.update(
        steady_images_per_s=per_second(len(paths), timed.seconds), predict_s=round(timed.seconds, 1)
    )
    return {p.path: np.nan if p.probability is None else p.probability for p in predictions}


def ray_side(args: argparse.Namespace, paths: list[str], figures: dict[str, Any]) -> dict[str, float]:
    import pandas as pd

    from cxr_pneumonia.archive import PARTS_DIR, ArchiveConfig, score_archive

    workers, threads = SIDES[args.side]
    cfg = ArchiveConfig(runtime=args.runtime, batch_size=args.batch_size, workers=workers, threads=threads)
    summary = score_archive(args.run, paths, args.out, cfg)
    parts = sorted((args.out / PARTS_DIR).glob("part-*.parquet"))
    stamps = [int(p.name.split("-")[1]) / 1e9 for p in parts]
    table = pd.read_parquet(summary.predictions)
    figures.update(
        workers=summary.workers,
        threads=threads,
        parts=len(parts),
        rows_equal_images=bool(len(table) == len(paths) == table["path"].nunique()),
        first_part_s=round(stamps[0] - START_EPOCH, 1) if stamps else None,  # start-up + one part
        job_s=summary.seconds,
    )
    return dict(zip(table["path"], table["probability"].astype(float), strict=True))


def kill_test(args: argparse.Namespace, paths_file: Path, folder: Path, work: Path) -> dict[str, Any]:
    """Kill a CLI job as soon as its first part is written, rerun it, check every image once."""
    from cxr_pneumonia.archive import PARTS_DIR, read_parts

    out = work / "killed"
    command = [*CLI, "predict", str(args.run), str(folder), "--engine", "ray", "--out", str(out)]
    # Forward passes of 8 (Ray hands an actor whole blocks until it has that many): parts stay
    # small, so the kill lands mid-job even with --limit.
    command += ["--runtime", args.runtime, "--workers", "2", "--batch-size", "8"]
    n = len(paths_file.read_text().splitlines())
    job = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    deadline = time.monotonic() + 3600
    while job.poll() is None and time.monotonic() < deadline:
        if list((out / PARTS_DIR).glob("part-*.parquet")) if (out / PARTS_DIR).is_dir() else []:
            break
        time.sleep(0.2)
    killed_at = len(read_parts(out))
    os.killpg(job.pid, signal.SIGKILL)  # the driver, its local Ray and the actors, as a crash would
    job.wait()
    rerun = subprocess.run(command, capture_output=True, text=True, check=False)
    found = re.search(r"(\d+) predictions in .* \((\d+) scored now, (\d+) already scored", rerun.stderr)
    every_row = read_parts(out)
    return {
        "rows_on_disk_when_killed": killed_at,
        "killed_before_the_end": killed_at < n,
        "rerun_exit": rerun.returncode,
        "rerun_scored": int(found.group(2)) if found else None,
        "rerun_reused": int(found.group(3)) if found else None,
        "every_image_once": bool(
            found and int(found.group(1)) == n and every_row["path"].value_counts().max() == 1
        ),
    }


def subset_folder(images: Path, limit: int, work: Path) -> tuple[Path, list[str]]:
    """The images to score: the folder itself, or a folder of links to its first ``limit``."""
    from cxr_pneumonia.io import list_image_files

    files = list_image_files(images)
    if not 0 < limit < len(files):
        return images, [str(p) for p in files]
    folder = work / "images"
    for path in files[:limit]:
        link = folder / path.relative_to(images)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(path)
    return folder, [str(p) for p in list_image_files(folder)]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("run", type=Path, help="Run directory (export it first to measure the fast path).")
    parser.add_argument("--images", type=Path, default=KERMANY224_TRAIN, help="Image folder.")
    parser.add_argument("--limit", type=int, default=0, help="Score only the first N images (0: all).")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--runtime", choices=("auto", "keras", "openvino"), default="auto")
    parser.add_argument("--no-kill-test", action="store_true", help="Skip the killed-and-rerun job.")
    parser.add_argument("--side", choices=("plain", *SIDES), help=argparse.SUPPRESS)
    parser.add_argument("--paths", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    add_json_argument(parser)
    args = parser.parse_args()
    require_run(args.run)

    if args.side is not None:
        paths = args.paths.read_text(encoding="utf-8").splitlines()
        with child_figures(args.json) as figures:
            scores = (plain_side if args.side == "plain" else ray_side)(args, paths, figures)
            figures["wall_s"] = round(time.perf_counter() - START, 2)  # from this process's start
        np.save(args.json.with_suffix(".npy"), np.array([scores[p] for p in paths], dtype=np.float64))
        return

    require_dir(args.images, "image folder")
    with tempfile.TemporaryDirectory(prefix="bench-ray-") as tmp:
        work = Path(tmp)
        folder, paths = subset_folder(args.images, args.limit, work)
        warm_page_cache(paths)
        (work / "paths.txt").write_text("\n".join(paths) + "\n", encoding="utf-8")
        sides, scores = {}, {}
        for side in ("plain", *SIDES):
            side_args = [str(args.run), "--side", side, "--paths", str(work / "paths.txt"), "--out",
                         str(work / side), "--batch-size", str(args.batch_size),
                         "--runtime", args.runtime]  # fmt: skip
            sides[side] = run_side(Path(__file__), side_args, work / f"{side}.json", label=side)
            scores[side] = np.load(work / f"{side}.npy")
        killed = None if args.no_kill_test else kill_test(args, work / "paths.txt", folder, work)
    emit(*figures_and_summary(args, paths, sides, scores, killed), args.json)


def figures_and_summary(
    args: argparse.Namespace, paths: list[str], sides: dict, scores: dict, killed: dict | None
) -> tuple[dict[str, Any], list[str]]:
    plain = scores["plain"]
    for side in SIDES:
        both = ~np.isnan(plain) & ~np.isnan(scores[side])
        same_gaps = bool(np.array_equal(np.isnan(plain), np.isnan(scores[side])))
        sides[side]["max_abs_probability_diff"] = float(np.max(np.abs(plain[both] - scores[side][both])))
        sides[side]["same_images_without_probability"] = same_gaps
    wall = {side: sides[side]["wall_s"] for side in sides}
    figures = {
        "run": str(args.run),
        "images": str(args.images),
        "n_images": len(paths),
        "cpus": len(os.sched_getaffinity(0)),
        "sides": sides,
        "two_vs_one_worker_end_to_end": ratio(wall["ray-1"], wall["ray-2"]),
        "machine_vs_plain_end_to_end": ratio(wall["plain"], wall["ray-machine"]),
        "kill_test": killed,
    }
    summary = [f"{len(paths)} images of {args.images}, {figures['cpus']} CPUs, runtime {args.runtime}"]
    for side, values in sides.items():
        extra = f" (steady {values['steady_images_per_s']} img/s)" if side == "plain" else (
            f", {values['workers']} actor(s) × {values['threads']} thread(s), |Δp| ≤ "
            f"{values['max_abs_probability_diff']:.2g}, rows = images: {values['rows_equal_images']}"
        )  # fmt: skip
        summary.append(f"{side}: end to end {values['wall_s']} s{extra}")
    summary.append(
        f"end to end: 2 workers vs 1 {figures['two_vs_one_worker_end_to_end']}×; whole machine vs plain "
        f"predict {figures['machine_vs_plain_end_to_end']}×"
    )
    if killed:
        summary.append(f"killed with {killed['rows_on_disk_when_killed']} rows on disk, rerun: {killed}")
    return figures, summary


START, START_EPOCH = time.perf_counter(), time.time()

if __name__ == "__main__":
    main()
