"""Cached backbone activations: computed once, read back in batches from disk.

A frozen backbone gives the same activations every epoch, so training computes them once per
image (and per augmented view) into a float16 ``.npy`` file and reads batches back with
positioned reads. Reads go through the page cache rather than a memory map, so the training
process's resident memory stays small however large the cache file is.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from tqdm.auto import tqdm

from cxr_pneumonia.augment import AugmentConfig, extra_views, random_augment, random_raw_augment
from cxr_pneumonia.io import ImageReadError, load_image
from cxr_pneumonia.model import inference_function
from cxr_pneumonia.preprocess import PreprocessError

log = logging.getLogger(__name__)

DTYPE = np.dtype(np.float16)


class FeatureStore:
    """A read-only (views, n, *shape) float16 array in a ``.npy`` file, read by position."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        with open(self.path, "rb") as handle:
            if np.lib.format.read_magic(handle) != (1, 0):
                raise ValueError(f"{self.path}: not a feature cache file")
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(handle)
            self.offset = handle.tell()
        if fortran or np.dtype(dtype) != DTYPE or len(shape) < 3:
            raise ValueError(f"{self.path}: not a feature cache file")
        self.views, self.n = int(shape[0]), int(shape[1])
        self.item_shape = tuple(int(d) for d in shape[2:])
        self.item_bytes = DTYPE.itemsize * math.prod(self.item_shape)
        self._fd = os.open(self.path, os.O_RDONLY)

    def __del__(self) -> None:
        fd = getattr(self, "_fd", None)
        if fd is not None:
            os.close(fd)

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.views, self.n, *self.item_shape)

    def read(self, indices: Sequence[int], views: Sequence[int] | int = 0) -> np.ndarray:
        """Items ``indices`` (of the given view each) as float32, shape (len, *item_shape)."""
        views = [views] * len(indices) if isinstance(views, int) else list(views)
        out = np.empty((len(indices), *self.item_shape), dtype=DTYPE)
        for row, (i, v) in enumerate(zip(indices, views, strict=True)):
            position = self.offset + (int(v) * self.n + int(i)) * self.item_bytes
            out[row] = np.frombuffer(os.pread(self._fd, self.item_bytes, position), dtype=DTYPE).reshape(
                self.item_shape
            )
        return out.astype(np.float32)

    def batches(self, batch_size: int, view: int = 0) -> Iterator[np.ndarray]:
        for start in range(0, self.n, batch_size):
            yield self.read(range(start, min(start + batch_size, self.n)), view)


def write_store(
    path: Path, shape: tuple[int, ...], chunks: Iterator[np.ndarray], *, total: int, description: str
) -> FeatureStore:
    """Write ``chunks`` (in order) to a feature file via a temp name; rename when complete."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    written = 0
    try:
        with open(tmp, "wb") as handle, tqdm(total=total, desc=description, unit="img") as bar:
            header = {"descr": np.lib.format.dtype_to_descr(DTYPE), "fortran_order": False, "shape": shape}
            np.lib.format.write_array_header_1_0(handle, header)
            for chunk in chunks:
                handle.write(np.ascontiguousarray(chunk, dtype=DTYPE).tobytes())
                written += len(chunk)
                bar.update(len(chunk))
        if written != math.prod(shape[:2]):
            raise RuntimeError(f"{path}: wrote {written} items, expected {math.prod(shape[:2])}")
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return FeatureStore(path)


def load_cached_image(path: str) -> np.ndarray:
    img = cv2.imread(path, cv2.IMREAD_GRAYSCALE)
    if img is None:
        raise OSError(f"{path}: preprocessing cache entry unreadable; delete the cache and retry")
    return img


def image_batches(
    paths: Sequence[str],
    view: int,
    augment: AugmentConfig,
    seed: int,
    batch_size: int,
    raw: tuple[Sequence[str], Any] | None = None,
    first: int = 0,
) -> Iterator[np.ndarray]:
    """(N, H, W, 1) float32 pixel batches of cached preprocessed images.

    View 0 is the plain image; view k > 0 is a seeded random draw. With ``raw`` = (original
    paths, preprocessing pipeline), an augmented view starts from the original image, changes
    its framing and intensity, and runs the pipeline again, as a different acquisition would.
    ``first``: the position of ``paths[0]`` in the whole list (a worker's share of it), which
    seeds the draws, so that a share's views are the whole list's.
    """
    for start in range(0, len(paths), batch_size):
        batch = []
        for i, path in enumerate(paths[start : start + batch_size], start=start):
            if view == 0:
                batch.append(load_cached_image(path))
                continue
            rng = np.random.default_rng([seed, view, first + i])
            img = None
            if raw is not None:
                raw_paths, pipeline = raw
                try:
                    img = pipeline(
                        random_raw_augment(load_image(raw_paths[i]), rng, augment), source=raw_paths[i]
                    )
                except (ImageReadError, PreprocessError) as e:  # keep the view: augment the cached image
                    log.warning("raw augmentation skipped: %s", e)
            if img is None:
                img = load_cached_image(path)
            batch.append(random_augment(img, rng, augment))
        yield np.stack(batch)[..., None].astype(np.float32)


def _prefetched(make_batches: Callable[[], Iterator[np.ndarray]], size: int) -> Iterator[np.ndarray]:
    """Batches from a tf.data pipeline, so decoding overlaps with the backbone."""
    import tensorflow as tf

    spec = tf.TensorSpec((None, size, size, 1), tf.float32)
    dataset = tf.data.Dataset.from_generator(make_batches, output_signature=spec).prefetch(2)
    yield from dataset


def compute_image_features(
    extractor: Any,
    paths: Sequence[str],
    out_path: Path,
    *,
    views: int,
    augment: AugmentConfig,
    seed: int,
    batch_size: int = 32,
    description: str = "features",
    raw: tuple[Sequence[str], Any] | None = None,
    first: int = 0,
) -> FeatureStore:
    """Run ``extractor`` once over every image (and view); reuse the file when it exists.
    ``first``: see :func:`image_batches`."""
    if out_path.exists():
        return FeatureStore(out_path)
    size = int(extractor.input.shape[1])
    item_shape = tuple(int(d) for d in extractor.output.shape[1:])

    forward = inference_function(extractor)

    def chunks() -> Iterator[np.ndarray]:
        for view in range(views):
            batches = _prefetched(
                lambda v=view: image_batches(paths, v, augment, seed, batch_size, raw, first), size
            )
            for batch in batches:
                yield np.asarray(forward(batch))

    return write_store(
        out_path,
        (views, len(paths), *item_shape),
        chunks(),
        total=views * len(paths),
        description=description,
    )


def map_features(
    part: Any, store: FeatureStore, out_path: Path, *, batch_size: int = 64, description: str = "features"
) -> FeatureStore:
    """Apply a (frozen) model part to every stored item of every view, into a new store."""
    if out_path.exists():
        return FeatureStore(out_path)
    item_shape = tuple(int(d) for d in part.output.shape[1:])

    forward = inference_function(part)

    def chunks() -> Iterator[np.ndarray]:
        for view in range(store.views):
            for batch in store.batches(batch_size, view):
                yield np.asarray(forward(batch))

    return write_store(
        out_path,
        (store.views, store.n, *item_shape),
        chunks(),
        total=store.views * store.n,
        description=description,
    )


def score_images(
    model: Any, paths: Sequence[str], *, batch_size: int = 32, views: str = "none"
) -> np.ndarray:
    """Probabilities of the whole model over cached preprocessed images, averaged over the
    fixed test-time ``views`` (``augment.TEST_TIME_VIEWS``; "none": the image alone)."""
    forward = inference_function(model)
    size = int(model.input.shape[1])
    batches = _prefetched(lambda: image_batches(paths, 0, AugmentConfig(), 0, batch_size), size)
    scores = []
    with tqdm(total=len(paths), desc="scoring", unit="img") as bar:
        for batch in batches:
            per_view = [forward(view) for view in (batch, *extra_views(batch, views))]
            scores.append(np.mean([np.asarray(p, np.float32).reshape(-1) for p in per_view], axis=0))
            bar.update(len(batch))
    return np.concatenate(scores)


def feature_batches(
    store: FeatureStore,
    labels: np.ndarray,
    *,
    batch_size: int,
    shuffle: bool,
    seed: int,
    sample_weights: np.ndarray | None = None,
    targets: np.ndarray | None = None,
) -> Any:
    """A Keras PyDataset over a store: shuffled per epoch with one random view per image.

    ``targets`` (views, n) are soft targets per view (distillation): a batch's targets are then
    pairs ``(label, soft target of the view read)``, as ``model.compile_model(soft_targets=True)``
    expects.
    """
    import keras

    if targets is not None and targets.shape != (store.views, len(labels)):
        raise ValueError(f"targets of shape {targets.shape} for {store.views} views of {len(labels)} items")

    class FeatureBatches(keras.utils.PyDataset):
        def __init__(self) -> None:
            super().__init__()
            self.labels = labels.astype(np.float32)
            self.epoch = 0
            self.order = np.arange(len(labels))
            self.views = np.zeros(len(labels), dtype=int)
            self.on_epoch_end()

        def __len__(self) -> int:
            return math.ceil(len(self.labels) / batch_size)

        def __getitem__(self, index: int) -> tuple[np.ndarray, ...]:
            idx = np.sort(self.order[index * batch_size : (index + 1) * batch_size])
            x, y = store.read(idx, self.views[idx]), self.labels[idx]
            if targets is not None:
                y = np.stack([y, targets[self.views[idx], idx].astype(np.float32)], axis=-1)
            return (x, y) if sample_weights is None else (x, y, sample_weights[idx])

        def on_epoch_end(self) -> None:
            if shuffle:
                rng = np.random.default_rng([seed, self.epoch])
                self.order = rng.permutation(len(self.labels))
                self.views = rng.integers(0, store.views, size=len(self.labels))
            self.epoch += 1

    return FeatureBatches()


def bf16_supported() -> bool:
    """True where bfloat16 matmuls are fast: a GPU, or a CPU with AVX512-BF16 or AMX."""
    try:
        import tensorflow as tf

        if tf.config.list_physical_devices("GPU"):
            return True
    except ImportError:  # pragma: no cover - tensorflow is a dependency
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def reduced_precision_copy(model_cfg: Any, model: Any) -> Any:
    """The same model built under Keras' mixed_bfloat16 policy, with ``model``'s weights."""
    import keras

    from cxr_pneumonia.config import override
    from cxr_pneumonia.model import build_model

    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        fast = build_model(override(model_cfg, weights="none"))
    finally:
        keras.mixed_precision.set_global_policy(previous)
    fast.set_weights(model.get_weights())
    return fast
