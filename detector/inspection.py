"""Inspection tools beyond a heatmap (pure functions and small dataclasses, no UI code).

* ``explanation_view``: why one patch of the query got its value. For the methods that
  compare with normal patches (InCTRL, AnoPLe) the nearest normal patch, drawn on that
  normal image; for FAPrompt the patch's similarity to the normal and each abnormality
  prompt. Everything comes from ``det.explain`` (cached features, no re-encoding).
* ``agreement``: where the calibrated maps of several methods flag the same pixels, as a
  count map, a colour picture and a one-line summary.
* Batch mode: ``run_batch`` scores many queries with already fitted detectors;
  ``rank_batch``, ``flagged_counts``, ``batch_csv`` and ``overlays_zip`` turn the rows and
  overlays into a ranking, counts, a CSV text and a ZIP archive.
* ``report_image`` / ``save_report``: one slide (PNG or PDF) with the query, the normals,
  every method's overlay, scores, thresholds and the weights each method ran on.

Images are uint8 ``(H, W, 3)`` RGB arrays; maps are float32 ``(H, W)``; boxes are
``(x0, y0, x1, y1)`` with exclusive ends, in original-image pixels (as in ``maps``).
"""

from __future__ import annotations

import csv
import io
import math
import re
import time
import zipfile
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import cv2
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from . import limits, maps
from .base import Detector
from .calibration import Calibration
from .errors import InvalidImageError
from .results import DetectionResult
from .images import load_image

#: ``progress(fraction in [0, 1], message)``.
ProgressCallback = Callable[[float, str], None]

#: Colour of the clicked patch's box on the query and of the nearest patch on the normal.
QUERY_BOX_COLOR = (0, 200, 255)
NORMAL_BOX_COLOR = (0, 220, 0)
#: Agreement colours: one method (yellow) ... all methods (red), interpolated in between.
AGREEMENT_ONE_COLOR = (255, 215, 0)
AGREEMENT_ALL_COLOR = (220, 0, 0)

CSV_COLUMNS = ("image", "method", "score", "calibrated", "threshold", "verdict", "seconds")


def _rgb(image: Any) -> np.ndarray:
    """A uint8 ``(H, W, 3)`` array from an array or anything ``load_image`` accepts."""
    if isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3:
        return image
    return load_image(image).rgb


def _line_width(image: np.ndarray) -> int:
    return max(1, int(round(min(image.shape[:2]) / 150)))


def draw_box(image_rgb: np.ndarray, box: Sequence[int], color: tuple[int, int, int], thickness: int | None = None) -> np.ndarray:
    """A copy of the image with the box ``(x0, y0, x1, y1)`` (exclusive ends) outlined."""
    out = np.ascontiguousarray(np.array(_rgb(image_rgb), copy=True))
    x0, y0, x1, y1 = (int(v) for v in box)
    height, width = out.shape[:2]
    if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
        raise ValueError(f"box {tuple(box)} does not fit in a {width}x{height} image")
    cv2.rectangle(out, (x0, y0), (x1 - 1, y1 - 1), tuple(int(c) for c in color), thickness or _line_width(out))
    return out


# ----------------------------------------------------------------------------- explanations


@dataclass(frozen=True)
class ExplanationView:
    """What a click on a method's heatmap shows.

    Attributes:
        method: display name of the method.
        text: one-line description.
        query_image: the query with the clicked patch's box drawn.
        normal_image: the normal image holding the nearest patch, its box drawn; ``None``
            for methods that do not compare with normal patches (FAPrompt).
        details: ``det.explain(result, x, y)`` as returned by the method.
        prompt_similarities: FAPrompt only: ``(prompt, cosine)`` for the normal prompt and
            each abnormality prompt, in the method's order; empty for other methods.
        calibrated_value: the calibrated map value at the clicked pixel when a
            calibration was given, else ``None``.
    """

    method: str
    text: str
    query_image: np.ndarray
    normal_image: np.ndarray | None
    details: dict[str, Any]
    prompt_similarities: list[tuple[str, float]] = field(default_factory=list)
    calibrated_value: float | None = None


def explanation_view(
    det: Detector,
    result: DetectionResult,
    query_rgb: Any,
    normals_rgb: Sequence[Any],
    x: int,
    y: int,
    *,
    calibration: Calibration | None = None,
) -> ExplanationView:
    """Explain pixel (x, y) of the query for one method.

    Args:
        det: the fitted detector that produced ``result``.
        result: its ``DetectionResult`` for the query.
        query_rgb: the query at its original size (uint8 array, path, PIL image, ...).
        normals_rgb: the normal images the detector was fitted on, in fit order.
        x, y: pixel of the query's original image (column, row).
        calibration: when given, the calibrated map value at (x, y) is reported too.

    Returns:
        ``ExplanationView``. Raises ``ValueError`` when the query's size differs from the
        result's map or the nearest normal's box does not fit the given normal image,
        ``IndexError`` for a pixel outside the image.
    """
    query = _rgb(query_rgb)
    height, width = result.anomaly_map.shape
    if query.shape[:2] != (height, width):
        raise ValueError(f"query image of size {query.shape[1]}x{query.shape[0]} does not match the result's {width}x{height} map")
    x, y = int(x), int(y)
    if not (0 <= x < width and 0 <= y < height):
        raise IndexError(f"pixel ({x}, {y}) is outside the {width}x{height} query")
    explanation = det.explanation(result, x, y)
    details = explanation.to_dict()
    name = det.display_name or det.name
    row, col = explanation.patch
    query_image = draw_box(query, explanation.query_box, QUERY_BOX_COLOR)
    cv2.drawMarker(query_image, (x, y), QUERY_BOX_COLOR, cv2.MARKER_CROSS, max(7, 4 * _line_width(query)), 1)
    calibrated_value = None
    text = f"{name}: patch (row {row}, col {col}) at ({x}, {y}), value {explanation.value:.4g}"
    if calibration is not None:
        calibrated_value = float(calibration.normalize_map(result.anomaly_map[y : y + 1, x : x + 1])[0, 0])
        text += f" (calibrated {calibrated_value:.2f} at the pixel)"
    normal_image = None
    nearest = explanation.nearest
    if nearest is not None:
        index = nearest.normal_index
        if not 0 <= index < len(normals_rgb):
            raise ValueError(f"the nearest patch is in normal image {index}, but {len(normals_rgb)} normal image(s) were given")
        normal_image = draw_box(_rgb(normals_rgb[index]), nearest.box, NORMAL_BOX_COLOR)
        n_row, n_col = nearest.patch
        text += (
            f"; nearest normal patch: image {index + 1} of {len(normals_rgb)}, (row {n_row}, col {n_col}), "
            f"cosine similarity {nearest.similarity:.3f} (block {nearest.layer})"
        )
    similarities = [(prompt.label, prompt.cosine) for prompt in explanation.prompts]
    abnormal = [(prompt.label, prompt.cosine) for prompt in explanation.prompts if prompt.key != "normal"]
    normal = [prompt.cosine for prompt in explanation.prompts if prompt.key == "normal"]
    if abnormal:
        best_label, best = max(abnormal, key=lambda item: item[1])
        text += f"; closest abnormality prompt: {best_label} ({best:.3f})"
    if normal:
        text += f" vs normal prompt {normal[0]:.3f}"
    return ExplanationView(
        method=name,
        text=text,
        query_image=query_image,
        normal_image=normal_image,
        details=details,
        prompt_similarities=similarities,
        calibrated_value=calibrated_value,
    )


# ----------------------------------------------------------------------------- agreement


@dataclass(frozen=True)
class Agreement:
    """Where the methods' calibrated maps agree.

    Attributes:
        methods: method names in the order given.
        threshold: calibrated threshold used for every method.
        counts: int32 ``(H, W)``, how many methods flag each pixel.
        image: uint8 ``(H, W, 3)``: pixels flagged by no method keep the base image (or
            stay black), one method = yellow ... all methods = red.
        summary: one sentence, e.g. "2 of 3 methods (InCTRL, AnoPLe) flag the region near (120, 45)".
        level: number of methods flagging the summarised region (0 = nothing flagged).
        location: ``(x, y)`` centroid of the summarised region in original pixels, or ``None``.
        region_methods: the methods that flag (most of) the summarised region.
        region_area: pixels in the summarised region.
    """

    methods: tuple[str, ...]
    threshold: float
    counts: np.ndarray
    image: np.ndarray
    summary: str
    level: int
    location: tuple[int, int] | None
    region_methods: tuple[str, ...]
    region_area: int


def agreement_colors(num_methods: int) -> dict[int, tuple[int, int, int]]:
    """RGB colour per count 1..n: yellow for one method, red for all, interpolated between."""
    if num_methods < 1:
        raise ValueError("at least one method is needed")
    colors = {}
    for count in range(1, num_methods + 1):
        t = 1.0 if num_methods == 1 else (count - 1) / (num_methods - 1)
        colors[count] = tuple(
            int(round((1 - t) * a + t * b)) for a, b in zip(AGREEMENT_ONE_COLOR, AGREEMENT_ALL_COLOR)
        )
    return colors


def agreement(
    calibrated_maps: Mapping[str, np.ndarray],
    threshold: float = 0.5,
    *,
    base_image: Any | None = None,
    alpha: float = 0.6,
) -> Agreement:
    """Combine the calibrated maps (0.5 = each method's threshold) of the methods run.

    A method flags a pixel when its calibrated map is >= ``threshold``. The summary names
    the largest connected region (8-connectivity) flagged by all methods, else by as many
    as any pixel gets; its location is the region's centroid. Ties between equally large
    regions go to the first one in raster order.

    Args:
        calibrated_maps: method name -> float ``(H, W)`` map on the calibrated scale.
        threshold: calibrated decision threshold.
        base_image: optional uint8 ``(H, W, 3)`` (e.g. the query) under the colours.
        alpha: opacity of the colours over ``base_image``.
    """
    if not calibrated_maps:
        raise ValueError("agreement needs at least one method's map")
    names = tuple(str(name) for name in calibrated_maps)
    masks = [maps.threshold_mask(np.asarray(m), threshold) for m in calibrated_maps.values()]
    counts = maps.agreement_map(masks)
    total = len(names)
    height, width = counts.shape
    if base_image is None:
        image = np.zeros((height, width, 3), dtype=np.uint8)
        weight = 1.0
    else:
        image = np.array(_rgb(base_image), copy=True)
        if image.shape[:2] != counts.shape:
            raise ValueError(f"base image of size {image.shape[1]}x{image.shape[0]} does not match the {width}x{height} maps")
        weight = float(alpha)
    for count, color in agreement_colors(total).items():
        where = counts == count
        if where.any():
            blended = (1.0 - weight) * image[where].astype(np.float32) + weight * np.asarray(color, np.float32)
            image[where] = np.clip(np.rint(blended), 0, 255).astype(np.uint8)

    level = int(counts.max())
    if level == 0:
        summary = f"None of the {total} method{'s' if total != 1 else ''} flags any region at threshold {threshold:.2f}"
        return Agreement(names, float(threshold), counts, image, summary, 0, None, (), 0)
    region = (counts == level).astype(np.uint8)
    _, labels, stats, centroids = cv2.connectedComponentsWithStats(region, connectivity=8)
    areas = stats[1:, cv2.CC_STAT_AREA]
    label = 1 + int(np.argmax(areas))  # first maximum: first region in raster order
    cx, cy = centroids[label]
    location = (int(round(cx)), int(round(cy)))
    in_region = labels == label
    coverage = [float(mask[in_region].mean()) for mask in masks]
    order = sorted(range(total), key=lambda i: (-coverage[i], i))[:level]
    region_methods = tuple(names[i] for i in sorted(order))
    verb = "flags" if level == 1 else "flag"
    summary = f"{level} of {total} method{'s' if total != 1 else ''} ({', '.join(region_methods)}) {verb} the region near {location}"
    return Agreement(names, float(threshold), counts, image, summary, level, location, region_methods, int(areas[label - 1]))


# ----------------------------------------------------------------------------- batch mode


@dataclass(frozen=True)
class BatchRow:
    """One (query image, method) result of a batch run.

    ``threshold`` is the calibrated threshold the verdict used (0.5 = the method's own),
    ``raw_threshold`` the method's own score it corresponds to.
    """

    image: str
    method: str
    score: float
    calibrated: float
    threshold: float
    verdict: str
    seconds: float
    raw_threshold: float | None = None
    thumbnail: np.ndarray | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class BatchResult:
    """``run_batch`` output: ranked rows, when kept one overlay per (image, method), and
    the images that could not be used as ``(image name, message)``."""

    rows: list[BatchRow]
    overlays: list[tuple[str, str, np.ndarray]]
    errors: list[tuple[str, str]] = field(default_factory=list)


def verdict(calibrated: float, threshold: float) -> str:
    """ "anomalous" when the calibrated score reaches the threshold, else "normal"."""
    return "anomalous" if float(calibrated) >= float(threshold) else "normal"


def thumbnail(image_rgb: Any, size: int = 96) -> np.ndarray:
    """The image scaled so its longer side is ``size`` pixels (never enlarged)."""
    image = _rgb(image_rgb)
    height, width = image.shape[:2]
    scale = min(1.0, float(size) / max(height, width))
    if scale >= 1.0:
        return image.copy()
    new = (max(1, int(round(width * scale))), max(1, int(round(height * scale))))
    return cv2.resize(image, new, interpolation=cv2.INTER_AREA)


def check_batch_size(count: int) -> None:
    """Raise ``ValueError`` for more than ``limits.MAX_BATCH_QUERIES`` query images (or none)."""
    if count > limits.MAX_BATCH_QUERIES:
        raise ValueError(f"{count} query images given, at most {limits.MAX_BATCH_QUERIES} are accepted in one batch")


def _unpack(entry: Any) -> tuple[Detector, Calibration]:
    if isinstance(entry, tuple):
        return entry[0], entry[1]
    return entry.detector, entry.calibration


def run_batch(
    detectors: Mapping[str, Any],
    queries: Sequence[tuple[str, Any]],
    *,
    threshold: float = 0.5,
    keep_overlays: bool = True,
    alpha: float = 0.5,
    colormap: str = "jet",
    thumbnail_size: int = 96,
    progress: ProgressCallback | None = None,
) -> BatchResult:
    """Score many queries against one normal set with already fitted detectors.

    Args:
        detectors: method name -> ``(detector, calibration)`` or an object with
            ``.detector`` and ``.calibration`` (``service.FittedDetector``).
        queries: ``(image name, image)`` pairs; an image is anything ``load_image`` accepts.
        threshold: calibrated threshold for the verdicts.
        keep_overlays: keep one calibrated overlay per (image, method) for ``overlays_zip``.
        alpha, colormap: overlay look (``maps.overlay``).
        thumbnail_size: longer side of the thumbnail stored in each row.
        progress: ``progress(fraction, message)`` after each image and method.

    Returns:
        ``BatchResult`` with rows ranked by ``rank_batch``. An image that cannot be decoded
        (``InvalidImageError``) is listed in ``errors`` and skipped; other errors propagate.
        More than ``limits.MAX_BATCH_QUERIES`` queries raise ``ValueError`` before any work.
    """
    if not detectors:
        raise ValueError("choose at least one method")
    check_batch_size(len(queries))
    entries = {name: _unpack(entry) for name, entry in detectors.items()}
    rows: list[BatchRow] = []
    overlays: list[tuple[str, str, np.ndarray]] = []
    steps = max(1, len(queries) * len(entries))
    done = 0
    errors: list[tuple[str, str]] = []
    for image_name, source in queries:
        try:
            loaded = load_image(source)
        except InvalidImageError as error:
            errors.append((str(image_name), str(error)))
            done += len(entries)
            if progress is not None:
                progress(done / steps, f"skipped {image_name}: {error}")
            continue
        small = thumbnail(loaded.rgb, thumbnail_size)
        for method, (det, calibration) in entries.items():
            start = time.perf_counter()
            result = det.predict(loaded)
            seconds = time.perf_counter() - start
            calibrated = calibration.normalize_score(result.score)
            raw_threshold = calibration.image_threshold + (float(threshold) - 0.5) * (calibration.image_max - calibration.image_min)
            rows.append(
                BatchRow(
                    image=str(image_name),
                    method=method,
                    score=float(result.score),
                    calibrated=float(calibrated),
                    threshold=float(threshold),
                    verdict=verdict(calibrated, threshold),
                    seconds=float(seconds),
                    raw_threshold=float(raw_threshold),
                    thumbnail=small,
                )
            )
            if keep_overlays:
                overlays.append((str(image_name), method, maps.overlay(loaded.rgb, calibration.normalize_map(result.anomaly_map), alpha, colormap)))
            done += 1
            if progress is not None:
                progress(done / steps, f"{method}: {image_name}")
    return BatchResult(rank_batch(rows), overlays, errors)


def rank_batch(rows: Sequence[BatchRow]) -> list[BatchRow]:
    """Rows grouped by method (in order of first appearance), each group by calibrated score
    descending; ties by raw score descending, then image name."""
    methods: list[str] = []
    for row in rows:
        if row.method not in methods:
            methods.append(row.method)
    ranked: list[BatchRow] = []
    for method in methods:
        group = [row for row in rows if row.method == method]
        ranked.extend(sorted(group, key=lambda r: (-r.calibrated, -r.score, r.image)))
    return ranked


def flagged_counts(rows: Sequence[BatchRow], threshold: float) -> dict[str, int]:
    """Per method, how many images reach the calibrated ``threshold`` (0 for none)."""
    counts: dict[str, int] = {}
    for row in rows:
        counts[row.method] = counts.get(row.method, 0) + int(row.calibrated >= float(threshold))
    return counts


def batch_csv(rows: Sequence[BatchRow]) -> str:
    """CSV text, one line per (image, method), columns ``CSV_COLUMNS``."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for row in rows:
        writer.writerow(
            [row.image, row.method, f"{row.score:.6g}", f"{row.calibrated:.6g}", f"{row.threshold:.6g}", row.verdict, f"{row.seconds:.4f}"]
        )
    return buffer.getvalue()


def safe_name(text: str, max_length: int = 80) -> str:
    """A file-name part made of letters, digits, ``.``, ``_`` and ``-`` (never empty, no leading dot)."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "_", str(text)).strip("._") or "image"
    return cleaned[:max_length]


def overlays_zip(items: Sequence[tuple[str, str, np.ndarray]]) -> bytes:
    """A ZIP archive with one PNG per ``(image name, method, overlay uint8 RGB)``, named
    ``<image stem>_<method>.png`` (made safe; a repeated name gets ``-2``, ``-3``, ...)."""
    buffer = io.BytesIO()
    used: set[str] = set()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for image_name, method, overlay in items:
            picture = np.asarray(overlay)
            if picture.dtype != np.uint8 or picture.ndim != 3 or picture.shape[2] != 3:
                raise ValueError(f"overlay of {image_name!r} / {method!r} must be uint8 (H, W, 3), got {picture.dtype} {picture.shape}")
            stem = safe_name(Path(str(image_name)).stem or str(image_name))
            base = f"{stem}_{safe_name(method)}"
            name, number = f"{base}.png", 1
            while name in used:
                number += 1
                name = f"{base}-{number}.png"
            used.add(name)
            ok, encoded = cv2.imencode(".png", np.ascontiguousarray(picture[..., ::-1]))
            if not ok:
                raise ValueError(f"could not encode the overlay of {image_name!r} / {method!r} as PNG")
            archive.writestr(name, encoded.tobytes())
    return buffer.getvalue()


# ----------------------------------------------------------------------------- report


@dataclass(frozen=True)
class MethodPanel:
    """One method's column in the report.

    Attributes:
        method: display name.
        overlay: uint8 ``(H, W, 3)`` overlay of the calibrated map on the query.
        score: the method's own score.
        calibrated_score: calibrated score (0.5 = the method's threshold).
        threshold: the method's own score threshold the verdict corresponds to.
        verdict: "anomalous" / "normal".
        weights: which weights the method ran on (one line, wrapped in the report).
        threshold_calibrated: the calibrated threshold used (default 0.5).
        notes: further short lines (calibration source, warnings).
    """

    method: str
    overlay: np.ndarray
    score: float
    calibrated_score: float
    threshold: float
    verdict: str
    weights: str
    threshold_calibrated: float = 0.5
    notes: tuple[str, ...] = ()


def panel_from_summary(summary: Mapping[str, Any], overlay: np.ndarray) -> MethodPanel:
    """A ``MethodPanel`` from one method's summary dict (``MethodOutcome.summary(threshold)``)."""
    notes = [f"calibration: {summary['calibration']}"] if summary.get("calibration") else []
    notes.extend(str(w) for w in summary.get("warnings", ()))
    return MethodPanel(
        method=str(summary.get("display_name") or summary.get("method")),
        overlay=overlay,
        score=float(summary["score"]),
        calibrated_score=float(summary["calibrated_score"]),
        threshold=float(summary["threshold"]),
        verdict=str(summary["verdict"]),
        weights=str(summary.get("weights", "")),
        threshold_calibrated=float(summary.get("threshold_calibrated", 0.5)),
        notes=tuple(notes),
    )


@dataclass(frozen=True)
class ReportLayout:
    """Sizes of the report slide in pixels. The width is
    ``2 * margin + max(columns, 2) * panel + (max(columns, 2) - 1) * gap``."""

    panel: int = 360
    margin: int = 32
    gap: int = 24
    title_size: int = 30
    heading_size: int = 21
    text_size: int = 16
    background: tuple[int, int, int] = (255, 255, 255)
    text_color: tuple[int, int, int] = (30, 30, 30)
    muted_color: tuple[int, int, int] = (110, 110, 110)
    anomalous_color: tuple[int, int, int] = (200, 30, 30)
    normal_color: tuple[int, int, int] = (20, 140, 60)

    def width(self, num_methods: int) -> int:
        columns = max(int(num_methods), 2)
        return 2 * self.margin + columns * self.panel + (columns - 1) * self.gap


@lru_cache(maxsize=16)
def _font(size: int, bold: bool = False) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    for name in ("DejaVuSans-Bold.ttf", "LiberationSans-Bold.ttf") if bold else ("DejaVuSans.ttf", "LiberationSans-Regular.ttf"):
        try:
            return ImageFont.truetype(name, size)
        except OSError:
            continue
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType
        return ImageFont.load_default()


def _text_width(font: Any, text: str) -> int:
    left, _, right, _ = font.getbbox(text)
    return int(right - left)


def _line_height(font: Any) -> int:
    _, top, _, bottom = font.getbbox("Ag")
    return int(bottom - top) + max(4, int(getattr(font, "size", 12) * 0.35))


def _wrap(text: str, font: Any, width: int, max_lines: int = 4) -> list[str]:
    words = str(text).split()
    lines: list[str] = []
    current = ""
    for word in words:
        candidate = f"{current} {word}".strip()
        if current and _text_width(font, candidate) > width:
            lines.append(current)
            current = word
        else:
            current = candidate
    if current:
        lines.append(current)
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        lines[-1] = lines[-1].rstrip(".,;") + " ..."
    return lines


def _fit(image: np.ndarray, width: int, height: int) -> Image.Image:
    """The image scaled to fit ``width`` x ``height`` (aspect kept)."""
    h, w = image.shape[:2]
    scale = min(width / w, height / h)
    size = (max(1, int(round(w * scale))), max(1, int(round(h * scale))))
    interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    return Image.fromarray(cv2.resize(np.ascontiguousarray(image), size, interpolation=interpolation))


def _number(value: float) -> str:
    """Four decimals, or scientific notation for large values."""
    value = float(value)
    return f"{value:.4f}" if abs(value) < 1e4 else f"{value:.3e}"


def _draw_legend(canvas: Image.Image, draw: ImageDraw.ImageDraw, origin: tuple[int, int], width: int, font: Any, layout: ReportLayout, colormap: str = "jet") -> None:
    """Colour bar of the overlays: calibrated 0 .. 1, the threshold at 0.5."""
    x, y = origin
    draw.text((x, y), "Overlay colours (calibrated map):", fill=layout.muted_color, font=font)
    y += _line_height(font)
    ramp = np.tile(np.linspace(0.0, 1.0, max(2, width), dtype=np.float32), (14, 1))
    canvas.paste(Image.fromarray(maps.colorize(ramp, colormap)), (x, y))
    y += 14 + 2
    labels = [("0 normal", 0.0), ("0.5 threshold", 0.5), ("1 anomalous", 1.0)]
    for text, position in labels:
        text_x = x + int(position * width) - int(position * _text_width(font, text))
        draw.text((text_x, y), text, fill=layout.muted_color, font=font)


def report_image(
    query_rgb: Any,
    normals_rgb: Sequence[Any],
    method_panels: Sequence[MethodPanel],
    *,
    title: str = "Anomaly inspection report",
    subtitle: str | None = None,
    layout: ReportLayout | None = None,
) -> np.ndarray:
    """A one-slide summary of a single query, uint8 ``(H, W, 3)`` RGB.

    Top: title and subtitle. Then the query (left) and the normal images as a strip of
    thumbnails (right). Then one column per method: name, overlay, score, calibrated score
    against the threshold, verdict, the weights it ran on and notes. The width follows
    ``ReportLayout.width``; the height depends on the text.
    """
    layout = layout or ReportLayout()
    query = _rgb(query_rgb)
    normals = [_rgb(n) for n in normals_rgb]
    panels = list(method_panels)
    width = layout.width(len(panels))
    title_font = _font(layout.title_size, bold=True)
    heading_font = _font(layout.heading_size, bold=True)
    text_font = _font(layout.text_size)
    text_height = _line_height(text_font)
    heading_height = _line_height(heading_font)
    margin, gap, panel = layout.margin, layout.gap, layout.panel
    inner = width - 2 * margin

    # Top section: query box (left) and normals strip (right).
    query_box = (panel, panel)
    strip_left = margin + panel + gap
    strip_width = width - margin - strip_left
    thumbs: list[Image.Image] = []
    if normals:
        per_row = max(1, min(len(normals), 4))
        cell = max(48, min(panel // 2, (strip_width - (per_row - 1) * 8) // per_row))
        thumbs = [_fit(n, cell, cell) for n in normals]
    else:
        cell, per_row = 0, 1
    strip_rows = math.ceil(len(thumbs) / per_row) if thumbs else 1
    legend_top = heading_height + (strip_rows * (cell + 8) if thumbs else text_height) + gap
    legend_width = min(strip_width, panel)
    strip_height = legend_top + _line_height(text_font) + 14 + text_height

    # Method columns.
    column_texts = []
    for item in panels:
        lines: list[tuple[str, tuple[int, int, int], Any]] = [
            (f"score {_number(item.score)}  (method threshold {_number(item.threshold)})", layout.text_color, text_font),
            (f"calibrated {item.calibrated_score:.2f}  vs threshold {item.threshold_calibrated:.2f}", layout.text_color, text_font),
        ]
        anomalous = item.verdict.lower().startswith("anomal")
        lines.append((item.verdict.upper(), layout.anomalous_color if anomalous else layout.normal_color, heading_font))
        for wrapped in _wrap(f"weights: {item.weights}", text_font, panel):
            lines.append((wrapped, layout.muted_color, text_font))
        for note in item.notes:
            for wrapped in _wrap(note, text_font, panel, max_lines=3):
                lines.append((wrapped, layout.muted_color, text_font))
        column_texts.append(lines)
    overlay_heights = [_fit(p.overlay, panel, panel).size[1] for p in panels]
    text_heights = [sum(_line_height(f) for _, _, f in lines) for lines in column_texts]
    columns_height = max([oh + 8 + th for oh, th in zip(overlay_heights, text_heights)], default=text_height)

    query_image = _fit(query, *query_box)
    subtitle_lines = _wrap(subtitle, text_font, inner, max_lines=2) if subtitle else []
    header = _line_height(title_font) + len(subtitle_lines) * text_height + gap
    top = heading_height + max(query_image.size[1], strip_height - heading_height)
    height = margin + header + top + gap + heading_height + 8 + columns_height + margin

    canvas = Image.new("RGB", (width, height), layout.background)
    draw = ImageDraw.Draw(canvas)
    y = margin
    draw.text((margin, y), title, fill=layout.text_color, font=title_font)
    y += _line_height(title_font)
    for line in subtitle_lines:
        draw.text((margin, y), line, fill=layout.muted_color, font=text_font)
        y += text_height
    y += gap
    draw.text((margin, y), "Query", fill=layout.text_color, font=heading_font)
    draw.text((strip_left, y), f"Normal images ({len(normals)})", fill=layout.text_color, font=heading_font)
    y += heading_height
    canvas.paste(query_image, (margin, y))
    if thumbs:
        for index, thumb in enumerate(thumbs):
            row, col = divmod(index, per_row)
            canvas.paste(thumb, (strip_left + col * (cell + 8), y + row * (cell + 8)))
    else:
        draw.text((strip_left, y), "none (zero-shot)", fill=layout.muted_color, font=text_font)
    _draw_legend(canvas, draw, (strip_left, y + legend_top - heading_height), legend_width, text_font, layout)
    y += max(query_image.size[1], strip_height - heading_height) + gap
    draw.line([(margin, y - gap // 2), (width - margin, y - gap // 2)], fill=(220, 220, 220), width=1)
    for index, (item, lines) in enumerate(zip(panels, column_texts)):
        x = margin + index * (panel + gap)
        column_y = y
        draw.text((x, column_y), item.method, fill=layout.text_color, font=heading_font)
        column_y += heading_height + 8
        picture = _fit(item.overlay, panel, panel)
        canvas.paste(picture, (x, column_y))
        column_y += picture.size[1] + 8
        for text, color, font in lines:
            draw.text((x, column_y), text, fill=color, font=font)
            column_y += _line_height(font)
    if not panels:
        draw.text((margin, y), "no method was run", fill=layout.muted_color, font=text_font)
    return np.asarray(canvas, dtype=np.uint8).copy()


def save_report(
    path: str | Path,
    query_rgb: Any,
    normals_rgb: Sequence[Any],
    method_panels: Sequence[MethodPanel],
    **options: Any,
) -> Path:
    """Render ``report_image`` and write it as PNG, or PDF when ``path`` ends in ``.pdf``.

    ``options`` are passed to ``report_image`` (``title``, ``subtitle``, ``layout``)."""
    path = Path(path)
    picture = Image.fromarray(report_image(query_rgb, normals_rgb, method_panels, **options))
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() == ".pdf":
        picture.save(path, format="PDF", resolution=150.0)
    else:
        picture.save(path, format="PNG")
    return path
