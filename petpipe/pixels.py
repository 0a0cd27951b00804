"""Decode each image once into a presized uint8 pixel cache, memory-mapped from disk.

Epochs then index a (N, 3, P, P) uint8 array instead of decoding JPEGs: the
"presizing" of the fastai book, done once per dataset and image size.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from petpipe.atomic import atomic_path

log = logging.getLogger(__name__)

# Refuse decompression bombs: no photo in a classification set needs more pixels.
Image.MAX_IMAGE_PIXELS = 128_000_000


def decode_image(path: Path | str, size: int) -> np.ndarray:
    """Open an image, apply its EXIF orientation, return it as RGB (size, size, 3) uint8.

    The shorter side is resized to `size` and the longer one center-cropped,
    so the aspect ratio is kept (fastai's Resize with method crop).
    """
    with Image.open(path) as image:
        refuse_decompression_bomb(image)
        # JPEG draft mode decodes at 1/2, 1/4 or 1/8 scale straight from the DCT: much faster.
        image.draft("RGB", (size, size))
        image = ImageOps.exif_transpose(image)
        image = _to_rgb(image)
        image = ImageOps.fit(image, (size, size), method=Image.Resampling.BILINEAR)
        return np.asarray(image, dtype=np.uint8)


def refuse_decompression_bomb(image: Image.Image) -> None:
    """Raise DecompressionBombError for an image over MAX_IMAGE_PIXELS, before any pixel is decoded.

    PIL itself refuses only above twice the limit and merely warns between the two; a warning
    filter would not do here, because predict decodes in threads and filters are process-wide.
    """
    limit = Image.MAX_IMAGE_PIXELS
    pixels = image.width * image.height
    if limit is not None and pixels > limit:
        raise Image.DecompressionBombError(
            f"Image size ({pixels} pixels) exceeds limit of {limit} pixels, could be decompression bomb DOS attack."
        )


def _to_rgb(image: Image.Image) -> Image.Image:
    """RGB for any mode: alpha composited on white, palette, grey, CMYK and 16-bit handled."""
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, image).convert("RGB")
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image, dtype=np.float64)
        peak = max(array.max(), 1.0)
        return Image.fromarray((array * (255.0 / (65535.0 if peak > 255 else 255.0))).clip(0, 255).astype(np.uint8)).convert("RGB")
    return image.convert("RGB")


def cache_key(content_hashes: Sequence[str], size: int) -> str:
    """Identify a cache by the exact bytes of its images, their order and the size."""
    digest = hashlib.sha256(f"v1:{size}:".encode())
    for content_hash in content_hashes:
        digest.update(content_hash.encode())
    return digest.hexdigest()[:24]


def default_cache_dir() -> Path:
    return Path(os.environ.get("PETPIPE_CACHE_DIR", ".petpipe/cache"))


def _decode_into(args: tuple[str, int]) -> np.ndarray:
    path, size = args
    return decode_image(path, size).transpose(2, 0, 1)  # (3, P, P)


def load_pixels(
    paths: Sequence[Path],
    content_hashes: Sequence[str],
    size: int,
    *,
    cache_dir: Path | None = None,
    workers: int = 0,
) -> np.ndarray:
    """Return a read-only (N, 3, size, size) uint8 memmap of the images, decoding only on first use."""
    cache_dir = cache_dir or default_cache_dir()
    cache_dir.mkdir(parents=True, exist_ok=True)
    target = cache_dir / f"pixels-{cache_key(content_hashes, size)}.npy"
    if not target.exists():
        _build_cache(paths, size, target, workers or os.cpu_count() or 1)
    return np.load(target, mmap_mode="r")


def _build_cache(paths: Sequence[Path], size: int, target: Path, workers: int) -> None:
    from tqdm import tqdm

    log.info("decoding %d images once into %s", len(paths), target)
    with atomic_path(target) as temporary:
        # open_memmap writes straight to disk: the full pets set at 256 px is 1.4 GB, never all in RAM.
        array = np.lib.format.open_memmap(temporary, mode="w+", dtype=np.uint8, shape=(len(paths), 3, size, size))
        jobs = [(str(path), size) for path in paths]
        progress = tqdm(total=len(jobs), desc="decode", unit="img", leave=False)
        if workers > 1 and len(jobs) > 64:
            with ProcessPoolExecutor(max_workers=workers) as pool:
                for position, pixels in enumerate(pool.map(_decode_into, jobs, chunksize=16)):
                    array[position] = pixels
                    progress.update()
        else:
            for position, job in enumerate(jobs):
                array[position] = _decode_into(job)
                progress.update()
        progress.close()
        array.flush()
        del array
