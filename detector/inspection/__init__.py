"""Inspection tools beyond a heatmap (pure functions and small dataclasses, no UI code), one
module per concern:

* ``explanations``: why one patch of the query got its value (``explanation_view``): the
  nearest normal patch drawn on its normal image, or the patch's similarity to each text
  prompt, all from ``Detector.explanation`` (cached features, no re-encoding);
* ``agreement``: where the calibrated maps of several methods flag the same pixels, as a
  count map, a colour picture and a one-line summary;
* ``batch``: the rows of a batch run (the service's ``detector.service_batch`` scores
  them); ``rank_batch`` and ``flagged_counts`` order and count them;
* ``export``: the rows as CSV (``batch_csv``) and the overlays as a ZIP (``overlays_zip``);
* ``report``: one slide (PNG or PDF) with the query, the normals, every method's overlay,
  scores, thresholds and the weights each method ran on (``report_image``, ``save_report``);
* ``drawing``: the small drawing helpers they share.

Images are uint8 ``(H, W, 3)`` RGB arrays; maps are float32 ``(H, W)``; boxes are
``(x0, y0, x1, y1)`` with exclusive ends, in original-image pixels (as in ``maps``).
"""

from .agreement import AGREEMENT_ALL_COLOR, AGREEMENT_ONE_COLOR, Agreement, agreement, agreement_colors
from ..requests import check_batch_size
from .batch import BatchResult, BatchRow, flagged_counts, rank_batch, verdict
from .drawing import NORMAL_BOX_COLOR, QUERY_BOX_COLOR, draw_box, thumbnail
from .explanations import ExplanationView, explanation_view
from .export import CSV_COLUMNS, batch_csv, overlays_zip, safe_name
from .report import MethodPanel, ReportLayout, panel_from_summary, report_image, save_report

__all__ = [
    "AGREEMENT_ALL_COLOR",
    "AGREEMENT_ONE_COLOR",
    "CSV_COLUMNS",
    "NORMAL_BOX_COLOR",
    "QUERY_BOX_COLOR",
    "Agreement",
    "BatchResult",
    "BatchRow",
    "ExplanationView",
    "MethodPanel",
    "ReportLayout",
    "agreement",
    "agreement_colors",
    "batch_csv",
    "check_batch_size",
    "draw_box",
    "explanation_view",
    "flagged_counts",
    "overlays_zip",
    "panel_from_summary",
    "rank_batch",
    "report_image",
    "safe_name",
    "save_report",
    "thumbnail",
    "verdict",
]
