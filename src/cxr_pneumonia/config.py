"""Config plumbing shared by every stage: dataclass <-> JSON, stable hashes, atomic writes.

Each stage owns its own frozen dataclass (``PreprocessConfig``, ``ModelConfig``, ...);
this module only knows how to save, load, hash and override them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

_UMASK = os.umask(0)
os.umask(_UMASK)


def to_dict(cfg: Any) -> dict[str, Any]:
    """A JSON-ready dict of a dataclass or a plain mapping (tuples become lists)."""
    values = dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else dict(cfg)
    return json.loads(json.dumps(values, default=str))


def from_dict(cls: type[T], values: Mapping[str, Any]) -> T:
    """Build ``cls`` from a dict, rejecting unknown keys and restoring tuples."""
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ValueError(f"unknown {cls.__name__} keys {unknown}; valid keys: {sorted(fields)}")
    kwargs = {}
    for name, value in values.items():
        default = getattr(cls, name, None) if not callable(getattr(cls, name, None)) else None
        kwargs[name] = tuple(value) if isinstance(value, list) and isinstance(default, tuple) else value
    return cls(**kwargs)


def override(cfg: T, **changes: Any) -> T:
    """A copy of ``cfg`` with the non-None ``changes`` applied (CLI flags left unset are None)."""
    return dataclasses.replace(cfg, **{k: v for k, v in changes.items() if v is not None})  # type: ignore[type-var]


def config_hash(cfg: Any) -> str:
    """A short stable hash of a config's values, used to key caches."""
    text = json.dumps(to_dict(cfg), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def file_sha256(path: Path, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write via a temp file in the same folder and rename, so readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; outputs are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path: Path, payload: Any) -> None:
    atomic_write_text(path, json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n")


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))
