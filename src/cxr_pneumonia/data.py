"""Dataset layer: find the images and labels, parse patient ids, make leak-free splits, inspect.

Three sources are accepted:

* the Kaggle layout ``ROOT/{train,val,test}/{NORMAL,PNEUMONIA}/...`` (any subset of the splits);
* a class-folder root ``ROOT/{NORMAL,PNEUMONIA}/...`` (split ``"all"``);
* a CSV file with columns ``path,label`` (label 0/1 or the class name), optionally ``split``
  and ``patient_id``; relative paths are resolved against the CSV's folder.

Validation is carved from the training images per patient (the official Kermany ``val``
folder holds only 16 images), with byte-identical files forced onto the same side.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from pydantic import Field
from tqdm import tqdm

from cxr_pneumonia import io
from cxr_pneumonia.config import StageConfig, atomic_write_bytes, file_sha256, file_sha256_or_none
from cxr_pneumonia.header import rejection_reason

log = logging.getLogger(__name__)

CLASS_NAMES: tuple[str, ...] = ("NORMAL", "PNEUMONIA")
SPLITS: tuple[str, ...] = ("train", "val", "test")
ALL_SPLIT = "all"
COLUMNS: tuple[str, ...] = ("path", "label", "class_name", "split", "patient_id")

ACCEPTED_LAYOUTS = (
    "ROOT/{train,val,test}/{NORMAL,PNEUMONIA}/<images> (Kaggle layout; any subset of splits), "
    "ROOT/{NORMAL,PNEUMONIA}/<images> (class folders), "
    "or a .csv file with columns path,label[,split,patient_id]"
)

# Kermany file names. NORMAL images come from two sources ("IM-0115-0001" and
# "NORMAL2-IM-0115-0001") whose numbers overlap, so the source prefix stays in the id.
_KERMANY_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"^person(\d+)_(?:bacteria|virus)_\d+", re.IGNORECASE), "person{0}"),
    (re.compile(r"^normal(\d+)-im-(\d+)-\d+", re.IGNORECASE), "NORMAL{0}-IM-{1}"),
    (re.compile(r"^im-(\d+)-\d+", re.IGNORECASE), "IM-{0}"),
)
# The ids those templates make (anything else is a path, meaningful only inside one dataset).
_KERMANY_ID = re.compile(r"^(?:person\d+|NORMAL\d+-IM-\d+|IM-\d+)$")
# The one of them that DICOM viewers also give their exports (IM-<series>-<image>).
_VIEWER_EXPORT_ID = re.compile(r"^IM-\d+$")


class DatasetError(ValueError):
    """The source is not a recognised dataset, holds no images, or its labels are invalid."""


class SplitConfig(StageConfig):
    """How validation is made from the training images."""

    val_fraction: float = Field(1 / 6, gt=0, le=0.5, description="Share of patients held out for validation.")
    seed: int = Field(42, description="Seed of the patient-grouped split.")
    # The official Kermany val folder has 16 images: too few to choose a threshold on.
    use_official_val: bool = Field(
        False, description="Validate on the dataset's own val split instead of held-out patients."
    )


# --------------------------------------------------------------------------- patient ids


def _match_patient_id(filename: str) -> str | None:
    name = Path(filename).name
    for pattern, template in _KERMANY_PATTERNS:
        match = pattern.match(name)
        if match:
            return template.format(*match.groups())
    return None


def parse_patient_id(filename: str) -> str:
    """The patient id encoded in a Kermany file name; an unknown name is its own patient.

    ``person1946_bacteria_4875.jpeg`` -> ``person1946``, ``IM-0505-0001-0001.jpeg`` ->
    ``IM-0505``, ``NORMAL2-IM-0115-0001.jpeg`` -> ``NORMAL2-IM-0115``; any other name is
    returned unchanged (only its folders are dropped).
    """
    return _match_patient_id(filename) or Path(filename).name


# Kermany et al. 2018 (Cell 172:1122-1131): "pediatric patients of one to five years old" from
# Guangzhou Women and Children's Medical Center; the train split's file names carry their ids.
KERMANY_AGE_YEARS = (1.0, 5.0)


def training_population(paths: Iterable[str | Path], patient_ids: Iterable[str]) -> dict[str, Any] | None:
    """What is known of the patients a run learned from: the ages of Kermany's cohort when every
    training and validation file is a JPEG with a Kermany name; None otherwise (nothing is assumed
    about other data). ``predict`` marks a DICOM whose declared Patient's Age lies outside the
    range. JPEG only: viewers export DICOM series as ``IM-0001-0001.dcm``, a Kermany-like name."""
    ids, paths = list(patient_ids), list(paths)
    if not ids or not all(is_kermany_patient_id(str(pid)) for pid in ids):
        return None
    if not all(Path(p).suffix.lower() in (".jpeg", ".jpg") for p in paths):
        return None
    return {
        "age_years": list(KERMANY_AGE_YEARS),
        "basis": "every training file is named as in Kermany et al. 2018, whose patients were 1-5 years old",
    }


def is_kermany_patient_id(patient_id: str) -> bool:
    """Whether ``patient_id`` names a Kermany patient (as :func:`parse_patient_id` makes them),
    so that it means the same patient in any copy of the dataset."""
    return _KERMANY_ID.match(patient_id) is not None


def _patient_id_for(path: Path, base: Path, class_folder: Path | None = None) -> str:
    """Kermany id, or for an unknown name the path below ``base``, so that same-named files
    in different folders (``train/NORMAL/1.png``, ``test/NORMAL/1.png``) stay distinct.

    ``class_folder``: the folder the file was found under. Kermany's files lie in it directly;
    deeper, an ``IM-0001-0001...`` name is a viewer's export (each study in a folder of its own),
    so the folder below ``base`` is kept in the id: different studies stay different patients.
    ``personN`` and ``NORMAL2-IM-N`` stay global: ``PNEUMONIA/{bacteria,virus}/`` sub-folders
    hold the same Kermany patients (808 of them have images of both kinds).
    """
    known = _match_patient_id(path.name)
    exported = known is not None and _VIEWER_EXPORT_ID.match(known) is not None
    if exported and class_folder is not None and path.parent != class_folder:
        return f"{path.parent.relative_to(base).as_posix()}/{known}"
    if known is not None:
        return known
    try:
        return path.relative_to(base).as_posix()
    except ValueError:
        return path.as_posix()


# --------------------------------------------------------------------------- discovery


def discover(source: Path) -> pd.DataFrame:
    """List every image of a dataset with its label, split and patient id.

    Returns columns ``path`` (absolute), ``label`` (0 = NORMAL, 1 = PNEUMONIA),
    ``class_name``, ``split`` (``train``/``val``/``test``, or ``all`` when the source has no
    splits) and ``patient_id``, sorted by split, label and path. Raises :class:`DatasetError`
    when the layout is not recognised or no images are found.
    """
    source = Path(os.path.abspath(Path(source).expanduser()))
    if source.is_file():
        if source.suffix.lower() != ".csv":
            raise DatasetError(f"{source}: not a dataset; accepted: {ACCEPTED_LAYOUTS}")
        df = _discover_csv(source)
    elif source.is_dir():
        df = _discover_tree(source)
    else:
        raise DatasetError(f"{source}: no such file or folder")
    if df.empty:
        raise DatasetError(f"{source}: no images found; accepted: {ACCEPTED_LAYOUTS}")
    df = _sorted(df)
    log.info("found %d images in %s: %s", len(df), source, _count_line(df))
    return df


def _class_dirs(folder: Path) -> list[tuple[int, Path]]:
    """(label, folder) for each child folder named like a class, ignoring case."""
    lookup = {name.lower(): label for label, name in enumerate(CLASS_NAMES)}
    return [
        (lookup[child.name.lower()], child)
        for child in sorted(folder.iterdir())
        if child.is_dir() and child.name.lower() in lookup
    ]


def _split_dirs(root: Path) -> list[tuple[str, Path]]:
    return [
        (child.name.lower(), child)
        for child in sorted(root.iterdir())
        if child.is_dir() and child.name.lower() in SPLITS
    ]


def _discover_tree(root: Path) -> pd.DataFrame:
    split_dirs = [(split, folder) for split, folder in _split_dirs(root) if _class_dirs(folder)]
    root_classes = _class_dirs(root)
    if split_dirs and root_classes:
        raise DatasetError(
            f"{root}: ambiguous layout, it holds both split folders "
            f"({', '.join(f.name for _, f in split_dirs)}) and class folders "
            f"({', '.join(f.name for _, f in root_classes)}); accepted: {ACCEPTED_LAYOUTS}"
        )
    if split_dirs:
        sources = [
            (split, label, folder)
            for split, split_folder in split_dirs
            for label, folder in _class_dirs(split_folder)
        ]
    elif root_classes:
        sources = [(ALL_SPLIT, label, folder) for label, folder in root_classes]
    else:
        children = sorted(c.name for c in root.iterdir() if c.is_dir())
        raise DatasetError(
            f"{root}: not a recognised dataset layout (sub-folders: {children or 'none'}); "
            f"accepted: {ACCEPTED_LAYOUTS}"
        )
    _warn_missing_classes(root, sources)
    rows = [
        _row(path, label, split, _patient_id_for(path, root, folder))
        for split, label, folder in sources
        for path in io.list_image_files(folder)
    ]
    return pd.DataFrame(rows, columns=list(COLUMNS))


def _warn_missing_classes(root: Path, sources: Sequence[tuple[str, int, Path]]) -> None:
    for split in dict.fromkeys(split for split, _, _ in sources):
        present = {label for s, label, _ in sources if s == split}
        missing = [name for label, name in enumerate(CLASS_NAMES) if label not in present]
        if missing:
            log.warning("%s: split %r has no %s folder", root, split, "/".join(missing))


def _row(path: Path, label: int, split: str, patient_id: str) -> dict[str, Any]:
    return {
        "path": str(path),
        "label": label,
        "class_name": CLASS_NAMES[label],
        "split": split,
        "patient_id": patient_id,
    }


def _discover_csv(csv_path: Path) -> pd.DataFrame:
    try:
        table = pd.read_csv(csv_path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{csv_path}: cannot read CSV ({exc})") from exc
    table.columns = [str(c).strip().lower() for c in table.columns]
    missing = [c for c in ("path", "label") if c not in table.columns]
    if missing:
        raise DatasetError(
            f"{csv_path}: missing column(s) {missing}; found {list(table.columns)}; "
            "expected path,label[,split,patient_id]"
        )
    base = csv_path.parent
    labels = [_parse_label(v) for v in table["label"]]
    bad = [i + 2 for i, label in enumerate(labels) if label is None]  # +2: header, 1-based
    if bad:
        raise DatasetError(
            f"{csv_path}: invalid label on line(s) {bad[:10]}{' ...' if len(bad) > 10 else ''}; "
            f"labels must be 0/1 or one of {list(CLASS_NAMES)} (any case)"
        )
    splits = _csv_splits(csv_path, table)
    paths = [Path(os.path.abspath(base / p.strip())) for p in table["path"]]
    absent = [str(p) for p in paths if not p.is_file()]
    if absent:
        raise DatasetError(f"{csv_path}: {len(absent)} listed file(s) do not exist, e.g. {absent[:3]}")
    given_ids = table["patient_id"] if "patient_id" in table.columns else [""] * len(table)
    rows = [
        _row(path, label, split, pid.strip() or _patient_id_for(path, base))
        for path, label, split, pid in zip(paths, labels, splits, given_ids, strict=True)
    ]
    return pd.DataFrame(rows, columns=list(COLUMNS))


def _parse_label(value: str) -> int | None:
    text = str(value).strip()
    if text in ("0", "1"):
        return int(text)
    upper = text.upper()
    return CLASS_NAMES.index(upper) if upper in CLASS_NAMES else None


def _csv_splits(csv_path: Path, table: pd.DataFrame) -> list[str]:
    if "split" not in table.columns:
        return [ALL_SPLIT] * len(table)
    splits = [s.strip().lower() or ALL_SPLIT for s in table["split"]]
    valid = (*SPLITS, ALL_SPLIT)
    bad = sorted({s for s in splits if s not in valid})
    if bad:
        raise DatasetError(f"{csv_path}: unknown split value(s) {bad}; valid: {list(valid)}")
    return splits


def _sorted(df: pd.DataFrame) -> pd.DataFrame:
    order = {name: i for i, name in enumerate((*SPLITS, ALL_SPLIT))}
    df = df.astype({"label": "int64"})
    return df.sort_values(
        ["split", "label", "path"], key=lambda c: c.map(order) if c.name == "split" else c
    ).reset_index(drop=True)


def _count_line(df: pd.DataFrame) -> str:
    counts = df.groupby(["split", "class_name"]).size()
    return ", ".join(f"{split}/{name}={n}" for (split, name), n in counts.items())


# --------------------------------------------------------------------------- duplicates


def content_hashes(paths: Iterable[str | Path], *, workers: int | None = None) -> list[str | None]:
    """SHA-256 of each file's bytes, in input order; None for a file that cannot be read (it
    links nothing here, and fails with its reason where it is read for its image).

    Threads, not processes: reading and hashing release the GIL.
    """
    paths = [Path(p) for p in paths]
    workers = workers or min(8, (os.cpu_count() or 1) + 2)
    if workers <= 1 or len(paths) < 64:
        return [file_sha256_or_none(p) for p in paths]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(file_sha256_or_none, paths))


class _UnionFind:
    def __init__(self) -> None:
        self.parent: dict[Any, Any] = {}

    def find(self, node: Any) -> Any:
        self.parent.setdefault(node, node)
        while self.parent[node] != node:
            self.parent[node] = self.parent[self.parent[node]]  # path halving
            node = self.parent[node]
        return node

    def union(self, a: Any, b: Any) -> None:
        self.parent[self.find(a)] = self.find(b)


def merge_duplicate_groups(
    df: pd.DataFrame,
    *,
    group_col: str = "patient_id",
    hash_col: str = "sha256",
    workers: int | None = None,
) -> pd.Series:
    """A split-group per row: patients that share byte-identical files become one group.

    Union-find over patient id <-> content hash, so a duplicate chain (A and B share a file,
    B and C share another) is one group. Each group is named by its smallest patient id.
    Hashes come from ``hash_col`` when present (missing values link nothing), otherwise
    they are computed from ``path``.
    """
    has_hashes = hash_col in df.columns
    hashes = df[hash_col].tolist() if has_hashes else content_hashes(df["path"], workers=workers)
    patients = df[group_col].astype(str).tolist()
    uf = _UnionFind()
    for patient, digest in zip(patients, hashes, strict=True):
        uf.find(("p", patient))
        if isinstance(digest, str) and digest:
            uf.union(("h", digest), ("p", patient))
    # Name each component by its smallest patient id so the result does not depend on order.
    names: dict[Any, str] = {}
    for patient in patients:
        root = uf.find(("p", patient))
        names[root] = min(names.get(root, patient), patient)
    return pd.Series([names[uf.find(("p", p))] for p in patients], index=df.index, name="group", dtype=object)


# --------------------------------------------------------------------------- splitting


def _check_val_fraction(val_fraction: float) -> None:
    if not 0 < val_fraction <= 0.5:
        raise ValueError(f"val_fraction must be in (0, 0.5], got {val_fraction}")


def patient_split(
    df: pd.DataFrame,
    *,
    val_fraction: float,
    seed: int,
    group_col: str = "patient_id",
    hash_col: str | None = "sha256",
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Split into (train, val), stratified by ``label`` and grouped by patient.

    Uses ``StratifiedGroupKFold(n_splits=round(1 / val_fraction))`` and keeps the fold whose
    class ratio and size are closest to the whole, so the effective fraction is
    ``1 / n_splits`` (1/6 -> 16.7 %, 0.2 -> 20 %). Patients sharing byte-identical files are
    merged first (see :func:`merge_duplicate_groups`; hashes are read from ``hash_col`` or
    computed from ``path``; ``hash_col=None`` skips the merge). The returned frames keep the
    input columns, with ``split`` set to ``"train"`` / ``"val"``.
    """
    from sklearn.model_selection import StratifiedGroupKFold  # heavy import, only needed here

    _check_val_fraction(val_fraction)
    if df.empty:
        raise DatasetError("cannot split an empty dataset")
    if hash_col is None:
        groups = df[group_col].astype(str)
    else:
        groups = merge_duplicate_groups(df, group_col=group_col, hash_col=hash_col)
    n_splits = round(1 / val_fraction)
    n_groups = groups.nunique()
    if n_groups < n_splits:
        raise DatasetError(
            f"only {n_groups} patient group(s): too few for a {1 / n_splits:.0%} validation split"
        )
    labels = df["label"].to_numpy()
    splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    folds = [val for _, val in splitter.split(np.zeros(len(df)), labels, groups.to_numpy())]
    val_idx = min(folds, key=lambda idx: _fold_error(labels, idx, 1 / n_splits))
    is_val = np.zeros(len(df), dtype=bool)
    is_val[val_idx] = True
    train_df = df.loc[~is_val].assign(split="train").reset_index(drop=True)
    val_df = df.loc[is_val].assign(split="val").reset_index(drop=True)
    log.info(
        "patient split (seed %d): train %d images, val %d images (%.1f %%), %d groups",
        seed,
        len(train_df),
        len(val_df),
        100 * len(val_df) / len(df),
        n_groups,
    )
    return train_df, val_df


def _fold_error(labels: np.ndarray, idx: np.ndarray, fraction: float) -> float:
    """Worst of the class-ratio error and the size error of a candidate validation fold."""
    ratio_error = abs(labels[idx].mean() - labels.mean())
    size_error = abs(len(idx) / len(labels) - fraction)
    return max(ratio_error, size_error)


def make_splits(df: pd.DataFrame, cfg: SplitConfig) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(train, val) for training from a :func:`discover` frame; the test split is never used.

    With ``cfg.use_official_val`` and a non-empty ``val`` split, the official split is used
    as-is. Otherwise validation is carved per patient from ``train`` plus the official
    ``val`` images (too few to validate on, but still labelled data), or from ``all`` for a
    source without splits.
    """
    splits = set(df["split"])
    official_val = df[df["split"] == "val"]
    if cfg.use_official_val:
        if "train" in splits and not official_val.empty:
            train_df = df[df["split"] == "train"].reset_index(drop=True)
            _warn_shared_patients(train_df, official_val)
            return train_df, official_val.reset_index(drop=True)
        log.warning("use_official_val is set but there is no official val split: carving one")
    if "train" in splits:
        pool = df[df["split"].isin(["train", "val"])]
    elif ALL_SPLIT in splits:
        pool = df[df["split"] == ALL_SPLIT]
    else:
        raise DatasetError(f"no train images to split (splits present: {sorted(splits)})")
    return patient_split(pool.reset_index(drop=True), val_fraction=cfg.val_fraction, seed=cfg.seed)


def _warn_shared_patients(train_df: pd.DataFrame, val_df: pd.DataFrame) -> None:
    shared = set(train_df["patient_id"]) & set(val_df["patient_id"])
    if shared:
        log.warning(
            "%d patient(s) appear in both official train and val, e.g. %s",
            len(shared),
            sorted(shared)[:5],
        )


# --------------------------------------------------------------------------- inspection


@dataclass(frozen=True)
class InspectReport:
    """What ``cxr-pneumonia inspect`` found in a dataset.

    ``counts``: images per split (rows) and class (columns, plus ``total``).
    ``duplicates``: groups of byte-identical files (absolute paths), largest first.
    ``unreadable``: (path, reason) for files :func:`io.load_image` rejects.
    ``sizes``: min/median/max (columns) of ``width`` and ``height`` (rows) of readable images.
    ``cross_split_patients``: patient id -> the splits it appears in, when more than one.
    ``declared_not_frontal``: (path, reason) for readable DICOM files whose header declares
    something other than a frontal chest radiograph (:func:`header.rejection_reason`); ``train``
    and ``preprocess`` leave them out, ``predict`` rejects them.
    """

    source: Path
    layout: str
    n_images: int
    counts: pd.DataFrame
    duplicates: list[list[str]] = field(default_factory=list)
    unreadable: list[tuple[str, str]] = field(default_factory=list)
    sizes: pd.DataFrame = field(default_factory=pd.DataFrame)
    cross_split_patients: dict[str, list[str]] = field(default_factory=dict)
    declared_not_frontal: list[tuple[str, str]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (for ``inspect --json`` style output)."""
        return {
            "source": str(self.source),
            "layout": self.layout,
            "n_images": self.n_images,
            "counts": {split: {k: int(v) for k, v in row.items()} for split, row in self.counts.iterrows()},
            "duplicates": self.duplicates,
            "unreadable": [list(item) for item in self.unreadable],
            "sizes": {
                dim: {k: (None if pd.isna(v) else float(v)) for k, v in row.items()}
                for dim, row in self.sizes.iterrows()
            },
            "cross_split_patients": self.cross_split_patients,
            "declared_not_frontal": [list(item) for item in self.declared_not_frontal],
        }


@dataclass(frozen=True)
class _Probe:
    path: str
    sha256: str | None
    height: int | None
    width: int | None
    error: str | None
    declared: str | None = None


def _probe(path: str) -> _Probe:
    """Hash and fully decode one file (a worker function, so it must be module level)."""
    try:
        digest = file_sha256(Path(path))
        image, dicom_header = io.load_image_and_header(Path(path))
    except io.ImageReadError as exc:
        return _Probe(path, None, None, None, getattr(exc, "reason", None) or str(exc))
    except OSError as exc:  # permissions, a file removed mid-run: still a finding, not a crash
        return _Probe(path, None, None, None, f"{type(exc).__name__}: {exc.strerror or exc}")
    declared = rejection_reason(dicom_header)
    return _Probe(path, digest, int(image.shape[0]), int(image.shape[1]), None, declared)


def _probe_all(paths: list[str], workers: int) -> Iterator[_Probe]:
    if workers <= 1:
        yield from map(_probe, paths)
        return
    # spawn, not fork: the parent may hold threads (TensorFlow, tqdm) that fork would copy locked.
    context = multiprocessing.get_context("spawn")
    chunksize = max(1, len(paths) // (workers * 8))
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        yield from pool.map(_probe, paths, chunksize=chunksize)


def inspect_dataset(source: Path, *, workers: int | None = None) -> InspectReport:
    """Count, hash and decode every image of ``source`` and report what looks wrong.

    ``workers`` > 1 decodes in a process pool (default: the CPU count); 1 decodes in-process.
    """
    df = discover(source)
    workers = workers if workers is not None else (os.cpu_count() or 1)
    paths = df["path"].tolist()
    probes = list(
        tqdm(_probe_all(paths, workers), total=len(paths), desc="inspect", unit="img", disable=None)
    )
    readable = [p for p in probes if p.error is None]
    unreadable = [(p.path, p.error or "") for p in probes if p.error is not None]
    for path, reason in unreadable:
        log.warning("unreadable: %s: %s", path, reason)
    return InspectReport(
        source=Path(os.path.abspath(Path(source).expanduser())),
        layout=_layout_name(Path(source), df),
        n_images=len(df),
        counts=class_counts(df),
        duplicates=_duplicate_groups(readable),
        unreadable=unreadable,
        sizes=_size_stats(readable),
        cross_split_patients=cross_split_patients(df),
        declared_not_frontal=[(p.path, p.declared) for p in readable if p.declared is not None],
    )


def _layout_name(source: Path, df: pd.DataFrame) -> str:
    if source.is_file():
        return "csv"
    return "class folders" if set(df["split"]) == {ALL_SPLIT} else "split folders"


def class_counts(df: pd.DataFrame) -> pd.DataFrame:
    """Images per split (rows, in train/val/test/all order) and class (columns, plus total)."""
    counts = pd.crosstab(df["split"], df["class_name"])
    counts = counts.reindex(columns=list(CLASS_NAMES), fill_value=0)
    order = [s for s in (*SPLITS, ALL_SPLIT) if s in counts.index]
    counts = counts.reindex(order)
    counts["total"] = counts.sum(axis=1)
    counts.index.name, counts.columns.name = "split", None
    return counts.astype("int64")


def cross_split_patients(df: pd.DataFrame) -> dict[str, list[str]]:
    """Patient id -> splits, for patients found in more than one split (a leak)."""
    order = {name: i for i, name in enumerate((*SPLITS, ALL_SPLIT))}
    splits = df.groupby("patient_id")["split"].agg(lambda s: sorted(set(s), key=order.get))
    return {pid: list(s) for pid, s in splits.items() if len(s) > 1}


def _duplicate_groups(probes: Sequence[_Probe]) -> list[list[str]]:
    by_hash: dict[str, list[str]] = {}
    for probe in probes:
        by_hash.setdefault(probe.sha256 or "", []).append(probe.path)
    groups = [sorted(paths) for paths in by_hash.values() if len(paths) > 1]
    return sorted(groups, key=lambda g: (-len(g), g[0]))


def _size_stats(probes: Sequence[_Probe]) -> pd.DataFrame:
    sizes = pd.DataFrame(
        {"width": [p.width for p in probes], "height": [p.height for p in probes]}, dtype="float64"
    )
    stats = sizes.agg(["min", "median", "max"]).T
    stats.index.name = "dimension"
    return stats


def format_report(report: InspectReport, *, max_items: int = 20) -> str:
    """The report as plain-text tables for the CLI; long lists stop at ``max_items`` entries."""
    base = report.source.parent if report.layout == "csv" else report.source

    def rel(path: str) -> str:
        try:
            return Path(path).relative_to(base).as_posix()
        except ValueError:
            return path

    counts = report.counts.copy()
    counts["% PNEUMONIA"] = (100 * counts["PNEUMONIA"] / counts["total"].clip(lower=1)).round(1)
    lines = [
        f"Dataset: {report.source} ({report.layout}), {report.n_images} images",
        "",
        "Images per split and class",
        _indent(counts.rename_axis(index=None).to_string()),
        "",
        f"Image size (pixels, {report.n_images - len(report.unreadable)} readable images)",
        _indent(report.sizes.rename_axis(index=None).to_string(float_format=lambda v: f"{v:g}")),
        "",
        f"Exact duplicates (same bytes): {len(report.duplicates)} group(s), "
        f"{sum(len(g) for g in report.duplicates)} files",
    ]
    for group in report.duplicates[:max_items]:
        lines.append("  " + "  ==  ".join(rel(p) for p in group))
    lines += _more(len(report.duplicates), max_items)
    lines += ["", f"Unreadable files: {len(report.unreadable)}"]
    lines += [f"  {rel(path)}: {reason}" for path, reason in report.unreadable[:max_items]]
    lines += _more(len(report.unreadable), max_items)
    lines += ["", f"Patients in more than one split: {len(report.cross_split_patients)}"]
    items = list(report.cross_split_patients.items())
    lines += [f"  {pid}: {', '.join(splits)}" for pid, splits in items[:max_items]]
    lines += _more(len(items), max_items)
    declared = report.declared_not_frontal
    lines += ["", f"Not frontal chest X-rays by their DICOM header (train leaves them out): {len(declared)}"]
    lines += [f"  {rel(path)}: {reason}" for path, reason in declared[:max_items]]
    lines += _more(len(declared), max_items)
    return "\n".join(lines) + "\n"


def _indent(text: str) -> str:
    return "\n".join("  " + line for line in text.splitlines())


def _more(total: int, shown: int) -> list[str]:
    return [f"  ... and {total - shown} more"] if total > shown else []


# --------------------------------------------------------------------------- acquisition groups
#
# The shared training images were all stretched to 224×224 and re-saved as JPEG, so image size
# and aspect no longer tell the acquisitions apart. What survives the resize is measured on the
# raw decoded image: exposure, contrast, sharpness, noise, black borders, the direction of the
# texture (stretching an original of another aspect ratio squeezes its gradients along one axis)
# and how many JPEG bytes the picture costs. Clusters of those are the "acquisition groups" that
# shift-aware validation holds out whole.

STAT_NAMES: tuple[str, ...] = (
    "mean", "median", "p05", "p95", "std", "iqr", "log_sharpness", "noise", "dark_fraction",
    "grad_ratio", "bytes_per_pixel", "log_aspect", "log_pixels",
)  # fmt: skip
# Clustered on: one or two statistics per property, so that exposure (four correlated
# statistics) does not outweigh the rest. Columns constant over the data set are dropped.
CLUSTER_STATS: tuple[str, ...] = (
    "median", "iqr", "log_sharpness", "noise", "dark_fraction", "grad_ratio", "bytes_per_pixel",
    "log_aspect", "log_pixels",
)  # fmt: skip
_STATS_VERSION = 2  # bump when a statistic's definition changes: the cache is keyed on it
_NOISE_KERNEL = np.array([[1, -2, 1], [-2, 4, -2], [1, -2, 1]], np.float32)
_DARK_LEVEL = 16  # grey levels at or below this count as black border / background
# File-name families of the Kermany data. NORMAL images are only IM-/NORMAL2-IM-, PNEUMONIA
# images only person*_bacteria/_virus: the family is the label, so it can describe a group but
# never be held out alone (a held-out family would hold one class).
_FAMILIES: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"^normal\d+-im-", re.IGNORECASE), "NORMAL2-IM"),
    (re.compile(r"^im-", re.IGNORECASE), "IM"),
    (re.compile(r"^person\d+_bacteria", re.IGNORECASE), "person_bacteria"),
    (re.compile(r"^person\d+_virus", re.IGNORECASE), "person_virus"),
)


def image_statistics_of(image: np.ndarray, *, file_bytes: int | None = None) -> dict[str, float]:
    """Acquisition statistics of one uint8 grayscale image (a pure function).

    ``mean``/``median``/``p05``/``p95``: exposure; ``std``/``iqr``: contrast; ``log_sharpness``:
    log(1 + variance of the Laplacian); ``noise``: Immerkær's (1996) estimate of the noise's
    standard deviation (mean absolute response to a 3×3 kernel blind to smooth structure);
    ``dark_fraction``: share of pixels at or below grey level 16 (borders, collimation);
    ``grad_ratio``: log of horizontal over vertical Sobel gradient energy (0 for isotropic
    texture; a stretched original leaves it off 0); ``bytes_per_pixel``: file size over pixels
    (NaN without ``file_bytes``); ``log_aspect``: log(width / height); ``log_pixels``: log10 of
    the pixel count.
    """
    import cv2  # OpenCV is io's dependency already; imported here to keep data's import light

    pixels = image.astype(np.float32)
    p05, p25, median, p75, p95 = np.percentile(image, [5, 25, 50, 75, 95])
    laplacian = cv2.Laplacian(pixels, cv2.CV_32F, ksize=3)
    # Immerkær's estimate: this kernel cancels smooth structure (edges, gradients) and keeps noise.
    residual = np.abs(cv2.filter2D(pixels, cv2.CV_32F, _NOISE_KERNEL)[1:-1, 1:-1])
    gx = cv2.Sobel(pixels, cv2.CV_32F, 1, 0, ksize=3)
    gy = cv2.Sobel(pixels, cv2.CV_32F, 0, 1, ksize=3)
    energy_x, energy_y = float(np.square(gx).sum()), float(np.square(gy).sum())
    height, width = image.shape[:2]
    return {
        "mean": float(pixels.mean()),
        "median": float(median),
        "p05": float(p05),
        "p95": float(p95),
        "std": float(pixels.std()),
        "iqr": float(p75 - p25),
        "log_sharpness": float(np.log1p(laplacian.var())),
        "noise": float(np.sqrt(np.pi / 2) * residual.mean() / 6) if residual.size else 0.0,
        "dark_fraction": float(np.mean(image <= _DARK_LEVEL)),
        "grad_ratio": float(np.log((energy_x + 1.0) / (energy_y + 1.0))),
        "bytes_per_pixel": float(file_bytes) / (height * width) if file_bytes else float("nan"),
        "log_aspect": float(np.log(width / height)),
        "log_pixels": float(np.log10(height * width)),
    }


def _statistics_of_file(path: str) -> tuple[str, dict[str, float] | None, str | None]:
    """(path, statistics, error) of one file (a worker function, so it must be module level)."""
    try:
        image = io.load_image(Path(path))
        return path, image_statistics_of(image, file_bytes=Path(path).stat().st_size), None
    except io.ImageReadError as exc:
        return path, None, getattr(exc, "reason", None) or str(exc)
    except OSError as exc:
        return path, None, f"{type(exc).__name__}: {exc.strerror or exc}"


def _statistics_all(
    paths: list[str], workers: int
) -> Iterator[tuple[str, dict[str, float] | None, str | None]]:
    if workers <= 1 or len(paths) < 64:
        yield from map(_statistics_of_file, paths)
        return
    context = multiprocessing.get_context("spawn")  # see _probe_all
    chunksize = max(1, len(paths) // (workers * 8))
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        yield from pool.map(_statistics_of_file, paths, chunksize=chunksize)


def _cache_key(path: str) -> str:
    """What identifies a file's content cheaply: path, size and modification time."""
    stat = Path(path).stat()
    return f"{path}|{stat.st_size}|{stat.st_mtime_ns}"


def _read_stats_cache(file: Path | None) -> pd.DataFrame:
    if file is None or not file.is_file():
        return pd.DataFrame(columns=["key", *STAT_NAMES]).set_index("key")
    try:
        return pd.read_csv(file, index_col="key")
    except (pd.errors.ParserError, pd.errors.EmptyDataError, ValueError) as exc:
        log.warning("%s: unreadable statistics cache (%s); recomputing", file, exc)
        return pd.DataFrame(columns=["key", *STAT_NAMES]).set_index("key")


def image_statistics(
    paths: Sequence[str | Path], *, workers: int | None = None, cache_dir: Path | None = None
) -> pd.DataFrame:
    """:func:`image_statistics_of` for each file, one row per path in input order (columns
    :data:`STAT_NAMES`; NaN for a file that cannot be read, with a warning).

    ``cache_dir`` keeps the figures in ``image_stats_v<version>.csv`` keyed on path, size and
    modification time, so a data set is decoded once however often it is grouped.
    """
    paths = [str(p) for p in paths]
    cache_file = Path(cache_dir) / f"image_stats_v{_STATS_VERSION}.csv" if cache_dir is not None else None
    cached = _read_stats_cache(cache_file)
    key_of = {p: _cache_key(p) if Path(p).exists() else f"{p}|missing" for p in paths}
    todo = [p for p in key_of if key_of[p] not in cached.index]
    rows: dict[str, dict[str, float]] = {}
    workers = workers if workers is not None else (os.cpu_count() or 1)
    for path, stats, error in _statistics_all(todo, workers):
        if error is not None:
            log.warning("no statistics for %s: %s", path, error)
        rows[path] = stats or {}
    fresh = pd.DataFrame([rows[p] for p in todo], index=[key_of[p] for p in todo], columns=list(STAT_NAMES))
    if cache_file is not None and len(fresh.dropna(how="all")):
        merged = pd.concat([cached, fresh.dropna(how="all")])
        merged = merged[~merged.index.duplicated(keep="last")].rename_axis("key")
        atomic_write_bytes(cache_file, merged.to_csv().encode())
    table = pd.concat([cached, fresh])
    table = table[~table.index.duplicated(keep="last")]
    return table.reindex([key_of[p] for p in paths])[list(STAT_NAMES)].astype(float).reset_index(drop=True)


def _standardised(stats: pd.DataFrame, columns: Sequence[str]) -> np.ndarray:
    """z-scores of the ``columns`` that vary; a missing value becomes the column's median (z≈0)."""
    table = stats[list(columns)].astype(float)
    table = table.fillna(table.median()).fillna(0.0)
    spread = table.std(ddof=0)
    varying = spread[spread > 1e-12].index
    if len(varying) == 0:
        return np.zeros((len(table), 1))
    return ((table[varying] - table[varying].mean()) / spread[varying]).to_numpy()


def _by_patient(labels: np.ndarray, patients: pd.Series) -> np.ndarray:
    """Each patient's most frequent label on all of its rows (ties: the smaller label)."""
    frame = pd.DataFrame({"patient": patients.astype(str).to_numpy(), "label": labels})
    counts = frame.groupby(["patient", "label"]).size().reset_index(name="n")
    counts = counts.sort_values(["patient", "n", "label"], ascending=[True, False, True])
    majority = counts.drop_duplicates("patient").set_index("patient")["label"]
    return frame["patient"].map(majority).to_numpy()


def acquisition_groups(
    df: pd.DataFrame,
    *,
    k: int = 4,
    seed: int = 0,
    stats: pd.DataFrame | None = None,
    workers: int | None = None,
    cache_dir: Path | None = None,
    group_col: str | None = "patient_id",
) -> pd.Series:
    """Acquisition group (0 .. k-1, 0 the largest) of every row of ``df``, as an int Series.

    KMeans (scikit-learn, ``n_init=10``, seeded) on the standardised :data:`CLUSTER_STATS` of
    each image (``stats`` aligned with ``df``, or computed by :func:`image_statistics` from
    ``df["path"]``). Groups are then made patient-consistent: every image of a patient
    (``group_col``; None: no such step) takes the group most of its images fell in, so a held-out
    group never shares a patient with training. Fewer distinct images than ``k`` give fewer groups.
    """
    from sklearn.cluster import KMeans  # heavy import, only needed here
    from threadpoolctl import threadpool_limits

    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if df.empty:
        raise DatasetError("cannot group an empty dataset")
    if stats is None:
        stats = image_statistics(df["path"], workers=workers, cache_dir=cache_dir)
    features = _standardised(stats.reset_index(drop=True), CLUSTER_STATS)
    n_clusters = min(k, len(np.unique(features, axis=0)))
    with threadpool_limits(1):  # thousands of points at most: threads only contend with training's
        labels = KMeans(n_clusters=n_clusters, n_init=10, random_state=seed).fit_predict(features)
    if group_col is not None:
        labels = _by_patient(labels, df[group_col])
    # Renumber by size (largest first, ties by the old number) so the ids do not depend on
    # KMeans' arbitrary order; patient voting may have emptied a cluster, so renumber densely.
    sizes = pd.Series(labels).value_counts()
    order = sorted(sizes.index, key=lambda g: (-sizes[g], g))
    renumber = {old: new for new, old in enumerate(order)}
    return pd.Series([renumber[g] for g in labels], index=df.index, name="acquisition_group", dtype="int64")


def describe_groups(
    stats: pd.DataFrame, groups: pd.Series, labels: Sequence[int] | None = None
) -> pd.DataFrame:
    """One row per group: ``n`` (and ``n_positive`` when ``labels`` are given) and the mean of
    every statistic, i.e. what the group is (stats, groups and labels aligned by position)."""
    table = stats.reset_index(drop=True).assign(group=np.asarray(groups))
    described = table.groupby("group")[list(STAT_NAMES)].mean()
    described.insert(0, "n", table.groupby("group").size())
    if labels is not None:
        described.insert(1, "n_positive", pd.Series(np.asarray(labels)).groupby(table["group"]).sum())
    return described


def farthest_group(
    stats: pd.DataFrame,
    groups: pd.Series,
    labels: Sequence[int] | None = None,
    *,
    min_per_class: int = 30,
    max_class_share: float = 0.5,
) -> int:
    """The group whose mean standardised statistics lie farthest from the mean of all other
    images: the most distinct acquisition, the natural one to hold out.

    With ``labels``, only groups worth holding out compete: at least ``min_per_class`` images of
    each class (so its AUC means something) and at most ``max_class_share`` of either class's
    images (so that training keeps most of both). Raises ``ValueError`` when no group qualifies.
    """
    features = _standardised(stats.reset_index(drop=True), CLUSTER_STATS)
    ids = np.asarray(groups)
    y = None if labels is None else np.asarray(labels)
    distances = {}
    for g in np.unique(ids):
        inside = ids == g
        if not (~inside).any():
            continue
        if y is not None:
            counts = [int((inside & (y == c)).sum()) for c in (0, 1)]
            shares = [n / max(1, int((y == c).sum())) for n, c in zip(counts, (0, 1), strict=True)]
            if min(counts) < min_per_class or max(shares) > max_class_share:
                continue
        distances[int(g)] = float(
            np.linalg.norm(features[inside].mean(axis=0) - features[~inside].mean(axis=0))
        )
    if not distances:
        raise ValueError(
            f"no group can be held out (each needs >= {min_per_class} images of each class and at most "
            f"{max_class_share:.0%} of either class); group sizes: {pd.Series(ids).value_counts().to_dict()}"
        )
    return max(distances, key=lambda g: (distances[g], -g))


def filename_family(filename: str) -> str:
    """The Kermany file-name family of ``filename``: ``IM``, ``NORMAL2-IM``, ``person_bacteria``,
    ``person_virus``, or ``other``. Confounded with the label (NORMAL files are IM/NORMAL2-IM,
    PNEUMONIA files person_*): fit to describe groups, never to hold out alone."""
    name = Path(filename).name
    for pattern, family in _FAMILIES:
        if pattern.match(name):
            return family
    return "other"


def filename_families(df: pd.DataFrame) -> pd.Series:
    """:func:`filename_family` of every ``path`` of ``df``."""
    return df["path"].map(filename_family).rename("filename_family")
