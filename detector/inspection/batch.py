"""Batch mode: the rows of many queries against one fitted normal set, ranked and counted
(``detector.service_batch`` scores them)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np



@dataclass(frozen=True)
class BatchRow:
    """One (query image, method) result of a batch run.

    ``threshold`` is the calibrated threshold the verdict used (0.5 = the method's own),
    ``raw_threshold`` the method's own score it corresponds to.
    """

    image: str
    method: str
    score: float
    calibrated: float
    threshold: float
    verdict: str
    seconds: float
    raw_threshold: float | None = None
    thumbnail: np.ndarray | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class BatchResult:
    """``run_batch`` output: ranked rows, when kept one overlay per (image, method), and
    the images that could not be used as ``(image name, message)``."""

    rows: list[BatchRow]
    overlays: list[tuple[str, str, np.ndarray]]
    errors: list[tuple[str, str]] = field(default_factory=list)


def verdict(calibrated: float, threshold: float) -> str:
    """ "anomalous" when the calibrated score reaches the threshold, else "normal"."""
    return "anomalous" if float(calibrated) >= float(threshold) else "normal"


def rank_batch(rows: Sequence[BatchRow]) -> list[BatchRow]:
    """Rows grouped by method (in order of first appearance), each group by calibrated score
    descending; ties by raw score descending, then image name."""
    methods: list[str] = []
    for row in rows:
        if row.method not in methods:
            methods.append(row.method)
    ranked: list[BatchRow] = []
    for method in methods:
        group = [row for row in rows if row.method == method]
        ranked.extend(sorted(group, key=lambda r: (-r.calibrated, -r.score, r.image)))
    return ranked


def flagged_counts(rows: Sequence[BatchRow], threshold: float) -> dict[str, int]:
    """Per method, how many images reach the calibrated ``threshold`` (0 for none)."""
    counts: dict[str, int] = {}
    for row in rows:
        counts[row.method] = counts.get(row.method, 0) + int(row.calibrated >= float(threshold))
    return counts
