"""The app's inspection views on the tiny backbone: heatmap clicks, agreement, report, batch.

The handlers are called the way Gradio calls them (clicks arrive as ``gr.SelectData``); a
counting factory checks that none of these views runs a model again.
"""

from __future__ import annotations

import csv
import io
import re
import zipfile
from pathlib import Path

import gradio as gr
import numpy as np
import pytest
from PIL import Image

import app
from conftest import CountingFactory
from detector import limits, synthetic
from detector.inspection import ReportLayout
from detector.service import InspectionService
from ui import views

METHODS = ["InCTRL", "AnoPLe", "FAPrompt"]
QUERY_SIZE = (64, 96)  # (height, width): not square


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("inspection_app")
    paths = {}
    for i in range(2):
        paths[f"normal{i}"] = folder / f"normal{i}.png"
        Image.fromarray(synthetic.texture("weave", 4, QUERY_SIZE, i)).save(paths[f"normal{i}"])
    # an exact copy of normal 0 under another name
    paths["copy"] = folder / "copy_of_normal0.png"
    paths["copy"].write_bytes(paths["normal0"].read_bytes())
    for i in range(3):
        defective, _ = synthetic.add_defect(synthetic.texture("weave", 4, QUERY_SIZE, 20 + i), seed=i)
        paths[f"query{i}"] = folder / f"query{i}.png"
        Image.fromarray(defective).save(paths[f"query{i}"])
    paths["broken"] = folder / "broken.png"
    paths["broken"].write_bytes(b"not an image" * 20)
    return paths


@pytest.fixture(scope="module")
def demo():
    config = app.AppConfig(backbone="tiny-test", backbone_weights="random", method_options={"anople": {"steps": 2}}, examples=False)
    factory = CountingFactory()
    service = InspectionService(config.service_config(), factory=factory)
    blocks = app.build_demo(config, service=service)
    return blocks, blocks.inspection_app, factory


def normal_gallery(images):
    return [(str(images["normal0"]), None), (str(images["normal1"]), None)]


def detect(handlers, images, query, methods=METHODS, threshold=0.5):
    outputs = handlers.detect(normal_gallery(images), str(query), methods, "fabric", threshold, progress=None)
    return outputs[0], outputs[-1]


def click(x, y):
    return gr.SelectData(None, {"index": [x, y], "value": None})


def patch_of(text, prefix):
    match = re.search(prefix + r"\(row (\d+), col (\d+)\)", text)
    assert match, text
    return int(match.group(1)), int(match.group(2))


def block_id(blocks, elem_id):
    return next(b._id for b in blocks.blocks.values() if getattr(b, "elem_id", None) == elem_id)


def handlers_of(blocks, elem_id, trigger):
    target = block_id(blocks, elem_id)
    return [fn.fn for fn in blocks.fns.values() if any(t == (target, trigger) for t in fn.targets)]


# ----------------------------------------------------------------------------- heatmap click
@pytest.mark.parametrize("method", ["inctrl", "anople"])
def test_click_on_a_copy_of_a_normal_finds_the_same_patch_without_predicting(demo, images, method):
    _, handlers, factory = demo
    summary, report = detect(handlers, images, images["copy"], methods=["InCTRL", "AnoPLe"])
    predicts, fits = factory.predicts, factory.fits
    height, width = QUERY_SIZE
    for x, y in ((5, 5), (width - 3, height // 2), (width // 2, height - 2)):
        text, query_image, normal_image = handlers.explain(method, report, summary, click(x, y))
        assert "image 1 of 2" in text and "cosine similarity 1.000" in text, text
        assert patch_of(text, "patch ") == patch_of(text, "image 1 of 2, ")
        normal0 = np.asarray(Image.open(images["normal0"]).convert("RGB"))
        # the same box on the same pixels: the query is normal 0, so outside the drawn
        # marker both pictures differ from the plain image at the same box outline
        assert normal_image.shape == normal0.shape and query_image.shape == normal0.shape
        box_on_normal = np.any(normal_image != normal0, axis=-1)
        box_on_query = np.any(query_image != normal0, axis=-1)
        assert box_on_normal.any() and np.all(box_on_query[box_on_normal])
    assert (factory.predicts, factory.fits) == (predicts, fits)


def test_click_on_faprompt_lists_prompt_similarities(demo, images):
    _, handlers, factory = demo
    summary, report = detect(handlers, images, images["query0"], methods=["FAPrompt"])
    predicts = factory.predicts
    text, query_image, normal_image = handlers.explain("faprompt", report, summary, click(10, 20))
    assert normal_image is None and query_image.shape[:2] == QUERY_SIZE
    rows = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| prompt")]
    assert len(rows) == 11  # the normal prompt and ten abnormality prompts
    values = [float(line.rstrip(" |").split("|")[-1]) for line in rows]
    assert all(-1.0 <= v <= 1.0 for v in values)
    assert factory.predicts == predicts


def test_click_errors_are_clear(demo, images):
    _, handlers, _ = demo
    with pytest.raises(gr.Error, match="Run an inspection first"):
        handlers.explain("inctrl", None, None, click(1, 1))
    summary, report = detect(handlers, images, images["query0"], methods=["FAPrompt"])
    with pytest.raises(gr.Error, match="InCTRL has no result"):
        handlers.explain("inctrl", report, summary, click(1, 1))
    with pytest.raises(gr.Error, match="outside"):
        handlers.explain("faprompt", report, summary, click(QUERY_SIZE[1] + 5, 1))


def test_every_heatmap_is_clickable(demo):
    blocks, handlers, _ = demo
    for method in handlers.methods:
        assert len(handlers_of(blocks, f"overlay-{method}", "select")) == 1


# ----------------------------------------------------------------------------- agreement
def test_agreement_follows_the_threshold_without_models(demo, images):
    blocks, handlers, factory = demo
    summary, report = detect(handlers, images, images["query1"])
    predicts = factory.predicts
    # The last two render outputs: the agreement image and its line, redrawn with every
    # redraw (a Run's messages, an example, the threshold slider), with no model run.
    image_all, text_all = handlers.rerender(report, summary, 0.0, 0.5, "jet")[-2:]
    image_none, text_none = handlers.rerender(report, summary, 1.0, 0.5, "jet")[-2:]
    assert "3 of 3 methods" in text_all and image_all.shape == (*QUERY_SIZE, 3)
    expected_none = sum(
        bool((o.calibrated_map() >= 1.0).any()) for o in report.outcomes
    )
    assert (expected_none == 0) == ("None of the 3 methods" in text_none)
    assert not np.array_equal(image_all, image_none)
    assert factory.predicts == predicts
    assert handlers.render(report, 0.0, 0.5, "jet")[-2:][1] == text_all
    assert views.agreement_outputs(None, 0.5) == (None, "")
    assert handlers.empty_outputs()[-2:] == (None, "")
    # No event of its own: the agreement is part of the results' outputs.
    assert handlers_of(blocks, "summary", "change") == []


# ----------------------------------------------------------------------------- report
def test_report_download_is_a_png_of_the_expected_size(demo, images):
    _, handlers, factory = demo
    summary, report = detect(handlers, images, images["query2"])
    predicts = factory.predicts
    path = Path(handlers.report_file(report, summary, 0.5, 0.5, "jet"))
    assert path.suffix == ".png" and path.name.startswith("report_query2")
    with Image.open(path) as picture:
        assert picture.format == "PNG"
        assert picture.width == ReportLayout().width(3)
        assert picture.height > ReportLayout().panel
    assert factory.predicts == predicts
    with pytest.raises(gr.Error, match="Run an inspection first"):
        handlers.report_file(None, None, 0.5, 0.5, "jet")


# ----------------------------------------------------------------------------- batch
@pytest.fixture(scope="module")
def batch(demo, images):
    _, handlers, factory = demo
    queries = [str(images[f"query{i}"]) for i in range(3)] + [str(images["broken"])]
    before = (factory.predicts, factory.fits)
    outputs = handlers.run_batch(
        queries, normal_gallery(images), ["InCTRL", "FAPrompt"], "fabric", 0.5, progress=None
    )
    return outputs, before, (factory.predicts, factory.fits)


def test_batch_ranking_equals_sorting_individual_predictions(demo, images, batch):
    _, handlers, _ = demo
    (flagged, table, csv_path, zip_path, session), _, _ = batch
    assert isinstance(session, app.BatchSession)
    for method, name in (("inctrl", "InCTRL"), ("faprompt", "FAPrompt")):
        rows = [row for row in table if row[3] == name]
        assert [row[0] for row in rows] == [1, 2, 3]
        individual = {}
        for i in range(3):
            summary, _ = detect(handlers, images, images[f"query{i}"], methods=[name])
            individual[f"query{i}.png"] = summary["methods"][method]["calibrated_score"]
        expected = sorted(individual, key=lambda n: -individual[n])
        assert [row[2] for row in rows] == expected
        for row in rows:
            assert row[5] == pytest.approx(individual[row[2]], abs=1e-3)
            assert row[1].startswith("![thumbnail](data:image/png;base64,")
    assert "skipped **broken.png**" in flagged


def test_batch_fits_once_and_exports_csv_and_zip(batch):
    (flagged, table, csv_path, zip_path, session), before, after = batch
    assert after[1] - before[1] <= 2  # at most one fit per method for the whole batch
    assert after[0] - before[0] == 3 * 2  # one prediction per image and method
    with open(csv_path, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 3 * 2
    assert {(r["image"], r["method"]) for r in rows} == {
        (f"query{i}.png", m) for i in range(3) for m in ("inctrl", "faprompt")
    }
    with zipfile.ZipFile(zip_path) as archive:
        names = archive.namelist()
        assert len(names) == 6 and all(n.endswith(".png") for n in names)
        with Image.open(io.BytesIO(archive.read(names[0]))) as overlay:
            assert overlay.size == (QUERY_SIZE[1], QUERY_SIZE[0])
    counts = {m: sum(1 for r in rows if r["method"] == m and r["verdict"] == "anomalous") for m in ("inctrl", "faprompt")}
    assert f"**InCTRL**: {counts['inctrl']} of 3 flagged" in flagged


def test_threshold_redraws_the_batch_without_models(demo, batch):
    _, handlers, factory = demo
    (_, _, _, _, session), _, _ = batch
    predicts = factory.predicts
    flagged_low, table_low, csv_low = handlers.render_batch(session, 0.0)
    flagged_high, table_high, _ = handlers.render_batch(session, 1.0)
    assert all(row[6] == "anomalous" for row in table_low)
    assert all(row[6] == ("anomalous" if row[5] >= 1.0 else "normal") for row in table_high)
    assert "**InCTRL**: 3 of 3 flagged" in flagged_low
    assert "threshold,verdict" in Path(csv_low).read_text().splitlines()[0].replace("calibrated,", "")
    assert factory.predicts == predicts
    assert handlers.render_batch(None, 0.5) == (gr.skip(), gr.skip(), gr.skip())


def test_clicking_a_batch_row_opens_it_in_the_single_view(demo, images, batch):
    blocks, handlers, _ = demo
    (_, table, _, _, session), _, _ = batch
    row = table[0]
    path, tabs = handlers.open_batch_row(session, gr.SelectData(None, {"index": [0, 2], "value": row[2], "row_value": row}))
    assert Path(path) == images[Path(row[2]).stem]
    assert tabs.selected == "single"
    chained = [fn for fn in blocks.fns.values() if fn.fn == handlers.open_batch_row]
    assert len(chained) == 1
    follow_up = [fn.fn for fn in blocks.fns.values() if fn.trigger_after == chained[0]._id]
    assert handlers.detect in follow_up


def test_batch_refusals_are_clear(demo, images, monkeypatch):
    _, handlers, factory = demo
    predicts = factory.predicts
    with pytest.raises(gr.Error, match="Upload the query images"):
        handlers.run_batch([], normal_gallery(images), ["InCTRL"], "fabric", 0.5, progress=None)
    monkeypatch.setattr(limits, "MAX_BATCH_QUERIES", 2)
    queries = [str(images[f"query{i}"]) for i in range(3)]
    with pytest.raises(gr.Error, match="at most 2 are accepted in one batch"):
        handlers.run_batch(queries, normal_gallery(images), ["InCTRL"], "fabric", 0.5, progress=None)
    with pytest.raises(gr.Error, match="AnoPLe needs 1"):
        handlers.run_batch(queries[:1], None, ["AnoPLe"], "fabric", 0.5, progress=None)
    assert factory.predicts == predicts
