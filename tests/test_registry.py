from __future__ import annotations

import numpy as np
import pytest

import detector
from detector import registry
from detector.base import Detector, MethodOutput, check_normal_count
from detector.results import DetectionResult
from detector.spec import MethodSpec, Option
from detector import limits


class _ConstantDetector(Detector):
    """A minimal method used to exercise the registry and the base class."""

    spec = MethodSpec(
        display_name="Constant",
        default_backbone="tiny-test",
        default_weights="random",
        resize="squash",
        default_sigma=0.0,
        options={"level": Option(0.25, kind=float)},
    )

    @property
    def level(self):
        return self.options["level"]

    def _fit(self, normals, progress):
        self.seen = [im.size for im in normals.images]

    def _encode(self, batch):
        return None

    def _score(self, encoded, batch):
        return [MethodOutput(self.level, np.full((2, 2), self.level, np.float32)) for _ in batch.images]


@pytest.fixture
def constant_method(monkeypatch):
    detector.list_methods()  # register the built-in methods before the registry is swapped
    monkeypatch.setattr(registry, "_METHODS", dict(registry._METHODS))
    registry.register_method("Constant-Test")(_ConstantDetector)
    return "constant-test"


def test_create_detector_is_case_insensitive_and_passes_options(constant_method):
    det = detector.create_detector("CONSTANT-test", level=0.75, class_name="metal_nut", seed=3)
    assert isinstance(det, _ConstantDetector)
    assert det.level == 0.75 and det.class_name == "metal_nut" and det.seed == 3
    assert "constant-test" in detector.list_methods()


def test_unknown_method_lists_known_ones(constant_method):
    with pytest.raises(ValueError, match="constant-test"):
        detector.create_detector("no-such-method")


def test_unknown_option_raises_type_error_listing_valid_ones(constant_method):
    with pytest.raises(TypeError) as info:
        detector.create_detector("constant-test", levle=1.0)
    message = str(info.value)
    assert "levle" in message and "level" in message and "class_name" in message and "sigma" in message


def test_duplicate_registration_is_refused(constant_method):
    class Other(_ConstantDetector):
        pass

    with pytest.raises(ValueError, match="already registered"):
        registry.register_method("constant-test")(Other)


def test_fit_predict_contract(constant_method):
    det = detector.create_detector("constant-test")
    with pytest.raises(RuntimeError, match="fit"):
        det.predict(np.zeros((32, 48, 3), np.uint8))
    with pytest.raises(ValueError, match="at least 1"):
        det.fit([])
    too_many = [np.zeros((16, 16, 3), np.uint8)] * (limits.MAX_NORMAL_IMAGES + 1)
    with pytest.raises(ValueError, match=str(limits.MAX_NORMAL_IMAGES)):
        det.fit(too_many)
    calls = []
    det.fit([np.zeros((20, 30, 3), np.uint8)], progress=lambda f, m: calls.append((f, m)))
    assert det.seen == [(20, 30)] and det.num_normals == 1 and calls[-1] == (1.0, "done")
    result = det.predict(np.zeros((32, 48, 3), np.uint8))
    assert result.anomaly_map.shape == (32, 48)
    batch = det.predict_batch([np.zeros((32, 48, 3), np.uint8), np.zeros((16, 16, 3), np.uint8)])
    assert [r.anomaly_map.shape for r in batch] == [(32, 48), (16, 16)]


def test_check_normal_count_for_zero_shot_allows_none():
    check_normal_count(0, "FAPrompt", required=False)
    with pytest.raises(ValueError):
        check_normal_count(limits.MAX_NORMAL_IMAGES + 1, "FAPrompt", required=False)


def test_sigma_must_be_non_negative(constant_method):
    with pytest.raises(ValueError, match="sigma"):
        detector.create_detector("constant-test", sigma=-1.0)


def test_detection_result_is_frozen():
    result = DetectionResult("x", 0.1, np.zeros((2, 2), np.float32), np.zeros((1, 1), np.float32), {}, {})
    with pytest.raises(AttributeError):
        result.score = 0.2  # type: ignore[misc]


def test_builtin_methods_are_registered_in_the_documented_order():
    assert detector.list_methods()[:3] == ["inctrl", "anople", "faprompt"]
    for name in ("InCTRL", "AnoPLe", "FAPrompt"):
        assert detector.get_method(name).display_name == name
