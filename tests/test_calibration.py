from __future__ import annotations

import numpy as np
import pytest

from detector.calibration import Calibration, normalize
from detector.calibration import calibration_from_normals, fixed_calibration


def test_normalize_puts_threshold_at_one_half():
    values = np.array([0.1, 0.3, 0.5, 0.9], np.float32)
    out = normalize(values, 0.0, 1.0, 0.3)
    np.testing.assert_allclose(out, [0.3, 0.5, 0.7, 1.0], atol=1e-6)
    assert out.dtype == np.float32


def test_normalize_clips_and_survives_zero_range():
    out = normalize(np.array([-5.0, 5.0]), 1.0, 1.0, 1.0)
    assert out.tolist() == [0.0, 1.0]


def test_calibration_from_normals_threshold_above_every_normal():
    default = fixed_calibration(0.0, 1.0, 0.5)
    maps = [np.full((4, 4), 0.2, np.float32), np.full((4, 4), 0.35, np.float32)]
    cal = calibration_from_normals([0.3, 0.4], maps, default, "leave-one-out over 2 normals")
    assert cal.image_threshold == pytest.approx(0.4 + 0.02)
    assert cal.pixel_threshold == pytest.approx(0.35 + 0.02)
    assert cal.normalize_score(0.4) < 0.5 < cal.normalize_score(0.5)
    assert cal.normalize_map(maps[1]).max() < 0.5
    assert cal.source.startswith("leave-one-out")


def test_no_normals_gives_default():
    default = fixed_calibration(0.0, 0.5, 0.25)
    assert calibration_from_normals([], [], default, "x") is default


def test_calibration_round_trips_to_dict():
    cal = Calibration(0, 1, 0.5, 0, 1, 0.4, "default")
    assert Calibration(**cal.to_dict()) == cal
