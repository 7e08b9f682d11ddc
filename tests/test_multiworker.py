"""`train --strategy multiworker`: two worker processes on CPU (MultiWorkerMirroredStrategy from
TF_CONFIG), the feature pass sharded between them, one run directory written by the chief."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from cxr_pneumonia.augment import AugmentConfig
from cxr_pneumonia.features import FeatureStore, image_batches, write_store
from cxr_pneumonia.train import TrainingError, _Shard, _sharded, _tf_config_task

CHUNK = np.arange(2 * 10 * 3, dtype=np.float16).reshape(2, 10, 3)  # (views, items, features)


def _write_items(first: int, stop: int, path: Path) -> FeatureStore:
    chunks = iter([CHUNK[0, first:stop], CHUNK[1, first:stop]])
    return write_store(path, (2, stop - first, 3), chunks, total=0, description="")


def test_two_workers_shares_gather_into_the_one_workers_store(tmp_path):
    barrier = threading.Barrier(2, timeout=30)
    results, errors = {}, []

    def worker(index: int) -> None:
        try:
            store = _sharded(tmp_path / "train_split.npy", 10, _Shard(index, 2, barrier.wait), _write_items)
            results[index] = store.read(range(10), 1)
        except Exception as e:  # reported below: a thread's exception would be lost
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in (0, 1)]
    [t.start() for t in threads]
    [t.join(60) for t in threads]
    assert not errors
    store = FeatureStore(tmp_path / "train_split.npy")
    assert store.shape == (2, 10, 3)
    for view in (0, 1):
        assert np.array_equal(store.read(range(10), view), CHUNK[view].astype(np.float32))
    assert np.array_equal(results[0], results[1])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train_split.npy"]  # the shares are gone

    # A store that is there is read, not computed again (and no worker waits for another).
    never = _Shard(1, 2, lambda: pytest.fail("no barrier for a cached store"))
    assert _sharded(tmp_path / "train_split.npy", 10, never, None).n == 10


def test_a_shares_augmented_views_are_the_whole_lists(sample_dir, tmp_path):
    import cv2

    paths = []
    for i, source in enumerate(sorted((sample_dir / "train" / "NORMAL").iterdir())[:5]):
        image = cv2.resize(cv2.imread(str(source), cv2.IMREAD_GRAYSCALE), (32, 32))
        paths.append(str(tmp_path / f"{i}.png"))
        cv2.imwrite(paths[-1], image)
    whole = np.concatenate(list(image_batches(paths, 1, AugmentConfig(), 7, 2)))
    share = np.concatenate(list(image_batches(paths[2:5], 1, AugmentConfig(), 7, 2, first=2)))
    assert np.array_equal(share, whole[2:5]) and not np.array_equal(share, whole[0:3])


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        ({"cluster": {"worker": ["a:1", "b:2"]}, "task": {"type": "worker", "index": 1}}, (1, 2)),
        ({"cluster": {"chief": ["c:1"], "worker": ["a:1"]}, "task": {"type": "chief", "index": 0}}, (0, 2)),
        ({"cluster": {"chief": ["c:1"], "worker": ["a:1"]}, "task": {"type": "worker", "index": 0}}, (1, 2)),
    ],
)
def test_tf_config_names_the_worker_and_the_chief_comes_first(monkeypatch, config, expected):
    monkeypatch.setenv("TF_CONFIG", json.dumps(config))
    assert _tf_config_task() == expected


@pytest.mark.parametrize("raw", ["not json", json.dumps({"cluster": {"worker": ["a:1"]}}), '{"task": 3}'])
def test_a_broken_tf_config_is_one_line(monkeypatch, raw):
    monkeypatch.setenv("TF_CONFIG", raw)
    with pytest.raises(TrainingError, match="TF_CONFIG"):
        _tf_config_task()


def _free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("localhost", 0))
    ports = [s.getsockname()[1] for s in sockets]
    [s.close() for s in sockets]
    return ports


@pytest.mark.slow
def test_two_local_workers_train_one_run(sample_dir, tmp_path):
    """Two processes on this CPU: both finish, with the same weights, and only the chief's run
    directory exists, complete; the feature pass was split between them."""
    out, cache, scratch = tmp_path / "run", tmp_path / "cache", tmp_path / "scratch"
    scratch.mkdir()
    cluster = {"worker": [f"localhost:{port}" for port in _free_ports(2)]}
    command = [
        sys.executable, "-m", "cxr_pneumonia.cli", "train", str(sample_dir / "train"), "--out", str(out),
        # DenseNet121: at 32 px and random weights its features still vary between images (MobileNetV2's
        # vanish), so the workers' weights move and their equality means something.
        "--strategy", "multiworker", "--backbone", "densenet121", "--weights", "none", "--image-size", "32",
        # One head epoch: fit under the strategy as a fine-tuning epoch would be, at two thirds of the
        # CPU time (46 s for both workers against 66 s with a fine-tuning epoch too).
        "--epochs", "1", "--fine-tune-epochs", "0", "--augment-views", "1", "--no-fit-gate",
        "--precision", "fp32", "--cache-dir", str(cache), "--workers", "1",
    ]  # fmt: skip
    workers = []
    for index in (0, 1):
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "TMPDIR": str(scratch), "CUDA_VISIBLE_DEVICES": ""}
        env["TF_CONFIG"] = json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})
        workers.append(subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True))
    try:
        logs = [w.communicate(timeout=300)[1] for w in workers]
    finally:
        [w.kill() for w in workers if w.poll() is None]
    assert [w.returncode for w in workers] == [0, 0], logs[0][-3000:] + logs[1][-3000:]

    digests = [re.findall(r"worker (\d) of 2: final weights (\w+)", log) for log in logs]
    assert digests[0][0][0] == "0" and digests[1][0][0] == "1"
    assert digests[0][0][1] == digests[1][0][1]  # the replicas ended with the same variables
    shares = [re.findall(r"train_split.npy: items \[(\d+), (\d+)\) of (\d+)", log) for log in logs]
    (a, b, n), (c, d, m) = shares[0][0], shares[1][0]
    assert (int(a), int(b), int(c), int(d)) == (0, int(n) // 2, int(n) // 2, int(n)) and n == m

    assert sorted(p.parent.name for p in tmp_path.rglob("model.keras")) == ["run"]  # one run directory
    assert (out / "config.json").is_file() and not (out / "checkpoints").exists()
    assert json.loads((out / "config.json").read_text())["train"]["strategy"] == "multiworker"
    assert not list(scratch.glob("cxr-pneumonia-worker*"))  # the other worker's scratch folder is gone
    (store,) = [FeatureStore(p) for p in cache.rglob("train_split.npy")]
    assert store.shape[:2] == (2, int(n)) and not list(cache.rglob(".*shard*"))

    import keras

    from cxr_pneumonia.train import _weights_digest

    saved = keras.models.load_model(out / "model.keras", compile=False)
    assert _weights_digest(saved) == digests[0][0][1]
