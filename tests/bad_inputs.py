"""A corpus of hostile and odd image files, made from the real sample photos (shared by the reliability tests).

`salt(folder, sample_images)` adds every case to a folder of photos and returns what it added:
the files no image pipeline can use (with the reason petpipe must give), the usable but
unusual ones (which must be indexed), and the train/valid duplicate that must be reported.
"""

from __future__ import annotations

import io
import shutil
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from petpipe.data import image_index

EXIF_ORIENTATION = 0x0112
# Orientation 6: "rotate 90 degrees clockwise to display". Pixels stored rotated 90 degrees
# counter-clockwise (PIL's ROTATE_90) are upright after exif_transpose.
ROTATED_CLOCKWISE_TO_DISPLAY = 6
DEFAULT_PATTERN = image_index.compile_label_pattern(r"^(.+)_\d+\.(?:jpe?g|png|bmp|gif|webp|tiff?)$")


@dataclass
class Salted:
    """What `salt` added, by path relative to the photo folder."""

    unusable: dict[str, str] = field(default_factory=dict)  # path -> start of the reason index-labels gives
    usable: dict[str, str] = field(default_factory=dict)  # path -> what is odd about it
    leak: tuple[str, str] | None = None  # (train path, valid path): identical bytes in both splits
    single_image_class: str | None = None  # its one image is the usable path that starts with this name
    rotated: str | None = None  # the EXIF-rotated photo
    rotated_from: str | None = None  # the sample photo it was made from, upright


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def decompression_bomb_png(width: int, height: int, *, bit_depth: int = 1) -> bytes:
    """A valid greyscale PNG of width x height zero pixels: tiny on disk, huge once decoded.

    The scanlines are compressed in slices, so making it never holds the decoded image in memory.
    """
    row = b"\x00" + bytes((width * bit_depth + 7) // 8)  # filter byte 0 + one row of zeros
    compressor = zlib.compressobj(9)
    rows_per_slice = max(1, (1 << 22) // len(row))
    compressed = []
    for start in range(0, height, rows_per_slice):
        compressed.append(compressor.compress(row * min(rows_per_slice, height - start)))
    compressed.append(compressor.flush())
    header = struct.pack(">IIBBBBB", width, height, bit_depth, 0, 0, 0, 0)  # greyscale, deflate, no interlace
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", header)
        + png_chunk(b"IDAT", b"".join(compressed))
        + png_chunk(b"IEND", b"")
    )


def exif_rotated_jpeg(upright: Image.Image) -> bytes:
    """upright's pixels stored turned 90 degrees, with the EXIF tag that turns them back on display."""
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = ROTATED_CLOCKWISE_TO_DISPLAY
    buffer = io.BytesIO()
    upright.transpose(Image.Transpose.ROTATE_90).save(buffer, format="JPEG", quality=95, exif=exif)
    return buffer.getvalue()


def encoded(image: Image.Image, format: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format, **options)
    return buffer.getvalue()


def copy_name_in_other_split(
    folder: Path, original: str, breed: str, *, seed: int, valid_pct: float, start: int
) -> tuple[str, str]:
    """The first `<breed>_<n>.jpg` (n >= start) that the stratified split, given the breed's photos already in
    `folder` (original among them), puts in the other split than `original`; and original's split then."""
    pattern = image_index.compile_label_pattern(r"^(.+)_\d+\.(?:jpe?g|png|bmp|gif|webp|tiff?)$")
    relative = [image_index.relative_posix(path, folder) for path in image_index.scan_images(folder)]
    others = [path for path in relative if image_index.label_from_name(Path(path).name, pattern) == breed]
    for number in range(start, start + 10_000):
        candidate = f"{breed}_{number}.jpg"
        splits = image_index.stratified_split(
            dict.fromkeys([*others, candidate], breed), valid_pct=valid_pct, test_pct=0.0, seed=seed
        )
        if splits[candidate] != splits[original]:
            return candidate, splits[original]
    raise AssertionError("no such name")  # pragma: no cover  (each try is a coin flip)


def salt(folder: Path, sample_images: Path, *, seed: int = 42, valid_pct: float = 0.2) -> Salted:
    """Add every bad and odd case to `folder` (which may already hold photos); return what was added."""
    folder.mkdir(parents=True, exist_ok=True)
    salted = Salted()
    photo = sample_images / "Bengal_107.jpg"
    photo_bytes = photo.read_bytes()
    with Image.open(photo) as opened:
        upright = opened.convert("RGB")
    small = upright.resize((upright.width // 2, upright.height // 2))

    def add(relative: str, content: bytes) -> str:
        (folder / relative).parent.mkdir(parents=True, exist_ok=True)
        (folder / relative).write_bytes(content)
        return relative

    # Files nothing can use: each must be skipped with its reason, and must not stop the stage.
    salted.unusable[add("Bengal_9001.jpg", photo_bytes[: len(photo_bytes) // 2])] = "truncated or corrupt: "
    salted.unusable[add("Bengal_9002.jpg", b"")] = "zero-byte file"
    salted.unusable[add("Bengal_9003.jpg", b"Dear reader, this is a letter, not a photo.\n")] = "not an image"
    salted.unusable[add("Bengal_9004.png", decompression_bomb_png(20_000, 20_000))] = "too large: "
    # Between PIL's MAX_IMAGE_PIXELS and twice that PIL only warns: petpipe refuses it all the same.
    salted.unusable[add("Bengal_9005.png", decompression_bomb_png(12_000, 12_000, bit_depth=8))] = "too large: "

    # Usable, if unusual: every one must be indexed and decode to RGB.
    rgba = small.convert("RGBA")
    alpha = np.full((rgba.height, rgba.width), 255, dtype=np.uint8)
    alpha[:, : rgba.width // 3] = 0  # a transparent third
    rgba.putalpha(Image.fromarray(alpha))
    salted.usable[add("Bengal_9010.png", encoded(rgba, "PNG"))] = "PNG with alpha"
    salted.usable[add("Bengal_9011.gif", encoded(small.convert("P", palette=Image.Palette.ADAPTIVE), "GIF"))] = (
        "palette GIF"
    )
    salted.usable[add("Bengal_9012.jpg", encoded(small.convert("L"), "JPEG"))] = "greyscale JPEG"
    salted.usable[add("Bengal_9013.jpg", encoded(small.convert("CMYK"), "JPEG"))] = "CMYK JPEG"
    sixteen = (np.asarray(small.convert("L"), dtype=np.uint16) * 257).astype(np.uint16)
    salted.usable[add("Bengal_9014.png", encoded(Image.fromarray(sixteen), "PNG"))] = "16-bit PNG"
    salted.rotated = add("Bengal_9015.jpg", exif_rotated_jpeg(upright))
    salted.rotated_from = photo.name
    salted.usable[salted.rotated] = "EXIF-rotated JPEG"
    mirrored = small.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    salted.usable[add("new photos/Bengal_9016.jpg", encoded(mirrored, "JPEG"))] = "folder name with a space"
    salted.usable[add("été – Ørsted/Bengal_9017.jpg", encoded(small, "JPEG"))] = "non-ASCII folder name"
    # A class of one photo: the stratified split keeps it in train (a class keeps one training photo), so the class
    # is learnt and has no validation photo, which the report must say.
    salted.single_image_class = "Chat Québécois à poil long"
    single = f"{salted.single_image_class}_1.jpg"
    with Image.open(sample_images / "Birman_121.jpg") as birman:
        salted.usable[add(single, encoded(birman.convert("RGB"), "JPEG", quality=90))] = (
            "spaces and non-ASCII in the name; the only image of its class"
        )

    # The same photo once in each split: a leak the report must name. The copy's name is chosen by the
    # split's own rule, so that whichever split the original is in, its copy lands in the other.
    original = "Bombay_9020.jpg"
    with Image.open(sample_images / "Bombay_10.jpg") as bombay:
        source = encoded(bombay.convert("RGB"), "JPEG", quality=93)  # unlike any sample photo's bytes
    add(original, source)
    # The stratified split gives a class of fewer than three photos no validation photo at valid_pct 0.2; a
    # folder without the sample's Bombay photos gets three of them, so the copy can land in the other split.
    if not list(folder.glob("Bombay_*.jpg"))[1:]:
        for photo in sorted(sample_images.glob("Bombay_*.jpg"))[:3]:
            salted.usable[add(photo.name, photo.read_bytes())] = "a photo of the leaking pair's class"
    copy, original_split = copy_name_in_other_split(
        folder, original, "Bombay", seed=seed, valid_pct=valid_pct, start=9021
    )
    add(copy, source)
    salted.usable[original] = salted.usable[copy] = "duplicate across train and valid"
    salted.leak = (original, copy) if original_split == "train" else (copy, original)
    return salted


def copy_sample(sample_images: Path, folder: Path, *, breeds: int | None = None, per_breed: int | None = None) -> None:
    """Copy the sample photos (or the first `per_breed` of each of the first `breeds` breeds) into folder."""
    by_breed: dict[str, list[Path]] = {}
    for photo in sorted(sample_images.glob("*.jpg")):
        by_breed.setdefault(photo.stem.rsplit("_", 1)[0], []).append(photo)
    folder.mkdir(parents=True, exist_ok=True)
    for photos in list(by_breed.values())[:breeds]:
        for photo in photos[:per_breed]:
            shutil.copy(photo, folder / photo.name)
