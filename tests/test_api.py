"""petpipe's Python API (petpipe/api.py) on the session's trained model and its exported bundle: three lines
predict what `petpipe predict` does, from paths, PIL images and bytes; results() and the interpretation read
evaluate's files back."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import yaml
from click.testing import CliRunner
from PIL import Image

import petpipe
from helpers import PNG_MAGIC, SAMPLE_IMAGES, valid_rows
from petpipe.cli import main
from petpipe.errors import PetpipeError
from petpipe.model.checkpoint import load_checkpoint


def cli_predictions(model: Path | str, photos: list[Path], top_k: int) -> list[dict]:
    result = CliRunner().invoke(
        main, ["predict", "--model", str(model), "--json", "--top-k", str(top_k), *map(str, photos)]
    )
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def assert_same_as_the_cli(table: pd.DataFrame, expected: list[dict], top_k: int) -> None:
    """The API's table holds `petpipe predict --json`'s images, labels and probabilities, in order."""
    assert table["image"].tolist() == [item["path"] for item in expected]
    for rank in range(1, top_k + 1):
        suffix = "" if rank == 1 else f"_{rank}"
        assert table[f"label{suffix}"].tolist() == [item["predictions"][rank - 1]["label"] for item in expected]
        assert table[f"probability{suffix}"].tolist() == pytest.approx(
            [item["predictions"][rank - 1]["probability"] for item in expected], abs=1e-9
        )
    assert table["error"].isna().all()


@pytest.mark.parametrize("kind", ["checkpoint", "bundle"])
def test_three_lines_of_python_predict_what_petpipe_predict_does(trained, request, kind):
    model_path = trained.model if kind == "checkpoint" else request.getfixturevalue("bundle")
    photos = [SAMPLE_IMAGES / path for path in valid_rows(trained)["path"][:10]]

    model = petpipe.load_model(model_path, device="cpu")
    table = model.predict(photos, top_k=3)

    assert model.classes == list(load_checkpoint(trained.model).spec.classes) and len(model.classes) == 37
    assert list(table.columns) == [
        "image",
        "label",
        "probability",
        "label_2",
        "probability_2",
        "label_3",
        "probability_3",
        "error",
    ]
    assert_same_as_the_cli(table, cli_predictions(model_path, photos, top_k=3), top_k=3)
    # The head (three epochs at 64 px) is right well above chance (1/37) on these validation photos.
    actual = valid_rows(trained)["label"][:10].tolist()
    assert sum(predicted == truth for predicted, truth in zip(table["label"], actual)) >= 2


def test_a_pil_image_bytes_and_a_folder_are_predicted_as_their_file(trained, tmp_path):
    model = petpipe.load_model(trained.model, device="cpu")
    candidates = model.predict([SAMPLE_IMAGES / path for path in valid_rows(trained)["path"][:20]], top_k=5)
    best = candidates["probability"].idxmax()  # the photo the head is surest of
    photo, by_path = Path(candidates.at[best, "image"]), candidates.loc[[best]].reset_index(drop=True)
    with Image.open(photo) as image:
        image.load()
        as_image = model.predict([image, photo.read_bytes()], top_k=5)
    # Bytes go through the file's decoder: the same numbers. A PIL image is predicted from its pixels as they
    # are, a JPEG file from the reduced-scale decode petpipe trains on (draft mode): close, not equal.
    assert as_image.iloc[1, 1:].tolist() == pytest.approx(by_path.iloc[0, 1:].tolist(), abs=1e-5)  # batching
    assert as_image.at[0, "label"] == by_path.at[0, "label"]
    assert as_image.at[0, "probability"] == pytest.approx(by_path.at[0, "probability"], abs=0.15)
    assert as_image.at[0, "image"] == str(photo) and as_image.at[1, "image"] == "image 1"

    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / photo.name).write_bytes(photo.read_bytes())
    (folder / "broken.jpg").write_bytes(b"not a photo")
    found = model.predict([folder, tmp_path / "missing.jpg"], top_k=2).set_index("image")
    assert [Path(name).name for name in found.index] == sorted([photo.name, "broken.jpg"]) + ["missing.jpg"]
    assert found.at[str(folder / "broken.jpg"), "error"].startswith("cannot read image")
    assert found.at[str(tmp_path / "missing.jpg"), "error"] == "no such file"
    assert pd.isna(found.at[str(folder / "broken.jpg"), "label"])
    assert found.at[str(folder / photo.name), "label"] == by_path.at[0, "label"]


def test_results_and_interpretation_read_what_evaluate_wrote(evaluated, tmp_path):
    _, outputs = evaluated
    stages = tmp_path / "stages"
    stages.mkdir()
    (stages / "evaluate").symlink_to(outputs.metrics.parent, target_is_directory=True)

    found = petpipe.results(tmp_path)  # a project folder, or its stages/ folder
    assert list(found) == ["evaluate"] and list(petpipe.results(stages)) == ["evaluate"]
    evaluation = found["evaluate"]
    assert evaluation.metrics == json.loads(outputs.metrics.read_text())
    assert {"confusion", "top_losses", "most_confused", "per_class"} <= set(evaluation.tables)
    assert evaluation.tables["top_losses"]["loss"].is_monotonic_decreasing  # numbers, highest loss first
    assert {"confusion", "top_losses"} <= set(evaluation.figures)
    assert evaluation.figures["top_losses"]._repr_png_().startswith(PNG_MAGIC)

    assert petpipe.top_losses(outputs.metrics.parent)._repr_png_() == outputs.top_losses.read_bytes()
    assert petpipe.confusion(outputs.metrics.parent)._repr_png_() == outputs.confusion_plot.read_bytes()
    written = pd.read_csv(outputs.most_confused, keep_default_na=False)
    pairs = petpipe.most_confused(outputs.metrics.parent, min_count=1)
    pd.testing.assert_frame_equal(pairs, written, check_dtype=False)
    assert (petpipe.most_confused(outputs.metrics.parent, min_count=2)["count"] >= 2).all()
    with pytest.raises(PetpipeError, match="run `dvc repro evaluate`"):
        petpipe.top_losses(tmp_path)


def test_show_batch_draws_a_picture_that_displays_inline(trained, tmp_path):
    project = tmp_path / "project"
    (project / "stages" / "index-labels").mkdir(parents=True)
    (project / "stages" / "fetch").mkdir()
    (project / "stages" / "fetch" / "images").symlink_to(SAMPLE_IMAGES, target_is_directory=True)
    (project / "stages" / "index-labels" / "index.csv").write_bytes(trained.index.read_bytes())
    (project / "params.yaml").write_text(yaml.safe_dump(trained.params_dict))
    picture = petpipe.show_batch("valid", n=4, project=project)
    assert picture._repr_png_().startswith(PNG_MAGIC) and len(picture.png) > 10_000
    with pytest.raises(PetpipeError, match="use 'train' or 'valid'"):
        petpipe.show_batch("test", project=project)
