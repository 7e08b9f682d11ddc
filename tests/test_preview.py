"""The before/after panel: one row per readable image, unreadable files skipped."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from cxr_pneumonia.preprocess import PreprocessConfig, disable_steps
from cxr_pneumonia.preview import PREVIEW_COLUMNS, preview_rows, write_preview


def write_xray(path: Path) -> Path:
    img = np.full((96, 80), 20, np.uint8)
    cv2.ellipse(img, (40, 48), (36, 43), 0, 0, 360, 180, cv2.FILLED)
    cv2.imwrite(str(path), img)
    return path


def test_rows_hold_every_stage_and_skip_unreadable_files(tmp_path):
    good = [write_xray(tmp_path / f"{i}.png") for i in range(3)]
    (tmp_path / "bad.png").write_bytes(b"")
    rows = preview_rows([tmp_path / "bad.png", *good], PreprocessConfig(size=32), max_images=2)
    assert [path for path, _, _ in rows] == good[:2]
    _, stages, fallback = rows[0]
    assert {key for key, _ in PREVIEW_COLUMNS} <= set(stages) and not fallback
    assert stages["final"].shape == (32, 32)
    switched_off = preview_rows(good, disable_steps(PreprocessConfig(size=32), "clahe"))
    assert "clahe" not in switched_off[0][1]  # drawn as "step off"


def test_panel_is_written_and_an_unreadable_set_is_refused(tmp_path):
    files = [write_xray(tmp_path / f"{i}.png") for i in range(2)]
    out = write_preview(files, PreprocessConfig(size=32), tmp_path / "panel.png")
    assert cv2.imread(str(out)).shape[0] > 200
    (tmp_path / "bad.png").write_bytes(b"")
    with pytest.raises(ValueError, match="no readable image"):
        write_preview([tmp_path / "bad.png"], PreprocessConfig(), tmp_path / "none.png")


def drawn_panel(monkeypatch, files: list[Path], cfg: PreprocessConfig, out: Path) -> list[list[object]]:
    """The panel's axes (rows × columns) as write_preview drew them, kept from being closed."""
    import matplotlib.pyplot as plt

    figures = []
    monkeypatch.setattr(plt, "close", figures.append)
    write_preview(files, cfg, out)
    monkeypatch.undo()
    (fig,) = figures
    axes = fig.axes
    plt.close(fig)
    return [axes[i : i + len(PREVIEW_COLUMNS)] for i in range(0, len(axes), len(PREVIEW_COLUMNS))]


def test_an_image_without_contour_shows_no_contour_under_mask_not_the_image(tmp_path, monkeypatch):
    speck = np.full((200, 200), 20, np.uint8)
    cv2.ellipse(speck, (100, 100), (10, 10), 0, 0, 360, 180, cv2.FILLED)  # a speck, not a thorax
    cv2.imwrite(str(tmp_path / "speck.png"), speck)
    files, cfg = [tmp_path / "speck.png", write_xray(tmp_path / "xray.png")], PreprocessConfig(size=32)
    (_, stages, fallback), (_, found, _) = preview_rows(files, cfg)
    assert fallback and "mask" not in stages and "apply_mask" in stages and "mask" in found
    mask = [key for key, _ in PREVIEW_COLUMNS].index("mask")
    clahe = [key for key, _ in PREVIEW_COLUMNS].index("clahe")
    no_contour, xray = drawn_panel(monkeypatch, files, cfg, tmp_path / "panel.png")
    assert not no_contour[mask].images and [t.get_text() for t in no_contour[mask].texts] == ["no contour"]
    assert xray[mask].images and not xray[mask].texts
    # a step switched off says so, even on an image without contour
    no_contour, _ = drawn_panel(monkeypatch, files, disable_steps(cfg, "clahe"), tmp_path / "panel.png")
    assert [t.get_text() for t in no_contour[clahe].texts] == ["step off"]
    assert [t.get_text() for t in no_contour[mask].texts] == ["no contour"]
