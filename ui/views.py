"""What the app draws, as pure functions of the service's results: no model runs here.

Method names, colours and wording come from the registry and each ``MethodSpec``.
"""

from __future__ import annotations

import base64
import dataclasses
from typing import Any, Mapping, Sequence

import cv2
import numpy as np

from detector import limits, maps
from detector.inspection import BatchRow, ExplanationView, agreement, flagged_counts, thumbnail, verdict
from detector.outcomes import InspectionReport, MethodOutcome, WeightsFacts
from detector.registry import get_method, get_spec, list_methods
from detector.service import InspectionService
from detector.status import fetch_hint

#: Colours for methods whose spec names none (RGB), distinct from jet's red.
FALLBACK_COLOURS = [(255, 165, 0), (50, 205, 50), (255, 255, 0)]
TABLE_HEADERS = ["method", "score", "calibrated", "threshold", "verdict", "time (s)", "weights", "calibration"]
BATCH_HEADERS = ["rank", "thumbnail", "image", "method", "score", "calibrated", "verdict"]
BATCH_THUMBNAIL_SIZE = 56


def display_name(method: str) -> str:
    return get_spec(method).display_name


def method_colour(method: str, index: int) -> tuple[int, int, int]:
    return get_spec(method).colour or FALLBACK_COLOURS[index % len(FALLBACK_COLOURS)]


def joined(names: Sequence[str]) -> str:
    return " and ".join(names)


def zero_shot_names() -> list[str]:
    return [display_name(m) for m in list_methods() if not get_spec(m).needs_normals]


def line_width(image: np.ndarray) -> int:
    return max(2, int(round(min(image.shape[:2]) / 160)))


def _fmt(value: float) -> str:
    return f"{value:.3f}"


def colorbar_html(colormap: str) -> str:
    """A small legend of the fixed 0..1 calibrated scale."""
    colours = maps.colorize(np.linspace(0.0, 1.0, 11, dtype=np.float32)[None, :], colormap)[0]
    stops = ", ".join(f"rgb({r},{g},{b})" for r, g, b in colours)
    return (
        f"<div id='colorbar-inner'><div class='bar' style='background: linear-gradient(to right, {stops});'></div>"
        "<div class='labels'><span>0 · normal</span><span>0.5 · method threshold</span><span>1 · anomalous</span></div></div>"
    )


def verdict_markdown(outcome: MethodOutcome, threshold: float) -> str:
    calibrated = outcome.calibrated_score
    badge = (
        "<span style='color:#c62828; font-weight:700;'>● ANOMALOUS</span>"
        if outcome.is_anomalous(threshold)
        else "<span style='color:#2e7d32; font-weight:700;'>● NORMAL</span>"
    )
    source = outcome.calibration.source
    if outcome.provisional:
        calibration = f"{source}, provisional: its calibration on the normals is finishing in the background"
    else:
        calibration = source + ("" if source != "default" else " (uncalibrated fixed range)")
    return "\n\n".join(
        [
            f"### {outcome.display_name}: {_fmt(calibrated)} → {badge}",
            f"calibrated score vs threshold {threshold:.2f} · raw score {_fmt(outcome.result.score)} "
            f"(method threshold {_fmt(outcome.raw_threshold(threshold))})",
            f"<span class='small-text'>calibration: {calibration} · "
            f"{outcome.seconds:.2f} s{' · normals reused' if outcome.reused_fit else ''}</span>",
        ]
    )


def weights_markdown(method: str, description: Mapping[str, Any] | None, fallback: str | None = None) -> str:
    """The per-method "which weights" panel, from ``describe()``."""
    spec = get_spec(method)
    name = spec.display_name
    if not description:
        return f"**{name} weights:** loaded on first use."
    facts = WeightsFacts.from_description(description, trained_offline=spec.trained_offline)
    in_use = f" · file `{facts.checkpoint_file}`" if facts.checkpoint_file and facts.checkpoint_file != facts.checkpoint else ""
    lines = [
        f"**{name} weights** · backbone `{facts.backbone}` ({facts.weights}) · {facts.image_size} px",
        f"runs: **{facts.state()}**",
        (f"checkpoint: `{facts.checkpoint}`" + in_use) if facts.checkpoint else "checkpoint: none",
        f"learned parts: {'trained' if facts.trained else 'untrained'} · mode: {facts.mode}",
        f"image encoder runtime: {description.get('runtime', 'torch')}",
    ]
    if description.get("runtime_warning"):
        lines.append(f"⚠️ {description['runtime_warning']}")
    if not spec.trained_offline and facts.trained:
        settings = ", ".join(f"{key} {description[key]}" for key in spec.app_options if description.get(key) is not None)
        lines.append("learned on your normal images" + (f" ({settings})" if settings else ""))
    if fallback or facts.random:
        lines.append("⚠️ **random backbone weights: scores and maps are meaningless**")
    elif spec.trained_offline and not facts.trained:
        lines.append(f"ℹ️ training-free mode: no trained checkpoint is configured{fetch_hint(get_method(method))}")
    return "\n\n".join(lines)


def short_weights(outcome: MethodOutcome) -> str:
    return WeightsFacts.from_description(outcome.description, trained_offline=get_spec(outcome.method).trained_offline).short()


def comparison_image(report: InspectionReport, threshold: float) -> np.ndarray:
    image = report.query.rgb
    width = line_width(image)
    for index, outcome in enumerate(report.outcomes):
        mask = maps.threshold_mask(outcome.calibrated_map(), threshold)
        image = maps.draw_contours(image, mask, method_colour(outcome.method, index), width)
    return image


def agreement_outputs(report: InspectionReport | None, threshold: float) -> tuple[np.ndarray | None, str]:
    """``#agreement`` and ``#agreement-summary``: where the methods' calibrated maps agree at
    ``threshold`` on the query, and one line saying so; ``(None, "")`` without results."""
    if report is None or not report.outcomes:
        return None, ""
    view = agreement({o.display_name: o.calibrated_map() for o in report.outcomes}, float(threshold), base_image=report.query.rgb)
    return view.image, f"**Agreement** (yellow = one method … red = all): {view.summary}."


def comparison_legend(report: InspectionReport | None) -> str:
    if report is None:
        return ""
    parts = []
    for index, outcome in enumerate(report.outcomes):
        r, g, b = method_colour(outcome.method, index)
        parts.append(f"<span style='color: rgb({r},{g},{b}); text-shadow: 0 0 2px #000;'>■</span> {outcome.display_name}")
    return "Contours at the threshold: " + " &nbsp; ".join(parts)


def table_rows(report: InspectionReport, threshold: float) -> list[list[Any]]:
    rows = []
    for outcome in report.outcomes:
        s = outcome.summary(threshold)
        rows.append(
            [
                outcome.display_name,
                round(s["score"], 4),
                round(s["calibrated_score"], 4),
                round(s["threshold"], 4),
                s["verdict"],
                round(s["seconds"], 2),
                short_weights(outcome),
                s["calibration"],
            ]
        )
    return rows


#: Outputs of one method's column (``method_panel``).
PANEL_OUTPUTS = 5


def method_panel(
    method: str, outcome: MethodOutcome | None, query: np.ndarray, threshold: float, alpha: float, colormap: str
) -> list[Any]:
    """A method's column (``PANEL_OUTPUTS`` values): verdict, calibrated overlay, region at
    the threshold, raw grid, weights."""
    if outcome is None:
        return ["", None, None, None, weights_markdown(method, None)]
    calibrated = outcome.calibrated_map()
    heat = maps.overlay(query, calibrated, alpha=float(alpha), colormap=colormap)
    contour = maps.draw_contours(query, maps.threshold_mask(calibrated, threshold), (255, 0, 0), line_width(query))
    raw = maps.grid_image(outcome.result.raw_map, query.shape[:2], colormap=colormap)
    return [verdict_markdown(outcome, threshold), heat, contour, raw, weights_markdown(method, outcome.description, outcome.weights_fallback)]


def notes_markdown(report: InspectionReport) -> str:
    warnings = sorted({w for o in report.outcomes for w in o.warnings} | set(report.query.warnings))
    return ("**Notes**\n\n" + "\n".join(f"- {w}" for w in warnings)) if warnings else ""


def object_word(object_name: str | None) -> str:
    """The object word for text prompts; ``"object"`` when left empty."""
    return (object_name or "object").strip() or "object"


def explanation_markdown(view: ExplanationView) -> str:
    """The explanation text, plus the prompt similarities (if any) as a table."""
    text = f"**{view.method}** · {view.text.split(': ', 1)[-1]}"
    if view.prompt_similarities:
        rows = "\n".join(f"| {label} | {value:.3f} |" for label, value in view.prompt_similarities)
        text += "\n\n| prompt | cosine similarity |\n|---|---|\n" + rows
    elif view.normal_image is None:
        text += "\n\nThis method does not compare with normal patches."
    return text


def thumbnail_markdown(image_rgb: np.ndarray) -> str:
    """A small inline PNG for a Markdown table cell."""
    ok, encoded = cv2.imencode(".png", np.ascontiguousarray(image_rgb[..., ::-1]))
    if not ok:
        return ""
    return f"![thumbnail](data:image/png;base64,{base64.b64encode(encoded.tobytes()).decode('ascii')})"


def batch_rows_at(rows: Sequence[BatchRow], threshold: float) -> list[BatchRow]:
    """Batch rows with their threshold and verdict at the calibrated ``threshold``."""
    return [dataclasses.replace(r, threshold=float(threshold), verdict=verdict(r.calibrated, threshold)) for r in rows]


def batch_table(rows: Sequence[BatchRow]) -> list[list[Any]]:
    """Table rows, ranked per method as ``rank_batch`` gives them; ``rank`` restarts per method."""
    table, rank, previous = [], 0, None
    for row in rows:
        rank = rank + 1 if row.method == previous else 1
        previous = row.method
        small = thumbnail(row.thumbnail, BATCH_THUMBNAIL_SIZE) if row.thumbnail is not None else None
        table.append(
            [rank, thumbnail_markdown(small) if small is not None else "", row.image, display_name(row.method),
             round(row.score, 4), round(row.calibrated, 3), row.verdict]
        )
    return table


def flagged_markdown(rows: Sequence[BatchRow], threshold: float, errors: Sequence[tuple[str, str]] = ()) -> str:
    counts = flagged_counts(rows, threshold)
    images = len({r.image for r in rows})
    parts = [f"**{display_name(m)}**: {n} of {images} flagged" for m, n in counts.items()]
    text = f"At threshold {float(threshold):.2f}: " + " · ".join(parts) if parts else "No image was scored."
    if errors:
        text += "\n\n" + "\n".join(f"- skipped **{name}**: {message}" for name, message in errors)
    return text


def shots_count_text(count: int) -> str:
    if count > limits.MAX_NORMAL_IMAGES:
        return f"⚠️ **{count} normal images**: at most {limits.MAX_NORMAL_IMAGES} are accepted, remove {count - limits.MAX_NORMAL_IMAGES}."
    if count == 0:
        zero = zero_shot_names()
        return f"**0-shot**: only {joined(zero)} can run without normal images." if zero else "**0-shot**: add normal images."
    return f"**{count}-shot**: {count} normal image{'s' if count != 1 else ''} (limit {limits.MAX_NORMAL_IMAGES})."


def banner_markdown(service: InspectionService, methods: Sequence[str]) -> tuple[str, str]:
    """``(markdown, css class)`` of the banner on top, from the service's start-up status:
    random weights (configured or fallen back to), missing downloads, training-free modes."""
    warnings, notes = [], []
    statuses = [service.method_status(m) for m in methods]
    chosen_random = [s for s in statuses if s.random_by_choice]
    config = service.config
    if chosen_random:
        warnings.append(
            f"The app is configured with random weights (backbone `{config.backbone or 'official'}`, "
            f"weights `{config.backbone_weights or 'random'}`): **scores and maps are meaningless**; this is a test set-up."
        )
    for status in statuses:
        if status.random_by_choice:
            continue
        if status.fallback:
            warnings.append(f"**{status.display_name}**: {status.fallback}.")
        elif status.missing is not None and status.missing.blocking:
            warnings.append(
                f"**{status.display_name}**: {status.missing.message}; it runs the official architecture "
                f"({status.model_name}) with **random weights: scores are meaningless**."
            )
        elif status.missing is not None:
            notes.append(f"{status.display_name}: {status.missing.message}.")
    for status in statuses:
        if status.training_free:
            notes.append(f"{status.display_name} runs training-free: no trained checkpoint is configured{fetch_hint(get_method(status.method))}.")
        elif status.checkpoint_summary:
            notes.append(f"{status.display_name} runs trained: {status.checkpoint_summary}.")
    if warnings:
        return "⚠️ " + "<br>⚠️ ".join(warnings) + ("<br>ℹ️ " + " ".join(notes) if notes else ""), "warn"
    if notes:
        return "ℹ️ " + " ".join(notes), "note"
    return "", "note"
