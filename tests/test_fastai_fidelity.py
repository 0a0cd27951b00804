"""Where petpipe says "as fastai", its formulas give fastai's numbers.

The expected values were computed with fastai 2.8.12 itself (fastai is not a
dependency; `pip install -e '.[benchmark]'` installs it), with the calls named
beside each one, e.g. combined_cos(0.25, 1e-3/25, 1e-3, 1e-3/1e5)(pos).
"""

from __future__ import annotations

import pytest
import torch

from helpers import model_spec, params_with
from petpipe.data.augment import (
    CORNERS,
    apply_perspective,
    augment_batch,
    center_crop_batch,
    find_coeffs,
    flip_matrix,
    lighting,
    rotate_matrix,
    warp_targets,
    zoom_matrix,
)
from petpipe.model.backbones import build_model
from petpipe.train.lr_range import sweep_lrs
from petpipe.train.optim import discriminative_lrs, one_cycle, one_cycle_momentum

pytestmark = pytest.mark.fast  # `make test-fast`: no training, no dvc repro

POSITIONS = [0.0, 0.1, 0.25, 0.5, 0.9, 1.0]


def test_one_cycle_is_fastais_combined_cos_down_to_peak_over_div_final():
    # combined_cos(0.25, 1e-3/25, 1e-3, 1e-3/1e5)(pos): fit_one_cycle(lr_max=1e-3)'s learning rate
    fastai = [4e-05, 0.00037167185124828173, 0.001, 0.0007500024864862765, 4.32368719095722e-05, 9.999999999940612e-09]
    assert [1e-3 * one_cycle(position) for position in POSITIONS] == pytest.approx(fastai, rel=1e-6)
    # combined_cos(0.25, 0.95, 0.85, 0.95)(pos): its momentum
    fastai_momentum = [0.95, 0.915450848828304, 0.85, 0.8750000013513858, 0.9456772695817386, 0.95]
    assert [one_cycle_momentum(position) for position in POSITIONS] == pytest.approx(fastai_momentum, rel=1e-6)


def test_the_lr_finder_sweeps_as_fastais_and_stops_a_step_short_of_end_lr():
    # SchedExp(1e-7, 10)(train_iter / num_it) for train_iter 0, 1, 50, 99 of num_it 100
    fastai = [1e-07, 1.202264434617413e-07, 0.001, 8.317637711026709]
    assert list(sweep_lrs(1e-7, 10.0, 100)[[0, 1, 50, 99]]) == pytest.approx(fastai, rel=1e-9)


def test_discriminative_lrs_are_fastais_even_mults():
    # even_mults(1e-6, 1e-4, n): what slice(1e-6, 1e-4) gives n layer groups
    assert discriminative_lrs(1e-4, 100.0, 3) == pytest.approx([1e-06, 1e-05, 1e-04])
    assert discriminative_lrs(1e-4, 100.0, 2) == pytest.approx([1e-06, 1e-04])


def test_layer_groups_are_fastais_splits():
    resnet = build_model(model_spec("resnet18", "none"), pretrained=False)
    groups = resnet.layer_groups()
    assert list(groups) == ["body_early", "body_late", "head"]  # fastai's _resnet_split
    assert groups["body_early"][-1] == "body.layer2" and groups["body_late"] == ["body.layer3", "body.layer4"]
    lite0 = build_model(model_spec("tf_efficientnet_lite0", "none"), pretrained=False)
    assert list(lite0.layer_groups()) == ["body", "head"]  # fastai's default_split, as for every timm body


def test_flip_rotate_and_zoom_matrices_are_fastais():
    # flip_mat(x, p=1, draw=[1, 0])
    assert flip_matrix(torch.tensor([-1.0, 1.0])).tolist() == [
        [[-1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]],
        [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]],
    ]
    # rotate_mat(x, p=1, draw=[30.0, -7.5])
    fastai_rotation = [
        [[0.8660253882408142, 0.5, 0.0], [-0.5, 0.8660253882408142, 0.0], [0.0, 0.0, 1.0]],
        [
            [0.9914448857307434, -0.13052619993686676, 0.0],
            [0.13052619993686676, 0.9914448857307434, 0.0],
            [0.0, 0.0, 1.0],
        ],
    ]
    assert rotate_matrix(torch.tensor([30.0, -7.5])) == pytest.approx(torch.tensor(fastai_rotation), abs=1e-6)
    # zoom_mat(x, p=1, draw=[1.05, 1.1], draw_x=[0.2, 0.9], draw_y=[0.7, 0.1])
    fastai_zoom = [
        [
            [0.9523810148239136, 0.0, -0.028571391478180885],
            [0.0, 0.9523810148239136, 0.01904759369790554],
            [0.0, 0.0, 1.0],
        ],
        [
            [0.9090908765792847, 0.0, 0.07272729277610779],
            [0.0, 0.9090908765792847, -0.07272730022668839],
            [0.0, 0.0, 1.0],
        ],
    ]
    zoom = zoom_matrix(torch.tensor([1.05, 1.1]), torch.tensor([0.2, 0.9]), torch.tensor([0.7, 0.1]))
    assert zoom == pytest.approx(torch.tensor(fastai_zoom), abs=1e-6)


def test_the_perspective_warp_moves_points_as_fastais():
    # _WarpCoord(magnitude=0.2, p=1, draw_x=[0.1, -0.15], draw_y=[-0.05, 0.2]) applied to these coordinates
    coords = torch.tensor([[[[-1.0, -1.0], [0.3, -0.2]], [[0.5, 0.5], [1.0, 1.0]]]]).expand(2, 2, 2, 2)
    fastai = [
        [
            [[-1.0389577150344849, -0.8945844769477844], [0.20999310910701752, -0.1584182232618332]],
            [[0.40443894267082214, 0.5598027110099792], [0.935677170753479, 1.0950859785079956]],
        ],
        [
            [[-0.7386319041252136, -1.094382882118225], [0.4360262453556061, -0.39312031865119934]],
            [[0.6459143161773682, 0.2645914852619171], [1.152748465538025, 0.7620646357536316]],
        ],
    ]
    targets = warp_targets(torch.tensor([0.1, -0.15]), torch.tensor([-0.05, 0.2]))
    warped = apply_perspective(coords.contiguous(), find_coeffs(CORNERS.expand(2, 4, 2), targets))
    assert warped == pytest.approx(torch.tensor(fastai), abs=1e-5)


def test_lighting_is_fastais_brightness_then_contrast_in_logit_space():
    # sigmoid(_ContrastLogit(draw=[0.8, 1.2])(_BrightnessLogit(draw=[0.45, 0.58])(logit(x))))
    image = torch.tensor([0.0, 0.1, 0.5, 0.9, 1.0]).view(1, 1, 1, 5).expand(2, 1, 1, 5)
    fastai = [
        [2.1393364022515016e-06, 0.12804944813251495, 0.459951788187027, 0.831632673740387, 0.9999966621398926],
        [5.864271290789702e-09, 0.09540626406669617, 0.5956392884254456, 0.9536465406417847, 1.0],
    ]
    lit = lighting(image, torch.tensor([0.45, 0.58]), torch.tensor([0.8, 1.2]))
    assert lit.reshape(2, 5) == pytest.approx(torch.tensor(fastai), abs=1e-6)


def test_validation_sees_the_whole_square_resized_as_fastai_and_training_without_augmentation_the_same():
    pixels = torch.randint(0, 256, (2, 3, 40, 40), dtype=torch.uint8)
    whole = center_crop_batch(pixels, size=32, crop=1.0)
    corners = pixels[..., [0, 0, -1, -1], [0, -1, 0, -1]].float() / 255
    assert whole.shape == (2, 3, 32, 32) and whole[..., [0, 0, -1, -1], [0, -1, 0, -1]] == pytest.approx(corners)
    # The central pixels only, unresampled, as checkpoints from before eval_crop were evaluated.
    assert torch.equal(center_crop_batch(pixels, size=32, crop=32 / 40), pixels[..., 4:36, 4:36].float() / 255)
    still = params_with(
        {
            "train.augment.min_scale": 1.0,
            "train.augment.flip": False,
            "train.augment.p_affine": 0.0,
            "train.augment.p_lighting": 0.0,
        }
    ).train.augment
    trained = augment_batch(pixels, size=32, augment=still, generator=torch.Generator().manual_seed(0))
    assert trained == pytest.approx(whole, abs=1e-5)


def test_augmentation_changes_each_image_differently_and_stays_in_range():
    pixels = torch.randint(0, 256, (8, 3, 40, 40), dtype=torch.uint8)
    augment = params_with().train.augment
    first = augment_batch(pixels, size=32, augment=augment, generator=torch.Generator().manual_seed(1))
    again = augment_batch(pixels, size=32, augment=augment, generator=torch.Generator().manual_seed(1))
    other = augment_batch(pixels, size=32, augment=augment, generator=torch.Generator().manual_seed(2))
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert first.min() >= 0 and first.max() <= 1


def test_training_takes_the_presized_square_anywhere_along_the_long_side_as_fastais_resize(sample_images):
    """train.augment.presize_crop random: the training split keeps each photo's long side (up to 3:2), and
    each training view is a square window of it at a random position; the evaluation view is its centre."""
    from petpipe.data.pixels import decode_image, decode_wide

    still = params_with(
        {
            "train.augment.min_scale": 1.0,
            "train.augment.flip": False,
            "train.augment.p_affine": 0.0,
            "train.augment.p_lighting": 0.0,
        }
    ).train.augment
    for name, transposed in (("Abyssinian_101.jpg", False), ("Abyssinian_12.jpg", True)):  # 450x313, 335x500
        wide, extent, stored_transposed = decode_wide(sample_images / name, 64)
        assert wide.shape == (3, 64, 96) and stored_transposed is transposed and 0.9 < extent <= 1.0
        pixels = torch.from_numpy(wide).unsqueeze(0)
        geometry = torch.tensor([[extent, float(transposed)]])
        centre = center_crop_batch(pixels, size=64, crop=1.0, geometry=geometry)[0]
        square = torch.tensor(decode_image(sample_images / name, 64)).permute(2, 0, 1).float() / 255
        assert (centre - square).abs().mean() < 0.03  # the same picture, upright, resized in another order
        windows = []
        for seed in range(6):
            view = augment_batch(
                pixels, size=64, augment=still, generator=torch.Generator().manual_seed(seed), geometry=geometry
            )[0]
            stored = view.transpose(-1, -2) if transposed else view  # back into the stored layout
            errors = [(stored - pixels[0, :, :, start : start + 64] / 255.0).abs().mean().item() for start in range(33)]
            assert min(errors) < 0.02, (name, seed, min(errors))  # a window of the photo, nothing invented
            windows.append(min(range(33), key=errors.__getitem__))
        assert len(set(windows)) >= 3, windows  # at random positions along the long side


def test_the_lr_finder_uses_trainings_optimiser_without_decay_on_batchnorm_and_biases(monkeypatch):
    """fastai's lr_find uses the Learner's optimiser (wd_bn_bias=False), not a plain AdamW over everything."""
    from petpipe.data.dataset import ImageSet
    from petpipe.data.views import Views
    from petpipe.train import lr_range

    built = []

    def spy(model, **kwargs):
        optimizer = make_optimizer(model, **kwargs)
        built.append(optimizer)
        return optimizer

    from petpipe.train.optim import make_optimizer

    monkeypatch.setattr(lr_range, "make_optimizer", spy)
    spec = model_spec("resnet18", "none", num_classes=3, img_size=32, presize=36)
    model = build_model(spec, pretrained=False).train()
    images = ImageSet(torch.randint(0, 256, (8, 3, 36, 36), dtype=torch.uint8), torch.randint(0, 3, (8,)))
    params = params_with(
        {"train.batch_size": 4, "train.weight_decay": 0.01, "lr_find.num_it": 5, "lr_find.batch_size": 0}
    )
    curve = lr_range.lr_sweep(
        model,
        images,
        views=Views.of(spec, params.train.augment),
        params=params,
        precision="float32",
        generator=torch.Generator().manual_seed(0),
    )
    assert len(curve["lr"]) >= 1 and len(built) == 1
    decays = {id(parameter): group["weight_decay"] for group in built[0].param_groups for parameter in group["params"]}
    batchnorm = {
        id(parameter)
        for module in model.modules()
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm)
        for parameter in module.parameters()
    }
    for name, parameter in model.named_parameters():
        expected = 0.0 if name.endswith(".bias") or id(parameter) in batchnorm else 0.01
        assert decays[id(parameter)] == expected, name
    assert sorted(set(decays.values())) == [0.0, 0.01]
