"""predict, export and show-batch on the model conftest trains once per session (`trained`, as test_evaluate)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import yaml
from click.testing import CliRunner
from PIL import Image

from helpers import PNG_MAGIC, SAMPLE_IMAGES, run_without_torch, valid_rows
from petpipe.cli import main
from petpipe.errors import PetpipeError
from petpipe.inference.predict import collect_images, load_predictor, predict_files
from petpipe.model.checkpoint import load_checkpoint
from petpipe.utils.file_formats import file_digest


def all_probabilities(model: Path, paths: list[Path], *, batch_size: int = 64) -> dict[str, dict[str, float]]:
    predictor = load_predictor(model, device="cpu")
    predictions = predict_files(predictor, paths, top_k=len(predictor.classes), batch_size=batch_size)
    return {Path(prediction.path).name: dict(prediction.labels) for prediction in predictions}


def test_predict_agrees_with_evaluate_on_the_validation_images(trained, evaluated):
    _, outputs = evaluated
    rows = valid_rows(trained)
    probabilities = all_probabilities(trained.model, [SAMPLE_IMAGES / path for path in rows["path"]], batch_size=16)
    confusion = pd.read_csv(outputs.confusion, dtype=str, keep_default_na=False)
    top1 = [max(probabilities[Path(path).name].items(), key=lambda item: item[1])[0] for path in rows["path"]]
    assert top1 == confusion["predicted"].tolist()
    table = pd.read_csv(
        outputs.top_losses_table, dtype={"path": str, "actual": str, "predicted": str}, keep_default_na=False
    )
    for row in table.itertuples():
        predicted = probabilities[Path(row.path).name]
        assert predicted[row.actual] == pytest.approx(row.probability_actual, rel=1e-4, abs=1e-6)
        assert predicted[row.predicted] == pytest.approx(row.probability_predicted, abs=1e-5)
    # Batching does not change an image's prediction.
    few = [SAMPLE_IMAGES / path for path in rows["path"][:5]]
    one_by_one = all_probabilities(trained.model, few, batch_size=2)
    for name, labels in one_by_one.items():
        assert labels == pytest.approx(probabilities[name], abs=1e-5)


def test_an_exported_bundle_is_pickle_free_and_agrees_with_the_checkpoint(trained, bundle):
    assert sorted(path.name for path in bundle.iterdir()) == ["bundle.json", "model.onnx"]
    onnx_head = (bundle / "model.onnx").read_bytes()[:4]
    assert not onnx_head.startswith(b"PK") and not onnx_head.startswith(b"\x80")  # no zip, no pickle
    manifest = json.loads((bundle / "bundle.json").read_text())
    spec = load_checkpoint(trained.model).spec
    assert manifest["format"] == "petpipe-bundle/1" and manifest["model"] == "model.onnx"
    assert manifest["preprocessing"]["resize"] == {"mode": "bilinear", "align_corners": True, "antialias": False}
    assert manifest["classes"] == list(spec.classes)
    assert {key: manifest["preprocessing"][key] for key in ("img_size", "presize", "mean", "std")} == {
        "img_size": spec.img_size,
        "presize": spec.presize,
        "mean": list(spec.mean),
        "std": list(spec.std),
    }
    assert manifest["arch"] == "tf_efficientnet_lite0"
    assert manifest["source"]["sha256"] == file_digest(trained.model)

    sample = [SAMPLE_IMAGES / path for path in valid_rows(trained)["path"][:12]]
    exported = all_probabilities(bundle, sample, batch_size=5)
    reference = all_probabilities(trained.model, sample)
    assert exported.keys() == reference.keys() and len(exported) == 12
    for name in reference:
        assert max(exported[name], key=exported[name].get) == max(reference[name], key=reference[name].get)
        assert exported[name] == pytest.approx(reference[name], abs=1e-4), name


def photos_of_every_kind(folder: Path) -> Path:
    """Sample photos as users have them: landscape, portrait and square JPEGs, and the same photos re-encoded as
    a greyscale JPEG, a CMYK JPEG and a PNG with transparency (which decode_image composites on white)."""
    folder.mkdir()
    for name in ("Abyssinian_101.jpg", "Abyssinian_12.jpg", "Persian_163.jpg", "pug_112.jpg", "Bombay_10.jpg"):
        shutil.copy(SAMPLE_IMAGES / name, folder / name)
    with Image.open(SAMPLE_IMAGES / "beagle_10.jpg") as photo:
        photo.convert("L").save(folder / "beagle_grey.jpg", quality=90)
        photo.convert("CMYK").save(folder / "beagle_cmyk.jpg", quality=90)
        transparent = photo.convert("RGBA")
        transparent.putalpha(Image.linear_gradient("L").resize(photo.size))
        transparent.save(folder / "beagle_alpha.png")
    return folder


def predicted_json(output: str) -> dict[str, dict[str, float]]:
    return {
        Path(item["path"]).name: {entry["label"]: entry["probability"] for entry in item["predictions"]}
        for item in json.loads(output)
    }


def test_a_bundle_predicts_without_torch_what_the_checkpoint_predicts(trained, bundle, tmp_path):
    """`petpipe predict --model bundle/` in a process where importing torch fails: numpy, Pillow and onnxruntime
    give the checkpoint's probabilities to 1e-4, on every kind of photo."""
    photos = photos_of_every_kind(tmp_path / "photos")
    every_class = str(len(load_checkpoint(trained.model).spec.classes))
    torch_free = run_without_torch(
        ["predict", "--model", str(bundle), "--json", "--top-k", every_class, "--batch-size", "3", str(photos)],
        tmp_path,
    )
    assert torch_free.returncode == 0, torch_free.stderr[-3000:]
    with_torch = CliRunner().invoke(
        main, ["predict", "--model", str(trained.model), "--json", "--top-k", every_class, str(photos)]
    )
    assert with_torch.exit_code == 0, with_torch.output
    exported, reference = predicted_json(torch_free.stdout), predicted_json(with_torch.stdout)
    assert exported.keys() == reference.keys() and len(reference) == 8
    for name, probabilities in reference.items():
        assert exported[name].keys() == probabilities.keys() and sum(probabilities.values()) == pytest.approx(1)
        assert exported[name] == pytest.approx(probabilities, abs=1e-4), name
    # The guard is real: the checkpoint, which does need torch, fails there.
    refused = run_without_torch(["predict", "--model", str(trained.model), str(photos)], tmp_path)
    assert refused.returncode != 0 and "torch imported" in refused.stderr


@pytest.mark.parametrize("model_kind", ["checkpoint", "bundle"])
def test_a_corrupt_file_is_reported_while_the_others_are_predicted(trained, tmp_path, request, model_kind):
    model = trained.model if model_kind == "checkpoint" else request.getfixturevalue("bundle")
    folder = tmp_path / "photos"
    folder.mkdir()
    good = sorted(SAMPLE_IMAGES.glob("pug_*.jpg"))[:3]
    for photo in good:
        shutil.copy(photo, folder / photo.name)
    (folder / "broken.jpg").write_bytes(good[0].read_bytes()[:600])  # a truncated JPEG
    (folder / "notes.txt").write_text("not an image, and not looked at in a folder")
    missing = tmp_path / "missing.jpg"

    result = CliRunner().invoke(main, ["predict", "--model", str(model), "--top-k", "2", str(folder), str(missing)])
    assert result.exit_code == 1, result.output
    assert f"error: {folder / 'broken.jpg'}: cannot read image" in result.stderr
    assert f"error: {missing}: no such file" in result.stderr
    assert "notes.txt" not in result.output
    lines = result.stdout.splitlines()
    assert [Path(line.split("\t")[0]).name for line in lines] == [photo.name for photo in good]
    for line in lines:
        _, *labels = line.split("\t")
        assert len(labels) == 2
        probabilities = [float(label.rsplit(" ", 1)[1]) for label in labels]
        assert probabilities == sorted(probabilities, reverse=True) and 0 < probabilities[0] <= 1

    result = CliRunner().invoke(main, ["predict", "--model", str(model), "--json", str(folder)])
    assert result.exit_code == 1
    items = json.loads(result.stdout)
    assert [Path(item["path"]).name for item in items] == ["broken.jpg", *(photo.name for photo in good)]
    assert items[0]["predictions"] == [] and "cannot read image" in items[0]["error"]
    for item in items[1:]:
        assert item["error"] is None and len(item["predictions"]) == 3
        assert sum(entry["probability"] for entry in item["predictions"]) <= 1 + 1e-9

    result = CliRunner().invoke(main, ["predict", "--model", str(model), *map(str, good)])
    assert result.exit_code == 0 and len(result.stdout.splitlines()) == 3


def test_predict_and_export_refuse_bad_models_with_advice(tmp_path):
    runner = CliRunner()
    result = runner.invoke(main, ["predict", "--model", str(tmp_path / "nope.pt"), str(SAMPLE_IMAGES)])
    assert result.exit_code == 1 and "not found" in result.output and "Traceback" not in result.output
    result = runner.invoke(main, ["predict", "--model", str(tmp_path), str(SAMPLE_IMAGES)])
    assert result.exit_code == 1 and "petpipe export" in result.output
    result = runner.invoke(main, ["predict", "--device", "gpu0", str(SAMPLE_IMAGES)])
    assert result.exit_code == 1 and "auto, cpu, cuda" in result.output
    (tmp_path / "fake.pt").write_bytes(b"not a checkpoint")
    result = runner.invoke(main, ["export", "--model", str(tmp_path / "fake.pt"), "--out", str(tmp_path / "out")])
    assert result.exit_code == 1 and "cannot be read safely" in result.output
    assert not (tmp_path / "out").exists()


def test_collect_images_searches_folders_and_keeps_named_files(tmp_path):
    (tmp_path / "sub").mkdir()
    for name in ("b.jpg", "a.PNG", "sub/c.jpeg", "skip.csv", ".hidden.jpg"):
        (tmp_path / name).write_bytes(b"")
    named = tmp_path / "odd-name.dat"
    assert collect_images([tmp_path, named]) == [tmp_path / "a.PNG", tmp_path / "b.jpg", tmp_path / "sub/c.jpeg", named]
    with pytest.raises(PetpipeError, match="top-k"):
        list(predict_files(SimpleNamespace(classes=["a"], presize=8), [named], top_k=0))


@pytest.mark.parametrize("split", ["train", "valid"])
def test_show_batch_draws_either_split(trained, tmp_path, split):
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(trained.params_dict))
    out = tmp_path / f"{split}.png"
    result = CliRunner().invoke(
        main,
        [
            "show-batch",
            "--params",
            str(params_file),
            "--images",
            str(SAMPLE_IMAGES),
            "--index",
            str(trained.index),
            "--split",
            split,
            "--n",
            "4",
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    assert out.read_bytes()[:8] == PNG_MAGIC
    assert f"{split} images -> {out}" in result.stdout


def test_every_cli_command_documents_its_options():
    for command, options in {
        "predict": ["--model", "--top-k", "--json", "--batch-size", "--device"],
        "export": ["--model", "--out"],
        "show-batch": ["--images", "--index", "--split", "--n", "--out", "--params"],
        "evaluate": ["--confusion-normalized-plot"],
    }.items():
        result = CliRunner().invoke(main, [command, "--help"])
        assert result.exit_code == 0
        for option in options:
            assert option in result.output, (command, option)
    overview = CliRunner().invoke(main, ["--help"]).output
    for variable in ("PETPIPE_CACHE_DIR", "PETPIPE_CACHE_GB", "PETPIPE_TRACKING", "MLFLOW_TRACKING_URI"):
        assert variable in overview, variable
    dvc_cmd = yaml.safe_load((Path(__file__).resolve().parents[1] / "dvc.yaml").read_text())
    evaluate_cmd = dvc_cmd["stages"]["evaluate"]["cmd"]
    assert "--confusion-normalized-plot stages/evaluate/confusion_normalized.png" in evaluate_cmd
    # a figure is an image plot (dvc plots diff shows each revision's), cached like an out
    assert "stages/evaluate/confusion_normalized.png" in dvc_cmd["stages"]["evaluate"]["plots"]
