"""Tests for evaluate: the recall-first operating point and metrics against scikit-learn."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    confusion_matrix,
    f1_score,
    precision_score,
    recall_score,
    roc_auc_score,
)

from cxr_pneumonia import evaluate
from cxr_pneumonia.evaluate import ThresholdChoice, choose_threshold, compute_metrics

# 10 positives and 10 negatives with distinct scores; answers below are worked out by hand.
POS = [0.95, 0.90, 0.85, 0.80, 0.75, 0.70, 0.65, 0.60, 0.35, 0.20]
NEG = [0.55, 0.50, 0.45, 0.40, 0.30, 0.25, 0.15, 0.10, 0.05, 0.02]
Y = np.array([1] * 10 + [0] * 10)
S = np.array(POS + NEG)


@pytest.mark.parametrize(
    ("target", "rule", "threshold", "recall", "specificity"),
    [
        # 9 positives need t <= 0.35; negatives >= 0.35 are 0.55, 0.5, 0.45, 0.4 -> spec 6/10.
        (0.9, "max_specificity", 0.35, 0.9, 0.6),
        # midpoint between 0.35 and the next lower score 0.30: same validation predictions.
        (0.9, "midpoint", 0.325, 0.9, 0.6),
        # 8 positives: t = 0.6 sits above every negative.
        (0.8, "max_specificity", 0.60, 0.8, 1.0),
        (0.8, "midpoint", 0.575, 0.8, 1.0),
        # target 0 ties every t >= 0.6 at spec 1; the lowest (highest recall) wins.
        (0.0, "max_specificity", 0.60, 0.8, 1.0),
        # all positives: t = 0.2 (lowest positive); negatives >= 0.2 are six -> spec 0.4.
        (1.0, "max_specificity", 0.20, 1.0, 0.4),
        (1.0, "midpoint", 0.175, 1.0, 0.4),
    ],
)
def test_choose_threshold_known_answers(
    target: float, rule: str, threshold: float, recall: float, specificity: float
) -> None:
    choice = choose_threshold(Y, S, target_recall=target, rule=rule)
    assert choice.threshold == pytest.approx(threshold)
    assert choice.recall == pytest.approx(recall)
    assert choice.specificity == pytest.approx(specificity)
    assert choice.rule == rule
    assert choice.target_recall == target
    assert choice.achievable


def test_choose_threshold_ties_prefer_higher_recall() -> None:
    # t = 0.8 and t = 0.7 both reach recall >= 0.5 with no false alarms; 0.7 catches all three.
    y = [1, 1, 1, 0, 0]
    s = [0.9, 0.8, 0.7, 0.6, 0.1]
    choice = choose_threshold(y, s, target_recall=0.5)
    assert choice.threshold == pytest.approx(0.7)
    assert (choice.recall, choice.specificity) == (1.0, 1.0)
    assert choose_threshold(y, s, target_recall=0.5, rule="midpoint").threshold == pytest.approx(0.65)


def test_choose_threshold_threshold_is_a_score_and_uses_ge_rule() -> None:
    choice = choose_threshold(Y, S, target_recall=0.9)
    assert choice.threshold in S
    pred = evaluate.apply_threshold(S, choice.threshold)
    # 0.35 itself is positive; positive 0.20 is missed; negatives 0.55 to 0.40 are false alarms.
    assert pred.tolist() == [1] * 9 + [0] + [1] * 4 + [0] * 6


def test_choose_threshold_target_only_met_by_flagging_everything_warns() -> None:
    # The lowest score is a positive: recall 1 requires calling every image positive.
    y = [1, 0, 0, 1]
    s = [0.1, 0.5, 0.2, 0.9]
    with pytest.warns(UserWarning, match="specificity 0"):
        choice = choose_threshold(y, s, target_recall=1.0)
    assert choice.threshold == pytest.approx(0.1)
    assert (choice.recall, choice.specificity, choice.achievable) == (1.0, 0.0, False)


def test_choose_threshold_midpoint_at_lowest_score_stays() -> None:
    y = [1, 0, 0, 1]
    s = [0.1, 0.5, 0.2, 0.9]
    with pytest.warns(UserWarning):
        choice = choose_threshold(y, s, target_recall=1.0, rule="midpoint")
    assert choice.threshold == pytest.approx(0.1)


def test_choose_threshold_midpoint_keeps_float32_predictions() -> None:
    # Adjacent float32 scores: the midpoint must not change any validation prediction.
    hi = np.float32(0.5)
    lo = np.nextafter(hi, np.float32(0))
    s = np.array([0.9, hi, lo, 0.1], dtype=np.float32)
    y = np.array([1, 1, 0, 0])
    exact = choose_threshold(y, s, target_recall=1.0)
    mid = choose_threshold(y, s, target_recall=1.0, rule="midpoint")
    assert exact.threshold == float(hi)
    assert lo < mid.threshold <= hi
    assert np.array_equal(evaluate.apply_threshold(s, mid.threshold), [1, 1, 0, 0])
    assert (mid.recall, mid.specificity) == (1.0, 1.0)


def test_threshold_choice_round_trips_through_json() -> None:
    choice = choose_threshold(Y, S, target_recall=0.9, rule="midpoint")
    payload = json.loads(json.dumps(choice.to_dict()))
    assert payload["threshold"] == pytest.approx(0.325)
    assert ThresholdChoice.from_dict(payload) == choice


@pytest.mark.parametrize(
    ("y", "s", "kwargs", "match"),
    [
        ([1, 1, 1], [0.2, 0.5, 0.9], {}, "both classes"),
        ([0, 0], [0.2, 0.5], {}, "both classes"),
        ([0, 1], [0.2, 0.5], {"rule": "youden"}, "unknown threshold rule"),
        ([0, 1], [0.2, 0.5], {"target_recall": 1.5}, "target_recall"),
        ([0, 1, 1], [0.2, 0.5], {}, "3 items but scores has 2"),
        ([0, 1], [0.2, float("nan")], {}, "non-finite"),
        ([0, 2], [0.2, 0.5], {}, "0/1"),
        ([], [], {}, "empty"),
    ],
)
def test_choose_threshold_rejects_bad_input(y: list, s: list, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        choose_threshold(y, s, **kwargs)


# ----------------------------------------------------------------------------- metrics

RNG = np.random.default_rng(7)
Y_FIXED = RNG.integers(0, 2, 200)
# Rounded scores create ties, which exercise tie handling in the AUCs.
S_FIXED = np.round(np.clip(RNG.normal(0.35 + 0.3 * Y_FIXED, 0.2), 0, 1), 2)
METRIC_KEYS = {
    "n",
    "n_positive",
    "n_negative",
    "threshold",
    "accuracy",
    "precision",
    "recall",
    "specificity",
    "f1",
    "roc_auc",
    "pr_auc",
    "confusion_matrix",
    "ci95",
    "ci_unit",
    "n_ci_units",
    "at_0_5",
}


def _sklearn_rates(y: np.ndarray, s: np.ndarray, threshold: float) -> dict:
    pred = (s >= threshold).astype(int)
    tn, fp, fn, tp = confusion_matrix(y, pred, labels=[0, 1]).ravel()
    return {
        "accuracy": accuracy_score(y, pred),
        "precision": precision_score(y, pred, zero_division=0),
        "recall": recall_score(y, pred, zero_division=0),
        "specificity": tn / (tn + fp),
        "f1": f1_score(y, pred, zero_division=0),
        "confusion_matrix": [[int(tn), int(fp)], [int(fn), int(tp)]],
    }


@pytest.mark.parametrize("threshold", [0.0, 0.3, 0.5, 0.62, 1.5])
def test_compute_metrics_matches_sklearn(threshold: float) -> None:
    m = compute_metrics(Y_FIXED, S_FIXED, threshold, n_bootstrap=200, seed=1)
    assert set(m) == METRIC_KEYS
    expected = _sklearn_rates(Y_FIXED, S_FIXED, threshold)
    for name in ("accuracy", "precision", "recall", "specificity", "f1"):
        assert m[name] == pytest.approx(expected[name], abs=1e-12), name
    assert m["confusion_matrix"] == expected["confusion_matrix"]
    assert m["roc_auc"] == pytest.approx(roc_auc_score(Y_FIXED, S_FIXED), abs=1e-12)
    assert m["pr_auc"] == pytest.approx(average_precision_score(Y_FIXED, S_FIXED), abs=1e-12)
    assert (m["n"], m["n_positive"], m["n_negative"]) == (200, int(Y_FIXED.sum()), int(200 - Y_FIXED.sum()))
    assert m["threshold"] == threshold
    half = _sklearn_rates(Y_FIXED, S_FIXED, 0.5)
    assert m["at_0_5"]["threshold"] == 0.5
    assert m["at_0_5"]["confusion_matrix"] == half["confusion_matrix"]
    for name in ("accuracy", "precision", "recall", "specificity", "f1"):
        assert m["at_0_5"][name] == pytest.approx(half[name], abs=1e-12), name
    json.dumps(m, allow_nan=False)  # plain, finite, JSON-ready values


def test_compute_metrics_no_predicted_positives_gives_zero_precision() -> None:
    m = compute_metrics(Y_FIXED, S_FIXED, 2.0, n_bootstrap=50)
    assert (m["precision"], m["recall"], m["f1"], m["specificity"]) == (0.0, 0.0, 0.0, 1.0)
    assert m["ci95"]["precision"] == [0.0, 0.0]


def test_compute_metrics_ci_brackets_estimate_and_is_seeded() -> None:
    m = compute_metrics(Y_FIXED, S_FIXED, 0.5, n_bootstrap=500, seed=3)
    for name, (lo, hi) in m["ci95"].items():
        assert lo <= m[name] <= hi, name
        assert lo < hi, name  # 200 noisy items: the interval has width
    again = compute_metrics(Y_FIXED, S_FIXED, 0.5, n_bootstrap=500, seed=3)
    other = compute_metrics(Y_FIXED, S_FIXED, 0.5, n_bootstrap=500, seed=4)
    assert again["ci95"] == m["ci95"]
    assert other["ci95"] != m["ci95"]


def test_compute_metrics_without_bootstrap_has_null_intervals() -> None:
    m = compute_metrics(Y_FIXED, S_FIXED, 0.5, n_bootstrap=0)
    assert set(m["ci95"]) == {"accuracy", "precision", "recall", "specificity", "f1", "roc_auc", "pr_auc"}
    assert all(v is None for v in m["ci95"].values())


def test_compute_metrics_one_class_warns_and_nulls_aucs() -> None:
    with pytest.warns(UserWarning, match="one class"):
        m = compute_metrics([1, 1, 1, 1], [0.9, 0.4, 0.7, 0.6], 0.5, n_bootstrap=100)
    assert m["roc_auc"] is None and m["pr_auc"] is None
    assert m["ci95"]["roc_auc"] is None and m["ci95"]["pr_auc"] is None
    assert m["recall"] == 0.75
    assert m["specificity"] == 0.0  # no negatives: zero_division=0
    assert m["confusion_matrix"] == [[0, 0], [1, 3]]
    json.dumps(m)


def test_bootstrap_curve_metrics_equal_sklearn_with_counts_as_weights() -> None:
    rng = np.random.default_rng(0)
    order, is_pos, starts = evaluate._score_groups(Y_FIXED, S_FIXED)
    counts = rng.integers(0, 4, size=(6, len(Y_FIXED)))
    roc_auc, pr_auc = evaluate._weighted_curve_metrics(is_pos, starts, counts)
    for row, auc, ap in zip(counts, roc_auc, pr_auc, strict=True):
        weight = np.empty(len(Y_FIXED))
        weight[order] = row
        assert auc == pytest.approx(roc_auc_score(Y_FIXED, S_FIXED, sample_weight=weight))
        assert ap == pytest.approx(average_precision_score(Y_FIXED, S_FIXED, sample_weight=weight))


def test_compute_metrics_bootstrap_intervals_have_the_analytic_width() -> None:
    """On 5000 random scores the 95 % intervals match the textbook standard errors (speed: bench/)."""
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 5000)
    s = rng.random(5000)
    m = compute_metrics(y, s, 0.5, n_bootstrap=1000, seed=0)
    n_pos, n_neg = int(y.sum()), int(len(y) - y.sum())
    standard_errors = {
        "roc_auc": np.sqrt((n_pos + n_neg) / (12 * n_pos * n_neg)),  # Hanley-McNeil at AUC 0.5
        "recall": np.sqrt(m["recall"] * (1 - m["recall"]) / n_pos),  # binomial
    }
    for name, se in standard_errors.items():
        lo, hi = m["ci95"][name]
        assert lo < m[name] < hi, name
        assert hi - lo == pytest.approx(2 * 1.96 * se, rel=0.15), name
    assert m["ci95"]["roc_auc"][0] < 0.5 < m["ci95"]["roc_auc"][1]  # random scores: AUC ~ 0.5
    assert compute_metrics(y, s, 0.5, n_bootstrap=1000, seed=0)["ci95"] == m["ci95"]  # seeded
    assert compute_metrics(y, s, 0.5, n_bootstrap=1000, seed=1)["ci95"] != m["ci95"]


# ----------------------------------------------------------------------------- patient-level bootstrap


def _widths(metrics: dict) -> dict[str, float]:
    return {name: hi - lo for name, (lo, hi) in metrics["ci95"].items()}


def _patients(n: int = 300, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One image per patient: labels, noisy scores, patient ids."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    s = 1 / (1 + np.exp(-rng.normal(1.2 * y, 1.0)))
    return y, s, np.array([f"patient{i}" for i in range(n)])


def test_duplicated_images_leave_the_patient_level_interval_unchanged() -> None:
    """Five copies of every patient's image add no information: the patient-level intervals stay
    exactly as they were, while image-level ones shrink by about sqrt(5) (too narrow)."""
    y, s, patients = _patients()
    once = compute_metrics(y, s, 0.5, groups=patients, n_bootstrap=500, seed=2)
    y5, s5, patients5 = (np.repeat(a, 5) for a in (y, s, patients))
    five = compute_metrics(y5, s5, 0.5, groups=patients5, n_bootstrap=500, seed=2)
    for name, width in _widths(once).items():
        assert _widths(five)[name] == pytest.approx(width, abs=1e-12), name
    assert (once["ci_unit"], once["n_ci_units"], five["ci_unit"], five["n_ci_units"]) == (
        "patient",
        300,
        "patient",
        300,
    )
    by_image = compute_metrics(y5, s5, 0.5, n_bootstrap=500, seed=2)
    assert (by_image["ci_unit"], by_image["n_ci_units"]) == ("image", 1500)
    for name in ("recall", "specificity", "roc_auc", "pr_auc"):
        assert _widths(once)[name] / _widths(by_image)[name] == pytest.approx(np.sqrt(5), rel=0.2), name


def test_one_image_per_patient_is_the_image_level_bootstrap() -> None:
    y, s, patients = _patients(2000)
    by_patient = _widths(compute_metrics(y, s, 0.5, groups=patients, n_bootstrap=1000, seed=0))
    by_image = _widths(compute_metrics(y, s, 0.5, n_bootstrap=1000, seed=0))
    for name, width in by_image.items():
        assert by_patient[name] == pytest.approx(width, rel=0.15), name


def test_a_patient_s_images_resample_together_whatever_their_order() -> None:
    y, s, patients = _patients(200)
    y3, s3, p3 = (np.repeat(a, 3) for a in (y, s, patients))
    shuffled = np.random.default_rng(5).permutation(len(y3))
    a = compute_metrics(y3, s3, 0.5, groups=p3, n_bootstrap=200, seed=1)
    b = compute_metrics(y3[shuffled], s3[shuffled], 0.5, groups=p3[shuffled], n_bootstrap=200, seed=1)
    for name, interval in a["ci95"].items():
        assert b["ci95"][name] == pytest.approx(interval, abs=1e-12), name


def test_every_patient_resample_holds_both_classes() -> None:
    """All positives from one patient, one patient with both classes: strata keep both present."""
    y = np.array([1, 1, 1, 0, 1, 0, 0, 0, 0, 0])
    s = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.05])
    patients = np.array(["a", "a", "a", "b", "b", "c", "d", "e", "f", "g"])
    recall = evaluate.bootstrap_rates(y, s, 0.55, groups=patients, n_bootstrap=300, seed=0)["recall"]
    # "a" (3 caught) and "b" (1 missed) are each drawn once in every resample: recall is always 3/4
    assert np.all(recall == 0.75)
    m = compute_metrics(y, s, 0.55, groups=patients, n_bootstrap=300, seed=0)
    assert m["n_ci_units"] == 7 and m["ci95"]["recall"] == [0.75, 0.75]
    assert all(np.isfinite(m["ci95"][k]).all() for k in ("roc_auc", "pr_auc"))


@pytest.mark.parametrize(
    ("groups", "match"),
    [(["a"] * 19, "groups has 19 items"), ([None] + ["a"] * 19, "1 missing")],
)
def test_compute_metrics_rejects_bad_groups(groups: list, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        compute_metrics(Y, S, 0.5, groups=groups, n_bootstrap=10)


def test_bootstrap_thresholds_are_the_rule_applied_to_each_resample() -> None:
    """Perfectly separated scores, target recall 1: each resample's threshold is the lowest
    positive score drawn, so every value is a positive's score and the CI brackets the choice."""
    y, s, patients = _patients(400, seed=3)
    s = np.where(y == 1, 0.5 + s / 2, s / 2)  # positives above every negative
    chosen = choose_threshold(y, s, target_recall=1.0).threshold
    thresholds = evaluate.bootstrap_thresholds(y, s, target_recall=1.0, groups=patients, n_bootstrap=300)
    assert len(thresholds) == 300 and np.isin(thresholds, s[y == 1]).all()
    assert (thresholds >= chosen).all()
    # the lowest positive's patient is drawn at least once in 1 - (1 - 1/n)^n of the resamples
    n_pos = int(y.sum())
    assert np.mean(thresholds == chosen) == pytest.approx(1 - (1 - 1 / n_pos) ** n_pos, abs=0.08)
    again = evaluate.bootstrap_thresholds(y, s, target_recall=1.0, groups=patients, n_bootstrap=300)
    assert np.array_equal(thresholds, again)  # seeded


def test_bootstrap_auc_is_compute_metrics_interval_and_paired_across_scores() -> None:
    y, s, patients = _patients(600, seed=2)
    aucs = evaluate.bootstrap_auc(y, s, groups=patients, n_bootstrap=400, seed=3)
    interval = compute_metrics(y, s, 0.5, groups=patients, n_bootstrap=400, seed=3)["ci95"]["roc_auc"]
    assert list(np.percentile(aucs, [2.5, 97.5])) == pytest.approx(interval, abs=1e-12)
    # the resamples do not depend on the scores: the same ranks give the same AUC in every one ...
    assert np.array_equal(
        evaluate.bootstrap_auc(y, np.exp(s), groups=patients, n_bootstrap=400, seed=3), aucs
    )
    # ... and positives scored a little higher can only win pairs, in every resample: the gain
    # (about 0.005) is positive in all 400, where unpaired draws (another seed) lose in 43 %
    better = evaluate.bootstrap_auc(y, s + 0.005 * y, groups=patients, n_bootstrap=400, seed=3)
    assert (better >= aucs).all() and (better - aucs).mean() > 0.003
    with pytest.raises(ValueError, match="both classes"):
        evaluate.bootstrap_auc(np.ones(5), s[:5])


# ----------------------------------------------------------------------------- sweep


def test_threshold_sweep_matches_rates_and_choice() -> None:
    sweep = evaluate.threshold_sweep(Y, S)
    assert list(sweep.columns) == ["threshold", "sensitivity", "specificity"]
    assert np.array_equal(sweep["threshold"], np.sort(S))
    assert sweep["sensitivity"].is_monotonic_decreasing
    assert sweep["specificity"].is_monotonic_increasing
    row = sweep[sweep["threshold"] == 0.35].iloc[0]
    assert (row["sensitivity"], row["specificity"]) == (0.9, 0.6)
    for t in (0.02, 0.5, 0.95):
        rates = evaluate.rates_at(Y, S, t)
        row = sweep[sweep["threshold"] == t].iloc[0]
        assert row["sensitivity"] == pytest.approx(rates["recall"])
        assert row["specificity"] == pytest.approx(rates["specificity"])


def test_threshold_sweep_one_class_has_nan_column() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sweep = evaluate.threshold_sweep([0, 0, 0], [0.1, 0.2, 0.3])
    assert sweep["sensitivity"].isna().all()
    assert sweep["specificity"].tolist() == pytest.approx([0.0, 1 / 3, 2 / 3])


# --- evaluation of a run through its input check (gate) --------------------------------------


@pytest.fixture(scope="module")
def labelled_with_strangers(sample_dir, make_non_cxr_images, tmp_path_factory):
    """3 NORMAL and 3 PNEUMONIA sample X-rays, and 12 non-X-ray pictures filed as NORMAL."""
    import shutil

    data = tmp_path_factory.mktemp("strangers")
    for label in ("NORMAL", "PNEUMONIA"):
        (data / label).mkdir()
        for path in sorted((sample_dir / "test" / label).glob("*.jpeg"))[:3]:
            shutil.copyfile(path, data / label / path.name)
    make_non_cxr_images(data / "NORMAL", 12)
    return data


def test_evaluation_reports_accepted_and_all_images_and_the_shift(
    tiny_run, labelled_with_strangers, tmp_path, caplog
):
    import pandas as pd

    from cxr_pneumonia import api

    with caplog.at_level("WARNING", logger="cxr_pneumonia.evaluation"), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # one class among the accepted images is fine here
        metrics = api.evaluate(tiny_run, labelled_with_strangers, tmp_path, n_bootstrap=0, heatmaps=False)
    domain = metrics["domain"]
    assert metrics["n"] == 6 and metrics["evaluated_on"] == "accepted images"
    assert metrics["all_images"]["n"] == 18 and metrics["accepted_images"]["n"] == 6
    assert domain["checked"] and domain["n_images"] == 18 and domain["n_rejected"] == 12
    assert len(domain["rejected"]) == 12 and all(
        "not like the frontal" in r["reason"] for r in domain["rejected"]
    )
    assert domain["shift"]["shifted"] and domain["message"].startswith(
        "these images differ from the training"
    )
    assert [r.message for r in caplog.records].count(domain["message"]) == 1
    table = pd.read_csv(tmp_path / "predictions.csv")
    assert {"status", "domain_score", "reason", "unusual"} <= set(table.columns) and len(table) == 18
    assert (table["status"] == "rejected").sum() == 12 and table["probability"].notna().all()
    assert not table["reason"].str.contains("classified anyway").any()  # the headline left them out
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["domain"]["n_rejected"] == 12 and saved["all_images"]["n"] == 18
    html = (tmp_path / "report.html").read_text()
    assert "Domain check" in html and "Batch shift:" in html and "the 6 of 18 images it accepted" in html
    assert "scanned_page_0.png" in html


def test_evaluation_refuses_when_everything_is_rejected(tiny_run, make_non_cxr_images, tmp_path):
    from cxr_pneumonia import api

    for label in ("NORMAL", "PNEUMONIA"):
        make_non_cxr_images(tmp_path / "data" / label, 2)
    with pytest.raises(ValueError, match=r"rejected all 4 readable images.*--no-gate"):
        api.evaluate(tiny_run, tmp_path / "data", tmp_path / "out", n_bootstrap=0, heatmaps=False)
    metrics = api.evaluate(
        tiny_run, tmp_path / "data", tmp_path / "out", n_bootstrap=0, heatmaps=False, gate=False
    )
    assert metrics["n"] == 4 and metrics["accepted_images"] is None and metrics["domain"]["n_rejected"] == 4


def test_evaluation_of_a_run_without_a_gate_says_it_was_not_checked(ungated_run, sample_dir, tmp_path):
    from cxr_pneumonia import api

    metrics = api.evaluate(ungated_run, sample_dir / "test", tmp_path, n_bootstrap=50, heatmaps=False)
    assert metrics["n"] == 40 and metrics["evaluated_on"] == "all images"
    assert metrics["domain"] == {"checked": False, "gate": True, "message": metrics["domain"]["message"]}
    assert "cxr-pneumonia gate RUN" in metrics["domain"]["message"]
    html = (tmp_path / "report.html").read_text()
    assert "no domain model" in html
    # intervals resample patients (here 40 patients of one image each), and the report says so
    assert metrics["ci_unit"] == "patient" and metrics["n_ci_units"] == 40
    assert metrics["all_images"]["ci_unit"] == "patient" and metrics["operating_point"] == "default"
    assert "95 % CI, patient-level bootstrap (40 patients)" in html


def test_a_failed_report_leaves_no_earlier_summary_beside_the_new_predictions(
    ungated_run, sample_dir, tmp_path, monkeypatch
):
    """metrics.json is written last and marks the folder complete: an earlier evaluation's
    metrics.json and report.html once stayed beside the new predictions when the report failed."""
    import pandas as pd

    from cxr_pneumonia import api, report

    api.evaluate(ungated_run, sample_dir / "test", tmp_path, n_bootstrap=0, heatmaps=False)
    assert (tmp_path / "metrics.json").is_file() and (tmp_path / "report.html").is_file()

    def fails(*args, **kwargs):
        raise RuntimeError("the report failed")

    monkeypatch.setattr(report, "write_report", fails)
    (tmp_path / "predictions.csv").unlink()
    with pytest.raises(RuntimeError, match="the report failed"):
        api.evaluate(ungated_run, sample_dir / "test", tmp_path, n_bootstrap=0, heatmaps=False)
    assert not (tmp_path / "metrics.json").exists() and not (tmp_path / "report.html").exists()
    assert len(pd.read_csv(tmp_path / "predictions.csv")) == 40  # the new predictions, whole
