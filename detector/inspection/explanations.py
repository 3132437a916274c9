"""Why one patch of the query got its value: the view a click on a heatmap shows.

For methods that compare with normal patches, the nearest normal patch drawn on that normal
image; for methods that compare with text prompts, the patch's similarity to each prompt.
Everything comes from ``Detector.explanation`` (cached features, no re-encoding).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import cv2
import numpy as np

from ..base import Detector
from ..calibration import Calibration
from ..results import DetectionResult
from .drawing import NORMAL_BOX_COLOR, QUERY_BOX_COLOR, draw_box, line_width, rgb_array


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
    query = rgb_array(query_rgb)
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
    cv2.drawMarker(query_image, (x, y), QUERY_BOX_COLOR, cv2.MARKER_CROSS, max(7, 4 * line_width(query)), 1)
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
        normal_image = draw_box(rgb_array(normals_rgb[index]), nearest.box, NORMAL_BOX_COLOR)
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
