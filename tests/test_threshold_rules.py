"""Operating points meant to transfer: across acquisition groups (evaluate.choose_threshold_across_groups)
and with a patient-bootstrap margin (evaluate.choose_threshold_with_margin)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cxr_pneumonia.evaluate import (
    POOLED_GROUP,
    apply_threshold,
    bootstrap_thresholds,
    choose_threshold,
    choose_threshold_across_groups,
    choose_threshold_with_margin,
    rates_by_group,
)

# Three groups of 50 positives each; at target recall 0.98 a group may miss one positive, so its
# own threshold is its second-lowest positive score: 0.11 (A), 0.41 (B), 0.81 (C; not 0.71, so
# that the median, 0.41, differs from the mean, 0.443).
# Negatives: A's sit at 0.05 (below every own threshold), B's at 0.30, C's at 0.60.
POSITIVES = {"A": 0.10, "B": 0.40, "C": 0.80}
NEGATIVES = {"A": 0.05, "B": 0.30, "C": 0.60}


def _groups(positives: dict[str, float], negatives: dict[str, float], n_pos: int = 50, n_neg: int = 20):
    y, s, g = [], [], []
    for name, start in positives.items():
        y += [1] * n_pos
        s += [round(start + 0.01 * i, 2) for i in range(n_pos)]
        g += [name] * n_pos
    for name, value in negatives.items():
        y += [0] * n_neg
        s += [value] * n_neg
        g += [name] * n_neg
    return np.array(y), np.array(s), np.array(g, dtype=object)


Y, S, G = _groups(POSITIVES, NEGATIVES)


@pytest.mark.parametrize(("rule", "threshold"), [("group_median", 0.41), ("group_min", 0.11)])
def test_final_threshold_is_the_median_or_minimum_of_the_groups_own(rule, threshold):
    choice = choose_threshold_across_groups(Y, S, G, target_recall=0.98, rule=rule)
    assert choice.threshold == pytest.approx(threshold)
    own = {row["group"]: row["threshold"] for row in choice.groups}
    assert own == pytest.approx({"A": 0.11, "B": 0.41, "C": 0.81})
    assert choice.spread["threshold"] == pytest.approx([0.11, 0.81])
    assert choice.min_positives == 50 and choice.fallback is None and choice.rule == rule
    by_group = {row["group"]: row for row in choice.groups}
    if rule == "group_min":  # every group keeps the target recall ...
        assert all(row["recall"] >= 0.98 for row in choice.groups)
        assert by_group["C"]["specificity"] == 0.0  # ... and C's negatives (0.60) are all called positive
    else:  # the median loses recall in the low group only, and keeps B's and C's negatives out
        assert by_group["A"]["recall"] == pytest.approx(19 / 50)  # 0.41 .. 0.59 of 0.10 .. 0.59
        assert by_group["B"]["recall"] == pytest.approx(49 / 50) and by_group["C"]["recall"] == 1.0
        assert [by_group[g]["specificity"] for g in "ABC"] == [1.0, 1.0, 0.0]
    # the whole-set figures are those of the final threshold
    predicted = apply_threshold(S, choice.threshold).astype(bool)
    assert choice.recall == pytest.approx(predicted[Y == 1].mean())
    assert choice.specificity == pytest.approx((~predicted[Y == 0]).mean())
    json.dumps(choice.to_dict())  # threshold.json holds it


def test_groups_with_too_few_positives_are_pooled_or_skipped():
    # D (10 positives) and E (45) are each below 50: together (55) they make one group.
    y, s, g = _groups({"A": 0.10, "B": 0.40}, {"A": 0.05, "B": 0.30})
    y2, s2, g2 = _groups({"D": 0.20}, {"D": 0.0}, n_pos=10)
    y3, s3, g3 = _groups({"E": 0.30}, {"E": 0.0}, n_pos=45)
    y, s, g = np.r_[y, y2, y3], np.r_[s, s2, s3], np.r_[g, g2, g3]
    choice = choose_threshold_across_groups(y, s, g, target_recall=0.98)
    rows = {row["group"]: row for row in choice.groups}
    assert rows["D"]["threshold"] is None and rows["D"]["pooled_into"] == POOLED_GROUP
    assert rows["E"]["threshold"] is None and rows["E"]["pooled_into"] == POOLED_GROUP
    pooled = rows[POOLED_GROUP]
    assert (pooled["n_positive"], pooled["n_negative"]) == (55, 40)
    # 55 positives may miss one: the pool's second-lowest positive, 0.21 (D's 0.20, 0.21, ...)
    assert pooled["threshold"] == pytest.approx(0.21)
    assert choice.spread["n_groups_used"] == 3
    assert choice.threshold == pytest.approx(0.21)  # median of 0.11, 0.21, 0.41

    # D alone: the pool has 10 positives, too few: D is skipped, A and B decide
    keep = g != "E"
    skipped = choose_threshold_across_groups(y[keep], s[keep], g[keep], target_recall=0.98)
    rows = {row["group"]: row for row in skipped.groups}
    assert POOLED_GROUP not in rows and rows["D"]["pooled_into"] is None and rows["D"]["threshold"] is None
    assert skipped.threshold == pytest.approx((0.11 + 0.41) / 2)
    assert rows["D"]["n"] == 30  # its images still count in the figures


def test_fewer_than_two_usable_groups_fall_back_to_the_pooled_rule():
    y, s, g = _groups({"A": 0.10, "B": 0.40}, {"A": 0.05, "B": 0.30}, n_pos=20)
    choice = choose_threshold_across_groups(y, s, g, target_recall=0.98)
    assert choice.fallback and "max_specificity" in choice.fallback
    assert choice.threshold == choose_threshold(y, s, target_recall=0.98).threshold
    assert choice.spread["n_groups_used"] == 0 and choice.spread["threshold"] is None
    # a lower target needs fewer positives per group (1 / (1 - 0.9) = 10): the groups count again
    assert choose_threshold_across_groups(y, s, g, target_recall=0.9).fallback is None


def test_rates_by_group_at_any_threshold():
    result = rates_by_group(Y, S, G, 0.5, target_recall=0.98)
    rows = {row["group"]: row for row in result["groups"]}
    assert rows["A"]["recall"] == pytest.approx(10 / 50) and rows["A"]["specificity"] == 1.0
    assert rows["B"]["recall"] == pytest.approx(40 / 50) and rows["C"]["specificity"] == 0.0
    assert (rows["C"]["n"], rows["C"]["n_positive"], rows["C"]["n_negative"]) == (70, 50, 20)
    assert result["spread"]["recall"] == pytest.approx([0.2, 1.0])
    assert result["spread"]["specificity"] == pytest.approx([0.0, 1.0])
    # a group without negatives has no specificity, and still its own threshold
    only_pos = rates_by_group(Y[Y == 1], S[Y == 1], G[Y == 1], 0.5)
    assert all(r["specificity"] is None and r["threshold"] is not None for r in only_pos["groups"])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"rule": "group_mean"}, "unknown group threshold rule 'group_mean'"),
        ({"groups": G[:-1]}, "groups has shape"),
        ({"groups": np.where(G == "A", POOLED_GROUP, G)}, "reserved"),
        ({"y_true": np.ones_like(Y)}, "needs both classes"),
        ({"target_recall": 1.5}, "target_recall must be in"),
    ],
)
def test_bad_inputs_say_what_is_wrong(kwargs, message):
    args = {"y_true": Y, "scores": S, "groups": G, **kwargs}
    with pytest.raises(ValueError, match=message):
        choose_threshold_across_groups(args.pop("y_true"), args.pop("scores"), args.pop("groups"), **args)


# ---- the bootstrap margin ------------------------------------------------------------------------


def _uniform_draw(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """300 positives ~ U[0.2, 1] and 100 negatives ~ U[0, 0.4]: a positive's score is above t with
    probability (1 - t) / 0.8, so the threshold of true recall 0.98 is 0.216."""
    scores = np.r_[rng.uniform(0.2, 1.0, 300), rng.uniform(0.0, 0.4, 100)]
    return np.r_[np.ones(300, int), np.zeros(100, int)], scores


def _true_recall(threshold: float) -> float:
    return min(1.0, (1.0 - threshold) / 0.8)


def test_the_margin_keeps_the_target_recall_on_new_patients_where_the_pooled_threshold_does_not():
    # 30 validation sets drawn from one known population: the pooled target-recall threshold is
    # fitted to each set's own lowest positives and holds the population's recall about half the
    # time; the 5th percentile of the resampled thresholds is meant to hold it about 95 % of the time.
    rng = np.random.default_rng(1)
    pooled_holds, margin_holds = 0, 0
    for draw in range(30):
        y, s = _uniform_draw(rng)
        pooled = choose_threshold(y, s, target_recall=0.98).threshold
        choice, margin = choose_threshold_with_margin(
            y, s, None, target_recall=0.98, n_bootstrap=200, seed=draw
        )
        assert choice.threshold <= pooled == margin["pooled_threshold"]
        assert choice.recall >= 0.98 and choice.rule == "bootstrap_margin"
        pooled_holds += _true_recall(pooled) >= 0.98
        margin_holds += _true_recall(choice.threshold) >= 0.98
    assert pooled_holds <= 20 and margin_holds >= 25, (pooled_holds, margin_holds)


def test_the_margin_is_the_percentile_of_the_patient_resampled_thresholds():
    y, s = _uniform_draw(np.random.default_rng(7))
    patients = np.repeat(np.arange(200), 2)  # two images per patient
    resampled = bootstrap_thresholds(y, s, target_recall=0.98, groups=patients, n_bootstrap=300, seed=3)
    choice, margin = choose_threshold_with_margin(
        y, s, patients, target_recall=0.98, percentile=10, n_bootstrap=300, seed=3
    )
    expected = min(np.percentile(resampled, 10), choose_threshold(y, s, target_recall=0.98).threshold)
    assert choice.threshold == pytest.approx(expected)
    assert margin["resampled"] == "patients" and margin["percentile"] == 10
    assert margin["resampled_thresholds"]["p2.5"] <= margin["resampled_thresholds"]["p97.5"]
    json.dumps(margin)


@pytest.mark.parametrize("percentile", [0, 50, -1])
def test_a_margin_percentile_outside_0_50_is_refused(percentile):
    y, s = _uniform_draw(np.random.default_rng(0))
    with pytest.raises(ValueError, match="percentile must be in"):
        choose_threshold_with_margin(y, s, None, percentile=percentile)


# ---- training's operating point: the rule of TrainConfig, the groups of the validation images ----


@pytest.fixture(scope="module")
def two_acquisitions(tmp_path_factory: pytest.TempPathFactory):
    """60 dark, blurred images and 60 bright, noisy ones (50 positives and 10 negatives each), and
    scores under which the dark acquisition's positives score low: 0.10 .. 0.59 (own threshold at
    recall 0.98: 0.11) and the bright one's high: 0.40 .. 0.89 (0.41). Negatives score 0.05."""
    import cv2
    import pandas as pd

    folder = tmp_path_factory.mktemp("acquisitions")
    rng = np.random.default_rng(0)
    rows, scores = [], []
    for kind, start in (("dark", 0.10), ("bright", 0.40)):
        for i in range(60):
            base = rng.uniform(0, 40, (32, 32)).astype(np.float32)
            image = (
                cv2.GaussianBlur(40 + base, (0, 0), 2)
                if kind == "dark"
                else 160 + base + rng.normal(0, 10, (32, 32))
            )
            path = folder / f"{kind}_{i}.png"
            cv2.imwrite(str(path), np.clip(image, 0, 255).astype(np.uint8))
            positive = i < 50
            rows.append({"path": str(path), "label": int(positive), "patient_id": f"{kind}{i}"})
            scores.append(round(start + 0.01 * i, 2) if positive else 0.05)
    val = pd.DataFrame(rows)
    return val["label"].to_numpy(), np.array(scores), val


@pytest.mark.parametrize(
    ("rule", "threshold"),
    [
        ("group_median", 0.26),
        ("group_min", 0.11),
        ("fixed", 0.5),
        ("max_specificity", 0.10),
        ("bootstrap_margin", 0.10),
    ],
)
def test_training_records_the_rule_and_every_group(two_acquisitions, rule, threshold):
    from cxr_pneumonia.train import TrainConfig, choose_operating_point

    y, scores, val = two_acquisitions
    cfg = TrainConfig(threshold_rule=rule, threshold_groups=2, workers=1)
    point = choose_operating_point(y, scores, val, cfg, cache_dir=None)
    record = point.to_dict()
    assert point.threshold == pytest.approx(threshold) and record["rule"] == rule
    # the two acquisitions are the two groups, each with its own target-recall threshold
    own = sorted(row["threshold"] for row in record["groups"])
    assert own == pytest.approx([0.11, 0.41]) and record["spread"]["n_groups_used"] == 2
    definition = record["group_definition"]["groups"]
    assert sorted(g["n"] for g in definition.values()) == [60, 60]
    assert max(g["mean"] for g in definition.values()) > min(g["mean"] for g in definition.values()) + 80
    if rule == "fixed":
        assert record["chosen_on"].startswith("nothing")
    if rule == "bootstrap_margin":  # the negatives all score below the positives: no margin needed
        assert record["margin"]["pooled_threshold"] == pytest.approx(0.10)
        assert record["margin"]["resampled"] == "patients"
    json.dumps(record)
