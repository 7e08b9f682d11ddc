"""Batch preprocessing: the mirrored tree with its manifest, training's content-addressed cache,
failures collected rather than raised, and the worker pool."""

from __future__ import annotations

import csv
import json
import logging
import os
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
        "src": str(tree.resolve()),
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


def png_bytes(seed: int) -> bytes:
    return cv2.imencode(".png", xray(seed))[1].tobytes()


@pytest.mark.parametrize("earlier_run", [False, True])
@pytest.mark.parametrize("cause", ["unreadable", "shared name"])
def test_a_users_own_file_at_a_target_stays_when_its_source_fails(tree, tmp_path, cause, earlier_run):
    """Every file at a target about to be rewritten was deleted, listed by a manifest or not: the
    user's own dst/c/x.png went when src/c/x.jpg then failed. Only a job that succeeds replaces it."""
    dst, mine = tmp_path / "dst", png_bytes(9)
    if earlier_run:  # a manifest of this command that does not list c/x.png
        preprocess_tree(tree, dst, CFG, workers=1, progress=False)
    (dst / "c").mkdir(parents=True)
    (dst / "c" / "x.png").write_bytes(mine)
    (tree / "c").mkdir()
    if cause == "unreadable":
        (tree / "c" / "x.jpg").write_bytes(b"")
    else:  # x.jpg and x.png share the output c/x.png: both fail
        cv2.imwrite(str(tree / "c" / "x.jpg"), xray(3))
        cv2.imwrite(str(tree / "c" / "x.png"), xray(4))
    report = preprocess_tree(tree, dst, CFG, workers=1, progress=False)
    assert (dst / "c" / "x.png").read_bytes() == mine and report.removed == []
    assert {"x.jpg", "broken.png"} <= set(read_failures(dst / FAILURES_NAME))
    assert sorted(manifest_of(dst)["entries"]) == ["a/one.png", "a/two.png", "b/copy_of_one.png"]

    (tree / "c" / "x.png").unlink(missing_ok=True)
    cv2.imwrite(str(tree / "c" / "x.jpg"), xray(3))  # now it succeeds and replaces the user's file
    preprocess_tree(tree, dst, CFG, workers=1, progress=False)
    assert output_sizes(dst)["c/x.png"] == 32 and "c/x.png" in manifest_of(dst)["entries"]


FOREIGN_MANIFESTS = {
    "no config hash": {"entries": {"figure1.png": {"caption": "my figure"}}},
    "config hash not a string": {
        "config_hash": 3,
        "entries": {"figure1.png": {"source": "f", "sha256": "0"}},
    },
    "an entry without sha256": {"config_hash": "x", "entries": {"figure1.png": {"source": "f.png"}}},
    "a source not a string": {"config_hash": "x", "entries": {"figure1.png": {"source": 1, "sha256": "0"}}},
    "an entry not a dict": {  # figure1.png's entry looks like one of ours, another does not
        "config_hash": "x",
        "entries": {"figure1.png": {"source": "f.png", "sha256": "0"}, "a/one.png": "mine"},
    },
    "src not a string": {
        "config_hash": "x",
        "src": 1,
        "entries": {"figure1.png": {"source": "f", "sha256": "0"}},
    },
}


@pytest.mark.parametrize("foreign", sorted(FOREIGN_MANIFESTS))
def test_a_manifest_this_command_did_not_write_deletes_nothing(tree, tmp_path, foreign):
    """Every key of any DST/manifest.json with an ``entries`` object was deleted: another tool's
    figure1.png went. A manifest not of this command's shape is as if absent."""
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / MANIFEST_NAME).write_text(json.dumps(FOREIGN_MANIFESTS[foreign]))
    (dst / "figure1.png").write_bytes(figure := png_bytes(6))
    report = preprocess_tree(tree, dst, CFG, workers=1, progress=False)
    assert (dst / "figure1.png").read_bytes() == figure and report.removed == []
    assert sorted(manifest_of(dst)["entries"]) == ["a/one.png", "a/two.png", "b/copy_of_one.png"]


def site(root: Path, names: dict[str, int]) -> Path:
    for rel, seed in names.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(root / rel), xray(seed))
    return root


def test_two_source_trees_into_one_folder_keep_both(tree, tmp_path, caplog):
    """``preprocess site1 D`` then ``preprocess site2 D`` deleted site1's outputs as "source gone"."""
    dst, site1_outputs = tmp_path / "dst", ["a/one.png", "a/two.png", "b/copy_of_one.png"]
    site2 = site(tmp_path / "site2", {"c/three.png": 3, "c/four.png": 4})
    preprocess_tree(tree, dst, CFG, workers=1, progress=False)
    report = preprocess_tree(site2, dst, CFG, workers=1, progress=False)
    both = sorted([*site1_outputs, "c/four.png", "c/three.png"])
    assert report.removed == [] and sorted(output_sizes(dst)) == sorted(manifest_of(dst)["entries"]) == both
    assert manifest_of(dst)["src"] is None  # entries from two trees: none is removed as "source gone"

    (site2 / "c" / "four.png").unlink()  # the merged folder cannot tell which tree lost it: it stays
    again = preprocess_tree(site2, dst, CFG, workers=1, progress=False)
    assert again.removed == [] and len(again.skipped) == 1 and sorted(manifest_of(dst)["entries"]) == both
    back = preprocess_tree(tree, dst, CFG, workers=1, progress=False)
    assert back.processed == [] and len(back.skipped) == 3 and sorted(output_sizes(dst)) == both

    # Another config: site1's outputs are not site2's to delete, nor can they be listed under it
    with caplog.at_level(logging.WARNING, logger="cxr_pneumonia.batch"):
        preprocess_tree(site2, dst, PreprocessConfig(size=16), workers=1, progress=False)
    assert output_sizes(dst) == {**dict.fromkeys(site1_outputs, 32), "c/three.png": 16, "c/four.png": 32}
    assert list(manifest_of(dst)["entries"]) == ["c/three.png"] and manifest_of(dst)["src"] == str(
        site2.resolve()
    )
    assert "4 outputs of another preprocessing config are kept" in caplog.text


@pytest.mark.parametrize("size", [32, 16])
def test_an_empty_source_folder_deletes_nothing(tree, tmp_path, size):
    """An unmounted share's empty mount point deleted every output as "source gone"."""
    dst, away = tmp_path / "dst", tmp_path / "away"
    preprocess_tree(tree, dst, CFG, workers=1, progress=False)
    before = {rel: (dst / rel).read_bytes() for rel in output_sizes(dst)}
    tree.rename(away)
    tree.mkdir()
    report = preprocess_tree(tree, dst, PreprocessConfig(size=size), workers=1, progress=False)
    assert report.removed == [] and report.n_total == 0
    assert {rel: (dst / rel).read_bytes() for rel in output_sizes(dst)} == before
    assert sorted(manifest_of(dst)["entries"]) == (sorted(before) if size == 32 else [])

    tree.rmdir()
    away.rename(tree)  # mounted again
    again = preprocess_tree(tree, dst, PreprocessConfig(size=size), workers=1, progress=False)
    assert len(again.skipped) == (3 if size == 32 else 0) and len(again.failures) == 1
    assert output_sizes(dst) == dict.fromkeys(before, size) and sorted(manifest_of(dst)["entries"]) == sorted(
        before
    )


def test_a_stale_output_behind_a_linked_sub_folder_is_removed(tmp_path):
    """Containment was judged on the resolved path: outputs in a DST sub-folder that is a link to
    another disk were never removed, and the manifest then described them wrongly."""
    src, dst, disk = tmp_path / "src", tmp_path / "dst", tmp_path / "other_disk" / "NORMAL"
    site(src, {"NORMAL/a0.png": 0, "NORMAL/a1.png": 1, "NORMAL/a2.png": 2})
    disk.mkdir(parents=True)
    dst.mkdir()
    os.symlink(disk, dst / "NORMAL")
    preprocess_tree(src, dst, CFG, workers=1, progress=False)
    (src / "NORMAL" / "a1.png").write_bytes(b"")  # now failing
    (src / "NORMAL" / "a2.png").unlink()  # now gone
    report = preprocess_tree(src, dst, PreprocessConfig(size=16), workers=1, progress=False)
    assert {p.name: cv2.imread(str(p), cv2.IMREAD_UNCHANGED).shape[0] for p in disk.iterdir()} == {
        "a0.png": 16
    }
    assert list(manifest_of(dst)["entries"]) == ["NORMAL/a0.png"] and report.removed == [
        dst / "NORMAL/a2.png"
    ]


def test_only_keys_inside_dst_and_outside_src_may_be_removed(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    (src / "x").mkdir(parents=True)
    dst.mkdir()
    os.symlink(src / "x", dst / "into_src")
    may = [batch._may_remove(key, src, dst) for key in ("a/b.png", "b.png", "../b.png", "a/../../b.png")]
    assert may == [True, True, False, False]
    assert not batch._may_remove(str(tmp_path / "b.png"), src, dst)  # absolute
    assert not batch._may_remove("into_src/b.png", src, dst) and not batch._may_remove("a/b.txt", src, dst)


def test_an_older_manifest_without_src_loads_and_keeps_what_it_cannot_place(tree, tmp_path):
    """A manifest from before ``src`` was recorded: its outputs are still skipped, and one whose
    source this run does not list stays: which tree it came from is unknown."""
    dst = tmp_path / "dst"
    preprocess_tree(tree, dst, CFG, workers=1, progress=False)
    old = manifest_of(dst)
    old.pop("src", None)  # as an older version wrote it
    (dst / MANIFEST_NAME).write_text(json.dumps(old))
    (tree / "b" / "copy_of_one.png").unlink()
    report = preprocess_tree(tree, dst, CFG, workers=1, progress=False)
    assert report.processed == [] and len(report.skipped) == 2 and report.removed == []
    assert manifest_of(dst)["src"] is None and "b/copy_of_one.png" in manifest_of(dst)["entries"]
