"""The decoded-pixel cache: memory-mapped (training reads it without copying it into RAM) and bounded."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from petpipe.data import pixels
from petpipe.data.dataset import ImageSet
from petpipe.errors import PetpipeError
from petpipe.utils.file_formats import file_digest

pytestmark = pytest.mark.fast  # `make test-fast`: no training, no dvc repro


def photos(sample_images: Path, count: int, offset: int = 0) -> tuple[list[Path], list[str]]:
    paths = sorted(sample_images.iterdir())[offset : offset + count]
    return paths, [file_digest(path) for path in paths]


def test_training_reads_the_memory_map_itself_not_a_copy(sample_images, tmp_path):
    paths, hashes = photos(sample_images, 4)
    cache = pixels.load_pixels(paths, hashes, 32, cache_dir=tmp_path, workers=1)
    assert isinstance(cache, np.memmap)
    images = ImageSet.from_cache(cache, np.zeros(4), torch.device("cpu"))
    assert images.pixels.data_ptr() == cache.ctypes.data  # the same pages: no copy of the set in RAM
    batch = images.pixels[torch.tensor([2, 0])]
    assert torch.equal(batch[0], torch.from_numpy(np.array(cache[2])))
    batch.zero_()  # a batch is its own copy, and even writing to the map never reaches the file
    images.pixels[1].zero_()
    assert np.load(next(tmp_path.glob("pixels-*.npy")))[1].any()


def test_cache_folder_is_bounded_least_recently_used_first(sample_images, tmp_path, monkeypatch):
    one_cache = 3 * 32 * 32 * 3  # three images at 32 px
    monkeypatch.setenv("PETPIPE_CACHE_GB", str(2.5 * (one_cache + 128) / 1e9))  # room for two caches and headers
    monkeypatch.setattr(pixels, "_IN_USE", set())
    built = []
    for offset in (0, 3, 6):
        paths, hashes = photos(sample_images, 3, offset)
        pixels.load_pixels(paths, hashes, 32, cache_dir=tmp_path, workers=1)
        built.append(pixels.cache_key(hashes, 32))
        pixels._IN_USE.clear()  # as if each came from another process that has ended
        os.utime(tmp_path / f"pixels-{built[-1]}.npy", (1000 + offset, 1000 + offset))
        if offset == 3:  # the first cache is used again: now the second is the least recently used
            first_paths, first_hashes = photos(sample_images, 3, 0)
            pixels.load_pixels(first_paths, first_hashes, 32, cache_dir=tmp_path, workers=1)
            pixels._IN_USE.clear()
    left = {path.name for path in tmp_path.glob("pixels-*.npy")}
    assert left == {f"pixels-{built[0]}.npy", f"pixels-{built[2]}.npy"}


def test_a_cache_in_use_is_never_evicted(sample_images, tmp_path, monkeypatch):
    monkeypatch.setattr(pixels, "_IN_USE", set())
    paths, hashes = photos(sample_images, 3)
    in_use = pixels.load_pixels(paths, hashes, 32, cache_dir=tmp_path, workers=1)
    monkeypatch.setenv("PETPIPE_CACHE_GB", "0")  # over the limit at once: warns, evicts all it may
    other_paths, other_hashes = photos(sample_images, 3, 3)
    pixels.load_pixels(other_paths, other_hashes, 32, cache_dir=tmp_path, workers=1)
    assert len(list(tmp_path.glob("pixels-*.npy"))) == 2
    assert in_use[0].any()


@pytest.mark.parametrize("value", ["lots", "-1", "nan"])
def test_a_bad_cache_bound_names_the_variable(sample_images, tmp_path, monkeypatch, value):
    monkeypatch.setenv("PETPIPE_CACHE_GB", value)
    paths, hashes = photos(sample_images, 1)
    with pytest.raises(PetpipeError, match="PETPIPE_CACHE_GB"):
        pixels.load_pixels(paths, hashes, 32, cache_dir=tmp_path, workers=1)
