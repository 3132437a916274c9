"""The app's layout: every component, its element id and its events (README "The app").

Element ids the tests and browser tests use are part of the interface: ``#normals``,
``#query``, ``#methods``, ``#threshold``, ``#run``, ``#banner``, ``#scores``, ``#summary``,
``#verdict-<method>``, ``#overlay-<method>``, ``#contour-<method>``, ``#raw-<method>``,
``#weights-<method>``, the inspection and batch ids.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import gradio as gr

from detector import limits, maps
from detector.service import InspectionService

from . import views
from .components import ResultImage
from .config import AppConfig
from .controls import MethodControl, advanced_names
from .handlers import WARMING_UP, InspectionApp

ROOT = Path(__file__).resolve().parent.parent
ASSETS_DIR = ROOT / "assets"
#: How often the page asks for the background work's progress and for a landed background
#: calibration while there is any (seconds); a final calibration is redrawn at most this long
#: after it lands. The timer stops when nothing runs in the background (``InspectionApp.tick``).
TICK_SECONDS = 0.5
#: How often Gradio's queue looks for new events and for progress to send while it waits
#: (seconds). Gradio polls every 1 ms and 10 ms on Linux: about 8 % of a core on the event
#: loop's thread, idle or not, which on 2 cores takes turns with the predict's threads
#: (benchmarks/RESULTS.md, "Gradio's queue polling"). 20 ms adds at most that to an event's start.
QUEUE_POLL_SECONDS = 0.02
TITLE = "CLIP anomaly inspection: InCTRL · AnoPLe · FAPrompt"

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


def poll_queue_every(demo: gr.Blocks, seconds: float) -> list[str]:
    """Let ``demo``'s queue (made by ``demo.queue``) poll at most every ``seconds`` while it
    waits, instead of Gradio's 1 ms / 10 ms. Gradio has no parameter for it: this sets the
    queue's ``sleep_when_free`` and ``progress_update_sleep_when_free`` (Gradio 6) and
    returns the names it set; a Gradio without them keeps its own polling."""
    queue = getattr(demo, "_queue", None)
    changed = []
    for name in ("sleep_when_free", "progress_update_sleep_when_free"):
        current = getattr(queue, name, None)
        if isinstance(current, (int, float)):
            setattr(queue, name, max(float(current), seconds))
            changed.append(name)
    return changed


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


def method_control(control: MethodControl, config: AppConfig) -> Any:
    """The Advanced-panel control of one method option: a dropdown for options with
    choices, a number field otherwise; its value starts at the configured default."""
    configured = dict(config.method_options.get(control.method, {})).get(control.option)
    if control.choices:
        value = configured if configured is not None else control.spec.default
        return gr.Dropdown([str(c) for c in control.choices], value=None if value is None else str(value), label=control.label)
    return gr.Number(value=configured, precision=0 if control.spec.kind is int else None, minimum=0, label=control.label)


def example_rows(methods: Sequence[str]) -> tuple[list[list[Any]], list[str]]:
    """Rows of ``assets/examples/*/`` (normal_*.png + query_*.png) for ``gr.Examples``."""
    rows, labels = [], []
    root = ASSETS_DIR / "examples"
    names = [views.display_name(m) for m in methods]
    for folder in sorted(p for p in root.glob("*") if p.is_dir()):
        normals = sorted(str(p) for p in folder.glob("normal_*.png"))
        for query in sorted(folder.glob("query_*.png")):
            rows.append([normals, str(query), names, folder.name.split("-")[0], 0.5])
            labels.append(f"{folder.name} · {query.stem.replace('query_', '')}")
    return rows, labels


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
    names = [views.display_name(m) for m in methods]
    banner_text, banner_class = views.banner_markdown(handlers.service, methods)

    with gr.Blocks(title=TITLE, fill_width=True, delete_cache=(3600, 7200)) as demo:
        gr.Markdown(
            f"# {TITLE}\nUpload a few images of a **normal** part and one **query** image. Each method scores the "
            "query and draws where it looks anomalous. Scores and maps are **calibrated per method** "
            "(0.5 = that method's threshold), so one slider decides for all of them. No images at hand? Pick an example at the bottom of the page."
        )
        banner = gr.Markdown(banner_text, elem_id="banner", elem_classes=[banner_class])
        with gr.Row():
            # The warm start begins when the page is built (below): say so from the first render.
            warm_text = WARMING_UP if config.warm_start else handlers.warm_status
            warm_status = gr.Markdown(f"Server: {warm_text}", elem_id="warm-status", elem_classes=["small-text"])
            prefetch_status = gr.Markdown("", elem_id="prefetch-status", elem_classes=["small-text"])

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
                    colormap = gr.Dropdown(list(maps.COLORMAPS), value="jet", label="Colormap")
                    show_raw = gr.Checkbox(value=False, label="Show raw patch-grid maps (not calibrated)")
                    controls = {c.name: method_control(c, config) for c in handlers.controls}
                    sigma = gr.Number(value=None, minimum=0, label="Smoothing sigma in model pixels (empty = each method's)")
                    gr.Markdown(
                        f"Backbone: `{config.backbone or 'official per method'}` · weights: "
                        f"`{config.backbone_weights or 'official per method'}` · device `{config.device}`. "
                        "The models are built on first use and then kept in memory; normal images are encoded "
                        "(and prompts learned, for methods that learn at fit) once per normal set."
                    )

        colorbar = gr.HTML(views.colorbar_html("jet"), elem_id="colorbar")
        with gr.Tabs(selected="single", elem_id="views") as tabs:
            with gr.Tab("Single query", id="single"):
                columns, per_method_outputs, raw_images, overlay_images, progress_texts = [], [], [], [], []
                with gr.Row(equal_height=False):
                    for method in methods:
                        with gr.Column(elem_classes=["method-col"], elem_id=f"col-{method}", min_width=260) as column:
                            header = gr.Markdown(f"### {views.display_name(method)}", elem_id=f"verdict-{method}", elem_classes=["verdict"])
                            progress_texts.append(gr.Markdown("", elem_id=f"progress-{method}", elem_classes=["small-text"]))
                            overlay_img = ResultImage(
                                format="png", interactive=False, height=260, label=f"{views.display_name(method)} · anomaly map (calibrated)",
                                elem_id=f"overlay-{method}", buttons=["download", "fullscreen"],
                            )
                            contour_img = ResultImage(
                                format="png", interactive=False, height=260, label=f"{views.display_name(method)} · region ≥ threshold",
                                elem_id=f"contour-{method}", buttons=["download", "fullscreen"],
                            )
                            raw_img = ResultImage(
                                format="png", interactive=False, height=200, visible=False,
                                label=f"{views.display_name(method)} · raw patch grid (own range, not calibrated)",
                                elem_id=f"raw-{method}",
                            )
                            info = gr.Markdown(views.weights_markdown(method, None), elem_id=f"weights-{method}", elem_classes=["small-text"])
                        columns.append(column)
                        raw_images.append(raw_img)
                        overlay_images.append(overlay_img)
                        per_method_outputs += [header, overlay_img, contour_img, raw_img, info]

                with gr.Row(equal_height=False):
                    with gr.Column(scale=2):
                        strip = ResultImage(format="png", interactive=False, height=300, label="All methods: contours on the query", elem_id="comparison")
                        legend = gr.Markdown("", elem_id="legend")
                    with gr.Column(scale=5):
                        table = gr.Dataframe(
                            headers=views.TABLE_HEADERS, datatype=["str", "number", "number", "number", "str", "number", "str", "str"],
                            interactive=False, column_count=len(views.TABLE_HEADERS), label="Summary", elem_id="scores",
                            buttons=["copy"], wrap=True,
                            column_widths=["10%", "8%", "9%", "9%", "10%", "7%", "29%", "18%"],
                        )
                        notes = gr.Markdown("", elem_id="notes")
                        with gr.Accordion("JSON summary", open=False):
                            summary = gr.JSON(label="summary", elem_id="summary")

                with gr.Row(equal_height=False):
                    with gr.Column(scale=3):
                        agreement_image = ResultImage(
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
                            explanation_query = ResultImage(
                                format="png", interactive=False, height=220, label="Query · clicked patch", elem_id="explain-query"
                            )
                            explanation_normal = ResultImage(
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
                    headers=views.BATCH_HEADERS, datatype=["number", "markdown", "str", "str", "number", "number", "str"],
                    interactive=False, column_count=len(views.BATCH_HEADERS), elem_id="batch-table", wrap=True,
                    label="Ranked per method (highest calibrated score first)",
                )

        with gr.Accordion("About the methods and weights", open=False):
            gr.Markdown(ABOUT_TEXT)

        state = gr.State(None)
        render_outputs = [summary, strip, legend, table, *per_method_outputs, notes, banner, shots, agreement_image, agreement_text]
        explanation_outputs = [explanation_text, explanation_query, explanation_normal]
        ticker = gr.Timer(TICK_SECONDS, active=config.warm_start)
        main_inputs = [normals, query, method_choice, object_name, threshold]
        named_inputs = {"alpha": alpha, "colormap": colormap, "sigma": sigma, **controls}
        advanced_inputs = [named_inputs[name] for name in advanced_names(handlers.controls)]

        # The page's Run streams each method as it finishes, with each column's progress in
        # between, and leaves provisional calibrations to the background (the timer redraws
        # them); /detect, for API callers, answers once with every calibration final. Both
        # take the same inputs. Gradio's progress overlay is hidden on Run: the page redraws
        # the loading state of every output each frame while it shows (benchmarks/RESULTS.md),
        # and each column shows its own progress instead.
        run.click(
            handlers.detect_stream,
            inputs=main_inputs + advanced_inputs,
            outputs=[*render_outputs, state, *progress_texts, prefetch_status, *explanation_outputs, ticker],
            api_visibility="private",
            show_progress="hidden",
            time_limit=limits.REQUEST_TIMEOUT_SECONDS,
        )
        detect_button = gr.Button("detect", visible=False)
        detect_button.click(
            handlers.detect,
            inputs=main_inputs + advanced_inputs,
            outputs=render_outputs + [state],
            api_name="detect",
            api_description="Score a query against 0-8 normal images with the chosen methods. Returns a JSON summary, then images.",
            time_limit=limits.REQUEST_TIMEOUT_SECONDS,
        )
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
        colormap.change(views.colorbar_html, inputs=[colormap], outputs=[colorbar], api_visibility="private", queue=False)
        show_raw.change(
            lambda show: [gr.update(visible=bool(show)) for _ in raw_images],
            inputs=[show_raw], outputs=raw_images, api_visibility="private", queue=False,
        )
        method_choice.change(handlers.column_visibility, inputs=[method_choice], outputs=columns, api_visibility="private", queue=False)
        normals.change(handlers.shots_text, inputs=[normals], outputs=[shots], api_visibility="private", queue=False)
        clear.add([normals, query, summary, strip, table, state, *per_method_outputs[1::views.PANEL_OUTPUTS],
                   agreement_image, explanation_query, explanation_normal, report_download])

        # Inspection views: all from the session's report, no model runs (the agreement view
        # is drawn with the results; a Run's first message clears the explanation).
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
            handlers.open_batch_row, inputs=[batch_state], outputs=[query, tabs], api_visibility="private"
        ).success(
            handlers.detect, inputs=main_inputs + advanced_inputs, outputs=render_outputs + [state], api_visibility="private",
        )

        # Work before Run: whatever depends only on the normals, methods, object name and
        # options starts in the background; a timer shows each method's progress and the
        # session's background work.
        prefetch_inputs = [normals, method_choice, object_name, *advanced_inputs]
        for control in (normals, method_choice, *[c for c in advanced_inputs if c not in (alpha, colormap)]):
            control.change(
                handlers.prefetch, inputs=prefetch_inputs, outputs=[prefetch_status, ticker], api_visibility="private",
                queue=False, trigger_mode="always_last",
            )
        for event in (object_name.submit, object_name.blur):
            event(handlers.prefetch, inputs=prefetch_inputs, outputs=[prefetch_status, ticker], api_visibility="private", queue=False)
        prefetch_button = gr.Button("prefetch", visible=False)
        prefetch_button.click(
            handlers.prefetch_and_wait, inputs=prefetch_inputs, outputs=[prefetch_status], api_name="prefetch",
            api_description="Start the fits and calibrations of these normals, methods and options; returns when ready.",
            concurrency_id="prefetch", concurrency_limit=limits.MAX_QUEUED_JOBS, time_limit=limits.REQUEST_TIMEOUT_SECONDS,
        )
        ticker.tick(
            handlers.tick,
            inputs=[threshold, alpha, colormap],
            outputs=[*render_outputs, state, *progress_texts, prefetch_status, warm_status, ticker],
            api_visibility="private", queue=False, show_progress="hidden",
        )
        demo.unload(handlers.session_closed)

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
    poll_queue_every(demo, QUEUE_POLL_SECONDS)
    if config.warm_start:
        handlers.warm_start()
    demo.inspection_app = handlers  # type: ignore[attr-defined]
    return demo
