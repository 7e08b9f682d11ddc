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
from cxr_pneumonia.config import StageConfig, file_sha256

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


def is_kermany_patient_id(patient_id: str) -> bool:
    """Whether ``patient_id`` names a Kermany patient (as :func:`parse_patient_id` makes them),
    so that it means the same patient in any copy of the dataset."""
    return _KERMANY_ID.match(patient_id) is not None


def _patient_id_for(path: Path, base: Path) -> str:
    """Kermany id, or for an unknown name the path below ``base``, so that same-named files
    in different folders (``train/NORMAL/1.png``, ``test/NORMAL/1.png``) stay distinct."""
    known = _match_patient_id(path.name)
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
        _row(path, label, split, _patient_id_for(path, root))
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


def content_hashes(paths: Iterable[str | Path], *, workers: int | None = None) -> list[str]:
    """SHA-256 of each file's bytes, in input order.

    Threads, not processes: reading and hashing release the GIL.
    """
    paths = [Path(p) for p in paths]
    workers = workers or min(8, (os.cpu_count() or 1) + 2)
    if workers <= 1 or len(paths) < 64:
        return [file_sha256(p) for p in paths]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(file_sha256, paths))


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
    """

    source: Path
    layout: str
    n_images: int
    counts: pd.DataFrame
    duplicates: list[list[str]] = field(default_factory=list)
    unreadable: list[tuple[str, str]] = field(default_factory=list)
    sizes: pd.DataFrame = field(default_factory=pd.DataFrame)
    cross_split_patients: dict[str, list[str]] = field(default_factory=dict)

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
        }


@dataclass(frozen=True)
class _Probe:
    path: str
    sha256: str | None
    height: int | None
    width: int | None
    error: str | None


def _probe(path: str) -> _Probe:
    """Hash and fully decode one file (a worker function, so it must be module level)."""
    try:
        digest = file_sha256(Path(path))
        image = io.load_image(Path(path))
    except io.ImageReadError as exc:
        return _Probe(path, None, None, None, getattr(exc, "reason", None) or str(exc))
    except OSError as exc:  # permissions, a file removed mid-run: still a finding, not a crash
        return _Probe(path, None, None, None, f"{type(exc).__name__}: {exc.strerror or exc}")
    return _Probe(path, digest, int(image.shape[0]), int(image.shape[1]), None)


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
    return "\n".join(lines) + "\n"


def _indent(text: str) -> str:
    return "\n".join("  " + line for line in text.splitlines())


def _more(total: int, shown: int) -> list[str]:
    return [f"  ... and {total - shown} more"] if total > shown else []
