"""Reliability and safety of the Gradio app, in-process through gradio_client (tiny-test).

The bad-input matrix of ``test_reliability.py`` through ``/detect``; no file outside the
assets folder is served; the queue's documented limits (``queue full``) and isolation of
20 concurrent sessions; bounded per-session state; the app uses ``detector.limits``.
"""

from __future__ import annotations

import re
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import app
from detector import create_detector, limits
from detector.service import InspectionService
from test_reliability import (
    CASE_NAMES,
    TINY,
    bad_input_cases,
    displayed_shape,
    hostile_checkpoints,
    normal_set,
    query_for,
    texture,
    too_many_normals_pattern,
)

ROOT = Path(__file__).resolve().parents[1]
CONFIG = app.AppConfig(backbone="tiny-test", backbone_weights="random", method_options={"anople": {"steps": 1}})


def launch(demo):
    """Launch with the app's own ``launch`` arguments (upload limit, allowed paths), on loopback."""
    kwargs = {**app.launch_kwargs(CONFIG), "server_name": "127.0.0.1", "server_port": None}
    kwargs.pop("theme", None)
    _, url, _ = demo.launch(prevent_thread_lock=True, quiet=True, **kwargs)
    return url


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from gradio_client import Client

    demo = app.build_demo(CONFIG)
    url = launch(demo)
    client = Client(url, verbose=False, download_files=str(tmp_path_factory.mktemp("downloads")))
    try:
        yield demo, client, url
    finally:
        demo.close()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("app_inputs")
    paths = {}
    for i in range(2):
        paths[f"normal{i}"] = folder / f"normal{i}.png"
        Image.fromarray(texture(40 + i, (64, 64))).save(paths[f"normal{i}"])
    paths["query"] = folder / "query.png"
    Image.fromarray(query_for(3)).save(paths["query"])
    cases = {case.name: case for case in bad_input_cases(folder / "cases")}
    return paths, cases


def gallery(*paths):
    from gradio_client import handle_file

    return [{"image": handle_file(str(p)), "caption": None} for p in paths] if paths else None


def detect(client, normals, query, methods=("InCTRL",)):
    from gradio_client import handle_file

    return client.predict(gallery(*normals), handle_file(str(query)), list(methods), "object", 0.5, api_name="/detect")


def assert_still_serving(client, paths):
    summary = detect(client, [paths["normal0"], paths["normal1"]], paths["query"])[0]
    assert np.isfinite(summary["methods"]["inctrl"]["score"])


# ---------------------------------------------------------------------------------------
# 1. The bad-input matrix through /detect
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", CASE_NAMES)
def test_bad_input_as_query_through_the_app(name, served, files):
    from gradio_client.exceptions import AppError

    _, client, _ = served
    paths, cases = files
    case = cases[name]
    normals = [paths["normal0"], paths["normal1"]]
    if case.error is not None:
        with pytest.raises(AppError, match=case.error):
            detect(client, normals, case.path)
    else:
        summary = detect(client, normals, case.path)[0]
        assert (summary["query"]["height"], summary["query"]["width"]) == displayed_shape(case)
        reference = create_detector("inctrl", **TINY)
        reference.fit([np.array(Image.open(p).convert("RGB")) for p in normals])
        expected = reference.predict(case.expected)
        assert summary["methods"]["inctrl"]["score"] == pytest.approx(expected.score, abs=1e-5)
        warnings = summary["query"]["warnings"] + summary["methods"]["inctrl"]["warnings"]
        if case.warning is not None:
            assert any(re.search(case.warning, w) for w in warnings), warnings
    assert_still_serving(client, paths)


@pytest.mark.parametrize("name", ["text_as_png", "truncated_jpeg", "decompression_bomb", "one_pixel"])
def test_bad_input_as_normal_image_through_the_app(name, served, files):
    from gradio_client.exceptions import AppError

    _, client, _ = served
    paths, cases = files
    with pytest.raises(AppError, match=cases[name].error):
        detect(client, [paths["normal0"], cases[name].path], paths["query"])
    assert_still_serving(client, paths)


def test_normal_count_and_same_file_through_the_app(served, files):
    from gradio_client.exceptions import AppError

    _, client, _ = served
    paths, _ = files
    with pytest.raises(AppError, match=r"InCTRL and AnoPLe need 1–8 normal images"):
        detect(client, [], paths["query"], ["InCTRL", "AnoPLe"])
    count = limits.MAX_NORMAL_IMAGES + 1
    with pytest.raises(AppError, match=too_many_normals_pattern(count)):
        detect(client, [paths["normal0"]] * count, paths["query"], ["FAPrompt"])
    # The same file as normal and query: InCTRL's residuals vanish, its score is the text prior's half.
    summary = detect(client, [paths["query"]], paths["query"])[0]["methods"]["inctrl"]
    alone = create_detector("inctrl", **TINY)
    alone.fit([paths["query"]])
    result = alone.predict(paths["query"])
    assert result.extras["max_patch_residual"] < 1e-4
    assert summary["score"] == pytest.approx(result.score, abs=1e-5)
    assert_still_serving(client, paths)


def test_checkpoint_problems_reach_the_user_as_clear_errors(files, tmp_path):
    """Checkpoints come from the server's configuration: a hostile one is refused with a
    clear message (and no code runs); a shot-count mismatch is a warning in the summary."""
    import gradio as gr

    from detector.checkpoints import save_safetensors
    from detector.methods.inctrl import checkpoint_header

    paths, _ = files
    marker = tmp_path / "marker"
    evil = hostile_checkpoints(tmp_path, marker)["torch_zip"]
    handlers = app.InspectionApp(app.AppConfig(**TINY, checkpoints={"inctrl": str(evil)}, examples=False))
    normals = [(str(paths["normal0"]), None), (str(paths["normal1"]), None)]
    with pytest.raises(gr.Error, match=r"evil\.pyth holds Python objects other than tensors and was not loaded"):
        handlers.detect(normals, str(paths["query"]), ["InCTRL"], "object", 0.5, progress=None)
    assert not marker.exists()
    shots8 = tmp_path / "shots8.safetensors"
    heads = create_detector("inctrl", **TINY).heads.state_dict()
    save_safetensors(shots8, heads, checkpoint_header(backbone="tiny-test", shots=8, epoch=1))
    handlers = app.InspectionApp(app.AppConfig(**TINY, checkpoints={"inctrl": str(shots8)}, examples=False))
    outputs = handlers.detect(normals, str(paths["query"]), ["InCTRL"], "object", 0.5, progress=None)
    warnings = outputs[0]["methods"]["inctrl"]["warnings"]
    assert any("trained with 8 normal images per query, 2 are fitted" in w for w in warnings)
    notes = outputs[4 + 5 * len(handlers.methods)]
    assert "trained with 8 normal images" in notes


# ---------------------------------------------------------------------------------------
# 2. No user-chosen file is served or opened
# ---------------------------------------------------------------------------------------
def test_only_the_assets_folder_is_served(served):
    import httpx

    demo, _, url = served
    assert demo.allowed_paths == [str(ROOT / "assets")]
    example = next((ROOT / "assets").rglob("*.png"))
    base = url.rstrip("/")
    assert httpx.get(f"{base}/gradio_api/file={example}").status_code == 200  # the route works
    for path in ("/etc/passwd", str(ROOT / "app.py"), str(ROOT / "assets" / ".." / "app.py"), str(ROOT / "LICENSE")):
        for route in (f"{base}/gradio_api/file={path}", f"{base}/gradio_api/file/{path.lstrip('/')}"):
            response = httpx.get(route)
            assert response.status_code == 403, (route, response.status_code)
            assert "root:" not in response.text and "import gradio" not in response.text


def test_server_paths_in_requests_are_not_opened(served, files, tmp_path):
    """A raw API call naming a server-side image (not uploaded) as query or normal image is
    refused by Gradio before the app sees it; the app keeps serving."""
    import httpx

    _, client, url = served
    paths, _ = files
    secret = tmp_path / "server_only.png"
    Image.fromarray(texture(50, (64, 64))).save(secret)
    file_data = {"path": str(secret), "meta": {"_type": "gradio.FileData"}}
    defaults = [0.5, "jet", "fast", None, None]
    base = url.rstrip("/")
    for data in ([None, file_data, ["FAPrompt"], "object", 0.5, *defaults],
                 [[{"image": file_data, "caption": None}], file_data, ["InCTRL"], "object", 0.5, *defaults]):
        event = httpx.post(f"{base}/gradio_api/call/detect", json={"data": data}).json()["event_id"]
        stream = httpx.get(f"{base}/gradio_api/call/detect/{event}", timeout=60).text
        assert "event: error" in stream and "server_only" not in stream, stream[:300]
    # The same raw call with uploaded files works (so the refusal above is about the path).
    uploaded = [httpx.post(f"{base}/gradio_api/upload", files={"files": (p.name, p.read_bytes())}).json()[0]
                for p in (paths["normal0"], paths["query"])]
    good = [[{"image": {"path": uploaded[0], "meta": {"_type": "gradio.FileData"}}, "caption": None}],
            {"path": uploaded[1], "meta": {"_type": "gradio.FileData"}}, ["InCTRL"], "object", 0.5, *defaults]
    event = httpx.post(f"{base}/gradio_api/call/detect", json={"data": good}).json()["event_id"]
    stream = httpx.get(f"{base}/gradio_api/call/detect/{event}", timeout=60).text
    assert "event: complete" in stream, stream[:300]
    assert_still_serving(client, paths)


def test_uploads_above_the_size_limit_are_refused(served, tmp_path):
    import httpx

    demo, client, url = served
    assert demo.max_file_size == limits.MAX_UPLOAD_BYTES
    big = tmp_path / "big.png"
    big.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * limits.MAX_UPLOAD_BYTES)
    response = httpx.post(f"{url.rstrip('/')}/gradio_api/upload", files={"files": ("big.png", big.read_bytes())})
    assert response.status_code == 413, response.text
    small = tmp_path / "small.png"
    Image.fromarray(texture(1)).save(small)
    response = httpx.post(f"{url.rstrip('/')}/gradio_api/upload", files={"files": ("small.png", small.read_bytes())})
    assert response.status_code == 200


def test_only_detect_and_prefetch_are_public_endpoints(served):
    """``/detect`` and ``/prefetch`` (work before Run, for API callers) are public; everything
    else (threshold redraw, visibility, progress) is private, and the examples' loader only
    takes the index of a listed example: no client can fill server-side stores."""
    from gradio_client.exceptions import AppError

    demo, client, _ = served
    info = client.view_api(return_format="dict", print_info=False)
    assert sorted(info["named_endpoints"]) == ["/detect", "/prefetch"] and not info["unnamed_endpoints"]
    rerender = next(i for i, fn in demo.fns.items() if getattr(fn.fn, "__name__", "") == "rerender")
    with pytest.raises(ValueError, match="Invalid function index"):
        client.predict(None, None, 0.3, 0.5, "jet", fn_index=rerender)
    rows, _ = app.example_rows(demo.inspection_app.methods)
    with pytest.raises(AppError):
        client.predict(len(rows) + 100, api_name="/load_example")
    assert len(demo.inspection_app.example_reports) <= len(rows)


# ---------------------------------------------------------------------------------------
# 3. Queue limits and isolation of concurrent sessions
# ---------------------------------------------------------------------------------------
def test_queue_uses_the_documented_limits(served):
    demo, _, _ = served
    assert demo._queue.max_size == limits.MAX_QUEUED_JOBS
    assert demo._queue.default_concurrency_limit == limits.MAX_CONCURRENT_JOBS
    detect_fn = next(fn for fn in demo.fns.values() if fn.api_name == "detect")
    assert detect_fn.concurrency_limit in ("default", limits.MAX_CONCURRENT_JOBS, None)


class GatedFactory:
    """``create_detector`` whose first build waits until the test opens the gate, so the
    queue fills deterministically behind one running job."""

    def __init__(self):
        self.entered = threading.Event()
        self.gate = threading.Event()
        self.first = True
        self.lock = threading.Lock()

    def __call__(self, name, **kwargs):
        with self.lock:
            first, self.first = self.first, False
        if first:
            self.entered.set()
            assert self.gate.wait(120), "gate never opened"
        return create_detector(name, **kwargs)


def test_20_concurrent_sessions_queue_full_and_isolated(tmp_path, monkeypatch):
    """20 sessions with different normal sets: with one job running, MAX_QUEUED_JOBS wait
    and the rest get Gradio's "queue full"; every answer equals its request run alone.
    Session state is capped (MAX_STORED_SESSIONS, lowered here to 5) without breaking jobs."""
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError

    count = 20
    methods = [("InCTRL", "FAPrompt")[i % 2] for i in range(count)]
    inputs = []
    for i in range(count):
        normals = []
        for j, image in enumerate(normal_set(i)):
            normals.append(tmp_path / f"n{i}_{j}.png")
            Image.fromarray(image).save(normals[-1])
        query = tmp_path / f"q{i}.png"
        Image.fromarray(query_for(i)).save(query)
        inputs.append((normals, query))
    monkeypatch.setattr(limits, "MAX_STORED_SESSIONS", 5)
    factory = GatedFactory()
    demo = app.build_demo(CONFIG, service=InspectionService(CONFIG.service_config(), factory=factory))
    url = launch(demo)
    try:
        clients = [Client(url, verbose=False, download_files=str(tmp_path / "dl")) for _ in range(count)]
        assert len({c.session_hash for c in clients}) == count

        def submit(i):
            normals, query = inputs[i]
            return clients[i].submit(gallery(*normals), handle_file(str(query)), [methods[i]], "object", 0.5,
                                     api_name="/detect")

        jobs = {0: submit(0)}
        assert factory.entered.wait(60), "the first job never started"
        for i in range(1, count):
            jobs[i] = submit(i)
        rejected_expected = count - 1 - limits.MAX_QUEUED_JOBS
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            rejected = [i for i, job in jobs.items() if job.done() and job.exception() is not None]
            if len(demo._queue) >= limits.MAX_QUEUED_JOBS and len(rejected) >= rejected_expected:
                break
            time.sleep(0.05)
        factory.gate.set()
        answers, failures = {}, {}
        for i, job in jobs.items():
            try:
                answers[i] = job.result(timeout=120)
            except Exception as error:  # collected and checked below
                failures[i] = error
        assert demo.state_session_capacity == 5
        assert len(demo.state_holder.session_data) <= 5
    finally:
        factory.gate.set()
        demo.close()
    assert len(failures) == max(rejected_expected, 0), {i: repr(e) for i, e in failures.items()}
    for error in failures.values():
        assert "queue is full" in str(error).lower() and not isinstance(error, AppError), repr(error)
    assert len(answers) == count - len(failures)
    for i, outputs in answers.items():
        method = methods[i].lower()
        normals, query = inputs[i]
        alone = create_detector(method, **TINY)
        alone.fit([np.array(Image.open(p).convert("RGB")) for p in normals])
        summary = outputs[0]
        assert list(summary["methods"]) == [method]
        assert summary["num_normals"] == len(normals)
        assert summary["methods"][method]["score"] == pytest.approx(alone.predict(query).score, abs=1e-5), i


# ---------------------------------------------------------------------------------------
# 4. Bounded per-session and per-request storage
# ---------------------------------------------------------------------------------------
def test_per_session_state_and_temp_files_are_bounded(served):
    demo, _, _ = served
    # Gradio keeps session state in an LRU of this many sessions; the app's temporary
    # files (uploads, output images) are deleted by age (``delete_cache``).
    assert demo.state_session_capacity == limits.MAX_STORED_SESSIONS
    assert len(demo.state_holder.session_data) <= limits.MAX_STORED_SESSIONS
    frequency, age = demo.delete_cache
    assert 0 < frequency <= 24 * 3600 and 0 < age <= 24 * 3600
    states = [block for block in demo.blocks.values() if block.__class__.__name__ == "State"]
    assert states, "the app keeps its last report in a gr.State"


# ---------------------------------------------------------------------------------------
# 5. One set of limits for the app and the API
# ---------------------------------------------------------------------------------------
def test_app_uses_the_limits_module(served, monkeypatch):
    """Timeout and normal-image limit come from detector.limits at request time."""
    import gradio as gr

    demo, _, _ = served
    handlers = demo.inspection_app
    query = str(ROOT / "assets")  # not used: refused before decoding
    monkeypatch.setattr(limits, "MAX_NORMAL_IMAGES", 1)
    with pytest.raises(gr.Error, match=too_many_normals_pattern(2)):
        handlers.detect([(query, None)] * 2, query, ["FAPrompt"], "object", 0.5, progress=None)
    monkeypatch.setattr(limits, "MAX_NORMAL_IMAGES", 8)
    monkeypatch.setattr(limits, "REQUEST_TIMEOUT_SECONDS", 0.3)
    normals = [(str(p), None) for p in sorted((ROOT / "assets" / "examples").glob("*/normal_*.png"))[:2]]
    query = str(next((ROOT / "assets" / "examples").glob("*/query_*.png")))
    with pytest.raises(gr.Error, match=r"time limit of 0\.3 s"):
        handlers.detect(normals, query, ["AnoPLe"], "object", 0.5, anople_steps=100000, progress=None)
