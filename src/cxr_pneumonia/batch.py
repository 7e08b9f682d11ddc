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
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

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
    IMAGE_SUFFIXES,
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
# How often a running `preprocess` rewrites its manifest: often enough that an interrupted run
# resumes where it was, rarely enough that a tree of thousands is not rewritten once per file.
MANIFEST_FLUSH_SECONDS = 5.0


@dataclass(frozen=True)
class FileJob:
    """One source image and where its preprocessed PNG goes."""

    source: Path
    target: Path
    sha256: str


@dataclass
class BatchReport:
    """What a batch did: processed and skipped targets, failures as (source, reason), and the
    outputs removed because their source is gone from the tree."""

    processed: list[Path] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)
    failures: list[tuple[str, str]] = field(default_factory=list)
    fallbacks: list[str] = field(default_factory=list)
    removed: list[Path] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def n_total(self) -> int:
        """Every file the batch saw."""
        return len(self.processed) + len(self.skipped) + len(self.failures)

    def summary(self) -> str:
        """One line for the log and the command's output."""
        removed = f"{len(self.removed)} removed (source gone), " if self.removed else ""
        return (
            f"{len(self.processed)} processed, {len(self.skipped)} skipped (already done), "
            f"{len(self.failures)} failed, {len(self.fallbacks)} without a usable contour "
            f"(whole image kept), {removed}{self.seconds:.1f} s"
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


Record = Callable[[FileJob, Outcome], None]


def _run_in_process(
    jobs: list[FileJob], cfg: PreprocessConfig, max_pixels: int, record: Record, bar: tqdm
) -> None:
    """One worker: the jobs run here, in order."""
    previous_threads = cv2.getNumThreads()
    _init_worker()  # as in a worker, so timings compare; the caller's setting is restored
    try:
        for job in jobs:
            record(job, _process_one(job, cfg, max_pixels))
            bar.update(1)
    finally:
        cv2.setNumThreads(previous_threads)


def _run_in_pool(
    jobs: list[FileJob],
    cfg: PreprocessConfig,
    max_pixels: int,
    record: Record,
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
                record(job, outcome)
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
    on_outcome: Record | None = None,
) -> BatchReport:
    """Process ``jobs`` with ``workers`` processes (in-process when 1), never stopping on bad files.

    ``on_outcome(job, outcome)`` runs in this process as each job finishes (``preprocess`` records
    its manifest as it goes, so an interrupted run resumes)."""
    report = BatchReport()

    def record(job: FileJob, outcome: Outcome) -> None:
        report.record(job, outcome)
        if on_outcome is not None:
            on_outcome(job, outcome)

    workers = workers or default_workers()
    start = time.perf_counter()
    bar = tqdm(total=len(jobs), desc=description, unit="img", disable=not progress or not jobs)
    if workers == 1 or len(jobs) <= 1:
        _run_in_process(jobs, cfg, max_pixels, record, bar)
    else:
        _run_in_pool(jobs, cfg, max_pixels, record, bar, workers=workers, start_method=start_method)
    bar.close()
    report.seconds = time.perf_counter() - start
    return report


# ---------------------------------------------------------------------------------------------
# The `preprocess` command: a mirrored tree with a manifest
# ---------------------------------------------------------------------------------------------


def target_for(source: Path, src_root: Path, dst_root: Path) -> Path:
    """Mirror ``source``'s place under ``src_root`` into ``dst_root``, as PNG.

    An image suffix is replaced (``a/x.jpg`` -> ``a/x.png``); any other suffix is kept, because
    DICOM files named by UID (``1.2.840.113619.2.55``) differ only there: replacing it would give
    a whole series one output name."""
    rel = source.relative_to(src_root)
    if rel.suffix.lower() in IMAGE_SUFFIXES:
        return (dst_root / rel).with_suffix(".png")
    return dst_root / rel.parent / f"{rel.name}.png"


def _rel(target: Path, dst: Path) -> str:
    """A target's manifest key: its place under ``dst``."""
    return target.relative_to(dst).as_posix()


def _safe_key(key: str) -> bool:
    """Whether ``key`` could be a manifest key this command writes: a relative POSIX path to a PNG
    with no ``..`` part, so that ``DST / key`` names a place inside DST by its own path."""
    parts = PurePosixPath(key).parts
    return (
        key.endswith(".png")
        and "\0" not in key
        and not PurePosixPath(key).is_absolute()
        and not Path(key).anchor
        and ".." not in parts
    )


@dataclass(frozen=True)
class _OldManifest:
    """The manifest an earlier ``preprocess`` left in DST. ``src`` is the resolved source folder
    every entry comes from: None for a manifest from before it was recorded, or one describing a
    folder merged from several source trees."""

    config_hash: str
    src: str | None
    entries: dict[str, dict[str, str]]


def _is_own_manifest(manifest: object) -> bool:
    """Whether ``manifest`` has exactly the shape this command writes. Its keys name files to
    delete, so a manifest another tool wrote (or one edited into another shape) must not pass."""
    if not isinstance(manifest, dict) or not isinstance(manifest.get("config_hash"), str):
        return False
    entries, src = manifest.get("entries"), manifest.get("src")
    if not isinstance(entries, dict) or not isinstance(src, str | None):
        return False
    return all(
        _safe_key(key)
        and isinstance(entry, dict)
        and isinstance(entry.get("source"), str)
        and isinstance(entry.get("sha256"), str)
        for key, entry in entries.items()
    )


def _read_manifest(path: Path) -> _OldManifest | None:
    """The manifest an earlier run of this command wrote, whichever config it was under; None when
    it is missing, unreadable or not one of ours (then no file in DST is known to be an output)."""
    try:
        manifest = read_json(path)
    except (OSError, ValueError):
        return None
    if not _is_own_manifest(manifest):
        return None
    return _OldManifest(manifest["config_hash"], manifest.get("src"), dict(manifest["entries"]))


def _collisions(targets: dict[Path, Path]) -> list[tuple[str, str]]:
    """(source, reason) for every source whose output name another source has too (``x.jpg`` and
    ``x.png`` both become ``x.png``). Either would silently overwrite the other, and which one
    wins would change from run to run, so all of them fail, each naming the others."""
    by_target: dict[Path, list[Path]] = {}
    for source, target in targets.items():
        by_target.setdefault(target, []).append(source)
    rows = []
    for target, sources in by_target.items():
        for source in sources if len(sources) > 1 else []:
            others = ", ".join(str(other) for other in sources if other != source)
            rows.append((str(source), f"its output {target.name} would also be written from {others}"))
    return rows


@dataclass
class _TreePlan:
    """What a ``preprocess`` run will do, decided before any output is written."""

    jobs: list[FileJob] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)
    kept: dict[str, dict[str, str]] = field(default_factory=dict)  # the skipped targets' entries
    collisions: list[tuple[str, str]] = field(default_factory=list)  # (source, reason)
    rewritten: set[Path] = field(default_factory=set)  # outputs to write anew (or fail): jobs', collisions'
    current: set[str] = field(default_factory=set)  # every source's output, as a manifest key
    carried: dict[str, dict[str, str]] = field(default_factory=dict)  # outputs of sources not in SRC, kept


def _plan_tree(src: Path, dst: Path, done: dict[str, dict[str, str]], *, progress: bool) -> _TreePlan:
    """Jobs for every image not yet done (same content hash, output present), the skipped targets,
    and the sources that share an output name."""
    sources = list_image_files(src)
    targets = {source: target_for(source, src, dst) for source in sources}
    plan = _TreePlan(collisions=_collisions(targets), current={_rel(t, dst) for t in targets.values()})
    colliding = {source for source, _ in plan.collisions}
    plan.rewritten = {targets[Path(source)] for source in colliding}
    for source in tqdm(sources, desc="hashing", unit="img", disable=not progress or len(sources) < 500):
        if str(source) in colliding:
            continue
        target = targets[source]
        # None: unreadable; its job fails on reading and lands in failures.csv, naming the file
        sha = file_sha256_or_none(source)
        entry = done.get(_rel(target, dst), {})
        if sha is not None and entry.get("sha256") == sha and target.exists():
            plan.skipped.append(target)
            # named from this SRC: the same bytes may have come from another tree or file name
            plan.kept[_rel(target, dst)] = {"source": str(source.relative_to(src)), "sha256": sha}
        else:
            plan.jobs.append(FileJob(source, target, sha or ""))
            plan.rewritten.add(target)
    return plan


def _may_remove(key: str, src: Path, dst: Path) -> bool:
    """Whether the output a manifest lists as ``key`` (the file ``dst / key``) may be deleted.

    Containment is judged on the key itself: resolving the path would put an output behind a
    symlinked sub-folder of DST outside DST, and it would never go. Only the refusal to delete
    inside SRC looks at where the path really leads (a manifest edited by hand, or a link in
    DST, must not reach the sources)."""
    if not _safe_key(key):
        return False
    try:
        return not (dst / key).resolve().is_relative_to(src.resolve())
    except (OSError, RuntimeError):  # a symlink loop: nothing known about where it leads
        return False


def _clear_outputs(
    src: Path, dst: Path, old: _OldManifest | None, plan: _TreePlan, cfg_hash: str
) -> list[Path]:
    """Delete the outputs the old manifest lists that this run will not keep as they are, before
    anything is written: a run that stops midway then leaves none that looks current but is not.
    Returns the outputs removed because their source is gone; ``plan.carried`` gets the entries
    of outputs whose source this run does not list but which stay.

    Only files this command's manifest lists are ever deleted. Any other file at a target (the
    user's own) stays until a job that succeeds replaces it."""
    if old is None:
        return []
    # A listed output whose source this run does not list is gone from SRC only if that manifest
    # was written for this same SRC, and only if SRC lists something at all: an empty SRC is more
    # likely an unmounted share than a data set deleted whole, and another SRC is a second tree
    # merged into this DST (or, for an old manifest without ``src``, unknown). Those outputs stay.
    vanish = old.src == str(src.resolve()) and bool(plan.current)
    rewritten = {_rel(target, dst) for target in plan.rewritten}
    gone, elsewhere = [], []
    for key in sorted(old.entries):
        if key in plan.kept:
            continue
        if key not in rewritten and not (vanish and key not in plan.current):
            elsewhere.append(key)
        elif _may_remove(key, src, dst) and (dst / key).is_file():
            (dst / key).unlink()
            if key not in plan.current:
                gone.append(dst / key)
    _carry(dst, old, elsewhere, plan, cfg_hash)
    return gone


def _carry(dst: Path, old: _OldManifest, keys: list[str], plan: _TreePlan, cfg_hash: str) -> None:
    """Keep the entries of outputs this run neither rewrites nor removes, as the manifest had them.

    Under the same config they stay listed, so a merged folder stays described. Under another
    config they cannot be listed (the manifest has one config hash) and are not deleted either:
    their source may be in another tree, or on a share that is not mounted, and deleting them is
    losing work nothing here can redo. They stay as files this command no longer claims (like a
    user's own), and the warning says so, since the folder now mixes two configs."""
    present = [key for key in keys if (dst / key).is_file()]
    if old.config_hash == cfg_hash:
        plan.carried = {key: old.entries[key] for key in present}
    elif present:
        log.warning(
            "%s: %d outputs of another preprocessing config are kept, no longer listed in %s: "
            "their sources are not in this run's source folder (first: %s)",
            dst,
            len(present),
            MANIFEST_NAME,
            present[0],
        )


@dataclass
class _Manifest:
    """A running ``preprocess``'s manifest. It lists only outputs written under ``cfg_hash`` from
    the source content it names, and is rewritten atomically as outputs finish (at most every
    MANIFEST_FLUSH_SECONDS) and when the run ends or is interrupted, so a rerun resumes.

    ``recorded_src`` is saved as its ``src``: the resolved source folder every entry comes from,
    or None when some come from another tree (a later run then removes no output as "source
    gone", since it cannot tell which tree an entry's source belonged to)."""

    path: Path
    src: Path
    dst: Path
    cfg_hash: str
    entries: dict[str, dict[str, str]]
    recorded_src: str | None
    flushed: float = 0.0

    def record(self, job: FileJob, outcome: Outcome) -> None:
        """List a job's output once it is written (a failed job's old output is already gone)."""
        if outcome[1] is not None:
            return
        self.entries[_rel(job.target, self.dst)] = {
            "source": str(job.source.relative_to(self.src)),
            "sha256": job.sha256,
        }
        if time.monotonic() - self.flushed >= MANIFEST_FLUSH_SECONDS:
            self.flush()

    def flush(self) -> None:
        payload = {"config_hash": self.cfg_hash, "src": self.recorded_src, "entries": self.entries}
        write_json(self.path, payload)
        self.flushed = time.monotonic()


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
    and its output exists. ``failures.csv`` lists every unreadable input with the reason, and
    every source whose output name another source has too; the config is saved beside the
    outputs. An output this command wrote is removed when its source failed, or when another
    config wrote it; and when its source is gone, if the manifest was written for this same
    ``src`` and ``src`` is not empty. Outputs of another source tree stay (and stay listed under
    the same config). No file the manifest does not list is ever deleted.
    """
    cfg = cfg or PreprocessConfig()
    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise NotADirectoryError(f"{src}: not a folder")
    if dst.resolve().is_relative_to(src.resolve()):
        raise ValueError(f"{dst}: the output folder must not be inside the source folder {src}")
    cfg_hash = config_hash(cfg)
    old = _read_manifest(dst / MANIFEST_NAME)
    done = old.entries if old is not None and old.config_hash == cfg_hash else {}
    plan = _plan_tree(src, dst, done, progress=progress)
    # Before the first output is written, the folder is brought to what the new manifest says
    # (the old outputs it will not keep go first, then the manifest and config are rewritten):
    # a run stopped midway can then leave fewer outputs, never ones described wrongly.
    removed = _clear_outputs(src, dst, old, plan, cfg_hash)
    this_src = str(src.resolve())
    # entries carried from a manifest of another (or an unknown) tree make the folder a merged one
    merged = bool(plan.carried) and old is not None and old.src != this_src
    entries = {**plan.carried, **plan.kept}
    manifest = _Manifest(dst / MANIFEST_NAME, src, dst, cfg_hash, entries, None if merged else this_src)
    manifest.flush()
    write_json(dst / CONFIG_NAME, to_dict(cfg))
    (dst / FAILURES_NAME).unlink(missing_ok=True)  # an earlier run's would look like this one's
    try:
        report = run_jobs(
            plan.jobs,
            cfg,
            workers=workers,
            max_pixels=max_pixels,
            progress=progress,
            start_method=start_method,
            on_outcome=manifest.record,
        )
    finally:
        manifest.flush()
    report.skipped, report.removed = plan.skipped, removed
    report.failures.extend(plan.collisions)
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
    report.failures.extend(_failures_of_copies(paths, targets, jobs, report.failures))
    report.failures.extend(unreadable)
    ok = set(report.processed) | set(skipped)
    return [t if t in ok else None for t in targets], report


def _failures_of_copies(
    paths: list[Path], targets: list[Path | None], jobs: dict[Path, FileJob], failures: list[tuple[str, str]]
) -> list[tuple[str, str]]:
    """A failure row for every other path whose bytes equal a failed job's: identical files share
    one job, but each path must be named in failures.csv, or a copy is dropped without a word."""
    reasons = dict(failures)
    rows = []
    for path, target in zip(paths, targets, strict=True):
        job = jobs.get(target) if target is not None else None
        if job is not None and str(job.source) in reasons and str(Path(path)) != str(job.source):
            rows.append((str(path), reasons[str(job.source)]))
    return rows


def _unreadable_reason(path: Path) -> str:
    """Why ``path`` could not be hashed, in the reader's words ("cannot read file: Permission
    denied"), as a job that failed to read it would say."""
    try:
        read_file(path)
    except ImageReadError as e:
        return e.reason
    return "could not be read while it was hashed"
