"""Inspection tools (detector/inspection.py) on the tiny random CLIP and on constructed maps."""

from __future__ import annotations

import csv
import io
import zipfile

import numpy as np
import pytest
from PIL import Image

from detector import create_detector, inspection, maps
from detector.service_batch import run_batch
from detector.synthetic import texture

NORMAL_SIZE = (72, 104)  # H, W: not square, so boxes map through a real geometry




@pytest.fixture(scope="module")
def normals() -> list[np.ndarray]:
    return [texture("weave", 3, NORMAL_SIZE, i) for i in range(3)]


@pytest.fixture(scope="module")
def queries(normals) -> list[tuple[str, np.ndarray]]:
    rng = np.random.default_rng(7)
    noisy = np.clip(normals[0].astype(int) + rng.integers(-60, 60, normals[0].shape), 0, 255).astype(np.uint8)
    return [
        ("copy of normal 2.png", normals[1].copy()),
        ("noisy.png", noisy),
        ("other texture.png", texture("grating", 5, (64, 90), 0)),
        ("dir/odd name?.jpg", texture("weave", 3, NORMAL_SIZE, 9)),
    ]


def make(method: str):
    options = {"steps": 2} if method == "anople" else {}
    return create_detector(method, backbone="tiny-test", backbone_weights="random", **options)


@pytest.fixture(scope="module")
def fitted(normals) -> dict:
    return {method: make(method).fit(normals) for method in ("inctrl", "anople", "faprompt")}


# ----------------------------------------------------------------------------- explanations


@pytest.mark.parametrize("method", ["inctrl", "anople"])
def test_nearest_normal_of_an_exact_copy_is_the_same_patch(fitted, normals, method):
    det = fitted[method]
    query = normals[1].copy()
    result = det.predict(query)
    geometry = result.geometry
    for x, y in [(3, 4), (50, 35), (101, 70)]:
        view = inspection.explanation_view(det, result, query, normals, x, y)
        details = view.details
        row, col = details["patch"]
        assert (row, col) == maps.pixel_to_patch(geometry, det.grid, x, y)
        assert details["normal_index"] == 1
        assert tuple(details["normal_patch"]) == (row, col)
        assert tuple(details["box"]) == maps.patch_box(geometry, det.grid, row, col)
        assert details["similarity"] == pytest.approx(1.0, abs=1e-5)
        # The normal image is normal 2 with the box outlined; pixels away from the box unchanged.
        x0, y0, x1, y1 = details["box"]
        assert view.normal_image.shape == normals[1].shape
        changed = np.any(view.normal_image != normals[1], axis=-1)
        assert changed[y0, x0:x1].any() and changed[y1 - 1, x0:x1].any()
        outside = np.ones(changed.shape, bool)
        outside[max(y0 - 3, 0) : y1 + 3, max(x0 - 3, 0) : x1 + 3] = False
        assert not changed[outside].any()
        assert np.any(view.query_image != query)
        assert "image 2 of 3" in view.text and "1.000" in view.text
        assert view.prompt_similarities == []


def test_explanation_reports_the_calibrated_value_and_checks_sizes(fitted, normals, queries):
    det = fitted["inctrl"]
    calibration = det.calibrate()
    query = queries[2][1]
    result = det.predict(query)
    view = inspection.explanation_view(det, result, query, normals, 20, 10, calibration=calibration)
    expected = float(calibration.normalize_map(result.anomaly_map)[10, 20])
    assert view.calibrated_value == pytest.approx(expected)
    assert f"calibrated {expected:.2f}" in view.text
    with pytest.raises(ValueError, match="does not match"):
        inspection.explanation_view(det, result, normals[0], normals, 20, 10)
    with pytest.raises(IndexError):
        inspection.explanation_view(det, result, query, normals, 90, 10)


def test_faprompt_explanation_lists_prompt_similarities(fitted, normals, queries):
    det = fitted["faprompt"]
    query = queries[2][1]
    result = det.predict(query)
    view = inspection.explanation_view(det, result, query, normals, 40, 30)
    assert view.normal_image is None
    similarities = view.details["prompt_similarities"]
    assert [value for _, value in view.prompt_similarities] == list(similarities.values())
    assert view.prompt_similarities[0][0] == "normal" and len(view.prompt_similarities) == 11
    assert view.prompt_similarities[2][0] == "abnormal 2 (crack)"  # training-free word prompts
    best = max(view.prompt_similarities[1:], key=lambda item: item[1])
    assert f"closest abnormality prompt: {best[0]}" in view.text
    x0, y0, x1, y1 = view.details["box"]
    assert x0 <= 40 < x1 and y0 <= 30 < y1
    assert np.any(view.query_image[y0, x0:x1] != query[y0, x0:x1])


# ----------------------------------------------------------------------------- agreement


def rect(shape, x0, y0, x1, y1, inside=0.9, outside=0.1) -> np.ndarray:
    """Map with ``inside`` on the inclusive box, ``outside`` elsewhere."""
    out = np.full(shape, outside, np.float32)
    out[y0 : y1 + 1, x0 : x1 + 1] = inside
    return out


def test_agreement_counts_colours_and_summary():
    shape = (50, 80)
    a = rect(shape, 10, 10, 30, 30)
    b = rect(shape, 20, 20, 40, 40)
    c = rect(shape, 20, 20, 30, 30)  # inside both: the all-agree region is x, y in 20..30
    c[0:5, 70:80] = 0.7  # only C flags a corner
    base = np.full(shape + (3,), 128, np.uint8)
    result = inspection.agreement({"A": a, "B": b, "C": c}, 0.5, base_image=base)
    expected = (a >= 0.5).astype(int) + (b >= 0.5) + (c >= 0.5)
    np.testing.assert_array_equal(result.counts, expected)
    assert result.level == 3 and result.location == (25, 25) and result.region_area == 121
    assert result.summary == "3 of 3 methods (A, B, C) flag the region near (25, 25)"
    colors = inspection.agreement_colors(3)
    # count 0 keeps the base image; count 3 is the blend towards red, 1 towards yellow.
    np.testing.assert_array_equal(result.image[45, 5], base[45, 5])
    assert result.image[25, 25, 0] > result.image[25, 25, 1] and colors[3] == inspection.AGREEMENT_ALL_COLOR
    assert result.image[2, 75, 0] > 128 and result.image[2, 75, 1] > 128 and result.image[2, 75, 2] < 128
    assert not np.array_equal(result.image[25, 25], result.image[2, 75])


def test_agreement_without_an_all_agree_region_names_the_most_agreed_one():
    shape = (40, 60)
    a = rect(shape, 2, 2, 8, 8)  # A + B overlap: 7 x 7 at x, y 2..8
    b = rect(shape, 2, 2, 12, 8)
    c = rect(shape, 40, 20, 56, 36)  # C alone elsewhere
    a[30:33, 30:33] = 0.8  # a region only A flags
    c[20:23, 50:53] = 0.2  # a hole in C's region
    result = inspection.agreement({"InCTRL": a, "AnoPLe": b, "FAPrompt": c}, 0.5)
    assert result.level == 2 and result.location == (5, 5) and result.region_methods == ("InCTRL", "AnoPLe")
    assert result.summary == "2 of 3 methods (InCTRL, AnoPLe) flag the region near (5, 5)"
    assert result.region_area == 49


def test_agreement_ties_and_threshold():
    d = np.zeros((40, 60), np.float32)
    e = np.zeros((40, 60), np.float32)
    d[2:5, 2:5] = d[30:33, 30:33] = 1.0
    e[2:5, 2:5], e[30:33, 30:33] = 0.7, 0.9
    tie = inspection.agreement({"D": d, "E": e}, 0.5)  # two equal 2-count regions: first in raster order
    assert tie.level == 2 and tie.location == (3, 3) and tie.summary == "2 of 2 methods (D, E) flag the region near (3, 3)"
    higher = inspection.agreement({"D": d, "E": e}, 0.8)
    assert higher.level == 2 and higher.location == (31, 31)
    highest = inspection.agreement({"D": d, "E": e}, 0.95)
    assert highest.level == 1 and highest.location == (3, 3) and highest.region_methods == ("D",)
    assert highest.summary == "1 of 2 methods (D) flags the region near (3, 3)"


def test_agreement_with_nothing_flagged():
    empty = np.zeros((10, 10), np.float32)
    result = inspection.agreement({"A": empty, "B": empty + 0.49}, 0.5)
    assert result.level == 0 and result.location is None
    assert result.summary == "None of the 2 methods flags any region at threshold 0.50"
    assert not result.image.any()
    with pytest.raises(ValueError):
        inspection.agreement({})


# ----------------------------------------------------------------------------- batch mode


@pytest.fixture(scope="module")
def batch(fitted, queries):
    entries = {m: (fitted[m], fitted[m].calibrate()) for m in ("inctrl", "anople")}
    reports: list[tuple[float, str]] = []
    out = run_batch(entries, queries, threshold=0.5, progress=lambda f, m: reports.append((f, m)))
    return entries, out, reports


def test_batch_ranking_equals_sorting_individual_predictions(batch, queries):
    entries, out, reports = batch
    assert len(out.rows) == len(queries) * len(entries)
    assert [row.method for row in out.rows] == ["inctrl"] * len(queries) + ["anople"] * len(queries)
    for method, (det, calibration) in entries.items():
        scores = {name: det.predict(image).score for name, image in queries}
        expected = sorted(scores, key=lambda name: (-calibration.normalize_score(scores[name]), -scores[name], name))
        ranked = [row for row in out.rows if row.method == method]
        assert [row.image for row in ranked] == expected
        for row in ranked:
            assert row.score == pytest.approx(scores[row.image], abs=1e-6)
            assert row.calibrated == pytest.approx(calibration.normalize_score(scores[row.image]), abs=1e-6)
            assert row.verdict == ("anomalous" if row.calibrated >= 0.5 else "normal")
            assert row.thumbnail is not None and max(row.thumbnail.shape[:2]) <= 96
    fractions = [f for f, _ in reports]
    assert fractions == sorted(fractions) and fractions[-1] == pytest.approx(1.0) and len(fractions) == len(out.rows)
    for threshold in (0.0, 0.3, 0.5, 0.9):
        counts = inspection.flagged_counts(out.rows, threshold)
        for method in entries:
            assert counts[method] == sum(r.calibrated >= threshold for r in out.rows if r.method == method)
    assert inspection.flagged_counts(out.rows, 1.01) == {"inctrl": 0, "anople": 0}
    assert out.errors == []


def test_batch_skips_unreadable_images(fitted, queries):
    det = fitted["inctrl"]
    out = run_batch(
        {"inctrl": (det, det.calibrate())}, [("broken.png", b"not an image"), queries[2]], keep_overlays=False
    )
    assert [row.image for row in out.rows] == [queries[2][0]] and out.overlays == []
    assert [name for name, _ in out.errors] == ["broken.png"] and out.errors[0][1]


def test_batch_over_the_limit_is_refused_before_any_work(fitted, queries, monkeypatch):
    from detector import limits

    det = fitted["inctrl"]
    calls = []
    monkeypatch.setattr(det, "predict", lambda image: calls.append(image))
    too_many = [queries[0]] * (limits.MAX_BATCH_QUERIES + 1)
    with pytest.raises(ValueError, match=f"at most {limits.MAX_BATCH_QUERIES}"):
        run_batch({"inctrl": (det, det.calibrate())}, too_many)
    assert calls == []


def test_rank_batch_on_constructed_rows():
    def row(image, method, score, calibrated):
        return inspection.BatchRow(image, method, score, calibrated, 0.5, inspection.verdict(calibrated, 0.5), 0.1)

    rows = [row("a", "m", 0.1, 0.2), row("b", "n", 5.0, 1.0), row("c", "m", 0.9, 1.0), row("d", "m", 0.95, 1.0), row("e", "n", 1.0, 0.0)]
    ranked = inspection.rank_batch(rows)
    assert [(r.method, r.image) for r in ranked] == [("m", "d"), ("m", "c"), ("m", "a"), ("n", "b"), ("n", "e")]
    assert inspection.flagged_counts(rows, 0.5) == {"m": 2, "n": 1}


def test_batch_csv_has_one_row_per_image_and_method(batch, queries):
    entries, out, _ = batch
    text = inspection.batch_csv(out.rows)
    reader = csv.DictReader(io.StringIO(text))
    assert tuple(reader.fieldnames) == inspection.CSV_COLUMNS
    records = list(reader)
    assert len(records) == len(queries) * len(entries)
    assert {(r["image"], r["method"]) for r in records} == {(n, m) for n, _ in queries for m in entries}
    for record, row in zip(records, out.rows):
        assert float(record["score"]) == pytest.approx(row.score, rel=1e-5, abs=1e-9)
        assert float(record["calibrated"]) == pytest.approx(row.calibrated, rel=1e-5, abs=1e-9)
        assert float(record["threshold"]) == 0.5 and record["verdict"] == row.verdict


def test_overlays_zip_holds_one_png_per_image_and_method(batch, queries):
    entries, out, _ = batch
    assert len(out.overlays) == len(queries) * len(entries)
    data = inspection.overlays_zip(out.overlays)
    sizes = {name: image.shape[:2] for name, image in queries}
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        names = archive.namelist()
        assert len(names) == len(set(names)) == len(queries) * len(entries)
        assert "copy_of_normal_2_inctrl.png" in names and "odd_name_anople.png" in names
        for name in names:
            assert name.endswith(".png") and "/" not in name and " " not in name
        for (image_name, method, overlay), name in zip(out.overlays, names):
            with Image.open(io.BytesIO(archive.read(name))) as picture:
                assert picture.format == "PNG"
                np.testing.assert_array_equal(np.asarray(picture.convert("RGB")), overlay)
                assert overlay.shape[:2] == sizes[image_name]
    repeated = inspection.overlays_zip([("x.png", "m", out.overlays[0][2])] * 2)
    assert zipfile.ZipFile(io.BytesIO(repeated)).namelist() == ["x_m.png", "x_m-2.png"]


# ----------------------------------------------------------------------------- report


def test_report_file_opens_with_the_expected_size(fitted, normals, queries, tmp_path):
    query = queries[1][1]
    panels = []
    for method in ("inctrl", "anople", "faprompt"):
        det = fitted[method]
        calibration = det.calibrate()
        result = det.predict(query)
        calibrated = calibration.normalize_score(result.score)
        panels.append(
            inspection.MethodPanel(
                method=det.display_name,
                overlay=maps.overlay(query, calibration.normalize_map(result.anomaly_map)),
                score=result.score,
                calibrated_score=calibrated,
                threshold=calibration.image_threshold,
                verdict=inspection.verdict(calibrated, 0.5),
                weights=f"{det.describe()['backbone']}: {det.describe()['backbone_weights']}",
                notes=(f"calibration: {calibration.source}",),
            )
        )
    picture = inspection.report_image(query, normals, panels, subtitle="noisy.png")
    layout = inspection.ReportLayout()
    assert picture.dtype == np.uint8 and picture.shape[1] == layout.width(3)
    assert picture.shape[0] > layout.panel * 2  # query row + method row
    path = inspection.save_report(tmp_path / "report.png", query, normals, panels, subtitle="noisy.png")
    with Image.open(path) as opened:
        assert opened.format == "PNG" and opened.size == (picture.shape[1], picture.shape[0])
        np.testing.assert_array_equal(np.asarray(opened.convert("RGB")), picture)
    pdf = inspection.save_report(tmp_path / "report.pdf", query, normals, panels[:1])
    assert pdf.read_bytes().startswith(b"%PDF")
    # Nothing is drawn into the top margin.
    assert picture[: layout.margin, :].min() == 255


def test_panel_from_summary_and_empty_inputs(normals):
    overlay = np.zeros((20, 30, 3), np.uint8)
    summary = {
        "method": "inctrl", "display_name": "InCTRL", "score": 0.7, "calibrated_score": 0.62, "threshold": 0.6,
        "threshold_calibrated": 0.55, "verdict": "anomalous", "weights": "ViT: random", "calibration": "fixed",
        "warnings": ["random weights"],
    }
    panel = inspection.panel_from_summary(summary, overlay)
    assert panel.method == "InCTRL" and panel.threshold_calibrated == 0.55 and panel.notes == ("calibration: fixed", "random weights")
    picture = inspection.report_image(normals[0], [], [panel])
    assert picture.shape[1] == inspection.ReportLayout().width(1)
