"""Speed levers are chosen by the machine: from params, from the hardware, or from a few timed steps, once."""

from __future__ import annotations

import json

import pytest
import torch

from helpers import model_spec, params_with
from petpipe.data.dataset import ImageSet
from petpipe.data.views import Views
from petpipe.model.backbones import build_model
from petpipe.train import levers as levers_module
from petpipe.train.distributed import World
from petpipe.train.hardware import Runtime
from petpipe.train.levers import candidates, choose_levers

CPU = Runtime(world=World(), device=torch.device("cpu"))


@pytest.fixture()
def tiny(monkeypatch, tmp_path):
    monkeypatch.setenv("PETPIPE_CACHE_DIR", str(tmp_path / "cache"))
    spec = model_spec("resnet18", "none", num_classes=3, img_size=32, presize=36)
    model = build_model(spec, pretrained=False)
    images = ImageSet(torch.randint(0, 256, (8, 3, 36, 36), dtype=torch.uint8), torch.randint(0, 3, (8,)))
    return model, images, Views.of(spec, params_with().train.augment)


def test_levers_set_in_params_are_used_without_timing(tiny, monkeypatch):
    model, images, views = tiny
    monkeypatch.setattr(levers_module, "_probe", lambda *args: pytest.fail("timed although params decide"))
    settings = params_with(
        {"train.precision": "float32", "train.memory_format": "contiguous", "train.threads": 1}
    ).train
    chosen = choose_levers(CPU, model, images, views, settings).levers
    assert (chosen.precision, chosen.memory_format, chosen.threads, chosen.chosen_by) == (
        "float32",
        "contiguous",
        1,
        "params",
    )
    assert torch.get_num_threads() == 1


def test_bfloat16_is_a_candidate_only_where_the_cpu_runs_it(monkeypatch):
    settings = params_with().train
    monkeypatch.setattr(levers_module, "cpu_runs_bfloat16", lambda: False)
    assert candidates(CPU, settings)["precision"] == ["float32"]
    monkeypatch.setattr(levers_module, "cpu_runs_bfloat16", lambda: True)
    assert candidates(CPU, settings)["precision"] == ["float32", "bfloat16"]
    assert candidates(CPU, params_with({"train.precision": "bfloat16"}).train)["precision"] == ["bfloat16"]
    cuda = Runtime(world=World(), device=torch.device("cuda"))
    assert candidates(cuda, settings)["precision"] == ["bfloat16"]
    assert candidates(cuda, settings)["memory_format"] == ["channels_last"]


def test_auto_times_the_candidates_once_keeps_the_choice_and_leaves_the_run_unchanged(tiny, monkeypatch, tmp_path):
    model, images, views = tiny
    monkeypatch.setattr(levers_module, "cpu_runs_bfloat16", lambda: False)
    settings = params_with({"train.threads": 1}).train  # memory format timed, precision float32 (no native bf16)
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    rng = torch.get_rng_state()
    first = choose_levers(CPU, model, images, views, settings).levers
    assert first.chosen_by == "timed" and first.precision == "float32"
    assert first.memory_format in ("contiguous", "channels_last")
    assert torch.equal(torch.get_rng_state(), rng), "timing moved the global RNG"
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name]), f"timing changed {name}"
    kept = json.loads((tmp_path / "cache/levers.json").read_text())
    assert [entry["memory_format"] for entry in kept.values()] == [first.memory_format]

    monkeypatch.setattr(levers_module, "_probe", lambda *args: pytest.fail("timed again"))
    again = choose_levers(CPU, model, images, views, settings).levers
    assert again.chosen_by == "timed earlier" and again.memory_format == first.memory_format
