"""Inference speed: the project's ``predict`` against plain float32 ``model.predict`` of the same model.

Both sides score the same ``--n`` images (a seeded subset of ``--images``) from their files,
each in its own fresh process (own peak RSS), after an untimed warm-up batch:

* project: ``Run.load(RUN, runtime=...).predict_paths(paths)`` (decode, preprocessing, model,
  as the product does; with ``--runtime auto`` that is the run's export when there is one, so
  run ``cxr-pneumonia export RUN`` first to measure the fast path);
* plain: OpenCV decoding, the run's preprocessing pipeline, then
  ``keras.models.load_model(...).predict(batch, batch_size=32)`` in float32.

Reported: images/s of each, their ratio, the largest absolute probability difference (over all
images, and over those outside the run's validation split, which the export's precision check
never saw) and the ROC-AUC of each side against the folder labels. The run may have been
trained on these images: the AUCs compare the two code paths, not the model's quality.

    python bench/inference_speed.py runs/quality-xception --n 624
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from _common import (
    KERMANY224_TRAIN,
    Timer,
    add_json_argument,
    child_figures,
    emit,
    fail,
    per_second,
    ratio,
    require_run,
    run_side,
    warm_page_cache,
)

NOTE = (
    "images drawn from --images; the run may have trained on them, so the AUCs compare the "
    "two code paths, not the model's quality"
)


def project_side(args: argparse.Namespace, paths: list[str], figures: dict[str, Any]) -> np.ndarray:
    from cxr_pneumonia.predict import Run

    with Timer() as load:
        run = Run.load(args.run, runtime=args.runtime)
    figures["runtime"] = run.runtime
    with Timer() as warmup:
        run.predict_paths(paths[: args.batch_size + 1], batch_size=args.batch_size)
    with Timer() as timed:
        predictions = run.predict_paths(paths, batch_size=args.batch_size)
    scores = np.array([np.nan if p.probability is None else p.probability for p in predictions])
    figures.update(
        load_s=round(load.seconds, 2),
        warmup_s=round(warmup.seconds, 2),
        predict_s=round(timed.seconds, 2),
        n_failed=int(np.isnan(scores).sum()),
    )
    return scores


def decode(path: str) -> np.ndarray:
    """Grayscale uint8 with OpenCV. Colour is decoded and converted as the project's reader does
    (IMREAD_GRAYSCALE lets libjpeg round differently), so the difference measures the model path."""
    import cv2

    image = cv2.imread(path, cv2.IMREAD_COLOR)
    if image is None:
        raise OSError(f"{path}: OpenCV cannot decode it")
    return cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)


def plain_side(args: argparse.Namespace, paths: list[str], figures: dict[str, Any]) -> np.ndarray:
    import keras

    from cxr_pneumonia.config import from_dict, read_json
    from cxr_pneumonia.preprocess import PreprocessConfig, build_pipeline

    keras.mixed_precision.set_global_policy("float32")
    with Timer() as load:
        model = keras.models.load_model(args.run / "model.keras", compile=False)
        pipeline = build_pipeline(
            from_dict(PreprocessConfig, read_json(args.run / "config.json")["preprocess"])
        )

    def batch_of(part: list[str]) -> np.ndarray:
        return np.stack([pipeline(decode(p)) for p in part])[..., None].astype(np.float32)

    with Timer() as warmup:
        # A full and a partial batch: Keras traces its predict function once for each shape kind.
        model.predict(batch_of(paths[: args.batch_size + 1]), batch_size=args.batch_size, verbose=0)
    with Timer() as prepare:
        x = batch_of(paths)
    with Timer() as forward:
        scores = model.predict(x, batch_size=args.batch_size, verbose=0).reshape(-1).astype(np.float64)
    figures.update(
        load_s=round(load.seconds, 2),
        warmup_s=round(warmup.seconds, 2),
        decode_preprocess_s=round(prepare.seconds, 2),
        model_s=round(forward.seconds, 2),
        predict_s=round(prepare.seconds + forward.seconds, 2),
        n_failed=0,
    )
    return scores


def choose_images(folder: Path, n: int, seed: int) -> pd.DataFrame:
    from cxr_pneumonia.data import discover

    images = discover(folder)
    return images.sample(n=n, random_state=seed) if 0 < n < len(images) else images


def compare(
    images: pd.DataFrame, project: np.ndarray, plain: np.ndarray, threshold: float, validation: set[str]
) -> dict[str, Any]:
    from sklearn.metrics import roc_auc_score

    y = images["label"].to_numpy()
    ok = ~np.isnan(project) & ~np.isnan(plain)
    unseen = ok & ~images["path"].isin(validation).to_numpy()
    both = y[ok].min() != y[ok].max() if ok.any() else False
    auc = {
        name: float(roc_auc_score(y[ok], s[ok])) if both else None
        for name, s in (("project", project), ("plain", plain))
    }
    return {
        "n_compared": int(ok.sum()),
        "max_abs_probability_diff": float(np.max(np.abs(project[ok] - plain[ok]))) if ok.any() else None,
        "n_outside_validation": int(unseen.sum()),
        "max_abs_probability_diff_outside_validation": (
            float(np.max(np.abs(project[unseen] - plain[unseen]))) if unseen.any() else None
        ),
        "roc_auc_project": auc["project"],
        "roc_auc_plain": auc["plain"],
        "roc_auc_diff": abs(auc["project"] - auc["plain"]) if both else None,
        "label_agreement": float(np.mean((project[ok] >= threshold) == (plain[ok] >= threshold))),
    }


def _runtime(info: dict[str, Any]) -> str:
    return f"{info['backend']}, {info['precision']}"


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4g}"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("run", type=Path, help="Run directory.")
    parser.add_argument(
        "--images", type=Path, default=KERMANY224_TRAIN, help="Labelled images (class folders)."
    )
    parser.add_argument("--n", type=int, default=624, help="Images to score (0: all).")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the image subset.")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument(
        "--runtime", choices=("auto", "keras", "openvino"), default="auto", help="Project side's runtime."
    )
    # Internal: one side in a fresh process.
    parser.add_argument("--side", choices=("project", "plain"), help=argparse.SUPPRESS)
    parser.add_argument("--paths", type=Path, help=argparse.SUPPRESS)
    add_json_argument(parser)
    args = parser.parse_args()
    run = require_run(args.run)

    if args.side is not None:
        paths = args.paths.read_text(encoding="utf-8").splitlines()
        with child_figures(args.json) as figures:
            scores = (project_side if args.side == "project" else plain_side)(args, paths, figures)
            figures["images_per_s"] = per_second(len(paths), figures["predict_s"])
        np.save(args.json.with_suffix(".npy"), scores)
        return

    if not args.images.is_dir():
        fail(f"{args.images}: image folder not found")
    images = choose_images(args.images, args.n, args.seed)
    warm_page_cache(images["path"])
    with tempfile.TemporaryDirectory(prefix="bench-inference-") as tmp:
        work = Path(tmp)
        (work / "paths.txt").write_text("\n".join(images["path"]) + "\n", encoding="utf-8")
        sides, scores = {}, {}
        for side in ("project", "plain"):
            side_args = [
                str(run),
                "--side",
                side,
                "--paths",
                str(work / "paths.txt"),
                "--batch-size",
                str(args.batch_size),
                "--runtime",
                args.runtime,
            ]
            sides[side] = run_side(Path(__file__), side_args, work / f"{side}.json", label=f"{side} side")
            scores[side] = np.load(work / f"{side}.npy")
    from cxr_pneumonia.config import read_json

    threshold = float(read_json(run / "threshold.json")["threshold"])
    val_csv = run / "val_predictions.csv"
    validation = set(pd.read_csv(val_csv)["path"]) if val_csv.is_file() else set()
    project, plain = sides["project"], sides["plain"]
    figures = {
        "run": str(run),
        "images": str(args.images),
        "n_images": len(images),
        "seed": args.seed,
        "note": NOTE,
        "project": project,
        "plain": plain,
        "speedup": ratio(plain["predict_s"], project["predict_s"]),
        **compare(images, scores["project"], scores["plain"], threshold, validation),
    }
    summary = [
        f"{len(images)} images of {args.images} (seed {args.seed}); {NOTE}",
        f"project predict_paths ({_runtime(project['runtime'])}): {project['images_per_s']} images/s "
        f"({project['predict_s']} s), peak RSS {project['peak_rss_mb']} MiB",
        f"plain fp32 model.predict: {plain['images_per_s']} images/s ({plain['predict_s']} s, of which "
        f"{plain['model_s']} s model), peak RSS {plain['peak_rss_mb']} MiB",
        f"speed-up {figures['speedup']}×; largest |Δp| {_fmt(figures['max_abs_probability_diff'])} "
        f"({_fmt(figures['max_abs_probability_diff_outside_validation'])} on the "
        f"{figures['n_outside_validation']} images outside the validation split); "
        f"ROC-AUC project {_fmt(figures['roc_auc_project'])}, plain {_fmt(figures['roc_auc_plain'])}, "
        f"difference {_fmt(figures['roc_auc_diff'])}; "
        f"same label for {100 * figures['label_agreement']:.1f} %",
    ]
    emit(figures, summary, args.json)


if __name__ == "__main__":
    main()
