"""Property tests (hypothesis): label extraction from file names, and params.yaml validation.

Each property is checked on a few dozen generated examples (max_examples is kept small so the
suite stays fast on two cores); a failure prints the smallest example that breaks it.
"""

from __future__ import annotations

import math
import string
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import default_params
from petpipe.data import image_index
from petpipe.params import ParamsError, parse_params, with_overrides
from petpipe.utils.yamlfile import parse_yaml

pytestmark = pytest.mark.fast  # `make test-fast`: no training, no dvc repro

DEFAULT_PATTERN = image_index.compile_label_pattern(default_params()["labels"]["pattern"])
EXTENSIONS = ["jpg", "jpeg", "png", "bmp", "gif", "webp", "tif", "tiff"]
FEW = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Breed names as the tutorial's files have them: letters and underscores (no digits).
breeds = st.text(alphabet=string.ascii_letters + "_", min_size=1, max_size=30).filter(lambda name: name.strip("_"))
numbers = st.integers(min_value=0, max_value=10**9).map(str) | st.from_regex(r"0[0-9]{1,5}", fullmatch=True)
extensions = st.sampled_from(EXTENSIONS).flatmap(lambda ext: st.sampled_from([ext, ext.upper(), ext.title()]))


# ---------------------------------------------------------------- labels


@FEW
@given(breed=breeds, number=numbers, extension=extensions)
def test_breed_number_extension_gives_the_breed(breed, number, extension):
    name = f"{breed}_{number}.{extension}"
    assert image_index.label_from_name(name, DEFAULT_PATTERN) == breed


@FEW
@given(
    folder=st.text(alphabet=string.ascii_letters + " éü_-", min_size=1, max_size=12).filter(str.strip),
    breed=breeds,
    number=numbers,
)
def test_the_folder_never_changes_the_label(folder, breed, number):
    relative = f"{folder.strip()}/{breed}_{number}.jpg"
    assert image_index.labels_from_regex([relative], DEFAULT_PATTERN) == {relative: breed}


@FEW
@given(
    breed=breeds,
    number=numbers,
    extension=extensions,
    break_it=st.sampled_from(
        [
            "no number",
            "no underscore",
            "no breed",
            "no extension",
            "other extension",
            "letters in the number",
            "suffix after the extension",
        ]
    ),
)
def test_names_not_of_the_form_breed_number_extension_have_no_label(breed, number, extension, break_it):
    name = {
        "no number": f"{breed}.{extension}",
        "no underscore": f"{breed.rstrip('_')}{number}.{extension}",
        "no breed": f"_{number}.{extension}",
        "no extension": f"{breed}_{number}",
        "other extension": f"{breed}_{number}.txt",
        "letters in the number": f"{breed}_{number}x.{extension}",
        "suffix after the extension": f"{breed}_{number}.{extension}.bak",
    }[break_it]
    assert image_index.label_from_name(name, DEFAULT_PATTERN) is None, name


@FEW
@given(name=st.text(max_size=60))
def test_any_name_gives_a_label_or_none_never_an_error(name):
    label = image_index.label_from_name(name, DEFAULT_PATTERN)
    assert label is None or (label and name.startswith(label))


# ---------------------------------------------------------------- params


# A timm model the machine has (validated without building it); the default resnet34 works too.
DEFAULTS = with_overrides(default_params(), {"model.arch": "tf_efficientnet_lite0"})
# Every scalar key, with values of the wrong type and values of the right type out of range.
# Wrong types are spelled as YAML would hand them over: "4" (quoted), 4.5, true, null, [4], {a: 1}.
A_LIST, A_MAPPING = [1], {"a": 1}
POSITIVE_INT = {"wrong": ["4", 4.5, True, None, A_LIST], "out": [0, -1, -(10**6)]}
POSITIVE_FLOAT = {"wrong": ["fast", True, None, A_LIST, A_MAPPING], "out": [0.0, -1e-3, -5, math.nan]}
BOOL = {"wrong": [1, 0, "yes", "true", None, A_LIST], "out": []}
TEXT = {"wrong": [4, 4.5, True, None, A_LIST, A_MAPPING], "out": []}
OPTIONAL_TEXT = {"wrong": [4, 4.5, True, A_LIST, A_MAPPING], "out": []}
SPEC: dict[str, dict[str, list[Any]]] = {
    "data.source": TEXT,
    "data.checksum": {"wrong": [4, True, A_LIST], "out": ["md5", "crc32:abcd", "md5:xyz", "sha256:"]},
    "data.download_workers": {**POSITIVE_INT, "out": [0, -1, 257, 10**6]},
    "data.download_timeout": {**POSITIVE_FLOAT, "out": [0.0, -1, 3601, math.inf, math.nan]},
    "data.download_max_mb": {**POSITIVE_FLOAT, "out": [0.0, -1e-3, 4097, math.nan]},
    "labels.method": {"wrong": [1, None, A_LIST], "out": ["regexp", "Folder", "", "filename"]},
    "labels.pattern": {"wrong": [1, None, A_LIST], "out": ["no group", "(unclosed", "^[a-z]+$", "*"]},
    "labels.csv": OPTIONAL_TEXT,
    "labels.corrections": {"wrong": [4, 4.5, True, None, A_LIST, A_MAPPING], "out": [""]},
    "split.method": {"wrong": [1, None, A_LIST], "out": ["folder", "Folders", "hash", ""]},
    "split.valid_pct": {"wrong": ["a fifth", True, None, A_LIST], "out": [0.0, 1.0, 1.5, -0.2, math.nan, 20]},
    # 0.8 and 0.9: valid_pct (0.2) + test_pct >= 1 leaves no training split
    "split.test_pct": {"wrong": ["none", True, None, A_LIST], "out": [-0.1, 1.0, 0.8, 0.9, math.nan]},
    "split.seed": {"wrong": ["42", 4.2, True, None, A_LIST], "out": []},
    "split.file": OPTIONAL_TEXT,
    # A name torchvision and timm do not know (resnet35) is refused where the model is built: tests/test_layers.py.
    "model.arch": {"wrong": [34, None, A_LIST], "out": ["", "../../etc/passwd", "resnet 34", "-resnet34"]},
    "model.weights": TEXT,
    "model.img_size": {"wrong": ["224", 224.5, True, None], "out": [0, 15, -224, 4096]},
    "model.presize_ratio": {"wrong": ["big", True, None], "out": [0.5, 0.99, 3.5, -1.0, math.nan]},
    "model.eval_crop": {"wrong": ["all", True, None], "out": [0.0, 1.01, -0.5, math.nan]},
    "model.head_hidden": POSITIVE_INT,
    "model.head_dropout": {"wrong": ["half", True, None], "out": [1.0, 1.5, -0.1, math.nan]},
    "model.train_bn": BOOL,
    "train.device": {"wrong": [0, None, A_LIST], "out": ["gpu", "cuda:x", "tpu", "", "cpu "]},
    "train.precision": {"wrong": [32, True, None, A_LIST], "out": ["fp16", "float16", "half", "bf16", ""]},
    "train.memory_format": {"wrong": [1, True, None, A_LIST], "out": ["nhwc", "channels_first", ""]},
    "train.threads": {"wrong": ["2", 1.5, True, None], "out": [-1, -8]},
    "train.deterministic": BOOL,
    "train.seed": {"wrong": ["42", 4.2, True, None], "out": []},
    "train.batch_size": POSITIVE_INT,
    "train.decode_workers": {"wrong": ["0", 1.5, True, None], "out": [-1, -8]},
    "train.weight_decay": {"wrong": ["none", True, None, A_LIST], "out": [-0.01, -1, math.nan]},
    "train.class_weights": {"wrong": [1, True, None, A_LIST], "out": ["balance", "Balanced", "inverse", ""]},
    "train.compile": BOOL,
    "train.augment.presize_crop": {"wrong": [1, True, None, A_LIST], "out": ["centre", "Random", ""]},
    "train.augment.min_scale": {"wrong": ["most", True, None], "out": [0.0, 1.01, -0.5, math.nan]},
    "train.augment.max_aspect": {"wrong": ["square", True, None], "out": [0.99, 0.5, 4.5, math.nan]},
    "train.augment.flip": BOOL,
    "train.augment.max_rotate": {"wrong": ["ten", True, None], "out": [-1.0, 181.0, 360, math.nan]},
    "train.augment.max_zoom": {"wrong": ["1.1x", True, None], "out": [0.9, 4.5, -1, math.nan]},
    "train.augment.max_warp": {"wrong": ["some", True, None], "out": [1.0, -0.1, 2, math.nan]},
    "train.augment.max_lighting": {"wrong": ["dim", True, None], "out": [1.0, -0.1, 2, math.nan]},
    "train.augment.p_affine": {"wrong": ["often", True, None], "out": [1.1, -0.1, 75, math.nan]},
    "train.augment.p_lighting": {"wrong": ["often", True, None], "out": [1.1, -0.1, 75, math.nan]},
    "train_head.epochs": POSITIVE_INT,
    "train_head.lr": POSITIVE_FLOAT,
    "train_head.schedule": {"wrong": [1, None, A_LIST], "out": ["onecycle", "cosine", ""]},
    "train_head.cache_features": BOOL,
    "train_head.feature_views": {"wrong": ["4", 4.5, True, None], "out": [0, -1, 65]},
    "lr_find.start_lr": POSITIVE_FLOAT,
    "lr_find.end_lr": {"wrong": ["ten", True, None], "out": [0.0, -10, 1e-8, math.nan]},  # 1e-8 < start_lr
    "lr_find.num_it": {"wrong": ["100", 100.5, True, None], "out": [4, 0, -100]},
    "lr_find.batch_size": {"wrong": ["16", 16.5, True, None], "out": [-1, -16]},
    "lr_find.stop_div": {"wrong": ["four", True, None], "out": [1.0, 0.5, -4, math.nan]},
    "lr_find.suggestion": {"wrong": [1, None, A_LIST], "out": ["best", "Valley", ""]},
    "lr_find.noise_window": {"wrong": ["20", 20.5, True, None], "out": [-1, -20]},
    "lr_find.noise_sigmas": {"wrong": ["three", True, None], "out": [-0.1, -3, math.nan]},
    "lr_find.fallback_lr": POSITIVE_FLOAT,
    "lr_find.size_ratio": {"wrong": ["0.7", True, None], "out": [0.0, -0.5, 1.5, math.nan]},
    "finetune.epochs": POSITIVE_INT,
    "finetune.lr": {"wrong": [True, None, A_LIST, A_MAPPING], "out": ["Auto", "automatic", 0.0, -1e-4, math.nan]},
    "finetune.lr_ratio": {"wrong": ["100", True, None], "out": [0.5, 0, -100, math.nan]},
    "finetune.schedule": {"wrong": [1, None], "out": ["fit", ""]},
    "finetune.bn_stats": {"wrong": [True, 1, None], "out": ["train", "eval", ""]},
    "finetune.size_ratio": {"wrong": ["0.8", True, None], "out": [0.0, -0.8, 1.25, math.nan]},
    "finetune.frozen_stride": {"wrong": ["8", True, None, A_LIST], "out": [1, 3, 32, -8, 8.5]},
    "evaluate.checkpoint": {"wrong": [1, None, A_LIST], "out": ["train_head", "lr-find", ""]},
    "evaluate.top_losses": POSITIVE_INT,
    "evaluate.min_count": POSITIVE_INT,
    "evaluate.tta": BOOL,
    "audit.enabled": BOOL,
    "audit.folds": {"wrong": ["5", 5.5, True, None, A_LIST], "out": [1, 0, -5, 51]},
    "audit.duplicate_similarity": {"wrong": ["high", True, None, A_LIST], "out": [0.0, -0.5, 1.01, 95, math.nan]},
    "tracking.experiment": {"wrong": [1, None, A_LIST], "out": [""]},
    "tracking.registered_model": {"wrong": [1, True, A_LIST], "out": [""]},
    "tracking.log_models": {"wrong": ["finetune", None, 1, A_MAPPING], "out": [["evaluate"], ["fetch"], [1]]},
    "tracking.promote": {"wrong": [1, True, A_LIST], "out": ["precision", "Accuracy", ""]},
}


def leaf_keys(node: dict[str, Any], prefix: str = "") -> list[str]:
    keys = []
    for key, value in node.items():
        keys += leaf_keys(value, f"{prefix}{key}.") if isinstance(value, dict) else [f"{prefix}{key}"]
    return keys


def names_the_key(message: str, key: str) -> bool:
    """`train.augment.flip = ...`, or for a rule across keys `lr_find = {...}: end_lr (...) must ...`."""
    section, leaf = key.rsplit(".", 1)
    return message.startswith("params.yaml: ") and (key in message or (section in message and leaf in message))


def test_the_spec_covers_every_key_of_params_yaml():
    missing, gone = sorted(set(leaf_keys(DEFAULTS)) - set(SPEC)), sorted(set(SPEC) - set(leaf_keys(DEFAULTS)))
    assert not missing, f"params.yaml keys without wrong/out-of-range values in SPEC: {missing}; add them"
    assert not gone, f"SPEC names keys params.yaml no longer has: {gone}"
    parse_params(DEFAULTS)  # and the defaults themselves parse


def test_every_wrong_type_and_impossible_value_in_the_table_is_refused_naming_the_key():
    tried, not_refused, unnamed = 0, [], []
    for key, values in SPEC.items():
        for value in values["wrong"] + values["out"]:
            tried += 1
            try:
                parse_params(with_overrides(DEFAULTS, {key: value}))
            except ParamsError as error:
                if not names_the_key(str(error), key):
                    unnamed.append((key, value, str(error)))
            else:
                not_refused.append((key, value))
    assert tried > 300 and not_refused == [] and unnamed == []


# Numeric keys: (integer?, lowest allowed, is the lowest itself allowed, highest allowed, is it allowed).
BOUNDS: dict[str, tuple[bool, float, bool, float | None, bool]] = {
    "data.download_workers": (True, 1, True, 256, True),
    "data.download_timeout": (False, 0, False, 3600, True),
    "data.download_max_mb": (False, 0, False, 4096, True),
    "split.valid_pct": (False, 0, False, 1, False),
    "model.img_size": (True, 16, True, 2048, True),
    "model.presize_ratio": (False, 1, True, 3, True),
    "model.eval_crop": (False, 0, False, 1, True),
    "model.head_hidden": (True, 1, True, None, True),
    "model.head_dropout": (False, 0, True, 1, False),
    "train.batch_size": (True, 1, True, None, True),
    "train.decode_workers": (True, 0, True, None, True),
    "train.threads": (True, 0, True, None, True),
    "train.weight_decay": (False, 0, True, None, True),
    "train.augment.min_scale": (False, 0, False, 1, True),
    "train.augment.max_rotate": (False, 0, True, 180, True),
    "train.augment.max_zoom": (False, 1, True, 4, True),
    "train.augment.max_aspect": (False, 1, True, 4, True),
    "train.augment.max_warp": (False, 0, True, 1, False),
    "train.augment.max_lighting": (False, 0, True, 1, False),
    "train.augment.p_affine": (False, 0, True, 1, True),
    "train.augment.p_lighting": (False, 0, True, 1, True),
    "train_head.epochs": (True, 1, True, None, True),
    "train_head.lr": (False, 0, False, None, True),
    "train_head.feature_views": (True, 1, True, 64, True),
    "lr_find.batch_size": (True, 0, True, None, True),
    "lr_find.num_it": (True, 5, True, None, True),
    "lr_find.stop_div": (False, 1, False, None, True),
    "lr_find.noise_window": (True, 0, True, None, True),
    "lr_find.noise_sigmas": (False, 0, True, None, True),
    "finetune.epochs": (True, 1, True, None, True),
    "finetune.lr": (False, 0, False, None, True),
    "finetune.lr_ratio": (False, 1, True, None, True),
    "evaluate.top_losses": (True, 1, True, None, True),
    "evaluate.min_count": (True, 1, True, None, True),
    "audit.folds": (True, 2, True, 50, True),
    "audit.duplicate_similarity": (False, 0, False, 1, True),
}


def outside(key: str) -> st.SearchStrategy[float | int]:
    integer, low, low_allowed, high, high_allowed = BOUNDS[key]
    if integer:
        below = st.integers(max_value=int(low) - 1, min_value=-(10**12))
        return below if high is None else below | st.integers(min_value=int(high) + 1, max_value=10**12)
    below = st.floats(max_value=low, exclude_max=low_allowed, min_value=-1e12)
    above = st.floats(min_value=high, exclude_min=high_allowed, max_value=1e12) if high is not None else st.nothing()
    return below | above


def inside(key: str) -> st.SearchStrategy[float | int]:
    integer, low, low_allowed, high, high_allowed = BOUNDS[key]
    top = high if high is not None else (10**6 if integer else 1e6)
    if integer:
        return st.integers(min_value=int(low), max_value=int(top))
    return st.floats(min_value=low, exclude_min=not low_allowed, max_value=top, exclude_max=not high_allowed)


@FEW
@given(change=st.sampled_from(sorted(BOUNDS)).flatmap(lambda key: st.tuples(st.just(key), outside(key))))
def test_a_number_outside_its_range_is_refused_naming_the_key(change):
    key, value = change
    with pytest.raises(ParamsError) as refused:
        parse_params(with_overrides(DEFAULTS, {key: value}))
    assert names_the_key(str(refused.value), key), str(refused.value)


@FEW
@given(values=st.fixed_dictionaries({key: inside(key) for key in BOUNDS}))
def test_numbers_inside_their_ranges_all_parse_to_themselves(values):
    params = parse_params(with_overrides(DEFAULTS, values))
    for key, value in values.items():
        section, *rest = key.split(".")
        node: Any = getattr(params, section)
        for part in rest:
            node = getattr(node, part)
        assert node == value and (type(node) is int) == BOUNDS[key][0], (key, node, value)


@FEW
@given(
    key=st.sampled_from(sorted(SPEC)),
    value=st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text(max_size=20)
    | st.lists(st.integers(), max_size=3)
    | st.dictionaries(st.text(max_size=5), st.integers(), max_size=2),
)
def test_any_value_anywhere_parses_or_is_refused_never_crashes(key, value):
    try:
        parse_params(with_overrides(DEFAULTS, {key: value}))
    except ParamsError as error:
        assert names_the_key(str(error), key), str(error)


@FEW
@given(
    section=st.sampled_from(sorted(DEFAULTS)),
    extra=st.text(alphabet=string.ascii_lowercase + "_", min_size=1, max_size=12),
)
def test_an_unknown_key_is_refused_with_the_keys_allowed(section, extra):
    if extra in DEFAULTS[section]:
        return
    raw = with_overrides(DEFAULTS, {f"{section}.{extra}": 1})
    with pytest.raises(ParamsError, match=f"unknown key '{section}.{extra}'; allowed here: "):
        parse_params(raw)


@FEW
@given(
    # "1e-3" is how people write it (YAML 1.1 read a string); read from YAML as DVC reads it, a number.
    lr=st.floats(min_value=1e-8, max_value=10.0)
    | st.sampled_from(["1e-3", "3.0e-4", "5E-5"]).map(lambda text: parse_yaml(f"lr: {text}", "params.yaml")["lr"]),
    finetune_lr=st.floats(min_value=1e-8, max_value=1.0) | st.just("auto"),
    device=st.sampled_from(["auto", "cpu", "cuda", "cuda:0", "cuda:7", "mps"]),
    seed=st.integers(min_value=-(2**31), max_value=2**63),
    start_lr=st.floats(min_value=1e-9, max_value=1e-2),
    end_lr=st.floats(min_value=0.1, max_value=100.0),
)
def test_other_valid_values_parse(lr, finetune_lr, device, seed, start_lr, end_lr):
    changes = {
        "train_head.lr": lr,
        "finetune.lr": finetune_lr,
        "train.device": device,
        "train.seed": seed,
        "lr_find.start_lr": start_lr,
        "lr_find.end_lr": end_lr,
    }
    params = parse_params(with_overrides(DEFAULTS, changes))
    assert params.train_head.lr == lr and isinstance(params.train_head.lr, float)
    assert params.finetune.lr == finetune_lr and params.train.device == device and params.train.seed == seed
    assert (params.lr_find.start_lr, params.lr_find.end_lr) == (start_lr, end_lr)
