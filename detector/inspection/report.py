"""One slide (PNG or PDF) for one query: the query, the normals, every method's overlay, scores,
thresholds and the weights each method ran on."""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping, Sequence

import cv2
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .. import maps
from .drawing import rgb_array


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
    query = rgb_array(query_rgb)
    normals = [rgb_array(n) for n in normals_rgb]
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
