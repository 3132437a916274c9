"""The app's event handlers: they check a request with the package's rules, call the service
and draw its results with ``ui.views``. Nothing here knows a method by name."""

from __future__ import annotations

import json
import logging
from concurrent.futures import CancelledError
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Collection, Iterator, Mapping, Sequence

import gradio as gr

from detector import limits, maps
from detector.errors import DetectorError
from detector.image_cache import DecodedImageCache
from detector.inspection import explanation_view, panel_from_summary, safe_name, save_report
from detector.outcomes import InspectionReport
from detector.registry import list_methods
from detector.requests import check_normal_count, form_options, in_registry_order
from detector.service import InspectionService

from . import views
from .config import AppConfig
from .controls import advanced_parameters, form_values, leading_parameters, method_controls, with_signature
from .batch import BatchMode, BatchSession
from .files import DownloadFolder, file_paths, gallery_paths
from .service_calls import progress_callback, service_errors
from .sessions import IdleTicks, PendingCalibrations, StreamingRuns
from .stream import BEAT, with_beats

LOG = logging.getLogger("app")
#: ``#warm-status`` while the warm start builds the models.
WARMING_UP = "warming up: building the models"
#: Seconds between the progress messages of a streaming Run (when a method's text changed).
PROGRESS_SECONDS = 0.5
#: A method's answer waits for the next one when that is expected within this many
#: ViT-B-16-plus-240 forwards (``detector.answer_order.due_within``): each message costs the
#: server and the page a redraw on the cores the next predict runs on.
COALESCE_FORWARDS = 2.0


@dataclass(frozen=True)
class Request:
    """A checked request: the methods (registry order), the normal images, the options."""

    methods: list[str]
    normals: list[str]
    options: dict[str, dict[str, Any]]


def _session(request: Any) -> str:
    """The session a request belongs to (``""`` for direct Python calls)."""
    return str(getattr(request, "session_hash", "") or "")


class InspectionApp(BatchMode):
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
        #: Per session: the background job finishing its last Run's provisional calibrations.
        self.final_calibrations = PendingCalibrations()
        #: Per session: how many timer ticks in a row found no background work (then the timer stops).
        self.idle_ticks = IdleTicks()
        #: The sessions whose Run is streaming (its messages carry the progress; the timer rests).
        self.streaming_runs = StreamingRuns()
        #: Decoded uploads: the normals are decoded once for the background work and every Run.
        self.images = DecodedImageCache()
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
        self.prefetch = with_signature(self.prefetch_changed_form, prefetch + advanced)
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
        """``/detect``: score the query against the normals with the ticked methods and
        return the final outputs (every calibration final)."""
        report = None
        for report in self.inspection_steps(form, defer_final_calibration=False):
            pass
        if report is None:
            return (*self.empty_outputs(), None)
        return (*self.render(report, form["threshold"], form["alpha"], form["colormap"]), report)

    def detect_steps(self, **form: Any) -> Iterator[tuple]:
        """Run in the page: the stream outputs (``stream_outputs``) each time a method finishes,
        drawing only the panels that changed (the others are left as they are on the page),
        and in between the progress texts when one changed. The stream ends when every method
        is shown; provisional calibrations are finished as background work and redrawn by the
        timer (``tick``), which the last message starts, so the queue slot is free for other
        Runs. While the stream runs it carries the session's texts and the timer rests (each
        message costs the page a redraw of every output's loading state). Gradio's own
        progress overlay is not used: every column has its own progress text."""
        request = form.get("request")
        session = _session(request)
        unchanged_render = tuple(gr.skip() for _ in range(self.num_render_outputs + 1))
        drawn: dict[str, Any] | None = None
        sent: list[str] | None = None
        first = True
        with self.streaming_runs.running(session):
            try:
                for step in with_beats(self.inspection_steps({**form, "progress": None}, defer_final_calibration=True), PROGRESS_SECONDS):
                    if step is BEAT:
                        render = unchanged_render
                    elif step is None:
                        render = (*self.empty_outputs(), None)
                    else:
                        changed = None if drawn is None else {o.method for o in step.outcomes if drawn.get(o.method) is not o}
                        drawn = {o.method: o for o in step.outcomes}
                        render = (*self.render(step, form["threshold"], form["alpha"], form["colormap"], methods=changed), step)
                    # read after drawing: by then the next method has usually said what it does,
                    # which saves a progress message of its own while that method computes
                    texts = self.stream_texts(request)
                    if step is BEAT and texts == sent:
                        continue
                    yield self.stream_outputs(render, None if texts == sent else texts, clear_explanation=first)
                    sent, first = texts, False
            except Exception:  # the columns say which methods stopped; Gradio shows the error
                texts = self.stream_texts(request)
                yield self.stream_outputs(unchanged_render, None if texts == sent else texts, clear_explanation=first, start_timer=True)
                raise
        if self.background_running(session):
            texts = self.stream_texts(request)
            yield self.stream_outputs(unchanged_render, None if texts == sent else texts, clear_explanation=False, start_timer=True)

    def stream_texts(self, request: Any) -> list[str]:
        """What a Run's stream keeps up to date besides the results: each method's progress
        text and ``#prefetch-status``."""
        return [*self.progress_texts(request), self.prefetch_status(request)]

    def stream_outputs(self, render: tuple, texts: list[str] | None, *, clear_explanation: bool, start_timer: bool = False) -> tuple:
        """One message of the Run's stream, in ``ui.layout``'s order: the render outputs and
        state, the ``stream_texts`` (``None``: unchanged), the explanation view (cleared by
        the first message), and the timer (started when background work is left to show)."""
        texts = [gr.skip()] * (len(self.methods) + 1) if texts is None else list(texts)
        explanation = ("", None, None) if clear_explanation else (gr.skip(),) * 3
        return (*render, *texts, *explanation, gr.Timer(active=True) if start_timer else gr.skip())

    def inspection_steps(self, form: Mapping[str, Any], *, defer_final_calibration: bool) -> Iterator[InspectionReport | None]:
        """The report each time a method finishes (``None`` alone when no method is ticked).
        Each method's own progress goes to the session's progress board."""
        query = form.get("query")
        if query is None or query == "":
            raise gr.Error("Upload a query image (the image to inspect) first.")
        request = self.request(form.get("normals"), form.get("methods"), form)
        if request is None:
            yield None
            return
        session = _session(form.get("request"))
        self.final_calibrations.drop(session)  # an earlier Run's redraw would cover this one
        board = self.progress_board.setdefault(session, {})
        board.clear()
        board.update({m: f"{views.display_name(m)}: waiting" for m in request.methods})
        with service_errors():
            normals = [self.images.load(path) for path in request.normals]
            query = self.images.load(query)
        steps = self.service.iter_inspect(
            request.methods,
            normals,
            query,
            class_name=views.object_word(form.get("object_name")),
            options=request.options,
            progress=progress_callback(form.get("progress")),
            method_progress=lambda method, message: board.__setitem__(method, message),
            timeout=limits.REQUEST_TIMEOUT_SECONDS,  # Gradio's time_limit only applies to streams
            defer_final_calibration=defer_final_calibration,
            coalesce_within=COALESCE_FORWARDS,
        )
        report = None
        try:
            while True:
                with service_errors():
                    step = next(steps, None)
                if step is None:
                    break
                report = step
                yield report
        except Exception:
            shown = {o.method for o in report.outcomes} if report is not None else set()
            board.update({m: f"{views.display_name(m)}: stopped" for m in request.methods if m not in shown})
            raise
        finally:
            steps.close()
        if report is not None:
            future = self.service.calibrate_in_background(report)
            if future is not None:
                self.final_calibrations.start(session, future, [o.method for o in report.outcomes if o.provisional])

    def tick(self, threshold: float = 0.5, alpha: float = 0.5, colormap: str = "jet", request: gr.Request = None) -> tuple:
        """The timer's refresh: the final outputs when the session's background calibration
        has landed (else nothing changes), each method's progress, the background work, the
        server, and the timer itself, stopped once ticks find nothing running (the page then
        sends no requests until a Run or an upload starts it again). The outputs follow
        ``layout``: render outputs and state, the texts, the timer."""
        redraw = self.landed_calibration(threshold, alpha, colormap, request)
        session = _session(request)
        busy = self.background_running(session)
        stop_timer = self.idle_ticks.count(session, busy)
        return (
            *redraw, *self.progress_texts(request), self.prefetch_status(request), f"Server: {self.warm_status}",
            gr.Timer(active=False) if stop_timer else gr.skip(),
        )

    def background_running(self, session: str) -> bool:
        """Whether the timer has something to show the session: the warm start, the
        session's background work (while no Run of it streams, which shows that work's
        progress itself), or its background calibration not yet redrawn."""
        job = self.service.prefetcher.job(session)
        return (
            self.warm_status == WARMING_UP
            or (job is not None and not job.done and session not in self.streaming_runs)
            or self.final_calibrations.future(session) is not None
        )

    def landed_calibration(self, threshold: float, alpha: float, colormap: str, request: gr.Request = None) -> tuple:
        """The render outputs and state of the session's final report once its background
        calibration has ended; ``gr.skip()`` for each while it runs (or when it failed, which
        the method's progress text then says: its default calibration stays on screen)."""
        unchanged = tuple(gr.skip() for _ in range(self.num_render_outputs + 1))
        session = _session(request)
        job = self.final_calibrations.landed(session)
        if job is None:
            return unchanged
        board = self.progress_board.setdefault(session, {})
        try:
            report = job.future.result()
        except CancelledError:
            return unchanged
        except Exception as error:  # the provisional answer stays; say why
            LOG.exception("background calibration failed")
            for method in job.methods:
                board[method] = f"{views.display_name(method)}: calibration failed ({error}); the default calibration stays"
            return unchanged
        for method in job.methods:
            board[method] = f"{views.display_name(method)}: done"
        return (*self.render(report, threshold, alpha, colormap, methods=job.methods), report)

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
            normals = [self.images.load(path) for path in gallery_paths(form.get("normals"))]
            options = form_options(form_values(self.controls, form), form.get("sigma"), methods=self.methods)
            job = self.service.prefetcher.start(
                session, chosen, normals, class_name=views.object_word(form.get("object_name")), options=options
            )
        except (gr.Error, DetectorError, ValueError, TypeError) as error:
            return f"not prefetched: {error}"
        return job.status()

    def prefetch_changed_form(self, **form: Any) -> tuple[str, Any]:
        """The page's prefetch on a change: the status and the timer, started so that
        ``#prefetch-status`` follows the work until "ready"."""
        return self.prefetch_form(**form), gr.Timer(active=True)

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
        self.final_calibrations.drop(session)
        self.progress_board.pop(session, None)
        self.idle_ticks.drop(session)

    def warm_start(self, methods: Sequence[str] | None = None) -> None:
        """Build the configured models and their default text features in the background
        (``#warm-status`` says when the server is ready)."""
        self.warm_status = WARMING_UP

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
    def render(
        self, report: InspectionReport, threshold: float, alpha: float, colormap: str, methods: Collection[str] | None = None
    ) -> tuple:
        """Every output of ``report``; with ``methods``, only those methods' panels are drawn
        and the other panels are left as they are (``gr.skip()``). The summary, strip, table
        and agreement view always cover every method of ``report``."""
        threshold = float(threshold)
        per_method: list[Any] = []
        for method in self.methods:
            if methods is not None and method not in methods:
                per_method += [gr.skip()] * views.PANEL_OUTPUTS
                continue
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
            *views.agreement_outputs(report, threshold),
        )

    def empty_outputs(self) -> tuple:
        per_method: list[Any] = []
        for method in self.methods:
            per_method += views.method_panel(method, None, None, 0.5, 0.5, "jet")
        banner, _ = views.banner_markdown(self.service, self.methods)
        return ({"methods": {}}, None, "", [], *per_method, "", banner, gr.skip(), None, "")

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
        return 4 + views.PANEL_OUTPUTS * len(self.methods) + 5

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
