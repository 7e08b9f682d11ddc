"""Tests for report: training curves, figures and the self-contained HTML report."""

from __future__ import annotations

import base64
import re
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from cxr_pneumonia import report
from cxr_pneumonia.evaluate import compute_metrics

PNG_URI = "data:image/png;base64,"


def _history(columns: list[str], n: int = 6) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    frame = pd.DataFrame({c: rng.random(n) for c in columns})
    frame["stage"] = ["head"] * (n // 2) + ["fine_tune"] * (n - n // 2)
    return frame


@pytest.mark.parametrize(
    ("columns", "titles"),
    [
        (["loss", "val_loss"], ["loss"]),
        (["loss", "val_loss", "accuracy", "val_auc"], ["loss", "accuracy", "auc"]),
        (
            [
                "loss",
                "val_loss",
                "accuracy",
                "val_accuracy",
                "recall",
                "val_recall",
                "precision",
                "val_precision",
                "auc",
                "val_auc",
                "lr",
            ],
            ["loss", "accuracy", "recall", "precision", "auc"],
        ),
    ],
)
def test_training_curves_one_axis_per_present_metric(columns: list[str], titles: list[str]) -> None:
    fig = report.training_curves_figure(_history(columns))
    assert [ax.get_title() for ax in fig.axes] == titles
    ax = fig.axes[0]
    labels = [line.get_label() for line in ax.get_lines()]
    assert "fine-tuning starts" in labels
    fine_tune_line = ax.get_lines()[labels.index("fine-tuning starts")]
    assert list(fine_tune_line.get_xdata()) == [3.5, 3.5]  # between epoch 3 (head) and 4
    expected_series = sum(c in columns for c in (titles[0], f"val_{titles[0]}"))
    assert len([lb for lb in labels if lb in ("train", "validation")]) == expected_series


def test_training_curves_without_stage_has_no_marker() -> None:
    history = _history(["loss", "val_loss"]).drop(columns="stage")
    fig = report.training_curves_figure(history)
    assert "fine-tuning starts" not in [line.get_label() for line in fig.axes[0].get_lines()]


def test_plot_training_curves_writes_png(tmp_path: Path) -> None:
    path = tmp_path / "plots" / "training_curves.png"
    report.plot_training_curves(_history(["loss", "val_loss", "auc", "val_auc"]), path)
    image = cv2.imread(str(path))
    assert image is not None and image.shape[1] > image.shape[0]  # two side-by-side panels


@pytest.mark.parametrize("history", [pd.DataFrame(), pd.DataFrame({"lr": [0.1, 0.2]})])
def test_training_curves_rejects_unusable_history(history: pd.DataFrame) -> None:
    with pytest.raises(ValueError, match="history"):
        report.training_curves_figure(history)


# ----------------------------------------------------------------------------- HTML report


@pytest.fixture
def dataset(tmp_path: Path) -> dict:
    """Eight scored images: 2 false negatives, 2 false positives at threshold 0.5."""
    rng = np.random.default_rng(0)
    names = [
        "tp_a.png",
        "tp_b.png",
        "fn_far.png",
        "fn_near.png",
        "tn_a.png",
        "tn_b.png",
        "fp_far.png",
        "fp_near.png",
    ]
    y = np.array([1, 1, 1, 1, 0, 0, 0, 0])
    scores = np.array([0.9, 0.8, 0.05, 0.4, 0.1, 0.2, 0.97, 0.6])
    image_dir = tmp_path / "images"
    image_dir.mkdir()
    paths = []
    for name in names:
        path = image_dir / name
        cv2.imwrite(str(path), rng.integers(0, 256, (300, 240), dtype=np.uint8))
        paths.append(str(path))
    return {"y": y, "scores": scores, "paths": paths, "threshold": 0.5}


def _write(tmp_path: Path, data: dict, **kwargs) -> str:
    metrics = compute_metrics(data["y"], data["scores"], data["threshold"], n_bootstrap=100)
    options = {"title": "Test report", "run_info": {"model": "run-1"}, **kwargs}
    path = report.write_report(
        tmp_path / "out",
        metrics=metrics,
        y_true=data["y"],
        scores=data["scores"],
        paths=data["paths"],
        threshold=data["threshold"],
        **options,
    )
    assert path == tmp_path / "out" / "report.html"
    return path.read_text(encoding="utf-8")


def test_report_is_self_contained_with_figures_metrics_and_gallery(tmp_path: Path, dataset: dict) -> None:
    run_info = {
        "model": "runs/<best>",
        "backbone": "densenet121",
        "threshold_rule": "max_specificity",
        "validation": {"recall": 0.981, "specificity": 0.7},
    }
    text = _write(tmp_path, dataset, run_info=run_info, title="Eval <test> & check")
    # 5 figures + 4 misclassified thumbnails loaded from disk.
    assert text.count(PNG_URI) == 9
    assert report.NOTICE.split(" —")[0] in text and "not a medical device" in text
    assert "http://" not in text and "https://" not in text
    assert not re.search(r"src=['\"](?!data:)", text)
    assert "Eval &lt;test&gt; &amp; check" in text and "<test>" not in text
    assert "runs/&lt;best&gt;" in text and "densenet121" in text and "0.981" in text
    metrics = compute_metrics(dataset["y"], dataset["scores"], 0.5, n_bootstrap=100)
    for name in ("accuracy", "recall", "specificity", "roc_auc", "pr_auc"):
        assert f"{metrics[name]:.3f}" in text, name
    lo, hi = metrics["ci95"]["recall"]
    assert f"{lo:.3f} – {hi:.3f}" in text
    # Misclassified only, false negatives first, each kind most wrong first.
    order = [text.index(f"<b>{n}</b>") for n in ("fn_far.png", "fn_near.png", "fp_far.png", "fp_near.png")]
    assert order == sorted(order)
    for correct in ("tp_a.png", "tn_b.png"):
        assert correct not in text
    plots = sorted(p.name for p in (tmp_path / "out" / "plots").glob("*.png"))
    assert plots == ["calibration.png", "confusion_matrix.png", "pr.png", "roc.png", "threshold_sweep.png"]
    assert not (tmp_path / "out" / "metrics.json").exists()


def test_report_uses_given_thumbnails_heatmaps_and_tolerates_unreadable(
    tmp_path: Path, dataset: dict
) -> None:
    paths = dataset["paths"]
    Path(paths[2]).write_bytes(b"not an image")  # fn_far: unreadable on disk
    Path(paths[6]).unlink()  # fp_far: missing, but a thumbnail is supplied
    thumbnails = {paths[6]: np.full((64, 64), 200, dtype=np.uint8)}
    heatmaps = {
        paths[3]: np.zeros((50, 40, 3), dtype=np.uint8),
        paths[7]: np.full((50, 40, 3), 255, dtype=np.uint8),
    }
    text = _write(tmp_path, dataset, thumbnails=thumbnails, heatmaps=heatmaps)
    # 5 figures + 3 thumbnails (fn_far unreadable) + 2 heatmaps.
    assert text.count(PNG_URI) == 10
    assert text.count('alt="heatmap"') == 2
    assert "image unreadable" in text
    assert "fn_far.png" in text


def test_report_caps_gallery_keeping_both_kinds(tmp_path: Path, dataset: dict) -> None:
    text = _write(tmp_path, dataset, max_misclassified=2)
    assert "fn_far.png" in text and "fp_far.png" in text
    assert "fn_near.png" not in text and "fp_near.png" not in text
    assert text.count("showing 1 of 2") == 2


def test_report_with_one_class_skips_curves(tmp_path: Path, dataset: dict) -> None:
    data = {**dataset, "y": np.ones(8, dtype=int)}
    with pytest.warns(UserWarning, match="one class"):
        text = _write(tmp_path, data)
    assert "ROC curve: not defined with only one class" in text
    assert not (tmp_path / "out" / "plots" / "roc.png").exists()
    assert "n/a" in text  # AUCs and their intervals


KNOWN = {
    # Hand-checked: 6 positive-negative pairs, 5 ordered right -> ROC AUC 5/6 = 0.833; ranking
    # P P N P N -> AP = (1/1 + 2/2 + 3/4) / 3 = 0.917. At t=0.35: TN 1, FP 1 (0.4), FN 1 (0.3), TP 2;
    # at t=0.5: TN 2, FP 0, FN 1, TP 2.
    "y": np.array([1, 1, 1, 0, 0]),
    "scores": np.array([0.9, 0.6, 0.3, 0.4, 0.1]),
    "threshold": 0.35,
}


def _known(tmp_path: Path, names: list[str] | None = None, **kwargs) -> str:
    names = names or ["p_high.png", "p_mid.png", "p_missed.png", "n_alarm.png", "n_low.png"]
    thumbnails = {name: np.full((32, 32), 100, dtype=np.uint8) for name in names}
    return _write(tmp_path, {**KNOWN, "paths": names}, thumbnails=thumbnails, **kwargs)


def test_report_shows_known_confusion_counts_and_auc(tmp_path: Path) -> None:
    text = _known(tmp_path)
    assert "<tr><th>ROC AUC</th><td>0.833</td>" in text
    assert "<tr><th>PR AUC (average precision)</th><td>0.917</td>" in text
    assert "<tr><th>Recall (sensitivity)</th><td>0.667</td>" in text
    confusion_row = re.search(r"<tr><th>Confusion \[\[TN, FP\], \[FN, TP\]\]</th>(.*?)</tr>", text).group(1)
    cells = re.findall(r"<td[^>]*>(.*?)</td>", confusion_row)
    assert cells == ["[[1, 1], [1, 2]]", "", "[[2, 0], [1, 2]]"]  # operating threshold, -, t=0.5
    assert "5 images: 3 PNEUMONIA, 2 NORMAL. Decision rule: PNEUMONIA when score ≥ 0.35." in text
    # The gallery holds exactly the one false negative and the one false positive.
    assert re.findall(r"<b>(.*?)</b>", text) == ["p_missed.png", "n_alarm.png"]
    assert "score 0.300 · true PNEUMONIA · predicted NORMAL" in text
    assert "score 0.400 · true NORMAL · predicted PNEUMONIA" in text


def test_report_escapes_script_in_file_names_title_and_run_info(tmp_path: Path) -> None:
    evil = "<script>alert(1)</script>"
    names = [f"{evil}.png", "b.png", "c.png", "d.png", "e.png"]
    names[2] = f"x'\"{evil}.png"  # the false negative: shown in the gallery, with quotes
    text = _known(tmp_path, names, title=f"Report {evil}", run_info={evil: {"nested": evil}})
    assert "<script" not in text.lower()
    escaped = "&lt;script&gt;alert(1)&lt;/script&gt;"
    assert f"<title>Report {escaped}</title>" in text and f"<h1>Report {escaped}</h1>" in text
    assert f"<th>{escaped}</th>" in text and f"<th>nested</th><td>{escaped}</td>" in text
    assert f'<figure title="x&#39;&#34;{escaped}.png">' in text  # quotes cannot end the attribute


def test_report_embeds_every_image_as_png_data(tmp_path: Path, dataset: dict) -> None:
    text = _write(tmp_path, dataset)
    sources = re.findall(r"<img src=\"([^\"]*)\"", text)
    assert len(sources) == 9 and all(src.startswith(PNG_URI) for src in sources)
    images = [base64.b64decode(src[len(PNG_URI) :]) for src in sources]
    for png in images:
        decoded = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_UNCHANGED)
        assert png.startswith(b"\x89PNG") and decoded is not None and decoded.size > 0
    plots = tmp_path / "out" / "plots"
    saved = {p.read_bytes() for p in plots.glob("*.png")}
    assert len(saved) == 5 and saved <= set(images)  # the figures on disk are the ones embedded
    thumbnail = cv2.imdecode(np.frombuffer(images[5], np.uint8), cv2.IMREAD_UNCHANGED)
    assert thumbnail.shape == (128, 102)  # 300x240 source shrunk to the 128-pixel thumbnail


def test_report_states_research_use_notice_at_top_and_bottom(tmp_path: Path, dataset: dict) -> None:
    text = _write(tmp_path, dataset)
    assert text.count(f'<p class="notice">{report.NOTICE}</p>') == 2
    assert text.index(report.NOTICE) < text.index("<h2>Metrics</h2>")
    assert text.rindex(report.NOTICE) > text.index("<h2>Misclassified images</h2>")


def test_report_rejects_misaligned_paths(tmp_path: Path, dataset: dict) -> None:
    with pytest.raises(ValueError, match="paths has 7 items"):
        _write(tmp_path, {**dataset, "paths": dataset["paths"][:7]})


def test_report_rejects_grayscale_heatmap(tmp_path: Path, dataset: dict) -> None:
    heatmaps = {dataset["paths"][3]: np.zeros((50, 40), dtype=np.uint8)}
    with pytest.raises(ValueError, match="RGB"):
        _write(tmp_path, dataset, heatmaps=heatmaps)


@pytest.mark.parametrize(
    ("figure", "n_markers"),
    [(report.plot_roc, 2), (report.plot_pr, 2)],
)
def test_curves_mark_operating_point(figure, n_markers: int, dataset: dict) -> None:
    fig = figure(dataset["y"], dataset["scores"], 0.5)
    labels = [line.get_label() for line in fig.axes[0].get_lines()]
    assert sum(lb.startswith(("operating point", "t=0.5")) for lb in labels) == n_markers


def test_roc_operating_point_coordinates(dataset: dict) -> None:
    fig = report.plot_roc(dataset["y"], dataset["scores"], 0.5)
    line = next(ln for ln in fig.axes[0].get_lines() if ln.get_label().startswith("operating"))
    # threshold 0.5: 2 of 4 positives caught, 2 of 4 negatives flagged.
    assert (float(line.get_xdata()[0]), float(line.get_ydata()[0])) == (0.5, 0.5)


def test_confusion_matrix_figure_annotates_counts() -> None:
    fig = report.plot_confusion_matrix([[5, 1], [2, 8]])
    texts = sorted(t.get_text() for t in fig.axes[0].texts)
    assert texts == sorted(["5\n83.3%", "1\n16.7%", "2\n20.0%", "8\n80.0%"])


# --- the "Domain check" section ---------------------------------------------------------------


def _with_domain(tmp_path: Path, domain: dict | None, **extra) -> str:
    y, s = KNOWN["y"], KNOWN["scores"]
    metrics = compute_metrics(y, s, KNOWN["threshold"], n_bootstrap=0)
    if domain is not None:
        metrics.update(domain=domain, **extra)
    names = ["a.png", "b.png", "c.png", "d.png", "e.png"]
    thumbnails = {name: np.full((32, 32), 100, dtype=np.uint8) for name in names}
    path = report.write_report(
        tmp_path / "out", metrics=metrics, y_true=y, scores=s, paths=names, threshold=KNOWN["threshold"],
        title="t", run_info={}, thumbnails=thumbnails,
    )  # fmt: skip
    return path.read_text(encoding="utf-8")


def _section(text: str) -> str:
    return text[text.index('<h2 id="domain-check">') : text.index("<h2>Figures</h2>")]


def test_domain_check_shows_rejections_shift_and_both_metric_sets(tmp_path: Path) -> None:
    evil = "<script>x</script>.png"
    domain = {
        "checked": True, "gate": True, "n_images": 7, "n_rejected": 2, "n_unusual": 1, "limit": 12.3,
        "rejected": [
            {"path": f"/d/{evil}", "domain_score": 48.14, "reason": "not like the chest X-rays: 48.1"},
            {"path": "/d/knee.png", "domain_score": 20.0, "reason": "not like the chest X-rays: 20.0"},
        ],
        "shift": {"shifted": True, "message": "these images differ"},
        "message": "these images differ from the training data; the operating point may not hold here (…)",
    }  # fmt: skip
    every = {"n": 7, "recall": 0.25, "roc_auc": 0.5}
    section = _section(
        _with_domain(tmp_path, domain, all_images=every, accepted_images={"n": 5, "recall": 2 / 3})
    )
    assert "the metrics above are on the 5 of 7 images it accepted" in section
    assert "2 rejected" in section and "1 accepted but unlike" in section and "limit 12.30" in section
    assert "Batch shift:</b> these images differ from the training data; the operating point" in section
    assert "<tr><th>Images</th><td>5</td><td>7</td></tr>" in section
    assert "<tr><th>Recall (sensitivity)</th><td>0.667</td><td>0.250</td></tr>" in section
    assert "showing 2 of 2" in section and "<td>48.14</td>" in section and "knee.png" in section
    assert "<script" not in section


def test_domain_check_without_a_gate_or_without_a_record_says_so(tmp_path: Path) -> None:
    unchecked = _section(
        _with_domain(tmp_path, {"checked": False, "message": "this run has no domain model"})
    )
    assert '<p class="warning">this run has no domain model</p>' in unchecked
    assert "No input check was recorded" in _section(_with_domain(tmp_path / "b", None))


def test_domain_check_consistent_batch(tmp_path: Path) -> None:
    domain = {
        "checked": True, "gate": False, "n_images": 5, "n_rejected": 0, "n_unusual": 0, "limit": 3.0,
        "rejected": [], "shift": {"shifted": False, "share_above_unusual": 0.04, "expected_share": 0.05},
    }  # fmt: skip
    section = _section(_with_domain(tmp_path, domain, all_images={"n": 5}, accepted_images={"n": 5}))
    assert "input check was off (--no-gate): the metrics above are on all 5 images" in section
    assert "consistent with validation (4% beyond the usual range, 5% expected)" in section
    assert "Batch shift" not in section and "showing 0 of 0" in section


def test_evaluate_draws_heatmaps_for_exactly_the_misclassified_images_the_report_shows() -> None:
    """10 missed pneumonias at 0.3 and 100 false alarms at 0.9 or more, 48 places: the gallery shows
    the 10 false negatives and 38 false positives. Heatmaps once went to the 48 largest errors, all
    false positives, so the missed pneumonias showed without one."""
    from types import SimpleNamespace

    from cxr_pneumonia.evaluation import misclassified_overlays

    table = pd.DataFrame(
        {
            "path": [f"fn{i}" for i in range(10)] + [f"fp{i:03d}" for i in range(100)] + ["tp", "tn"],
            "label": [1] * 10 + [0] * 100 + [1, 0],
            "probability": [0.3] * 10 + [0.9 + i / 1000 for i in range(100)] + [0.95, 0.05],
        }
    )
    asked: list[str] = []

    def overlay_for(run, path):
        asked.append(path)
        return np.zeros((2, 2, 3), np.uint8)

    overlays = misclassified_overlays(SimpleNamespace(threshold=0.5), table, 48, overlay_for)
    assert asked == [f"fn{i}" for i in range(10)] + [f"fp{i:03d}" for i in range(99, 61, -1)]
    assert list(overlays) == asked
