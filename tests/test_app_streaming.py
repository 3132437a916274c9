"""Results as each method finishes, per-method progress, and work that starts before Run."""

from __future__ import annotations

import threading
import time
import types

import gradio as gr
import pytest
from PIL import Image

import app
from detector import synthetic
from detector.service import InspectionService
from ui import views

GUARD = 120.0


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("streaming")
    normals = []
    for i in range(2):
        normals.append(folder / f"normal{i}.png")
        Image.fromarray(synthetic.texture("grain", 3, 64, i)).save(normals[-1])
    query = folder / "query.png"
    Image.fromarray(synthetic.add_defect(synthetic.texture("grain", 3, (48, 64), 9), 2)[0]).save(query)
    return [(str(p), None) for p in normals], str(query)


def make_handlers():
    config = app.AppConfig(backbone="tiny-test", backbone_weights="random", method_options={"anople": {"steps": 2}}, examples=False)
    return app.InspectionApp(config, InspectionService(config.service_config()))


def session(name):
    return types.SimpleNamespace(session_hash=name)


def panel_of(handlers, outputs, method):
    """The values of ``method``'s column in the render outputs (``ui.layout`` order)."""
    start = 4 + views.PANEL_OUTPUTS * handlers.methods.index(method)
    return outputs[start : start + views.PANEL_OUTPUTS]


def skipped(value):
    return value == gr.skip()


def stream_parts(handlers, outputs):
    """A message of the Run's stream split as ``ui.layout`` orders it: render outputs and
    state, progress texts and ``#prefetch-status``, explanation view, timer."""
    n = handlers.num_render_outputs + 1
    m = len(handlers.methods) + 1
    return outputs[:n], outputs[n : n + m], outputs[n + m : n + m + 3], outputs[n + m + 3]


def result_messages(handlers, messages):
    """The messages that draw results (the others carry progress or start the timer)."""
    return [stream_parts(handlers, outputs)[0] for outputs in messages if not skipped(outputs[0])]


def tick_until_redrawn(handlers, name):
    """Timer ticks until one redraws the results; returns its render outputs and state."""
    end = time.monotonic() + GUARD
    while True:
        outputs = handlers.tick(0.5, 0.5, "jet", request=session(name))
        if not isinstance(outputs[0], dict) or "__type__" not in outputs[0]:  # not gr.skip()
            return outputs[: handlers.num_render_outputs + 1]
        assert time.monotonic() < end, "the final calibration was never redrawn"
        time.sleep(0.05)


def test_results_arrive_method_by_method_and_provisional_ones_are_redrawn_final(files):
    handlers = make_handlers()
    normals, query = files
    messages = list(handlers.detect_stream(normals, query, ["InCTRL", "AnoPLe", "FAPrompt"], "object", 0.5, progress=None,
                                           request=session("s1")))
    steps = result_messages(handlers, messages)
    shown = [list(outputs[0]["methods"]) for outputs in steps]
    assert [len(m) for m in shown] == [1, 2, 3]  # one more method per step, and the stream ends there
    assert sorted(shown[-1]) == ["anople", "faprompt", "inctrl"]
    # A step draws the panel of the method that arrived; the panels drawn before are left as
    # they are on the page (no image is drawn and sent twice).
    for index, step in enumerate(steps):
        arrived = set(shown[index]) - set(shown[index - 1] if index else [])
        for method in handlers.methods:
            panel = panel_of(handlers, step, method)
            new = method in arrived or index == 0  # the first step also clears the other columns
            assert all(value == gr.skip() for value in panel) != new, (index, method)
    # FAPrompt's leave-one-out calibration (k = 2) is not in the stream: the Run ends with it
    # provisional, and the calibration runs as background work.
    last = steps[-1][0]["methods"]
    assert last["faprompt"]["provisional"] is True and last["faprompt"]["calibration"] == "default"
    assert not last["inctrl"]["provisional"] and not last["anople"]["provisional"]
    texts = dict(zip(handlers.methods, handlers.progress_texts(session("s1"))))
    assert texts["faprompt"] == "FAPrompt: provisional (calibrating)"
    arrived_at = next(index for index, methods in enumerate(shown) if "faprompt" in methods)
    assert "provisional" in panel_of(handlers, steps[arrived_at], "faprompt")[0]  # its verdict says so
    assert handlers.final_calibrations.sessions() == ["s1"]
    # The first message clears the explanation view; each message carries the progress texts
    # that changed; the last one starts the page's timer for the background redraw.
    parts = [stream_parts(handlers, outputs) for outputs in messages]
    assert parts[0][2] == ("", None, None)
    assert all(skipped(value) for _, _, explanation, _ in parts[1:] for value in explanation)
    assert isinstance(parts[-1][3], gr.Timer) and parts[-1][3].active is True
    assert all(skipped(timer) for _, _, _, timer in parts[:-1])
    sent = [texts for _, texts, _, _ in parts if not skipped(texts[0])]
    assert dict(zip(handlers.methods, sent[-1]))["faprompt"] == "FAPrompt: provisional (calibrating)"
    # The next timer tick after it lands redraws every output from the final report.
    redrawn = tick_until_redrawn(handlers, "s1")
    assert panel_of(handlers, redrawn, "faprompt")[1] is not None  # its overlay, at the final calibration
    assert "provisional" not in panel_of(handlers, redrawn, "faprompt")[0]
    assert all(value == gr.skip() for m in ("inctrl", "anople") for value in panel_of(handlers, redrawn, m))
    final = redrawn[0]["methods"]
    assert final["faprompt"]["provisional"] is False and final["faprompt"]["calibration"].startswith("leave-one-out")
    assert final["faprompt"]["score"] == last["faprompt"]["score"]  # same answer, final calibration
    assert final["inctrl"] == last["inctrl"]
    assert redrawn[-1].outcome("faprompt").provisional is False  # the session state (threshold slider) is final too
    texts = dict(zip(handlers.methods, handlers.progress_texts(session("s1"))))
    assert texts["anople"].startswith("AnoPLe") and texts["faprompt"] == "FAPrompt: done"
    assert handlers.final_calibrations.sessions() == []
    assert handlers.progress_texts(session("someone else")) == [""] * len(handlers.methods)
    # Python and API callers of detect get the final outputs at once.
    again = handlers.detect(normals, query, ["InCTRL", "AnoPLe", "FAPrompt"], "object", 0.5, progress=None, request=session("s1"))
    assert again[0]["methods"]["faprompt"]["calibration"] == final["faprompt"]["calibration"]
    assert not any(entry["provisional"] for entry in again[0]["methods"].values())


def test_a_new_run_or_a_closed_page_drops_the_pending_redraw(files, tmp_path):
    handlers = make_handlers()
    normals, query = files
    other = tmp_path / "other_normal.png"
    Image.fromarray(synthetic.texture("grain", 3, 64, 77)).save(other)
    gate = threading.Event()
    real = handlers.service.calibrate_report
    handlers.service.calibrate_report = lambda report: gate.wait(GUARD) and real(report)
    try:
        list(handlers.detect_stream(normals, query, ["FAPrompt"], "object", 0.5, progress=None, request=session("s5")))
        assert handlers.final_calibrations.sessions() == ["s5"]
        assert handlers.tick(0.5, 0.5, "jet", request=session("s5"))[0]["__type__"] == "update"  # nothing landed yet
        handlers.session_closed(session("s5"))
        assert handlers.final_calibrations.sessions() == []
    finally:
        gate.set()
    # A Run of other normals in the same session: only its own redraw may land.
    list(handlers.detect_stream(normals, query, ["FAPrompt"], "object", 0.5, progress=None, request=session("s6")))
    list(handlers.detect_stream([(str(other), None), normals[0]], query, ["FAPrompt"], "object", 0.5, progress=None,
                                request=session("s6")))
    redrawn = tick_until_redrawn(handlers, "s6")
    assert [image.name for image in redrawn[-1].normals] == ["other_normal.png", "normal0.png"]
    assert redrawn[0]["methods"]["faprompt"]["provisional"] is False
    assert handlers.final_calibrations.sessions() == []


def test_prefetched_work_is_reused_by_run(files):
    handlers = make_handlers()
    normals, query = files
    status, timer = handlers.prefetch(normals, ["InCTRL", "AnoPLe", "FAPrompt"], "object", request=session("s2"))
    assert status and isinstance(timer, gr.Timer) and timer.active is True  # the timer follows the work
    handlers.service.prefetcher.job("s2").wait(GUARD)
    assert handlers.prefetch_status(session("s2")).endswith("InCTRL, AnoPLe, FAPrompt on 2 normals: ready")
    fits = handlers.service.fit_count
    outputs = handlers.detect(normals, query, ["InCTRL", "AnoPLe", "FAPrompt"], "object", 0.5, progress=None, request=session("s2"))
    assert all(entry["reused_fit"] for entry in outputs[0]["methods"].values())
    assert handlers.service.fit_count == fits
    # The normals were decoded once, for the background work; the Run decoded only the query.
    assert handlers.images.misses == len(normals) + 1 and handlers.images.hits == len(normals)
    handlers.session_closed(session("s2"))
    assert handlers.service.prefetcher.job("s2") is None



def test_a_second_query_draws_answers_due_close_together_in_one_message(files):
    """With every fit cached, the methods whose answers are expected within
    ``COALESCE_FORWARDS`` of the one before come in that one's message."""
    from detector.answer_order import answer_cost, fastest_first
    from ui.handlers import COALESCE_FORWARDS

    handlers = make_handlers()
    normals, query = files
    methods = ["InCTRL", "AnoPLe", "FAPrompt"]
    list(handlers.detect_stream(normals, query, methods, "object", 0.5, progress=None, request=session("s9")))
    first, second, third = fastest_first(handlers.methods, len(normals), {m: True for m in handlers.methods})
    due = {m: answer_cost(m, len(normals), True) <= COALESCE_FORWARDS for m in (second, third)}
    assert due == {second: True, third: False}, "the declared costs no longer group the first two answers"
    messages = list(handlers.detect_stream(normals, query, methods, "object", 0.5, progress=None, request=session("s9")))
    shown = [sorted(outputs[0]["methods"]) for outputs in result_messages(handlers, messages)]
    assert shown == [sorted([first, second]), sorted([first, second, third])]
    assert all(entry["reused_fit"] for entry in result_messages(handlers, messages)[-1][0]["methods"].values())


def test_prefetch_reports_unusable_input_without_failing(files, tmp_path):
    handlers = make_handlers()
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    status, _ = handlers.prefetch([(str(broken), None)], ["InCTRL"], "object", request=session("s3"))
    assert status.startswith("not prefetched") and "broken.png" in status


def test_warm_start_builds_the_models_in_the_background():
    handlers = make_handlers()
    assert handlers.warm_status == "warm start off"
    built = []
    real = handlers.service.factory
    handlers.service.factory = lambda name, **kw: built.append(name) or real(name, **kw)
    handlers.warm_start()
    future_done = lambda: handlers.warm_status in ("ready",) or handlers.warm_status.startswith("warm start failed")  # noqa: E731
    import time

    end = time.monotonic() + GUARD
    while not future_done():
        assert time.monotonic() < end
        time.sleep(0.05)
    assert handlers.warm_status == "ready" and built == handlers.methods
    assert app.parse_config([], {}).warm_start is True
    assert app.parse_config(["--no-warm-start"], {}).warm_start is False
    assert app.parse_config([], {"DETECTOR_WARM_START": "0"}).warm_start is False


def test_a_long_step_sends_its_progress_before_its_result(files):
    """Between two results the stream sends the progress texts that changed (``#progress-<method>``),
    so the page needs no timer while a Run streams."""
    from ui.handlers import PROGRESS_SECONDS

    handlers = make_handlers()
    normals, query = files
    real = handlers.service.iter_inspect

    def slow_second_method(*args, **kwargs):
        for index, report in enumerate(real(*args, **kwargs)):
            yield report
            if index == 0:  # the next method reports a step, then works for a while
                kwargs["method_progress"]("anople", "AnoPLe: learning prompts, step 3/30")
                time.sleep(4 * PROGRESS_SECONDS)

    handlers.service.iter_inspect = slow_second_method
    messages = list(handlers.detect_stream(normals, query, ["InCTRL", "AnoPLe"], "object", 0.5, progress=None, request=session("s7")))
    parts = [stream_parts(handlers, outputs) for outputs in messages]
    arrivals = [index for index, (render, _, _, _) in enumerate(parts) if not skipped(render[0])]
    assert len(arrivals) == 2
    between = parts[arrivals[0] + 1 : arrivals[1]]
    assert between, "no progress message between the two results"
    assert all(skipped(value) for render, _, _, _ in between for value in render)  # progress only: nothing redrawn
    carried = [texts for _, texts, _, _ in parts[: arrivals[1]] if not skipped(texts[0])]
    assert "AnoPLe: learning prompts, step 3/30" in [dict(zip(handlers.methods, t))["anople"] for t in carried]
    assert all(a != b for a, b in zip(carried, carried[1:]))  # unchanged texts are not sent again
    assert all(skipped(texts[0]) or texts in carried for _, texts, _, _ in between)
    assert skipped(parts[-1][3])  # nothing left for the timer to redraw


def test_a_failing_run_says_in_each_column_which_methods_stopped(files):
    from detector.errors import DetectorError

    handlers = make_handlers()
    normals, query = files
    real = handlers.service.iter_inspect

    def fails_after_the_first(*args, **kwargs):
        steps = real(*args, **kwargs)
        yield next(steps)
        raise DetectorError("the second method broke")

    handlers.service.iter_inspect = fails_after_the_first
    messages = []
    with pytest.raises(gr.Error, match="the second method broke"):
        for outputs in handlers.detect_stream(normals, query, ["InCTRL", "AnoPLe"], "object", 0.5, progress=None, request=session("s8")):
            messages.append(outputs)
    carried = [texts for _, texts, _, _ in (stream_parts(handlers, m) for m in messages) if not skipped(texts[0])]
    texts = dict(zip(handlers.methods, carried[-1]))  # what the page shows last
    assert texts["inctrl"] == "InCTRL: done" and texts["anople"] == "AnoPLe: stopped"


def test_the_timer_stops_when_nothing_runs_in_the_background(files):
    from ui.sessions import IDLE_TICKS_BEFORE_STOP

    handlers = make_handlers()
    normals, _ = files

    def timer_of(outputs):
        return outputs[-1]

    # Idle: the timer stops on the IDLE_TICKS_BEFORE_STOP-th tick in a row.
    ticks = [timer_of(handlers.tick(request=session("s9"))) for _ in range(IDLE_TICKS_BEFORE_STOP)]
    assert all(skipped(t) for t in ticks[:-1])
    assert isinstance(ticks[-1], gr.Timer) and ticks[-1].active is False
    # While the session's background work runs, it keeps ticking.
    gate = threading.Event()
    real = handlers.service.fitted
    handlers.service.fitted = lambda *a, **kw: gate.wait(GUARD) and real(*a, **kw)
    try:
        handlers.prefetch(normals, ["InCTRL"], "object", request=session("s9"))
        for _ in range(3 * IDLE_TICKS_BEFORE_STOP):
            assert skipped(timer_of(handlers.tick(request=session("s9"))))
        # While a Run of the session streams, its messages carry that progress: the timer rests.
        with handlers.streaming_runs.running("s9"):
            ticks = [timer_of(handlers.tick(request=session("s9"))) for _ in range(IDLE_TICKS_BEFORE_STOP)]
            assert ticks[-1].active is False
        assert handlers.background_running("s9")  # after the Run, the timer is needed again
    finally:
        gate.set()
    handlers.service.prefetcher.job("s9").wait(GUARD)
    ticks = [timer_of(handlers.tick(request=session("s9"))) for _ in range(IDLE_TICKS_BEFORE_STOP)]
    assert ticks[-1].active is False and "ready" in handlers.prefetch_status(session("s9"))
    # The warm start keeps every session's timer going until the server is ready.
    handlers.warm_status = "warming up: building the models"
    assert all(skipped(timer_of(handlers.tick(request=session("s10")))) for _ in range(3))
    # A closed page's count is forgotten.
    handlers.warm_status = "ready"
    handlers.tick(request=session("s11"))
    assert "s11" in handlers.idle_ticks.sessions()
    handlers.session_closed(session("s11"))
    assert "s11" not in handlers.idle_ticks.sessions()


def test_idle_ticks_count_per_session():
    from ui.sessions import IdleTicks

    ticks = IdleTicks(limit=2)
    assert ticks.count("a", busy=False) is False
    assert ticks.count("b", busy=False) is False
    assert ticks.count("a", busy=True) is False  # busy restarts the count
    assert ticks.count("a", busy=False) is False
    assert ticks.count("a", busy=False) is True
    assert ticks.count("b", busy=False) is True
    assert ticks.sessions() == []
    with pytest.raises(ValueError):
        IdleTicks(limit=0)
