"""petpipe serve as a person uses it: headless Chromium (Playwright) clicks through a real `petpipe serve` of
the pipeline the session reproduced: a photo's predicted breed, the Results page's confusion matrix, and two
Clean decisions that the next index-labels applies. It saves the screenshots of README.md and docs/serving.md on the way
(PETPIPE_SCREENSHOTS=docs/screenshots to refresh them)."""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest

from helpers import copy_project, run_command, stale_stages
from petpipe.inference.predict import load_predictor, predict_files

playwright_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (the dev extra)")
CHROMIUM = os.environ.get("PETPIPE_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
if not Path(CHROMIUM).is_file():
    pytest.skip(
        f"no Chromium at {CHROMIUM}: apt-get install chromium (or set PETPIPE_CHROMIUM)", allow_module_level=True
    )
expect = playwright_api.expect

pytestmark = pytest.mark.slow  # reuses the session's `dvc repro` of the sample
# Flags for a quiet, offline, throwaway browser (no GPU, sandbox or first-run work; it phones nobody).
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
VIEWPORT = {"width": 1100, "height": 820}


@pytest.fixture(scope="module")
def project(pipeline_project, tmp_path_factory) -> Path:
    """A copy of the reproduced pipeline (the Clean test writes its corrections and reruns index-labels)."""
    return copy_project(pipeline_project.folder, tmp_path_factory.mktemp("browser") / "project")


@pytest.fixture(scope="module")
def server(project, tmp_path_factory) -> Iterator[str]:
    """`petpipe serve` run from the project folder with its defaults, on a free port; yields its URL."""
    log_path = tmp_path_factory.mktemp("serve-log") / "serve.log"
    petpipe = Path(sys.executable).parent / "petpipe"
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [str(petpipe), "serve", "--port", "0"], cwd=project, stdout=log, stderr=subprocess.STDOUT
        )
    try:
        yield wait_for_url(process, log_path)
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
        print(log_path.read_text()[-3000:])  # shown by pytest when a test failed


def wait_for_url(process: subprocess.Popen, log_path: Path, timeout: float = 120) -> str:
    """The URL the server prints once its model is loaded, after it answers a first request."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, f"petpipe serve exited:\n{log_path.read_text()}"
        lines = [line for line in log_path.read_text().splitlines() if line.startswith("petpipe serve: http://")]
        if lines:
            url = lines[0].split()[2]
            try:
                with urllib.request.urlopen(url, timeout=5) as response:
                    assert response.status == 200
                return url.rstrip("/")
            except OSError:
                pass
        time.sleep(0.2)
    raise AssertionError(f"petpipe serve did not come up in {timeout} s:\n{log_path.read_text()}")


@pytest.fixture(scope="module")
def browser(tmp_path_factory) -> Iterator[object]:
    """Headless Chromium with a fresh profile."""
    with playwright_api.sync_playwright() as driver:
        context = driver.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium-profile")),
            executable_path=CHROMIUM,
            headless=True,
            args=CHROMIUM_ARGS,
            viewport=VIEWPORT,
        )
        yield context
        context.close()


@pytest.fixture()
def page(browser):
    page = browser.new_page()
    yield page
    page.close()


@pytest.fixture(scope="module")
def screenshots(tmp_path_factory) -> Path:
    folder = Path(os.environ.get("PETPIPE_SCREENSHOTS") or tmp_path_factory.mktemp("screenshots"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def drop_file(page, path: Path) -> None:
    """Drag a file from the desktop onto the drop zone (a real drop event carrying the file)."""
    payload = base64.b64encode(path.read_bytes()).decode()
    transfer = page.evaluate_handle(
        """([name, payload]) => {
        const bytes = Uint8Array.from(atob(payload), (c) => c.charCodeAt(0));
        const transfer = new DataTransfer();
        transfer.items.add(new File([bytes], name, { type: "image/jpeg" }));
        return transfer;
    }""",
        [path.name, payload],
    )
    page.dispatch_event("#drop", "drop", {"dataTransfer": transfer})


def save_screenshot(page, path: Path) -> None:
    """The visible page as a 256-colour PNG: a fifth of the bytes, small enough to commit (docs/screenshots)."""
    from PIL import Image

    with Image.open(io.BytesIO(page.screenshot())) as shot:
        shot.convert("RGB").quantize(256, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)


def valid_rows(project: Path) -> pd.DataFrame:
    index = pd.read_csv(project / "stages/index-labels/index.csv", dtype=str, keep_default_na=False)
    return index[index["split"] == "valid"]


def test_a_dropped_photo_shows_the_breed_petpipe_predict_gives(project, server, page, screenshots, tmp_path):
    photos = [project / "stages/fetch/images" / path for path in valid_rows(project)["path"][:2]]
    expected = {
        Path(p.path).name: p.labels
        for p in predict_files(load_predictor(project / "stages/finetune/model.pt", device="cpu"), photos, top_k=5)
    }
    page.goto(server + "/")
    drop_file(page, photos[0])  # dragged onto the page
    page.set_input_files("#photos", str(photos[1]))  # chosen with the file dialog
    for photo in photos:
        card = page.locator(f'.prediction.done[data-name="{photo.name}"]')
        expect(card).to_be_visible(timeout=30_000)
        assert card.locator(".top li .label").all_inner_texts() == [label for label, _ in expected[photo.name]]
        top = f"{100 * expected[photo.name][0][1]:.1f} %"
        assert card.locator(".top li .probability").first.inner_text() == top
        assert card.locator("img").evaluate("image => image.naturalWidth") > 0  # the photo itself is shown
    save_screenshot(page, screenshots / "try-it.png")

    # A file that is no photo gets a message on the page; the next photo is still predicted.
    notes = tmp_path / "notes.jpg"
    notes.write_text("not a photo\n" * 50)
    page.set_input_files("#photos", str(notes))
    expect(page.locator('.prediction.failed[data-name="notes.jpg"] .status')).to_have_text(
        "notes.jpg: not an image (no image format recognised)", timeout=30_000
    )
    page.set_input_files("#photos", str(photos[0]))
    expect(page.locator(f'.prediction.done[data-name="{photos[0].name}"]')).to_have_count(2, timeout=30_000)


def test_results_shows_the_evaluation_and_its_confusion_matrix(project, server, page, screenshots):
    metrics = json.loads((project / "stages/evaluate/metrics.json").read_text())
    page.goto(server + "/results")
    headline = page.locator("table.headline tbody tr").first
    # valid and, beside it, the test split's numbers (the session's pipeline has a three-way split)
    assert [headline.locator("th").inner_text(), *headline.locator("td").all_inner_texts()] == [
        "accuracy",
        f"{metrics['accuracy']:.4f}",
        f"{metrics['test_accuracy']:.4f}",
    ]
    expect(page.locator("table.headline thead")).to_contain_text("test")
    expect(page.locator('img[alt="Test confusion matrix"]')).to_be_visible()
    confusion = page.locator('img[alt="Confusion matrix"]')
    expect(confusion).to_be_visible()
    assert confusion.evaluate("image => image.complete && image.naturalWidth") > 100  # a real PNG, loaded
    expect(page.locator('img[alt^="Top losses"]')).to_be_visible()
    confused = pd.read_csv(project / "stages/evaluate/most_confused.csv", dtype=str, keep_default_na=False)
    first = page.locator("#most-confused tr").nth(1).locator("td").all_inner_texts()
    assert first == list(confused.iloc[0][["actual", "predicted", "count"]])
    worst = pd.read_csv(project / "stages/evaluate/top_losses.csv", dtype=str, keep_default_na=False)
    assert page.locator("#top-losses tr").nth(1).locator("td").first.inner_text() == worst["path"][0]
    save_screenshot(page, screenshots / "results.png")


def test_clean_relabels_and_excludes_and_index_labels_applies_it(project, server, page, screenshots):
    valid = valid_rows(project)
    sizes = valid["label"].value_counts()
    breed = sorted(sizes[sizes >= 2].index)[0]
    other = next(name for name in sorted(set(valid["label"])) if name != breed)
    page.goto(server + f"/clean?split=valid&label={breed}")
    candidates = page.locator("article.candidate")
    expect(candidates).to_have_count(int(sizes[breed]), timeout=60_000)  # losses computed on first visit
    # decode() waits for the photo as a person would, and rejects if it never loads
    assert candidates.first.locator("img").evaluate("image => image.decode().then(() => image.naturalWidth)") > 0
    relabelled, excluded = [candidates.nth(i).get_attribute("data-path") for i in (0, 1)]

    candidates.nth(0).locator("select").select_option(f"relabel:{other}")
    expect(page.locator("#status")).to_contain_text(f"{relabelled}: relabelled as {other}.")
    candidates.nth(1).locator("select").select_option("exclude")
    expect(page.locator("#status")).to_contain_text(
        "now relabels 1 and excludes 1 image(s); commit it and run dvc repro"
    )
    save_screenshot(page, screenshots / "clean.png")
    rows = sorted([f"{relabelled},relabel,{other}", f"{excluded},exclude,"])
    assert (project / "labels/corrections.csv").read_text() == "\n".join(["path,action,label", *rows]) + "\n"
    page.reload()  # the decisions are what the page shows next time
    assert page.locator(f'article[data-path="{relabelled}"] select').input_value() == f"relabel:{other}"
    assert page.locator(f'article[data-path="{excluded}"] select').input_value() == "exclude"

    # The corrections file is index-labels' dependency: `dvc repro` reruns it, then what its index changes.
    before = json.loads((project / "stages/index-labels/report.json").read_text())
    assert stale_stages(project) == {"index-labels"}
    result = run_command(["dvc", "repro", "index-labels"], project)
    assert stale_stages(project) == {"train-head", "audit", "lr-find", "finetune", "evaluate"}
    assert "1 relabelled, 1 excluded by labels/corrections.csv" in result.stdout + result.stderr
    report = json.loads((project / "stages/index-labels/report.json").read_text())
    assert report["corrections"] == {"file": "labels/corrections.csv", "relabelled": 1, "excluded": 1, "ignored": []}
    index = pd.read_csv(project / "stages/index-labels/index.csv", dtype=str, keep_default_na=False)
    assert index.set_index("path").loc[relabelled, "label"] == other and excluded not in set(index["path"])
    assert report["images"] == before["images"] - 1 and before["corrections"]["relabelled"] == 0


def test_clean_leads_with_suspects_whose_suggestion_one_click_accepts_and_duplicates_excluded_either_side(
    project, server, page, screenshots
):
    """Clean opens on the audit's Suspects (the audit stage's label_issues.csv, most suspect first): one click accepts
    the suggested breed. Duplicates shows a pair side by side: one click excludes a side. Both reach the file."""
    corrections = project / "labels/corrections.csv"
    index = pd.read_csv(project / "stages/index-labels/index.csv", dtype=str, keep_default_na=False)
    issues = pd.read_csv(project / "stages/audit/label_issues.csv", dtype=str, keep_default_na=False)
    labels = dict(zip(index["path"], index["label"]))
    page.goto(server + "/clean")
    expect(page.locator('nav.views a[aria-current="page"]')).to_have_text("Suspects")
    cards = page.locator("section.suspects article.candidate")
    shown = issues[issues["path"].isin(labels)]["path"].head(cards.count()).tolist()
    assert cards.count() > 0 and [cards.nth(i).get_attribute("data-path") for i in range(cards.count())] == shown
    card = page.locator("section.suspects article.candidate:has(button.accept)").first
    path, suggested = card.get_attribute("data-path"), card.locator("button.accept").get_attribute("data-label")
    assert suggested == issues.set_index("path").at[path, "suggested"] != labels[path]
    card.locator("button.accept").click()  # one click
    expect(page.locator("#status")).to_contain_text(f"{path}: relabelled as {suggested}.")
    expect(card.locator("select.decision")).to_have_value(f"relabel:{suggested}")
    save_screenshot(page, screenshots / "clean-suspects.png")
    assert f"{path},relabel,{suggested}\n" in corrections.read_text()

    # A pair of a training and a validation photo, as the audit stage writes it (the sample at 64 px has none at the
    # default threshold: tests/test_audit.py checks that a planted copy is found; here the page is checked).
    train = next(p for p in index[index["split"] == "train"]["path"] if p != path)
    valid = next(p for p in index[index["split"] == "valid"]["path"] if p != path)
    (project / "stages/audit/duplicates.csv").write_text(
        f"path_a,path_b,split_a,split_b,similarity\n{train},{valid},train,valid,0.97\n"
    )
    page.goto(server + "/clean?view=duplicates")
    pair = page.locator("article.pair.leak")
    expect(pair).to_have_count(1)
    assert [side.get_attribute("data-path") for side in pair.locator(".candidate").all()] == [train, valid]
    pair.locator(f'.candidate[data-path="{train}"] button.exclude').click()
    expect(page.locator("#status")).to_contain_text(f"{train}: excluded.")
    save_screenshot(page, screenshots / "clean-duplicates.png")
    assert f"{train},exclude,\n" in corrections.read_text() and f"{valid}," not in corrections.read_text()
    page.reload()  # the decisions are what the page shows next time
    assert page.locator(f'.candidate[data-path="{train}"] select').input_value() == "exclude"
