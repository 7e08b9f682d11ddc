"""Scoring an archive on Ray Data: `predict --engine ray`, resumable, Parquet out.

A hospital archive (10^6–10^7 images) outgrows one process. This module runs the same
prediction as :meth:`cxr_pneumonia.predict.Run.iter_predictions` as a Ray Data job, in the shape
Ray documents for batch inference: a dataset of file paths; decoding and preprocessing in
stateless tasks (:func:`decode_batch`); the run's runtime (its OpenVINO export when present, and
the input gate) in actors that load the model once (:class:`Scorer`, ``ActorPoolStrategy``); the
results streamed back to the driver, which writes them as Parquet parts.

Resumable by content: every row carries the SHA-256 of the file's bytes. Each part is written
under a temporary name and renamed, so a killed job leaves only whole parts. A rerun reads the
parts, and its decoding tasks skip a file whose bytes were scored before (under any name), so
nothing already written is scored again. The answer, ``OUT/predictions.parquet``, has one row
per listed image, with plain ``predict``'s columns: for each, the row of the bytes this job read
(a file scored, then damaged, then restored shows its first result, not the damaged one's). It is
removed when a job starts and written last, so a killed job leaves no answer of an older job.

Only this module imports Ray (the ``ray`` extra). It imports neither TensorFlow nor the model:
the actors load them (the decoding tasks need neither).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import math
import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
from pydantic import Field

from cxr_pneumonia import rundir
from cxr_pneumonia.config import (
    StageConfig,
    atomic_write_bytes,
    config_hash,
    file_sha256,
    from_dict,
    read_json,
    to_dict,
    write_json,
)
from cxr_pneumonia.cores import available_cores, limit_threads
from cxr_pneumonia.header import DicomHeader
from cxr_pneumonia.io import ImageReadError, list_image_files, load_image, load_image_bytes_and_header
from cxr_pneumonia.preprocess import PreprocessConfig, PreprocessError, build_pipeline

__all__ = ["COLUMNS", "ArchiveConfig", "ArchiveError", "ArchiveSummary", "score_archive"]

log = logging.getLogger(__name__)

# Plain `predict`'s columns, in its order (cli.PREDICT_COLUMNS; a test keeps the two equal).
COLUMNS = ("path", "status", "probability", "label", "threshold", "operating_point", "domain_score",
           "domain_limit", "reason", "error")  # fmt: skip
ARCHIVE_JSON = "archive.json"
PARTS_DIR = "parts"
PREDICTIONS_FILE = "predictions.parquet"
# The runtime kinds of cxr_pneumonia.runtime (importing it would import TensorFlow here).
Runtime = Literal["auto", "keras", "openvino"]


class ArchiveError(RuntimeError):
    """The job cannot start or finish (no Ray, an output folder of another run, images left)."""


class ArchiveConfig(StageConfig):
    """How an archive is scored; saved in ``OUT/archive.json``."""

    runtime: Runtime = Field("auto", description="auto (the run's export when present), keras or openvino.")
    gate: bool = Field(True, description="The input check: no probability for images unlike training's.")
    batch_size: int = Field(32, ge=1, description="Images per forward pass.")
    workers: int | None = Field(
        None, ge=1, description="Model actors (default: local, one per `threads` cores; a cluster, its CPUs "
        "less one, over `threads`).",
    )  # fmt: skip
    threads: int = Field(1, ge=1, description="CPU threads (and Ray CPUs) of each model actor.")
    decode_cpus: float = Field(0.5, gt=0, description="Ray CPUs one decoding task reserves.")
    part_rows: int = Field(1024, ge=1, description="Most images per Parquet part (what a kill can lose).")
    operating_point: str | None = Field(
        None, description="A point saved by calibrate (None: the threshold chosen on validation)."
    )


@dataclass(frozen=True)
class ArchiveSummary:
    """What a job did. ``scored``: images scored by this job; ``reused``: images whose bytes
    were scored before (by an interrupted job, or under another name)."""

    out: str
    predictions: str
    images: int
    scored: int
    reused: int
    errors: int
    rejected: int
    workers: int
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---- the output folder -------------------------------------------------------------------------


def _schema() -> Any:
    import pyarrow as pa

    text, number = pa.string(), pa.float64()
    kinds = {"probability": number, "threshold": number, "domain_score": number, "domain_limit": number}
    return pa.schema([(name, kinds.get(name, text)) for name in (*COLUMNS, "sha256")])


# What an output folder's rows must share with a new job for it to add to them.
_IDENTITY_KEYS = ("content", "runtime", "gate", "operating_point", "threshold")


def run_identity(run: Path, cfg: ArchiveConfig) -> dict[str, Any]:
    """What the rows depend on: the model, its export and gate (by content), runtime and gate
    choice, and the operating point applied (its name and threshold: the labels follow it)."""
    files = [rundir.MODEL_FILE, rundir.CONFIG_FILE, rundir.THRESHOLD_FILE]
    for folder in (rundir.export_dir(run), run / "gate"):
        if folder.is_dir():
            files += sorted(str(p.relative_to(run)) for p in folder.iterdir() if p.is_file())
    point = cfg.operating_point or rundir.DEFAULT_OPERATING_POINT
    return {
        "run": str(run.resolve()),
        "content": config_hash({name: file_sha256(run / name) for name in files}),
        "runtime": cfg.runtime,
        "gate": cfg.gate,
        "operating_point": point,
        "threshold": float(rundir.read_operating_point(run, point)["threshold"]),
    }


def _open_output(out: Path, run: Path, cfg: ArchiveConfig) -> None:
    """Create ``out`` or check that it holds parts of this same run and settings."""
    identity = run_identity(run, cfg)
    meta = out / ARCHIVE_JSON
    if meta.is_file():
        saved = read_json(meta)
        before = dict(saved.get("identity", {}))
        if "operating_point" not in before:  # a folder from before the point was in its identity:
            # its config names the point; its threshold was not recorded, so that is not compared
            point = (saved.get("config") or {}).get("operating_point") or rundir.DEFAULT_OPERATING_POINT
            before.update(operating_point=point, threshold=identity["threshold"])
        if {k: before.get(k) for k in _IDENTITY_KEYS} != {k: identity[k] for k in _IDENTITY_KEYS}:
            raise ArchiveError(
                f"{out}: holds predictions of another run or settings ({before.get('run')}, runtime "
                f"{before.get('runtime')}, gate {before.get('gate')}, operating point "
                f"{before.get('operating_point')} at {before.get('threshold')}; this job: "
                f"{identity['operating_point']} at {identity['threshold']}); choose another --out"
            )
    (out / PARTS_DIR).mkdir(parents=True, exist_ok=True)
    for stale in (out / PARTS_DIR).glob(".part-*"):  # half-written by a killed job
        stale.unlink(missing_ok=True)
    write_json(meta, {"identity": identity, "config": to_dict(cfg), "columns": list(COLUMNS)})


def read_parts(out: Path) -> pd.DataFrame:
    """Every row of ``out``'s parts in the order they were written (columns + sha256)."""
    import pyarrow.parquet as pq

    parts = sorted((Path(out) / PARTS_DIR).glob("part-*.parquet"))
    if not parts:
        return _schema().empty_table().to_pandas()
    return pd.concat([pq.read_table(p, schema=_schema()).to_pandas() for p in parts], ignore_index=True)


def _as_arrow(rows: pd.DataFrame, schema: Any = None) -> Any:
    import pyarrow as pa

    schema = schema or _schema()
    return pa.Table.from_pandas(rows[list(schema.names)], schema=schema, preserve_index=False)


def _write_part(out: Path, rows: pd.DataFrame, sequence: int) -> None:
    import pyarrow.parquet as pq

    name = f"part-{time.time_ns():020d}-{os.getpid()}-{sequence:06d}.parquet"
    final = out / PARTS_DIR / name
    tmp = final.with_name(f".{name}.tmp")
    pq.write_table(_as_arrow(rows), tmp)
    os.replace(tmp, final)  # a reader sees the whole part or none of it


def _digests(hashes: Iterable[str]) -> np.ndarray:
    """Sorted raw SHA-256 digests, for a binary search in the decoding tasks."""
    return np.sort(np.array([bytes.fromhex(h) for h in hashes], dtype="S32"))


def _pair_digest(path: str, digest: bytes) -> bytes:
    return hashlib.sha256(path.encode("utf-8") + b"\0" + digest).digest()


def _contains(sorted_digests: np.ndarray, digest: bytes) -> bool:
    i = int(np.searchsorted(sorted_digests, digest))
    # NumPy hands an "S32" element back without its trailing zero bytes: pad it again, or the one
    # digest in 256 that ends in 0x00 is never found (and its file is scored a second time).
    return (
        i < len(sorted_digests) and bytes(sorted_digests[i]).ljust(sorted_digests.itemsize, b"\0") == digest
    )


# ---- the tasks and the actors ------------------------------------------------------------------


@functools.lru_cache(maxsize=4)
def _pipeline(preprocess_json: str) -> Any:
    import json

    return build_pipeline(from_dict(PreprocessConfig, json.loads(preprocess_json)))


def _read(path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError:
        load_image(path)  # raises the ImageReadError plain predict gives for an unreadable file
        raise


def _decode_one(path: str, pipeline: Any, size: int, known: tuple[Any, Any]) -> dict[str, Any]:
    """One file as a row to score, a row already scored under another name (``done``), or a
    row (``seen``) saying that this very file (name and bytes) was scored before: the driver
    needs its digest to pick that earlier row, not a later one of other bytes under its name."""
    row = {"path": path, "sha256": "", "error": "", "header": "", "done": False, "seen": False}
    row["image"] = np.zeros((size, size), np.uint8)
    try:
        data = _read(path)
        digest = hashlib.sha256(data).digest()
        row["sha256"] = digest.hex()
        if _contains(known[1], _pair_digest(path, digest)):
            return {**row, "seen": True}
        if _contains(known[0], digest):
            return {**row, "done": True}
        image, header = load_image_bytes_and_header(data, name=path)
        row["image"] = pipeline(image, source=path)
        # As JSON text: a Ray block's columns hold strings, not Python objects.
        row["header"] = header.to_json() if header is not None else ""
    except ImageReadError as e:
        row["error"] = e.reason
    except PreprocessError as e:
        row["error"] = str(e)
    return row


def decode_batch(batch: dict[str, np.ndarray], *, preprocess: str, size: int, known: Any) -> dict[str, Any]:
    """A Ray Data task: read, hash, decode and preprocess a block of files.

    ``known``: (content digests, (path, content) digests) of what the output folder holds, as a
    Ray object reference; files already scored under their name are marked ``seen`` here.
    """
    import cv2
    import ray

    cv2.setNumThreads(1)  # parallelism comes from the tasks; OpenCV's pool would oversubscribe
    known = ray.get(known) if isinstance(known, ray.ObjectRef) else known
    rows = [_decode_one(str(p), _pipeline(preprocess), size, known) for p in batch["path"]]
    columns: dict[str, Any] = {k: np.array([r[k] for r in rows], dtype=object) for k in ("path", "sha256")}
    columns["error"] = np.array([r["error"] for r in rows], dtype=object)
    columns["header"] = np.array([r["header"] for r in rows], dtype=object)
    columns["done"] = np.array([r["done"] for r in rows], dtype=bool)
    columns["seen"] = np.array([r["seen"] for r in rows], dtype=bool)
    columns["image"] = np.stack([r["image"] for r in rows]) if rows else np.zeros((0, size, size), np.uint8)
    return columns


class Scorer:
    """A Ray Data actor: the run loaded once (runtime, threshold, gate), scoring decoded batches."""

    def __init__(
        self, run: str, runtime: str, threads: int, gate: bool, batch_size: int, operating_point: str | None
    ) -> None:
        limit_threads(threads)
        from cxr_pneumonia.predict import Run

        self.run = Run.load(run, runtime=runtime, threads=threads, operating_point=operating_point)  # type: ignore[arg-type]
        self.gate, self.batch_size = gate, batch_size

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        paths = [str(p) for p in batch["path"]]
        errors, done = list(batch["error"]), np.asarray(batch["done"], dtype=bool)
        seen = np.asarray(batch["seen"], dtype=bool)
        todo = [i for i, e in enumerate(errors) if not e and not done[i] and not seen[i]]
        scored = iter(
            self.run.classify_preprocessed(
                np.asarray(batch["image"])[todo], gate=self.gate, sources=[paths[i] for i in todo],
                batch_size=self.batch_size, headers=[DicomHeader.from_json(batch["header"][i]) for i in todo],
            ) if todo else []
        )  # fmt: skip
        rows, threshold = [], self.run.threshold
        for i, path in enumerate(paths):
            if seen[i]:  # the driver notes its digest and writes nothing
                rows.append({"path": path, "status": "seen"})
            elif done[i]:
                rows.append({"path": path, "status": "done"})
            elif errors[i]:
                rows.append(
                    {"path": path, "status": "error", "error": str(errors[i]), "threshold": threshold}
                )
            else:
                rows.append(next(scored).to_dict())
        table = pd.DataFrame(rows, columns=list(COLUMNS)).assign(sha256=list(batch["sha256"]))
        point = self.run.operating_point  # "done" rows take the earlier job's row, point included
        table["operating_point"] = [
            None if status in ("done", "seen") else point for status in table["status"]
        ]
        return _as_arrow(table)  # one schema for every block, whatever its missing values


# ---- the job -----------------------------------------------------------------------------------


@contextlib.contextmanager
def ray_session(address: str | None, cfg: ArchiveConfig) -> Iterator[int]:
    """A Ray connection for the job; yields the number of model actors.

    Without ``address`` (nor ``RAY_ADDRESS``) a local Ray starts with one CPU per actor thread
    plus one for the decoding tasks (they run beside inference, as plain predict's decoding
    threads do), no dashboard and worker logs kept out of the terminal. An already initialised
    Ray is used as it is.
    """
    try:
        import ray
    except ImportError:
        raise ArchiveError("the ray engine needs Ray: pip install 'cxr-pneumonia[ray]'") from None
    started, address = False, address or os.environ.get("RAY_ADDRESS")  # Ray's own convention
    if not ray.is_initialized():
        options: dict[str, Any] = {"log_to_driver": False, "logging_level": logging.ERROR}
        if address is None:
            workers = cfg.workers or max(1, available_cores() // cfg.threads)
            options.update(num_cpus=workers * cfg.threads + 1, include_dashboard=False)
        # Ray's start-up notices and its C++ core's log lines stay in Ray's log files (the
        # session folder), not in the terminal; errors still come back as exceptions.
        os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "fatal")
        ray.init(address=address, **options)
        started = True
    # Ray Data's own progress display would bury the job's one progress bar (and log every 10 s
    # when stdout is not a terminal).
    ray.data.DataContext.get_current().enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.ERROR)
    try:
        cpus = int(ray.cluster_resources().get("CPU", 1))
        yield cfg.workers or max(1, (cpus - 1) // cfg.threads)
    finally:
        if started:
            ray.shutdown()


def _dataset(paths: list[str], run: Path, cfg: ArchiveConfig, workers: int, known: Any) -> Any:
    """paths → decoding tasks → scoring actors, in blocks small enough to keep every actor busy."""
    import json

    import ray

    config = rundir.read_config(run)
    blocks = max(math.ceil(len(paths) / cfg.part_rows), min(len(paths), 4 * workers))
    ds = ray.data.from_items([{"path": p} for p in paths], override_num_blocks=max(1, blocks))
    ds = ds.map_batches(
        decode_batch,
        batch_size=None,  # a whole block per task
        num_cpus=cfg.decode_cpus,
        fn_kwargs={
            "preprocess": json.dumps(config["preprocess"], sort_keys=True),
            "size": int(config["model"]["image_size"]),
            "known": known,
        },
    )
    return ds.map_batches(
        Scorer,
        batch_size=cfg.batch_size,
        num_cpus=cfg.threads,
        compute=ray.data.ActorPoolStrategy(size=workers),
        fn_constructor_kwargs={
            "run": str(run.resolve()), "runtime": cfg.runtime, "threads": cfg.threads, "gate": cfg.gate,
            "batch_size": cfg.batch_size, "operating_point": cfg.operating_point,
        },
    )  # fmt: skip


def _resolve_done(rows: pd.DataFrame, parts: pd.DataFrame) -> pd.DataFrame:
    """Rows the decoding tasks marked ``done`` (bytes scored before under another name) get the
    earlier result under their own name."""
    done = rows["status"] == "done"
    if not done.any():
        return rows
    earlier = parts.drop_duplicates("sha256", keep="last").set_index("sha256")
    copied = earlier.loc[rows.loc[done, "sha256"]].reset_index()
    copied["path"] = rows.loc[done, "path"].to_numpy()
    return pd.concat([rows[~done], copied[rows.columns]], ignore_index=True)


def _run_job(
    paths: list[str], run: Path, out: Path, cfg: ArchiveConfig, address: str | None
) -> tuple[int, int, dict[str, str]]:
    """Score what the parts lack; returns (images scored, model actors, the SHA-256 this job
    read for each path: "" where the file could not be read)."""
    from tqdm.auto import tqdm

    parts = read_parts(out)
    hashed = parts[parts["sha256"].fillna("") != ""]
    listed = set(paths)
    pending = len(listed - set(hashed["path"]))
    scored, sequence, digests = 0, 0, {}
    with ray_session(address, cfg) as workers:
        import ray  # here: ray_session turns a missing Ray into one line

        # The previous job's answer goes once this one runs (not before: a job that cannot start
        # keeps it); were this job killed, the old answer would pass for this job's.
        (out / PREDICTIONS_FILE).unlink(missing_ok=True)
        pairs = [_pair_digest(p, bytes.fromhex(h)) for p, h in hashed[["path", "sha256"]].itertuples(False)]
        known = ray.put((_digests(hashed["sha256"].unique()), np.sort(np.array(pairs, dtype="S32"))))
        ds = _dataset(paths, run, cfg, workers, known)
        with tqdm(total=pending, desc="scoring", unit="img", disable=pending < 64) as bar:
            for block in ds.iter_batches(batch_size=None, batch_format="pandas"):
                digests.update(zip(block["path"], block["sha256"].fillna(""), strict=True))
                block = block[block["status"] != "seen"]  # their rows are in the parts already
                if len(block) == 0:
                    continue
                rows = _resolve_done(block, hashed)
                _write_part(out, rows, sequence)
                sequence += 1
                scored += int((block["status"] != "done").sum())
                bar.update(len(block))
    return scored, workers, digests


def finalise(out: Path, paths: list[str], digests: dict[str, str]) -> pd.DataFrame:
    """One row per listed image, in listing order: its latest part row for the bytes this job
    read (``digests``: path → SHA-256, "" for a file that could not be read). Written last, atomically.

    Not simply its latest row: a file scored, then damaged (an error row), then restored is skipped
    as already scored, and its latest row would be the damaged bytes' error.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = read_parts(out)
    rows = rows[rows["path"].isin(set(paths))]
    rows = rows[rows["sha256"].fillna("") == rows["path"].map(digests)].drop_duplicates("path", keep="last")
    missing = len(paths) - len(rows)
    if missing:
        raise ArchiveError(f"{out}: {missing} of {len(paths)} images have no result; run the job again")
    rows = rows.set_index("path").loc[paths].reset_index()[list(COLUMNS)]
    buffer = pa.BufferOutputStream()
    pq.write_table(_as_arrow(rows, _schema().remove(len(COLUMNS))), buffer)
    atomic_write_bytes(out / PREDICTIONS_FILE, buffer.getvalue().to_pybytes())
    return rows


def expand_sources(inputs: Iterable[str | Path]) -> list[str]:
    """Files as given, folders expanded to their images (JPEG, PNG, DICOM), each once, in order."""
    files: list[str] = []
    for item in map(Path, inputs):
        files.extend(str(p) for p in (list_image_files(item) if item.is_dir() else [item]))
    return list(dict.fromkeys(files))


def score_archive(
    run: str | Path,
    inputs: Iterable[str | Path],
    out: str | Path,
    cfg: ArchiveConfig | None = None,
    *,
    address: str | None = None,
) -> ArchiveSummary:
    """Score every image of ``inputs`` (files and folders) with the run at ``run`` on Ray, into
    ``out`` (parts, then ``predictions.parquet``); a rerun into the same ``out`` scores only what
    is missing. ``address``: a running Ray cluster (``ray://HOST:10001``, ``auto``); default a local Ray.

    Raises:
        RunError: ``run`` is not a complete run directory.
        ArchiveError: Ray missing, ``out`` holds another run's predictions, or images were left unscored.
    """
    cfg, run, out = cfg or ArchiveConfig(), Path(run), Path(out)
    started = time.perf_counter()
    rundir.check_complete(run)
    paths = expand_sources(inputs)
    _open_output(out, run, cfg)
    scored, workers, digests = _run_job(paths, run, out, cfg, address) if paths else (0, 0, {})
    rows = finalise(out, paths, digests)
    return ArchiveSummary(
        out=str(out),
        predictions=str(out / PREDICTIONS_FILE),
        images=len(rows),
        scored=scored,
        reused=len(rows) - scored,
        errors=int((rows["status"] == "error").sum()),
        rejected=int((rows["status"] == "rejected").sum()),
        workers=workers,
        seconds=round(time.perf_counter() - started, 2),
    )
