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
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

DEFAULT_METHODS = ("inctrl", "anople", "faprompt")
SHOT_COUNTS = (1, 2, 4, 8)
#: AnoPLe's faithful preset is timed on its first steps and extrapolated to its full schedule.
FAITHFUL_TIMED_STEPS = 20
#: Methods with an opt-in ``precision="bf16"``, measured on their first few queries.
REDUCED_PRECISION_METHODS = ("faprompt",)
BF16_QUERIES = 2
QUERY_SIZE = (256, 320)  # (H, W): non-square, like real photos

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


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    position = (len(ordered) - 1) * q
    low, high = int(position), min(int(position) + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def _images(count: int, seed: int, defect: bool) -> list:
    from detector import synthetic

    images = []
    for index in range(count):
        image = synthetic.texture("grating", seed, size=QUERY_SIZE, index=index + (100 if defect else 0))
        if defect:
            image, _ = synthetic.add_defect(image, seed=index)
        images.append(image)
    return images


def _create(method: str, quick: bool, **options: Any):
    from detector import create_detector

    backbone = "tiny-test" if quick else None
    options.setdefault("runtime", "torch")
    return create_detector(method, backbone=backbone, backbone_weights="random", **options)


def _random_prompt_learner(quick: bool, directory: Path) -> Path:
    """A FAPrompt prompt-learner file at the official random initialisation (seed 0).

    The benchmark runs FAPrompt in its learned configuration (deep prompts and the
    abnormality prior, two text passes per query), the one the official code runs; without a
    file the method would run its cheaper training-free word mode.
    """
    from detector.backbone import clear_backbone_cache, load_backbone
    from detector.checkpoints import save_safetensors
    from detector.methods import faprompt

    model_name = "tiny-test" if quick else faprompt.DEFAULT_BACKBONE
    backbone = load_backbone(
        model_name, "random", image_size=faprompt.method_image_size(model_name), quick_gelu=True
    )
    learner = faprompt.FAPromptLearner.for_backbone(backbone).initialize(backbone, seed=0)
    path = save_safetensors(
        directory / "faprompt-random-prompts.safetensors",
        learner.state_dict(),
        {"method": "faprompt", "backbone": model_name, "note": "random initialisation for benchmarking"},
    )
    clear_backbone_cache()
    return path


def _method_options(method: str, quick: bool, directory: Path) -> dict[str, Any]:
    """Options of the benchmarked configuration (AnoPLe: fast preset, quick: few steps;
    FAPrompt: learned prompts at random initialisation)."""
    if method == "anople" and quick:
        return {"steps": 3}
    if method == "faprompt":
        return {"checkpoint": str(_random_prompt_learner(quick, directory))}
    return {}


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
        options = _method_options(method, quick, Path(directory))
        start = time.perf_counter()
        det = _create(method, quick, **options)
        construct_s = time.perf_counter() - start

    normals = _images(8, seed=1, defect=False)
    fit_s = {k: _timed(lambda k=k: det.fit(normals[:k])) for k in SHOT_COUNTS}
    det.fit(normals[:4])
    query_images = _images(queries + 1, seed=1, defect=True)
    det.predict(query_images[0])  # warm-up
    predict_times = [_timed(lambda q=q: det.predict(q)) for q in query_images[1:]]

    encoder = det.backbone.model
    inputs = [preprocess(load_image(q), det.preprocess_spec)[0].unsqueeze(0) for q in query_images]
    with torch.inference_mode():
        encoder.encode_image(inputs[0])
        encoder_times = [_timed(lambda x=x: encoder.encode_image(x)) for x in inputs[1:]]

    row: dict[str, Any] = {
        "method": method,
        "backbone": det.describe()["backbone"],
        "image_size": det.describe()["image_size"],
        "construct_s": construct_s,
        "fit_s": fit_s,
        "predict_median_s": statistics.median(predict_times),
        "predict_p90_s": _percentile(predict_times, 0.9),
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
        ours = [_timed(lambda q=q: det.predict(q)) for q in reference_queries]
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
    if method == "anople":
        row["anople_fit_ratios"] = _anople_fit_ratios(quick, normals, inputs[0])
        row["anople_presets"] = _anople_presets(quick, normals)
    row["peak_rss_mib"] = _peak_rss_mib()
    if method in REDUCED_PRECISION_METHODS:
        row["bf16"] = _reduced_precision(method, quick, det, query_images[1 : 1 + BF16_QUERIES])
    return row


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
            det = _create(method, quick, runtime="openvino", **_method_options(method, quick, Path(directory)))
            first = det.prepare_runtime()
            runtime.clear_runtime_cache()  # forget the compiled model: the next detector reads the saved one
            det = _create(method, quick, runtime="openvino", **_method_options(method, quick, Path(directory)))
            again = det.prepare_runtime()
        finally:
            if previous is None:
                os.environ.pop("DETECTOR_CACHE_DIR", None)
            else:
                os.environ["DETECTOR_CACHE_DIR"] = previous
    normals = _images(8, seed=1, defect=False)
    det.fit(normals[:4])
    query_images = _images(queries + 1, seed=1, defect=True)
    det.predict(query_images[0])  # warm-up
    predict_times = [_timed(lambda q=q: det.predict(q)) for q in query_images[1:]]
    results = [det.predict(q) for q in query_images[1:]]
    return {
        "method": method,
        "runtime": det.describe()["runtime"],
        "runtime_warning": det.describe().get("runtime_warning"),
        "conversion_s": first.seconds if first.source == "converted" else None,
        "cache_load_s": again.seconds if again.source == "cache" else None,
        "predict_median_s": statistics.median(predict_times),
        "predict_p90_s": _percentile(predict_times, 0.9),
        "predict_all_s": predict_times,
        "scores": [r.score for r in results],
        "raw_maps": [r.raw_map.tolist() for r in results],
        "peak_rss_mib": _peak_rss_mib(),
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
            f"| {row['method']} | {in_use} | {_format(row['predict_median_s'])} | {_format(ov['predict_median_s'])} "
            f"| {_format(row['encoder_median_s'])} | {_format(row['predict_to_encoder'])} | {_format(ov.get('predict_to_torch_encoder'))} "
            f"| {_format(ov.get('conversion_s'))} | {_format(ov.get('cache_load_s'))} "
            f"| {_format(row['peak_rss_mib'])} / {_format(ov['peak_rss_mib'])} "
            f"| {ov.get('max_score_diff', 0):.2g} | {ov.get('max_raw_map_diff', 0):.2g} |"
        )
    return "\n".join(lines)


def _reduced_precision(method: str, quick: bool, fp32_detector: Any, queries: list) -> dict[str, Any]:
    """The opt-in ``precision="bf16"`` detector on the same prompt state: its predict time
    (no warm-up, first queries only) and its deviation from the fp32 results."""
    with tempfile.TemporaryDirectory() as directory:  # the same seeded prompt state as fp32
        det = _create(method, quick, precision="bf16", **_method_options(method, quick, Path(directory)))
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


#: AnoPLe's fit budget (issue 21): the fast preset's fit for k = 4, first fit of a fresh
#: detector included, costs at most this many image-encoder forwards of the same run.
ANOPLE_FIT_BUDGET_FORWARDS = 40.0
ANOPLE_RATIO_SHOTS = (1, 4, 8)
ENCODER_REPEATS = 5


def _anople_fit_ratios(quick: bool, normals: list, encoder_input: Any) -> dict[str, Any]:
    """For k = 1, 4, 8: the first fit of a fresh fast-preset detector, divided by the median
    of ``ENCODER_REPEATS`` plain image-encoder forwards (``encode_image``, batch 1) measured
    right before it in the same process; also the fit's encode / train / memory split."""
    import torch

    table: dict[str, Any] = {}
    for k in ANOPLE_RATIO_SHOTS:
        det = _create("anople", quick, **({"steps": 3} if quick else {}))
        encoder = det.backbone.model
        with torch.inference_mode():
            encoder.encode_image(encoder_input)  # warm-up
            encoder_times = [_timed(lambda: encoder.encode_image(encoder_input)) for _ in range(ENCODER_REPEATS)]
        fit_s = _timed(lambda: det.fit(normals[:k]))
        encoder_s = statistics.median(encoder_times)
        split = {key: det.fit_timings.get(key) for key in ("encode", "train", "memory")}
        table[f"k{k}"] = {
            "k": k,
            "fit_s": fit_s,
            "encoder_s": encoder_s,
            "encoder_all_s": encoder_times,
            "fit_to_encoder": fit_s / encoder_s,
            "split_s": split,
            "split_forwards": {key: (value / encoder_s if value is not None else None) for key, value in split.items()},
            "steps": det.config.steps,
        }
    table["budget_forwards"] = ANOPLE_FIT_BUDGET_FORWARDS
    table["k4_within_budget"] = table["k4"]["fit_to_encoder"] <= ANOPLE_FIT_BUDGET_FORWARDS
    return table


def anople_ratio_table(ratios: dict[str, Any]) -> str:
    lines = [
        "| AnoPLe fast fit (fresh detector) | fit (s) | encoder forward (s) | fit / encoder | encode / train / memory (forwards) |",
        "|---|---|---|---|---|",
    ]
    for key in (f"k{k}" for k in ANOPLE_RATIO_SHOTS):
        entry = ratios[key]
        split = " / ".join(_format(v) for v in entry["split_forwards"].values())
        lines.append(
            f"| k = {entry['k']} ({entry['steps']} steps) | {_format(entry['fit_s'])} | {_format(entry['encoder_s'])} "
            f"| {_format(entry['fit_to_encoder'])} | {split} |"
        )
    verdict = "met" if ratios["k4_within_budget"] else "NOT met"
    lines.append("")
    lines.append(f"Target fit / encoder <= {ratios['budget_forwards']:.0f} for k = 4: {verdict}.")
    return "\n".join(lines)


def _anople_presets(quick: bool, normals: list) -> dict[str, Any]:
    """Fit seconds per AnoPLe preset for k = 1, 4, 8 (faithful: extrapolated)."""
    from detector.methods.anople.config import preset_config

    table: dict[str, Any] = {}
    for preset in ("fast", "text_only", "faithful"):
        full_steps = preset_config(preset).steps
        steps = min(full_steps, FAITHFUL_TIMED_STEPS) if preset == "faithful" else full_steps
        if quick:
            steps = min(steps, 3)
        det = _create("anople", quick, preset=preset, steps=steps)
        entry: dict[str, Any] = {"steps_timed": steps, "steps_full": full_steps if not quick else steps}
        for k in ((1,) if quick else (1, 4, 8)):
            seconds = _timed(lambda: det.fit(normals[:k]))
            timing = det.describe().get("fit_seconds", {})
            if steps < entry["steps_full"] and timing:
                train = timing.get("train", 0.0)
                seconds = seconds - train + train * entry["steps_full"] / steps
                entry["extrapolated"] = True
            entry[f"k{k}_s"] = seconds
        table[preset] = entry
    return table


def bench_all_loaded(methods: Sequence[str], quick: bool, threads: int) -> dict[str, Any]:
    """Peak memory with every method's default model built, fitted on 4 normals and run once."""
    import torch

    torch.set_num_threads(threads)
    normals = _images(4, seed=2, defect=False)
    query = _images(1, seed=2, defect=True)[0]
    detectors = []
    with tempfile.TemporaryDirectory() as directory:
        for method in methods:
            det = _create(method, quick, **_method_options(method, quick, Path(directory)))
            det.fit(normals)
            det.predict(query)
            detectors.append(det)
    return {"methods": list(methods), "peak_rss_mib": _peak_rss_mib(), "threads": torch.get_num_threads()}


def _in_subprocess(fn: Callable[..., dict[str, Any]], *args: Any) -> dict[str, Any]:
    context = multiprocessing.get_context("spawn")
    with context.Pool(1) as pool:
        return pool.apply(fn, args)


def _format(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, dict):
        return " / ".join(_format(v) for v in value.values())
    if isinstance(value, float):
        return f"{value:.3g}" if value < 100 else f"{value:.0f}"
    return str(value)


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    header = "| " + " | ".join(title for _, title in COLUMNS) + " |"
    rule = "|" + "|".join("---" for _ in COLUMNS) + "|"
    lines = [header, rule]
    for row in rows:
        lines.append("| " + " | ".join(_format(row.get(key)) for key, _ in COLUMNS) + " |")
    return "\n".join(lines)


def anople_table(presets: dict[str, Any]) -> str:
    lines = ["| AnoPLe preset | steps | fit k=1 (s) | fit k=4 (s) | fit k=8 (s) | note |", "|---|---|---|---|---|---|"]
    for name, entry in presets.items():
        note = f"extrapolated from {entry['steps_timed']} steps" if entry.get("extrapolated") else "measured"
        lines.append(
            f"| {name} | {entry['steps_full']} | {_format(entry.get('k1_s'))} | {_format(entry.get('k4_s'))} "
            f"| {_format(entry.get('k8_s'))} | {note} |"
        )
    return "\n".join(lines)


def run(
    methods: Sequence[str], quick: bool, queries: int, threads: int, isolate: bool = True, openvino: bool = True
) -> dict[str, Any]:
    call = _in_subprocess if isolate else (lambda fn, *a: fn(*a))
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
                f"{row['method']} with the opt-in precision=\"bf16\": predict median {_format(bf16['predict_median_s'])} s "
                f"over {len(bf16['predict_all_s'])} queries without warm-up (fp32: {_format(row['predict_median_s'])} s); "
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
    parser.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS))
    parser.add_argument("--quick", action="store_true", help="tiny random backbone (seconds)")
    parser.add_argument("--queries", type=int, default=10, help="timed queries per method (default 10)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--out", default="benchmarks/results.json", help="JSON output (default benchmarks/results.json)")
    parser.add_argument("--no-isolate", action="store_true", help="run every method in this process")
    parser.add_argument("--no-openvino", action="store_true", help="measure the PyTorch runtime only")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    result = run(args.methods, args.quick, args.queries, args.threads, isolate=not args.no_isolate, openvino=not args.no_openvino)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    sys.stdout.write(report(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
