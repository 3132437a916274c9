"""The Gradio app in-process through gradio_client, on the tiny random backbone."""

from __future__ import annotations

import os
import types
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import app
from conftest import CountingFactory
from detector import synthetic
from detector.service import InspectionService

ROOT = Path(__file__).resolve().parents[1]
QUERY_SIZE = (48, 80)  # (height, width), deliberately not square


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("app_images")
    paths = {}
    for i in range(2):
        paths[f"normal{i}"] = folder / f"normal{i}.png"
        Image.fromarray(synthetic.texture("weave", 2, 64, i)).save(paths[f"normal{i}"])
    for name, seed in (("query", 1), ("query2", 2)):
        defective, _ = synthetic.add_defect(synthetic.texture("weave", 2, QUERY_SIZE, 10 + seed), seed)
        paths[name] = folder / f"{name}.png"
        Image.fromarray(defective).save(paths[name])
    paths["garbage"] = folder / "broken.png"
    paths["garbage"].write_bytes(b"this is not an image at all" * 10)
    return paths


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from gradio_client import Client

    config = app.AppConfig(backbone="tiny-test", backbone_weights="random", method_options={"anople": {"steps": 1}})
    factory = CountingFactory()
    service = InspectionService(config.service_config(), factory=factory)
    demo = app.build_demo(config, service=service)
    assert factory.built == 0, "building the UI must not build any model"
    _, url, _ = demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=None, quiet=True)
    downloads = tmp_path_factory.mktemp("client_downloads")
    client = Client(url, verbose=False, download_files=str(downloads))
    try:
        yield demo, client, factory
    finally:
        demo.close()


def gallery(*paths):
    from gradio_client import handle_file

    return [{"image": handle_file(str(p)), "caption": None} for p in paths]


def detect(client, normals, query, methods, threshold=0.5, **kw):
    from gradio_client import handle_file

    return client.predict(
        normals, handle_file(str(query)) if query is not None else None, methods, "fabric", threshold,
        api_name="/detect", **kw,
    )


def per_method(outputs, methods_order):
    """Split the flat outputs into {method: (header, overlay, contour, raw, info)}."""
    block = outputs[4:4 + 5 * len(methods_order)]
    return {m: tuple(block[5 * i:5 * i + 5]) for i, m in enumerate(methods_order)}


def test_detect_runs_each_method_with_summary_overlay_and_table(served, images):
    demo, client, factory = served
    order = demo.inspection_app.methods
    outputs = detect(client, gallery(images["normal0"], images["normal1"]), images["query"], ["InCTRL", "AnoPLe", "FAPrompt"])
    summary, strip, legend, table = outputs[:4]
    assert set(summary["methods"]) == {"inctrl", "anople", "faprompt"}
    for entry in summary["methods"].values():
        for key in ("score", "calibrated_score", "threshold", "verdict", "seconds", "weights", "calibration", "warnings"):
            assert key in entry
        assert entry["verdict"] == ("anomalous" if entry["calibrated_score"] >= 0.5 else "normal")
        assert entry["calibration"].startswith("leave-one-out over 2 normals")
        assert "random" in entry["weights"]
    assert (summary["query"]["height"], summary["query"]["width"]) == QUERY_SIZE
    assert table["headers"] == app.TABLE_HEADERS
    assert [row[0] for row in table["data"]] == ["InCTRL", "AnoPLe", "FAPrompt"]
    assert np.array(Image.open(strip)).shape[:2] == QUERY_SIZE
    for method, (header, overlay, contour, raw, info) in per_method(outputs, order).items():
        assert header.startswith(f"### {app.display_name(method)}")
        for path in (overlay, contour, raw):
            assert np.array(Image.open(path)).shape == (*QUERY_SIZE, 3)
        assert "random" in info and "meaningless" in info
    notes, banner, shots, agreement_image, agreement_text = outputs[4 + 5 * len(order):]
    assert "meaningless" in banner
    assert shots.startswith("**2-shot**")
    # The agreement view comes with the results (the last two outputs).
    assert np.array(Image.open(agreement_image)).shape == (*QUERY_SIZE, 3)
    assert "3 methods" in agreement_text

    # Only the chosen methods run; the others' outputs stay empty.
    fits = factory.fits
    outputs = detect(client, gallery(images["normal0"], images["normal1"]), images["query"], ["FAPrompt"])
    assert list(outputs[0]["methods"]) == ["faprompt"]
    blocks = per_method(outputs, order)
    assert blocks["inctrl"][1] is None and blocks["faprompt"][1] is not None
    assert factory.fits == fits  # FAPrompt was fitted on these normals already


def test_new_query_with_same_normals_reuses_fit(served, images):
    _, client, factory = served
    normals = gallery(images["normal1"], images["normal0"])  # a new normal set (other order)
    detect(client, normals, images["query"], ["InCTRL", "AnoPLe"])
    fits, predicts = factory.fits, factory.predicts
    outputs = detect(client, gallery(images["normal1"], images["normal0"]), images["query2"], ["InCTRL", "AnoPLe"])
    assert factory.fits == fits, "same normals: nothing may be fitted again"
    assert factory.predicts == predicts + 2
    assert all(entry["reused_fit"] for entry in outputs[0]["methods"].values())


def test_queue_polls_every_20_ms_not_every_millisecond(served):
    """Gradio's queue polls every 1 ms / 10 ms while it waits (about 8 % of a core on 2
    cores); the app's queue waits ``QUEUE_POLL_SECONDS`` and still serves (the /detect calls
    of this module go through it)."""
    import gradio as gr

    from ui.layout import QUEUE_POLL_SECONDS, poll_queue_every

    demo, _, _ = served
    assert demo._queue.sleep_when_free == demo._queue.progress_update_sleep_when_free == QUEUE_POLL_SECONDS
    with gr.Blocks() as plain:
        gr.Markdown("x")
    plain.queue()
    assert plain._queue.sleep_when_free < 0.01  # Gradio's own polling, which the app replaces
    assert poll_queue_every(plain, 0.5) == ["sleep_when_free", "progress_update_sleep_when_free"]
    assert plain._queue.sleep_when_free == 0.5
    poll_queue_every(plain, 0.1)  # never polls more often than it was told before
    assert plain._queue.progress_update_sleep_when_free == 0.5
    assert poll_queue_every(types.SimpleNamespace(), 0.5) == []  # a Gradio without them: left alone


def test_threshold_redraws_from_state_without_running_models(served, images):
    demo, _, factory = served
    handlers = demo.inspection_app
    outputs = handlers.detect(
        [(str(images["normal0"]), None), (str(images["normal1"]), None)], str(images["query"]),
        ["InCTRL", "FAPrompt"], "fabric", 0.5, progress=None,
    )
    report = outputs[-1]
    predicts, fits = factory.predicts, factory.fits
    low = handlers.rerender(report, None, 0.0, 0.5, "jet")
    high = handlers.rerender(report, None, 1.0, 0.5, "jet")
    assert (factory.predicts, factory.fits) == (predicts, fits)
    for method, entry in low[0]["methods"].items():
        assert entry["verdict"] == "anomalous"
        calibrated = entry["calibrated_score"]
        assert high[0]["methods"][method]["verdict"] == ("anomalous" if calibrated >= 1.0 else "normal")
        assert high[0]["methods"][method]["score"] == entry["score"]
        assert high[0]["methods"][method]["threshold"] > entry["threshold"]
    # At threshold 0 the whole image is the region: its contour runs along the border.
    contour_low = per_method(low, handlers.methods)["inctrl"][2]
    contour_high = per_method(high, handlers.methods)["inctrl"][2]
    assert not np.array_equal(contour_low, contour_high)
    assert np.all(contour_low[0] == (255, 0, 0))
    # The slider's change event is wired to this redraw (and the redraw takes the cached state).
    slider_events = [
        fn for fn in demo.fns.values()
        if any(t[1] == "change" and t[0] == _block_id(demo, "threshold") for t in fn.targets)
    ]
    slider_handlers = {fn.fn for fn in slider_events}
    assert handlers.rerender in slider_handlers
    assert slider_handlers <= {handlers.rerender, handlers.render_batch}  # nothing that runs a model
    import gradio as gr

    skipped = handlers.rerender(None, {"methods": {}}, 0.3, 0.5, "jet")  # no cached state: nothing is redrawn
    assert len(skipped) == handlers.num_render_outputs and all(item == gr.skip() for item in skipped)


def test_example_results_redraw_without_session_state(served):
    """Cached examples restore no gr.State: the summary names the example instead."""
    demo, _, factory = served
    handlers = demo.inspection_app
    rows, _ = app.example_rows(handlers.methods)
    normals, query, _, object_name, threshold = rows[0]
    outputs = handlers.detect_example([(p, None) for p in normals], query, ["InCTRL"], object_name, threshold)
    summary = outputs[0]
    assert summary["example"]["query"] == query and outputs[-1] is None
    predicts = factory.predicts
    redrawn = handlers.rerender("", summary, 0.0, 0.5, "jet")
    assert factory.predicts == predicts
    assert redrawn[0]["methods"]["inctrl"]["verdict"] == "anomalous"
    assert redrawn[0]["example"] == summary["example"]
    # After a restart the report is recomputed once from the example's files.
    handlers.example_reports.clear()
    again = handlers.rerender(None, redrawn[0], 1.0, 0.5, "jet")
    assert again[0]["methods"]["inctrl"]["score"] == summary["methods"]["inctrl"]["score"]


def _block_id(demo, elem_id):
    for block_id, block in demo.blocks.items():
        if getattr(block, "elem_id", None) == elem_id:
            return block_id
    raise KeyError(elem_id)


def test_error_paths_are_clear_and_app_keeps_serving(served, images):
    from gradio_client.exceptions import AppError

    _, client, _ = served
    normals = gallery(images["normal0"], images["normal1"])
    with pytest.raises(AppError, match="query image"):
        detect(client, normals, None, ["InCTRL"])
    with pytest.raises(AppError, match=r"InCTRL and AnoPLe need 1–8 normal images"):
        detect(client, None, images["query"], ["InCTRL", "AnoPLe", "FAPrompt"])
    with pytest.raises(AppError, match=r"9 normal images uploaded, at most 8"):
        detect(client, gallery(*([images["normal0"]] * 9)), images["query"], ["FAPrompt"])
    with pytest.raises(AppError, match=r"broken\.png' is not a recognised image"):
        detect(client, normals, images["garbage"], ["InCTRL"])
    with pytest.raises(AppError, match=r"broken\.png' is not a recognised image"):
        detect(client, gallery(images["normal0"], images["garbage"]), images["query"], ["InCTRL"])
    # No method ticked: a warning and nothing run.
    assert detect(client, normals, images["query"], [])[0] == {"methods": {}}
    # FAPrompt is zero-shot: it runs with an empty gallery, and the app still serves.
    outputs = detect(client, None, images["query"], ["FAPrompt"])
    assert outputs[0]["methods"]["faprompt"]["calibration"] == "default"


def test_config_from_flags_and_environment():
    env = {"DETECTOR_BACKBONE": "tiny-test", "DETECTOR_BACKBONE_WEIGHTS": "random", "INCTRL_CHECKPOINT": "/x.pyth",
           "ANOPLE_PRESET": "faithful", "PORT": "7999", "GRADIO_SERVER_NAME": "0.0.0.0"}
    config = app.parse_config([], env)
    assert (config.backbone, config.backbone_weights, config.checkpoints["inctrl"]) == ("tiny-test", "random", "/x.pyth")
    assert (config.method_options["anople"]["preset"], config.server_port, config.server_name) == ("faithful", 7999, "0.0.0.0")
    service_config = config.service_config()
    assert service_config.checkpoints["inctrl"] == "/x.pyth"
    assert service_config.method_options["anople"]["preset"] == "faithful"
    flagged = app.parse_config(["--backbone", "ViT-B-16", "--server-port", "7001", "--anople-steps", "3"],
                               {**env, "GRADIO_SERVER_PORT": "7002"})
    assert (flagged.backbone, flagged.server_port, flagged.method_options["anople"]["steps"]) == ("ViT-B-16", 7001, 3)
    assert app.parse_config([], {"GRADIO_SERVER_PORT": "7002", "PORT": "7003"}).server_port == 7002
    # No runtime configured: the methods' own default (DETECTOR_RUNTIME, else auto) decides.
    assert "runtime" not in app.AppConfig().service_config().method_options["anople"]
    assert app.parse_config(["--runtime", "openvino"], {}).service_config().method_options["inctrl"]["runtime"] == "openvino"
    assert app.parse_config([], {"DETECTOR_RUNTIME": "torch"}).service_config().method_options["faprompt"]["runtime"] == "torch"
    kwargs = app.launch_kwargs(config)
    assert kwargs["max_file_size"] == app.limits.MAX_UPLOAD_BYTES
    assert kwargs["allowed_paths"] == [str(ROOT / "assets")]


def test_help_lists_every_flag(capsys):
    """``python app.py --help`` runs ``main(["--help"])``: same parser, no launch."""
    with pytest.raises(SystemExit) as exit_info:
        app.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for item in app.config_flags():
        assert item.flag in text
        for variable in item.variables:
            assert variable in text
    assert "--no-examples" in text


def test_offline_banner_for_official_backbones(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    service = InspectionService(app.AppConfig().service_config(), factory=CountingFactory())
    text, css_class = app.banner_markdown(service, app.ordered_methods())
    assert css_class == "warn"
    for name in ("InCTRL", "AnoPLe", "FAPrompt"):
        assert name in text
    assert "random weights" in text and "HF_HUB_OFFLINE" in text


def test_examples_exist_and_are_small():
    rows, labels = app.example_rows(app.ordered_methods())
    assert len(rows) >= 3 and len(labels) == len(rows)
    for normals, query, methods, object_name, threshold in rows:
        assert 1 <= len(normals) <= 8 and Path(query).is_file() and object_name and threshold == 0.5
    total = sum(p.stat().st_size for p in (ROOT / "assets").rglob("*.png"))
    assert total < 1_000_000


def test_overlay_follows_exif_orientation(served, tmp_path):
    """A photo stored 80x48 with EXIF orientation 6 is shown 48 wide and 80 high: so are the maps."""
    _, client, _ = served
    stored = synthetic.texture("grain", 5, (48, 80), 1)
    stored[:, :10] = 0  # a dark band on the stored left edge: the displayed top edge after rotation
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "rotated.jpg"
    Image.fromarray(stored).save(path, exif=exif, quality=95)
    outputs = detect(client, None, path, ["FAPrompt"])
    assert (outputs[0]["query"]["height"], outputs[0]["query"]["width"]) == (80, 48)
    contour = np.array(Image.open(per_method(outputs, app.ordered_methods())["faprompt"][2]))
    assert contour.shape == (80, 48, 3)
    # The outline image starts from the upright query: its dark band is now along the top rows.
    assert contour[2:8, 5:40].mean() < 40 and contour[40:70, 5:40].mean() > 60


@pytest.mark.slow
def test_offline_fallback_runs_official_architecture_with_random_weights(monkeypatch, images):
    """Default configuration without cached weights: InCTRL still answers, flagged as random."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    handlers = app.InspectionApp(app.AppConfig(examples=False))
    outputs = handlers.detect([(str(images["normal0"]), None)], str(images["query"]), ["InCTRL"], "fabric", 0.5,
                              progress=None)
    entry = outputs[0]["methods"]["inctrl"]
    assert "ViT-B-16-plus-240" in entry["weights"] and "random" in entry["weights"]
    assert any("RANDOM weights" in w for w in entry["warnings"])
    assert entry["calibration"] == "default"
    assert "inctrl" in handlers.service.fallbacks
    banner, css_class = app.banner_markdown(handlers.service, handlers.methods)
    assert css_class == "warn" and "pretrained weights unavailable" in banner


@pytest.mark.slow
def test_python_app_starts_offline_with_banner(tmp_path):
    """``python app.py`` with the official backbones and no weights: serves the page with the banner."""
    import json
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("DETECTOR_")}
    env.update(HF_HUB_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False", GRADIO_SERVER_NAME="127.0.0.1",
               GRADIO_SERVER_PORT=str(port), PYTHONPATH=str(ROOT), HF_HOME=str(tmp_path / "hf"))
    log = tmp_path / "server.log"
    with open(log, "w") as handle:
        process = subprocess.Popen([sys.executable, str(ROOT / "app.py")], cwd=str(tmp_path), env=env,
                                   stdout=handle, stderr=subprocess.STDOUT)
    try:
        started = time.monotonic()
        config = None
        while time.monotonic() - started < 120 and process.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/config", timeout=2) as response:
                    config = json.load(response)
                    break
            except OSError:
                time.sleep(0.5)
        assert config is not None, log.read_text()[-3000:]
        banner = next(c["props"]["value"] for c in config["components"] if c.get("props", {}).get("elem_id") == "banner")
        for name in ("InCTRL", "AnoPLe", "FAPrompt"):
            assert name in banner
        assert "HF_HUB_OFFLINE" in banner and "random weights" in banner
        # open_clip logs this line whenever it builds a model without weights: nothing was built at start-up.
        assert "No pretrained weights loaded" not in log.read_text()
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_detect_keeps_its_published_inputs_and_appends_new_method_controls(monkeypatch, tmp_path):
    """``/detect``'s inputs stay in their published order; the controls of a method
    registered later are appended after them, never inserted."""
    published = ["normals", "query", "methods", "object_name", "threshold", "alpha", "colormap",
                 "anople_preset", "sigma", "anople_steps"]

    def parameters(demo):
        return [p["parameter_name"] for p in demo.get_api_info()["named_endpoints"]["/detect"]["parameters"]]

    config = app.AppConfig(backbone="tiny-test", backbone_weights="random", examples=False)
    assert parameters(app.build_demo(config)) == published

    from detector import registry
    from detector.base import Detector, MethodOutput
    from detector.spec import MethodSpec, Option

    class WithControl(Detector):
        def _encode(self, batch):
            return None

        def _score(self, encoded, batch):
            return [MethodOutput(0.0, np.zeros(self.grid, np.float32)) for _ in batch.images]

        spec = MethodSpec(
            display_name="Late method", default_backbone="tiny-test", default_weights="random", resize="squash",
            default_sigma=1.0, options={"power": Option(1.0, kind=float, label="Late method power")}, app_options=("power",),
        )

    detector_list = registry.list_methods()
    monkeypatch.setattr(registry, "_METHODS", dict(registry._METHODS))
    registry.register_method("late")(WithControl)
    assert registry.list_methods() == [*detector_list, "late"]
    demo = app.build_demo(config)
    assert parameters(demo) == [*published, "late_power"]
    # The late method is in the app's method list and answers in /detect's summary through
    # the published positional call (the five main inputs).
    assert "late" in demo.inspection_app.methods
    normal_path, query_path = tmp_path / "late_normal.png", tmp_path / "late_query.png"
    Image.fromarray(np.full((40, 56, 3), 120, np.uint8)).save(normal_path)
    Image.fromarray(np.full((40, 56, 3), 128, np.uint8)).save(query_path)
    outputs = demo.inspection_app.detect([(str(normal_path), None)], str(query_path), ["Late method", "InCTRL"], "object", 0.5)
    assert set(outputs[0]["methods"]) == {"late", "inctrl"}
    from ui.config import config_parser

    assert "--late-power" in config_parser().format_help() and "LATE_POWER" in config_parser().format_help()


def test_prefetch_endpoint_returns_when_ready_and_run_reuses_it(served, tmp_path):
    demo, client, factory = served
    normals = []
    for i in range(2):
        normals.append(tmp_path / f"prefetch{i}.png")
        Image.fromarray(synthetic.texture("grain", 7, 64, 30 + i)).save(normals[-1])
    query = tmp_path / "prefetch_query.png"
    Image.fromarray(synthetic.texture("grain", 7, 64, 40)).save(query)
    status = client.predict(gallery(*normals), ["InCTRL", "FAPrompt"], "fabric", api_name="/prefetch")  # as detect() asks
    assert status == "InCTRL, FAPrompt on 2 normals: ready"
    fits = factory.fits
    outputs = detect(client, gallery(*normals), query, ["InCTRL", "FAPrompt"])
    assert all(entry["reused_fit"] for entry in outputs[0]["methods"].values()) and factory.fits == fits
