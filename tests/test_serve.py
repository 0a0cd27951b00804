"""petpipe serve's HTTP surface, in process (Starlette's TestClient) with an untrained model: uploads are
size-limited and type-checked, only indexed images inside --images are served, decisions reach the CSV,
everything rendered is escaped. tests/test_browser.py clicks through a real server with a trained one."""

from __future__ import annotations

import json
import os
import shutil
import socket
from pathlib import Path

import pandas as pd
import pytest
from click.testing import CliRunner
from starlette.testclient import TestClient

from helpers import SAMPLE_IMAGES, model_spec, write_params
from petpipe.cli import main
from petpipe.data import image_index
from petpipe.inference.predict import load_predictor, predict_files
from petpipe.model.backbones import build_model
from petpipe.model.checkpoint import Checkpoint, save_checkpoint
from petpipe.serve import ServeSettings, create_app

PHOTOS = ["Abyssinian_101.jpg", "Abyssinian_12.jpg", "Bengal_107.jpg", "Bengal_109.jpg", "beagle_10.jpg"]
CLASSES = ["Abyssinian", "Bengal", "beagle"]


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """Five sample photos, their index, an untrained 3-class model and evaluate outputs naming a class in HTML."""
    root = tmp_path_factory.mktemp("serve")
    images = root / "images"
    images.mkdir()
    for name in PHOTOS:
        (images / name).write_bytes((SAMPLE_IMAGES / name).read_bytes())
    (root / "outside.jpg").write_bytes((SAMPLE_IMAGES / PHOTOS[0]).read_bytes())
    os.symlink(root / "outside.jpg", images / "Bengal_999.jpg")  # a link out of the images folder
    rows = [
        {
            "path": name,
            "label": name.rsplit("_", 1)[0],
            "split": "valid" if name == "Abyssinian_101.jpg" else "train",
            "width": 1,
            "height": 1,
            "hash": image_index.check_image(images / name).hash,
        }
        for name in [*PHOTOS, "Bengal_999.jpg"]
    ]
    rows.append({**rows[0], "path": "../outside.jpg"})  # an index row pointing out of the folder
    pd.DataFrame(rows, columns=image_index.INDEX_COLUMNS).to_csv(root / "index.csv", index=False)
    spec = model_spec("tf_efficientnet_lite0", "none", img_size=32, presize=40, classes=tuple(CLASSES))
    model = build_model(spec, pretrained=False).eval()
    save_checkpoint(root / "model.pt", Checkpoint.of(model, spec, stage="finetune", params={}, history=[]))
    evaluate = root / "evaluate"
    evaluate.mkdir()
    (evaluate / "metrics.json").write_text(
        json.dumps(
            {
                "checkpoint": "finetune",
                "images": 2,
                "accuracy": 0.5,
                "error_rate": 0.5,
                "top5_accuracy": 1.0,
                "loss": 0.9,
                "macro_f1": 0.4,
                "per_class": {"<b>cat</b>": {"precision": 1.0, "recall": 0.5, "f1": 0.6, "support": 2}},
            }
        )
    )
    (evaluate / "most_confused.csv").write_text("actual,predicted,count\n<script>alert(1)</script>,Bengal,3\n")
    (evaluate / "confusion.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 16)
    (root / "corrections.csv").write_text("path,action,label\n")
    return root


def settings_of(project: Path, **changes) -> ServeSettings:
    return ServeSettings(
        **{
            "model": project / "model.pt",
            "index": project / "index.csv",
            "images": project / "images",
            "evaluate": project / "evaluate",
            "audit": project / "audit",
            "corrections": project / "corrections.csv",
            "max_upload_bytes": 10 * 2**20,
            **changes,
        }
    )


@pytest.fixture(scope="module")
def client(project) -> TestClient:
    return TestClient(create_app(settings_of(project)), base_url="http://127.0.0.1:8000")


def upload(client: TestClient, name: str, body: bytes):
    return client.post(f"/api/predict?name={name}", content=body, headers={"content-type": "application/octet-stream"})


def test_an_uploaded_photo_gets_the_top_5_that_petpipe_predict_gives(client, project):
    photo = project / "images" / "Bengal_107.jpg"
    answer = upload(client, "Bengal_107.jpg", photo.read_bytes())
    assert answer.status_code == 200, answer.text
    predictions = answer.json()["predictions"]
    expected = next(predict_files(load_predictor(project / "model.pt", device="cpu"), [photo], top_k=5))
    assert [row["label"] for row in predictions] == [label for label, _ in expected.labels]  # 3 classes: all 3
    assert [row["probability"] for row in predictions] == pytest.approx([p for _, p in expected.labels], abs=1e-6)
    assert sum(row["probability"] for row in predictions) == pytest.approx(1.0)


def test_a_bad_upload_gets_a_message_and_the_server_keeps_serving(client, project):
    not_an_image = upload(client, "notes.jpg", b"these are my notes, not a photo\n" * 10)
    assert not_an_image.status_code == 415
    assert not_an_image.json()["error"] == "notes.jpg: not an image (no image format recognised)"
    truncated = upload(client, "half.jpg", (project / "images" / "beagle_10.jpg").read_bytes()[:2000])
    assert truncated.status_code == 415 and truncated.json()["error"].startswith("half.jpg: cannot read image (")
    assert upload(client, "empty.jpg", b"").json()["error"] == "empty.jpg: empty file"
    assert upload(client, "Bengal_107.jpg", (project / "images" / "Bengal_107.jpg").read_bytes()).status_code == 200


def test_an_upload_over_the_limit_is_refused_while_it_is_read(project):
    small = TestClient(create_app(settings_of(project, max_upload_bytes=4096)), base_url="http://127.0.0.1:8000")
    photo = (project / "images" / "beagle_10.jpg").read_bytes()
    assert len(photo) > 4096
    answer = upload(small, "big.jpg", photo)
    assert answer.status_code == 413
    assert answer.json()["error"] == "big.jpg: larger than the 0.00390625 MB limit (petpipe serve --max-upload-mb)"

    def chunks():  # no Content-Length: the limit must hold while streaming
        for start in range(0, len(photo), 1024):
            yield photo[start : start + 1024]

    streamed = small.post("/api/predict?name=big.jpg", content=chunks())
    assert streamed.status_code == 413
    assert small.get("/").status_code == 200


def test_only_indexed_images_inside_the_images_folder_are_served(client):
    picture = client.get("/image/Bengal_107.jpg")
    assert picture.status_code == 200 and picture.headers["content-type"] == "image/jpeg"
    assert picture.content.startswith(b"\xff\xd8")
    for path in [
        "/image/../outside.jpg",
        "/image/..%2Foutside.jpg",
        "/image/%2e%2e/outside.jpg",
        "/image/Bengal_999.jpg",  # indexed, but a link out of the folder
        "/image//etc/passwd",
        "/image/notes.txt",
        "/figure/metrics.json",
        "/figure/..%2Findex.csv",
    ]:
        answer = client.get(path)
        assert answer.status_code == 404, path
        assert b"Abyssinian" not in answer.content and b"\xff\xd8" not in answer.content[:2]


def test_decisions_are_saved_to_the_corrections_csv(client, project):
    def decide(**decision):
        return client.post("/api/corrections", json=decision)

    relabel = decide(path="Abyssinian_101.jpg", decision="relabel", label="Bengal")
    assert relabel.status_code == 200, relabel.text
    assert decide(path="beagle_10.jpg", decision="exclude").json()["exclude"] == 1
    assert (
        project / "corrections.csv"
    ).read_text() == "path,action,label\nAbyssinian_101.jpg,relabel,Bengal\nbeagle_10.jpg,exclude,\n"
    assert relabel.json()["message"] == (
        f"Abyssinian_101.jpg: relabelled as Bengal. {project / 'corrections.csv'} "
        "now relabels 1 and excludes 0 image(s); commit it and run dvc repro to retrain."
    )
    assert decide(path="beagle_10.jpg", decision="keep").json()["exclude"] == 0
    assert image_index.load_corrections(project / "corrections.csv") == {
        "Abyssinian_101.jpg": image_index.Correction("relabel", "Bengal")
    }
    assert (
        decide(path="beagle_10.jpg", decision="relabel", label="unicorn").json()["error"]
        == "'unicorn' is not a class of the model"
    )
    assert decide(path="../outside.jpg2", decision="exclude").status_code == 400
    assert decide(path="beagle_10.jpg", decision="delete").status_code == 400
    # A cross-site form post (not JSON) and a request for another host name (DNS rebinding) are refused.
    form = client.post("/api/corrections", data={"path": "beagle_10.jpg", "decision": "exclude"})
    assert form.status_code == 415
    assert (
        client.post(
            "/api/corrections", json={"path": "beagle_10.jpg", "decision": "exclude"}, headers={"host": "evil.example"}
        ).status_code
        == 400
    )
    assert "beagle_10.jpg" not in (project / "corrections.csv").read_text()


def test_the_clean_page_lists_a_class_by_loss_and_shows_recorded_decisions(client, project):
    (project / "corrections.csv").write_text("path,action,label\nAbyssinian_12.jpg,exclude,\n")
    page = client.get("/clean?split=train&label=Abyssinian")
    assert page.status_code == 200
    assert page.text.count('class="candidate') == 1 and 'data-path="Abyssinian_12.jpg"' in page.text
    assert '<option value="exclude" selected>' in page.text
    assert client.get("/clean?split=test&label=Abyssinian").status_code == 400
    (project / "corrections.csv").write_text("path,action,label\nAbyssinian_12.jpg,rename,\n")  # edited by hand
    broken = client.get("/clean?split=train&label=Abyssinian")
    assert broken.status_code == 409 and "action must be relabel or exclude" in broken.text
    (project / "corrections.csv").write_text("path,action,label\n")


def test_the_results_page_escapes_what_it_renders(client, project):
    page = client.get("/results")
    assert page.status_code == 200
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page.text and "<script>alert" not in page.text
    assert "&lt;b&gt;cat&lt;/b&gt;" in page.text
    assert '<img src="/figure/confusion.png" alt="Confusion matrix">' in page.text
    assert "0.5000" in page.text
    empty = TestClient(create_app(settings_of(project, evaluate=project / "nothing")), base_url="http://127.0.0.1")
    assert "No evaluation in" in empty.get("/results").text


def test_the_results_page_shows_the_test_split_beside_valid_when_there_is_one(client, project, tmp_path):
    assert "<th>test</th>" not in client.get("/results").text  # no test_ metrics: valid alone
    folder = tmp_path / "evaluate"
    shutil.copytree(project / "evaluate", folder)
    metrics = json.loads((folder / "metrics.json").read_text())
    metrics.update(
        {
            "balanced_accuracy": 0.45,
            "test_images": 3,
            "test_accuracy": 0.6667,
            "test_error_rate": 0.3333,
            "test_top5_accuracy": 1.0,
            "test_loss": 0.7,
            "test_macro_f1": 0.55,
            "test_balanced_accuracy": 0.625,
        }
    )
    (folder / "metrics.json").write_text(json.dumps(metrics))
    (folder / "test_confusion.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 16)
    page = TestClient(create_app(settings_of(project, evaluate=folder)), base_url="http://127.0.0.1").get("/results")
    assert "<th>valid</th><th>test</th>" in page.text and "3 test images that nothing tuned on" in page.text
    assert '<td>0.5000</td><td class="test">0.6667</td>' in page.text and "0.6250" in page.text
    assert '<img src="/figure/test_confusion.png" alt="Test confusion matrix">' in page.text


def test_the_cli_refuses_a_missing_model_and_a_port_in_use_with_one_line(project, tmp_path):
    help_text = CliRunner().invoke(main, ["serve", "--help"]).output
    for option in ("--model", "--index", "--images", "--evaluate", "--params", "--host", "--port", "--max-upload-mb"):
        assert option in help_text, option
    assert "127.0.0.1" in help_text and "serve" in CliRunner().invoke(main, ["--help"]).output
    write_params(tmp_path / "params.yaml", {})
    missing = CliRunner().invoke(
        main, ["serve", "--params", str(tmp_path / "params.yaml"), "--model", str(tmp_path / "none.pt")]
    )
    assert missing.exit_code == 1
    assert (
        missing.output.strip() == f"Error: checkpoint {tmp_path / 'none.pt'} not found; run the stage that "
        "writes it (dvc repro)"
    )
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        busy = CliRunner().invoke(
            main,
            [
                "serve",
                "--params",
                str(tmp_path / "params.yaml"),
                "--model",
                str(project / "model.pt"),
                "--port",
                str(port),
            ],
        )
    assert busy.exit_code == 1
    assert busy.output.startswith(f"Error: cannot listen on 127.0.0.1:{port} (") and busy.output.count("\n") == 1


def test_the_clean_page_leads_with_the_audits_suspects_and_duplicates(client, project):
    """Clean opens on Suspects (label_issues.csv, most suspect first, today's label, the suggestion one click
    away); Duplicates shows each pair side by side with its leak; before the audit stage ran, a line says so."""
    assert "No audit yet" in client.get("/clean").text
    audit = project / "audit"  # the audit stage's folder, not evaluate's
    audit.mkdir()
    (audit / "label_issues.csv").write_text(
        "path,split,label,suggested,quality,issue\n"
        "Bengal_107.jpg,train,Bengal,Abyssinian,0.02,True\n"
        "gone_1.jpg,train,Bengal,beagle,0.03,True\n"  # excluded since the audit ran: not shown
        "Abyssinian_12.jpg,train,Bengal,Abyssinian,0.10,False\n"  # relabelled back since: today's label shown
        "beagle_10.jpg,train,beagle,beagle,0.40,False\n"
    )
    (audit / "duplicates.csv").write_text(
        "path_a,path_b,split_a,split_b,similarity\nAbyssinian_101.jpg,Abyssinian_12.jpg,valid,train,0.97\n"
    )
    try:
        page = client.get("/clean")
        assert page.status_code == 200 and 'aria-current="page">Suspects' in page.text
        shown = [
            line.split('data-path="')[1].split('"')[0] for line in page.text.splitlines() if 'class="candidate' in line
        ]
        assert shown == ["Bengal_107.jpg", "Abyssinian_12.jpg", "beagle_10.jpg"]  # most suspect first
        assert "labelled Abyssinian · quality 0.100" in page.text  # index.csv's label, not the audit's
        assert (
            '<button type="button" class="accept" data-label="Abyssinian">relabel as Abyssinian</button>' in page.text
        )
        assert page.text.count('class="accept"') == 1  # the others' suggestion is their label: nothing to accept
        assert "cleanlab flags 2 likely label issue(s)" in page.text
        pairs = client.get("/clean?view=duplicates")
        assert pairs.status_code == 200 and pairs.text.count('class="pair leak"') == 1
        assert pairs.text.count('<button type="button" class="exclude">exclude</button>') == 2
        assert "1 leak(s) across train and valid" in pairs.text
        assert client.get("/clean?view=nothing").status_code == 400
    finally:
        (audit / "label_issues.csv").unlink()
        (audit / "duplicates.csv").unlink()
