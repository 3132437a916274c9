"""Results as each method finishes, per-method progress, and work that starts before Run."""

from __future__ import annotations

import types

import pytest
from PIL import Image

import app
from detector import synthetic
from detector.service import InspectionService

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


def test_results_arrive_method_by_method_and_the_last_is_final(files):
    handlers = make_handlers()
    normals, query = files
    steps = list(handlers.detect_stream(normals, query, ["InCTRL", "AnoPLe", "FAPrompt"], "object", 0.5, progress=None,
                                        request=session("s1")))
    shown = [list(outputs[0]["methods"]) for outputs in steps]
    assert [len(m) for m in shown[:3]] == [1, 2, 3]  # one more method per step
    assert sorted(shown[-1]) == ["anople", "faprompt", "inctrl"]
    # FAPrompt's leave-one-out calibration (k = 2) is deferred: shown provisional first, then final.
    first_faprompt = next(o[0]["methods"]["faprompt"] for o in steps if "faprompt" in o[0]["methods"])
    final = steps[-1][0]["methods"]
    assert first_faprompt["provisional"] is True and first_faprompt["calibration"] == "default"
    assert final["faprompt"]["provisional"] is False and final["faprompt"]["calibration"].startswith("leave-one-out")
    assert not any(entry["provisional"] for entry in final.values())
    # Python callers of detect get exactly the final outputs.
    again = handlers.detect(normals, query, ["InCTRL", "AnoPLe", "FAPrompt"], "object", 0.5, progress=None, request=session("s1"))
    assert again[0]["methods"]["faprompt"]["calibration"] == final["faprompt"]["calibration"]
    # Each method's own progress lands on the session's board, one element per method.
    texts = dict(zip(handlers.methods, handlers.progress_texts(session("s1"))))
    assert texts["anople"].startswith("AnoPLe") and texts["faprompt"] == "FAPrompt: done"
    assert handlers.progress_texts(session("someone else")) == [""] * len(handlers.methods)


def test_prefetched_work_is_reused_by_run(files):
    handlers = make_handlers()
    normals, query = files
    status = handlers.prefetch(normals, ["InCTRL", "AnoPLe", "FAPrompt"], "object", request=session("s2"))
    assert status
    handlers.service.prefetcher.job("s2").wait(GUARD)
    assert handlers.prefetch_status(session("s2")).endswith("ready")
    fits = handlers.service.fit_count
    outputs = handlers.detect(normals, query, ["InCTRL", "AnoPLe", "FAPrompt"], "object", 0.5, progress=None, request=session("s2"))
    assert all(entry["reused_fit"] for entry in outputs[0]["methods"].values())
    assert handlers.service.fit_count == fits
    handlers.session_closed(session("s2"))
    assert handlers.service.prefetcher.job("s2") is None


def test_prefetch_reports_unusable_input_without_failing(files, tmp_path):
    handlers = make_handlers()
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    status = handlers.prefetch([(str(broken), None)], ["InCTRL"], "object", request=session("s3"))
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
