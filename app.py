"""Gradio app: a few normal images + a query, InCTRL / AnoPLe / FAPrompt side by side.

The app only draws: decoding happens in ``detector.images``, fitting, caching and
calibration in ``detector.service``, maps and overlays in ``detector.maps``.

Run ``python app.py --help`` for the flags; each has an environment variable of the same
name (``--backbone`` / ``DETECTOR_BACKBONE`` ...). ``import app`` never launches anything;
tests call ``build_demo(config)``.
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import json
import logging
import os
import shutil
import tempfile
import threading
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import gradio as gr
import numpy as np

from detector import limits, maps
from detector.errors import DetectorError
from detector.inspection import (
    BatchResult,
    BatchRow,
    ExplanationView,
    agreement,
    batch_csv,
    explanation_view,
    flagged_counts,
    overlays_zip,
    panel_from_summary,
    safe_name,
    save_report,
    thumbnail,
    verdict,
)
from detector.registry import get_method, list_methods
from detector.service import (
    InspectionReport,
    InspectionService,
    MethodOutcome,
    ServiceConfig,
    is_meaningless,
)

LOG = logging.getLogger("app")

ROOT = Path(__file__).resolve().parent
ASSETS_DIR = ROOT / "assets"
TITLE = "CLIP anomaly inspection: InCTRL · AnoPLe · FAPrompt"

#: Display order of the methods; any other registered method follows.
PREFERRED_ORDER = ("inctrl", "anople", "faprompt")
#: Contour colours of the comparison strip (RGB), distinct from each other and from jet's red.
METHOD_COLOURS = {"inctrl": (255, 0, 255), "anople": (0, 200, 255), "faprompt": (255, 160, 0)}
FALLBACK_COLOURS = [(255, 165, 0), (50, 205, 50), (255, 255, 0)]
COLORMAP_CHOICES = list(maps.COLORMAPS)
ANOPLE_PRESETS = ("fast", "faithful", "text_only")
TABLE_HEADERS = ["method", "score", "calibrated", "threshold", "verdict", "time (s)", "weights", "calibration"]
BATCH_HEADERS = ["rank", "thumbnail", "image", "method", "score", "calibrated", "verdict"]
BATCH_THUMBNAIL_SIZE = 56
#: Files written for downloads (reports, CSV, ZIP) kept per app before the oldest is removed.
MAX_DOWNLOAD_FILES = 48

CSS = """
#banner {border-radius: 8px; padding: 4px 14px;}
#banner.warn {background: #fff4e5; border: 1px solid #f0a020;}
#banner.note {background: #eef5ff; border: 1px solid #7aa7e8;}
.method-col {border: 1px solid var(--border-color-primary); border-radius: 10px; padding: 8px;}
.verdict h3 {margin-bottom: 2px;}
.small-text {font-size: 0.85em; opacity: 0.9;}
#colorbar .bar {height: 14px; border-radius: 4px;}
#colorbar .labels {display: flex; justify-content: space-between; font-size: 0.8em;}
"""


# -----------------------------------------------------------------------------------------
# Configuration
# -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class AppConfig:
    """Everything ``python app.py`` can be told (flags and environment variables)."""

    backbone: str | None = None
    backbone_weights: str | None = None
    inctrl_checkpoint: str | None = None
    faprompt_checkpoint: str | None = None
    anople_preset: str = "fast"
    anople_steps: int | None = None
    device: str = "cpu"
    threads: int | None = None
    server_name: str | None = None
    server_port: int | None = None
    examples: bool = True
    extra_method_options: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    def service_config(self) -> ServiceConfig:
        options: dict[str, dict[str, Any]] = {k: dict(v) for k, v in self.extra_method_options.items()}
        anople = options.setdefault("anople", {})
        anople.setdefault("preset", self.anople_preset)
        if self.anople_steps:
            anople.setdefault("steps", int(self.anople_steps))
        return ServiceConfig(
            backbone=self.backbone or None,
            backbone_weights=self.backbone_weights or None,
            checkpoints={"inctrl": self.inctrl_checkpoint or None, "faprompt": self.faprompt_checkpoint or None},
            method_options=options,
            device=self.device,
        )


#: (flag, environment variable(s), type, help). The first variable that is set wins.
CONFIG_FLAGS: list[tuple[str, tuple[str, ...], type, str]] = [
    ("--backbone", ("DETECTOR_BACKBONE",), str, "open_clip model for every method (default: each method's official one; 'tiny-test' = small random CLIP)"),
    ("--backbone-weights", ("DETECTOR_BACKBONE_WEIGHTS",), str, "pretrained tag, local file, 'hf-hub:...' or 'random' for every method (default: official weights)"),
    ("--inctrl-checkpoint", ("INCTRL_CHECKPOINT",), str, "InCTRL checkpoint (official .pyth or ours); none = training-free mode"),
    ("--faprompt-checkpoint", ("FAPROMPT_CHECKPOINT",), str, "FAPrompt prompt-learner checkpoint; none = training-free word prompts"),
    ("--anople-preset", ("ANOPLE_PRESET",), str, "AnoPLe preset: fast (default), faithful or text_only"),
    ("--anople-steps", ("ANOPLE_STEPS",), int, "AnoPLe prompt-learning steps (default: the preset's)"),
    ("--device", ("DETECTOR_DEVICE",), str, "torch device (default: cpu)"),
    ("--threads", ("DETECTOR_THREADS",), int, "torch CPU threads (default: torch's choice)"),
    ("--server-name", ("GRADIO_SERVER_NAME",), str, "host to listen on (default 127.0.0.1; 0.0.0.0 on Spaces)"),
    ("--server-port", ("GRADIO_SERVER_PORT", "PORT"), int, "port (default: first free from 7860)"),
]


def config_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python app.py",
        description="CLIP anomaly inspection app (InCTRL, AnoPLe, FAPrompt). Every flag can also be set by the "
        "environment variable named in brackets; a flag wins over its variable.",
    )
    for flag, variables, kind, help_ in CONFIG_FLAGS:
        parser.add_argument(flag, type=kind, default=None, help=f"{help_} [{' / '.join(variables)}]")
    parser.add_argument(
        "--no-examples", action="store_true", default=None, help="do not offer the example sets [DETECTOR_NO_EXAMPLES=1]"
    )
    return parser


def parse_config(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> AppConfig:
    """Flags first, then environment variables, then defaults."""
    environ = os.environ if environ is None else environ
    args = config_parser().parse_args(list(argv) if argv is not None else None)
    values: dict[str, Any] = {}
    for flag, variables, kind, _ in CONFIG_FLAGS:
        key = flag.lstrip("-").replace("-", "_")
        value = getattr(args, key)
        if value is None:
            for variable in variables:
                if environ.get(variable, "").strip():
                    try:
                        value = kind(environ[variable].strip())
                    except ValueError:
                        raise SystemExit(f"{variable}={environ[variable]!r} is not a valid {kind.__name__}") from None
                    break
        if value is not None:
            values[key] = value
    if values.get("anople_preset") not in (None, *ANOPLE_PRESETS):
        raise SystemExit(f"--anople-preset must be one of {', '.join(ANOPLE_PRESETS)}")
    no_examples = args.no_examples or environ.get("DETECTOR_NO_EXAMPLES", "").strip().lower() in {"1", "true", "yes"}
    return AppConfig(examples=not no_examples, **values)


# -----------------------------------------------------------------------------------------
# Components
# -----------------------------------------------------------------------------------------
def pass_file_through(component: gr.Image) -> gr.Image:
    """Make a ``type="filepath"`` image input hand over the uploaded file unopened, so that
    ``detector.images`` alone decodes it (EXIF, modes, bombs) and reports unreadable files
    with its own clear message (Gradio would otherwise open it with PIL first)."""
    original = component.preprocess

    def preprocess(payload):
        if payload is not None and payload.path and not str(payload.url or "").startswith("data:"):
            return str(payload.path)
        return original(payload)

    component.preprocess = preprocess  # type: ignore[method-assign]
    return component


def ordered_methods() -> list[str]:
    registered = list_methods()
    first = [m for m in PREFERRED_ORDER if m in registered]
    return first + [m for m in registered if m not in first]


def display_name(method: str) -> str:
    return get_method(method).display_name


def method_colour(method: str, index: int) -> tuple[int, int, int]:
    return METHOD_COLOURS.get(method, FALLBACK_COLOURS[index % len(FALLBACK_COLOURS)])


def colorbar_html(colormap: str) -> str:
    """A small legend of the fixed 0..1 calibrated scale."""
    colours = maps.colorize(np.linspace(0.0, 1.0, 11, dtype=np.float32)[None, :], colormap)[0]
    stops = ", ".join(f"rgb({r},{g},{b})" for r, g, b in colours)
    return (
        f"<div id='colorbar-inner'><div class='bar' style='background: linear-gradient(to right, {stops});'></div>"
        "<div class='labels'><span>0 · normal</span><span>0.5 · method threshold</span><span>1 · anomalous</span></div></div>"
    )


# -----------------------------------------------------------------------------------------
# Drawing (pure functions of cached results: no model runs here)
# -----------------------------------------------------------------------------------------
def _line_width(image: np.ndarray) -> int:
    return max(2, int(round(min(image.shape[:2]) / 160)))


def _fmt(value: float) -> str:
    return f"{value:.3f}"


def verdict_markdown(outcome: MethodOutcome, threshold: float) -> str:
    calibrated = outcome.calibrated_score
    anomalous = outcome.is_anomalous(threshold)
    badge = (
        "<span style='color:#c62828; font-weight:700;'>● ANOMALOUS</span>"
        if anomalous
        else "<span style='color:#2e7d32; font-weight:700;'>● NORMAL</span>"
    )
    lines = [
        f"### {outcome.display_name}: {_fmt(calibrated)} → {badge}",
        f"calibrated score vs threshold {threshold:.2f} · raw score {_fmt(outcome.result.score)} "
        f"(method threshold {_fmt(outcome.raw_threshold(threshold))})",
        f"<span class='small-text'>calibration: {outcome.calibration.source}"
        f"{'' if outcome.calibration.source != 'default' else ' (uncalibrated fixed range)'} · "
        f"{outcome.seconds:.2f} s{' · normals reused' if outcome.reused_fit else ''}</span>",
    ]
    return "\n\n".join(lines)


def weights_markdown(method: str, description: Mapping[str, Any] | None, fallback: str | None = None) -> str:
    """The per-method "which weights" panel, from ``describe()``."""
    name = display_name(method)
    if not description:
        return f"**{name} weights:** loaded on first use."
    trained = bool(description.get("trained", False))
    mode = description.get("mode")
    lines = [
        f"**{name} weights** · backbone `{description.get('backbone')}` ({description.get('backbone_weights')}) · "
        f"{description.get('image_size')} px",
        f"checkpoint: `{description.get('checkpoint')}`" if description.get("checkpoint") else "checkpoint: none",
        f"learned parts: {'trained' if trained else 'untrained'} · mode: {mode}",
    ]
    if method == "anople" and description.get("steps") is not None:
        lines.append(f"prompts learned on your normal images ({description.get('steps')} steps, preset {description.get('preset')})")
    if fallback or is_meaningless(description):
        lines.append("⚠️ **random backbone weights: scores and maps are meaningless**")
    elif not trained and mode == "training-free":
        lines.append("ℹ️ training-free mode: no trained checkpoint is configured")
    return "\n\n".join(lines)


def comparison_image(report: InspectionReport, threshold: float) -> np.ndarray:
    image = report.query.rgb
    width = _line_width(image)
    for index, outcome in enumerate(report.outcomes):
        mask = maps.threshold_mask(outcome.calibrated_map(), threshold)
        image = maps.draw_contours(image, mask, method_colour(outcome.method, index), width)
    return image


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
                short_weights(outcome.description),
                s["calibration"],
            ]
        )
    return rows


def object_word(object_name: str | None) -> str:
    """The object word for text prompts; ``"object"`` when left empty."""
    return (object_name or "object").strip() or "object"


def explanation_markdown(view: ExplanationView) -> str:
    """The explanation text, plus FAPrompt's prompt similarities as a table."""
    text = f"**{view.method}** · {view.text.split(': ', 1)[-1]}"
    if view.prompt_similarities:
        rows = "\n".join(f"| {label} | {value:.3f} |" for label, value in view.prompt_similarities)
        text += "\n\n| prompt | cosine similarity |\n|---|---|\n" + rows
    elif view.normal_image is None:
        text += "\n\nThis method does not compare with normal patches."
    return text


def thumbnail_markdown(image_rgb: np.ndarray) -> str:
    """A small inline PNG for a Markdown table cell."""
    import cv2

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
        table.append([
            rank,
            thumbnail_markdown(small) if small is not None else "",
            row.image,
            display_name(row.method),
            round(row.score, 4),
            round(row.calibrated, 3),
            row.verdict,
        ])
    return table


def flagged_markdown(rows: Sequence[BatchRow], threshold: float, errors: Sequence[tuple[str, str]] = ()) -> str:
    counts = flagged_counts(rows, threshold)
    images = len({r.image for r in rows})
    parts = [f"**{display_name(m)}**: {n} of {images} flagged" for m, n in counts.items()]
    text = f"At threshold {float(threshold):.2f}: " + " · ".join(parts) if parts else "No image was scored."
    if errors:
        text += "\n\n" + "\n".join(f"- skipped **{name}**: {message}" for name, message in errors)
    return text


def short_weights(description: Mapping[str, Any]) -> str:
    """Compact weights facts for the table: backbone / weights · mode."""
    weights = "random" if is_meaningless(description) else str(description.get("backbone_weights", "?"))
    weights = weights.split(" / ", 1)[-1]
    checkpoint = "checkpoint" if description.get("checkpoint") else "no checkpoint"
    return f"{description.get('backbone')} / {weights} · {description.get('mode')} · {checkpoint}"


def banner_markdown(service: InspectionService, methods: Sequence[str]) -> tuple[str, str]:
    """``(markdown, css class)`` of the banner on top: random/missing weights, downloads."""
    warnings, notes = [], []
    config = service.config
    if str(config.backbone_weights or "").lower() == "random" or config.backbone == "tiny-test":
        warnings.append(
            f"The app is configured with random weights (backbone `{config.backbone or 'official'}`, "
            f"weights `{config.backbone_weights or 'random'}`): **scores and maps are meaningless**; this is a test set-up."
        )
    else:
        for method in methods:
            fallback = service.fallbacks.get(method)
            model, problem = service.weights_status(method)
            if fallback:
                warnings.append(f"**{display_name(method)}**: {fallback}.")
            elif problem and "HF_HUB_OFFLINE" in problem or (problem and "could not" in problem):
                warnings.append(
                    f"**{display_name(method)}**: {problem}; it runs the official architecture ({model}) with "
                    "**random weights: scores are meaningless**."
                )
            elif problem:
                notes.append(f"{display_name(method)}: {problem}.")
    training_free = [display_name(m) for m in methods if m in ("inctrl", "faprompt") and not config.checkpoints.get(m)]
    if training_free:
        notes.append(
            f"{' and '.join(training_free)} run in training-free mode: no trained checkpoint is configured "
            "(none is hosted publicly)."
        )
    if warnings:
        return "⚠️ " + "<br>⚠️ ".join(warnings) + ("<br>ℹ️ " + " ".join(notes) if notes else ""), "warn"
    if notes:
        return "ℹ️ " + " ".join(notes), "note"
    return "", "note"


# -----------------------------------------------------------------------------------------
# Event handlers
# -----------------------------------------------------------------------------------------
class DownloadFolder:
    """Files offered for download (reports, CSV, ZIP), one sub-folder each so the file keeps
    its name; beyond ``limit`` files the oldest are removed. Created on first use."""

    def __init__(self, limit: int = MAX_DOWNLOAD_FILES) -> None:
        self.limit = int(limit)
        self.root: Path | None = None
        self._folders: deque[Path] = deque()
        self._lock = threading.Lock()
        self._count = 0

    def new_path(self, name: str) -> Path:
        with self._lock:
            if self.root is None:
                self.root = Path(tempfile.mkdtemp(prefix="detector-app-"))
            self._count += 1
            folder = self.root / str(self._count)
            folder.mkdir()
            self._folders.append(folder)
            while len(self._folders) > self.limit:
                shutil.rmtree(self._folders.popleft(), ignore_errors=True)
        return folder / name


@dataclass(frozen=True)
class BatchSession:
    """A batch run kept in the session: its result and each image name's uploaded file."""

    result: BatchResult
    paths: Mapping[str, str]


class InspectionApp:
    """The event handlers of one demo: they call the service and draw its results."""

    def __init__(self, config: AppConfig, service: InspectionService | None = None) -> None:
        self.config = config
        self.service = service or InspectionService(config.service_config())
        self.methods = ordered_methods()
        #: Reports of the clicked examples (few and small), by example key.
        self.example_reports: dict[str, InspectionReport] = {}
        self.downloads = DownloadFolder()

    # -- input handling --------------------------------------------------------------------
    @staticmethod
    def gallery_paths(gallery: Any) -> list[str]:
        """Paths from a Gallery value: ``None`` or a list of ``(path, caption)`` / paths / dicts."""
        paths = []
        for item in gallery or []:
            if isinstance(item, (list, tuple)):
                item = item[0]
            if isinstance(item, dict):
                item = (item.get("image") or {}).get("path") if isinstance(item.get("image"), dict) else item.get("path")
            if item is not None:
                paths.append(str(item))
        return paths

    def chosen_methods(self, methods: Sequence[str] | None) -> list[str]:
        chosen = []
        for name in methods or []:
            try:
                key = get_method(name).name
            except ValueError as error:
                raise gr.Error(str(error)) from None
            if key not in chosen:
                chosen.append(key)
        return [m for m in self.methods if m in chosen]

    def method_overrides(self, anople_preset: str | None, anople_steps: float | None, sigma: float | None) -> dict:
        overrides: dict[str, dict[str, Any]] = {}
        anople: dict[str, Any] = {}
        if anople_preset:
            if anople_preset not in ANOPLE_PRESETS:
                raise gr.Error(f"AnoPLe preset must be one of {', '.join(ANOPLE_PRESETS)}, got {anople_preset!r}")
            anople["preset"] = anople_preset
        if anople_steps is not None and float(anople_steps) > 0:
            anople["steps"] = int(anople_steps)
        if anople:
            overrides["anople"] = anople
        if sigma is not None and str(sigma) != "" and float(sigma) >= 0:
            for method in self.methods:
                overrides.setdefault(method, {})["sigma"] = float(sigma)
        elif sigma is not None and str(sigma) != "":
            raise gr.Error(f"smoothing sigma must be >= 0 (empty = each method's default), got {sigma}")
        return overrides

    # -- the main endpoint --------------------------------------------------------------------
    def detect(
        self,
        normals: Any,
        query: Any,
        methods: Sequence[str] | None,
        object_name: str | None = "object",
        threshold: float = 0.5,
        alpha: float = 0.5,
        colormap: str = "jet",
        anople_preset: str | None = None,
        sigma: float | None = None,
        anople_steps: float | None = None,
        progress: gr.Progress = gr.Progress(),
    ) -> tuple:
        report = self.run(normals, query, methods, object_name, alpha, colormap, anople_preset, sigma, anople_steps, progress)
        if report is None:
            return (*self.empty_outputs(), None)
        return (*self.render(report, threshold, alpha, colormap), report)

    def detect_example(self, normals: Any, query: Any, methods: Sequence[str], object_name: str, threshold: float) -> tuple:
        """Examples pass the five main inputs; advanced settings keep their defaults.

        Cached example outputs are stored on disk, where no session state goes: the JSON
        summary then carries the example's inputs under ``"example"``, and the report is
        kept in ``example_reports`` (re-computed once when the server restarted), so the
        threshold slider works on example results too."""
        outputs = self.detect(normals, query, methods, object_name, threshold, progress=None)
        inputs = {"normals": self.gallery_paths(normals), "query": str(query), "methods": list(methods or []),
                  "object": object_name}
        report = outputs[-1]
        if report is not None:
            self.example_reports[json.dumps(inputs, sort_keys=True)] = report
            outputs[0]["example"] = inputs
        return (*outputs[:-1], None)

    def example_report(self, inputs: Any) -> InspectionReport | None:
        """The report of a cached example from its inputs; ``None`` when its files are gone."""
        if not isinstance(inputs, dict):
            return None
        report = self.example_reports.get(json.dumps(inputs, sort_keys=True))
        if report is not None:
            return report
        try:
            if not all(Path(p).is_file() for p in [*inputs["normals"], inputs["query"]]):
                return None
            self.detect_example(
                [(p, None) for p in inputs["normals"]], inputs["query"], inputs["methods"], inputs["object"], 0.5
            )
        except (KeyError, TypeError, gr.Error):
            return None
        return self.example_reports.get(json.dumps(inputs, sort_keys=True))

    def run(self, normals, query, methods, object_name, alpha, colormap, anople_preset, sigma, anople_steps, progress):
        if query is None or query == "":
            raise gr.Error("Upload a query image (the image to inspect) first.")
        request = self.checked_request(normals, methods, alpha, colormap, anople_preset, sigma, anople_steps)
        if request is None:
            return None
        chosen, paths, overrides = request
        callback = self.progress_callback(progress)
        return self.call_service(
            self.service.inspect,
            chosen,
            paths,
            query,
            class_name=object_word(object_name),
            options=overrides,
            progress=callback,
            timeout=limits.REQUEST_TIMEOUT_SECONDS,  # Gradio's time_limit only applies to streams
        )

    def checked_request(self, normals, methods, alpha, colormap, anople_preset, sigma, anople_steps):
        """``(methods, normal paths, option overrides)`` of a request, or ``None`` (with a
        warning) when no method is ticked; ``gr.Error`` for anything unusable."""
        chosen = self.chosen_methods(methods)
        if not chosen:
            gr.Warning("No method is ticked: choose at least one of " + ", ".join(display_name(m) for m in self.methods) + ".")
            return None
        paths = self.gallery_paths(normals)
        if len(paths) > limits.MAX_NORMAL_IMAGES:
            raise gr.Error(
                f"{len(paths)} normal images uploaded, at most {limits.MAX_NORMAL_IMAGES} are accepted: "
                f"remove {len(paths) - limits.MAX_NORMAL_IMAGES} of them."
            )
        few_shot = [display_name(m) for m in chosen if get_method(m).requires_fit]
        if not paths and few_shot:
            raise gr.Error(
                f"{' and '.join(few_shot)} need{'s' if len(few_shot) == 1 else ''} 1–{limits.MAX_NORMAL_IMAGES} normal "
                "images: upload images of defect-free parts, or untick "
                f"{'it' if len(few_shot) == 1 else 'them'} (FAPrompt works without normal images)."
            )
        if colormap not in maps.COLORMAPS:
            raise gr.Error(f"colormap must be one of {', '.join(maps.COLORMAPS)}")
        if not 0.0 <= float(alpha) <= 1.0:
            raise gr.Error("overlay alpha must be between 0 and 1")
        return chosen, paths, self.method_overrides(anople_preset, anople_steps, sigma)

    @staticmethod
    def progress_callback(progress: Any):
        if progress is None:
            return None

        def callback(fraction: float, message: str) -> None:
            progress(fraction, desc=message)

        return callback

    @staticmethod
    def call_service(function, *args, **kwargs):
        """Call the service; its refusals become ``gr.Error`` with their message."""
        try:
            return function(*args, **kwargs)
        except gr.Error:
            raise
        except (DetectorError, ValueError) as error:
            LOG.warning("request refused: %s", error)
            raise gr.Error(str(error)) from None
        except Exception as error:  # keep serving; the log has the traceback
            LOG.exception("inspection failed")
            raise gr.Error(f"The inspection failed ({type(error).__name__}: {error}). See the server log.") from None

    # -- drawing ----------------------------------------------------------------------------
    def render(self, report: InspectionReport, threshold: float, alpha: float, colormap: str) -> tuple:
        threshold = float(threshold)
        by_method = {o.method: o for o in report.outcomes}
        summary = report.summary(threshold)
        per_method: list[Any] = []
        for method in self.methods:
            outcome = by_method.get(method)
            if outcome is None:
                per_method += ["", None, None, None, weights_markdown(method, None)]
                continue
            calibrated = outcome.calibrated_map()
            query = report.query.rgb
            heat = maps.overlay(query, calibrated, alpha=float(alpha), colormap=colormap)
            contour = maps.draw_contours(query, maps.threshold_mask(calibrated, threshold), (255, 0, 0), _line_width(query))
            raw = maps.grid_image(outcome.result.raw_map, query.shape[:2], colormap=colormap)
            per_method += [
                verdict_markdown(outcome, threshold),
                heat,
                contour,
                raw,
                weights_markdown(method, outcome.description, outcome.weights_fallback),
            ]
        banner, _ = banner_markdown(self.service, self.methods)
        warnings = sorted({w for o in report.outcomes for w in o.warnings} | set(report.query.warnings))
        notes = ("**Notes**\n\n" + "\n".join(f"- {w}" for w in warnings)) if warnings else ""
        return (
            summary,
            comparison_image(report, threshold),
            comparison_legend(report),
            table_rows(report, threshold),
            *per_method,
            notes,
            banner,
            self.shots_count_text(report.num_normals),
        )

    def empty_outputs(self) -> tuple:
        per_method: list[Any] = []
        for method in self.methods:
            per_method += ["", None, None, None, weights_markdown(method, None)]
        banner, _ = banner_markdown(self.service, self.methods)
        return ({"methods": {}}, None, "", [], *per_method, "", banner, gr.skip())

    def rerender(
        self, report: InspectionReport | None, summary: Any, threshold: float, alpha: float, colormap: str
    ) -> tuple:
        """Threshold / alpha / colormap changed: redraw from the cached report, no model runs.

        ``report`` is the session's last report; after a click on a cached example it is
        empty and the shown ``summary`` names the example instead."""
        example = summary.get("example") if isinstance(summary, dict) else None
        report = self.session_report(report, summary)
        if report is None:
            return tuple(gr.skip() for _ in range(self.num_render_outputs))
        outputs = self.render(report, threshold, alpha, colormap)
        if example is not None and report is self.example_report(example):
            outputs[0]["example"] = example
        return outputs

    def session_report(self, report: Any, summary: Any) -> InspectionReport | None:
        """The report on screen: the session's last one, or a cached example's."""
        example = summary.get("example") if isinstance(summary, dict) else None
        if not isinstance(report, InspectionReport) and example is not None:
            report = self.example_report(example)
        return report if isinstance(report, InspectionReport) else None

    # -- inspection views -------------------------------------------------------------------
    def explain(self, method: str, report: Any, summary: Any, event: gr.SelectData) -> tuple:
        """A click at pixel ``event.index = [x, y]`` of ``method``'s anomaly map: the patch's
        value and its nearest normal patch (FAPrompt: its prompt similarities), from the
        cached features of the fitted detector (nothing is encoded again)."""
        report = self.session_report(report, summary)
        if report is None:
            raise gr.Error("Run an inspection first, then click on a method's anomaly map.")
        outcome = report.outcome(method)
        if outcome is None or outcome.detector is None:
            raise gr.Error(f"{display_name(method)} has no result for this query: run it first.")
        try:
            x, y = (int(v) for v in event.index[:2])
            view = explanation_view(
                outcome.detector,
                outcome.result,
                report.query.rgb,
                [normal.rgb for normal in report.normals],
                x,
                y,
                calibration=outcome.calibration,
            )
        except (TypeError, ValueError, IndexError) as error:
            raise gr.Error(f"Cannot explain that point: {error}") from None
        return explanation_markdown(view), view.query_image, view.normal_image

    def agreement_view(self, report: Any, summary: Any, threshold: float) -> tuple:
        """Where the methods' calibrated maps agree at ``threshold``, and a one-line summary."""
        report = self.session_report(report, summary)
        if report is None or not report.outcomes:
            return None, ""
        view = agreement(
            {o.display_name: o.calibrated_map() for o in report.outcomes}, float(threshold), base_image=report.query.rgb
        )
        return view.image, f"**Agreement** (yellow = one method … red = all): {view.summary}."

    def report_file(self, report: Any, summary: Any, threshold: float, alpha: float, colormap: str) -> str:
        """A PNG slide of the query on screen: normals, overlays, scores, thresholds, weights."""
        report = self.session_report(report, summary)
        if report is None or not report.outcomes:
            raise gr.Error("Run an inspection first, then download its report.")
        threshold = float(threshold)
        panels = [
            panel_from_summary(o.summary(threshold), maps.overlay(report.query.rgb, o.calibrated_map(), float(alpha), colormap))
            for o in report.outcomes
        ]
        name = Path(report.query.name or "query").stem or "query"
        subtitle = f"{name} · {report.num_normals} normal image(s) · calibrated threshold {threshold:.2f}"
        path = self.downloads.new_path(f"report_{safe_name(name)}.png")
        save_report(path, report.query.rgb, [n.rgb for n in report.normals], panels, subtitle=subtitle)
        return str(path)

    # -- batch mode ---------------------------------------------------------------------------
    @staticmethod
    def batch_paths(files: Any) -> list[str]:
        """Paths from a multi-file ``gr.File`` value."""
        paths = []
        for item in files or []:
            path = item.get("path") if isinstance(item, dict) else item
            if path:
                paths.append(str(path))
        return paths

    def run_batch(
        self,
        files: Any,
        normals: Any,
        methods: Sequence[str] | None,
        object_name: str | None = "object",
        threshold: float = 0.5,
        alpha: float = 0.5,
        colormap: str = "jet",
        anople_preset: str | None = None,
        sigma: float | None = None,
        anople_steps: float | None = None,
        progress: gr.Progress = gr.Progress(),
    ) -> tuple:
        """Score every uploaded query against the normals with the ticked methods."""
        paths = self.batch_paths(files)
        if not paths:
            raise gr.Error("Upload the query images of the batch first.")
        if len(paths) > limits.MAX_BATCH_QUERIES:
            raise gr.Error(
                f"{len(paths)} query images uploaded, at most {limits.MAX_BATCH_QUERIES} are accepted in one batch: "
                f"remove {len(paths) - limits.MAX_BATCH_QUERIES} of them."
            )
        request = self.checked_request(normals, methods, alpha, colormap, anople_preset, sigma, anople_steps)
        if request is None:
            return (gr.skip(),) * 5
        chosen, normal_paths, overrides = request
        named: dict[str, str] = {}
        for path in paths:
            name, number = Path(path).name, 1
            while name in named:
                number += 1
                name = f"{Path(path).stem} ({number}){Path(path).suffix}"
            named[name] = path
        result = self.call_service(
            self.service.batch,
            chosen,
            normal_paths,
            list(named.items()),
            class_name=object_word(object_name),
            options=overrides,
            threshold=float(threshold),
            alpha=float(alpha),
            colormap=colormap,
            progress=self.progress_callback(progress),
        )
        session = BatchSession(result, named)
        archive = self.downloads.new_path("overlays.zip")
        archive.write_bytes(overlays_zip(result.overlays))
        return (*self.render_batch(session, threshold), str(archive), session)

    def render_batch(self, session: Any, threshold: float) -> tuple:
        """``(flagged counts, ranked table, CSV file)`` at ``threshold``; no model runs."""
        if not isinstance(session, BatchSession):
            return gr.skip(), gr.skip(), gr.skip()
        rows = batch_rows_at(session.result.rows, threshold)
        table = self.downloads.new_path("batch.csv")
        table.write_text(batch_csv(rows), encoding="utf-8")
        return flagged_markdown(rows, threshold, session.result.errors), batch_table(rows), str(table)

    def open_batch_row(self, session: Any, event: gr.SelectData) -> tuple:
        """A click on a batch row: that image becomes the query of the single view."""
        if not isinstance(session, BatchSession):
            raise gr.Error("Run a batch first.")
        row = event.row_value if event.row_value is not None else []
        name = row[BATCH_HEADERS.index("image")] if len(row) > BATCH_HEADERS.index("image") else None
        path = session.paths.get(str(name))
        if path is None:
            raise gr.Error(f"No uploaded image is called {name!r}.")
        return path, gr.Tabs(selected="single")

    @property
    def num_render_outputs(self) -> int:
        return 4 + 5 * len(self.methods) + 3

    def column_visibility(self, methods: Sequence[str] | None) -> list:
        try:
            chosen = self.chosen_methods(methods)
        except gr.Error:
            chosen = []
        return [gr.update(visible=m in chosen) for m in self.methods]

    def shots_text(self, normals: Any) -> str:
        return self.shots_count_text(len(self.gallery_paths(normals)))

    @staticmethod
    def shots_count_text(count: int) -> str:
        if count > limits.MAX_NORMAL_IMAGES:
            return f"⚠️ **{count} normal images**: at most {limits.MAX_NORMAL_IMAGES} are accepted, remove {count - limits.MAX_NORMAL_IMAGES}."
        if count == 0:
            return "**0-shot**: only FAPrompt can run without normal images."
        return f"**{count}-shot**: {count} normal image{'s' if count != 1 else ''} (limit {limits.MAX_NORMAL_IMAGES})."


# -----------------------------------------------------------------------------------------
# Examples
# -----------------------------------------------------------------------------------------
def example_rows(methods: Sequence[str]) -> tuple[list[list[Any]], list[str]]:
    """Rows of ``assets/examples/*/`` (normal_*.png + query_*.png) for ``gr.Examples``."""
    rows, labels = [], []
    root = ASSETS_DIR / "examples"
    names = [display_name(m) for m in methods]
    for folder in sorted(p for p in root.glob("*") if p.is_dir()):
        normals = sorted(str(p) for p in folder.glob("normal_*.png"))
        for query in sorted(folder.glob("query_*.png")):
            rows.append([normals, str(query), names, folder.name.split("-")[0], 0.5])
            labels.append(f"{folder.name} · {query.stem.replace('query_', '')}")
    return rows, labels


# -----------------------------------------------------------------------------------------
# Layout
# -----------------------------------------------------------------------------------------
def explain_handler(handlers: InspectionApp, method: str):
    """The click handler of ``method``'s anomaly map (Gradio passes the click as ``SelectData``)."""

    def explain(report: Any, summary: Any, event: gr.SelectData) -> tuple:
        return handlers.explain(method, report, summary, event)

    return explain


def build_demo(config: AppConfig | None = None, service: InspectionService | None = None) -> gr.Blocks:
    """The whole UI; nothing is loaded until the first request. ``demo.inspection_app``
    holds the handlers (and ``.service``) for tests."""
    config = config or AppConfig()
    handlers = InspectionApp(config, service)
    methods = handlers.methods
    names = [display_name(m) for m in methods]
    banner_text, banner_class = banner_markdown(handlers.service, methods)

    with gr.Blocks(title=TITLE, fill_width=True, delete_cache=(3600, 7200)) as demo:
        gr.Markdown(
            f"# {TITLE}\nUpload a few images of a **normal** part and one **query** image. Each method scores the "
            "query and draws where it looks anomalous. Scores and maps are **calibrated per method** "
            "(0.5 = that method's threshold), so one slider decides for all of them. No images at hand? Pick an example at the bottom of the page."
        )
        banner = gr.Markdown(banner_text, elem_id="banner", elem_classes=[banner_class])

        with gr.Row(equal_height=False):
            with gr.Column(scale=5):
                normals = gr.Gallery(
                    type="filepath",
                    file_types=["image"],
                    columns=4,
                    height=220,
                    interactive=True,
                    label=f"Normal images (1–{limits.MAX_NORMAL_IMAGES} defect-free examples)",
                    elem_id="normals",
                )
                shots = gr.Markdown(handlers.shots_text(None), elem_id="shots")
            with gr.Column(scale=3):
                query = gr.Image(
                    type="filepath",
                    image_mode=None,
                    sources=["upload", "clipboard"],
                    height=260,
                    label="Query image (to inspect)",
                    elem_id="query",
                )
                pass_file_through(query)
            with gr.Column(scale=3):
                method_choice = gr.CheckboxGroup(names, value=names, label="Methods", elem_id="methods")
                object_name = gr.Textbox(
                    value="object", label="Object name (used in text prompts)", max_lines=1, elem_id="object-name"
                )
                threshold = gr.Slider(
                    0.0, 1.0, value=0.5, step=0.01, label="Decision threshold (calibrated; 0.5 = each method's own)",
                    elem_id="threshold",
                )
                with gr.Row():
                    run = gr.Button("Run", variant="primary", elem_id="run")
                    clear = gr.ClearButton(value="Clear")
                with gr.Accordion("Advanced", open=False, elem_id="advanced"):
                    alpha = gr.Slider(0.0, 1.0, value=0.5, step=0.05, label="Overlay alpha")
                    colormap = gr.Dropdown(COLORMAP_CHOICES, value="jet", label="Colormap")
                    show_raw = gr.Checkbox(value=False, label="Show raw patch-grid maps (not calibrated)")
                    anople_preset = gr.Dropdown(
                        list(ANOPLE_PRESETS), value=config.anople_preset, label="AnoPLe preset"
                    )
                    anople_steps = gr.Number(
                        value=config.anople_steps, precision=0, minimum=0,
                        label="AnoPLe fit steps (empty or 0 = the preset's)",
                    )
                    sigma = gr.Number(value=None, minimum=0, label="Smoothing sigma in model pixels (empty = each method's)")
                    gr.Markdown(
                        f"Backbone: `{config.backbone or 'official per method'}` · weights: "
                        f"`{config.backbone_weights or 'official per method'}` · device `{config.device}`. "
                        "The models are built on first use and then kept in memory; normal images are encoded "
                        "(and AnoPLe's prompts learned) once per normal set."
                    )

        colorbar = gr.HTML(colorbar_html("jet"), elem_id="colorbar")
        with gr.Tabs(selected="single", elem_id="views") as views:
            with gr.Tab("Single query", id="single"):
                columns, per_method_outputs, raw_images, overlay_images = [], [], [], []
                with gr.Row(equal_height=False):
                    for method in methods:
                        with gr.Column(elem_classes=["method-col"], elem_id=f"col-{method}", min_width=260) as column:
                            header = gr.Markdown(f"### {display_name(method)}", elem_id=f"verdict-{method}", elem_classes=["verdict"])
                            overlay_img = gr.Image(
                                format="png", interactive=False, height=260, label=f"{display_name(method)} · anomaly map (calibrated)",
                                elem_id=f"overlay-{method}", buttons=["download", "fullscreen"],
                            )
                            contour_img = gr.Image(
                                format="png", interactive=False, height=260, label=f"{display_name(method)} · region ≥ threshold",
                                elem_id=f"contour-{method}", buttons=["download", "fullscreen"],
                            )
                            raw_img = gr.Image(
                                format="png", interactive=False, height=200, visible=False,
                                label=f"{display_name(method)} · raw patch grid (own range, not calibrated)",
                                elem_id=f"raw-{method}",
                            )
                            info = gr.Markdown(weights_markdown(method, None), elem_id=f"weights-{method}", elem_classes=["small-text"])
                        columns.append(column)
                        raw_images.append(raw_img)
                        overlay_images.append(overlay_img)
                        per_method_outputs += [header, overlay_img, contour_img, raw_img, info]

                with gr.Row(equal_height=False):
                    with gr.Column(scale=2):
                        strip = gr.Image(format="png", interactive=False, height=300, label="All methods: contours on the query", elem_id="comparison")
                        legend = gr.Markdown("", elem_id="legend")
                    with gr.Column(scale=5):
                        table = gr.Dataframe(
                            headers=TABLE_HEADERS, datatype=["str", "number", "number", "number", "str", "number", "str", "str"],
                            interactive=False, column_count=len(TABLE_HEADERS), label="Summary", elem_id="scores",
                            buttons=["copy"], wrap=True,
                            column_widths=["10%", "8%", "9%", "9%", "10%", "7%", "29%", "18%"],
                        )
                        notes = gr.Markdown("", elem_id="notes")
                        with gr.Accordion("JSON summary", open=False):
                            summary = gr.JSON(label="summary", elem_id="summary")

                with gr.Row(equal_height=False):
                    with gr.Column(scale=3):
                        agreement_image = gr.Image(
                            format="png", interactive=False, height=260, label="Where the methods agree",
                            elem_id="agreement", buttons=["download", "fullscreen"],
                        )
                        agreement_text = gr.Markdown("", elem_id="agreement-summary")
                    with gr.Column(scale=5):
                        gr.Markdown(
                            "### Why is a point anomalous?\nClick a point on a method's anomaly map: its patch, its value and "
                            "the most similar patch among the normal images (FAPrompt: its similarity to each prompt)."
                        )
                        explanation_text = gr.Markdown("", elem_id="explanation")
                        with gr.Row():
                            explanation_query = gr.Image(
                                format="png", interactive=False, height=220, label="Query · clicked patch", elem_id="explain-query"
                            )
                            explanation_normal = gr.Image(
                                format="png", interactive=False, height=220, label="Nearest normal patch", elem_id="explain-normal"
                            )
                    with gr.Column(scale=2):
                        report_button = gr.Button("Make report (PNG)", elem_id="make-report")
                        report_download = gr.File(label="Report: query, normals, overlays, scores, weights",
                                                  interactive=False, elem_id="report-file")
            with gr.Tab("Batch", id="batch"):
                gr.Markdown(
                    "Upload many query images: each is scored against the normal images above with the ticked methods "
                    "(the models are fitted once). Click a row to open that image in the single-query view."
                )
                with gr.Row(equal_height=False):
                    with gr.Column(scale=3):
                        batch_files = gr.File(
                            file_count="multiple", file_types=["image"], type="filepath", height=160,
                            label=f"Query images (up to {limits.MAX_BATCH_QUERIES})", elem_id="batch-files",
                        )
                        batch_button = gr.Button("Run batch", variant="primary", elem_id="run-batch")
                    with gr.Column(scale=2):
                        batch_flagged = gr.Markdown("", elem_id="batch-flagged")
                        batch_csv_file = gr.File(label="Table (CSV)", interactive=False, elem_id="batch-csv")
                        batch_zip_file = gr.File(label="Overlays (ZIP)", interactive=False, elem_id="batch-zip")
                batch_grid = gr.Dataframe(
                    headers=BATCH_HEADERS, datatype=["number", "markdown", "str", "str", "number", "number", "str"],
                    interactive=False, column_count=len(BATCH_HEADERS), elem_id="batch-table", wrap=True,
                    label="Ranked per method (highest calibrated score first)",
                )

        with gr.Accordion("About the methods and weights", open=False):
            gr.Markdown(ABOUT_TEXT)

        state = gr.State(None)
        render_outputs = [summary, strip, legend, table, *per_method_outputs, notes, banner, shots]
        main_inputs = [normals, query, method_choice, object_name, threshold]
        advanced_inputs = [alpha, colormap, anople_preset, sigma, anople_steps]

        run.click(
            handlers.detect,
            inputs=main_inputs + advanced_inputs,
            outputs=render_outputs + [state],
            api_name="detect",
            api_description="Score a query against 0-8 normal images with the chosen methods. Returns a JSON summary, then images.",
            time_limit=limits.REQUEST_TIMEOUT_SECONDS,
        ).then(handlers.column_visibility, inputs=[method_choice], outputs=columns, api_visibility="private", queue=False)
        for control in (threshold, alpha, colormap):
            control.change(
                handlers.rerender,
                inputs=[state, summary, threshold, alpha, colormap],
                outputs=render_outputs,
                api_visibility="private",
                show_progress="hidden",
                concurrency_limit=4,
                concurrency_id="rerender",
            )
        colormap.change(colorbar_html, inputs=[colormap], outputs=[colorbar], api_visibility="private", queue=False)
        show_raw.change(
            lambda show: [gr.update(visible=bool(show)) for _ in raw_images],
            inputs=[show_raw], outputs=raw_images, api_visibility="private", queue=False,
        )
        method_choice.change(handlers.column_visibility, inputs=[method_choice], outputs=columns, api_visibility="private", queue=False)
        normals.change(handlers.shots_text, inputs=[normals], outputs=[shots], api_visibility="private", queue=False)
        clear.add([normals, query, summary, strip, table, state, *per_method_outputs[1::5],
                   agreement_image, explanation_query, explanation_normal, report_download])

        # Inspection views: all from the session's report, no model runs.
        summary.change(
            handlers.agreement_view, inputs=[state, summary, threshold], outputs=[agreement_image, agreement_text],
            api_visibility="private", show_progress="hidden",
        )
        explanation_outputs = [explanation_text, explanation_query, explanation_normal]
        run.click(lambda: ("", None, None), outputs=explanation_outputs, api_visibility="private", queue=False)
        for method, overlay_img in zip(methods, overlay_images):
            overlay_img.select(
                explain_handler(handlers, method), inputs=[state, summary], outputs=explanation_outputs,
                api_visibility="private", show_progress="minimal",
            )
        report_button.click(
            handlers.report_file, inputs=[state, summary, threshold, alpha, colormap], outputs=[report_download],
            api_visibility="private",
        )

        # Batch mode.
        batch_state = gr.State(None)
        batch_button.click(
            handlers.run_batch,
            inputs=[batch_files, normals, method_choice, object_name, threshold, *advanced_inputs],
            outputs=[batch_flagged, batch_grid, batch_csv_file, batch_zip_file, batch_state],
            api_visibility="private",
            time_limit=limits.REQUEST_TIMEOUT_SECONDS,
        )
        threshold.change(
            handlers.render_batch, inputs=[batch_state, threshold], outputs=[batch_flagged, batch_grid, batch_csv_file],
            api_visibility="private", show_progress="hidden",
        )
        batch_grid.select(
            handlers.open_batch_row, inputs=[batch_state], outputs=[query, views], api_visibility="private"
        ).success(
            handlers.detect, inputs=main_inputs + advanced_inputs, outputs=render_outputs + [state], api_visibility="private",
        ).then(handlers.column_visibility, inputs=[method_choice], outputs=columns, api_visibility="private", queue=False)

        if config.examples:
            rows, labels = example_rows(methods)
            if rows:
                gr.Examples(
                    rows,
                    inputs=main_inputs,
                    outputs=render_outputs + [state],
                    fn=handlers.detect_example,
                    cache_examples=True,
                    cache_mode="lazy",
                    example_labels=labels,
                    label="Examples (synthetic textures; click one, results are cached after the first run)",
                    examples_per_page=6,
                )

    demo.queue(default_concurrency_limit=limits.MAX_CONCURRENT_JOBS, max_size=limits.MAX_QUEUED_JOBS)
    demo.inspection_app = handlers  # type: ignore[attr-defined]
    return demo


ABOUT_TEXT = """
**InCTRL** (CVPR 2024, few-shot): compares the query's patch tokens with those of the normal images at three
ViT layers and adds a text prior; official backbone `ViT-B-16-plus-240` / `laion400m_e32` at 240 px. Without a
trained checkpoint it runs training-free: score = (text score + largest patch residual) / 2.

**AnoPLe** (few-shot, normal images only): text and visual prompts learned on your normal images at `fit`
(a reconstruction: the paper released no code), scored with prompt logits, a decoder and a memory bank; OpenAI
`ViT-B-16` at 224 px. Fitting takes the most time; it happens once per normal set.

**FAPrompt** (zero-shot): fine-grained abnormality prompts; OpenAI `ViT-L-14-336` at 518 px. Without a
trained checkpoint it uses word prompts (training-free). Normal images only serve its calibration.

**Calibration**: each method's score and map are mapped with anomalib's rule
`clip((x - threshold) / (max - min) + 0.5, 0, 1)`; the range and threshold come from a record stored with a
checkpoint, else leave-one-out over the uploaded normals (k ≥ 2: the highest normal value plus a 2 % margin),
else the method's documented fixed range ("default"). Never per-image min-max.

**Limits**: 1–8 normal images, files up to 10 MB, one request at a time (CPU). Models and weights are cached
under `HF_HOME`.
"""


def launch_kwargs(config: AppConfig) -> dict[str, Any]:
    """Keyword arguments of ``demo.launch`` for ``config``."""
    return dict(
        server_name=config.server_name or None,
        server_port=config.server_port or None,
        max_file_size=limits.MAX_UPLOAD_BYTES,
        state_session_capacity=limits.MAX_STORED_SESSIONS,
        allowed_paths=[str(ASSETS_DIR)],
        theme=gr.themes.Soft(primary_hue="blue"),
        css=CSS,
        show_error=False,
    )


def main(argv: Sequence[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = parse_config(argv)
    if config.threads:
        import torch

        torch.set_num_threads(int(config.threads))
    demo = build_demo(config)
    demo.launch(**launch_kwargs(config))


if __name__ == "__main__":
    main()
