"""Preprocessing many files: the ``preprocess`` command's mirrored tree and training's cache.

Both run a list of :class:`FileJob` through a process pool (in-process for one worker), never
stopping on a bad file: failures are collected with their reason and written to ``failures.csv``.
A DICOM whose header declares something other than a frontal chest radiograph (a lateral view, a
CT, a knee: :func:`cxr_pneumonia.header.rejection_reason`) is left out the same way, with that
reason, so a PACS export's lateral images never train or calibrate a frontal model.
"""

from __future__ import annotations

import csv
import io
import logging
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

import cv2
from tqdm.auto import tqdm

from cxr_pneumonia.config import (
    atomic_write_bytes,
    atomic_write_text,
    config_hash,
    file_sha256_or_none,
    read_json,
    to_dict,
    write_json,
)
from cxr_pneumonia.header import rejection_reason
from cxr_pneumonia.io import (
    DEFAULT_MAX_PIXELS,
    ImageReadError,
    list_image_files,
    load_image_and_header,
    read_file,
)
from cxr_pneumonia.preprocess import PreprocessConfig, PreprocessError, build_pipeline

log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
FAILURES_NAME = "failures.csv"
CONFIG_NAME = "preprocess_config.json"

Outcome = tuple[str, str | None, bool]  # (source, error or None, fallback)


@dataclass(frozen=True)
class FileJob:
    """One source image and where its preprocessed PNG goes."""

    source: Path
    target: Path
    sha256: str


@dataclass
class BatchReport:
    """What a batch did: processed and skipped targets, and failures as (source, reason)."""

    processed: list[Path] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)
    failures: list[tuple[str, str]] = field(default_factory=list)
    fallbacks: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def n_total(self) -> int:
        """Every file the batch saw."""
        return len(self.processed) + len(self.skipped) + len(self.failures)

    def summary(self) -> str:
        """One line for the log and the command's output."""
        return (
            f"{len(self.processed)} processed, {len(self.skipped)} skipped (already done), "
            f"{len(self.failures)} failed, {len(self.fallbacks)} without a usable contour "
            f"(whole image kept), {self.seconds:.1f} s"
        )

    def record(self, job: FileJob, outcome: Outcome) -> None:
        """Count one job's outcome."""
        source, error, fallback = outcome
        if error is not None:
            self.failures.append((source, error))
            return
        self.processed.append(job.target)
        if fallback:
            self.fallbacks.append(source)


# ---------------------------------------------------------------------------------------------
# Workers
# ---------------------------------------------------------------------------------------------


def _process_one(job: FileJob, cfg: PreprocessConfig, max_pixels: int) -> Outcome:
    """Load, preprocess, write atomically. Returns (source, error, fallback); never raises."""
    try:
        img, header = load_image_and_header(job.source, max_pixels=max_pixels)
        declared = rejection_reason(header)
        if declared is not None:
            return str(job.source), f"left out: {declared}", False
        result = build_pipeline(cfg).run(img, source=str(job.source))
        ok, encoded = cv2.imencode(".png", result.image)
        if not ok:
            raise PreprocessError(f"PNG encoding failed for {job.source}")
        atomic_write_bytes(job.target, encoded.tobytes())
    except ImageReadError as e:
        return str(job.source), e.reason, False
    except PreprocessError as e:
        return str(job.source), str(e), False
    except Exception as e:  # a bad file must never stop the batch
        return str(job.source), f"unexpected {type(e).__name__}: {e}", False
    return str(job.source), None, result.fallback


def _process_chunk(jobs: list[FileJob], cfg: PreprocessConfig, max_pixels: int) -> list[Outcome]:
    """Worker body: a few files per task keeps inter-process overhead small next to the work."""
    return [_process_one(job, cfg, max_pixels) for job in jobs]


def _init_worker() -> None:
    # One OpenCV thread per process: N workers use N cores without oversubscription.
    cv2.setNumThreads(1)


def _pool_context(start_method: str | None) -> multiprocessing.context.BaseContext:
    """spawn by default: forking a process whose OpenCV or TensorFlow thread pools are running
    can deadlock the children. Callers that know their process is fresh (the CLI) pass "fork",
    which starts workers in milliseconds. As with any spawn pool, scripts calling this with
    workers > 1 need the usual ``if __name__ == "__main__":`` guard."""
    return multiprocessing.get_context(start_method or "spawn")


def default_workers() -> int:
    """The CPU cores this process may use."""
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def _run_in_process(
    jobs: list[FileJob], cfg: PreprocessConfig, max_pixels: int, report: BatchReport, bar: tqdm
) -> None:
    """One worker: the jobs run here, in order."""
    previous_threads = cv2.getNumThreads()
    _init_worker()  # as in a worker, so timings compare; the caller's setting is restored
    try:
        for job in jobs:
            report.record(job, _process_one(job, cfg, max_pixels))
            bar.update(1)
    finally:
        cv2.setNumThreads(previous_threads)


def _run_in_pool(
    jobs: list[FileJob],
    cfg: PreprocessConfig,
    max_pixels: int,
    report: BatchReport,
    bar: tqdm,
    *,
    workers: int,
    start_method: str | None,
) -> None:
    """Several workers: chunks of jobs run in a process pool, recorded as they finish."""
    with ProcessPoolExecutor(
        max_workers=workers, mp_context=_pool_context(start_method), initializer=_init_worker
    ) as pool:
        chunk = max(1, min(8, len(jobs) // (4 * workers)))
        chunks = [jobs[i : i + chunk] for i in range(0, len(jobs), chunk)]
        futures = {pool.submit(_process_chunk, part, cfg, max_pixels): part for part in chunks}
        for future in as_completed(futures):
            for job, outcome in zip(futures[future], future.result(), strict=True):
                report.record(job, outcome)
                bar.update(1)


def run_jobs(
    jobs: list[FileJob],
    cfg: PreprocessConfig,
    *,
    workers: int | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    progress: bool = True,
    description: str = "preprocessing",
    start_method: str | None = None,
) -> BatchReport:
    """Process ``jobs`` with ``workers`` processes (in-process when 1), never stopping on bad files."""
    report = BatchReport()
    workers = workers or default_workers()
    start = time.perf_counter()
    bar = tqdm(total=len(jobs), desc=description, unit="img", disable=not progress or not jobs)
    if workers == 1 or len(jobs) <= 1:
        _run_in_process(jobs, cfg, max_pixels, report, bar)
    else:
        _run_in_pool(jobs, cfg, max_pixels, report, bar, workers=workers, start_method=start_method)
    bar.close()
    report.seconds = time.perf_counter() - start
    return report


# ---------------------------------------------------------------------------------------------
# The `preprocess` command: a mirrored tree with a manifest
# ---------------------------------------------------------------------------------------------


def target_for(source: Path, src_root: Path, dst_root: Path) -> Path:
    """Mirror ``source``'s place under ``src_root`` into ``dst_root``, as PNG."""
    return (dst_root / source.relative_to(src_root)).with_suffix(".png")


def _load_manifest(path: Path, cfg_hash: str) -> dict[str, dict[str, str]]:
    """The manifest's entries when it was written under the same config, else none."""
    try:
        manifest = read_json(path)
    except (OSError, ValueError):
        return {}
    return manifest.get("entries", {}) if manifest.get("config_hash") == cfg_hash else {}


def _plan_tree(
    src: Path, dst: Path, done: dict[str, dict[str, str]], *, progress: bool
) -> tuple[list[FileJob], list[Path]]:
    """Jobs for every image not yet done (same content hash, output present), and the skipped targets."""
    sources = list_image_files(src)
    jobs, skipped = [], []
    for source in tqdm(sources, desc="hashing", unit="img", disable=not progress or len(sources) < 500):
        target = target_for(source, src, dst)
        # None: unreadable; its job fails on reading and lands in failures.csv, naming the file
        sha = file_sha256_or_none(source)
        if (
            sha is not None
            and done.get(target.relative_to(dst).as_posix(), {}).get("sha256") == sha
            and target.exists()
        ):
            skipped.append(target)
        else:
            jobs.append(FileJob(source, target, sha or ""))
    return jobs, skipped


def _manifest_entries(
    src: Path, dst: Path, done: dict[str, dict[str, str]], jobs: list[FileJob], report: BatchReport
) -> dict[str, dict[str, str]]:
    """The earlier entries whose output still exists, plus every job that succeeded now."""
    failed = {source for source, _ in report.failures}
    entries = {k: v for k, v in done.items() if (dst / k).exists()}
    for job in jobs:
        if str(job.source) not in failed:
            entries[job.target.relative_to(dst).as_posix()] = {
                "source": str(job.source.relative_to(src)),
                "sha256": job.sha256,
            }
    return entries


def preprocess_tree(
    src: Path,
    dst: Path,
    cfg: PreprocessConfig | None = None,
    *,
    workers: int | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    progress: bool = True,
    start_method: str | None = None,
) -> BatchReport:
    """Mirror every image under ``src`` into ``dst`` preprocessed; skip what is already done.

    A file is skipped when the manifest holds the same content hash under the same config hash
    and its output exists. ``failures.csv`` lists every unreadable input with the reason; the
    config is saved beside the outputs.
    """
    cfg = cfg or PreprocessConfig()
    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise NotADirectoryError(f"{src}: not a folder")
    if dst.resolve().is_relative_to(src.resolve()):
        raise ValueError(f"{dst}: the output folder must not be inside the source folder {src}")
    cfg_hash = config_hash(cfg)
    done = _load_manifest(dst / MANIFEST_NAME, cfg_hash)
    jobs, skipped = _plan_tree(src, dst, done, progress=progress)
    report = run_jobs(
        jobs, cfg, workers=workers, max_pixels=max_pixels, progress=progress, start_method=start_method
    )
    report.skipped = skipped
    write_json(dst / CONFIG_NAME, to_dict(cfg))
    entries = _manifest_entries(src, dst, done, jobs, report)
    write_json(dst / MANIFEST_NAME, {"config_hash": cfg_hash, "entries": entries})
    write_failures_csv(dst / FAILURES_NAME, report.failures)
    log.info("preprocess %s -> %s: %s", src, dst, report.summary())
    return report


def write_failures_csv(path: Path, failures: list[tuple[str, str]]) -> None:
    """``file,reason`` rows, sorted, written atomically (a header only when nothing failed)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["file", "reason"])
    writer.writerows(sorted(failures))
    atomic_write_text(path, buffer.getvalue())


# ---------------------------------------------------------------------------------------------
# Training's cache: content-addressed under the config's hash
# ---------------------------------------------------------------------------------------------


def cache_images(
    paths: list[Path],
    cfg: PreprocessConfig,
    cache_dir: Path,
    *,
    workers: int | None = None,
    progress: bool = True,
) -> tuple[list[Path | None], BatchReport]:
    """Preprocess ``paths`` into a content-addressed cache ``cache_dir/<config hash>/``.

    Returns the cached PNG for each input (None where it failed) and the batch report.
    Identical files share one entry, so exact duplicates cost nothing twice.
    """
    root = Path(cache_dir) / config_hash(cfg)
    write_json(root / CONFIG_NAME, to_dict(cfg))
    targets: list[Path | None] = []
    jobs: dict[Path, FileJob] = {}
    skipped: list[Path] = []
    unreadable: list[tuple[str, str]] = []
    for path in tqdm(paths, desc="hashing", unit="img", disable=not progress or len(paths) < 500):
        sha = file_sha256_or_none(Path(path))
        if sha is None:  # the cache is keyed by content: a file that cannot be read has no entry
            targets.append(None)
            unreadable.append((str(path), _unreadable_reason(Path(path))))
            continue
        target = root / sha[:2] / f"{sha}.png"
        targets.append(target)
        if target.exists():
            skipped.append(target)
        elif target not in jobs:
            jobs[target] = FileJob(Path(path), target, sha)
    report = run_jobs(list(jobs.values()), cfg, workers=workers, progress=progress)
    report.skipped = skipped
    report.failures.extend(unreadable)
    ok = set(report.processed) | set(skipped)
    return [t if t in ok else None for t in targets], report


def _unreadable_reason(path: Path) -> str:
    """Why ``path`` could not be hashed, in the reader's words ("cannot read file: Permission
    denied"), as a job that failed to read it would say."""
    try:
        read_file(path)
    except ImageReadError as e:
        return e.reason
    return "could not be read while it was hashed"
