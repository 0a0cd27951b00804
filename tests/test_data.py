"""petpipe.data.image_index: labels, the split, image checks and the index files, on real sample photos."""

from __future__ import annotations

import hashlib
import io
import json
import random

import pandas as pd
import pytest
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from petpipe.data import image_index
from petpipe.errors import PetpipeError

pytestmark = pytest.mark.fast  # `make test-fast`: no training, no dvc repro

DEFAULT_PATTERN = image_index.compile_label_pattern(r"^(.+)_\d+\.(?:jpe?g|png|bmp|gif|webp|tiff?)$")


def test_label_from_name_takes_first_group_case_insensitively():
    assert image_index.label_from_name("Abyssinian_101.jpg", DEFAULT_PATTERN) == "Abyssinian"
    assert (
        image_index.label_from_name("american_pit_bull_terrier_7.JPEG", DEFAULT_PATTERN) == "american_pit_bull_terrier"
    )
    assert image_index.label_from_name("README.txt", DEFAULT_PATTERN) is None
    assert image_index.label_from_name("Abyssinian_100.mat", DEFAULT_PATTERN) is None


def test_label_from_folder_is_the_parent_folder():
    assert image_index.label_from_folder("cats/a.jpg") == "cats"
    assert image_index.label_from_folder("set1/dogs/b.jpg") == "dogs"
    assert image_index.label_from_folder("loose.jpg") is None


@given(st.text(min_size=1, max_size=40), st.integers(min_value=0, max_value=2**31))
def test_split_key_depends_only_on_name_and_seed(name, seed):
    first = image_index.split_key(name, seed)
    assert 0 <= first < 1 and image_index.split_key(name, seed) == first


def labelled(sizes: list[int]) -> dict[str, str]:
    """{path: class} with sizes[i] photos in class c<i>, named as the sample's are."""
    return {
        f"c{position}/c{position}_{number}.jpg": f"c{position}"
        for position, size in enumerate(sizes)
        for number in range(size)
    }


FRACTIONS = st.sampled_from([0.1, 0.15, 0.2, 0.25, 0.3, 0.5])


@given(
    sizes=st.lists(st.integers(1, 60), min_size=1, max_size=6),
    valid_pct=FRACTIONS,
    test_pct=st.sampled_from([0.0, 0.1, 0.2, 0.3]),
    seed=st.integers(0, 2**31),
)
def test_the_random_split_is_stratified_per_class(sizes, valid_pct, test_pct, seed):
    """Each class gives valid (and test) its share within one photo, a class of at least 1/valid_pct photos
    always has a validation photo, and every class keeps a training photo."""
    splits = image_index.stratified_split(labelled(sizes), valid_pct=valid_pct, test_pct=test_pct, seed=seed)
    for position, size in enumerate(sizes):
        mine = [split for path, split in splits.items() if path.startswith(f"c{position}/")]
        for split, fraction in (("valid", valid_pct), ("test", test_pct)):
            assert abs(mine.count(split) - fraction * size) < 1, (split, size, mine)
        assert mine.count("train") >= 1
        if size * valid_pct >= 1 - 1e-9:
            assert mine.count("valid") >= 1


@given(
    names=st.lists(st.text("abcdefgh_0123456789", min_size=1, max_size=12), min_size=1, max_size=40, unique=True),
    new=st.text("abcdefgh_0123456789", min_size=1, max_size=12),
    valid_pct=FRACTIONS,
    test_pct=st.sampled_from([0.0, 0.1, 0.2]),
    seed=st.integers(0, 2**31),
)
def test_adding_a_file_moves_at_most_one_other_file_of_its_class(names, new, valid_pct, test_pct, seed):
    """The split's stability: a new photo of a class moves at most one of its other photos between train and
    valid (and, with a test split, at most one between train and test; none between valid and test)."""
    if new in names:
        return
    before = image_index.stratified_split(
        dict.fromkeys(names, "cat"), valid_pct=valid_pct, test_pct=test_pct, seed=seed
    )
    after = image_index.stratified_split(
        dict.fromkeys([*names, new], "cat"), valid_pct=valid_pct, test_pct=test_pct, seed=seed
    )
    moves = [frozenset((before[name], after[name])) for name in names if before[name] != after[name]]
    assert moves.count(frozenset(("train", "valid"))) <= 1
    assert moves.count(frozenset(("train", "test"))) <= 1
    assert frozenset(("valid", "test")) not in moves
    if test_pct == 0:
        assert len(moves) <= 1


def test_the_random_split_holds_out_valid_pct_and_depends_on_the_seed():
    labels = {f"class_{i % 37}/image_{i}.jpg": f"class_{i % 37}" for i in range(10_000)}
    splits = image_index.stratified_split(labels, valid_pct=0.2, test_pct=0.1, seed=42)
    assert 1_950 < list(splits.values()).count("valid") <= 2_000 and 950 < list(splits.values()).count("test") <= 1_000
    assert image_index.stratified_split(labels, valid_pct=0.2, test_pct=0.1, seed=7) != splits


def test_split_is_stable_under_reordering():
    labels = {f"img_{i}.jpg": f"class_{i % 3}" for i in range(200)}
    shuffled = list(labels.items())
    random.Random(0).shuffle(shuffled)
    in_order = image_index.stratified_split(labels, valid_pct=0.3, test_pct=0.1, seed=1)
    assert image_index.stratified_split(dict(shuffled), valid_pct=0.3, test_pct=0.1, seed=1) == in_order


def test_split_folders_are_found_in_any_case_and_named_once():
    paths = ["Train/cat/1.jpg", "VAL/cat/2.jpg", "test/dog/3.jpg", "notes/readme.txt", "loose.jpg"]
    assert image_index.find_split_folders(paths) == {"train": "Train", "valid": "VAL", "test": "test"}
    plan = image_index.plan_split(paths, method="auto", file=None)
    assert (plan.method, plan.folder_of("VAL/cat/2.jpg"), plan.folder_of("notes/readme.txt")) == (
        "folders",
        "valid",
        None,
    )
    # train/ and test/ without a valid folder: folders all the same (valid is then drawn from train/)
    assert image_index.plan_split(["train/a/1.jpg", "test/a/2.jpg"], method="auto", file=None).method == "folders"
    # no split folders: auto splits at random; folders refuses in one line
    assert image_index.plan_split(["cat/1.jpg", "dog/2.jpg"], method="auto", file=None).method == "random"
    with pytest.raises(PetpipeError, match="split.method folders needs train/ and valid/.*found none"):
        image_index.plan_split(["cat/1.jpg"], method="folders", file=None)
    with pytest.raises(PetpipeError, match="found train/;"):
        image_index.plan_split(["train/cat/1.jpg"], method="folders", file=None)
    with pytest.raises(PetpipeError, match="folders val/, valid/ all name the valid split"):
        image_index.plan_split(["train/a/1.jpg", "val/a/2.jpg", "valid/a/3.jpg"], method="auto", file=None)
    assert image_index.plan_split(paths, method="random", file=None).method == "random"
    assert image_index.plan_split(paths, method="auto", file="split.csv").method == "file"


def test_folder_splits_keep_each_file_in_its_folder_and_draw_what_is_missing_from_train():
    labels = {**{f"train/a/{i}.jpg": "a" for i in range(10)}, **{f"test/a/{i}.jpg": "a" for i in range(3)}}
    plan = image_index.plan_split(list(labels), method="auto", file=None)
    splits = image_index.split_images(labels, plan, valid_pct=0.2, test_pct=0.3, seed=0)
    assert all(splits[path] == "test" for path in labels if path.startswith("test/"))  # test_pct: test/ is test
    assert [splits[path] for path in labels if path.startswith("train/")].count("valid") == 2
    assert image_index.labels_from_folders(["train/a/1.jpg", "train/2.jpg"], under_split_folder=True) == {
        "train/a/1.jpg": "a",
        "train/2.jpg": None,
    }


def test_scan_images_is_recursive_sorted_and_skips_hidden(tmp_path):
    for name in ["b/2.jpg", "a.jpg", "b/1.jpg", ".hidden.jpg", ".cache/x.jpg", "b/.DS_Store"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    found = [image_index.relative_posix(path, tmp_path) for path in image_index.scan_images(tmp_path)]
    assert found == ["a.jpg", "b/1.jpg", "b/2.jpg"]


def test_check_image_reports_size_and_content_hash(sample_images):
    path = sample_images / "Abyssinian_101.jpg"
    info = image_index.check_image(path)
    assert isinstance(info, image_index.ImageInfo)
    with Image.open(path) as image:
        assert (info.width, info.height) == image.size
    assert info.hash == hashlib.sha256(path.read_bytes()).hexdigest()


def test_check_image_gives_a_reason_for_each_bad_file(sample_images, tmp_path):
    photo = (sample_images / "Bengal_107.jpg").read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(photo[: len(photo) // 2])
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("not a photo")
    assert image_index.check_image(tmp_path / "empty.jpg") == "zero-byte file"
    assert image_index.check_image(tmp_path / "text.jpg") == "not an image (cannot identify image file)"
    assert image_index.check_image(tmp_path / "truncated.jpg").startswith("truncated or corrupt: ")


def test_check_image_refuses_decompression_bombs(sample_images, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1_000)
    assert image_index.check_image(sample_images / "Bengal_107.jpg").startswith("too large: ")


def test_check_image_applies_exif_rotation_to_width_and_height(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    buffer = io.BytesIO()
    Image.new("RGB", (40, 20), "red").save(buffer, format="JPEG", exif=exif)
    (tmp_path / "rotated.jpg").write_bytes(buffer.getvalue())
    info = image_index.check_image(tmp_path / "rotated.jpg")
    assert (info.width, info.height) == (20, 40)


def test_check_images_in_parallel_keeps_order(sample_images, tmp_path):
    paths = sorted(sample_images.iterdir())[:80]
    (tmp_path / "bad.jpg").write_text("nope")
    paths.insert(40, tmp_path / "bad.jpg")
    parallel = image_index.check_images(paths, workers=2)
    assert parallel == [image_index.check_image(path) for path in paths]
    assert parallel[40] == "not an image (cannot identify image file)"


def test_labels_from_csv_checks_file_columns_and_paths(tmp_path):
    paths = ["a/1.jpg", "b/2.jpg", "3.jpg"]
    good = tmp_path / "labels.csv"
    good.write_text("path,label\na/1.jpg,cat\n./b/2.jpg,dog\n")
    assert image_index.labels_from_csv(good, paths) == {"a/1.jpg": "cat", "b/2.jpg": "dog", "3.jpg": None}

    with pytest.raises(PetpipeError, match="missing.csv: file not found"):
        image_index.labels_from_csv(tmp_path / "missing.csv", paths)
    wrong_columns = tmp_path / "wrong.csv"
    wrong_columns.write_text("file,class\na/1.jpg,cat\n")
    with pytest.raises(PetpipeError, match="missing column.*path, label"):
        image_index.labels_from_csv(wrong_columns, paths)
    unknown = tmp_path / "unknown.csv"
    unknown.write_text("path,label\na/1.jpg,cat\nnowhere.jpg,dog\n")
    with pytest.raises(PetpipeError, match="not found in the images folder.*nowhere.jpg"):
        image_index.labels_from_csv(unknown, paths)


def test_splits_from_file_needs_every_image_and_valid_values(tmp_path):
    split_file = tmp_path / "split.csv"
    split_file.write_text("path,split\na.jpg,train\nb.jpg,VALID\n")
    assert image_index.splits_from_file(split_file, ["a.jpg", "b.jpg"]) == {"a.jpg": "train", "b.jpg": "valid"}
    with pytest.raises(PetpipeError, match="1 image.*no split.*c.jpg"):
        image_index.splits_from_file(split_file, ["a.jpg", "b.jpg", "c.jpg"])
    split_file.write_text("path,split\na.jpg,test\nb.jpg,Train\n")
    assert image_index.splits_from_file(split_file, ["a.jpg", "b.jpg"]) == {"a.jpg": "test", "b.jpg": "train"}
    split_file.write_text("path,split\na.jpg,holdout\n")
    with pytest.raises(PetpipeError, match="split must be train, valid or test, got a.jpg='holdout'"):
        image_index.splits_from_file(split_file, ["a.jpg"])


def test_find_leaks_pairs_identical_files_across_splits():
    index = pd.DataFrame(
        {
            "path": ["a.jpg", "b.jpg", "c.jpg", "d.jpg", "e.jpg"],
            "split": ["train", "valid", "train", "train", "test"],
            "hash": ["h1", "h1", "h2", "h2", "h2"],
        }
    )
    assert image_index.find_leaks(index) == [
        {"train": "a.jpg", "valid": "b.jpg", "hash": "h1"},
        {"train": "c.jpg", "test": "e.jpg", "hash": "h2"},
        {"train": "d.jpg", "test": "e.jpg", "hash": "h2"},
    ]


def test_load_index_round_trips_and_refuses_garbage(tmp_path):
    index = pd.DataFrame(
        [
            {"path": "x/NA_1.jpg", "label": "NA", "split": "train", "width": 3, "height": 4, "hash": "ab"},
            {"path": "y_2.jpg", "label": "null", "split": "valid", "width": 5, "height": 6, "hash": "cd"},
        ]
    )
    index.to_csv(tmp_path / "index.csv", index=False)
    loaded = image_index.load_index(tmp_path / "index.csv")
    assert list(loaded.columns) == image_index.INDEX_COLUMNS
    assert loaded["label"].tolist() == ["NA", "null"]
    assert loaded["width"].tolist() == [3, 5]

    with pytest.raises(PetpipeError, match="index not found.*index-labels"):
        image_index.load_index(tmp_path / "missing.csv")
    (tmp_path / "bad.csv").write_text("path,label\na.jpg,cat\n")
    with pytest.raises(PetpipeError, match="missing column.*split, width, height, hash"):
        image_index.load_index(tmp_path / "bad.csv")
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(PetpipeError, match="not a readable index"):
        image_index.load_index(tmp_path / "empty.csv")


def test_load_classes_reads_the_list_and_refuses_garbage(tmp_path):
    path = tmp_path / "classes.json"
    path.write_text(json.dumps({"classes": ["a", "b"]}))
    assert image_index.load_classes(path) == ["a", "b"]
    with pytest.raises(PetpipeError, match="classes file not found"):
        image_index.load_classes(tmp_path / "missing.json")
    path.write_text("{")
    with pytest.raises(PetpipeError, match="not valid JSON"):
        image_index.load_classes(path)
    path.write_text(json.dumps(["a", "b"]))
    with pytest.raises(PetpipeError, match='expected {"classes"'):
        image_index.load_classes(path)
