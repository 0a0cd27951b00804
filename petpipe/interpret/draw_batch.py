"""fastai's show_batch: images of a split drawn as the model sees them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure

from petpipe.data.pixels import decode_image
from petpipe.data.views import Views
from petpipe.errors import PetpipeError
from petpipe.interpret.plots import plot_show_batch


def show_batch_figure(index: pd.DataFrame, images: Path, *, split: str, count: int, views: Views, seed: int) -> Figure:
    """fastai's show_batch: `count` images of a split as the model sees them (`views`, before normalisation).

    train: augmented like a training batch, drawn as train-head's show_batch.png
    is; valid, test: the center crops evaluate and predict use.
    """
    rows = index[index["split"] == split].reset_index(drop=True)
    if rows.empty:
        raise PetpipeError(f"the {split} split has no images; check split.valid_pct / split.test_pct or the index")
    chosen = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed))[:count].tolist()
    decoded = []
    for row in chosen:
        path = images / rows.at[row, "path"]
        try:
            decoded.append(torch.from_numpy(np.array(decode_image(path, views.presize))))  # (P, P, 3), writable
        except (OSError, ValueError) as error:
            raise PetpipeError(f"{path}: cannot read image ({error}); rerun fetch and index-labels") from None
    pixels = torch.stack(decoded).permute(0, 3, 1, 2).contiguous()  # (B, 3, P, P) uint8
    if split == "train":
        batch = views.augmented(pixels, torch.Generator().manual_seed(seed))
        title = "show_batch: training images after augmentation"
    else:
        batch = views.cropped(pixels)
        title = f"show_batch: {'validation' if split == 'valid' else 'test'} images (center crop)"
    return plot_show_batch(batch, [rows.at[row, "label"] for row in chosen], title=title)
