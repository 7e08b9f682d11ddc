"""A trained run's own input gate on the non-chest-X-ray dev set and on chest X-rays it never saw.

``gate_eval.py`` compares gate variants on ImageNet Xception; this script checks the gate a run
actually ships (``gate/``, fitted by ``train`` on that run's model and backbone), so that a
backbone is not made the default before its gate is measured. It classifies through
``Run.classify_images`` (decode → preprocess → gated forward pass), as ``predict`` does:

- the dev set of ``ood_devset.py`` (package sample images, rendered documents and charts,
  synthetic images, and transformations of held-out chest X-rays), rejection per category;
- held-out chest X-rays: ``holdout_eval.csv`` and ``shift_eval.csv`` of a ``bench/quality.py``
  run (patients the run neither trained nor validated on), accepted and marked unusual;
- the full-resolution originals of ``kermany-fullres``, an adult frontal chest radiograph in
  DICOM (pydicom-data's RG1, another population that should pass), and held-out images under
  each fixed robustness perturbation (``augment.PERTURBATIONS``).

The AUROC of each category's domain scores against the held-out chest X-rays says how well the
score separates them at any limit, not only at the run's.

    python bench/gate_run_eval.py runs/quality-group-mnv2 --json gate-run.json
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from _common import FULLRES_DIR, add_json_argument, emit, fail, require_run
from gate_eval import _auroc
from ood_devset import adult_frontal_cxr, devset


def _args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("run", type=Path, help="a run directory made by bench/quality.py")
    parser.add_argument("--fullres", type=Path, default=FULLRES_DIR)
    parser.add_argument("--n-holdout", type=int, default=300, help="held-out chest X-rays per holdout csv")
    parser.add_argument("--n-perturbed", type=int, default=40, help="held-out images per perturbation")
    parser.add_argument("--n-cxr-derived", type=int, default=24, help="held-out CXRs to transform")
    parser.add_argument("--seed", type=int, default=2024)
    add_json_argument(parser)
    return parser.parse_args()


def _held_out_paths(run: Path, n: int, seed: int) -> dict[str, list[str]]:
    """Up to ``n`` images of each holdout csv that bench/quality.py left beside the run."""
    sides = {}
    for name in ("holdout_eval.csv", "shift_eval.csv"):
        if (run / name).is_file():
            df = pd.read_csv(run / name)
            sides[name.removesuffix(".csv")] = list(df.sample(n=min(n, len(df)), random_state=seed)["path"])
    if not sides:
        fail(f"{run}: no holdout_eval.csv or shift_eval.csv (make the run with bench/quality.py)")
    return sides


def main() -> None:
    args = _args()
    run_dir = require_run(args.run)
    if not (run_dir / "gate" / "gate.json").is_file():
        fail(f"{run_dir}: the run has no input gate (gate/gate.json)")
    from cxr_pneumonia.augment import PERTURBATIONS
    from cxr_pneumonia.io import load_image
    from cxr_pneumonia.predict import Run

    t_start = time.perf_counter()
    rng = np.random.default_rng(args.seed)
    run = Run.load(run_dir)

    def scores(images: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Domain score, rejected and unusual per image."""
        predictions = run.classify_images(images)
        return (
            np.array([p.domain_score for p in predictions]),
            np.array([p.status == "rejected" for p in predictions]),
            np.array([p.unusual for p in predictions]),
        )

    def acceptance(rejected: np.ndarray, unusual: np.ndarray) -> dict[str, Any]:
        return {
            "n": len(rejected),
            "accepted": round(1 - rejected.mean(), 4),
            "unusual": round(unusual.mean(), 4),
        }

    held_out_paths = _held_out_paths(run_dir, args.n_holdout, args.seed)
    held_out = {k: [load_image(p) for p in paths] for k, paths in held_out_paths.items()}
    pool = [img for images in held_out.values() for img in images]
    cxr_for_dev = [pool[i] for i in rng.choice(len(pool), args.n_cxr_derived, replace=False)]
    dev = list(devset(cxr_for_dev))
    categories = np.array([c for c, _, _ in dev])
    dev_score, dev_rejected, _ = scores([img for _, _, img in dev])

    cxr: dict[str, Any] = {}
    held_out_scores = []
    for name, images in held_out.items():
        s, rejected, unusual = scores(images)
        held_out_scores.append(s)
        cxr[name] = acceptance(rejected, unusual)
    inlier = np.concatenate(held_out_scores)
    fullres = [load_image(p) for p in sorted(Path(args.fullres).rglob("*.jpeg"))]
    if fullres:
        cxr["fullres"] = acceptance(*scores(fullres)[1:])
    # An adult frontal chest radiograph from another population (pydicom-data's RG1, DICOM).
    adult_score, adult_rejected, adult_unusual = scores([img for _, img in adult_frontal_cxr()])
    cxr["adult_dicom"] = acceptance(adult_rejected, adult_unusual) | {
        "domain_scores": [round(float(v), 2) for v in adult_score]
    }
    picked = [pool[i] for i in rng.choice(len(pool), min(args.n_perturbed, len(pool)), replace=False)]
    perturbed = {
        name: round(1 - scores([fn(img) for img in picked])[1].mean(), 3)
        for name, fn in PERTURBATIONS.items()
    }

    per_category = {
        cat: {
            "n": int((categories == cat).sum()),
            "rejected": round(float(dev_rejected[categories == cat].mean()), 3),
            "auroc": round(_auroc(inlier, dev_score[categories == cat]), 4),
        }
        for cat in dict.fromkeys(categories)
    }
    figures = {
        "run": str(run_dir),
        "backbone": run.config["model"]["backbone"],
        "gate_limit": float(run.gate.limit),
        "dev_rejected_overall": round(float(dev_rejected.mean()), 4),
        "dev_auroc_overall": round(_auroc(inlier, dev_score), 4),
        "per_category": per_category,
        "accepted_not_rejected": [
            f"{c}/{n}" for (c, n, _), r in zip(dev, dev_rejected, strict=True) if not r
        ],
        "chest_xrays": cxr,
        "perturbed_accepted": perturbed,
        "wall_s": round(time.perf_counter() - t_start, 1),
    }
    summary = [
        f"{run_dir} ({figures['backbone']}): dev rejected {figures['dev_rejected_overall']:.1%} "
        f"(AUROC {figures['dev_auroc_overall']:.4f} vs held-out chest X-rays)",
        *(
            f"  {c:16s} n={v['n']:3d} rejected {v['rejected']:.1%} AUROC {v['auroc']:.4f}"
            for c, v in per_category.items()
        ),
        *(
            f"  chest X-rays {k}: {v['accepted']:.1%} accepted of {v['n']}, {v['unusual']:.1%} unusual"
            for k, v in cxr.items()
        ),
        f"  perturbed held-out accepted (min over {len(perturbed)}): {min(perturbed.values()):.0%}",
    ]
    emit(figures, summary, args.json)


if __name__ == "__main__":
    main()
