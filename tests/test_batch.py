"""Batch preprocessing: the mirrored tree with its manifest, training's content-addressed cache,
failures collected rather than raised, and the worker pool."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from unittest.mock import ANY

import cv2
import numpy as np
import pytest

from cxr_pneumonia import batch
from cxr_pneumonia.batch import (
    CONFIG_NAME,
    FAILURES_NAME,
    MANIFEST_NAME,
    cache_images,
    default_workers,
    preprocess_tree,
    target_for,
    write_failures_csv,
)
from cxr_pneumonia.config import config_hash
from cxr_pneumonia.io import load_image
from cxr_pneumonia.preprocess import PreprocessConfig, build_pipeline

CFG = PreprocessConfig(size=32)


def xray(seed: int) -> np.ndarray:
    """A bright body with two dark lungs on a dark background, a little noise."""
    rng = np.random.default_rng(seed)
    img = np.full((96, 80), 20, np.uint8)
    cv2.ellipse(img, (40, 48), (36, 43), 0, 0, 360, 180, cv2.FILLED)
    for x in (24, 56):
        cv2.ellipse(img, (x, 48), (11, 32), 0, 0, 360, 70, cv2.FILLED)
    return np.clip(img + rng.integers(0, 6, img.shape), 0, 255).astype(np.uint8)


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """src/{a,b}/*.png: three readable images (two byte-identical) and one broken file."""
    src = tmp_path / "src"
    for rel, seed in [("a/one.png", 1), ("a/two.png", 2), ("b/copy_of_one.png", 1)]:
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(src / rel), xray(seed))
    (src / "b" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    return src


def read_failures(path: Path) -> dict[str, str]:
    with open(path, newline="") as handle:
        return {Path(row["file"]).name: row["reason"] for row in csv.DictReader(handle)}


def test_tree_is_mirrored_with_manifest_config_and_failures(tree, tmp_path):
    dst = tmp_path / "dst"
    report = preprocess_tree(tree, dst, CFG, workers=1, progress=False)
    assert len(report.processed) == 3 and report.skipped == [] and report.n_total == 4
    assert list(read_failures(dst / FAILURES_NAME)) == ["broken.png"]
    for rel in ("a/one.png", "a/two.png", "b/copy_of_one.png"):
        expected = build_pipeline(CFG)(load_image(tree / rel))
        np.testing.assert_array_equal(cv2.imread(str(dst / rel), cv2.IMREAD_UNCHANGED), expected)
    manifest = json.loads((dst / MANIFEST_NAME).read_text())
    assert set(manifest["entries"]) == {"a/one.png", "a/two.png", "b/copy_of_one.png"}
    assert json.loads((dst / CONFIG_NAME).read_text())["size"] == 32


def test_rerun_skips_what_is_done_and_redoes_what_changed(tree, tmp_path):
    dst = tmp_path / "dst"
    preprocess_tree(tree, dst, CFG, workers=1, progress=False)
    again = preprocess_tree(tree, dst, CFG, workers=1, progress=False)
    assert again.processed == [] and len(again.skipped) == 3 and len(again.failures) == 1

    cv2.imwrite(str(tree / "a" / "two.png"), xray(7))  # new content under the same name
    (dst / "a" / "one.png").unlink()  # an output gone missing
    third = preprocess_tree(tree, dst, CFG, workers=1, progress=False)
    assert sorted(p.relative_to(dst).as_posix() for p in third.processed) == ["a/one.png", "a/two.png"]

    other = preprocess_tree(tree, dst, PreprocessConfig(size=16), workers=1, progress=False)
    assert len(other.processed) == 3  # another config: everything redone


@pytest.mark.parametrize("inside", [True, False])
def test_bad_folders_are_refused(tree, tmp_path, inside):
    if inside:
        with pytest.raises(ValueError, match="must not be inside"):
            preprocess_tree(tree, tree / "out", CFG, workers=1, progress=False)
    else:
        with pytest.raises(NotADirectoryError):
            preprocess_tree(tmp_path / "missing", tmp_path / "out", CFG, workers=1, progress=False)


def test_cache_shares_duplicates_marks_failures_and_skips_on_rerun(tree, tmp_path):
    paths = [tree / "a/one.png", tree / "b/broken.png", tree / "b/copy_of_one.png", tree / "a/two.png"]
    cached, report = cache_images(paths, CFG, tmp_path / "cache", workers=1, progress=False)
    assert cached[1] is None and len(report.failures) == 1
    assert cached[0] == cached[2] and cached[0] != cached[3]  # identical bytes, one entry
    assert len(report.processed) == 2
    assert cached[0].parent.parent.parent == tmp_path / "cache"  # cache/<config hash>/<sha[:2]>/
    np.testing.assert_array_equal(
        cv2.imread(str(cached[3]), cv2.IMREAD_UNCHANGED), build_pipeline(CFG)(load_image(paths[3]))
    )
    again, second = cache_images(paths, CFG, tmp_path / "cache", workers=1, progress=False)
    assert again == cached and second.processed == [] and len(second.skipped) == 3


def test_a_pool_of_workers_gives_the_same_outputs(tree, tmp_path):
    one = preprocess_tree(tree, tmp_path / "one", CFG, workers=1, progress=False)
    two = preprocess_tree(tree, tmp_path / "two", CFG, workers=2, progress=False)  # spawn
    assert len(two.processed) == len(one.processed) == 3 and len(two.failures) == 1
    for path in one.processed:
        rel = path.relative_to(tmp_path / "one")
        assert (tmp_path / "two" / rel).read_bytes() == path.read_bytes()


def test_failures_csv_is_sorted_with_a_header(tmp_path):
    write_failures_csv(tmp_path / "f.csv", [("z.png", "empty file"), ("a.png", "truncated")])
    rows = list(csv.reader((tmp_path / "f.csv").read_text().splitlines()))
    assert rows == [["file", "reason"], ["a.png", "truncated"], ["z.png", "empty file"]]
    write_failures_csv(tmp_path / "none.csv", [])
    assert (tmp_path / "none.csv").read_text().strip() == "file,reason"


def test_default_workers_is_at_least_one():
    assert default_workers() >= 1


def test_a_file_without_read_permission_is_a_failure_row_not_a_stop(tree, tmp_path, monkeypatch):
    """preprocess and train hash every file first: one the user may not read stopped the whole
    batch with "[Errno 13] Permission denied". Now it fails alone, with the reader's reason.
    (Tests run as root, where chmod cannot deny a read: the refusal is simulated at both reads.)"""
    import builtins

    denied = tree / "a" / "two.png"
    real_open, real_read_bytes = builtins.open, Path.read_bytes

    def refuse(path: object) -> None:
        if Path(str(path)) == denied:
            raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(builtins, "open", lambda file, *a, **k: refuse(file) or real_open(file, *a, **k))
    monkeypatch.setattr(Path, "read_bytes", lambda self: refuse(self) or real_read_bytes(self))

    report = preprocess_tree(tree, tmp_path / "dst", CFG, workers=1, progress=False)
    assert len(report.processed) == 2 and report.n_total == 4
    assert read_failures(tmp_path / "dst" / FAILURES_NAME)["two.png"] == "cannot read file: Permission denied"

    paths = sorted(tree.rglob("*.png"))
    cached, report = cache_images(paths, CFG, tmp_path / "cache", workers=1, progress=False)
    assert [p.name for p, c in zip(paths, cached, strict=True) if c is None] == ["two.png", "broken.png"]
    assert dict(report.failures)[str(denied)] == "cannot read file: Permission denied"


def output_sizes(dst: Path) -> dict[str, int]:
    """Every PNG under ``dst`` (manifest key -> side length)."""
    return {
        p.relative_to(dst).as_posix(): cv2.imread(str(p), cv2.IMREAD_UNCHANGED).shape[0]
        for p in dst.rglob("*.png")
    }


def manifest_of(dst: Path) -> dict:
    return json.loads((dst / MANIFEST_NAME).read_text())


def interrupt_at(monkeypatch: pytest.MonkeyPatch, n: int, seen: list[dict]) -> None:
    """Ctrl-C while the n-th job runs; ``seen`` gets the manifest on disk at that moment (what a
    kill -9, which runs no cleanup, would leave)."""
    real, calls = batch._process_one, []

    def interrupted(job, cfg, max_pixels):
        calls.append(job)
        if len(calls) == n:
            seen.append(manifest_of(job.target.parent.parent))
            raise KeyboardInterrupt
        return real(job, cfg, max_pixels)

    monkeypatch.setattr(batch, "_process_one", interrupted)
    monkeypatch.setattr(batch, "MANIFEST_FLUSH_SECONDS", 0.0)  # record every output as it finishes


def test_a_run_stopped_under_a_new_config_leaves_nothing_the_manifest_describes_wrongly(
    tree, tmp_path, monkeypatch
):
    """A run with a new config used to overwrite outputs while the old manifest and config stayed:
    stopped midway, a rerun with the old config trusted that manifest and kept the new config's
    outputs ("0 processed, 3 skipped" with one 16-pixel image among 32-pixel ones)."""
    dst, small = tmp_path / "dst", PreprocessConfig(size=16)
    preprocess_tree(tree, dst, CFG, workers=1, progress=False)
    seen: list[dict] = []
    interrupt_at(monkeypatch, 2, seen)  # a/one.png done, stopped on a/two.png
    with pytest.raises(KeyboardInterrupt):
        preprocess_tree(tree, dst, small, workers=1, progress=False)
    expected = {
        "config_hash": config_hash(small),
        "entries": {"a/one.png": {"source": "a/one.png", "sha256": ANY}},
    }
    assert seen == [expected] and manifest_of(dst) == expected
    assert output_sizes(dst) == {"a/one.png": 16}  # the size-32 outputs went before any was rewritten
    assert json.loads((dst / CONFIG_NAME).read_text())["size"] == 16 and not (dst / FAILURES_NAME).exists()

    monkeypatch.undo()
    back = preprocess_tree(tree, dst, CFG, workers=1, progress=False)
    assert len(back.processed) == 3 and back.skipped == []
    assert output_sizes(dst) == {"a/one.png": 32, "a/two.png": 32, "b/copy_of_one.png": 32}


def test_a_stopped_run_resumes_where_it_stopped(tree, tmp_path, monkeypatch):
    dst, small = tmp_path / "dst", PreprocessConfig(size=16)
    preprocess_tree(tree, dst, CFG, workers=1, progress=False)
    interrupt_at(monkeypatch, 3, [])  # a/one.png and a/two.png done, stopped on b/broken.png
    with pytest.raises(KeyboardInterrupt):
        preprocess_tree(tree, dst, small, workers=1, progress=False)
    monkeypatch.undo()
    resumed = preprocess_tree(tree, dst, small, workers=1, progress=False)
    assert [p.relative_to(dst).as_posix() for p in resumed.processed] == ["b/copy_of_one.png"]
    assert len(resumed.skipped) == 2 and len(resumed.failures) == 1
    assert output_sizes(dst) == {"a/one.png": 16, "a/two.png": 16, "b/copy_of_one.png": 16}


def test_sources_sharing_an_output_name_both_fail_and_neither_output_stays(tree, tmp_path):
    """x.jpg and x.png both become x.png: one was lost without a word and every rerun flipped it."""
    dst = tmp_path / "dst"
    preprocess_tree(tree, dst, CFG, workers=1, progress=False)
    cv2.imwrite(str(tree / "a" / "one.jpg"), xray(3))
    for _ in range(2):
        report = preprocess_tree(tree, dst, CFG, workers=1, progress=False)
        failures = read_failures(dst / FAILURES_NAME)
        assert failures == {
            "broken.png": failures["broken.png"],
            "one.jpg": f"its output one.png would also be written from {tree / 'a' / 'one.png'}",
            "one.png": f"its output one.png would also be written from {tree / 'a' / 'one.jpg'}",
        }
        assert len(report.failures) == 3 and report.n_total == 5
        assert (
            sorted(output_sizes(dst))
            == sorted(manifest_of(dst)["entries"])
            == ["a/two.png", "b/copy_of_one.png"]
        )


def test_dicoms_named_by_uid_keep_their_whole_name():
    """Replacing a UID's last number by .png gave a whole series one output name."""
    src, dst = Path("src"), Path("dst")
    assert target_for(src / "s/1.2.840.113619.2.55", src, dst) == dst / "s/1.2.840.113619.2.55.png"
    assert target_for(src / "s/1.2.840.113619.2.56", src, dst) == dst / "s/1.2.840.113619.2.56.png"
    assert target_for(src / "s/IM0001", src, dst) == dst / "s/IM0001.png"
    assert target_for(src / "s/x.JPEG", src, dst) == dst / "s/x.png"


@pytest.mark.parametrize("size", [32, 16])
def test_outputs_of_failed_vanished_or_replaced_sources_do_not_stay(tree, tmp_path, size):
    """A source now truncated or gone kept its old output and manifest entry; after a config change
    those outputs sat beside the new config's while preprocess_config.json named only the new one."""
    dst = tmp_path / "dst"
    preprocess_tree(tree, dst, CFG, workers=1, progress=False)
    two = tree / "a" / "two.png"
    two.write_bytes(two.read_bytes()[:200])
    (tree / "b" / "copy_of_one.png").unlink()
    report = preprocess_tree(tree, dst, PreprocessConfig(size=size), workers=1, progress=False)
    assert output_sizes(dst) == {"a/one.png": size} and list(manifest_of(dst)["entries"]) == ["a/one.png"]
    assert sorted(read_failures(dst / FAILURES_NAME)) == ["broken.png", "two.png"]
    assert report.removed == [dst / "b" / "copy_of_one.png"]
    assert ", 1 removed (source gone), " in report.summary()


def test_cache_names_every_copy_of_a_failing_file(tree, tmp_path):
    """Identical files share one job: the copies of a failing one were dropped from failures.csv."""
    broken, copy = tree / "b" / "broken.png", tree / "a" / "broken_copy.png"
    copy.write_bytes(broken.read_bytes())
    paths = [broken, tree / "a" / "one.png", copy]
    cached, report = cache_images(paths, CFG, tmp_path / "cache", workers=1, progress=False)
    assert [c is None for c in cached] == [True, False, True]
    reasons = dict(report.failures)
    assert sorted(reasons) == sorted([str(broken), str(copy)]) and reasons[str(copy)] == reasons[str(broken)]
