"""Image- and pixel-level anomaly detection metrics (docs/evaluation.md §3 and §6).

Image level (one score per image, label 1 = anomalous):
    * AUROC — ``sklearn.metrics.roc_auc_score``.
    * AP — ``sklearn.metrics.average_precision_score`` (step-wise, no interpolation).
    * F1-max and its threshold — from ``sklearn.metrics.precision_recall_curve``, F1 = 2PR/(P+R)
      (0 where P+R = 0), maximised over the thresholds; sklearn's final (P=1, R=0) point,
      which has no threshold, is dropped.

Pixel level (all pixels of all test images of a category pooled; normal images add
negatives only): AUROC, AP and F1-max as above, and AUPRO:

    AUPRO (Bergmann et al., IJCV 2021; the MVTec AD reference definition).
    Ground-truth regions are the 8-connected components of every mask (``scipy.ndimage.label``
    with a 3x3 structure), counted over the whole category. For a threshold t, a region's
    overlap is the fraction of its pixels with ``map >= t``; PRO(t) is the mean overlap over
    regions (every region weighs the same); FPR(t) is the fraction of normal pixels (mask 0,
    all images) with ``map >= t``. The curve sweeps every distinct map value from high to low,
    starting at (0, 0); it is cut at FPR = 0.3 with PRO linearly interpolated there,
    integrated with the trapezoid rule and divided by 0.3. No anomalous pixel → undefined
    (``None``).

Resolution: ``PixelMetrics(size=256)`` (the default of the evaluation command) resizes maps
(bilinear) and masks (nearest neighbour) to 256x256 and computes every pixel metric exactly on
the pooled pixels. ``PixelMetrics(size=None)`` keeps the original resolution: each map is
written to a temporary ``.npy`` file as it arrives (memory holds one image at a time), and
``compute`` streams them once more into histograms over ``bins`` (default 10,000) equal-width
bins between the smallest and largest map value. Every curve point is then exact at the bin
edges (a pixel is counted at threshold t = a bin's lower edge iff it lies in that bin or a
higher one), so the binned metrics differ from the exact ones only by how finely the
thresholds are spaced.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from scipy import ndimage
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

#: Integration limit of AUPRO.
FPR_LIMIT = 0.3
#: Default side length of the pixel-metric resolution (docs/evaluation.md §6.3).
DEFAULT_PIXEL_SIZE = 256
#: Number of equal-width score bins of the streamed full-resolution mode.
DEFAULT_BINS = 10_000
#: 8-connectivity, as in the MVTec AD reference code.
CONNECTIVITY = np.ones((3, 3), dtype=int)


def _as_labels_scores(labels: Sequence[int] | np.ndarray, scores: Sequence[float] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(labels).astype(bool).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    if y.shape != s.shape:
        raise ValueError(f"labels and scores differ in length: {y.size} vs {s.size}")
    if not np.all(np.isfinite(s)):
        raise ValueError("scores contain NaN or infinite values")
    return y, s


def _both_classes(y: np.ndarray) -> bool:
    return bool(y.any() and not y.all())


def auroc(labels: Sequence[int] | np.ndarray, scores: Sequence[float] | np.ndarray) -> float | None:
    """Area under the ROC curve; ``None`` when only one class is present."""
    y, s = _as_labels_scores(labels, scores)
    return float(roc_auc_score(y, s)) if _both_classes(y) else None


def average_precision(labels: Sequence[int] | np.ndarray, scores: Sequence[float] | np.ndarray) -> float | None:
    """Average precision (area under the step-wise PR curve); ``None`` without positives."""
    y, s = _as_labels_scores(labels, scores)
    return float(average_precision_score(y, s)) if y.any() else None


def f1_max(labels: Sequence[int] | np.ndarray, scores: Sequence[float] | np.ndarray) -> tuple[float | None, float | None]:
    """``(best F1, its threshold)``: anomalous iff ``score >= threshold``; ``(None, None)``
    without positives."""
    y, s = _as_labels_scores(labels, scores)
    if not y.any():
        return None, None
    precision, recall, thresholds = precision_recall_curve(y, s)
    precision, recall = precision[:-1], recall[:-1]  # the appended (P=1, R=0) point has no threshold
    f1 = _f1(precision, recall)
    best = int(np.argmax(f1))
    return float(f1[best]), float(thresholds[best])


def _f1(precision: np.ndarray, recall: np.ndarray) -> np.ndarray:
    denominator = precision + recall
    return np.divide(2 * precision * recall, denominator, out=np.zeros_like(denominator, dtype=np.float64), where=denominator > 0)


def image_metrics(labels: Sequence[int] | np.ndarray, scores: Sequence[float] | np.ndarray) -> dict[str, float | None]:
    """``image_auroc``, ``image_ap``, ``image_f1_max`` and ``image_f1_threshold``."""
    best, threshold = f1_max(labels, scores)
    return {
        "image_auroc": auroc(labels, scores),
        "image_ap": average_precision(labels, scores),
        "image_f1_max": best,
        "image_f1_threshold": threshold,
    }


# -- AUPRO -----------------------------------------------------------------------------------------
def _region_weights(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """Per-pixel ``1 / size_of_its_region`` (0 on normal pixels) and the number of regions."""
    labelled, count = ndimage.label(np.asarray(mask, dtype=bool), structure=CONNECTIVITY)
    if count == 0:
        return np.zeros(mask.shape, dtype=np.float64), 0
    sizes = np.bincount(labelled.ravel())
    inverse = np.zeros(sizes.shape, dtype=np.float64)
    inverse[1:] = 1.0 / sizes[1:]
    return inverse[labelled], count


def _check_pairs(maps: Sequence[np.ndarray], masks: Sequence[np.ndarray]) -> None:
    if len(maps) != len(masks):
        raise ValueError(f"{len(maps)} maps but {len(masks)} masks")
    for index, (m, g) in enumerate(zip(maps, masks)):
        if np.shape(m) != np.shape(g) or np.ndim(m) != 2:
            raise ValueError(f"map {index} has shape {np.shape(m)} but its mask {np.shape(g)}; both must be (H, W) and equal")


def pro_curve(maps: Sequence[np.ndarray], masks: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray] | None:
    """Exact (FPR, PRO) curve over every distinct map value, high to low, starting at (0, 0).

    ``maps``: float ``(H, W)`` arrays; ``masks``: boolean ``(H, W)`` arrays of the same
    shapes. Returns ``None`` when no mask has an anomalous pixel.
    """
    _check_pairs(maps, masks)
    scores, pro_steps, normal_steps = [], [], []
    regions = 0
    for anomaly_map, mask in zip(maps, masks):
        weights, count = _region_weights(mask)
        regions += count
        scores.append(np.asarray(anomaly_map, dtype=np.float64).ravel())
        pro_steps.append(weights.ravel())
        normal_steps.append(~np.asarray(mask, dtype=bool).ravel())
    if regions == 0:
        return None
    score = np.concatenate(scores)
    order = np.argsort(-score, kind="stable")
    score = score[order]
    pro = np.cumsum(np.concatenate(pro_steps)[order]) / regions
    normal = np.concatenate(normal_steps)[order]
    num_normal = int(normal.sum())
    fpr = np.cumsum(normal, dtype=np.float64) / max(num_normal, 1)
    last_of_tie = np.append(score[1:] != score[:-1], True)  # one point per distinct threshold
    fpr = np.concatenate(([0.0], np.minimum(fpr[last_of_tie], 1.0)))
    pro = np.concatenate(([0.0], np.minimum(pro[last_of_tie], 1.0)))
    return fpr, pro


def area_to_limit(fpr: np.ndarray, pro: np.ndarray, limit: float = FPR_LIMIT) -> float:
    """Trapezoid area under a non-decreasing-FPR curve from 0 to ``limit``, with PRO
    interpolated linearly at ``limit``, divided by ``limit``."""
    fpr = np.asarray(fpr, dtype=np.float64)
    pro = np.asarray(pro, dtype=np.float64)
    if not 0 < limit <= 1:
        raise ValueError(f"the FPR limit must be in (0, 1], got {limit}")
    keep = fpr <= limit
    x, y = fpr[keep], pro[keep]
    if x[-1] < limit:
        after = int(np.argmax(fpr > limit))  # first point beyond the limit
        x0, y0, x1, y1 = fpr[after - 1], pro[after - 1], fpr[after], pro[after]
        y_limit = y0 + (y1 - y0) * (limit - x0) / (x1 - x0)
        x, y = np.append(x, limit), np.append(y, y_limit)
    return float(np.trapezoid(y, x) / limit)


def aupro(maps: Sequence[np.ndarray], masks: Sequence[np.ndarray], limit: float = FPR_LIMIT) -> float | None:
    """Exact AUPRO up to FPR ``limit`` (normalised by ``limit``); ``None`` without anomalous pixels."""
    curve = pro_curve(maps, masks)
    return None if curve is None else area_to_limit(*curve, limit=limit)


# -- pooled pixel metrics --------------------------------------------------------------------------
def pixel_metrics(maps: Sequence[np.ndarray], masks: Sequence[np.ndarray], limit: float = FPR_LIMIT) -> dict[str, float | None]:
    """Exact pooled-pixel ``pixel_auroc``, ``pixel_ap``, ``pixel_f1_max``,
    ``pixel_f1_threshold`` and ``aupro`` (maps and masks already at the same size)."""
    _check_pairs(maps, masks)
    if not maps:
        return _empty_pixel_metrics()
    scores = np.concatenate([np.asarray(m, dtype=np.float32).ravel() for m in maps])
    labels = np.concatenate([np.asarray(g, dtype=bool).ravel() for g in masks])
    best, threshold = f1_max(labels, scores)
    return {
        "pixel_auroc": auroc(labels, scores),
        "pixel_ap": average_precision(labels, scores),
        "pixel_f1_max": best,
        "pixel_f1_threshold": threshold,
        "aupro": aupro(maps, masks, limit),
    }


def _empty_pixel_metrics() -> dict[str, float | None]:
    return dict.fromkeys(("pixel_auroc", "pixel_ap", "pixel_f1_max", "pixel_f1_threshold", "aupro"))


def binned_pixel_metrics(
    maps: Iterable[np.ndarray], masks: Iterable[np.ndarray], low: float, high: float, bins: int = DEFAULT_BINS, limit: float = FPR_LIMIT
) -> dict[str, float | None]:
    """Pooled pixel metrics from histograms over ``bins`` equal-width bins in [low, high].

    One pass over (map, mask) pairs with memory independent of their number; every curve
    point is exact at a bin's lower edge (see the module docstring).
    """
    span = float(high) - float(low)
    bins = int(bins) if span > 0 else 1
    normal_hist = np.zeros(bins, dtype=np.float64)
    anomalous_hist = np.zeros(bins, dtype=np.float64)
    pro_hist = np.zeros(bins, dtype=np.float64)
    regions = 0
    for anomaly_map, mask in zip(maps, masks):
        _check_pairs([anomaly_map], [mask])
        values = np.asarray(anomaly_map, dtype=np.float64).ravel()
        index = np.zeros(values.shape, dtype=np.int64) if span <= 0 else np.clip(((values - low) / span * bins).astype(np.int64), 0, bins - 1)
        positive = np.asarray(mask, dtype=bool).ravel()
        weights, count = _region_weights(mask)
        regions += count
        normal_hist += np.bincount(index[~positive], minlength=bins)
        anomalous_hist += np.bincount(index[positive], minlength=bins)
        pro_hist += np.bincount(index, weights=weights.ravel(), minlength=bins)
    result = _empty_pixel_metrics()
    lower_edges = low + np.arange(bins) * (span / bins if span > 0 else 0.0)
    # cumulative counts for thresholds from the highest bin down: "value >= lower edge of bin b"
    fp = np.cumsum(normal_hist[::-1])
    tp = np.cumsum(anomalous_hist[::-1])
    thresholds = lower_edges[::-1]
    num_pos, num_neg = tp[-1], fp[-1]
    if num_pos == 0:
        return result
    recall = tp / num_pos
    predicted = tp + fp
    precision = np.divide(tp, predicted, out=np.ones_like(tp), where=predicted > 0)
    if num_neg > 0:
        fpr = np.concatenate(([0.0], fp / num_neg))
        tpr = np.concatenate(([0.0], recall))
        result["pixel_auroc"] = float(np.trapezoid(tpr, fpr))
    result["pixel_ap"] = float(np.sum(np.diff(np.concatenate(([0.0], recall))) * precision))
    f1 = _f1(precision, recall)
    best = int(np.argmax(f1))
    result["pixel_f1_max"], result["pixel_f1_threshold"] = float(f1[best]), float(thresholds[best])
    if regions > 0 and num_neg > 0:
        pro = np.minimum(np.cumsum(pro_hist[::-1]) / regions, 1.0)
        result["aupro"] = area_to_limit(np.concatenate(([0.0], fp / num_neg)), np.concatenate(([0.0], pro)), limit)
    return result


def resize_map(anomaly_map: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of a float map to ``size = (height, width)``."""
    import cv2

    height, width = size
    values = np.asarray(anomaly_map, dtype=np.float32)
    if values.shape == (height, width):
        return values
    return cv2.resize(values, (int(width), int(height)), interpolation=cv2.INTER_LINEAR)


def resize_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of a boolean mask to ``size = (height, width)``."""
    import cv2

    height, width = size
    values = np.asarray(mask, dtype=bool)
    if values.shape == (height, width):
        return values
    return cv2.resize(values.astype(np.uint8), (int(width), int(height)), interpolation=cv2.INTER_NEAREST).astype(bool)


@dataclass
class PixelMetrics:
    """Accumulates (anomaly map, mask) pairs of one category and computes pooled pixel metrics.

    ``size=(256, 256)`` (default): maps resized bilinearly and masks with nearest neighbour,
    kept in memory as float32 / bool, metrics exact. ``size=None``: original resolution; maps
    go to a temporary folder one by one and ``compute`` streams them into histograms with
    ``bins`` thresholds (``binned_pixel_metrics``). Maps are resized to their mask's size
    first when the two differ.
    """

    size: tuple[int, int] | None = (DEFAULT_PIXEL_SIZE, DEFAULT_PIXEL_SIZE)
    bins: int = DEFAULT_BINS
    limit: float = FPR_LIMIT

    def __post_init__(self) -> None:
        self._maps: list[np.ndarray] = []
        self._masks: list[np.ndarray] = []
        self._files: list[tuple[Path, Path]] = []
        self._folder: Path | None = None
        self._low = np.inf
        self._high = -np.inf

    def __len__(self) -> int:
        return len(self._maps) + len(self._files)

    def add(self, anomaly_map: np.ndarray, mask: np.ndarray) -> None:
        """Add one image's float ``(H, W)`` map and boolean ``(H', W')`` mask."""
        mask = np.asarray(mask, dtype=bool)
        if mask.ndim != 2 or np.ndim(anomaly_map) != 2:
            raise ValueError(f"map and mask must be 2-D, got {np.shape(anomaly_map)} and {mask.shape}")
        if not np.all(np.isfinite(anomaly_map)):
            raise ValueError("the anomaly map contains NaN or infinite values")
        if self.size is not None:
            self._maps.append(resize_map(anomaly_map, self.size))
            self._masks.append(resize_mask(mask, self.size))
            return
        values = resize_map(anomaly_map, mask.shape)
        self._low = min(self._low, float(values.min()))
        self._high = max(self._high, float(values.max()))
        if self._folder is None:
            self._folder = Path(tempfile.mkdtemp(prefix="pixel-metrics-"))
        index = len(self._files)
        map_file, mask_file = self._folder / f"{index:06d}_map.npy", self._folder / f"{index:06d}_mask.npy"
        np.save(map_file, values)
        np.save(mask_file, mask)
        self._files.append((map_file, mask_file))

    def compute(self) -> dict[str, float | None]:
        """Pooled pixel metrics of everything added so far."""
        if self.size is not None:
            return pixel_metrics(self._maps, self._masks, self.limit)
        if not self._files:
            return _empty_pixel_metrics()
        maps = (np.load(m) for m, _ in self._files)
        masks = (np.load(g) for _, g in self._files)
        return binned_pixel_metrics(maps, masks, self._low, self._high, self.bins, self.limit)

    def close(self) -> None:
        """Delete the temporary files of the full-resolution mode."""
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)
            self._folder = None
        self._files.clear()
        self._maps.clear()
        self._masks.clear()

    def __enter__(self) -> "PixelMetrics":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def describe(self) -> str:
        """How the pixel metrics are computed, for the results file."""
        if self.size is not None:
            return f"exact, pooled pixels at {self.size[1]}x{self.size[0]} (maps bilinear, masks nearest neighbour)"
        return f"original resolution, streamed per image, {self.bins} equal-width score bins"
