"""Batch-level augmentation on tensors, as fastai's aug_transforms, in one resampling per batch.

fastai (vision/augment.py) draws, per image: a flip (p 0.5), a perspective
warp, a rotation and a zoom (each with p_affine, drawn independently), composes
the flip, rotation and zoom into one affine matrix whose grid the warp then
bends, resamples, crops a random square (RandomResizedCropGPU, min_scale) down
to the output size, and changes brightness and contrast in logit space. Here
the crop, the affine matrix and the warp are folded into one sampling grid, so
the presized uint8 batch is resampled once by a single `grid_sample`; lighting
follows on the result. The one difference kept on purpose: fastai draws one
crop for the whole batch, petpipe one per image.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from petpipe.params import AugmentParams

# fastai's aug_transforms(align_corners=True): grid corners are the corner pixels' centres.
ALIGN_CORNERS = True


def _uniform(low: float, high: float, count: int, generator: torch.Generator) -> torch.Tensor:
    return low + (high - low) * torch.rand(count, generator=generator)


def _applied(p: float, count: int, generator: torch.Generator) -> torch.Tensor:
    """1.0 where a transform applies (probability p), else 0.0: fastai's mask_tensor."""
    return (torch.rand(count, generator=generator) < p).float()


def _matrices(rows: list[list[torch.Tensor]]) -> torch.Tensor:
    """[[a, b, c], [d, e, f]] of (B,) tensors -> (B, 3, 3) affine matrices with a last row 0, 0, 1."""
    count = rows[0][0].shape[0]
    last = [torch.zeros(count), torch.zeros(count), torch.ones(count)]
    return torch.stack([torch.stack(row, dim=1) for row in [*rows, last]], dim=1)


# ---------------------------------------------------------------- the transforms, as pure functions of their draws


def crop_matrix(
    width: torch.Tensor, height: torch.Tensor, centre_x: torch.Tensor, centre_y: torch.Tensor
) -> torch.Tensor:
    """A crop of `width` x `height` (fractions of the side) centred at (centre_x, centre_y) in [-1, 1]
    units, resized to the output (RandomResizedCropGPU). (B, 3, 3), output to input coordinates."""
    zero = torch.zeros_like(width)
    return _matrices([[width, zero, centre_x], [zero, height, centre_y]])


def flip_matrix(sign: torch.Tensor) -> torch.Tensor:
    """fastai's flip_mat: x -> sign * x (sign -1 flips)."""
    zero, one = torch.zeros_like(sign), torch.ones_like(sign)
    return _matrices([[sign, zero, zero], [zero, one, zero]])


def rotate_matrix(degrees: torch.Tensor) -> torch.Tensor:
    """fastai's rotate_mat."""
    theta = degrees * math.pi / 180
    zero = torch.zeros_like(theta)
    return _matrices([[theta.cos(), theta.sin(), zero], [-theta.sin(), theta.cos(), zero]])


def zoom_matrix(zoom: torch.Tensor, column: torch.Tensor, row: torch.Tensor) -> torch.Tensor:
    """fastai's zoom_mat: zoom in by `zoom` (1: none) towards (column, row), fractions of the side."""
    scale, zero = 1 / zoom, torch.zeros_like(zoom)
    return _matrices([[scale, zero, (1 - scale) * (2 * column - 1)], [zero, scale, (1 - scale) * (2 * row - 1)]])


def warp_targets(x_t: torch.Tensor, y_t: torch.Tensor) -> torch.Tensor:
    """fastai's _WarpCoord: where the corners move for warps x_t, y_t. (B, 4, 2)"""
    return torch.stack(
        [
            torch.stack([-1 - y_t, -1 - x_t]),
            torch.stack([-1 + y_t, 1 + x_t]),
            torch.stack([1 + y_t, -1 + x_t]),
            torch.stack([1 - y_t, 1 - x_t]),
        ]
    ).permute(2, 0, 1)


# ---------------------------------------------------------------- the draws


def random_crop(count: int, augment: AugmentParams, generator: torch.Generator) -> torch.Tensor:
    """Area in [min_scale, 1], width/height ratio log-uniform in [1 / max_aspect, max_aspect] (fastai: a
    square), anywhere inside the image."""
    area = _uniform(augment.min_scale, 1.0, count, generator)
    ratio = torch.exp(_uniform(-math.log(augment.max_aspect), math.log(augment.max_aspect), count, generator))
    width = torch.sqrt(area * ratio).clamp(max=1.0)
    height = torch.sqrt(area / ratio).clamp(max=1.0)
    centre_x = _uniform(-1.0, 1.0, count, generator) * (1 - width)
    centre_y = _uniform(-1.0, 1.0, count, generator) * (1 - height)
    return crop_matrix(width, height, centre_x, centre_y)


def random_affine(count: int, augment: AugmentParams, generator: torch.Generator) -> torch.Tensor:
    """fastai's affine matrix F @ R @ Z: a flip (p 0.5), a rotation and a zoom (each with p_affine,
    drawn independently). (B, 3, 3)"""
    sign = 1 - 2 * _applied(0.5 if augment.flip else 0.0, count, generator)
    degrees = _uniform(-augment.max_rotate, augment.max_rotate, count, generator)
    degrees = degrees * _applied(augment.p_affine, count, generator)
    zoom = _uniform(1.0, augment.max_zoom, count, generator)
    zoomed = _applied(augment.p_affine, count, generator)
    column, row = _uniform(0.0, 1.0, count, generator), _uniform(0.0, 1.0, count, generator)
    return flip_matrix(sign) @ rotate_matrix(degrees) @ zoom_matrix(zoomed * zoom + (1 - zoomed), column, row)


def random_warp(count: int, augment: AugmentParams, generator: torch.Generator) -> torch.Tensor:
    """Each axis warped by up to max_warp, each with p_affine (fastai's Warp). (B, 4, 2) corner targets."""
    x_t = _uniform(-augment.max_warp, augment.max_warp, count, generator)
    x_t = x_t * _applied(augment.p_affine, count, generator)
    y_t = _uniform(-augment.max_warp, augment.max_warp, count, generator)
    y_t = y_t * _applied(augment.p_affine, count, generator)
    return warp_targets(x_t, y_t)


CORNERS = torch.tensor([[-1.0, -1.0], [-1.0, 1.0], [1.0, -1.0], [1.0, 1.0]])


def find_coeffs(source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """fastai's find_coeffs: the 8 perspective coefficients (B, 8, 1) mapping `target` points to `source` (B, 4, 2)."""
    one, zero = torch.ones(source.shape[0]), torch.zeros(source.shape[0])
    rows = []
    for point in range(source.shape[1]):
        tx, ty = target[:, point, 0], target[:, point, 1]
        sx, sy = source[:, point, 0], source[:, point, 1]
        rows.append(torch.stack([tx, ty, one, zero, zero, zero, -sx * tx, -sx * ty]))
        rows.append(torch.stack([zero, zero, zero, tx, ty, one, -sy * tx, -sy * ty]))
    return torch.linalg.solve(torch.stack(rows).permute(2, 0, 1), source.reshape(source.shape[0], 8, 1))


def apply_perspective(coords: torch.Tensor, coeffs: torch.Tensor) -> torch.Tensor:
    """fastai's apply_perspective: bend a sampling grid (B, H, W, 2) by perspective coefficients (B, 8, 1)."""
    shape = coords.shape
    flat = coords.reshape(shape[0], -1, 2)
    matrix = torch.cat([coeffs, torch.ones_like(coeffs[:, :1])], dim=1).view(shape[0], 3, 3)
    moved = flat @ matrix[..., :2].transpose(1, 2) + matrix[..., 2].unsqueeze(1)
    if (moved[..., 2] == 0).any():
        return coords
    return (moved[..., :2] / moved[..., 2:]).reshape(shape)


def sampling_grid(count: int, *, size: int, augment: AugmentParams, generator: torch.Generator) -> torch.Tensor:
    """Where each output pixel samples the presized image, in [-1, 1] units: (B, size, size, 2).

    Output -> crop -> fastai's affine matrix (zoom, rotation, flip) -> perspective warp -> input, as
    fastai applies the affine matrix and warp at the presized resolution and then crops.
    """
    crop = random_crop(count, augment, generator)
    affine = random_affine(count, augment, generator)
    warp = random_warp(count, augment, generator)
    grid = F.affine_grid((affine @ crop)[:, :2], [count, 3, size, size], align_corners=ALIGN_CORNERS)
    if augment.max_warp == 0 or augment.p_affine == 0:
        return grid
    return apply_perspective(grid, find_coeffs(CORNERS.expand(count, 4, 2), warp))


def place_square(
    grid: torch.Tensor, geometry: torch.Tensor, *, side: int, width: int, generator: torch.Generator
) -> torch.Tensor:
    """Move a grid drawn for a square image onto the wide layout of `pixels.decode_wide`: the square
    anywhere along the photo's long side (fastai's Resize in training), portrait photos transposed back.

    geometry: (B, 2) of (fraction of `width` the photo fills, 1.0 if stored transposed).
    """
    extent, transposed = geometry[:, 0], geometry[:, 1] > 0.5
    grid = torch.where(transposed.view(-1, 1, 1, 1), grid.flip(-1), grid)  # (x, y) -> (y, x) for portraits
    room = (extent * width - side).clamp(min=0) / (width - 1)  # how far the square's centre may move
    centre = _uniform(-1.0, 1.0, grid.shape[0], generator) * room
    along = centre.view(-1, 1, 1) + grid[..., 0] * (side - 1) / (width - 1)
    return torch.stack([along, grid[..., 1]], dim=-1)


def lighting(batch: torch.Tensor, brightness: torch.Tensor, contrast: torch.Tensor) -> torch.Tensor:
    """fastai's Brightness and Contrast: sigmoid((logit(x) + logit(brightness)) * contrast), per image."""
    shape = (batch.shape[0], 1, 1, 1)
    logits = torch.logit(batch.clamp(1e-7, 1 - 1e-7))
    shifted = logits + torch.logit(brightness.to(batch.device).view(shape))
    return torch.sigmoid(shifted * contrast.to(batch.device).view(shape))


def random_lighting(batch: torch.Tensor, *, augment: AugmentParams, generator: torch.Generator) -> torch.Tensor:
    """Brightness in 0.5 +- max_lighting / 2 and contrast in [1 - max_lighting, 1 / (1 - max_lighting)]
    (log-uniform), each applied with p_lighting, drawn independently (fastai's _BrightnessLogit, _ContrastLogit)."""
    count, most = batch.shape[0], augment.max_lighting
    if most == 0 or augment.p_lighting == 0:
        return batch
    brightness = _uniform(0.5 * (1 - most), 0.5 * (1 + most), count, generator)
    brightness_on = _applied(augment.p_lighting, count, generator)
    contrast = torch.exp(_uniform(math.log(1 - most), -math.log(1 - most), count, generator))
    contrast_on = _applied(augment.p_lighting, count, generator)
    return lighting(
        batch, brightness * brightness_on + 0.5 * (1 - brightness_on), contrast * contrast_on + (1 - contrast_on)
    )


def augment_batch(
    images: torch.Tensor,
    *,
    size: int,
    augment: AugmentParams,
    generator: torch.Generator,
    geometry: torch.Tensor | None = None,
) -> torch.Tensor:
    """Training view of a batch: uint8 (B, 3, P, P) -> float (B, 3, size, size) in [0, 1].

    With `geometry`, the images are wide layouts (B, 3, P, W) of `pixels.decode_wide` and the
    presized square is drawn anywhere along each photo's long side. Random numbers come from
    `generator` (on the CPU) so a seed fixes the result on any device.
    """
    batch = images.float().div_(255.0)
    grid = sampling_grid(images.shape[0], size=size, augment=augment, generator=generator)
    if geometry is not None:
        grid = place_square(grid, geometry.cpu(), side=images.shape[-2], width=images.shape[-1], generator=generator)
    grid = grid.to(batch.device)
    # Reflection padding, as fastai: rotated corners show mirrored image, not black.
    batch = F.grid_sample(batch, grid, mode="bilinear", padding_mode="reflection", align_corners=ALIGN_CORNERS)
    return random_lighting(batch, augment=augment, generator=generator)


def center_crop_batch(
    images: torch.Tensor, *, size: int, crop: float, geometry: torch.Tensor | None = None
) -> torch.Tensor:
    """Evaluation view: the central `crop` fraction of the side of presized uint8 images, resized to
    size x size, as float in [0, 1]. fastai validates on the whole square (crop 1.0); torchvision's
    ImageNet evaluation keeps 0.875 of it. No resampling when the crop is already `size` pixels.
    With `geometry`, the images are wide layouts: the centre of each, portraits transposed back."""
    height, width = images.shape[-2:]
    side = min(max(round(crop * min(height, width)), 1), min(height, width))
    top, left = (height - side) // 2, (width - side) // 2
    batch = images[..., top : top + side, left : left + side].float().div_(255.0)
    if geometry is not None:
        transposed = (geometry[:, 1] > 0.5).to(batch.device).view(-1, 1, 1, 1)
        batch = torch.where(transposed, batch.transpose(-1, -2), batch)
    if side != size:
        batch = F.interpolate(batch, size=(size, size), mode="bilinear", align_corners=ALIGN_CORNERS)
    return batch


def normalize(batch: torch.Tensor, *, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """Per-channel normalisation with the statistics that belong to the pretrained weights."""
    mean_tensor = torch.tensor(mean, device=batch.device, dtype=batch.dtype).view(1, -1, 1, 1)
    std_tensor = torch.tensor(std, device=batch.device, dtype=batch.dtype).view(1, -1, 1, 1)
    return (batch - mean_tensor) / std_tensor
