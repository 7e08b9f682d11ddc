"""How many CPU cores a process may use, and holding its numeric libraries to a share of them.

Used by the processes that split one machine between several models (``serve --workers N``,
the actors of ``predict --engine ray``). Imports no model code, so that the limits can be set
before TensorFlow starts.
"""

from __future__ import annotations

import logging
import os

__all__ = ["available_cores", "limit_threads"]

log = logging.getLogger(__name__)


def available_cores() -> int:
    """The CPU cores this process may run on (its affinity mask, e.g. a container's share)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def limit_threads(threads: int) -> None:
    """Hold this process's model and image code to ``threads`` CPU threads; call before loading.

    N processes that each spread every operation over all cores fight for them
    (oversubscription: more threads than cores, each slowed by the others), so each gets
    cores / N. TensorFlow's pools are process-wide and fixed once it has run an op (hence the
    environment too); OpenVINO takes its count when the export is compiled (``Run.load(threads=)``,
    unpinned: see ``export.compile_segments``); OpenCV's pool serves decoding and preprocessing.
    """
    import cv2

    for name in ("OMP_NUM_THREADS", "TF_NUM_INTRAOP_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[name] = str(threads)
    # Inference is one chain of ops: a second inter-op thread would only compete for a core.
    os.environ["TF_NUM_INTEROP_THREADS"] = "1"
    cv2.setNumThreads(threads)
    try:
        import tensorflow as tf

        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(1)
    except ImportError:
        pass
    except RuntimeError as e:  # TensorFlow already ran something in this process
        log.warning("TensorFlow's thread pools are already set up and stay as they are (%s)", e)
