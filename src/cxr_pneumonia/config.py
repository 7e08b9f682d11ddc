"""Config plumbing shared by every stage: validated config models, JSON, stable hashes, atomic writes.

Each stage owns its config (``PreprocessConfig``, ``ModelConfig``, ``TrainConfig`` ...), a
:class:`StageConfig`: a frozen pydantic model that refuses unknown keys and checks every value
when it is built, so a typo fails before any image is read. A wrong value raises
:class:`ConfigError` with a one-line message naming the field and, for a choice, the allowed values.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, TypeVar

from pydantic import BaseModel, BeforeValidator, ConfigDict, ValidationError

T = TypeVar("T")

_UMASK = os.umask(0)
os.umask(_UMASK)


class ConfigError(ValueError):
    """A config value is invalid; the message is one line naming the field.

    ``problems`` holds ``(field, what is wrong)`` pairs (field "" for a check across fields).
    """

    def __init__(self, message: str, problems: tuple[tuple[str, str], ...] = ()) -> None:
        super().__init__(message)
        self.problems = problems or (("", message),)


def _field_choices(cls: type[BaseModel], loc: tuple[Any, ...]) -> tuple[Any, ...] | None:
    """The ``Literal`` values allowed at ``loc`` of ``cls`` (None when the field is no choice)."""
    annotation: Any = cls
    for part in loc:
        if isinstance(part, int):  # an item of a tuple field: its element type
            annotation = (typing.get_args(annotation) or (None,))[0]
            continue
        fields = getattr(annotation, "model_fields", None)
        if fields is None or part not in fields:
            return None
        annotation = fields[part].annotation
    args = [annotation]
    while args:  # unwrap Optional[...] / unions down to the Literal
        current = args.pop()
        if typing.get_origin(current) is typing.Literal:
            return typing.get_args(current)
        args.extend(typing.get_args(current))
    return None


def _problems(cls: type[BaseModel], error: Any) -> list[tuple[str, str]]:
    """``(field, what is wrong)`` for one pydantic error."""
    loc = tuple(error["loc"])
    field = ".".join(str(part) for part in loc if isinstance(part, str))
    nested = (error.get("ctx") or {}).get("error")
    if isinstance(nested, ConfigError):  # a nested config's own check
        return [(".".join(filter(None, (field, f))), text) for f, text in nested.problems]
    got = error.get("input")
    if error["type"] == "extra_forbidden":
        return [(field, f"unknown key; valid keys of {cls.__name__}: {', '.join(cls.model_fields)}")]
    choices = _field_choices(cls, loc)
    if error["type"] == "literal_error" and choices:
        return [(field, f"must be one of {', '.join(map(repr, choices))} (got {got!r})")]
    message = str(error["msg"]).removeprefix("Value error, ")
    if not field:  # a check across fields: its message names them
        return [("", message)]
    return [(field, f"{message[:1].lower()}{message[1:]} (got {got!r})")]


def config_error(cls: type[BaseModel], error: ValidationError) -> ConfigError:
    """A pydantic ``ValidationError`` as a :class:`ConfigError` with a one-line message."""
    problems = tuple(p for e in error.errors() for p in _problems(cls, e))
    message = "; ".join(f"{field}: {text}" if field else text for field, text in problems)
    return ConfigError(message, problems)


class StageConfig(BaseModel):
    """Base of every stage config: frozen, unknown keys refused, values checked when built.

    ``cli_fields`` names the fields the command line exposes as options (help from each
    field's ``description``).
    """

    model_config = ConfigDict(frozen=True, extra="forbid", validate_default=True)
    cli_fields: ClassVar[tuple[str, ...]] = ()

    def __init__(self, **values: Any) -> None:
        try:
            super().__init__(**values)
        except ValidationError as e:
            raise config_error(type(self), e) from None


def _json_default(value: Any) -> Any:
    return value.model_dump(mode="json") if isinstance(value, BaseModel) else str(value)


def to_dict(cfg: Any) -> dict[str, Any]:
    """A JSON-ready dict of a config model, a dataclass or a plain mapping (tuples become lists)."""
    if isinstance(cfg, BaseModel):
        return cfg.model_dump(mode="json")
    values = dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else dict(cfg)
    return json.loads(json.dumps(values, default=_json_default))


def from_dict(cls: type[T], values: Mapping[str, Any]) -> T:
    """Build ``cls`` from a dict (e.g. a saved config.json section), rejecting unknown keys."""
    if isinstance(cls, type) and issubclass(cls, BaseModel):
        try:
            return cls.model_validate(dict(values))  # type: ignore[return-value]
        except ValidationError as e:
            raise config_error(cls, e) from None
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
    """A validated copy of ``cfg`` with the non-None ``changes`` applied (unset CLI flags are None).

    Unknown names and invalid values raise :class:`ConfigError`.
    """
    changes = {k: v for k, v in changes.items() if v is not None}
    if not changes:
        return cfg
    if isinstance(cfg, BaseModel):
        return from_dict(type(cfg), {**cfg.model_dump(), **changes})
    return dataclasses.replace(cfg, **changes)  # type: ignore[type-var]


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


def file_sha256_or_none(path: Path) -> str | None:
    """:func:`file_sha256`, or None when the file cannot be read (no read permission, gone): one
    such file must not stop a batch; reading it for the image fails again and names it."""
    try:
        return file_sha256(path)
    except OSError:
        return None


def one_line(e: BaseException) -> str:
    """An exception's message on one line (pydantic's, protobuf's and OpenVINO's span several),
    or its type's name when it has none: for the one-line errors that name a file."""
    return " ".join(str(e).split()) or type(e).__name__


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
    atomic_write_text(path, json.dumps(payload, indent=2, sort_keys=True, default=_json_default) + "\n")


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


# --- the one precision vocabulary (training's feature pass and export) ----------------------

_OLD_PRECISION_WORDS = {"float32": "fp32", "bfloat16": "bf16"}  # what runs saved before


def _precision_alias(value: Any) -> Any:
    return _OLD_PRECISION_WORDS.get(value, value) if isinstance(value, str) else value


Precision = Annotated[Literal["auto", "fp32", "bf16"], BeforeValidator(_precision_alias)]


def default_cache_dir() -> Path:
    """Where caches live unless a stage is given one: $CXR_PNEUMONIA_CACHE_DIR, else $XDG_CACHE_HOME,
    else ~/.cache (each with a cxr-pneumonia folder)."""
    base = os.environ.get("CXR_PNEUMONIA_CACHE_DIR") or os.environ.get("XDG_CACHE_HOME")
    return Path(base) / "cxr-pneumonia" if base else Path.home() / ".cache" / "cxr-pneumonia"
