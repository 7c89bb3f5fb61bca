"""The model reference file: which models exist and how to serve them.

Compatible with the old system's file (`{"org/model": {"gpus_per_replica": 2, "priority": 0}}`),
plus optional fields. Validated at startup; a bad file stops startup with an error naming the
file, the model and the field.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path
from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

# What a model id may look like: `name` or `org/name`, no spaces, no `..`, no shell characters.
MODEL_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}(/[A-Za-z0-9][A-Za-z0-9._-]{0,127})?$")


def valid_model_id(model_id: str) -> bool:
    return bool(MODEL_ID_PATTERN.match(model_id)) and ".." not in model_id


def _split_args(value: object) -> object:
    return shlex.split(value) if isinstance(value, str) else value


class Replicas(BaseModel):
    """How many engines a model runs at once. `max` bounds the scale-up under load; `min` is the
    floor kept while the model is hot (between its first request and its keep-hot expiry): the
    controller brings a hot model up to `min` replicas and scale-down never goes below it. A
    model with no traffic for its keep-hot time is stopped entirely, `min` included (unless it
    is pinned by priority); `min` 0 and 1 therefore behave alike. Default: today's one engine."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    min: int = Field(0, ge=0, le=64)
    max: int = Field(1, ge=1, le=64)

    @model_validator(mode="after")
    def _bounds(self) -> Replicas:
        if self.min > self.max:
            raise ValueError(f"replicas.min ({self.min}) must not exceed replicas.max ({self.max})")
        return self

    @property
    def floor(self) -> int:
        """Ready replicas a hot model keeps (at least the one serving it)."""
        return max(self.min, 1)


class ModelSpec(BaseModel):
    """One model of the reference file."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str
    gpus_per_replica: int = Field(1, ge=1, le=64)
    priority: int = Field(0, ge=0, le=100)
    keep_hot_seconds: float | None = Field(None, ge=0)
    # After the keep-hot time, keep the cluster up this long as a spare that a cold start of any
    # model that fits it swaps onto (providers that can swap only); None: the setting's value.
    spare_seconds: float | None = Field(None, ge=0)
    accelerators: tuple[str, ...] | None = None
    engine_args: Annotated[tuple[str, ...], BeforeValidator(_split_args)] = ()
    kind: Literal["chat", "completion", "embedding"] = "chat"
    path: str | None = None
    # The model's files in a weight store (s3://bucket/prefix/, gs://...), streamed to the GPUs by
    # vLLM's Run:ai streamer instead of a download from Hugging Face.
    weights_uri: str | None = Field(None, pattern=r"^(s3|gs)://[^/\s]+(/\S*)?$")
    max_model_len: int | None = Field(None, ge=1)
    endpoint: str | None = None
    replicas: Replicas = Replicas()
    # Scale-up when (in flight + waiting) per ready replica stays above this; scale-down when
    # the replicas left after removing one would stay at or below it.
    target_in_flight_per_replica: float = Field(8.0, gt=0)
    # How long the load must stay above / below the target; None: the settings' value.
    scale_up_seconds: float | None = Field(None, ge=0)
    scale_down_seconds: float | None = Field(None, ge=0)

    @field_validator("id")
    @classmethod
    def _id(cls, v: str) -> str:
        if not valid_model_id(v):
            raise ValueError("model id must be `name` or `org/name` of letters, digits, `.`, `_`, `-`")
        return v

    @field_validator("endpoint")
    @classmethod
    def _endpoint(cls, v: str | None) -> str | None:
        if v is None:
            return None
        if not re.match(r"^https?://[^/\s]+", v):
            raise ValueError("endpoint must be an http(s) URL")
        v = v.rstrip("/")
        return v[: -len("/v1")] if v.endswith("/v1") else v

    @property
    def external(self) -> bool:
        """Served by an always-on server elsewhere: never launched or stopped by the gateway."""
        return self.endpoint is not None

    def engine_argv(self) -> tuple[str, ...]:
        args = self.engine_args
        if self.max_model_len is not None and "--max-model-len" not in args:
            args = (*args, "--max-model-len", str(self.max_model_len))
        return args


class ReferenceError(ValueError):
    """The reference file cannot be used; the message names the file, model and field."""


def parse_reference(data: object, *, source: str, base_dir: Path | None = None) -> dict[str, ModelSpec]:
    if not isinstance(data, dict):
        raise ReferenceError(f"{source}: expected a JSON object mapping model ids to settings")
    specs: dict[str, ModelSpec] = {}
    for model_id, entry in data.items():
        if entry is None:
            entry = {}
        if not isinstance(entry, dict):
            raise ReferenceError(
                f"{source}: model {model_id!r}: expected an object, got {type(entry).__name__}"
            )
        try:
            spec = ModelSpec.model_validate({**entry, "id": model_id})
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "(entry)"
            raise ReferenceError(f"{source}: model {model_id!r}: field {where!r}: {first['msg']}") from exc
        if spec.path and base_dir is not None and not Path(spec.path).is_absolute():
            spec = spec.model_copy(update={"path": str((base_dir / spec.path).resolve())})
        specs[model_id] = spec
    return specs


def load_reference(path: Path) -> dict[str, ModelSpec]:
    try:
        text = path.read_text()
    except OSError as exc:
        raise ReferenceError(f"{path}: cannot read the model reference file: {exc.strerror}") from exc
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ReferenceError(
            f"{path}: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}"
        ) from exc
    return parse_reference(data, source=str(path), base_dir=path.resolve().parent)


# Fields an admin may override at run time (kept across reloads of the reference file).
OVERRIDABLE = frozenset({"priority", "keep_hot_seconds"})


class Catalog:
    """The models the gateway serves: the reference file with admin overrides applied, plus
    unlisted ids when allowed. `specs` is rebuilt on change, so lookups stay dict reads."""

    def __init__(
        self,
        specs: dict[str, ModelSpec],
        *,
        allow_unlisted: bool = False,
        overrides: dict[str, dict[str, object]] | None = None,
    ) -> None:
        self.allow_unlisted = allow_unlisted
        self.reference = specs  # as in the file
        self.overrides: dict[str, dict[str, object]] = {k: dict(v) for k, v in (overrides or {}).items()}
        self.specs: dict[str, ModelSpec] = {}
        self._rebuild()

    def _rebuild(self) -> None:
        self.specs = {mid: self._apply(spec) for mid, spec in self.reference.items()}

    def _apply(self, spec: ModelSpec) -> ModelSpec:
        changes = self.overrides.get(spec.id)
        return spec.model_copy(update=changes) if changes else spec

    def resolve(self, model_id: str) -> ModelSpec | None:
        spec = self.specs.get(model_id)
        if spec is not None:
            return spec
        if self.allow_unlisted and valid_model_id(model_id):
            return self._apply(ModelSpec(id=model_id))
        return None

    def set_override(self, model_id: str, **fields: object) -> None:
        """Set (or, with None, clear) overridable fields of a model."""
        unknown = set(fields) - OVERRIDABLE
        if unknown:
            raise ValueError(f"not overridable: {', '.join(sorted(unknown))}")
        current = self.overrides.setdefault(model_id, {})
        for key, value in fields.items():
            if value is None:
                current.pop(key, None)
            else:
                current[key] = value
        if not current:
            del self.overrides[model_id]
        self._rebuild()

    def load_overrides(self, overrides: dict[str, dict[str, object]]) -> None:
        self.overrides = {k: dict(v) for k, v in overrides.items()}
        self._rebuild()

    def replace_reference(self, specs: dict[str, ModelSpec]) -> None:
        self.reference = specs
        self._rebuild()
