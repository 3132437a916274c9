"""detector.service: fitted-detector cache (keys, LRU bound, isolation), calibration, fallback."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from detector import synthetic
from detector.base import Detector, MethodOutput
from detector.errors import WeightsUnavailableError
from detector.images import fingerprint, load_image
from detector.service import InspectionService, ServiceConfig
from detector.spec import MethodSpec


class CountingDetector(Detector):
    """A stand-in detector: score = mean absolute difference to the mean normal pixel value."""

    spec = MethodSpec(display_name="Counting", default_backbone="tiny-test", default_weights="random", resize="squash", default_sigma=0.0)

    def __init__(self, name: str, calls: dict, backbone_weights=None, **options):
        super().__init__(class_name=options.pop("class_name", "object"))
        self.name = name
        self.method_options_given = options
        self.backbone_weights = backbone_weights
        self.calls = calls
        self.reference = None

    def _fit(self, normals, progress):
        self.calls["fit"] = self.calls.get("fit", 0) + 1
        if progress is not None:
            progress(0.5, "half way")
        self.reference = float(np.mean([img.rgb.mean() for img in normals.images])) if len(normals) else 0.0

    def warm_up(self):
        self.calls.setdefault("order", []).append("warm_up")

    def _encode(self, batch):
        self.calls.setdefault("order", []).append("predict")
        self.calls["predict"] = self.calls.get("predict", 0) + 1
        return [float(image.rgb.mean()) for image in batch.images]

    def _score(self, encoded, batch):
        values = [abs(mean - self.reference) / 255.0 for mean in encoded]
        return [MethodOutput(value, np.full((2, 2), value, np.float32)) for value in values]

    def describe(self):
        return {"method": self.name, "backbone": "fake", "backbone_weights": str(self.backbone_weights),
                "trained": True, "mode": "fake", "checkpoint": None}


def counting_factory(calls, fail_unless_random=False):
    def factory(name, *, backbone=None, backbone_weights=None, checkpoint=None, device="cpu", **options):
        calls.setdefault("built", []).append((name, backbone_weights))
        if fail_unless_random and backbone_weights != "random":
            raise WeightsUnavailableError("ViT-X / tag is not in the Hugging Face cache. Provide the weights")
        return CountingDetector(name, calls, backbone_weights=backbone_weights, **options)

    return factory


def flat(value: int, size=(24, 32)) -> np.ndarray:
    return np.full((*size, 3), value, np.uint8)


def test_same_normals_fit_once_and_different_sets_are_isolated():
    calls: dict = {}
    service = InspectionService(factory=counting_factory(calls))
    set_a = [flat(100), flat(110)]
    set_b = [flat(10), flat(20)]
    first = service.inspect(["inctrl"], set_a, flat(200))
    again = service.inspect(["inctrl"], [flat(100), flat(110)], flat(150))  # equal pixels, new arrays
    assert calls["fit"] == 1 and service.fit_count == 1
    assert again.outcomes[0].reused_fit and not first.outcomes[0].reused_fit
    other = service.inspect(["inctrl"], set_b, flat(200))
    assert calls["fit"] == 2
    # Each normal set gives its own reference: |200-105| vs |200-15|.
    assert first.outcomes[0].result.score == pytest.approx(95 / 255)
    assert other.outcomes[0].result.score == pytest.approx(185 / 255)
    # Set A's detector is untouched by fitting set B.
    third = service.inspect(["inctrl"], set_a, flat(200))
    assert third.outcomes[0].result.score == pytest.approx(95 / 255)
    assert calls["fit"] == 2


def test_a_fit_computes_what_every_predict_reuses_before_the_first_predict():
    """A prefetched fit (calibration deferred) leaves the detector's reused state (``warm_up``)
    to no query: it is computed once with the fit, a reused fit does not compute it again."""
    calls: dict = {}
    service = InspectionService(factory=counting_factory(calls))
    normals = [flat(30), flat(40)]
    service.fitted("inctrl", normals, defer_calibration=True)
    assert calls["order"] == ["warm_up"]
    service.inspect(["inctrl"], normals, flat(90))
    service.inspect(["inctrl"], normals, flat(95))
    assert calls["order"] == ["warm_up", "predict", "predict"]


def test_cache_key_contains_method_options_and_fingerprint():
    calls: dict = {}
    service = InspectionService(factory=counting_factory(calls))
    normals = [flat(50)]
    service.inspect(["inctrl"], normals, flat(60), class_name="screw")
    service.inspect(["inctrl"], normals, flat(60), class_name="bottle")
    service.inspect(["anople"], normals, flat(60), class_name="screw", options={"anople": {"steps": 1}})
    keys = service.cached_keys()
    assert len(keys) == 3 and calls["fit"] == 3
    digest = fingerprint([load_image(flat(50))])
    assert keys[0][0] == "inctrl" and keys[0][2] == digest
    assert ("class_name", "screw") in keys[0][1] and ("class_name", "bottle") in keys[1][1]
    assert keys[2][0] == "anople" and ("steps", 1) in keys[2][1]
    # Options a method does not accept are dropped, so they cannot split the cache.
    assert service.options_for("inctrl", "screw", {"steps": 5, "heads": None}) == {"class_name": "screw"}


def test_lru_bound_drops_least_recently_used():
    calls: dict = {}
    service = InspectionService(factory=counting_factory(calls), cache_size=2)
    sets = [[flat(v)] for v in (10, 20, 30)]
    service.inspect(["inctrl"], sets[0], flat(0))
    service.inspect(["inctrl"], sets[1], flat(0))
    service.inspect(["inctrl"], sets[0], flat(0))  # refresh set 0
    service.inspect(["inctrl"], sets[2], flat(0))  # evicts set 1
    assert len(service.cached_keys()) == 2 and calls["fit"] == 3
    service.inspect(["inctrl"], sets[0], flat(0))
    assert calls["fit"] == 3
    service.inspect(["inctrl"], sets[1], flat(0))
    assert calls["fit"] == 4
    with pytest.raises(ValueError):
        InspectionService(cache_size=0)


def test_concurrent_requests_for_one_key_fit_once():
    calls: dict = {}
    service = InspectionService(factory=counting_factory(calls))
    normals = [flat(70), flat(80)]
    errors = []

    def run():
        try:
            service.inspect(["inctrl"], normals, flat(90))
        except Exception as error:  # pragma: no cover - reported below
            errors.append(error)

    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and calls["fit"] == 1 and calls["predict"] == 4


def test_input_errors_name_the_problem():
    service = InspectionService(factory=counting_factory({}))
    with pytest.raises(ValueError, match="InCTRL needs at least 1 normal"):
        service.inspect(["inctrl"], [], flat(1))
    with pytest.raises(ValueError, match="at most 8"):
        service.inspect(["inctrl"], [flat(i) for i in range(9)], flat(1))
    with pytest.raises(ValueError, match="at least one method"):
        service.inspect([], [flat(1)], flat(1))
    with pytest.raises(ValueError, match="unknown method"):
        service.inspect(["nope"], [flat(1)], flat(1))
    with pytest.raises(ValueError, match="query"):
        service.inspect(["inctrl"], [flat(1)], None)


def test_weights_unavailable_falls_back_to_random_with_warning():
    calls: dict = {}
    service = InspectionService(factory=counting_factory(calls, fail_unless_random=True))
    report = service.inspect(["inctrl"], [flat(1)], flat(2))
    outcome = report.outcomes[0]
    assert calls["built"] == [("inctrl", None), ("inctrl", "random")]
    assert outcome.weights_fallback and "RANDOM weights" in outcome.weights_fallback
    assert any("meaningless" in w for w in outcome.warnings)
    assert "inctrl" in service.fallbacks
    strict = InspectionService(ServiceConfig(fallback_to_random=False), factory=counting_factory({}, True))
    with pytest.raises(WeightsUnavailableError):
        strict.inspect(["inctrl"], [flat(1)], flat(2))


def test_weights_status_without_building():
    service = InspectionService(ServiceConfig(backbone="tiny-test", backbone_weights="random"))
    assert service.weights_status("inctrl") == ("tiny-test", None)
    offline = InspectionService(ServiceConfig())
    model, problem = offline.weights_status("faprompt")
    assert model == "ViT-L-14-336"
    assert problem and "not in the Hugging Face cache" in problem  # no weights on the test machines


def test_real_tiny_methods_calibrated_and_summarised():
    """InCTRL and FAPrompt on the tiny backbone: leave-one-out calibration, summary fields."""
    service = InspectionService(ServiceConfig(backbone="tiny-test", backbone_weights="random"))
    normals = [synthetic.texture("weave", 3, (64, 64), i) for i in range(2)]
    query, _ = synthetic.add_defect(synthetic.texture("weave", 3, (48, 72), 7), 1)
    report = service.inspect(["InCTRL", "faprompt"], normals, query, class_name="fabric")
    assert [o.method for o in report.outcomes] == ["inctrl", "faprompt"]
    for outcome in report.outcomes:
        assert outcome.result.anomaly_map.shape == (48, 72)
        assert outcome.calibration.source.startswith("leave-one-out over 2")
        summary = outcome.summary(0.5)
        assert summary["verdict"] == ("anomalous" if summary["calibrated_score"] >= 0.5 else "normal")
        assert summary["threshold"] == pytest.approx(outcome.calibration.image_threshold)
        assert "random" in summary["weights"]
        calibrated = outcome.calibrated_map()
        assert calibrated.min() >= 0 and calibrated.max() <= 1
    assert report.outcomes[0].description["class_name"] == "fabric"
    assert report.summary(0.3)["methods"]["inctrl"]["threshold_calibrated"] == 0.3


def test_report_keeps_the_normals_and_each_outcomes_detector():
    calls: dict = {}
    service = InspectionService(ServiceConfig(), factory=counting_factory(calls))
    normals = [flat(100), flat(120)]
    report = service.inspect(["inctrl"], normals, flat(200))
    assert [n.rgb.mean() for n in report.normals] == [100, 120]
    outcome = report.outcome("InCTRL")
    assert outcome is report.outcomes[0] and report.outcome("faprompt") is None
    assert outcome.detector is service.fitted("inctrl", normals)[0].detector


def test_batch_fits_each_method_once_and_ranks_the_queries():
    calls: dict = {}
    service = InspectionService(ServiceConfig(), factory=counting_factory(calls))
    normals = [flat(100), flat(100)]
    queries = [("far.png", flat(250)), ("near.png", flat(110)), ("mid.png", flat(180))]
    messages = []
    result = service.batch(["inctrl", "anople"], normals, queries, progress=lambda f, m: messages.append(f))
    assert calls["fit"] == 2 and calls["predict"] == 2 * 3  # one per query and method
    for method in ("inctrl", "anople"):
        assert [r.image for r in result.rows if r.method == method] == ["far.png", "mid.png", "near.png"]
    assert messages == sorted(messages) and messages[-1] == pytest.approx(1.0)
    service.batch(["inctrl"], normals, queries[:1])
    assert calls["fit"] == 2  # reused from the cache
    from detector import limits

    too_many = [("q.png", flat(1))] * (limits.MAX_BATCH_QUERIES + 1)
    with pytest.raises(ValueError, match="accepted in one batch"):
        service.batch(["inctrl"], [flat(5)], too_many)
    assert calls["fit"] == 2  # refused before any fitting
