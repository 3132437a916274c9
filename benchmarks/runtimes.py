"""The OpenVINO side of ``benchmarks.run``: each method with ``runtime="openvino"`` in a
process of its own, compared with its PyTorch row (issue "OpenVINO runtime")."""

from __future__ import annotations

import os
import statistics
import tempfile
from pathlib import Path
from typing import Any, Sequence

from .measure import create, format_value, method_options, peak_rss_mib, percentile, synthetic_images, timed


def bench_openvino(method: str, quick: bool, queries: int, threads: int) -> dict[str, Any]:
    """``runtime="openvino"`` in the current process: conversion into an empty cache
    directory, a reload from it, fit k = 4, predict on the torch row's queries."""
    import torch

    from detector import runtime
    from detector.backbone import clear_backbone_cache

    torch.set_num_threads(threads)
    clear_backbone_cache()
    previous = os.environ.get("DETECTOR_CACHE_DIR")
    with tempfile.TemporaryDirectory() as directory:
        os.environ["DETECTOR_CACHE_DIR"] = str(Path(directory) / "cache")
        runtime.clear_runtime_cache()
        try:
            options = method_options(method, quick, Path(directory))  # its learned-state file written once
            det = create(method, quick, runtime="openvino", **options)
            first = det.prepare_runtime()
            runtime.clear_runtime_cache()  # forget the compiled model: the next detector reads the saved one
            det = create(method, quick, runtime="openvino", **options)
            again = det.prepare_runtime()
        finally:
            if previous is None:
                os.environ.pop("DETECTOR_CACHE_DIR", None)
            else:
                os.environ["DETECTOR_CACHE_DIR"] = previous
    normals = synthetic_images(8, seed=1, defect=False)
    det.fit(normals[:4])
    query_images = synthetic_images(queries + 1, seed=1, defect=True)
    det.predict(query_images[0])  # warm-up
    predict_times = [timed(lambda q=q: det.predict(q)) for q in query_images[1:]]
    results = [det.predict(q) for q in query_images[1:]]
    return {
        "method": method,
        "runtime": det.describe()["runtime"],
        "runtime_warning": det.describe().get("runtime_warning"),
        "conversion_s": first.seconds if first.source == "converted" else None,
        "cache_load_s": again.seconds if again.source == "cache" else None,
        "predict_median_s": statistics.median(predict_times),
        "predict_p90_s": percentile(predict_times, 0.9),
        "predict_all_s": predict_times,
        "scores": [r.score for r in results],
        "raw_maps": [r.raw_map.tolist() for r in results],
        "peak_rss_mib": peak_rss_mib(),
        "threads": torch.get_num_threads(),
    }


def compare_runtimes(torch_row: dict[str, Any], openvino_row: dict[str, Any]) -> None:
    """Add the ratio to the torch row's encoder forward and the largest differences from
    the torch row to ``openvino_row``; drop the per-query outputs of both rows."""
    import numpy as np

    openvino_row["predict_to_torch_encoder"] = openvino_row["predict_median_s"] / torch_row["encoder_median_s"]
    openvino_row["speedup_vs_torch_predict"] = torch_row["predict_median_s"] / openvino_row["predict_median_s"]
    openvino_row["max_score_diff"] = max(abs(a - b) for a, b in zip(torch_row["scores"], openvino_row["scores"]))
    openvino_row["max_raw_map_diff"] = max(
        float(np.abs(np.asarray(a) - np.asarray(b)).max()) for a, b in zip(torch_row["raw_maps"], openvino_row["raw_maps"])
    )
    for row in (torch_row, openvino_row):
        row.pop("raw_maps", None)


def runtimes_table(rows: Sequence[dict[str, Any]], openvino_rows: Sequence[dict[str, Any]]) -> str:
    """PyTorch and OpenVINO side by side, per method."""
    lines = [
        "| method | OpenVINO in use | predict torch (s) | predict OpenVINO (s) | torch encoder (s) | torch predict / encoder "
        "| OpenVINO predict / torch encoder | conversion (s) | cached load (s) | peak RSS torch / OpenVINO (MiB) "
        "| max score diff | max raw_map diff |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    by_method = {row["method"]: row for row in openvino_rows}
    for row in rows:
        ov = by_method.get(row["method"])
        if ov is None:
            continue
        in_use = "yes" if ov["runtime"] == "openvino" else "no (PyTorch)"
        lines.append(
            f"| {row['method']} | {in_use} | {format_value(row['predict_median_s'])} | {format_value(ov['predict_median_s'])} "
            f"| {format_value(row['encoder_median_s'])} | {format_value(row['predict_to_encoder'])} | {format_value(ov.get('predict_to_torch_encoder'))} "
            f"| {format_value(ov.get('conversion_s'))} | {format_value(ov.get('cache_load_s'))} "
            f"| {format_value(row['peak_rss_mib'])} / {format_value(ov['peak_rss_mib'])} "
            f"| {ov.get('max_score_diff', 0):.2g} | {ov.get('max_raw_map_diff', 0):.2g} |"
        )
    return "\n".join(lines)
