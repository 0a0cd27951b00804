"""benchmarks/compare_fastai.py --scale: a larger set from the sample in which no photo crosses splits."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import compare_fastai  # noqa: E402


def test_each_photos_variants_stay_in_its_split_and_keep_its_label(sample_images, tmp_path):
    photos = sorted(path.name for path in sample_images.glob("*.jpg"))
    chosen = [name for name in photos if name.startswith(("Abyssinian_", "beagle_"))][:6]
    index = tmp_path / "index.csv"
    pd.DataFrame({"path": chosen, "split": ["train", "train", "valid"] * 2}).to_csv(index, index=False)

    images, split_file = compare_fastai.scale_photos(index, sample_images, 4, tmp_path / "scaled")

    split = pd.read_csv(split_file)
    assert len(split) == 4 * len(chosen) == len(list(images.iterdir()))
    original = dict(zip(chosen, ["train", "train", "valid"] * 2))
    for name in chosen:
        label, number = re.fullmatch(r"(.+)_(\d+)\.jpg", name).groups()
        variants = [f"{label}_{int(number) * 100 + k}.jpg" for k in range(4)]
        rows = split.set_index("path").loc[variants, "split"]
        assert set(rows) == {original[name]}, f"{name}'s variants cross splits"
        # The tutorial's regex still reads the label from every variant's name.
        assert all(re.fullmatch(r"^(.+)_\d+\.jpg$", variant).group(1) == label for variant in variants)
        with Image.open(sample_images / name) as photo:
            size = photo.size
        pixels = [np.asarray(Image.open(images / variant)) for variant in variants]
        assert Image.open(images / variants[0]).size == size  # the photo itself, re-encoded
        for crop in pixels[1:]:  # re-cropped: 80-95 % of each side
            assert 0.79 * size[0] <= crop.shape[1] < size[0] and 0.79 * size[1] <= crop.shape[0] < size[1]
        assert len({array.tobytes() for array in pixels}) == 4, "two variants are the same image"
    # Built again, the same set: the variants are drawn from the photo's name, not from the clock.
    again, _ = compare_fastai.scale_photos(index, sample_images, 4, tmp_path / "again")
    assert all((again / path.name).read_bytes() == path.read_bytes() for path in images.iterdir())
