"""The run directory: the files every stage reads and writes, and the checks on them.

A run directory holds everything needed to apply a model exactly as it was validated::

    model.keras            the trained model; written last, by rename: a run is complete when it exists
    config.json            preprocessing, model and training configs, package version, data fingerprint
    threshold.json         the operating point chosen on validation (the point named ``default``)
    operating_points.json  named operating points: the other threshold rules on validation
                           (``validation-<rule>``, by train) and those of a site's sample (``calibrate``)
    metrics_val.json       validation metrics at that threshold
    val_predictions.csv    validation images with their scores (robustness, export calibration)
    training_images.csv    content hashes and patient ids of every image trained or validated on
    history.csv            per-epoch training history (plots/training_curves.png draws it)
    failures.csv           images training could not read
    train_state.json       only while training is unfinished (resume)
    checkpoints/           only while training is unfinished (resume)
    gate/                  the input gate (gate.json, gate.npz; :mod:`cxr_pneumonia.gate`), fitted by
                           train or ``cxr-pneumonia gate RUN``; runs trained before gates have none
    export/                after ``cxr-pneumonia export``: model.onnx and export.json

Only this module names those files; train writes them, export, runtime, predict and evaluation
read them.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from filelock import FileLock

from cxr_pneumonia import __version__
from cxr_pneumonia.batch import FAILURES_NAME
from cxr_pneumonia.config import file_sha256, read_json, to_dict, write_json
from cxr_pneumonia.data import CLASS_NAMES

MODEL_FILE = "model.keras"
CONFIG_FILE = "config.json"
THRESHOLD_FILE = "threshold.json"
OPERATING_POINTS_FILE = "operating_points.json"  # named points: training's other rules, `calibrate`
OPERATING_POINTS_LOCK = ".operating_points.lock"  # held while a point is added (read, change, write)
# training's points of the rules it did not use (train.validation_points); calibrate never takes it
VALIDATION_POINT_PREFIX = "validation-"
DEFAULT_OPERATING_POINT = "default"  # threshold.json itself, never overwritten
METRICS_VAL_FILE = "metrics_val.json"
VAL_PREDICTIONS_FILE = "val_predictions.csv"
TRAINING_IMAGES_FILE = "training_images.csv"  # content hashes + patient ids, for leakage checks
HISTORY_FILE = "history.csv"
TRAINING_CURVES_FILE = "plots/training_curves.png"
FAILURES_FILE = FAILURES_NAME  # the same name as a preprocess output folder's
STATE_FILE = "train_state.json"
CHECKPOINT_DIR = "checkpoints"
CHECKPOINT_WEIGHTS_FILE = "last.weights.h5"  # the whole model after the last completed epoch
OPTIMIZER_FILE = "optimizer.npz"  # the variables of the optimiser of the stage being fitted
BEST_WEIGHTS_FILE = "best.weights.h5"  # that stage's weights at its best epoch (early stopping)
RANDOM_STATE_FILE = "random_state.npz"  # the layers' seed states (Dropout), not part of the weights
EXPORT_DIR = "export"
ONNX_FILE = "model.onnx"
EXPORT_INFO_FILE = "export.json"
REQUIRED_FILES = (MODEL_FILE, CONFIG_FILE, THRESHOLD_FILE)

# The one research-use notice (API answers, CLI, model card, report, Grad-CAM captions).
DISCLAIMER = "Research use only — not a medical device; not for diagnosis."


class RunError(RuntimeError):
    """A run directory is missing, incomplete or inconsistent."""


def ascii_text(text: str) -> str:
    """``text`` with typographic dashes as ASCII hyphens (OpenCV's Hershey fonts draw ASCII only)."""
    return text.replace("—", "-").replace("–", "-")


# ---- writing -----------------------------------------------------------------------------------


def write_metadata(
    path: Path,
    *,
    preprocess_cfg: Any,
    model_cfg: Any,
    threshold: dict[str, Any],
    train_cfg: Any = None,
    extra: dict[str, Any] | None = None,
) -> None:
    """Write config.json and threshold.json for a model saved at ``path / model.keras``."""
    config = {
        "package_version": __version__,
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "preprocess": to_dict(preprocess_cfg),
        "model": to_dict(model_cfg),
        "train": to_dict(train_cfg) if train_cfg is not None else None,
        "class_names": list(CLASS_NAMES),
        **(extra or {}),
    }
    write_json(Path(path) / CONFIG_FILE, config)
    write_json(Path(path) / THRESHOLD_FILE, threshold)


# ---- reading and checks ------------------------------------------------------------------------


def missing_files(path: Path, names: Iterable[str] = REQUIRED_FILES) -> list[str]:
    """The ``names`` that are not files in ``path``."""
    return [name for name in names if not (Path(path) / name).is_file()]


def check_complete(path: Path) -> None:
    """Raise :class:`RunError` unless ``path`` holds model.keras, config.json and threshold.json
    (a half-written run has no model.keras)."""
    missing = missing_files(path)
    if missing:
        raise RunError(f"{path}: not a complete run directory (missing {', '.join(missing)})")


def is_complete(path: Path) -> bool:
    """Whether training finished (model.keras exists)."""
    return (Path(path) / MODEL_FILE).exists()


def _read_object(file: Path, what: str = "a JSON object") -> dict[str, Any]:
    """A run file's JSON object; :class:`RunError` naming the file when it cannot be read or
    holds something else (a damaged or hand-edited run must not end in a traceback)."""
    try:
        content = read_json(file)
    except OSError as e:
        raise RunError(f"{file}: cannot be read ({e.strerror or e})") from e
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise RunError(f"{file}: not valid JSON ({e})") from e
    if not isinstance(content, dict):
        raise RunError(f"{file}: not {what}")
    return content


def _check_threshold(point: Any, where: str) -> dict[str, Any]:
    """``point`` when it holds a ``threshold`` in [0, 1]; :class:`RunError` naming ``where``."""
    value = point.get("threshold") if isinstance(point, dict) else None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise RunError(f"{where}: no threshold between 0 and 1 (found {value!r})")
    return point


def read_config(path: Path) -> dict[str, Any]:
    return _read_object(Path(path) / CONFIG_FILE)


def read_threshold(path: Path) -> dict[str, Any]:
    file = Path(path) / THRESHOLD_FILE
    return _check_threshold(_read_object(file), str(file))


def read_metrics_val(path: Path) -> dict[str, Any] | None:
    file = Path(path) / METRICS_VAL_FILE
    return _read_object(file) if file.is_file() else None


# ---- named operating points ---------------------------------------------------------------------

_POINT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def check_point_name(name: str) -> str:
    """``name`` when it can name an operating point (letters, digits, ``.``, ``_``, ``-``; up to 64
    characters; it shows in file columns and URLs); ``ValueError`` otherwise."""
    if not isinstance(name, str) or not _POINT_NAME.match(name):
        raise ValueError(
            f"operating point name {name!r}: use 1-64 letters, digits, '.', '_' or '-', starting with a "
            "letter or digit"
        )
    return name


def _read_points_file(path: str | Path) -> dict[str, Any]:
    file = Path(path) / OPERATING_POINTS_FILE
    if not file.is_file():
        return {"points": {}, "replaced": []}
    content = _read_object(file, "a valid operating-points file (not a JSON object)")
    if not isinstance(content.get("points"), dict):
        raise RunError(f"{file}: not a valid operating-points file (no 'points' object)")
    for name, point in content["points"].items():
        _check_threshold(point, f"{file}: operating point {name!r}")
    return {"points": content["points"], "replaced": list(content.get("replaced") or [])}


def read_operating_points(path: str | Path) -> dict[str, dict[str, Any]]:
    """The named operating points of a run (``operating_points.json``), by name; ``{}`` when none.
    The ``default`` point is ``threshold.json`` (:func:`read_threshold`)."""
    return dict(_read_points_file(path)["points"])


def operating_point_names(path: str | Path) -> list[str]:
    """``default`` and the named points, in that order (the others sorted)."""
    return [DEFAULT_OPERATING_POINT, *sorted(read_operating_points(path))]


def read_operating_point(path: str | Path, name: str | None = None) -> dict[str, Any]:
    """The operating point ``name`` (None or ``default``: ``threshold.json`` as saved by training);
    :class:`RunError` naming the known points when there is none of that name."""
    if name in (None, DEFAULT_OPERATING_POINT):
        return read_threshold(Path(path))
    points = read_operating_points(path)
    if name not in points:
        known = ", ".join(operating_point_names(path))
        raise RunError(f"{path}: no operating point {name!r}; known: {known}")
    return dict(points[name])


def save_operating_point(path: str | Path, point: dict[str, Any], *, replace: bool = False) -> None:
    """Add ``point`` (a dict with ``name`` and ``threshold``) to the run's named points, written
    atomically. An existing name is refused unless ``replace``; the point it replaces is kept
    under ``replaced`` (nothing a site calibrated is lost). ``default`` is threshold.json and is
    never written here."""
    name = check_point_name(point.get("name", ""))
    if name == DEFAULT_OPERATING_POINT:
        raise ValueError(f"{DEFAULT_OPERATING_POINT!r} is the run's own threshold.json; choose another name")
    # Two sites calibrating the same run at once would each read the file, add their point and
    # write: the later write would drop the earlier point. The lock makes read-change-write one step.
    with FileLock(Path(path) / OPERATING_POINTS_LOCK):
        content = _read_points_file(path)
        if name in content["points"]:
            if not replace:
                raise ValueError(
                    f"{path}: operating point {name!r} exists; choose another name or replace it"
                )
            content["replaced"].append(content["points"][name])
        content["points"][name] = dict(point)
        write_json(Path(path) / OPERATING_POINTS_FILE, content)


# ---- the export folder -------------------------------------------------------------------------


def export_dir(path: str | Path) -> Path:
    return Path(path) / EXPORT_DIR


def read_export_info(path: str | Path) -> dict[str, Any] | None:
    """export.json of a run's export, or None when there is no complete export."""
    info = export_dir(path) / EXPORT_INFO_FILE
    return read_json(info) if info.is_file() and (info.parent / ONNX_FILE).is_file() else None


def model_sha256(path: str | Path) -> str:
    """SHA-256 of the run's model.keras (what an export records, to detect retraining)."""
    return file_sha256(Path(path) / MODEL_FILE)


def export_is_stale(path: str | Path, info: dict[str, Any]) -> bool:
    """Whether model.keras changed since the export described by ``info`` was made."""
    return (Path(path) / MODEL_FILE).is_file() and model_sha256(path) != info.get("model_sha256")
