"""The app's batch mode: many queries against the same normals, ranked per method, with the
table as CSV and the overlays as ZIP; a click on a row opens that image in the single view.
``InspectionApp`` (``ui.handlers``) takes these handlers from ``BatchMode``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping

import gradio as gr

from detector.inspection import BatchResult, batch_csv, overlays_zip
from detector.requests import check_batch_size, unique_names

from . import views
from .service_calls import call_service, progress_callback, service_errors
from .files import file_paths

if TYPE_CHECKING:
    from detector.image_cache import DecodedImageCache
    from detector.service import InspectionService

    from .files import DownloadFolder


@dataclass(frozen=True)
class BatchSession:
    """A batch run kept in the session: its result and each image name's uploaded file."""

    result: BatchResult
    paths: Mapping[str, str]


class BatchMode:
    """The batch handlers; the class using it provides ``service``, ``images``,
    ``downloads`` and ``request`` (``InspectionApp``)."""

    service: "InspectionService"
    images: "DecodedImageCache"
    downloads: "DownloadFolder"

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
        with service_errors():
            normals = [self.images.load(path) for path in request.normals]
        result = call_service(
            self.service.batch,
            request.methods,
            normals,
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
