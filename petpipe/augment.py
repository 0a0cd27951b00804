"""Batch-level augmentation on tensors, as fastai's aug_transforms: one affine warp per batch.

Random resized crop, flip, rotation and zoom are folded into one affine matrix
per image and applied to the whole batch by a single `grid_sample` call (no
per-image Python work in the hot loop); lighting follows on the result.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from petpipe.params import AugmentParams


def _uniform(low: float, high: float, count: int, generator: torch.Generator) -> torch.Tensor:
    return low + (high - low) * torch.rand(count, generator=generator)


def random_affine(batch_size: int, *, augment: AugmentParams, generator: torch.Generator) -> torch.Tensor:
    """Per-image 2x3 matrices mapping output to input coordinates in [-1, 1] units: (B, 2, 3)."""
    # Random resized crop (torchvision's RandomResizedCrop, fastai's min_scale): area and aspect.
    area = _uniform(augment.min_scale, 1.0, batch_size, generator)
    log_ratio = _uniform(math.log(3 / 4), math.log(4 / 3), batch_size, generator)
    ratio = torch.exp(log_ratio)
    half_width = torch.sqrt(area * ratio).clamp(max=1.0)  # fraction of the full side
    half_height = torch.sqrt(area / ratio).clamp(max=1.0)

    # Rotation and zoom apply to a fraction p_affine of the images (fastai's p_affine).
    warped = torch.rand(batch_size, generator=generator) < augment.p_affine
    angle = torch.deg2rad(_uniform(-augment.max_rotate, augment.max_rotate, batch_size, generator)) * warped
    zoom = torch.where(warped, _uniform(1.0, augment.max_zoom, batch_size, generator), torch.ones(batch_size))
    half_width, half_height = half_width / zoom, half_height / zoom

    # Where the crop sits: anywhere that keeps it inside the image.
    centre_x = _uniform(-1.0, 1.0, batch_size, generator) * (1 - half_width)
    centre_y = _uniform(-1.0, 1.0, batch_size, generator) * (1 - half_height)
    flip = torch.ones(batch_size)
    if augment.flip:
        flip = torch.where(torch.rand(batch_size, generator=generator) < 0.5, -1.0, 1.0)

    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.zeros(batch_size, 2, 3)
    theta[:, 0, 0] = cos * half_width * flip
    theta[:, 0, 1] = -sin * half_height
    theta[:, 1, 0] = sin * half_width * flip
    theta[:, 1, 1] = cos * half_height
    theta[:, 0, 2] = centre_x
    theta[:, 1, 2] = centre_y
    return theta


def random_lighting(batch: torch.Tensor, *, augment: AugmentParams, generator: torch.Generator) -> torch.Tensor:
    """Random brightness and contrast per image (fastai's Brightness/Contrast, max_lighting)."""
    batch_size = batch.shape[0]
    if augment.max_lighting == 0 or augment.p_lighting == 0:
        return batch
    applied = (torch.rand(batch_size, generator=generator) < augment.p_lighting).float()
    brightness = _uniform(-augment.max_lighting, augment.max_lighting, batch_size, generator) * applied / 2
    log_contrast = _uniform(math.log(1 - augment.max_lighting), -math.log(1 - augment.max_lighting),
                            batch_size, generator) * applied
    contrast = torch.exp(log_contrast)
    shape = (batch_size, 1, 1, 1)
    brightness = brightness.to(batch.device).view(shape)
    contrast = contrast.to(batch.device).view(shape)
    return ((batch - 0.5) * contrast + 0.5 + brightness).clamp_(0.0, 1.0)


def augment_batch(
    images: torch.Tensor, *, size: int, augment: AugmentParams, generator: torch.Generator
) -> torch.Tensor:
    """Training view of a batch: uint8 (B, 3, P, P) -> float (B, 3, size, size) in [0, 1].

    Random numbers come from `generator` (on the CPU) so a seed fixes the
    result on any device.
    """
    batch = images.float().div_(255.0)
    theta = random_affine(images.shape[0], augment=augment, generator=generator).to(batch.device)
    grid = F.affine_grid(theta, [images.shape[0], 3, size, size], align_corners=False)
    # Reflection padding, as fastai: rotated corners show mirrored image, not black.
    batch = F.grid_sample(batch, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    return random_lighting(batch, augment=augment, generator=generator)


def center_crop_batch(images: torch.Tensor, *, size: int) -> torch.Tensor:
    """Evaluation view: the central size x size square of presized uint8 images, as float in [0, 1].

    With the default presize ratio this is ImageNet's resize-then-center-crop.
    """
    height, width = images.shape[-2:]
    top, left = (height - size) // 2, (width - size) // 2
    return images[..., top:top + size, left:left + size].float().div_(255.0)


def normalize(batch: torch.Tensor, *, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """Per-channel normalisation with the statistics that belong to the pretrained weights."""
    mean_tensor = torch.tensor(mean, device=batch.device, dtype=batch.dtype).view(1, -1, 1, 1)
    std_tensor = torch.tensor(std, device=batch.device, dtype=batch.dtype).view(1, -1, 1, 1)
    return (batch - mean_tensor) / std_tensor
