"""params.yaml, loaded once into frozen, typed objects.

An unknown key, a key written twice, a missing key, a wrong type or an
impossible value stops before any work with one line naming the file, the
key, the value and what is allowed. The defaults live in params.yaml only:
no field here has one.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from petpipe.interpret.metric_table import PROMOTABLE
from petpipe.utils.devices import DEVICE_CHOICES, is_device_name
from petpipe.utils.yamlfile import DuplicateKeyError, YAMLError, parse_yaml

PositiveInt = Annotated[int, Field(gt=0)]
NonNegativeInt = Annotated[int, Field(ge=0)]
PositiveFloat = Annotated[float, Field(gt=0)]
Probability = Annotated[float, Field(ge=0, le=1)]


class ParamsError(ValueError):
    """A params.yaml problem, phrased for the person who edits the file."""


class _Section(BaseModel):
    # frozen: stages cannot change what was logged; forbid: a typo is an error,
    # not a silently ignored key; strict: "4" is not an epoch count.
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True, allow_inf_nan=False)


class DataParams(_Section):
    source: str
    checksum: str | None
    # For a URL list as source (petpipe/data/url_lists.py): downloads at a time, seconds per URL, megabytes per photo.
    download_workers: Annotated[int, Field(ge=1, le=256)]
    download_timeout: Annotated[float, Field(gt=0, le=3600)]
    download_max_mb: Annotated[float, Field(gt=0, le=4096)]

    @field_validator("checksum")
    @classmethod
    def _checksum_format(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"(md5|sha1|sha256):[0-9a-fA-F]+", value):
            raise ValueError("must be '<md5|sha1|sha256>:<hex digest>' or null")
        return value


class LabelParams(_Section):
    method: Literal["regex", "folder", "csv"]
    pattern: str
    csv: str | None
    corrections: Annotated[str, Field(min_length=1)]

    @field_validator("pattern")
    @classmethod
    def _pattern_has_group(cls, value: str) -> str:
        try:
            compiled = re.compile(value)
        except re.error as error:
            raise ValueError(f"is not a valid regular expression ({error})") from None
        if compiled.groups < 1:
            raise ValueError("needs a capture group, e.g. '^(.+)_\\d+\\.jpg$', whose match is the label")
        return value


class SplitParams(_Section):
    method: Literal["auto", "folders", "random", "file"]
    valid_pct: Annotated[float, Field(gt=0, lt=1)]
    test_pct: Annotated[float, Field(ge=0, lt=1)]
    seed: int
    file: str | None

    @model_validator(mode="after")
    def _train_keeps_a_share(self) -> SplitParams:
        if self.valid_pct + self.test_pct >= 1:
            raise ValueError(
                f"valid_pct ({self.valid_pct}) + test_pct ({self.test_pct}) must be below 1: "
                "the rest is the training split"
            )
        if self.method == "file" and self.file is None:
            raise ValueError("method file needs file: a path,split CSV (train, valid or test per image)")
        if self.method in ("folders", "random") and self.file is not None:
            raise ValueError(
                f"file ({self.file}) is read only with method file or auto; set it to null or method to file"
            )
        return self


class ModelParams(_Section):
    # Whether torchvision or timm knows the name is checked where the model is built (models.check_architecture):
    # loading params.yaml imports neither. Here only its shape: a name, not a path.
    arch: str
    weights: str
    img_size: Annotated[int, Field(ge=16, le=2048)]
    presize_ratio: Annotated[float, Field(ge=1.0, le=3.0)]
    eval_crop: Annotated[float, Field(gt=0, le=1)]
    head_hidden: PositiveInt
    head_dropout: Annotated[float, Field(ge=0, lt=1)]
    train_bn: bool

    @field_validator("arch")
    @classmethod
    def _arch_is_a_name(cls, value: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][\w.-]*", value):
            raise ValueError("must be a torchvision or timm model name, e.g. resnet34 or tf_efficientnet_lite0")
        return value


class AugmentParams(_Section):
    presize_crop: Literal["random", "center"]
    min_scale: Annotated[float, Field(gt=0, le=1)]
    max_aspect: Annotated[float, Field(ge=1, le=4)]
    flip: bool
    max_rotate: Annotated[float, Field(ge=0, le=180)]
    max_zoom: Annotated[float, Field(ge=1, le=4)]
    max_warp: Annotated[float, Field(ge=0, lt=1)]
    max_lighting: Annotated[float, Field(ge=0, lt=1)]
    p_affine: Probability
    p_lighting: Probability


class TrainParams(_Section):
    device: str
    precision: Literal["auto", "float32", "bfloat16"]
    memory_format: Literal["auto", "channels_last", "contiguous"]
    threads: NonNegativeInt
    deterministic: bool
    seed: int
    batch_size: PositiveInt
    decode_workers: NonNegativeInt
    weight_decay: Annotated[float, Field(ge=0)]
    class_weights: Literal["none", "balanced"]
    compile: bool
    augment: AugmentParams

    @field_validator("device")
    @classmethod
    def _device_name(cls, value: str) -> str:
        if not is_device_name(value):
            raise ValueError(f"must be {DEVICE_CHOICES}")
        return value


Schedule = Literal["one_cycle", "constant"]


class TrainHeadParams(_Section):
    epochs: PositiveInt
    lr: PositiveFloat
    schedule: Schedule
    cache_features: bool
    feature_views: Annotated[int, Field(ge=1, le=64)]


Suggestion = Literal["valley", "slide", "minimum", "steep", "edge"]


class LrFindParams(_Section):
    start_lr: PositiveFloat
    end_lr: PositiveFloat
    num_it: Annotated[int, Field(ge=5)]
    batch_size: NonNegativeInt
    stop_div: Annotated[float, Field(gt=1)]
    noise_window: NonNegativeInt
    noise_sigmas: Annotated[float, Field(ge=0)]
    suggestion: Suggestion
    fallback_lr: PositiveFloat
    size_ratio: Annotated[float, Field(gt=0, le=1)]

    @model_validator(mode="after")
    def _sweep_goes_up(self) -> LrFindParams:
        if self.end_lr <= self.start_lr:
            raise ValueError(f"end_lr ({self.end_lr}) must be greater than start_lr ({self.start_lr})")
        return self


class FinetuneParams(_Section):
    epochs: PositiveInt
    lr: PositiveFloat | Literal["auto"]

    @field_validator("lr", mode="wrap")
    @classmethod
    def _number_or_auto(cls, value: Any, handler: Any) -> float | str:
        # One readable error instead of pydantic's one-per-union-member.
        try:
            return handler(value)
        except ValidationError:
            raise ValueError("must be a positive number (e.g. 1.0e-4) or auto") from None

    lr_ratio: Annotated[float, Field(ge=1)]
    schedule: Schedule
    bn_stats: Literal["auto", "update", "frozen"]
    size_ratio: Annotated[float, Field(gt=0, le=1)]
    frozen_stride: Literal[0, 2, 4, 8, 16]


class AuditParams(_Section):
    enabled: bool
    folds: Annotated[int, Field(ge=2, le=50)]
    duplicate_similarity: Annotated[float, Field(gt=0, le=1)]


class EvaluateParams(_Section):
    checkpoint: Literal["finetune", "train-head"]
    top_losses: PositiveInt
    min_count: PositiveInt
    tta: bool


TrainedStage = Literal["train-head", "finetune"]


# evaluate's metrics that can elect a champion, and which way each is better: petpipe/interpret/metric_table.py.
PromoteMetric = Literal[PROMOTABLE]  # a tuple subscript: Literal["accuracy", ...]


class TrackingParams(_Section):
    experiment: Annotated[str, Field(min_length=1)]
    registered_model: Annotated[str, Field(min_length=1)] | None
    log_models: list[TrainedStage]
    promote: PromoteMetric | None


class Params(_Section):
    data: DataParams
    labels: LabelParams
    split: SplitParams
    model: ModelParams
    train: TrainParams
    train_head: TrainHeadParams
    lr_find: LrFindParams
    finetune: FinetuneParams
    evaluate: EvaluateParams
    audit: AuditParams
    tracking: TrackingParams

    def select(self, keys: tuple[str, ...]) -> dict[str, Any]:
        """The named sections or dotted keys as nested plain values: ("model.img_size", "split") ->
        {"model": {"img_size": 224}, "split": {...}}. What a stage records as the params it used."""
        chosen: dict[str, Any] = {}
        for dotted in keys:
            *parents, leaf = dotted.split(".")
            value: Any = self
            node = chosen
            for part in parents:
                value = getattr(value, part)
                node = node.setdefault(part, {})
            value = getattr(value, leaf)
            node[leaf] = value.model_dump() if isinstance(value, BaseModel) else value
        return chosen


# Settings that change how fast a stage runs, never what it writes: no stage declares them, so changing one
# on another machine reruns nothing (as the `tracking` section). Decoding is the same in any number of processes.
OUTPUT_NEUTRAL = frozenset({"train.decode_workers"})


def output_keys(section: str) -> tuple[str, ...]:
    """`section`'s dotted keys that can change a stage's outputs: all of them but OUTPUT_NEUTRAL's, in
    params.yaml's order. What a stage that depends on the whole section declares."""
    fields = Params.model_fields[section].annotation.model_fields
    return tuple(f"{section}.{name}" for name in fields if f"{section}.{name}" not in OUTPUT_NEUTRAL)


def _coerce_ints_to_floats(model: type[BaseModel], node: Any) -> Any:
    """Let `lr: 1` mean 1.0 where a float is expected, without loosening strict mode elsewhere."""
    if not isinstance(node, dict):
        return node
    result = dict(node)
    for name, field in model.model_fields.items():
        if name not in result:
            continue
        annotation = field.annotation
        value = result[name]
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            result[name] = _coerce_ints_to_floats(annotation, value)
        elif isinstance(value, int) and not isinstance(value, bool) and "float" in str(annotation):
            result[name] = float(value)
    return result


def _describe_error(path: Path, error: dict[str, Any]) -> str:
    key = ".".join(str(part) for part in error["loc"])
    kind = error["type"]
    if kind == "missing":
        return f"{path}: missing key '{key}'; add it (see the default params.yaml for its meaning)"
    if kind == "extra_forbidden":
        parent = error["loc"][:-1]
        allowed = _allowed_keys(parent)
        return f"{path}: unknown key '{key}'; allowed here: {', '.join(allowed)}"
    message = error["msg"].removeprefix("Value error, ")
    return f"{path}: {key} = {error.get('input')!r}: {message}"


def _allowed_keys(parent: tuple[Any, ...]) -> list[str]:
    model: type[BaseModel] = Params
    for part in parent:
        annotation = model.model_fields[str(part)].annotation
        assert isinstance(annotation, type) and issubclass(annotation, BaseModel)
        model = annotation
    return list(model.model_fields)


def with_overrides(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """A copy of a params mapping with dotted overrides applied: {"split.valid_pct": 0.3} (dvc exp run -S)."""
    merged = copy.deepcopy(base)
    for dotted, value in overrides.items():
        node = merged
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node[part]
        node[leaf] = value
    return merged


def parse_params(raw: Any, path: Path | str = "params.yaml") -> Params:
    """Validate an already-parsed params mapping; raise ParamsError with one line per problem."""
    path = Path(path)
    if not isinstance(raw, dict):
        raise ParamsError(f"{path}: expected a mapping of sections (data, labels, ...), got {type(raw).__name__}")
    raw = _coerce_ints_to_floats(Params, raw)
    try:
        return Params.model_validate(raw)
    except ValidationError as error:
        lines = [_describe_error(path, item) for item in error.errors(include_url=False)]
        raise ParamsError("\n".join(lines)) from None


def load_params(path: Path | str = "params.yaml") -> Params:
    """Read and validate params.yaml."""
    path = Path(path)
    return parse_params(read_params_file(path), path)


def read_params_file(path: Path) -> Any:
    """params.yaml as plain data, unvalidated: what load_params and tracking both read (one reader,
    so both refuse the same mistakes: a file not found, YAML tags, a key written twice)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ParamsError(f"{path}: file not found; run petpipe from the project folder or pass --params") from None
    try:
        return parse_yaml(text, str(path))
    except DuplicateKeyError as error:
        raise ParamsError(str(error)) from None
    except YAMLError as error:
        raise ParamsError(f"{path}: not valid YAML ({error})".replace("\n", " ")) from None
