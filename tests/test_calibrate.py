"""Site calibration: named operating points, their patient-level intervals, and applying them.

Uses the session's tiny run (copied: calibrate writes into the run) and the bundled sample.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cxr_pneumonia import api, rundir
from cxr_pneumonia.calibration import (
    CalibrationError,
    design_effect,
    images_needed,
    wilson_width,
)
from cxr_pneumonia.cli import EXIT_OK, EXIT_USAGE, main
from cxr_pneumonia.evaluate import bootstrap_rates, choose_threshold

Z = 1.959963984540054

# ---------------------------------------------------------------------- how many more images


@pytest.mark.parametrize(
    ("p", "width", "effect", "expected"),
    [
        # p = 1: z² (1 - W) / W = 72.99 -> 73 (the Wald interval would say 0)
        (1.0, 0.05, 1.0, 73),
        # p = 0.5, W = 0.1: z² (0.49 + sqrt(0.49² + 0.01 · 0.99)) / 0.01 = 380.3 -> 381
        (0.5, 0.1, 1.0, 381),
        # a design effect of 2 doubles the images: 2 · 380.3 -> 761
        (0.5, 0.1, 2.0, 761),
        # below 1 is noise: treated as 1
        (0.5, 0.1, 0.7, 381),
    ],
)
def test_images_needed_known_answers(p: float, width: float, effect: float, expected: int) -> None:
    assert images_needed(p, 0, width, design_effect=effect) == expected
    assert images_needed(p, 50, width, design_effect=effect) == max(0, expected - 50)
    assert images_needed(p, 10_000, width, design_effect=effect) == 0


@pytest.mark.parametrize("p", [0.0, 0.3, 0.5, 0.9, 0.97, 1.0])
@pytest.mark.parametrize("width", [0.02, 0.05, 0.2])
def test_images_needed_is_the_smallest_n_whose_wilson_interval_is_that_narrow(p: float, width: float) -> None:
    n = images_needed(p, 0, width)
    assert wilson_width(p, n) <= width + 1e-12 < wilson_width(p, n - 1)


def test_wilson_width_matches_the_textbook_interval() -> None:
    # Wilson (1927) for 81 of 263: centre (x + z²/2) / (n + z²), half width z sqrt(...) / (n + z²)
    x, n = 81, 263
    half = Z * math.sqrt(x * (n - x) / n + Z * Z / 4) / (n + Z * Z)
    assert wilson_width(x / n, n) == pytest.approx(2 * half, rel=1e-12)


def test_design_effect_of_identical_images_is_their_number() -> None:
    """Kish: 1 + (m - 1) ρ; four identical images per patient (ρ = 1) count as one."""
    rng = np.random.default_rng(0)
    per_patient = 4
    positive = rng.random(400) < 0.8  # whether the patient's images are caught
    y = np.ones(400 * per_patient, int)
    s = np.repeat(np.where(positive, 0.9, 0.1), per_patient)
    patients = np.repeat(np.arange(400), per_patient)
    # all images positive: add negatives so both classes exist (they do not affect recall)
    y, s = np.r_[y, np.zeros(50, int)], np.r_[s, np.full(50, 0.2)]
    patients = np.r_[patients, np.arange(400, 450)]
    by_patient = bootstrap_rates(y, s, 0.5, groups=patients, n_bootstrap=2000, seed=1)["recall"]
    by_image = bootstrap_rates(y, s, 0.5, n_bootstrap=2000, seed=1)["recall"]
    assert design_effect(by_patient, by_image) == pytest.approx(per_patient, rel=0.15)
    assert design_effect(by_image, by_image) == 1.0
    assert design_effect(np.ones(5), np.ones(5)) == 1.0  # no variance at all: independent


# ---------------------------------------------------------------------- the run's operating_points.json


def test_operating_points_file_keeps_every_point_and_refuses_bad_names(tmp_path: Path) -> None:
    (tmp_path / rundir.THRESHOLD_FILE).write_text(json.dumps({"threshold": 0.3, "rule": "max_specificity"}))
    assert rundir.read_operating_point(tmp_path, None) == rundir.read_operating_point(tmp_path, "default")
    assert (
        rundir.operating_point_names(tmp_path) == ["default"] and rundir.read_operating_points(tmp_path) == {}
    )
    rundir.save_operating_point(tmp_path, {"name": "b", "threshold": 0.2})
    rundir.save_operating_point(tmp_path, {"name": "a", "threshold": 0.1})
    assert rundir.operating_point_names(tmp_path) == ["default", "a", "b"]
    assert rundir.read_operating_point(tmp_path, "a")["threshold"] == 0.1
    with pytest.raises(ValueError, match="'a' exists"):
        rundir.save_operating_point(tmp_path, {"name": "a", "threshold": 0.5})
    rundir.save_operating_point(tmp_path, {"name": "a", "threshold": 0.5}, replace=True)
    saved = json.loads((tmp_path / rundir.OPERATING_POINTS_FILE).read_text())
    assert saved["points"]["a"]["threshold"] == 0.5 and saved["replaced"] == [{"name": "a", "threshold": 0.1}]
    for name in ("default", "", "a b", "../x", "-x", "x" * 65):
        with pytest.raises(ValueError, match=r"default|operating point name"):
            rundir.save_operating_point(tmp_path, {"name": name, "threshold": 0.5})
    with pytest.raises(rundir.RunError, match=r"no operating point 'c'; known: default, a, b"):
        rundir.read_operating_point(tmp_path, "c")
    (tmp_path / rundir.OPERATING_POINTS_FILE).write_text("[1, 2]")
    with pytest.raises(rundir.RunError, match="not a valid operating-points file"):
        rundir.read_operating_points(tmp_path)


def test_points_saved_at_the_same_time_are_all_kept(tmp_path: Path, monkeypatch) -> None:
    """Each save reads the file, adds its point and writes it back: without the lock, two sites
    calibrating one run at once each wrote the file without the other's point."""
    read = rundir._read_points_file

    def slow_read(path):
        content = read(path)
        time.sleep(0.05)  # every thread has read before any writes, unless the lock serialises them
        return content

    monkeypatch.setattr(rundir, "_read_points_file", slow_read)
    names = [f"site-{i}" for i in range(6)]
    with ThreadPoolExecutor(len(names)) as pool:
        list(
            pool.map(
                lambda name: rundir.save_operating_point(tmp_path, {"name": name, "threshold": 0.5}), names
            )
        )
    assert sorted(rundir.read_operating_points(tmp_path)) == names


# ---------------------------------------------------------------------- calibrate on a real run


@pytest.fixture(scope="module")
def run_dir(tiny_run: Path, make_run_copy, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the tiny run: calibrate writes operating_points.json into it."""
    return make_run_copy(tiny_run, tmp_path_factory.mktemp("calibrate") / "run")


@pytest.fixture(scope="module")
def site(sample_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The sample's 40 test images plus a second image for each of 10 pneumonia patients
    (50 images, 40 patients): a site sample where patients hold more than one image."""
    folder = tmp_path_factory.mktemp("site")
    shutil.copytree(sample_dir / "test", folder, dirs_exist_ok=True)
    for path in sorted((folder / "PNEUMONIA").glob("person*.jpeg"))[:10]:
        patient = path.name.split("_")[0]
        shutil.copyfile(path, path.with_name(f"{patient}_bacteria_99999.jpeg"))
    return folder


@pytest.fixture(scope="module")
def run(run_dir: Path) -> api.Run:
    """The copy, loaded once (the API takes a loaded run as well as a path)."""
    return api.Run.load(run_dir)


@pytest.fixture
def cached_load(run: api.Run, monkeypatch: pytest.MonkeyPatch) -> None:
    """``Run.load`` answering with the module's loaded run, at the operating point asked for: the
    CLI tests below do not reload the model (one test loads it for real)."""

    def load(path: str | Path, *, runtime: str = "auto", operating_point: str | None = None) -> api.Run:
        assert Path(path) == run.path
        return run.with_operating_point(operating_point)

    monkeypatch.setattr(api.Run, "load", staticmethod(load))


@pytest.fixture(scope="module")
def site_a(run: api.Run, site: Path) -> dict:
    # gate off: the tiny run's gate may refuse a site image, and this point's figures are compared
    # with choose_threshold on every image
    return api.calibrate(run, site, name="site-a", target_recall=0.9, n_bootstrap=200, gate=False)


def _scores(run: api.Run, folder: Path) -> pd.DataFrame:
    from cxr_pneumonia.data import discover

    images = discover(folder)
    predictions = api.predict(run, list(images["path"]), gate=False)
    return images.assign(probability=[p.probability for p in predictions])


def test_calibrate_saves_the_point_for_the_target_recall(
    run: api.Run, run_dir: Path, site: Path, site_a: dict
) -> None:
    threshold_json = (run_dir / rundir.THRESHOLD_FILE).read_bytes()
    table = _scores(run, site)
    expected = choose_threshold(table["label"], table["probability"], target_recall=0.9)
    assert site_a["threshold"] == pytest.approx(expected.threshold)
    assert site_a["recall"] == pytest.approx(expected.recall) and site_a["recall"] >= 0.9
    assert site_a["specificity"] == pytest.approx(expected.specificity)
    assert (site_a["n"], site_a["n_pos"], site_a["n_neg"], site_a["n_patients"]) == (50, 30, 20, 40)
    assert site_a["n_rejected"] == 0 and site_a["n_failed"] == 0 and site_a["ci_unit"] == "patient"
    for name in ("threshold", "recall", "specificity"):
        lo, hi = site_a["ci95"][name]
        assert lo <= site_a[name] <= hi, name
    hashes = sorted(hashlib.sha256(p.read_bytes()).hexdigest() for p in site.rglob("*.jpeg"))
    assert site_a["data"]["fingerprint"] == hashlib.sha256("\n".join(hashes).encode()).hexdigest()
    assert site_a["data"]["n_files"] == 50 and site_a["created_at"].endswith("+00:00")
    assert set(site_a["more_images"]) == {"width", "recall", "specificity"}
    saved = json.loads((run_dir / rundir.OPERATING_POINTS_FILE).read_text())
    assert saved["points"]["site-a"] == json.loads(json.dumps(site_a))
    assert (run_dir / rundir.THRESHOLD_FILE).read_bytes() == threshold_json  # default never touched


def test_a_name_is_refused_twice_unless_replaced(
    run: api.Run, run_dir: Path, site: Path, site_a: dict
) -> None:
    before = (run_dir / rundir.OPERATING_POINTS_FILE).read_bytes()
    with pytest.raises(CalibrationError, match=r"'site-a' exists .*--replace"):
        api.calibrate(run, site, name="site-a", n_bootstrap=20)
    with pytest.raises(CalibrationError, match="run's own threshold"):
        api.calibrate(run, site, name="default", n_bootstrap=20)
    assert (run_dir / rundir.OPERATING_POINTS_FILE).read_bytes() == before
    api.calibrate(run, site, name="site-b", target_recall=1.0, n_bootstrap=20)
    again = api.calibrate(run, site, name="site-b", target_recall=0.8, n_bootstrap=20, replace=True)
    saved = json.loads((run_dir / rundir.OPERATING_POINTS_FILE).read_text())
    assert saved["points"]["site-b"]["target_recall"] == again["target_recall"] == 0.8
    assert [p["target_recall"] for p in saved["replaced"]] == [1.0]  # nothing calibrated is lost
    assert saved["points"]["site-a"] == json.loads(json.dumps(site_a))


def test_cli_calibrate_prints_the_point_and_the_images_that_would_narrow_it(
    run_dir: Path, site: Path, site_a: dict, cached_load, capsys
) -> None:
    args = [
        "calibrate",
        str(run_dir),
        str(site),
        "--name",
        "site-c",
        "--bootstrap",
        "50",
        "--width",
        "0.1",
        "--no-gate",
    ]
    assert main(args) == EXIT_OK
    out = capsys.readouterr().out
    assert "operating point 'site-c' saved" in out and "of 40 patients" in out
    assert "to narrow the 95 % intervals to width 0.1: about " in out and "more PNEUMONIA images" in out
    assert main(["calibrate", str(run_dir), "--list"]) == EXIT_OK
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines[1:]] == [
        "default", "site-a", "site-b", "site-c", "validation-bootstrap_margin", "validation-max_specificity",
    ]  # fmt: skip
    rules = {line.split()[0]: line.split()[3] for line in lines[1:]}
    assert rules["site-c"] == "max_specificity"  # a sample has no groups: the group_median run's fallback
    assert rules["default"] == rundir.read_threshold(run_dir)["rule"]


def test_cli_calibrate_takes_the_rule_and_refuses_an_unknown_one_before_loading_the_model(
    run: api.Run, run_dir: Path, site: Path, cached_load, capsys, monkeypatch
) -> None:
    args = ["calibrate", str(run_dir), str(site), "--target-recall", "0.9", "--bootstrap", "20", "--no-gate"]
    assert main([*args, "--name", "site-mid", "--rule", "midpoint"]) == EXIT_OK
    assert "(midpoint)" in capsys.readouterr().out
    table = _scores(run, site)
    labels, scores = table["label"], table["probability"]
    midpoint = choose_threshold(labels, scores, target_recall=0.9, rule="midpoint").threshold
    assert midpoint < choose_threshold(labels, scores, target_recall=0.9).threshold  # the rules differ here
    saved = rundir.read_operating_points(run_dir)["site-mid"]
    assert saved["rule"] == "midpoint" and saved["threshold"] == pytest.approx(midpoint)
    before = (run_dir / rundir.OPERATING_POINTS_FILE).read_bytes()
    monkeypatch.setattr(api.Run, "load", staticmethod(lambda *a, **k: pytest.fail("the model was loaded")))
    assert main([*args, "--name", "site-x", "--rule", "group_median"]) == EXIT_USAGE
    err = capsys.readouterr().err.strip()
    assert err == "error: unknown calibration rule 'group_median'; valid rules: max_specificity, midpoint"
    assert (run_dir / rundir.OPERATING_POINTS_FILE).read_bytes() == before


@pytest.mark.parametrize(("n_normal", "n_pneumonia"), [(0, 20), (5, 20)])
def test_calibrate_on_one_class_or_too_few_fails_in_one_line_and_writes_nothing(
    tiny_run: Path, sample_dir: Path, make_run_copy, tmp_path: Path, capsys, n_normal: int, n_pneumonia: int
) -> None:
    run = make_run_copy(tiny_run, tmp_path / "run")
    before = (run / rundir.OPERATING_POINTS_FILE).read_bytes()  # training's validation points
    data = tmp_path / "data"
    for label, n in (("NORMAL", n_normal), ("PNEUMONIA", n_pneumonia)):
        (data / label).mkdir(parents=True)
        for path in sorted((sample_dir / "test" / label).glob("*.jpeg"))[:n]:
            shutil.copyfile(path, data / label / path.name)
    assert main(["calibrate", str(run), str(data), "--name", "x", "--bootstrap", "20"]) == EXIT_USAGE
    err = capsys.readouterr().err.strip()
    assert err == (
        f"error: {data}: calibration needs at least 10 images of each class; "
        f"found {n_normal} NORMAL and {n_pneumonia} PNEUMONIA"
    )
    assert (run / rundir.OPERATING_POINTS_FILE).read_bytes() == before


def test_training_keeps_the_other_rules_validation_points(tiny_run: Path) -> None:
    """Which rule transfers depends on the shift: every run keeps the thresholds of the rules it
    did not use, chosen on the same validation scores, as named points to switch to."""
    from cxr_pneumonia.evaluate import choose_threshold_with_margin, rates_at

    config = json.loads((tiny_run / "config.json").read_text())
    own = rundir.read_threshold(tiny_run)
    assert own["rule"] == config["train"]["threshold_rule"] == "group_median"
    points = rundir.read_operating_points(tiny_run)
    assert sorted(points) == ["validation-bootstrap_margin", "validation-max_specificity"]
    val = pd.read_csv(tiny_run / "val_predictions.csv")
    y, s, target = val["label"].to_numpy(), val["probability"].to_numpy(), own["target_recall"]
    pooled = choose_threshold(y, s, target_recall=target).threshold
    margin = choose_threshold_with_margin(
        y, s, val["patient_id"].astype(str).to_numpy(), target_recall=target,
        percentile=config["train"]["threshold_margin_percentile"], seed=config["train"]["seed"],
    )[0].threshold  # fmt: skip
    for name, expected in (("validation-max_specificity", pooled), ("validation-bootstrap_margin", margin)):
        point = points[name]
        assert point["threshold"] == pytest.approx(expected, abs=1e-6), name
        rates = rates_at(y, s, point["threshold"])
        assert (point["recall"], point["specificity"]) == (rates["recall"], rates["specificity"])
        assert point["chosen_on"].startswith("validation") and point["n"] == len(val)
        assert isinstance(point["achievable"], bool)  # whether the target was reachable at all
    at_pooled = api.Run.load(tiny_run, operating_point="validation-max_specificity")
    assert at_pooled.threshold == points["validation-max_specificity"]["threshold"]


# ---------------------------------------------------------------------- applying a point


@pytest.fixture(scope="module")
def everything_positive(run_dir: Path) -> str:
    """A point whose threshold 0 calls every image PNEUMONIA: a known answer for every output."""
    rundir.save_operating_point(run_dir, {"name": "all-pos", "threshold": 0.0, "rule": "test"})
    return "all-pos"


def test_predict_applies_the_named_threshold(
    run: api.Run, run_dir: Path, site: Path, site_a: dict, everything_positive, tmp_path, monkeypatch
):
    out = tmp_path / "all.csv"
    args = ["predict", str(run_dir), str(site), "--no-gate", "--out", str(out)]
    assert main([*args, "--operating-point", everything_positive]) == EXIT_OK  # Run.load for real
    table = pd.read_csv(out)
    assert (table["label"] == "PNEUMONIA").all() and (table["threshold"] == 0.0).all()
    assert (table["operating_point"] == "all-pos").all()
    monkeypatch.setattr(api.Run, "load", staticmethod(lambda path, **kwargs: run))  # not twice
    assert main(args) == EXIT_OK
    table = pd.read_csv(out)
    assert (table["operating_point"] == "default").all() and (table["threshold"] == run.threshold).all()
    predictions = api.predict(run, [site], operating_point="site-a", gate=False)
    assert {p.threshold for p in predictions} == {site_a["threshold"]}
    for p in predictions:  # a calibrated threshold: labels are probability >= threshold
        assert p.label == ("PNEUMONIA" if p.probability >= site_a["threshold"] else "NORMAL")
    assert len({p.label for p in predictions}) == 2
    assert api.predict(run, [site], gate=False)[0].threshold == run.threshold  # the run as loaded


def test_evaluate_applies_the_named_threshold_and_says_so(
    run_dir: Path, site: Path, everything_positive, cached_load, tmp_path: Path, capsys
) -> None:
    out = tmp_path / "eval"
    args = [
        "evaluate",
        str(run_dir),
        str(site),
        "--out",
        str(out),
        "--bootstrap",
        "20",
        "--no-heatmaps",
        "--no-gate",
    ]
    assert main([*args, "--operating-point", everything_positive]) == EXIT_OK
    assert "operating point all-pos (threshold 0)" in capsys.readouterr().out
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["operating_point"] == "all-pos" and metrics["threshold"] == 0.0
    assert (metrics["recall"], metrics["specificity"]) == (1.0, 0.0)
    assert metrics["ci_unit"] == "patient" and metrics["n_ci_units"] == 40
    html = (out / "report.html").read_text()
    assert "Operating point: all-pos." in html and "95 % CI, patient-level bootstrap (40 patients)" in html


def test_an_unknown_operating_point_fails_in_one_line_listing_the_known(
    run_dir: Path, site: Path, site_a: dict, capsys
) -> None:
    assert main(["predict", str(run_dir), str(site), "--operating-point", "nope"]) == EXIT_USAGE
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and "no operating point 'nope'" in err
    assert "known: default, " in err and "site-a" in err
    with pytest.raises(rundir.RunError, match="no operating point 'nope'"):
        api.Run.load(run_dir, operating_point="nope")


def test_serve_model_card_names_the_operating_point(run: api.Run, run_dir: Path, site_a: dict) -> None:
    from fastapi.testclient import TestClient

    from cxr_pneumonia.serve import create_app

    at_site = run.with_operating_point("site-a")  # Run.load(..., operating_point=) is tested above
    with TestClient(create_app(at_site)) as client:
        card = client.get("/v1/model").json()
    assert card["operating_point"] == "site-a" and card["threshold"]["threshold"] == site_a["threshold"]
    assert at_site.with_operating_point(None).operating_point == "default"
    assert at_site.with_operating_point("default").threshold == rundir.read_threshold(run_dir)["threshold"]


def test_a_file_without_read_permission_is_left_out_not_fatal(
    tiny_run: Path, make_run_copy, site: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """evaluate hashed every file for the leakage check before scoring, and calibrate hashed every
    file for the fingerprint after it: one file the user may not read aborted both with a traceback's
    OSError. Now it is a failure row like any unreadable image. (Tests run as root, where chmod
    cannot deny a read, so the operating system's refusal is simulated at the two calls that read.)"""
    import builtins

    sample = tmp_path / "site"
    shutil.copytree(site, sample)
    denied = sorted((sample / "NORMAL").glob("*.jpeg"))[0]

    def refuse(path: object) -> None:
        if Path(str(path)) == denied:
            raise PermissionError(13, "Permission denied", str(path))

    real_open, real_read_bytes = builtins.open, Path.read_bytes
    monkeypatch.setattr(builtins, "open", lambda file, *a, **k: refuse(file) or real_open(file, *a, **k))
    monkeypatch.setattr(Path, "read_bytes", lambda self: refuse(self) or real_read_bytes(self))
    run = api.Run.load(make_run_copy(tiny_run, tmp_path / "run"))

    metrics = api.evaluate(run, sample, tmp_path / "eval", n_bootstrap=0, gate=False, heatmaps=False)
    failures = pd.read_csv(tmp_path / "eval" / "failures.csv")
    assert metrics["n"] == 49 and metrics["n_failed"] == 1
    assert list(failures["file"]) == [str(denied)] and "Permission denied" in failures["reason"].iloc[0]

    point = api.calibrate(run, sample, name="site-b", target_recall=0.9, n_bootstrap=50, gate=False)
    readable = sorted(p for p in sample.rglob("*.jpeg") if p != denied)
    hashes = sorted(hashlib.sha256(real_read_bytes(p)).hexdigest() for p in readable)
    assert (point["n"], point["n_failed"], point["data"]["n_files"]) == (49, 1, 50)
    assert point["data"]["fingerprint"] == hashlib.sha256("\n".join(hashes).encode()).hexdigest()


def test_calibrate_leaves_the_validation_names_to_training(run_dir: Path, site: Path) -> None:
    from cxr_pneumonia.calibration import CalibrationError, preflight

    before = (run_dir / rundir.OPERATING_POINTS_FILE).read_bytes()
    for name in ("validation-max_specificity", "validation-group_median"):
        with pytest.raises(CalibrationError, match="points training chose on validation"):
            preflight(run_dir, site, name=name, replace=True)
    assert (run_dir / rundir.OPERATING_POINTS_FILE).read_bytes() == before
