"""Decode each image once into a presized uint8 pixel cache, memory-mapped from disk.

Epochs then index a (N, 3, P, P) uint8 array instead of decoding JPEGs: the
"presizing" of the fastai book, done once per dataset and image size. A cache is
mapped only after it matches the record written beside it when it was built.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from petpipe.errors import PetpipeError
from petpipe.utils.atomic import WriteFailed, atomic_path, reserve
from petpipe.utils.file_formats import file_digest, write_json
from petpipe.utils.paths import petpipe_folder

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


# The widest photo a "wide" cache keeps whole: 3:2 (wider ones lose the ends of their long side).
WIDE_RATIO = 1.5


def wide_side(size: int) -> int:
    """The stored long side of a wide cache at `size`."""
    return int(round(size * WIDE_RATIO))


def decode_wide(path: Path | str, size: int) -> tuple[np.ndarray, float, bool]:
    """The image with its short side resized to `size` and its long side kept (up to WIDE_RATIO x size),
    laid out long side across: (3, size, wide_side(size)) uint8, the fraction of that width the photo
    fills (centred, the rest its mirror image), and whether it was transposed (a portrait photo).

    Training then takes the presized square anywhere along the long side (fastai's Resize in training).
    """
    width = wide_side(size)
    with Image.open(path) as image:
        refuse_decompression_bomb(image)
        image.draft("RGB", (size, size))
        image = _to_rgb(ImageOps.exif_transpose(image))
        transposed = image.height > image.width
        if transposed:
            image = image.transpose(Image.Transpose.TRANSPOSE)
        long = min(max(int(round(size * image.width / image.height)), size), width)
        image = ImageOps.fit(image, (long, size), method=Image.Resampling.BILINEAR)
        pixels = np.asarray(image, dtype=np.uint8)  # (size, long, 3)
    left = (width - long) // 2
    pixels = np.pad(pixels, ((0, 0), (left, width - long - left), (0, 0)), mode="reflect")
    return pixels.transpose(2, 0, 1), long / width, transposed


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
        return Image.fromarray(
            (array * (255.0 / (65535.0 if peak > 255 else 255.0))).clip(0, 255).astype(np.uint8)
        ).convert("RGB")
    return image.convert("RGB")


def cache_key(content_hashes: Sequence[str], size: int, layout: str = "") -> str:
    """Identify a cache by the exact bytes of its images, their order, the size and the layout."""
    digest = hashlib.sha256(f"v1:{size}:{layout}".encode() if layout else f"v1:{size}:".encode())
    for content_hash in content_hashes:
        digest.update(content_hash.encode())
    return digest.hexdigest()[:24]


def default_cache_dir() -> Path:
    """PETPIPE_CACHE_DIR, else .petpipe/cache at the project root (shared by queued experiments)."""
    configured = os.environ.get("PETPIPE_CACHE_DIR")
    return Path(configured) if configured else petpipe_folder() / "cache"


DEFAULT_CACHE_GB = 20.0


def cache_limit_bytes() -> int:
    """PETPIPE_CACHE_GB bounds the cache folder (default 20 GB); least recently used caches go first."""
    text = os.environ.get("PETPIPE_CACHE_GB", str(DEFAULT_CACHE_GB))
    try:
        limit = float(text)
    except ValueError:
        limit = math.nan
    if not math.isfinite(limit) or limit < 0:
        raise PetpipeError(f"PETPIPE_CACHE_GB = {text!r} is not a size in GB; set it to a number such as 20")
    return int(limit * 1e9)


_IN_USE: set[Path] = set()  # caches this process has mapped: never evicted under its feet


def load_pixels(
    paths: Sequence[Path], content_hashes: Sequence[str], size: int, *, cache_dir: Path | None = None, workers: int = 0
) -> np.ndarray:
    """Return a (N, 3, size, size) uint8 memmap of the images, decoding only on first use.

    The map is copy-on-write: reading pages them in from the file (the OS may
    drop them again under memory pressure), and writing to it never reaches the file.
    """
    target = _cache_file(cache_dir, f"pixels-{cache_key(content_hashes, size)}.npy")
    if not _usable(target, (len(paths), 3, size, size)):
        _make_room(target.parent, len(paths) * 3 * size * size, len(paths), size)
        _build_cache(paths, size, target, workers or os.cpu_count() or 1)
    return _map(target)


def load_wide_pixels(
    paths: Sequence[Path], content_hashes: Sequence[str], size: int, *, cache_dir: Path | None = None, workers: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """As load_pixels, for `decode_wide` layouts: (N, 3, size, wide_side(size)) uint8 and, per image,
    (fraction of the width the photo fills, 1.0 if transposed else 0.0) as (N, 2) float32."""
    key = cache_key(content_hashes, size, layout=f"wide{wide_side(size)}")
    target = _cache_file(cache_dir, f"pixels-{key}.npy")
    geometry = target.with_name(f"geometry-{key}.npy")
    if not _usable(target, (len(paths), 3, size, wide_side(size)), geometry=geometry):
        _make_room(target.parent, len(paths) * 3 * size * wide_side(size), len(paths), size)
        _build_cache(paths, size, target, workers or os.cpu_count() or 1, geometry=geometry)
    return _map(target), np.load(geometry)


def _cache_file(cache_dir: Path | None, name: str) -> Path:
    cache_dir = cache_dir or default_cache_dir()
    cache_dir.mkdir(parents=True, exist_ok=True)
    return cache_dir / name


# --- checking a cache before it is used ------------------------------------------------------------
#
# Beside each cache, `<name>.json` records what was written when it was built: the array's shape, the
# file's size and the SHA-256 of its bytes (and of the geometry file's, for a wide cache). A truncated,
# extended, overwritten or replaced cache fails the check, is logged in one line and decoded again; an
# unchecked map would crash every later stage (`mmap length is greater than file size`) or, worse,
# train on garbage pixels in silence. The digest reads the whole file, about 1.4 GB/s with SHA-NI (0.8 s
# for the pets' train split at 224 px; docs/reliability.md), so it runs once per process and file: stages
# are processes. A cheaper stamp across processes would miss changes that keep the size and mtime.

RECORD_FORMAT = "petpipe-pixel-cache/1"
_CHECKED: dict[Path, tuple[int, int, int]] = {}  # cache -> (inode, size, mtime) when this process checked it


def record_path(cache: Path) -> Path:
    """The record of a cache (or of a wide cache's geometry file, which shares its cache's record)."""
    return cache.with_name(cache.name.replace("geometry-", "pixels-", 1)).with_suffix(".json")


def _usable(target: Path, shape: tuple[int, ...], *, geometry: Path | None = None) -> bool:
    """Whether target (and geometry) exist and match their record; a mismatch is logged in one line."""
    if not target.exists():
        return False
    problem = cache_problem(target, shape, geometry=geometry)
    if problem is not None:
        log.warning("warning: pixel cache %s %s; decoding the images again", target, problem)
        return False
    os.utime(target)  # recently used: the last to be evicted
    _CHECKED[target.resolve()] = _stamp(target)
    return True


def cache_problem(target: Path, shape: tuple[int, ...], *, geometry: Path | None = None) -> str | None:
    """What is wrong with a cache file (and its geometry file), in words; None when it holds what it claims."""
    try:
        record = json.loads(record_path(target).read_text())
    except FileNotFoundError:
        return "has no record of what it holds (cut off while being built, or built by an older petpipe)"
    except (OSError, ValueError) as error:
        return f"has an unreadable record {record_path(target).name} ({error})"
    if not isinstance(record, dict) or record.get("format") != RECORD_FORMAT:
        return f"has a record {record_path(target).name} that is not a {RECORD_FORMAT} record"
    problem = _array_problem(target, shape, np.uint8, record.get("sha256"))
    if problem is None and geometry is not None:
        problem = _array_problem(geometry, (shape[0], 2), np.float32, record.get("geometry_sha256"))
        if problem is not None:
            problem = f"has a geometry file {geometry.name} that {problem}"
    return problem


def _array_problem(path: Path, shape: tuple[int, ...], dtype: type, digest: str | None) -> str | None:
    """Check a .npy file's header against the shape expected, its size against its header, its bytes
    against the digest recorded (skipped for a file this process checked and nobody touched since)."""
    try:
        with open(path, "rb") as file:
            version = np.lib.format.read_magic(file)
            read_header = _HEADER_READERS.get(version)
            if read_header is None:
                return f"has a .npy format version {version} petpipe never writes"
            found, fortran_order, found_dtype = read_header(file)
            data_offset = file.tell()
    except FileNotFoundError:
        return "is missing"
    except (OSError, ValueError) as error:
        return f"has no valid .npy header ({error})"
    if tuple(found) != tuple(shape) or found_dtype != np.dtype(dtype) or fortran_order:
        return f"holds a {found_dtype} array of shape {tuple(found)}, not the {np.dtype(dtype)} {tuple(shape)} expected"
    expected = data_offset + math.prod(shape) * np.dtype(dtype).itemsize
    actual = path.stat().st_size
    if actual != expected:
        return f"is {actual} bytes, its header says {expected}"
    if _CHECKED.get(path.resolve()) == _stamp(path):
        return None
    if not isinstance(digest, str) or file_digest(path) != digest:
        return "differs from the bytes written when it was built (SHA-256 mismatch)"
    _CHECKED[path.resolve()] = _stamp(path)
    return None


_HEADER_READERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}


def _stamp(path: Path) -> tuple[int, int, int]:
    status = path.stat()
    return status.st_ino, status.st_size, status.st_mtime_ns


def _write_record(target: Path, shape: tuple[int, ...], geometry: Path | None) -> None:
    """Written last, after the cache (and geometry) are in place: a cache without one is never trusted."""
    record = {
        "format": RECORD_FORMAT,
        "shape": list(shape),
        "bytes": target.stat().st_size,
        "sha256": file_digest(target),
    }
    if geometry is not None:
        record["geometry_sha256"] = file_digest(geometry)
    write_json(record_path(target), record)


def _make_room(cache_dir: Path, needed: int, count: int, size: int) -> None:
    limit = cache_limit_bytes()
    if needed > limit:
        log.warning(
            "the pixel cache of %d images at %d px needs %.1f GB, over PETPIPE_CACHE_GB (%.1f GB); building it anyway",
            count,
            size,
            needed / 1e9,
            limit / 1e9,
        )
    evict_caches(cache_dir, limit=max(limit - needed, 0), keep=_IN_USE)


def _map(target: Path) -> np.ndarray:
    _IN_USE.add(target.resolve())
    return np.load(target, mmap_mode="c")


def evict_caches(cache_dir: Path, *, limit: int, keep: set[Path] = frozenset()) -> list[Path]:
    """Delete the least recently used pixel caches until the folder holds at most `limit` bytes.

    Caches in `keep` stay. Returns what was deleted. (On Linux and macOS a
    mapped file can be deleted: a process still reading it keeps its pages.)
    """
    caches = sorted(cache_dir.glob("pixels-*.npy"), key=lambda path: path.stat().st_mtime)
    total = sum(path.stat().st_size for path in caches)
    evicted = []
    for path in caches:
        if total <= limit:
            break
        if path.resolve() in keep:
            continue
        size = path.stat().st_size
        path.unlink(missing_ok=True)
        path.with_name(path.name.replace("pixels-", "geometry-", 1)).unlink(missing_ok=True)  # a wide cache's
        record_path(path).unlink(missing_ok=True)
        total -= size
        evicted.append(path)
        log.info("evicted the least recently used pixel cache %s (%.2f GB)", path, size / 1e9)
    return evicted


def _decode_into(args: tuple[str, int]) -> np.ndarray:
    path, size = args
    return decode_image(path, size).transpose(2, 0, 1)  # (3, P, P)


def _decode_wide_into(args: tuple[str, int]) -> tuple[np.ndarray, float, bool]:
    return decode_wide(*args)


def _build_cache(paths: Sequence[Path], size: int, target: Path, workers: int, *, geometry: Path | None = None) -> None:
    """Decode every image into `target` (and, for a wide layout, each one's geometry into `geometry`)."""
    log.info("decoding %d images once into %s", len(paths), target)
    try:
        _decode_all(paths, size, target, workers, geometry=geometry)
    except WriteFailed as error:
        raise error.keeping(
            "no pixel cache was kept, the photos are untouched (PETPIPE_CACHE_DIR moves the cache to another disk)"
        ) from None


def _decode_all(paths: Sequence[Path], size: int, target: Path, workers: int, *, geometry: Path | None) -> None:
    from tqdm import tqdm

    width = size if geometry is None else wide_side(size)
    decode = _decode_into if geometry is None else _decode_wide_into
    shapes = np.zeros((len(paths), 2), dtype=np.float32)
    record_path(target).unlink(missing_ok=True)  # the old record describes bytes about to be replaced
    with atomic_path(target) as temporary:
        # open_memmap writes straight to disk: the full pets set at 256 px is 1.4 GB, never all in RAM.
        array = np.lib.format.open_memmap(temporary, mode="w+", dtype=np.uint8, shape=(len(paths), 3, size, width))
        reserve(temporary)  # a full disk is an error now, not a SIGBUS half-way through decoding
        jobs = [(str(path), size) for path in paths]
        progress = tqdm(total=len(jobs), desc="decode", unit="img", leave=False)
        pool = ProcessPoolExecutor(max_workers=workers) if workers > 1 and len(jobs) > 64 else None
        try:
            results = pool.map(decode, jobs, chunksize=16) if pool else map(decode, jobs)
            for position, result in enumerate(results):
                if geometry is None:
                    array[position] = result
                else:
                    array[position], shapes[position, 0], shapes[position, 1] = result
                progress.update()
        finally:
            if pool:
                pool.shutdown()
        progress.close()
        array.flush()
        del array
        if geometry is not None:
            with atomic_path(geometry) as geometry_temporary, geometry_temporary.open("wb") as file:
                np.save(file, shapes)
    _write_record(target, (len(paths), 3, size, width), geometry)
