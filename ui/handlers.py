"""The app's event handlers: they check a request with the package's rules, call the service
and draw its results with ``ui.views``. Nothing here knows a method by name."""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import threading
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import gradio as gr

from detector import limits, maps
from detector.errors import DetectorError
from detector.inspection import BatchResult, agreement, batch_csv, explanation_view, overlays_zip, panel_from_summary, safe_name, save_report
from detector.outcomes import InspectionReport
from detector.registry import list_methods
from detector.requests import check_batch_size, check_normal_count, form_options, in_registry_order, unique_names
from detector.service import InspectionService

from . import views
from .config import AppConfig
from .controls import advanced_parameters, form_values, leading_parameters, method_controls, with_signature

LOG = logging.getLogger("app")

#: Files written for downloads (reports, CSV, ZIP) kept per app before the oldest is removed.
MAX_DOWNLOAD_FILES = 48


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


@dataclass(frozen=True)
class Request:
    """A checked request: the methods (registry order), the normal images, the options."""

    methods: list[str]
    normals: list[str]
    options: dict[str, dict[str, Any]]


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


def file_paths(files: Any) -> list[str]:
    """Paths from a multi-file ``gr.File`` value."""
    return [str(item.get("path") if isinstance(item, dict) else item) for item in files or [] if item]


def progress_callback(progress: Any) -> Callable[[float, str], None] | None:
    if progress is None:
        return None

    def callback(fraction: float, message: str) -> None:
        progress(fraction, desc=message)

    return callback


def _session(request: Any) -> str:
    """The session a request belongs to (``""`` for direct Python calls)."""
    return str(getattr(request, "session_hash", "") or "")


@contextmanager
def service_errors() -> Iterator[None]:
    """The service's refusals become ``gr.Error`` with their message; anything else is
    logged and reported without stopping the server."""
    try:
        yield
    except gr.Error:
        raise
    except (DetectorError, ValueError) as error:
        LOG.warning("request refused: %s", error)
        raise gr.Error(str(error)) from None
    except Exception as error:  # keep serving; the log has the traceback
        LOG.exception("inspection failed")
        raise gr.Error(f"The inspection failed ({type(error).__name__}: {error}). See the server log.") from None


def call_service(function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Call the service under ``service_errors``."""
    with service_errors():
        return function(*args, **kwargs)


class InspectionApp:
    """The event handlers of one demo.

    ``detect`` and ``run_batch`` take the Advanced inputs in endpoint order
    (``ui.controls``): ``alpha``, ``colormap``, the method controls and ``sigma``; their
    signatures name every input, so Python callers may pass them as keywords.
    """

    def __init__(self, config: AppConfig, service: InspectionService | None = None) -> None:
        self.config = config
        self.service = service or InspectionService(config.service_config())
        self.methods = list_methods()
        self.controls = method_controls(self.methods)
        #: Reports of the clicked examples (few and small), by example key.
        self.example_reports: dict[str, InspectionReport] = {}
        self.downloads = DownloadFolder()
        #: Per session: what each method of its running request is doing (``#progress-<method>``).
        self.progress_board: dict[str, dict[str, str]] = {}
        self.warm_status = "warm start off"
        extra = leading_parameters(["progress", "request"], {"progress": gr.Progress(), "request": None})
        extra[1] = extra[1].replace(annotation=gr.Request)
        advanced = advanced_parameters(self.controls) + extra
        main = leading_parameters(["normals", "query", "methods", "object_name", "threshold"], {"object_name": "object", "threshold": 0.5})
        batch = leading_parameters(["files", "normals", "methods", "object_name", "threshold"], {"object_name": "object", "threshold": 0.5})
        prefetch = leading_parameters(["normals", "methods", "object_name"], {"object_name": "object"})
        self.detect_stream = with_signature(self.detect_steps, main + advanced)
        self.detect_stream.__name__ = "detect_stream"
        self.detect = with_signature(self.detect_form, main + advanced)
        self.detect.__name__ = "detect"
        self.run_batch = with_signature(self.batch_form, batch + advanced)
        self.run_batch.__name__ = "run_batch"
        self.prefetch = with_signature(self.prefetch_form, prefetch + advanced)
        self.prefetch.__name__ = "prefetch_on_change"
        self.prefetch_and_wait = with_signature(self.prefetch_wait_form, prefetch + advanced)
        self.prefetch_and_wait.__name__ = "prefetch"

    # -- requests ------------------------------------------------------------------------------
    def chosen_methods(self, methods: Sequence[str] | None) -> list[str]:
        try:
            return in_registry_order(list(methods or []))
        except ValueError as error:
            raise gr.Error(str(error)) from None

    def request(self, normals: Any, methods: Any, form: Mapping[str, Any]) -> Request | None:
        """The checked request, or ``None`` (with a warning) when no method is ticked;
        ``gr.Error`` with the package's message for anything unusable."""
        chosen = self.chosen_methods(methods)
        if not chosen:
            gr.Warning("No method is ticked: choose at least one of " + ", ".join(views.display_name(m) for m in self.methods) + ".")
            return None
        paths = gallery_paths(normals)
        try:
            check_normal_count(chosen, len(paths), noun="uploaded")
            if form["colormap"] not in maps.COLORMAPS:
                raise ValueError(f"colormap must be one of {', '.join(maps.COLORMAPS)}")
            if not 0.0 <= float(form["alpha"]) <= 1.0:
                raise ValueError("overlay alpha must be between 0 and 1")
            options = form_options(form_values(self.controls, form), form.get("sigma"), methods=self.methods)
        except (TypeError, ValueError) as error:
            raise gr.Error(str(error)) from None
        return Request(chosen, paths, options)

    # -- the main endpoint -------------------------------------------------------------------------
    def detect_form(self, **form: Any) -> tuple:
        """``/detect`` for Python callers: the final outputs of ``detect_steps``."""
        outputs = None
        for outputs in self.detect_steps(**form):
            pass
        return outputs

    def detect_steps(self, **form: Any) -> Iterator[tuple]:
        """``/detect``: score the query against the normals with the ticked methods,
        yielding the outputs each time a method finishes (API callers get the last, final
        outputs). Each method's own progress goes to the session's progress board."""
        query = form.get("query")
        if query is None or query == "":
            raise gr.Error("Upload a query image (the image to inspect) first.")
        request = self.request(form.get("normals"), form.get("methods"), form)
        if request is None:
            yield (*self.empty_outputs(), None)
            return
        session = _session(form.get("request"))
        board = self.progress_board.setdefault(session, {})
        board.clear()
        board.update({m: f"{views.display_name(m)}: waiting" for m in request.methods})
        steps = self.service.iter_inspect(
            request.methods,
            request.normals,
            query,
            class_name=views.object_word(form.get("object_name")),
            options=request.options,
            progress=progress_callback(form.get("progress")),
            method_progress=lambda method, message: board.__setitem__(method, message),
            timeout=limits.REQUEST_TIMEOUT_SECONDS,  # Gradio's time_limit only applies to streams
        )
        try:
            while True:
                with service_errors():
                    report = next(steps, None)
                if report is None:
                    return
                yield (*self.render(report, form["threshold"], form["alpha"], form["colormap"]), report)
        finally:
            steps.close()

    def tick(self, request: gr.Request = None) -> tuple:
        """The timer's refresh: each method's progress, the background work, the server."""
        return (*self.progress_texts(request), self.prefetch_status(request), f"Server: {self.warm_status}")

    def progress_texts(self, request: gr.Request = None) -> list[str]:
        """``#progress-<method>`` of the session: what each method of its request is doing;
        a method whose fit the session's background work is still computing shows that
        work's progress."""
        session = _session(request)
        board = self.progress_board.get(session, {})
        job = self.service.prefetcher.job(session)
        background = dict(job.messages) if job is not None else {}
        texts = []
        for method in self.methods:
            text = board.get(method, "")
            if text.endswith(": waiting") and background.get(method):
                text = background[method]
            texts.append(text)
        return texts

    # -- work before Run -----------------------------------------------------------------------
    def prefetch_form(self, **form: Any) -> str:
        """The normals, methods, object name or an option changed: start everything that
        depends only on them in the background for this session; returns the status."""
        session = _session(form.get("request"))
        try:
            chosen = self.chosen_methods(form.get("methods"))
            paths = gallery_paths(form.get("normals"))
            options = form_options(form_values(self.controls, form), form.get("sigma"), methods=self.methods)
            job = self.service.prefetcher.start(
                session, chosen, paths, class_name=views.object_word(form.get("object_name")), options=options
            )
        except (gr.Error, DetectorError, ValueError, TypeError) as error:
            return f"not prefetched: {error}"
        return job.status()

    def prefetch_wait_form(self, **form: Any) -> str:
        """``/prefetch``: as ``prefetch_form``, returning when the work is done."""
        status = self.prefetch_form(**form)
        job = self.service.prefetcher.job(_session(form.get("request")))
        if job is None:
            return status
        job.wait(limits.REQUEST_TIMEOUT_SECONDS)
        return job.status()

    def prefetch_status(self, request: gr.Request = None) -> str:
        """``#prefetch-status``: what the session's background work is doing, or "ready"."""
        job = self.service.prefetcher.job(_session(request))
        return "" if job is None else f"Prepared in the background: {job.status()}"

    def session_closed(self, request: gr.Request = None) -> None:
        """The page closed: cancel its background work and forget its progress."""
        session = _session(request)
        self.service.prefetcher.cancel(session)
        self.progress_board.pop(session, None)

    def warm_start(self, methods: Sequence[str] | None = None) -> None:
        """Build the configured models and their default text features in the background
        (``#warm-status`` says when the server is ready)."""
        self.warm_status = "warming up: building the models"

        def done(future) -> None:
            error = future.exception()
            self.warm_status = "ready" if error is None else f"warm start failed: {error}"

        self.service.warm_start(list(methods or self.methods)).add_done_callback(done)

    def detect_example(self, normals: Any, query: Any, methods: Sequence[str], object_name: str, threshold: float) -> tuple:
        """Examples pass the five main inputs; advanced settings keep their defaults.

        Cached example outputs are stored on disk, where no session state goes: the JSON
        summary then carries the example's inputs under ``"example"``, and the report is
        kept in ``example_reports`` (re-computed once when the server restarted), so the
        threshold slider works on example results too."""
        outputs = self.detect(normals, query, methods, object_name, threshold, progress=None)
        inputs = {"normals": gallery_paths(normals), "query": str(query), "methods": list(methods or []), "object": object_name}
        report = outputs[-1]
        if report is not None:
            self.example_reports[json.dumps(inputs, sort_keys=True)] = report
            outputs[0]["example"] = inputs
        return (*outputs[:-1], None)

    def example_report(self, inputs: Any) -> InspectionReport | None:
        """The report of a cached example from its inputs; ``None`` when its files are gone."""
        if not isinstance(inputs, dict):
            return None
        key = json.dumps(inputs, sort_keys=True)
        if key in self.example_reports:
            return self.example_reports[key]
        try:
            if not all(Path(p).is_file() for p in [*inputs["normals"], inputs["query"]]):
                return None
            self.detect_example([(p, None) for p in inputs["normals"]], inputs["query"], inputs["methods"], inputs["object"], 0.5)
        except (KeyError, TypeError, gr.Error):
            return None
        return self.example_reports.get(key)

    # -- drawing ---------------------------------------------------------------------------------
    def render(self, report: InspectionReport, threshold: float, alpha: float, colormap: str) -> tuple:
        threshold = float(threshold)
        per_method: list[Any] = []
        for method in self.methods:
            per_method += views.method_panel(method, report.outcome(method), report.query.rgb, threshold, alpha, colormap)
        banner, _ = views.banner_markdown(self.service, self.methods)
        return (
            report.summary(threshold),
            views.comparison_image(report, threshold),
            views.comparison_legend(report),
            views.table_rows(report, threshold),
            *per_method,
            views.notes_markdown(report),
            banner,
            views.shots_count_text(report.num_normals),
        )

    def empty_outputs(self) -> tuple:
        per_method: list[Any] = []
        for method in self.methods:
            per_method += views.method_panel(method, None, None, 0.5, 0.5, "jet")
        banner, _ = views.banner_markdown(self.service, self.methods)
        return ({"methods": {}}, None, "", [], *per_method, "", banner, gr.skip())

    def rerender(self, report: InspectionReport | None, summary: Any, threshold: float, alpha: float, colormap: str) -> tuple:
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

    @property
    def num_render_outputs(self) -> int:
        return 4 + 5 * len(self.methods) + 3

    # -- inspection views ----------------------------------------------------------------------
    def explain(self, method: str, report: Any, summary: Any, event: gr.SelectData) -> tuple:
        """A click at pixel ``event.index = [x, y]`` of ``method``'s anomaly map: the patch's
        value and its nearest normal patch (or its prompt similarities), from the cached
        features of the fitted detector (nothing is encoded again)."""
        report = self.session_report(report, summary)
        if report is None:
            raise gr.Error("Run an inspection first, then click on a method's anomaly map.")
        outcome = report.outcome(method)
        if outcome is None or outcome.detector is None:
            raise gr.Error(f"{views.display_name(method)} has no result for this query: run it first.")
        try:
            x, y = (int(v) for v in event.index[:2])
            normals = [normal.rgb for normal in report.normals]
            view = explanation_view(outcome.detector, outcome.result, report.query.rgb, normals, x, y, calibration=outcome.calibration)
        except (TypeError, ValueError, IndexError) as error:
            raise gr.Error(f"Cannot explain that point: {error}") from None
        return views.explanation_markdown(view), view.query_image, view.normal_image

    def agreement_view(self, report: Any, summary: Any, threshold: float) -> tuple:
        """Where the methods' calibrated maps agree at ``threshold``, and a one-line summary."""
        report = self.session_report(report, summary)
        if report is None or not report.outcomes:
            return None, ""
        view = agreement({o.display_name: o.calibrated_map() for o in report.outcomes}, float(threshold), base_image=report.query.rgb)
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

    # -- batch mode ---------------------------------------------------------------------------------
    def batch_form(self, **form: Any) -> tuple:
        """Score every uploaded query against the normals with the ticked methods."""
        paths = file_paths(form.get("files"))
        if not paths:
            raise gr.Error("Upload the query images of the batch first.")
        try:
            check_batch_size(len(paths), noun="uploaded")
        except ValueError as error:
            raise gr.Error(str(error)) from None
        request = self.request(form.get("normals"), form.get("methods"), form)
        if request is None:
            return (gr.skip(),) * 5
        named = unique_names(paths)
        result = call_service(
            self.service.batch,
            request.methods,
            request.normals,
            named,
            class_name=views.object_word(form.get("object_name")),
            options=request.options,
            threshold=float(form["threshold"]),
            alpha=float(form["alpha"]),
            colormap=form["colormap"],
            progress=progress_callback(form.get("progress")),
        )
        session = BatchSession(result, dict(named))
        archive = self.downloads.new_path("overlays.zip")
        archive.write_bytes(overlays_zip(result.overlays))
        return (*self.render_batch(session, form["threshold"]), str(archive), session)

    def render_batch(self, session: Any, threshold: float) -> tuple:
        """``(flagged counts, ranked table, CSV file)`` at ``threshold``; no model runs."""
        if not isinstance(session, BatchSession):
            return gr.skip(), gr.skip(), gr.skip()
        rows = views.batch_rows_at(session.result.rows, threshold)
        table = self.downloads.new_path("batch.csv")
        table.write_text(batch_csv(rows), encoding="utf-8")
        return views.flagged_markdown(rows, threshold, session.result.errors), views.batch_table(rows), str(table)

    def open_batch_row(self, session: Any, event: gr.SelectData) -> tuple:
        """A click on a batch row: that image becomes the query of the single view."""
        if not isinstance(session, BatchSession):
            raise gr.Error("Run a batch first.")
        row = event.row_value if event.row_value is not None else []
        column = views.BATCH_HEADERS.index("image")
        name = row[column] if len(row) > column else None
        path = session.paths.get(str(name))
        if path is None:
            raise gr.Error(f"No uploaded image is called {name!r}.")
        return path, gr.Tabs(selected="single")

    # -- small views -----------------------------------------------------------------------------
    def column_visibility(self, methods: Sequence[str] | None) -> list:
        try:
            chosen = self.chosen_methods(methods)
        except gr.Error:
            chosen = []
        return [gr.update(visible=m in chosen) for m in self.methods]

    def shots_text(self, normals: Any) -> str:
        return views.shots_count_text(len(gallery_paths(normals)))


__all__ = ["BatchSession", "DownloadFolder", "InspectionApp", "Request", "file_paths", "gallery_paths"]
