"""The seed's preprocessing: CLAHE, largest-contour crop, refined mask, bitwise-AND, resize.

Every step is a pure function on uint8 arrays with keyword-only parameters. A
:class:`Pipeline` built from a :class:`PreprocessConfig` chains the enabled steps; the
same pipeline object (and the same saved config) is used by training, evaluation,
prediction and serving.
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
from pathlib import Path
from typing import ClassVar, Literal

import cv2
import numpy as np
from pydantic import Field
from tqdm.auto import tqdm

from cxr_pneumonia.config import (
    StageConfig,
    atomic_write_bytes,
    atomic_write_text,
    config_hash,
    file_sha256,
    override,
    read_json,
    to_dict,
    write_json,
)
from cxr_pneumonia.io import DEFAULT_MAX_PIXELS, ImageReadError, list_image_files, load_image

log = logging.getLogger(__name__)

# The seed's order. "crop", "mask", "morph" and "apply_mask" all use the contour found
# by "crop"/"mask", so the region is located once per image.
DEFAULT_STEPS: tuple[str, ...] = ("clahe", "crop", "mask", "morph", "apply_mask", "resize")


class PreprocessError(RuntimeError):
    """A preprocessing step failed on an image; the message names the step and the file."""


class PreprocessConfig(StageConfig):
    """Parameters of every preprocessing step and the ordered names of the enabled steps."""

    cli_fields: ClassVar[tuple[str, ...]] = ("size", "resize_mode", "mask_shape")

    steps: tuple[Literal[DEFAULT_STEPS], ...] = Field(  # type: ignore[valid-type]
        DEFAULT_STEPS, description="Enabled steps, in order."
    )
    clahe_clip_limit: float = Field(2.0, gt=0, description="CLAHE contrast limit.")
    clahe_tile_grid: int = Field(8, ge=1, description="CLAHE tiles per side.")
    threshold_method: Literal["otsu", "mean"] = Field(
        "otsu", description="How the body is told from the background before the crop."
    )
    # A region smaller than this share of the image is noise, not a thorax: fall back.
    min_region_fraction: float = Field(
        0.15, ge=0, le=1, description="Smallest share of the image a thorax region may cover."
    )
    # "contour" is the seed's exact mask. On tightly framed images the dark lung fields join the
    # dark background, so that mask cuts the lungs out (the robustness check's crop_0.85 case);
    # "hull" fills the region's convex hull, which keeps them and still drops the corners.
    mask_shape: Literal["hull", "contour"] = Field(
        "hull", description="Preprocessing mask: the region's convex hull, or its exact contour (seed)."
    )
    morph_kernel: int = Field(5, ge=1, description="Kernel size of the mask's erosion and dilation.")
    erode_iterations: int = Field(2, ge=0, description="Erosions of the mask.")
    dilate_iterations: int = Field(2, ge=0, description="Dilations of the mask.")
    size: int = Field(224, ge=8, description="Output size in pixels.")
    resize_mode: Literal["stretch", "pad"] = Field(
        "stretch", description="Resize by stretching (seed) or by padding to a square first."
    )


# ---------------------------------------------------------------------------------------------
# Pure step functions
# ---------------------------------------------------------------------------------------------


def check_image(img: np.ndarray) -> None:
    """The pixel contract: uint8, 2-D grayscale, non-empty."""
    if not isinstance(img, np.ndarray) or img.dtype != np.uint8 or img.ndim != 2 or img.size == 0:
        what = f"{img.dtype} array of shape {img.shape}" if isinstance(img, np.ndarray) else type(img)
        raise ValueError(f"expected a non-empty uint8 H×W grayscale array, got {what}")


def apply_clahe(img: np.ndarray, *, clip_limit: float, tile_grid: int) -> np.ndarray:
    """Contrast-limited adaptive histogram equalisation."""
    clahe = cv2.createCLAHE(clipLimit=clip_limit, tileGridSize=(tile_grid, tile_grid))
    return clahe.apply(img)


def find_largest_contour(
    img: np.ndarray, *, method: str = "otsu", min_region_fraction: float = 0.15
) -> np.ndarray | None:
    """The largest connected bright region's outer contour, or None when none is big enough."""
    if int(img.max()) == int(img.min()):  # no contrast: any threshold would be arbitrary
        return None
    if method == "otsu":
        _, binary = cv2.threshold(img, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    else:
        _, binary = cv2.threshold(img, float(img.mean()), 255, cv2.THRESH_BINARY)
    contours, _ = cv2.findContours(binary, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    if not contours:
        return None
    largest = max(contours, key=cv2.contourArea)
    if cv2.contourArea(largest) < min_region_fraction * img.size:
        return None
    return largest


def contour_box(contour: np.ndarray) -> tuple[int, int, int, int]:
    """Bounding box (x, y, w, h) of a contour."""
    x, y, w, h = cv2.boundingRect(contour)
    return int(x), int(y), int(w), int(h)


def contour_mask(shape: tuple[int, int], contour: np.ndarray) -> np.ndarray:
    """A filled 0/255 mask of the contour."""
    mask = np.zeros(shape, dtype=np.uint8)
    cv2.drawContours(mask, [contour], -1, color=255, thickness=cv2.FILLED)
    return mask


def refine_mask(
    mask: np.ndarray, *, kernel_size: int, erode_iterations: int, dilate_iterations: int
) -> np.ndarray:
    """Erosion then dilation: removes thin spurs (text markers, wires) attached to the region."""
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (kernel_size, kernel_size))
    eroded = cv2.erode(mask, kernel, iterations=erode_iterations)
    return cv2.dilate(eroded, kernel, iterations=dilate_iterations)


def apply_mask(img: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Bitwise-AND: keep only the pixels inside the mask."""
    return cv2.bitwise_and(img, img, mask=mask)


def crop_to_box(img: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    x, y, w, h = box
    return img[y : y + h, x : x + w].copy()


def resize_image(img: np.ndarray, *, size: int, mode: str = "stretch") -> np.ndarray:
    """Resize to size×size: stretched as the seed does, or aspect-preserving with black padding."""
    interpolation = cv2.INTER_AREA if min(img.shape) >= size else cv2.INTER_LINEAR
    if mode == "stretch":
        return cv2.resize(img, (size, size), interpolation=interpolation)
    h, w = img.shape
    scale = size / max(h, w)
    new_w, new_h = max(1, round(w * scale)), max(1, round(h * scale))
    resized = cv2.resize(img, (new_w, new_h), interpolation=interpolation)
    out = np.zeros((size, size), dtype=np.uint8)
    top, left = (size - new_h) // 2, (size - new_w) // 2
    out[top : top + new_h, left : left + new_w] = resized
    return out


# ---------------------------------------------------------------------------------------------
# Pipeline
# ---------------------------------------------------------------------------------------------


@dataclass
class PreprocessResult:
    """The final image plus what each stage produced (for previews and audits)."""

    image: np.ndarray
    stages: dict[str, np.ndarray] = field(default_factory=dict)
    mask: np.ndarray | None = None
    box: tuple[int, int, int, int] | None = None
    fallback: bool = False  # True when no usable contour was found and the whole image was kept


@dataclass
class _State:
    image: np.ndarray
    contour: np.ndarray | None = None
    contour_searched: bool = False
    mask: np.ndarray | None = None
    box: tuple[int, int, int, int] | None = None
    fallback: bool = False


def _locate(state: _State, cfg: PreprocessConfig) -> None:
    """Find the region once; a missing region means 'keep the whole image' and is recorded."""
    if state.contour_searched:
        return
    state.contour_searched = True
    state.contour = find_largest_contour(
        state.image, method=cfg.threshold_method, min_region_fraction=cfg.min_region_fraction
    )
    state.fallback = state.contour is None


def _step_clahe(state: _State, cfg: PreprocessConfig) -> _State:
    state.image = apply_clahe(state.image, clip_limit=cfg.clahe_clip_limit, tile_grid=cfg.clahe_tile_grid)
    return state


def _step_crop(state: _State, cfg: PreprocessConfig) -> _State:
    _locate(state, cfg)
    if state.contour is not None:
        state.box = contour_box(state.contour)
    return state


def _step_mask(state: _State, cfg: PreprocessConfig) -> _State:
    _locate(state, cfg)
    if state.contour is not None:
        region = cv2.convexHull(state.contour) if cfg.mask_shape == "hull" else state.contour
        state.mask = contour_mask(state.image.shape, region)
    return state


def _step_morph(state: _State, cfg: PreprocessConfig) -> _State:
    if state.mask is not None:
        state.mask = refine_mask(
            state.mask,
            kernel_size=cfg.morph_kernel,
            erode_iterations=cfg.erode_iterations,
            dilate_iterations=cfg.dilate_iterations,
        )
    return state


def _step_apply_mask(state: _State, cfg: PreprocessConfig) -> _State:
    if state.mask is not None:
        state.image = apply_mask(state.image, state.mask)
    return state


def _step_resize(state: _State, cfg: PreprocessConfig) -> _State:
    # Cropping is applied here, after masking, so mask and image share coordinates until the end.
    if state.box is not None:
        state.image = crop_to_box(state.image, state.box)
        if state.mask is not None:
            state.mask = crop_to_box(state.mask, state.box)
        state.box = None
    state.image = resize_image(state.image, size=cfg.size, mode=cfg.resize_mode)
    if state.mask is not None:
        state.mask = resize_image(state.mask, size=cfg.size, mode=cfg.resize_mode)
    return state


STEPS: dict[str, Callable[[_State, PreprocessConfig], _State]] = {
    "clahe": _step_clahe,
    "crop": _step_crop,
    "mask": _step_mask,
    "morph": _step_morph,
    "apply_mask": _step_apply_mask,
    "resize": _step_resize,
}
STEP_NAMES = tuple(STEPS)


class Pipeline:
    """The enabled steps of a config, applied in order to a uint8 grayscale image."""

    def __init__(self, cfg: PreprocessConfig) -> None:
        self.cfg = cfg
        self._steps = [(name, STEPS[name]) for name in cfg.steps]

    def __repr__(self) -> str:
        return f"Pipeline(steps={list(self.cfg.steps)}, size={self.cfg.size})"

    def run(self, img: np.ndarray, *, source: str = "<array>", keep_stages: bool = False) -> PreprocessResult:
        """Apply every step; the input is never modified."""
        check_image(img)
        state = _State(image=img.copy())
        stages: dict[str, np.ndarray] = {"original": img} if keep_stages else {}
        for name, step in self._steps:
            try:
                state = step(state, self.cfg)
            except Exception as e:
                raise PreprocessError(f"{name} failed on {source}: {e}") from e
            if keep_stages:
                stages[name] = (
                    state.image.copy() if name != "mask" or state.mask is None else state.mask.copy()
                )
        if state.box is not None:  # "crop" enabled without "resize": crop at the end
            state.image = crop_to_box(state.image, state.box)
            if state.mask is not None:
                state.mask = crop_to_box(state.mask, state.box)
        return PreprocessResult(
            image=np.ascontiguousarray(state.image),
            stages=stages,
            mask=state.mask,
            box=None if state.contour is None else contour_box(state.contour),
            fallback=state.fallback,
        )

    def __call__(self, img: np.ndarray, *, source: str = "<array>") -> np.ndarray:
        return self.run(img, source=source).image


def build_pipeline(cfg: PreprocessConfig | None = None) -> Pipeline:
    """The pipeline for ``cfg`` (the seed's defaults when None)."""
    return Pipeline(cfg or PreprocessConfig())


def disable_steps(cfg: PreprocessConfig, *names: str) -> PreprocessConfig:
    """A copy of ``cfg`` without the named steps (validated)."""
    unknown = [n for n in names if n not in STEP_NAMES]
    if unknown:
        raise ValueError(f"unknown preprocessing steps {unknown}; valid steps: {list(STEP_NAMES)}")
    return override(cfg, steps=tuple(s for s in cfg.steps if s not in names))


# ---------------------------------------------------------------------------------------------
# Batch processing: the `preprocess` command and training's cache
# ---------------------------------------------------------------------------------------------

MANIFEST_NAME = "manifest.json"
FAILURES_NAME = "failures.csv"
CONFIG_NAME = "preprocess_config.json"


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
        return len(self.processed) + len(self.skipped) + len(self.failures)

    def summary(self) -> str:
        return (
            f"{len(self.processed)} processed, {len(self.skipped)} skipped (already done), "
            f"{len(self.failures)} failed, {len(self.fallbacks)} without a usable contour "
            f"(whole image kept), {self.seconds:.1f} s"
        )


def _process_one(job: FileJob, cfg: PreprocessConfig, max_pixels: int) -> tuple[str, str | None, bool]:
    """Load, preprocess, write atomically. Returns (source, error, fallback); never raises."""
    try:
        img = load_image(job.source, max_pixels=max_pixels)
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


def _process_chunk(
    jobs: list[FileJob], cfg: PreprocessConfig, max_pixels: int
) -> list[tuple[str, str | None, bool]]:
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
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


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

    def record(job: FileJob, outcome: tuple[str, str | None, bool]) -> None:
        source, error, fallback = outcome
        if error is None:
            report.processed.append(job.target)
            if fallback:
                report.fallbacks.append(source)
        else:
            report.failures.append((source, error))
        bar.update(1)

    if workers == 1 or len(jobs) <= 1:
        previous_threads = cv2.getNumThreads()
        _init_worker()
        try:
            for job in jobs:
                record(job, _process_one(job, cfg, max_pixels))
        finally:
            cv2.setNumThreads(previous_threads)
    else:
        with ProcessPoolExecutor(
            max_workers=workers, mp_context=_pool_context(start_method), initializer=_init_worker
        ) as pool:
            chunk = max(1, min(8, len(jobs) // (4 * workers)))
            chunks = [jobs[i : i + chunk] for i in range(0, len(jobs), chunk)]
            futures = {pool.submit(_process_chunk, part, cfg, max_pixels): part for part in chunks}
            for future in as_completed(futures):
                for job, outcome in zip(futures[future], future.result(), strict=True):
                    record(job, outcome)
    bar.close()
    report.seconds = time.perf_counter() - start
    return report


def target_for(source: Path, src_root: Path, dst_root: Path) -> Path:
    """Mirror ``source``'s place under ``src_root`` into ``dst_root``, as PNG."""
    return (dst_root / source.relative_to(src_root)).with_suffix(".png")


def _load_manifest(path: Path, cfg_hash: str) -> dict[str, dict[str, str]]:
    try:
        manifest = read_json(path)
    except (OSError, ValueError):
        return {}
    return manifest.get("entries", {}) if manifest.get("config_hash") == cfg_hash else {}


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
    manifest_path = dst / MANIFEST_NAME
    done = _load_manifest(manifest_path, cfg_hash)

    sources = list_image_files(src)
    jobs, skipped = [], []
    for source in tqdm(sources, desc="hashing", unit="img", disable=not progress or len(sources) < 500):
        target = target_for(source, src, dst)
        key = target.relative_to(dst).as_posix()
        sha = file_sha256(source)
        if done.get(key, {}).get("sha256") == sha and target.exists():
            skipped.append(target)
        else:
            jobs.append(FileJob(source, target, sha))

    report = run_jobs(
        jobs, cfg, workers=workers, max_pixels=max_pixels, progress=progress, start_method=start_method
    )
    report.skipped = skipped

    failed = {source for source, _ in report.failures}
    entries = {k: v for k, v in done.items() if (dst / k).exists()}
    for job in jobs:
        if str(job.source) not in failed:
            entries[job.target.relative_to(dst).as_posix()] = {
                "source": str(job.source.relative_to(src)),
                "sha256": job.sha256,
            }
    write_json(dst / CONFIG_NAME, to_dict(cfg))
    write_json(manifest_path, {"config_hash": cfg_hash, "entries": entries})
    write_failures_csv(dst / FAILURES_NAME, report.failures)
    log.info("preprocess %s -> %s: %s", src, dst, report.summary())
    return report


def write_failures_csv(path: Path, failures: list[tuple[str, str]]) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["file", "reason"])
    writer.writerows(sorted(failures))
    atomic_write_text(path, buffer.getvalue())


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
    targets: list[Path] = []
    jobs: dict[Path, FileJob] = {}
    skipped: list[Path] = []
    for path in tqdm(paths, desc="hashing", unit="img", disable=not progress or len(paths) < 500):
        sha = file_sha256(Path(path))
        target = root / sha[:2] / f"{sha}.png"
        targets.append(target)
        if target.exists():
            skipped.append(target)
        elif target not in jobs:
            jobs[target] = FileJob(Path(path), target, sha)
    report = run_jobs(list(jobs.values()), cfg, workers=workers, progress=progress)
    report.skipped = skipped
    ok = set(report.processed) | set(skipped)
    return [t if t in ok else None for t in targets], report


# ---------------------------------------------------------------------------------------------
# Preview: the seed's "Nach Preprocessing" picture
# ---------------------------------------------------------------------------------------------

PREVIEW_COLUMNS = (
    ("original", "original"),
    ("clahe", "CLAHE"),
    ("mask", "mask"),
    ("apply_mask", "masked"),
    ("final", "final"),
)


def write_preview(files: list[Path], cfg: PreprocessConfig, out_png: Path, *, max_images: int = 4) -> Path:
    """A panel of a few images through every stage (original, CLAHE, mask, masked, final)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pipeline = build_pipeline(cfg)
    rows = []
    for path in files:
        try:
            result = pipeline.run(load_image(path), source=str(path), keep_stages=True)
        except (ImageReadError, PreprocessError) as e:
            log.warning("preview skips %s", e)
            continue
        rows.append((path, {**result.stages, "final": result.image}, result.fallback))
        if len(rows) == max_images:
            break
    if not rows:
        raise ValueError("no readable image for the preview")
    fig, axes = plt.subplots(
        len(rows), len(PREVIEW_COLUMNS), figsize=(3 * len(PREVIEW_COLUMNS), 3 * len(rows)), squeeze=False
    )
    for r, (path, stages, fallback) in enumerate(rows):
        for c, (key, title) in enumerate(PREVIEW_COLUMNS):
            ax = axes[r][c]
            ax.axis("off")
            if key in stages:
                ax.imshow(stages[key], cmap="gray", vmin=0, vmax=255)
            else:
                ax.text(0.5, 0.5, "step off" if not fallback else "no contour", ha="center", va="center")
            if r == 0:
                ax.set_title(title)
        axes[r][0].text(0, -0.02, Path(path).name[:40], transform=axes[r][0].transAxes, fontsize=7, va="top")
    fig.suptitle("Preprocessing: before / after")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    plt.close(fig)
    atomic_write_bytes(Path(out_png), buffer.getvalue())
    return Path(out_png)
