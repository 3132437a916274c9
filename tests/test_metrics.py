"""Metrics: scikit-learn equality, hand-worked AUPRO cases, pyaupro cross-check, binned mode."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.ndimage import gaussian_filter
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

from detector import metrics


def _random_scores(rng, n=60):
    labels = rng.integers(0, 2, n)
    scores = rng.normal(size=n) + labels * 0.8
    scores[:10] = np.round(scores[:10], 1)  # some ties
    return labels, scores


def test_image_metrics_equal_scikit_learn(rng):
    labels, scores = _random_scores(rng)
    out = metrics.image_metrics(labels, scores)
    assert out["image_auroc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert out["image_ap"] == pytest.approx(average_precision_score(labels, scores), abs=1e-12)
    # F1-max by brute force over every candidate threshold
    best, best_t = -1.0, None
    for t in np.unique(scores):
        predicted = scores >= t
        tp = np.sum(predicted & (labels == 1))
        precision = tp / predicted.sum()
        recall = tp / labels.sum()
        f1 = 0.0 if tp == 0 else 2 * precision * recall / (precision + recall)
        if f1 > best:
            best, best_t = f1, t
    assert out["image_f1_max"] == pytest.approx(best, abs=1e-12)
    assert out["image_f1_threshold"] == pytest.approx(best_t)


def test_f1_max_drops_sklearns_final_point_and_reports_threshold():
    labels = np.array([0, 0, 1, 1])
    scores = np.array([0.1, 0.4, 0.35, 0.8])
    f1, threshold = metrics.f1_max(labels, scores)
    precision, recall, _ = precision_recall_curve(labels, scores)
    assert len(precision) == 5  # 4 thresholds + the extra (P=1, R=0) point
    # thresholds 0.8 -> F1 2/3; 0.4 -> 0.5; 0.35 -> 0.8; 0.1 -> 2/3
    assert f1 == pytest.approx(0.8) and threshold == pytest.approx(0.35)
    perfect = metrics.image_metrics([0, 0, 1], [0.1, 0.2, 0.9])
    assert perfect["image_auroc"] == 1.0 and perfect["image_ap"] == 1.0 and perfect["image_f1_max"] == 1.0


def test_undefined_image_metrics_are_none():
    out = metrics.image_metrics([0, 0, 0], [0.1, 0.2, 0.3])
    assert out == {"image_auroc": None, "image_ap": None, "image_f1_max": None, "image_f1_threshold": None}
    assert metrics.auroc([1, 1], [0.1, 0.2]) is None
    with pytest.raises(ValueError, match="NaN"):
        metrics.auroc([0, 1], [0.1, np.nan])


def _region(shape, box):
    mask = np.zeros(shape, bool)
    (r0, r1), (c0, c1) = box
    mask[r0:r1, c0:c1] = True
    return mask


def test_aupro_one_region_fully_detected_is_one():
    mask = _region((10, 10), ((2, 5), (2, 6)))
    anomaly_map = np.where(mask, 0.9, 0.1) + np.linspace(0, 0.05, 100).reshape(10, 10)  # all region pixels above all normals
    assert metrics.aupro([anomaly_map], [mask]) == pytest.approx(1.0)
    assert metrics.pixel_metrics([mask.astype(float)], [mask])["aupro"] == pytest.approx(1.0)


def test_aupro_weighs_regions_not_pixels():
    small = _region((12, 12), ((0, 2), (0, 2)))  # 4 pixels
    large = _region((12, 12), ((6, 12), (6, 12)))  # 36 pixels
    mask = small | large
    anomaly_map = np.where(small, 1.0, 0.0)  # only the small region is detected
    fpr, pro = metrics.pro_curve([anomaly_map], [mask])
    # points: start (0, 0); t = 1: (0, 0.5) — region-wise (pixel-wise it would be 0.1); t = 0: (1, 1)
    np.testing.assert_allclose(fpr, [0.0, 0.0, 1.0])
    np.testing.assert_allclose(pro, [0.0, 0.5, 1.0])
    # area to 0.3: PRO(0.3) = 0.5 + 0.5 * 0.3 = 0.65 -> 0.3 * (0.5 + 0.65) / 2 / 0.3 = 0.575
    assert metrics.aupro([anomaly_map], [mask]) == pytest.approx(0.575)


def test_aupro_uses_8_connectivity():
    mask = np.zeros((6, 6), bool)
    mask[1, 1] = mask[2, 2] = True  # diagonal neighbours: one region under 8-connectivity
    mask[4, 4] = True
    anomaly_map = np.zeros((6, 6))
    anomaly_map[1, 1] = 1.0  # half of the diagonal region, nothing of the single pixel
    fpr, pro = metrics.pro_curve([anomaly_map], [mask])
    assert pro[1] == pytest.approx(0.25)  # (0.5 + 0) / 2 regions; with 4-connectivity it would be 1/3


def test_aupro_constant_map():
    mask = _region((8, 8), ((0, 3), (0, 3)))
    # one threshold: the curve is (0, 0) -> (1, 1); area to 0.3 = 0.3 * 0.3 / 2, / 0.3 = 0.15
    assert metrics.aupro([np.full((8, 8), 0.5)], [mask]) == pytest.approx(0.15)


def test_aupro_includes_defect_free_images_in_the_fpr():
    mask = _region((8, 8), ((0, 3), (0, 3)))
    anomaly_map = np.where(mask, 0.8, 0.0)
    clean = np.zeros((8, 8), bool)
    hot_normal = np.full((8, 8), 0.9)  # a defect-free image whose map is above the defect
    fpr, pro = metrics.pro_curve([anomaly_map, hot_normal], [mask, clean])
    normals = 64 - 9 + 64
    np.testing.assert_allclose(fpr, [0.0, 64 / normals, 64 / normals, 1.0])
    np.testing.assert_allclose(pro, [0.0, 0.0, 1.0, 1.0])
    assert metrics.aupro([anomaly_map], [mask]) == pytest.approx(1.0)
    assert metrics.aupro([anomaly_map, hot_normal], [mask, clean]) < 1.0


def test_aupro_without_anomalies_is_none():
    assert metrics.aupro([np.random.default_rng(0).random((5, 5))], [np.zeros((5, 5), bool)]) is None
    out = metrics.pixel_metrics([np.zeros((4, 4))], [np.zeros((4, 4), bool)])
    assert out["aupro"] is None and out["pixel_auroc"] is None and out["pixel_ap"] is None


def test_perfect_maps_score_one(rng):
    masks = [_region((16, 16), ((2, 6), (3, 9))), np.zeros((16, 16), bool), _region((16, 16), ((10, 15), (0, 4)))]
    maps = [np.where(g, 0.7 + 0.3 * rng.random(g.shape), 0.5 * rng.random(g.shape)) for g in masks]
    out = metrics.pixel_metrics(maps, masks)
    for key in ("pixel_auroc", "pixel_ap", "pixel_f1_max", "aupro"):
        assert out[key] == pytest.approx(1.0), key


def test_pixel_metrics_pool_pixels_like_scikit_learn(rng):
    masks = [rng.random((12, 12)) > 0.8 for _ in range(3)] + [np.zeros((12, 12), bool)]
    maps = [gaussian_filter(g.astype(float), 1) + 0.3 * rng.random(g.shape) for g in masks]
    out = metrics.pixel_metrics(maps, masks)
    labels = np.concatenate([g.ravel() for g in masks])
    scores = np.concatenate([m.ravel() for m in maps]).astype(np.float32)
    assert out["pixel_auroc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert out["pixel_ap"] == pytest.approx(average_precision_score(labels, scores), abs=1e-12)


def _reference_curve(maps, masks):
    import torch
    from pyaupro import PerRegionOverlap

    metric = PerRegionOverlap(thresholds=None, reference_implementation=True)
    metric.update(torch.from_numpy(np.stack(maps).astype(np.float32)), torch.from_numpy(np.stack(masks).astype(np.int64)))
    fpr, pro = metric.compute()
    return fpr.double(), pro.double()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_aupro_matches_pyaupro_reference(seed):
    from pyaupro import auc_compute, generate_random_data

    maps, masks = generate_random_data(batch_size=6, height=32, width=32, num_objects=3, return_numpy=True, seed=seed)
    maps = [m for m in maps]
    masks = [g.astype(bool) for g in masks]
    masks[-1][:] = False  # a defect-free image
    ours_fpr, ours_pro = metrics.pro_curve(maps, masks)
    ref_fpr, ref_pro = _reference_curve(maps, masks)
    # the MVTec reference curve = ours plus its appended (1, 1) end point (ours ends there already)
    np.testing.assert_allclose(ours_fpr, ref_fpr.numpy()[:-1], atol=1e-6)
    np.testing.assert_allclose(ours_pro, ref_pro.numpy()[:-1], atol=1e-9)
    ours = metrics.aupro(maps, masks)
    # the curve is already ascending in FPR; pyaupro's reorder=True would re-sort tied FPR
    # values with an unstable sort and change the trapezoids next to vertical steps
    theirs = float(auc_compute(ref_fpr, ref_pro, limit=0.3))
    # pyaupro's documented difference: it cuts the curve at the last point below 0.3 and
    # extends it flat to 0.3 instead of interpolating; bound that gap's trapezoid
    x = ref_fpr.numpy()
    y = ref_pro.numpy()
    before, after = np.max(np.nonzero(x < 0.3)), np.min(np.nonzero(x >= 0.3))
    gap = (0.3 - x[before]) * (y[after] - y[before]) / 0.3
    assert abs(ours - theirs) <= gap / 2 + 1e-6
    assert ours >= theirs - 1e-6  # interpolating a rising curve never gives less than extending it flat


def test_binned_full_resolution_matches_exact_on_bin_centred_values(rng):
    bins = 50
    masks = [rng.random((10, 14)) > 0.85 for _ in range(3)] + [np.zeros((10, 14), bool)]
    maps = [(np.minimum(rng.integers(0, bins, g.shape) + 20 * g, bins - 1) + 0.5) / bins for g in masks]
    exact = metrics.pixel_metrics(maps, masks)
    binned = metrics.binned_pixel_metrics(maps, masks, 0.0, 1.0, bins=bins)
    for key in ("pixel_auroc", "pixel_ap", "pixel_f1_max", "aupro"):
        assert binned[key] == pytest.approx(exact[key], abs=1e-9), key
    assert binned["pixel_f1_threshold"] == pytest.approx(exact["pixel_f1_threshold"] - 0.5 / bins)


def test_pixel_metrics_accumulator_modes(rng):
    masks = [np.zeros((40, 30), bool) for _ in range(4)]
    masks[0][5:15, 5:12] = True
    masks[1][20:35, 10:25] = True
    maps = [gaussian_filter(g.astype(np.float32), 2) + 0.2 * rng.random(g.shape).astype(np.float32) for g in masks]
    with metrics.PixelMetrics(size=(40, 30)) as same_size:
        for m, g in zip(maps, masks):
            same_size.add(m, g)
        exact = same_size.compute()
    assert exact == metrics.pixel_metrics(maps, masks)
    full = metrics.PixelMetrics(size=None, bins=20_000)
    for m, g in zip(maps, masks):
        full.add(m, g)
    folder = full._folder
    assert folder is not None and len(list(folder.glob("*.npy"))) == 8
    streamed = full.compute()
    full.close()
    assert not folder.exists()
    for key in ("pixel_auroc", "pixel_ap", "pixel_f1_max", "aupro"):
        assert streamed[key] == pytest.approx(exact[key], abs=2e-3), key
    small = metrics.PixelMetrics(size=(16, 16))
    small.add(maps[0], masks[0])
    assert small._maps[0].shape == (16, 16) and small._masks[0].dtype == bool
    with pytest.raises(ValueError, match="2-D"):
        small.add(np.zeros((2, 2, 2)), np.zeros((2, 2)))
