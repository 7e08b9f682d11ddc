"""Archive scoring on Ray Data (`predict --engine ray`): plain predict's answers as Parquet, resumable.

One local Ray (two CPUs) serves the module; each job starts its own model actor, so the
tests run as few jobs as they can: a first job on part of a folder, then, after a simulated
kill, the command line on the whole folder.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

ray = pytest.importorskip("ray", reason="the ray extra is not installed")

from conftest import DECLARED_VIEWS, chest_dicom_bytes  # noqa: E402
from cxr_pneumonia import archive  # noqa: E402
from cxr_pneumonia.archive import ArchiveConfig, ArchiveError, score_archive  # noqa: E402
from cxr_pneumonia.cli import EXIT_PARTIAL, PREDICT_COLUMNS, main  # noqa: E402
from cxr_pneumonia.config import ConfigError  # noqa: E402


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray for the module (starting one costs seconds); jobs use it as it is."""
    for attempt in (1, 2):
        try:
            ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
            break
        except Exception:  # Ray waits 30 s for its node to start, which a loaded machine can miss
            ray.shutdown()
            if attempt == 2:
                raise
    yield
    ray.shutdown()


@pytest.fixture
def archive_dir(bad_inputs_dir, sample_dir) -> Path:
    """5 readable synthetic images (JPEG, 16-bit and RGBA PNG, DICOM), 3 unreadable files,
    4 chest X-rays of the sample and one as a DICOM whose header declares a lateral view."""
    from cxr_pneumonia.io import load_image

    folder, _ = bad_inputs_dir
    for path in sorted((sample_dir / "test" / "PNEUMONIA").iterdir())[:2]:
        shutil.copy(path, folder / path.name)
    for path in sorted((sample_dir / "test" / "NORMAL").iterdir())[:2]:
        shutil.copy(path, folder / path.name)
    lateral = chest_dicom_bytes(load_image(path), **DECLARED_VIEWS["lateral_ll.dcm"])
    (folder / "lateral_ll.dcm").write_bytes(lateral)
    return folder


def test_a_killed_job_rerun_from_the_cli_scores_every_image_once_as_plain_predict_does(
    local_ray, tiny_run, archive_dir, tmp_path, capsys
):
    from cxr_pneumonia.api import predict

    out = tmp_path / "scores"
    files = archive.expand_sources([archive_dir])
    # Parts of 2 images (Ray hands an actor whole blocks until it has a forward pass's worth).
    first = score_archive(tiny_run, files[:6], out, ArchiveConfig(workers=1, part_rows=2, batch_size=2))
    assert (first.images, first.scored, first.reused) == (6, 6, 0)

    # The kill: the last part never reached the disk and a half-written one was left behind.
    parts = sorted((out / archive.PARTS_DIR).glob("part-*.parquet"))
    assert len(parts) >= 3
    lost = len(pd.read_parquet(parts[-1]))
    parts[-1].unlink()
    (out / archive.PARTS_DIR / ".part-99-half.parquet.tmp").write_bytes(b"PAR1 half a part")
    kept = archive.read_parts(out)
    kept = kept.loc[kept["status"] == "ok", "path"].iloc[0]  # scored: a rejected image has no probability
    shutil.copy(kept, archive_dir / "zz_copy.jpeg")  # bytes already scored, under a new name

    argv = [
        "predict",
        str(tiny_run),
        str(archive_dir),
        "--engine",
        "ray",
        "--out",
        str(out),
        "--workers",
        "1",
    ]
    assert main(argv) == EXIT_PARTIAL  # three unreadable files
    err = capsys.readouterr().err
    n = len(files) + 1
    assert f"{n} predictions in" in err and f"({n - 6 + lost - 1} scored now, {6 - lost + 1} already" in err
    assert err.count("error: ") == 3 and "Traceback" not in err

    table = pd.read_parquet(out / archive.PREDICTIONS_FILE)
    assert list(table.columns) == PREDICT_COLUMNS and len(table) == n == table["path"].nunique()
    every_row = archive.read_parts(out)
    assert every_row["path"].value_counts().max() == 1  # nothing scored twice
    assert not list((out / archive.PARTS_DIR).glob(".part-*"))

    plain = pd.DataFrame([p.to_dict() for p in predict(tiny_run, [archive_dir])]).set_index("path")
    ours = table.set_index("path").loc[plain.index]
    assert (ours["status"] == plain["status"]).all() and ours["status"].eq("ok").sum() >= 4
    assert ours["error"].fillna("").tolist() == plain["error"].fillna("").tolist()
    ok = plain["status"] != "error"
    np.testing.assert_allclose(ours.loc[ok, "domain_score"], plain.loc[ok, "domain_score"], rtol=1e-5)
    scored = plain["probability"].notna()
    assert ours.loc[scored, "probability"].notna().all()
    assert np.abs(ours.loc[scored, "probability"] - plain.loc[scored, "probability"]).max() <= 1e-6
    assert (ours.loc[scored, "label"] == plain.loc[scored, "label"]).all()
    assert ours.loc[str(archive_dir / "zz_copy.jpeg"), "probability"] == ours.loc[kept, "probability"]
    lateral = str(archive_dir / "lateral_ll.dcm")  # the header travels through the Ray rows
    assert ours.loc[lateral, "status"] == "rejected" and "View Position LL" in ours.loc[lateral, "reason"]
    assert ours.loc[lateral, "reason"] == plain.loc[lateral, "reason"]


def test_an_output_folder_of_another_run_or_setting_is_refused(tiny_run, ungated_run, tmp_path):
    out = tmp_path / "scores"
    empty = score_archive(tiny_run, [], out)  # no images: no Ray job, but the folder is claimed
    assert empty.images == 0 and pd.read_parquet(empty.predictions).columns.tolist() == PREDICT_COLUMNS
    with pytest.raises(ArchiveError, match="another run or settings"):
        score_archive(ungated_run, [], out)
    with pytest.raises(ArchiveError, match="another run or settings"):
        score_archive(tiny_run, [], out, ArchiveConfig(gate=False))
    # the rows' labels follow the operating point: another one needs another folder
    with pytest.raises(ArchiveError, match="operating point default"):
        score_archive(tiny_run, [], out, ArchiveConfig(operating_point="validation-max_specificity"))
    assert score_archive(tiny_run, [], out, ArchiveConfig(workers=3, batch_size=8)).images == 0
    # a folder from before the point was in the identity: its config says which point it used
    point = ArchiveConfig(operating_point="validation-max_specificity")
    older = tmp_path / "older"
    score_archive(tiny_run, [], older, point)
    saved = json.loads((older / "archive.json").read_text())
    for key in ("operating_point", "threshold"):
        del saved["identity"][key]
    (older / "archive.json").write_text(json.dumps(saved))
    with pytest.raises(ArchiveError, match="operating point validation-max_specificity at"):
        score_archive(tiny_run, [], older)
    assert score_archive(tiny_run, [], older, point).images == 0


def test_archive_settings_are_checked_when_made():
    from cxr_pneumonia.runtime import RUNTIMES

    with pytest.raises(ConfigError, match="workers"):
        ArchiveConfig(workers=0)
    with pytest.raises(ConfigError, match="runtime: must be one of"):
        ArchiveConfig(runtime="tensorrt")
    assert set(ArchiveConfig.model_fields["runtime"].annotation.__args__) == set(RUNTIMES)
    assert tuple(PREDICT_COLUMNS) == archive.COLUMNS


def test_the_ray_engine_needs_an_output_folder(tiny_run, tmp_path, capsys):
    assert main(["predict", str(tiny_run), str(tmp_path), "--engine", "ray"]) == 1
    assert "ray needs --out DIR" in capsys.readouterr().err
    assert main(["predict", str(tiny_run), str(tmp_path), "--engine", "spark", "--out", str(tmp_path)]) == 1


def test_a_digest_ending_in_a_zero_byte_is_found():
    """One SHA-256 in 256 ends in 0x00, which NumPy's fixed-width bytes drop on the way out: such a
    file must still count as scored (the full-size kill test rescored one of 652 before this)."""
    import hashlib

    digests = [hashlib.sha256(str(i).encode()).digest() for i in range(2000)]
    ending_in_zero = [d for d in digests if d[-1] == 0]
    assert ending_in_zero  # 2000 digests hold about 8
    known = archive._digests(d.hex() for d in digests)
    assert all(archive._contains(known, d) for d in digests)
    assert not archive._contains(known, hashlib.sha256(b"never scored").digest())
    pairs = np.sort(
        np.array([archive._pair_digest(f"img_{i}.jpeg", d) for i, d in enumerate(digests)], dtype="S32")
    )
    assert all(
        archive._contains(pairs, archive._pair_digest(f"img_{i}.jpeg", d)) for i, d in enumerate(digests)
    )


def test_each_file_shows_the_result_of_the_bytes_read_now_not_the_last_written(
    local_ray, tiny_run, sample_dir, tmp_path
):
    """Job 1 scores a (bytes X) and b (Y); job 2 runs while a is cut short (an error) and b holds
    X; job 3, with both restored, scores nothing (both pairs of name and bytes were scored) and
    must show job 1's answers, not job 2's: the error would otherwise outlive its cause."""
    x = sorted((sample_dir / "test" / "PNEUMONIA").iterdir())[0].read_bytes()
    y = sorted((sample_dir / "test" / "NORMAL").iterdir())[0].read_bytes()
    folder, out = tmp_path / "in", tmp_path / "scores"
    folder.mkdir()
    a, b = str(folder / "a.jpeg"), str(folder / "b.jpeg")

    def job(bytes_a: bytes, bytes_b: bytes) -> tuple[archive.ArchiveSummary, pd.DataFrame]:
        Path(a).write_bytes(bytes_a)
        Path(b).write_bytes(bytes_b)
        summary = score_archive(tiny_run, [folder], out, ArchiveConfig(workers=1, batch_size=2))
        return summary, pd.read_parquet(out / archive.PREDICTIONS_FILE).set_index("path")

    _, first = job(x, y)
    assert first["status"].tolist() == ["ok", "ok"]
    assert first.loc[a, "probability"] != first.loc[b, "probability"]
    _, second = job(x[: len(x) // 2], x)
    assert second.loc[a, "status"] == "error" and second.loc[b, "probability"] == first.loc[a, "probability"]
    summary, third = job(x, y)
    assert (summary.images, summary.scored, summary.reused, summary.errors) == (2, 0, 2, 0)
    pd.testing.assert_frame_equal(third, first)


def test_a_killed_job_leaves_no_answer_of_the_job_before(tiny_run, sample_dir, tmp_path, monkeypatch):
    out = tmp_path / "scores"
    score_archive(tiny_run, [], out)  # an earlier job's answer: no rows
    assert (out / archive.PREDICTIONS_FILE).is_file()

    image = sorted((sample_dir / "test" / "NORMAL").iterdir())[0]
    # a job that cannot start (no Ray) is one line and keeps the earlier answer
    with monkeypatch.context() as no_ray:
        no_ray.setitem(sys.modules, "ray", None)
        with pytest.raises(archive.ArchiveError, match="the ray engine needs Ray"):
            score_archive(tiny_run, [image], out)
    assert (out / archive.PREDICTIONS_FILE).is_file()

    def killed(*args: object, **kwargs: object) -> None:  # killed while scoring
        raise KeyboardInterrupt

    monkeypatch.setattr(archive, "_dataset", killed)
    with pytest.raises(KeyboardInterrupt):
        score_archive(tiny_run, [image], out)
    assert not (out / archive.PREDICTIONS_FILE).exists()  # the empty table would pass for this job's answer
    assert (out / archive.ARCHIVE_JSON).is_file()  # the folder is still this run's: a rerun resumes it
