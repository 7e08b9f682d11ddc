"""Tests for the dataset layer: patient ids, discovery, leak-free splits, inspection."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from cxr_pneumonia import data
from cxr_pneumonia.data import (
    DatasetError,
    SplitConfig,
    content_hashes,
    discover,
    format_report,
    inspect_dataset,
    make_splits,
    merge_duplicate_groups,
    parse_patient_id,
    patient_split,
)

SHARED = Path(__file__).resolve().parents[2] / "shared"
KERMANY224 = SHARED / "data" / "kermany224"
FULLRES = SHARED / "data" / "kermany-fullres"


def write_png(path: Path, value: int, size: tuple[int, int] = (8, 8)) -> Path:
    """A tiny grayscale PNG whose bytes differ for each ``value``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), np.full(size, value, dtype=np.uint8))
    return path


def make_tree(root: Path, files: dict[str, int]) -> Path:
    for rel, value in files.items():
        write_png(root / rel, value)
    return root


# --------------------------------------------------------------------------- patient ids


@pytest.mark.parametrize(
    ("filename", "expected"),
    [
        ("person1946_bacteria_4875.jpeg", "person1946"),
        ("person1946_bacteria_4874.jpeg", "person1946"),
        ("person44_virus_94.jpeg", "person44"),
        ("person447_virus_921_1.jpeg", "person447"),
        ("PERSON12_Bacteria_3.JPEG", "person12"),
        ("IM-0115-0001.jpeg", "IM-0115"),
        ("IM-0505-0001-0001.jpeg", "IM-0505"),
        ("im-0007-0001.png", "IM-0007"),
        ("NORMAL2-IM-0115-0001.jpeg", "NORMAL2-IM-0115"),
        ("NORMAL2-IM-0381-0001-0002.jpeg", "NORMAL2-IM-0381"),
        ("train/NORMAL/IM-0117-0001.jpeg", "IM-0117"),
        # Unknown names are their own patient.
        ("scan_001.png", "scan_001.png"),
        ("person12.png", "person12.png"),
        ("IM-0115.jpeg", "IM-0115.jpeg"),
        ("1.2.840.113619.2.55", "1.2.840.113619.2.55"),
        ("some/folder/patient-A.dcm", "patient-A.dcm"),
    ],
)
def test_parse_patient_id(filename: str, expected: str) -> None:
    assert parse_patient_id(filename) == expected


def test_two_normal_sources_with_the_same_number_are_different_patients() -> None:
    assert parse_patient_id("IM-0115-0001.jpeg") != parse_patient_id("NORMAL2-IM-0115-0001.jpeg")


# --------------------------------------------------------------------------- discovery


def test_kermany_like_names_in_study_folders_stay_different_patients(tmp_path: Path) -> None:
    # a viewer exports each study as IM-0001-0001... in a folder of its own; Kermany's own files
    # lie directly in the class folder, where the name alone is the patient
    root = make_tree(
        tmp_path / "ds",
        {
            "NORMAL/study1/IM-0001-0001.png": 1,
            "NORMAL/study1/IM-0001-0002.png": 2,
            "NORMAL/study2/IM-0001-0001.png": 3,
            "PNEUMONIA/study1/IM-0001-0001.png": 4,
            "NORMAL/IM-0007-0001.jpeg": 5,
            "NORMAL/IM-0007-0002.jpeg": 6,
            # Kermany's other names stay global: one patient with images of both kinds
            "PNEUMONIA/bacteria/person1000_bacteria_2931.jpeg": 7,
            "PNEUMONIA/virus/person1000_virus_1681.jpeg": 8,
            "NORMAL/more/NORMAL2-IM-0115-0001.jpeg": 9,
        },
    )
    found = discover(root)
    rel = [Path(p).relative_to(root).as_posix() for p in found["path"]]
    ids = dict(zip(rel, found["patient_id"], strict=True))
    assert ids == {
        "NORMAL/study1/IM-0001-0001.png": "NORMAL/study1/IM-0001",
        "NORMAL/study1/IM-0001-0002.png": "NORMAL/study1/IM-0001",  # one study: one patient
        "NORMAL/study2/IM-0001-0001.png": "NORMAL/study2/IM-0001",
        "PNEUMONIA/study1/IM-0001-0001.png": "PNEUMONIA/study1/IM-0001",
        "NORMAL/IM-0007-0001.jpeg": "IM-0007",
        "NORMAL/IM-0007-0002.jpeg": "IM-0007",
        "PNEUMONIA/bacteria/person1000_bacteria_2931.jpeg": "person1000",
        "PNEUMONIA/virus/person1000_virus_1681.jpeg": "person1000",
        "NORMAL/more/NORMAL2-IM-0115-0001.jpeg": "NORMAL2-IM-0115",
    }


def test_discover_kaggle_layout(tmp_path: Path) -> None:
    root = make_tree(
        tmp_path / "ds",
        {
            "train/NORMAL/IM-0001-0001.jpeg": 1,
            "train/NORMAL/NORMAL2-IM-0001-0001.jpeg": 2,
            "train/PNEUMONIA/person3_bacteria_10.jpeg": 3,
            "train/PNEUMONIA/person3_bacteria_11.jpeg": 4,
            "val/normal/scan.png": 5,  # class folders match in any case
            "Test/Pneumonia/scan.png": 6,
        },
    )
    (root / "train" / "NORMAL" / "notes.txt").write_text("not an image")
    (root / "README.md").write_text("ignored")

    df = discover(root)

    assert list(df.columns) == ["path", "label", "class_name", "split", "patient_id"]
    assert len(df) == 6
    assert all(Path(p).is_absolute() and Path(p).is_file() for p in df["path"])
    assert df.groupby("split").size().to_dict() == {"train": 4, "val": 1, "test": 1}
    assert list(df["split"]) == ["train"] * 4 + ["val", "test"]  # sorted train, val, test
    by_name = {f"{Path(row.path).name}@{row.split}": row for row in df.itertuples()}
    assert by_name["IM-0001-0001.jpeg@train"].patient_id == "IM-0001"
    assert by_name["NORMAL2-IM-0001-0001.jpeg@train"].patient_id == "NORMAL2-IM-0001"
    assert by_name["person3_bacteria_10.jpeg@train"].label == 1
    assert by_name["person3_bacteria_10.jpeg@train"].class_name == "PNEUMONIA"
    # Same unknown name in two folders: two patients, so no false cross-split leak.
    assert by_name["scan.png@val"].patient_id == "val/normal/scan.png"
    assert by_name["scan.png@val"].label == 0
    assert by_name["scan.png@test"].patient_id == "Test/Pneumonia/scan.png"
    assert df["label"].dtype == np.int64


def test_discover_class_folder_root(tmp_path: Path) -> None:
    root = make_tree(
        tmp_path / "flat",
        {"NORMAL/IM-0002-0001.png": 1, "PNEUMONIA/person9_virus_1.png": 2, "PNEUMONIA/sub/x.png": 3},
    )
    df = discover(root)
    assert set(df["split"]) == {"all"}
    assert df["label"].tolist() == [0, 1, 1]
    assert df["class_name"].tolist() == ["NORMAL", "PNEUMONIA", "PNEUMONIA"]
    assert sorted(df["patient_id"]) == ["IM-0002", "PNEUMONIA/sub/x.png", "person9"]


def test_discover_csv_with_class_names_and_relative_paths(tmp_path: Path) -> None:
    write_png(tmp_path / "images" / "a.png", 1)
    write_png(tmp_path / "images" / "person7_virus_3.png", 2)
    write_png(tmp_path / "other" / "c.png", 3)
    csv = tmp_path / "lists" / "labels.csv"
    csv.parent.mkdir()
    csv.write_text(
        "path,label,split,patient_id\n"
        "../images/a.png,normal,train,P-1\n"
        "../images/person7_virus_3.png,Pneumonia,TEST,\n"
        f"{tmp_path / 'other' / 'c.png'},1,,\n"
    )
    df = discover(csv)
    rows = {Path(r.path).name: r for r in df.itertuples()}
    assert rows["a.png"].path == str(tmp_path / "images" / "a.png")  # normalised, absolute
    assert (rows["a.png"].label, rows["a.png"].split, rows["a.png"].patient_id) == (0, "train", "P-1")
    assert (rows["person7_virus_3.png"].label, rows["person7_virus_3.png"].split) == (1, "test")
    assert rows["person7_virus_3.png"].patient_id == "person7"
    assert (rows["c.png"].label, rows["c.png"].split, rows["c.png"].class_name) == (1, "all", "PNEUMONIA")


def test_discover_csv_without_split_column(tmp_path: Path) -> None:
    write_png(tmp_path / "a.png", 1)
    (tmp_path / "l.csv").write_text("path,label\na.png,0\n")
    df = discover(tmp_path / "l.csv")
    assert df[["label", "split", "patient_id"]].values.tolist() == [[0, "all", "a.png"]]


@pytest.mark.parametrize(
    ("csv_text", "message"),
    [
        ("path,label\na.png,cat\n", "invalid label on line(s) [2]"),
        ("path,label\na.png,2\n", "invalid label"),
        ("path\na.png\n", "missing column(s) ['label']"),
        ("path,label\nmissing.png,0\n", "do not exist"),
        ("path,label,split\na.png,0,holdout\n", "unknown split value(s) ['holdout']"),
        ("path,label\n", "no images found"),
    ],
)
def test_discover_csv_errors(tmp_path: Path, csv_text: str, message: str) -> None:
    write_png(tmp_path / "a.png", 1)
    (tmp_path / "l.csv").write_text(csv_text)
    with pytest.raises(DatasetError, match=r"l\.csv") as info:
        discover(tmp_path / "l.csv")
    assert message in str(info.value)


def test_discover_rejects_unknown_layout_and_lists_accepted_ones(tmp_path: Path) -> None:
    make_tree(tmp_path / "bad", {"cats/1.png": 1, "dogs/2.png": 2})
    with pytest.raises(DatasetError) as info:
        discover(tmp_path / "bad")
    text = str(info.value)
    assert "not a recognised dataset layout" in text
    assert "['cats', 'dogs']" in text
    assert "ROOT/{train,val,test}/{NORMAL,PNEUMONIA}" in text and "ROOT/{NORMAL,PNEUMONIA}" in text
    assert ".csv" in text


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        ("empty_class_folders", "no images found"),
        ("ambiguous", "ambiguous layout"),
        ("not_csv", "not a dataset"),
        ("missing", "no such file or folder"),
    ],
)
def test_discover_other_errors(tmp_path: Path, setup: str, message: str) -> None:
    source = tmp_path / "src"
    if setup == "empty_class_folders":
        (source / "NORMAL").mkdir(parents=True)
        (source / "PNEUMONIA").mkdir()
    elif setup == "ambiguous":
        make_tree(source, {"NORMAL/a.png": 1, "train/NORMAL/b.png": 2})
    elif setup == "not_csv":
        source = write_png(tmp_path / "x.png", 1)
    with pytest.raises(DatasetError, match=message):
        discover(source)


# --------------------------------------------------------------------------- splitting


def synthetic_frame(n_patients: int = 600, normal_share: float = 0.26, seed: int = 0) -> pd.DataFrame:
    """Patients with 1-3 images each, about ``normal_share`` of them NORMAL; unique hashes."""
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(n_patients):
        label = int(rng.random() >= normal_share)
        for k in range(int(rng.integers(1, 4))):
            rows.append(
                {
                    "path": f"/nowhere/p{p}_{k}.png",
                    "label": label,
                    "class_name": data.CLASS_NAMES[label],
                    "split": "train",
                    "patient_id": f"p{p}",
                    "sha256": f"h{p}_{k}",
                }
            )
    return pd.DataFrame(rows)


def assert_clean_split(df: pd.DataFrame, train: pd.DataFrame, val: pd.DataFrame, fraction: float) -> None:
    assert len(train) + len(val) == len(df)
    assert set(train["path"]).isdisjoint(val["path"])
    assert set(train["patient_id"]).isdisjoint(val["patient_id"])
    assert set(train["sha256"]).isdisjoint(val["sha256"])
    assert abs(len(val) / len(df) - fraction) < 0.02
    assert abs(val["label"].mean() - df["label"].mean()) < 0.02
    assert abs(train["label"].mean() - df["label"].mean()) < 0.02
    assert set(train["split"]) == {"train"} and set(val["split"]) == {"val"}


@pytest.mark.parametrize(("val_fraction", "seed"), [(1 / 6, 42), (1 / 6, 7), (0.2, 0), (0.25, 3)])
def test_patient_split_groups_patients_and_keeps_class_ratio(val_fraction: float, seed: int) -> None:
    df = synthetic_frame()
    assert 0.2 < 1 - df["label"].mean() < 0.32  # imbalanced, like Kermany
    train, val = patient_split(df, val_fraction=val_fraction, seed=seed)
    assert_clean_split(df, train, val, val_fraction)


def test_patient_split_is_reproducible_and_seeded() -> None:
    df = synthetic_frame()
    _, val_a = patient_split(df, val_fraction=1 / 6, seed=1)
    _, val_b = patient_split(df, val_fraction=1 / 6, seed=1)
    _, val_c = patient_split(df, val_fraction=1 / 6, seed=2)
    assert val_a["path"].tolist() == val_b["path"].tolist()
    assert set(val_a["path"]) != set(val_c["path"])


def test_merge_duplicate_groups_chains_patients_sharing_files() -> None:
    df = pd.DataFrame(
        {
            "patient_id": ["c", "b", "b", "a", "d", "e"],
            "sha256": ["h1", "h1", "h2", "h2", "h3", None],
        }
    )
    # c-b share h1, b-a share h2: one group named by its smallest id; d and e stay alone.
    assert merge_duplicate_groups(df).tolist() == ["a", "a", "a", "a", "d", "e"]


def test_patient_split_keeps_duplicates_of_different_patients_together() -> None:
    df = synthetic_frame(n_patients=300, seed=5)
    first_rows = df.groupby("patient_id").head(1).index.to_numpy()
    # 40 pairs of different patients share one byte-identical file each.
    for a, b in zip(first_rows[0:80:2], first_rows[1:80:2], strict=True):
        df.loc[b, "sha256"] = df.loc[a, "sha256"]
    train, val = patient_split(df, val_fraction=1 / 6, seed=42)
    assert set(train["sha256"]).isdisjoint(val["sha256"])
    assert set(train["patient_id"]).isdisjoint(val["patient_id"])
    # Without the merge the same seed does leak duplicates: the test above can fail.
    train_raw, val_raw = patient_split(df, val_fraction=1 / 6, seed=42, hash_col=None)
    assert not set(train_raw["sha256"]).isdisjoint(val_raw["sha256"])


def test_patient_split_hashes_files_when_no_hash_column(tmp_path: Path) -> None:
    rows = []
    for p in range(30):
        path = write_png(tmp_path / f"x{p}.png", p)
        rows.append({"path": str(path), "label": p % 2, "patient_id": f"p{p}"})
    shutil.copy(tmp_path / "x0.png", tmp_path / "copy_of_x0.png")  # a duplicate, another patient
    rows.append({"path": str(tmp_path / "copy_of_x0.png"), "label": 0, "patient_id": "q"})
    df = pd.DataFrame(rows)
    for seed in range(4):
        train, val = patient_split(df, val_fraction=0.5, seed=seed)
        val_ids = set(val["patient_id"])
        assert ("p0" in val_ids) == ("q" in val_ids)
    assert list(train.columns) == ["path", "label", "patient_id", "split"]  # no hash column added


def test_patient_split_rejects_bad_input() -> None:
    df = synthetic_frame(n_patients=3)
    with pytest.raises(DatasetError, match="too few"):
        patient_split(df, val_fraction=0.2, seed=0)
    with pytest.raises(ValueError, match="val_fraction"):
        patient_split(df, val_fraction=0.7, seed=0)
    with pytest.raises(ValueError, match="val_fraction"):
        SplitConfig(val_fraction=0.0)


def test_content_hashes_are_sha256_in_order(tmp_path: Path) -> None:
    paths = []
    for i in range(70):  # over the threading threshold
        paths.append(tmp_path / f"{i}.bin")
        paths[-1].write_bytes(str(i).encode())
    expected = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(70)]
    assert content_hashes(paths, workers=4) == expected
    assert content_hashes(paths[:3], workers=1) == expected[:3]
    # a file that cannot be read has no hash, and the split still forms (train's first step read
    # every file and stopped on one without read permission; a directory stands in for it here)
    (tmp_path / "unreadable.bin").mkdir()
    unreadable = [*paths, tmp_path / "unreadable.bin"]
    assert content_hashes(unreadable, workers=4) == [*expected, None]
    assert content_hashes(unreadable[-2:], workers=1) == [expected[-1], None]
    frame = pd.DataFrame({"path": unreadable[-3:], "patient_id": ["a", "b", "b"]})
    assert list(merge_duplicate_groups(frame)) == ["a", "b", "b"]


def kaggle_frame() -> pd.DataFrame:
    frames = []
    for split, n in (("train", 400), ("val", 16), ("test", 50)):
        part = synthetic_frame(n_patients=n, seed=len(split))
        part["split"] = split
        part["patient_id"] = split + part["patient_id"]
        part["sha256"] = split + part["sha256"]
        part["path"] = "/" + split + part["path"]
        frames.append(part)
    return pd.concat(frames, ignore_index=True)


def test_make_splits_carves_val_from_train_and_never_touches_test() -> None:
    df = kaggle_frame()
    train, val = make_splits(df, SplitConfig())
    pool = df[df["split"].isin(["train", "val"])]
    used = set(train["path"]) | set(val["path"])
    assert used == set(pool["path"])  # official val images join the pool
    assert used.isdisjoint(df.loc[df["split"] == "test", "path"])
    assert_clean_split(pool, train, val, 1 / 6)


def test_make_splits_uses_official_val_when_asked() -> None:
    df = kaggle_frame()
    train, val = make_splits(df, SplitConfig(use_official_val=True))
    assert sorted(val["path"]) == sorted(df.loc[df["split"] == "val", "path"])
    assert sorted(train["path"]) == sorted(df.loc[df["split"] == "train", "path"])


def test_make_splits_on_class_folder_data_and_without_train() -> None:
    df = synthetic_frame().assign(split="all")
    train, val = make_splits(df, SplitConfig(val_fraction=0.2))
    assert_clean_split(df, train, val, 0.2)
    with pytest.raises(DatasetError, match="no train images"):
        make_splits(df.assign(split="test"), SplitConfig())


# --------------------------------------------------------------------------- real data


@pytest.fixture(scope="module")
def kermany224_frame() -> pd.DataFrame:
    if not (KERMANY224 / "train").is_dir():
        pytest.skip(f"{KERMANY224} not available")
    df = discover(KERMANY224)
    df["sha256"] = content_hashes(df["path"])
    return df


def test_real_kermany224_listing(kermany224_frame: pd.DataFrame) -> None:
    df = kermany224_frame
    assert len(df) == 5216
    assert df.groupby("class_name").size().to_dict() == {"NORMAL": 1341, "PNEUMONIA": 3875}
    assert set(df["split"]) == {"train"}
    # Measured with sha256sum: 22 pairs and 2 triples of byte-identical files.
    duplicate_sizes = df.groupby("sha256").size()
    assert sorted(duplicate_sizes[duplicate_sizes > 1].tolist()) == [2] * 22 + [3] * 2
    ids = set(df["patient_id"])
    assert {"IM-0383", "NORMAL2-IM-0383", "IM-0505", "person447"} <= ids
    assert not any("/" in pid for pid in ids)  # every name parsed as a Kermany id


def test_real_kermany224_split_is_leak_free(kermany224_frame: pd.DataFrame) -> None:
    df = kermany224_frame
    train, val = make_splits(df, SplitConfig())
    assert_clean_split(df, train, val, 1 / 6)
    # Same seed, same split: a rerun (or a resumed run) validates on the same patients.
    _, again_val = make_splits(df, SplitConfig())
    assert sorted(again_val["path"]) == sorted(val["path"])


def test_real_fullres_official_val() -> None:
    if not (FULLRES / "val").is_dir():
        pytest.skip(f"{FULLRES} not available")
    df = discover(FULLRES)
    assert df.groupby("split").size().to_dict() == {"train": 24, "val": 16}
    pid = df.loc[df["path"].str.contains("person1946_bacteria"), "patient_id"]
    assert pid.tolist() == ["person1946", "person1946"]
    train, val = make_splits(df, SplitConfig(use_official_val=True))
    assert (len(train), len(val)) == (24, 16)


# --------------------------------------------------------------------------- inspection


@pytest.fixture
def messy_tree(tmp_path: Path) -> Path:
    root = tmp_path / "messy"
    write_png(root / "train/NORMAL/IM-0001-0001.png", 10, size=(20, 30))
    shutil.copy(root / "train/NORMAL/IM-0001-0001.png", tmp_path / "dup.png")
    shutil.move(tmp_path / "dup.png", root / "train/NORMAL/IM-0002-0001.png")
    write_png(root / "train/PNEUMONIA/person5_bacteria_1.png", 20, size=(40, 10))
    write_png(root / "val/PNEUMONIA/person5_bacteria_2.png", 30, size=(50, 60))
    write_png(root / "test/NORMAL/NORMAL2-IM-0001-0001.png", 40, size=(10, 20))
    (root / "train/PNEUMONIA/broken.png").write_bytes(b"this is not a png at all")
    return root


@pytest.mark.parametrize("workers", [1, 2])
def test_inspect_reports_every_finding(messy_tree: Path, workers: int) -> None:
    report = inspect_dataset(messy_tree, workers=workers)
    assert report.n_images == 6
    assert report.layout == "split folders"
    assert report.counts.to_dict(orient="index") == {
        "train": {"NORMAL": 2, "PNEUMONIA": 2, "total": 4},
        "val": {"NORMAL": 0, "PNEUMONIA": 1, "total": 1},
        "test": {"NORMAL": 1, "PNEUMONIA": 0, "total": 1},
    }
    assert report.duplicates == [
        [
            str(messy_tree / "train/NORMAL/IM-0001-0001.png"),
            str(messy_tree / "train/NORMAL/IM-0002-0001.png"),
        ]
    ]
    assert [p for p, _ in report.unreadable] == [str(messy_tree / "train/PNEUMONIA/broken.png")]
    assert report.unreadable[0][1]  # a reason is given
    # Readable images are 30x20 (twice), 10x40, 60x50, 20x10 (width x height).
    assert report.sizes.loc["width"].tolist() == [10, 30, 60]
    assert report.sizes.loc["height"].tolist() == [10, 20, 50]
    assert report.cross_split_patients == {"person5": ["train", "val"]}

    text = format_report(report)
    for needle in (
        "Exact duplicates (same bytes): 1 group(s), 2 files",
        "train/NORMAL/IM-0001-0001.png  ==  train/NORMAL/IM-0002-0001.png",
        "Unreadable files: 1",
        "train/PNEUMONIA/broken.png: ",
        "Patients in more than one split: 1",
        "person5: train, val",
        "5 readable images",
    ):
        assert needle in text
    assert report.to_dict()["counts"]["train"]["total"] == 4


def test_format_report_cuts_long_lists(tmp_path: Path) -> None:
    root = tmp_path / "many"
    for i in range(5):
        write_png(root / f"NORMAL/a{i}.png", i)
        shutil.copy(root / f"NORMAL/a{i}.png", root / f"NORMAL/b{i}.png")
    report = inspect_dataset(root, workers=1)
    assert len(report.duplicates) == 5
    assert report.layout == "class folders"
    text = format_report(report, max_items=2)
    assert "... and 3 more" in text
    assert "NORMAL/a4.png" not in text


# --------------------------------------------------------------------------- acquisition groups


def _acquisition(kind: str, seed: int, size: int = 64) -> np.ndarray:
    """One image of two clearly different acquisitions: "soft" (dark, blurred, no noise) or
    "sharp" (bright, noisy); both carry the same kind of smooth anatomy-like structure."""
    rng = np.random.default_rng(seed)
    structure = cv2.resize(rng.uniform(0, 60, (8, 8)).astype(np.float32), (size, size))
    if kind == "soft":
        image = cv2.GaussianBlur(50 + structure, (0, 0), 2.0)
    else:
        image = 150 + structure + rng.normal(0, 12, (size, size))
    return np.clip(image, 0, 255).astype(np.uint8)


def _acquisition_frame(folder: Path, kinds: list[tuple[str, str]]) -> pd.DataFrame:
    """(patient, kind) per image -> a frame with path and patient_id, PNG files written."""
    rows = []
    folder.mkdir(parents=True, exist_ok=True)
    for i, (patient, kind) in enumerate(kinds):
        path = folder / f"{patient}_{i}.png"
        assert cv2.imwrite(str(path), _acquisition(kind, seed=i))
        rows.append({"path": str(path), "patient_id": patient, "kind": kind})
    return pd.DataFrame(rows)


def test_image_statistics_known_answers() -> None:
    flat = data.image_statistics_of(np.full((64, 64), 100, np.uint8), file_bytes=4096)
    assert (flat["mean"], flat["median"], flat["std"], flat["iqr"]) == (100, 100, 0, 0)
    assert flat["noise"] == flat["log_sharpness"] == flat["grad_ratio"] == flat["dark_fraction"] == 0
    assert flat["bytes_per_pixel"] == 1.0 and flat["log_aspect"] == 0
    assert np.isnan(data.image_statistics_of(np.zeros((4, 4), np.uint8))["bytes_per_pixel"])
    assert data.image_statistics_of(np.full((32, 64), 9, np.uint8))["log_aspect"] == pytest.approx(np.log(2))
    half = np.zeros((64, 64), np.uint8)
    half[:, 32:] = 200
    assert data.image_statistics_of(half)["dark_fraction"] == 0.5
    # Immerkær's estimate finds the standard deviation of white noise
    noise = np.clip(128 + np.random.default_rng(0).normal(0, 10, (256, 256)), 0, 255).astype(np.uint8)
    assert data.image_statistics_of(noise)["noise"] == pytest.approx(10, rel=0.1)
    # stretching along x weakens horizontal gradients (grad_ratio < 0), along y vertical ones
    texture = cv2.GaussianBlur(noise, (0, 0), 1.0)
    wide = cv2.resize(texture[:, :128], (256, 256), interpolation=cv2.INTER_LINEAR)
    assert (
        data.image_statistics_of(wide)["grad_ratio"] < -1 < 1 < data.image_statistics_of(wide.T)["grad_ratio"]
    )
    assert abs(data.image_statistics_of(texture)["grad_ratio"]) < 0.1


def test_two_acquisitions_become_two_groups(tmp_path: Path) -> None:
    kinds = [(f"p{i}", "soft" if i % 2 else "sharp") for i in range(12)]
    df = _acquisition_frame(tmp_path, kinds)
    groups = data.acquisition_groups(df, k=2, seed=0, workers=1)
    assert groups.dtype == "int64" and set(groups) == {0, 1}
    assert pd.crosstab(groups, df["kind"]).to_numpy().max(axis=1).tolist() == [6, 6]  # one kind each
    stats = data.image_statistics(df["path"], workers=1)
    described = data.describe_groups(stats, groups).set_index(
        pd.Index([df["kind"][groups == g].iloc[0] for g in (0, 1)])
    )
    assert described.loc["sharp", "mean"] > described.loc["soft", "mean"] + 50
    assert described.loc["sharp", "noise"] > 5 > described.loc["soft", "noise"]
    assert described["n"].tolist() == [6, 6]


def test_a_patient_keeps_one_group(tmp_path: Path) -> None:
    # patient "mixed" has two soft images and one sharp one: all three go with the soft images
    kinds = [(f"s{i}", "soft") for i in range(5)] + [(f"b{i}", "sharp") for i in range(5)]
    kinds += [("mixed", "soft"), ("mixed", "soft"), ("mixed", "sharp")]
    df = _acquisition_frame(tmp_path, kinds)
    groups = data.acquisition_groups(df, k=2, seed=0, workers=1)
    soft_group = groups[df["kind"] == "soft"].iloc[0]
    assert (groups[df["patient_id"] == "mixed"] == soft_group).all()
    assert (groups[df["patient_id"].str.startswith("b")] != soft_group).all()
    # without the patient step the sharp image of "mixed" would have gone with the other sharp ones
    by_image = data.acquisition_groups(df, k=2, seed=0, workers=1, group_col=None)
    assert by_image.iloc[-1] == by_image[df["patient_id"] == "b0"].iloc[0]


def test_image_statistics_are_cached_and_recomputed_when_a_file_changes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    df = _acquisition_frame(tmp_path / "img", [("a", "soft"), ("b", "sharp"), ("c", "soft")])
    (tmp_path / "img" / "notes.png").write_text("not an image")
    paths = [*df["path"], str(tmp_path / "img" / "notes.png")]
    calls: list[str] = []
    real = data._statistics_of_file
    monkeypatch.setattr(data, "_statistics_of_file", lambda p: calls.append(p) or real(p))
    first = data.image_statistics(paths, workers=1, cache_dir=tmp_path / "cache")
    assert len(calls) == 4 and first.iloc[3].isna().all() and first.iloc[:3].notna().all().all()
    calls.clear()
    again = data.image_statistics(paths[:3], workers=1, cache_dir=tmp_path / "cache")
    assert calls == [] and np.allclose(again.to_numpy(), first.iloc[:3].to_numpy())
    cv2.imwrite(paths[1], _acquisition("soft", seed=99))  # new content, new size and time
    changed = data.image_statistics(paths[:3], workers=1, cache_dir=tmp_path / "cache")
    assert calls == [paths[1]] and changed.loc[1, "mean"] < first.loc[1, "mean"] - 50


def test_farthest_group_prefers_a_distinct_group_worth_holding_out() -> None:
    rng = np.random.default_rng(0)
    centres = {0: 0.0, 1: 0.5, 2: 5.0}  # group 2 lies far from the others
    rows = [
        {name: centres[g] + rng.normal(0, 0.1) for name in data.STAT_NAMES}
        for g in centres
        for _ in range(40)
    ]
    stats, groups = pd.DataFrame(rows), pd.Series(np.repeat([0, 1, 2], 40))
    assert data.farthest_group(stats, groups) == 2
    labels = np.tile([0, 1], 60)
    assert data.farthest_group(stats, groups, labels, min_per_class=10) == 2
    labels[80:] = 1  # group 2 now holds one class only: not worth holding out
    assert data.farthest_group(stats, groups, labels, min_per_class=10) in (0, 1)
    with pytest.raises(ValueError, match="no group can be held out"):
        data.farthest_group(stats, groups, labels, min_per_class=100)


@pytest.mark.parametrize(
    ("filename", "family"),
    [
        ("IM-0115-0001.jpeg", "IM"),
        ("NORMAL2-IM-0115-0001.jpeg", "NORMAL2-IM"),
        ("person1946_bacteria_4875.jpeg", "person_bacteria"),
        ("person44_virus_94.jpeg", "person_virus"),
        ("scan.dcm", "other"),
    ],
)
def test_filename_family(filename: str, family: str) -> None:
    assert data.filename_family(f"/data/train/X/{filename}") == family
