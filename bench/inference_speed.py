"""Inference speed: the project's ``predict`` against plain float32 ``model.predict``, and the small
distilled student's (and an ensemble's) ``predict`` against the same plain baseline.

Every side scores the same ``--n`` images (a seeded subset of ``--images``) from their files,
each in its own fresh process (own peak RSS), after an untimed warm-up batch:

* plain: OpenCV decoding, RUN's preprocessing pipeline, then
  ``keras.models.load_model(...).predict(batch, batch_size=32)`` in float32 (the baseline);
* project: ``Run.load(RUN, runtime=...).predict_paths(paths)`` (decode, preprocess, input gate,
  model, as the product does; with ``--runtime auto`` that is the run's export when there is one,
  so run ``cxr-pneumonia export RUN`` first to measure the fast path);
* student (``--student S``): the same project ``predict_paths`` of the student run S;
* ensemble (``--ensemble E``): the same, of a run directory ``Run.load`` opens.

Reported: images/s of each, each side's speed-up over plain (plain seconds / its seconds), the
largest absolute probability difference between project and plain of RUN (over all images, and
over those outside the run's validation split, which the export's precision check never saw),
the ROC-AUC of each side against the folder labels, and how often the student's label agrees
with RUN's. The runs may have been trained on these images: the AUCs compare code paths and
models on the same files, not the models' quality.

    python bench/inference_speed.py runs/quality-xception --n 624
    python bench/inference_speed.py runs/quality-xception --student runs/mobilenetv2-distilled
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
    "images drawn from --images; the runs may have trained on them, so the AUCs compare code paths "
    "and models on the same files, not the models' quality"
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
        n_failed=sum(p.status == "error" for p in predictions),
        n_rejected=sum(p.status == "rejected" for p in predictions),  # by the input gate: no probability
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


def auc(y: np.ndarray, scores: np.ndarray) -> float | None:
    from sklearn.metrics import roc_auc_score

    ok = ~np.isnan(scores)
    return float(roc_auc_score(y[ok], scores[ok])) if ok.any() and y[ok].min() != y[ok].max() else None


def compare(
    images: pd.DataFrame, project: np.ndarray, plain: np.ndarray, threshold: float, validation: set[str]
) -> dict[str, Any]:
    """The same run through the project and through plain Keras: how far apart the probabilities are."""
    y = images["label"].to_numpy()
    ok = ~np.isnan(project) & ~np.isnan(plain)
    unseen = ok & ~images["path"].isin(validation).to_numpy()
    aucs = {name: auc(y[ok], s[ok]) for name, s in (("project", project), ("plain", plain))}
    both = None not in aucs.values()
    return {
        "n_compared": int(ok.sum()),
        "max_abs_probability_diff": float(np.max(np.abs(project[ok] - plain[ok]))) if ok.any() else None,
        "n_outside_validation": int(unseen.sum()),
        "max_abs_probability_diff_outside_validation": (
            float(np.max(np.abs(project[unseen] - plain[unseen]))) if unseen.any() else None
        ),
        "roc_auc_project": aucs["project"],
        "roc_auc_plain": aucs["plain"],
        "roc_auc_diff": abs(aucs["project"] - aucs["plain"]) if both else None,
        "label_agreement": float(np.mean((project[ok] >= threshold) == (plain[ok] >= threshold))),
    }


def other_model(
    images: pd.DataFrame, scores: np.ndarray, threshold: float, plain: np.ndarray, plain_threshold: float
) -> dict[str, Any]:
    """Another run (student, ensemble) on the same images: its AUC and agreement with RUN's labels."""
    ok = ~np.isnan(scores) & ~np.isnan(plain)
    agree = (scores[ok] >= threshold) == (plain[ok] >= plain_threshold)
    return {
        "roc_auc": auc(images["label"].to_numpy(), scores),
        "label_agreement_with_plain": float(np.mean(agree)) if ok.any() else None,
    }


def _runtime(info: dict[str, Any]) -> str:
    return f"{info['backend']}, {info['precision']}"


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4g}"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "run", type=Path, help="Run directory (the teacher: its plain fp32 Keras is the baseline)."
    )
    parser.add_argument(
        "--student", type=Path, help="A student run: its project predict against the baseline."
    )
    parser.add_argument("--ensemble", type=Path, help="An ensemble run directory, measured as the student.")
    parser.add_argument(
        "--images", type=Path, default=KERMANY224_TRAIN, help="Labelled images (class folders)."
    )
    parser.add_argument("--n", type=int, default=624, help="Images to score (0: all).")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the image subset.")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument(
        "--runtime", choices=("auto", "keras", "openvino"), default="auto", help="Project sides' runtime."
    )
    # Internal: one side in a fresh process.
    parser.add_argument("--side", choices=("project", "plain"), help=argparse.SUPPRESS)
    parser.add_argument("--paths", type=Path, help=argparse.SUPPRESS)
    add_json_argument(parser)
    return parser.parse_args()


def measure_sides(
    args: argparse.Namespace, images: pd.DataFrame, sides: dict[str, tuple[Path, str]]
) -> tuple[dict[str, dict], dict[str, np.ndarray]]:
    """Each side (name: (run, "plain" | "project")) in its own process, on the same files."""
    figures, scores = {}, {}
    with tempfile.TemporaryDirectory(prefix="bench-inference-") as tmp:
        work = Path(tmp)
        (work / "paths.txt").write_text("\n".join(images["path"]) + "\n", encoding="utf-8")
        for name, (run, kind) in sides.items():
            side_args = [str(run), "--side", kind, "--paths", str(work / "paths.txt")]
            side_args += ["--batch-size", str(args.batch_size), "--runtime", args.runtime]
            figures[name] = run_side(Path(__file__), side_args, work / f"{name}.json", label=f"{name} side")
            figures[name]["run"] = str(run)
            scores[name] = np.load(work / f"{name}.npy")
    return figures, scores


def _threshold(run: Path) -> float:
    from cxr_pneumonia.config import read_json

    return float(read_json(run / "threshold.json")["threshold"])


def summary_lines(args: argparse.Namespace, figures: dict[str, Any], n: int) -> list[str]:
    project, plain = figures["project"], figures["plain"]
    lines = [
        f"{n} images of {args.images} (seed {args.seed}); {NOTE}",
        f"plain fp32 model.predict of {args.run}: {plain['images_per_s']} images/s ({plain['predict_s']} s, "
        f"of which {plain['model_s']} s model), peak RSS {plain['peak_rss_mb']} MiB",
        f"project predict_paths ({_runtime(project['runtime'])}): {project['images_per_s']} images/s "
        f"({project['predict_s']} s), peak RSS {project['peak_rss_mb']} MiB",
        f"speed-up {figures['speedup']}×; largest |Δp| {_fmt(figures['max_abs_probability_diff'])} "
        f"({_fmt(figures['max_abs_probability_diff_outside_validation'])} on the "
        f"{figures['n_outside_validation']} images outside the validation split); "
        f"ROC-AUC project {_fmt(figures['roc_auc_project'])}, plain {_fmt(figures['roc_auc_plain'])}, "
        f"difference {_fmt(figures['roc_auc_diff'])}; "
        f"same label for {100 * figures['label_agreement']:.1f} %",
    ]
    for name in ("student", "ensemble"):
        if name in figures:
            side = figures[name]
            lines.append(
                f"{name} predict_paths of {side['run']} ({_runtime(side['runtime'])}): "
                f"{side['images_per_s']} images/s ({side['predict_s']} s), "
                f"peak RSS {side['peak_rss_mb']} MiB, {side['n_rejected']} rejected by its gate; "
                f"{side['speedup_vs_plain']}× plain fp32 of {args.run.name}; "
                f"ROC-AUC {_fmt(side['roc_auc'])}; "
                f"same label as plain for {100 * (side['label_agreement_with_plain'] or 0):.1f} %"
            )
    return lines


def main() -> None:
    args = parse_args()
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
    sides = {"project": (run, "project"), "plain": (run, "plain")}
    for name in ("student", "ensemble"):
        if getattr(args, name) is not None:
            sides[name] = (require_run(getattr(args, name)), "project")
    images = choose_images(args.images, args.n, args.seed)
    warm_page_cache(images["path"])
    measured, scores = measure_sides(args, images, sides)
    val_csv = run / "val_predictions.csv"
    validation = set(pd.read_csv(val_csv)["path"]) if val_csv.is_file() else set()
    plain_threshold = _threshold(run)
    for name in ("student", "ensemble"):
        if name in measured:
            other = sides[name][0]
            measured[name]["speedup_vs_plain"] = ratio(
                measured["plain"]["predict_s"], measured[name]["predict_s"]
            )
            measured[name].update(
                other_model(images, scores[name], _threshold(other), scores["plain"], plain_threshold)
            )
    figures = {
        "run": str(run),
        "images": str(args.images),
        "n_images": len(images),
        "seed": args.seed,
        "note": NOTE,
        **measured,
        "speedup": ratio(measured["plain"]["predict_s"], measured["project"]["predict_s"]),
        **compare(images, scores["project"], scores["plain"], plain_threshold, validation),
    }
    emit(figures, summary_lines(args, figures, len(images)), args.json)


if __name__ == "__main__":
    main()
