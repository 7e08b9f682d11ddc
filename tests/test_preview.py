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
