"""Benchmarks: ``python -m benchmarks.run [--methods ...] [--quick] [--queries N] [--no-openvino] [--out FILE]``.

For each method at its official default architecture built at random init (no download):
construction time, ``fit`` time for k = 1, 2, 4, 8 normal images, ``predict`` latency
(median and p90 over ``--queries`` queries after one warm-up), the plain image-encoder
forward (open_clip ``encode_image``) on the same inputs in the same run, their ratio, the
official per-query computation pattern (``benchmarks/reference.py``) and the speed-up over
it, peak resident memory and the thread count, all with ``runtime="torch"``. Then the same
method with ``runtime="openvino"`` in a process of its own (``bench_openvino``): conversion
time into an empty cache, the load time of the saved model, predict median, its ratio to
the PyTorch encoder forward of the torch row, peak RSS and the largest score / raw-map
difference from the torch row on the same queries; a second table puts the two runtimes
side by side. Every measurement runs in its own process so its peak memory is its own; a
last row loads all default models at once. ``--quick`` uses the tiny random backbone
(seconds; used by the tests). Prints Markdown tables and writes JSON.

The OpenVINO rows are in ``runtimes.py``, AnoPLe's fit tables in ``anople_fit.py``, the
timers, images and benchmarked configurations shared with ``first_answer`` in ``measure.py``.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

from .anople_fit import EXTRA_ROWS, anople_ratio_table, anople_table
from .measure import create, format_value, in_subprocess, method_options, peak_rss_mib, percentile, synthetic_images, timed, write_and_print
from .runtimes import bench_openvino, compare_runtimes, runtimes_table

SHOT_COUNTS = (1, 2, 4, 8)
#: Queries timed with the opt-in ``precision="bf16"`` of the methods that offer it.
BF16_QUERIES = 2

COLUMNS = (
    ("method", "method"),
    ("backbone", "backbone"),
    ("image_size", "px"),
    ("construct_s", "build (s)"),
    ("fit_s", "fit k=1/2/4/8 (s)"),
    ("predict_median_s", "predict median (s)"),
    ("predict_p90_s", "predict p90 (s)"),
    ("encoder_median_s", "encoder (s)"),
    ("predict_to_encoder", "predict / encoder"),
    ("official_median_s", "official pattern (s)"),
    ("speedup_vs_official", "speed-up"),
    ("peak_rss_mib", "peak RSS (MiB)"),
    ("threads", "threads"),
)


def bench_method(method: str, quick: bool, queries: int, threads: int) -> dict[str, Any]:
    """Measure one method in the current process; see the module docstring."""
    import torch

    from detector.backbone import clear_backbone_cache
    from detector.images import load_image
    from detector.preprocess import preprocess

    from .reference import OFFICIAL_PATTERNS

    torch.set_num_threads(threads)
    clear_backbone_cache()
    with tempfile.TemporaryDirectory() as directory:
        options = method_options(method, quick, Path(directory))
        start = time.perf_counter()
        det = create(method, quick, **options)
        construct_s = time.perf_counter() - start

    normals = synthetic_images(8, seed=1, defect=False)
    fit_s = {k: timed(lambda k=k: det.fit(normals[:k])) for k in SHOT_COUNTS}
    det.fit(normals[:4])
    query_images = synthetic_images(queries + 1, seed=1, defect=True)
    det.predict(query_images[0])  # warm-up
    predict_times = [timed(lambda q=q: det.predict(q)) for q in query_images[1:]]

    encoder = det.backbone.model
    inputs = [preprocess(load_image(q), det.preprocess_spec)[0].unsqueeze(0) for q in query_images]
    with torch.inference_mode():
        encoder.encode_image(inputs[0])
        encoder_times = [timed(lambda x=x: encoder.encode_image(x)) for x in inputs[1:]]

    row: dict[str, Any] = {
        "method": method,
        "backbone": det.describe()["backbone"],
        "image_size": det.describe()["image_size"],
        "construct_s": construct_s,
        "fit_s": fit_s,
        "predict_median_s": statistics.median(predict_times),
        "predict_p90_s": percentile(predict_times, 0.9),
        "predict_all_s": predict_times,
        "encoder_median_s": statistics.median(encoder_times),
        "encoder_all_s": encoder_times,
        "threads": torch.get_num_threads(),
        "mode": det.describe().get("mode"),
        "runtime": det.describe()["runtime"],
        "scores": [det.predict(q).score for q in query_images[1:]],
        "raw_maps": [det.predict(q).raw_map.tolist() for q in query_images[1:]],
    }
    row["predict_to_encoder"] = row["predict_median_s"] / row["encoder_median_s"]

    official = OFFICIAL_PATTERNS.get(method)
    if official is not None:
        reference_queries = query_images[1 : 1 + max(2, min(queries, 3))]
        official(det, normals[:2], reference_queries[0])  # warm-up
        det.fit(normals[:2])
        ours = [timed(lambda q=q: det.predict(q)) for q in reference_queries]
        theirs, official_scores = [], []
        for query in reference_queries:
            start = time.perf_counter()
            official_scores.append(official(det, normals[:2], query))
            theirs.append(time.perf_counter() - start)
        row["official_max_score_diff"] = max(
            abs(score - det.predict(query).score) for score, query in zip(official_scores, reference_queries)
        )
        row["official_median_s"] = statistics.median(theirs)
        row["official_ours_median_s"] = statistics.median(ours)
        row["speedup_vs_official"] = row["official_median_s"] / row["official_ours_median_s"]
        row["official_shots"] = 2
    extra_rows = EXTRA_ROWS.get(method)
    if extra_rows is not None:
        row.update(extra_rows(quick, normals, inputs[0]))
    row["peak_rss_mib"] = peak_rss_mib()
    if offers_bf16(method):
        row["bf16"] = _reduced_precision(method, quick, det, query_images[1 : 1 + BF16_QUERIES])
    return row


def offers_bf16(method: str) -> bool:
    """Whether the method has the opt-in ``precision="bf16"`` (its spec's option choices)."""
    from detector.registry import get_spec

    option = get_spec(method).options.get("precision")
    return option is not None and "bf16" in (option.choices or ())


def _reduced_precision(method: str, quick: bool, fp32_detector: Any, queries: list) -> dict[str, Any]:
    """The opt-in ``precision="bf16"`` detector on the same prompt state: its predict time
    (no warm-up, first queries only) and its deviation from the fp32 results."""
    with tempfile.TemporaryDirectory() as directory:  # the same seeded prompt state as fp32
        det = create(method, quick, precision="bf16", **method_options(method, quick, Path(directory)))
    times, score_diffs, map_diffs = [], [], []
    for query in queries:
        start = time.perf_counter()
        result = det.predict(query)
        times.append(time.perf_counter() - start)
        reference = fp32_detector.predict(query)
        score_diffs.append(abs(result.score - reference.score))
        map_diffs.append(float(abs(result.raw_map - reference.raw_map).max()))
    return {
        "predict_median_s": statistics.median(times),
        "predict_all_s": times,
        "max_score_diff": max(score_diffs),
        "max_raw_map_diff": max(map_diffs),
    }


def bench_all_loaded(methods: Sequence[str], quick: bool, threads: int) -> dict[str, Any]:
    """Peak memory with every method's default model built, fitted on 4 normals and run once."""
    import torch

    torch.set_num_threads(threads)
    normals = synthetic_images(4, seed=2, defect=False)
    query = synthetic_images(1, seed=2, defect=True)[0]
    detectors = []
    with tempfile.TemporaryDirectory() as directory:
        for method in methods:
            det = create(method, quick, **method_options(method, quick, Path(directory)))
            det.fit(normals)
            det.predict(query)
            detectors.append(det)
    return {"methods": list(methods), "peak_rss_mib": peak_rss_mib(), "threads": torch.get_num_threads()}


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    header = "| " + " | ".join(title for _, title in COLUMNS) + " |"
    rule = "|" + "|".join("---" for _ in COLUMNS) + "|"
    lines = [header, rule]
    for row in rows:
        lines.append("| " + " | ".join(format_value(row.get(key)) for key, _ in COLUMNS) + " |")
    return "\n".join(lines)


def run(
    methods: Sequence[str], quick: bool, queries: int, threads: int, isolate: bool = True, openvino: bool = True
) -> dict[str, Any]:
    call = in_subprocess if isolate else (lambda fn, *a: fn(*a))
    rows = [call(bench_method, m, quick, queries, threads) for m in methods]
    openvino_rows = [call(bench_openvino, m, quick, queries, threads) for m in methods] if openvino else []
    for row, ov in zip(rows, openvino_rows):
        compare_runtimes(row, ov)
    for row in rows:
        row.pop("raw_maps", None)
    together = call(bench_all_loaded, list(methods), quick, threads)
    return {
        "machine": {
            "platform": platform.platform(),
            "python": sys.version.split()[0],
            "cpus": os.cpu_count(),
            "threads": threads,
        },
        "quick": quick,
        "queries": queries,
        "rows": rows,
        "openvino": openvino_rows,
        "all_loaded": together,
    }


def report(result: dict[str, Any]) -> str:
    parts = [markdown_table(result["rows"])]
    if result.get("openvino"):
        parts.append(runtimes_table(result["rows"], result["openvino"]))
    for row in result["rows"]:
        if "anople_fit_ratios" in row:
            parts.append(anople_ratio_table(row["anople_fit_ratios"]))
        if "anople_presets" in row:
            parts.append(anople_table(row["anople_presets"]))
    for row in result["rows"]:
        if "bf16" in row:
            bf16 = row["bf16"]
            parts.append(
                f"{row['method']} with the opt-in precision=\"bf16\": predict median {format_value(bf16['predict_median_s'])} s "
                f"over {len(bf16['predict_all_s'])} queries without warm-up (fp32: {format_value(row['predict_median_s'])} s); "
                f"deviation from fp32: score {bf16['max_score_diff']:.2g}, raw map {bf16['max_raw_map_diff']:.2g} (max abs)."
            )
    together = result["all_loaded"]
    parts.append(
        f"All of {', '.join(together['methods'])} loaded at once: peak RSS {together['peak_rss_mib']:.0f} MiB "
        f"({together['threads']} threads)."
    )
    return "\n\n".join(parts) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=None, help="registered method names (default: all)")
    parser.add_argument("--quick", action="store_true", help="tiny random backbone (seconds)")
    parser.add_argument("--queries", type=int, default=10, help="timed queries per method (default 10)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--out", default="benchmarks/results.json", help="JSON output (default benchmarks/results.json)")
    parser.add_argument("--no-isolate", action="store_true", help="run every method in this process")
    parser.add_argument("--no-openvino", action="store_true", help="measure the PyTorch runtime only")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from detector.registry import get_method, list_methods

    methods = [get_method(name).name for name in args.methods] if args.methods else list_methods()
    result = run(methods, args.quick, args.queries, args.threads, isolate=not args.no_isolate, openvino=not args.no_openvino)
    return write_and_print(result, args.out, report(result))


if __name__ == "__main__":
    raise SystemExit(main())
