"""The before/after panel: a few images through every preprocessing stage (the seed's
"Nach Preprocessing" picture), written by the ``preprocess --preview`` command."""

from __future__ import annotations

import io
import logging
from pathlib import Path

import numpy as np

from cxr_pneumonia.config import atomic_write_bytes
from cxr_pneumonia.io import ImageReadError, load_image
from cxr_pneumonia.preprocess import PreprocessConfig, PreprocessError, build_pipeline

log = logging.getLogger(__name__)

# (stage key in PreprocessResult.stages, column title); "final" is the pipeline's output.
PREVIEW_COLUMNS = (
    ("original", "original"),
    ("clahe", "CLAHE"),
    ("mask", "mask"),
    ("apply_mask", "masked"),
    ("final", "final"),
)

PreviewRow = tuple[Path, dict[str, np.ndarray], bool]  # (file, stages, fallback)


def preview_rows(files: list[Path], cfg: PreprocessConfig, *, max_images: int = 4) -> list[PreviewRow]:
    """Every stage of the first ``max_images`` readable files; unreadable ones are skipped with a warning."""
    pipeline = build_pipeline(cfg)
    rows: list[PreviewRow] = []
    for path in files:
        try:
            result = pipeline.run(load_image(path), source=str(path), keep_stages=True)
        except (ImageReadError, PreprocessError) as e:
            log.warning("preview skips %s", e)
            continue
        rows.append((path, {**result.stages, "final": result.image}, result.fallback))
        if len(rows) == max_images:
            break
    return rows


def missing_stage_text(key: str, fallback: bool, cfg: PreprocessConfig) -> str:
    """What a panel cell without an image says: the "mask" step ran and found no contour (the
    pipeline then keeps the whole image and leaves that stage out), or the step is switched off."""
    return "no contour" if key == "mask" and fallback and "mask" in cfg.steps else "step off"


def write_preview(files: list[Path], cfg: PreprocessConfig, out_png: Path, *, max_images: int = 4) -> Path:
    """A panel of a few images through every stage (original, CLAHE, mask, masked, final)."""
    import matplotlib  # imported here: only the preview needs it, and Agg must be chosen first

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = preview_rows(files, cfg, max_images=max_images)
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
                ax.text(0.5, 0.5, missing_stage_text(key, fallback, cfg), ha="center", va="center")
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
