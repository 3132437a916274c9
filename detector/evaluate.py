"""Evaluation command: ``python -m detector evaluate`` (or ``python -m detector.evaluate``).

Example::

    python -m detector evaluate --method inctrl faprompt --dataset mvtec --root /data/mvtec \\
        --all-categories --shots 4 --seeds 0 1 2 3 4 --out results/mvtec.json

Protocol (docs/evaluation.md §2 and §6): for every method, category and seed the ``k`` normal
shots are drawn with ``numpy.random.default_rng(seed).choice(sorted(train_normals), k,
replace=False)`` (folder layout: from ``good/``, and left out of the test set); the
detector is built with that seed, fitted on the shots and asked for every test image
through ``create_detector`` / ``fit`` / ``predict`` only. Metrics per seed come from
``detector.metrics``; a category reports mean ± standard deviation (``ddof=0``) over seeds;
the "mean" row is the mean over categories of the per-category means, ± the standard
deviation over seeds of the per-seed category means. A metric that is undefined for some
category (e.g. no anomalous pixel) is left out of the means; ``None`` / "n/a" when it is
undefined everywhere.

Outputs: a Markdown table on standard output; with ``--out FILE.json`` the full results
(configuration, ``describe()`` of every method, shot file names, per-image scores, metrics)
and a CSV with one row per run, per category summary and overall mean beside it.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from . import datasets, metrics
from . import cli
from .cli import add_common_arguments, detector_kwargs, resolve_methods
from .outcomes import weights_text
from .registry import create_detector, get_method, get_spec

#: Metrics of the Markdown table: (result key, column title).
TABLE_METRICS = (
    ("image_auroc", "image AUROC"),
    ("image_ap", "image AP"),
    ("image_f1_max", "image F1-max"),
    ("pixel_auroc", "pixel AUROC"),
    ("aupro", "AUPRO"),
)
#: Every metric reported per run (thresholds are kept per run only).
SUMMARY_METRICS = ("image_auroc", "image_ap", "image_f1_max", "pixel_auroc", "pixel_ap", "pixel_f1_max", "aupro")
RUN_METRICS = SUMMARY_METRICS + ("image_f1_threshold", "pixel_f1_threshold")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m detector evaluate",
        description="Image and pixel metrics of one or more methods on MVTec AD, VisA or a folder dataset.",
    )
    add_common_arguments(parser, multiple_methods=True)
    parser.add_argument("--dataset", choices=datasets.KINDS, required=True, help="dataset layout")
    parser.add_argument("--root", required=True, help="dataset root folder")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--category", nargs="+", default=None, help="category name(s) (not needed for --dataset folder)")
    which.add_argument("--all-categories", action="store_true", help="every category found under --root")
    parser.add_argument("--shots", type=int, default=4, help="normal images per fit, k (default 4; 0 for zero-shot methods)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="several shot draws, e.g. 0 1 2 3 4 (overrides --seed)")
    parser.add_argument(
        "--pixel-size",
        default="256",
        help="resolution of the pixel metrics: a side length (default 256: maps bilinear, masks nearest neighbour, "
        "exact) or 'full' (original size, streamed per image, binned thresholds)",
    )
    parser.add_argument("--bins", type=int, default=metrics.DEFAULT_BINS, help="score bins of --pixel-size full (default 10000)")
    cli.add_option_arguments(parser)
    parser.add_argument(
        "--category-as-class-name",
        action="store_true",
        help="use each category's name as the object word in text prompts instead of --class-name",
    )
    parser.add_argument("--max-test-images", type=int, default=None, help="use only the first N test images per category (quick checks)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser


# -- argument handling -----------------------------------------------------------------------------
def resolve_options(items: Sequence[str], methods: Sequence[str]) -> dict[str, dict[str, Any]]:
    """``--option`` values as ``{method: {key: value}}``."""
    return cli.resolve_options(items, methods, what="evaluated")


def resolve_checkpoints(value: str | None, methods: Sequence[str]) -> dict[str, str | None]:
    """``--checkpoint PATH`` (one method) or ``--checkpoint METHOD=PATH[,METHOD=PATH]``."""
    result: dict[str, str | None] = {m: None for m in methods}
    if not value:
        return result
    pieces = [p.strip() for p in value.split(",") if p.strip()]
    mapped = [p for p in pieces if "=" in p and p.split("=", 1)[0].strip().lower() in methods]
    if mapped and len(mapped) == len(pieces):
        for piece in pieces:
            name, path = piece.split("=", 1)
            result[name.strip().lower()] = path.strip()
        return result
    if len(methods) != 1:
        raise ValueError("with several methods give the checkpoints as --checkpoint METHOD=PATH[,METHOD=PATH]")
    result[methods[0]] = value
    return result


def resolve_pixel_size(value: str) -> tuple[int, int] | None:
    if str(value).lower() == "full":
        return None
    try:
        side = int(value)
    except ValueError:
        raise ValueError(f"--pixel-size must be a side length or 'full', got {value!r}") from None
    if side < 8:
        raise ValueError(f"--pixel-size must be at least 8, got {side}")
    return side, side


def resolve_categories(kind: str, root: str, requested: Sequence[str] | None, everything: bool) -> list[str]:
    available = datasets.list_categories(kind, root)
    if kind == "folder":
        return available
    if everything:
        return available
    if not requested:
        raise ValueError(f"give --category NAME or --all-categories; categories under {root}: {', '.join(available)}")
    missing = [c for c in requested if c not in available]
    if missing:
        raise ValueError(f"unknown category {', '.join(missing)}; categories under {root}: {', '.join(available)}")
    return list(dict.fromkeys(requested))


# -- running ---------------------------------------------------------------------------------------
@dataclass
class Run:
    """One (method, category, seed) evaluation."""

    method: str
    category: str
    seed: int
    shots: list[str]
    metrics: dict[str, float | None]
    predictions: list[dict[str, Any]]
    pixel_excluded: list[str] = field(default_factory=list)
    seconds_fit: float = 0.0
    seconds_predict: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "shots": self.shots,
            "num_test": len(self.predictions),
            "num_anomalous": sum(p["label"] for p in self.predictions),
            "metrics": self.metrics,
            "pixel_metrics_exclude_unmasked_anomalies": self.pixel_excluded,
            "seconds_fit": round(self.seconds_fit, 4),
            "seconds_predict_per_image": round(self.seconds_predict / max(len(self.predictions), 1), 4),
            "predictions": self.predictions,
        }


def _relative(path: Path, root: Path) -> str:
    """``path`` relative to the dataset root (as listed, else after resolving links), else as is."""
    for candidate, base in ((path.absolute(), root.absolute()), (path.resolve(), root.resolve())):
        try:
            return candidate.relative_to(base).as_posix()
        except ValueError:
            continue
    return path.as_posix()


def evaluate_run(
    method: str,
    kwargs: dict[str, Any],
    shots: list[Path],
    test: list[datasets.Sample],
    *,
    root: Path,
    category: str,
    seed: int,
    pixel_size: tuple[int, int] | None,
    bins: int,
    progress: Any = None,
) -> tuple[Run, dict[str, Any]]:
    """Fit one detector on ``shots``, predict every test sample, compute the metrics.

    Returns the run and the detector's ``describe()``.
    """
    detector = create_detector(method, **kwargs)
    started = time.perf_counter()
    detector.fit(shots)
    fitted = time.perf_counter()
    labels, scores, predictions, excluded = [], [], [], []
    with metrics.PixelMetrics(size=pixel_size, bins=bins) as pixels:
        for sample in test:
            try:
                result = detector.predict(sample.image)
            except Exception as error:  # name the image, keep the original error
                raise RuntimeError(f"{method} failed on {sample.image}: {error}") from error
            if not math.isfinite(float(result.score)):
                raise RuntimeError(f"{method} returned a non-finite score ({result.score}) for {sample.image}")
            labels.append(sample.label)
            scores.append(float(result.score))
            predictions.append(
                {"image": _relative(sample.image, root), "label": sample.label, "defect_type": sample.defect_type, "score": float(result.score)}
            )
            if sample.label == 1 and sample.mask is None:
                excluded.append(_relative(sample.image, root))
            else:
                size = pixel_size if pixel_size is not None else result.anomaly_map.shape[:2]
                pixels.add(result.anomaly_map, datasets.read_mask(sample, size=size))
            if progress is not None:
                progress.update(1)
        predicted = time.perf_counter()
        values = metrics.image_metrics(labels, scores)
        values.update(pixels.compute())
    run = Run(
        method=method,
        category=category,
        seed=seed,
        shots=[_relative(p, root) for p in shots],
        metrics=values,
        predictions=predictions,
        pixel_excluded=excluded,
        seconds_fit=fitted - started,
        seconds_predict=predicted - fitted,
    )
    return run, detector.describe()


def _mean_std(values: Sequence[float | None]) -> tuple[float | None, float | None]:
    present = [v for v in values if v is not None and not math.isnan(v)]
    if not present:
        return None, None
    return float(np.mean(present)), float(np.std(present))


def summarise(runs: list[Run], categories: Sequence[str], seeds: Sequence[int]) -> dict[str, Any]:
    """Per-category mean/std over seeds and the macro mean over categories (see module docstring)."""
    per_category: dict[str, Any] = {}
    for category in categories:
        mine = [r for r in runs if r.category == category]
        stats = {key: _mean_std([r.metrics.get(key) for r in mine]) for key in SUMMARY_METRICS}
        per_category[category] = {"mean": {k: v[0] for k, v in stats.items()}, "std": {k: v[1] for k, v in stats.items()}}
    overall_mean, overall_std = {}, {}
    for key in SUMMARY_METRICS:
        overall_mean[key] = _mean_std([per_category[c]["mean"][key] for c in categories])[0]
        per_seed = []
        for seed in seeds:
            per_seed.append(_mean_std([r.metrics.get(key) for r in runs if r.seed == seed])[0])
        overall_std[key] = _mean_std(per_seed)[1]
    return {"categories": per_category, "mean": overall_mean, "std": overall_std}


# -- output ----------------------------------------------------------------------------------------
def format_value(mean: float | None, std: float | None, several_seeds: bool) -> str:
    """Percent with two decimals, ``± std`` when several seeds ran; ``n/a`` when undefined."""
    if mean is None:
        return "n/a"
    text = f"{100 * mean:.2f}"
    if several_seeds and std is not None:
        text += f" ± {100 * std:.2f}"
    return text


def markdown_tables(results: dict[str, Any]) -> str:
    """One table per method (rows: categories and the mean), plus a summary when several methods ran."""
    config = results["config"]
    several = len(config["seeds"]) > 1
    header = "| category | " + " | ".join(title for _, title in TABLE_METRICS) + " |"
    rule = "|---|" + "---|" * len(TABLE_METRICS)
    lines = []
    for name, entry in results["methods"].items():
        seeds = ", ".join(str(s) for s in config["seeds"])
        lines.append(
            f"### {entry['display_name']} — {config['dataset']}, k = {config['shots']}, seeds {seeds} "
            f"({weights_text(entry['describe'], trained_offline=entry.get('trained_offline', True))}; values in %)"
        )
        lines += ["", header, rule]
        for category, stats in entry["summary"]["categories"].items():
            cells = [format_value(stats["mean"][k], stats["std"][k], several) for k, _ in TABLE_METRICS]
            lines.append(f"| {category} | " + " | ".join(cells) + " |")
        summary = entry["summary"]
        cells = [format_value(summary["mean"][k], summary["std"][k], several) for k, _ in TABLE_METRICS]
        lines.append("| **mean** | " + " | ".join(cells) + " |")
        lines.append("")
    if len(results["methods"]) > 1:
        lines += ["### Mean over categories (%)", "", header.replace("| category |", "| method |"), rule]
        for name, entry in results["methods"].items():
            summary = entry["summary"]
            cells = [format_value(summary["mean"][k], summary["std"][k], several) for k, _ in TABLE_METRICS]
            lines.append(f"| {entry['display_name']} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def _csv_number(value: float | None) -> str:
    return "" if value is None else repr(float(value))


def write_csv(path: Path, results: dict[str, Any]) -> None:
    """One row per run, then per-category mean / std rows, then the overall mean / std."""
    columns = ["method", "category", "seed", "row", "shots", "num_test"] + list(RUN_METRICS)
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        for name, entry in results["methods"].items():
            for category, runs in entry["runs"].items():
                for run in runs:
                    writer.writerow(
                        [name, category, run["seed"], "run", ";".join(run["shots"]), run["num_test"]]
                        + [_csv_number(run["metrics"].get(k)) for k in RUN_METRICS]
                    )
            summary = entry["summary"]
            for category, stats in summary["categories"].items():
                for row in ("mean", "std"):
                    writer.writerow([name, category, "", row, "", ""] + [_csv_number(stats[row].get(k)) for k in RUN_METRICS])
            for row in ("mean", "std"):
                writer.writerow([name, "all", "", row, "", ""] + [_csv_number(summary[row].get(k)) for k in RUN_METRICS])


def output_paths(out: str) -> tuple[Path, Path]:
    """``--out`` as ``results.json`` (CSV beside it) or as a folder (``results.json`` / ``results.csv`` inside)."""
    path = Path(out).expanduser()
    if path.suffix.lower() == ".json":
        return path, path.with_suffix(".csv")
    return path / "results.json", path / "results.csv"


# -- main ------------------------------------------------------------------------------------------
def run_evaluation(args: argparse.Namespace, argv: Sequence[str]) -> dict[str, Any]:
    methods = resolve_methods(args.method)
    options = cli.options_from_args(args, methods, what="evaluated")
    checkpoints = resolve_checkpoints(args.checkpoint, methods)
    pixel_size = resolve_pixel_size(args.pixel_size)
    seeds = list(dict.fromkeys(args.seeds if args.seeds else [args.seed]))
    if args.shots < 0:
        raise ValueError(f"--shots must be >= 0, got {args.shots}")
    needs_shots = [m for m in methods if get_method(m).requires_fit]
    if args.shots == 0 and needs_shots:
        raise ValueError(f"--shots 0 is only possible for zero-shot methods; {', '.join(needs_shots)} need normal images")
    root = Path(args.root).expanduser()
    categories = resolve_categories(args.dataset, args.root, args.category, args.all_categories)

    # plan every run first, so the progress bar knows its length and layout errors come early
    plan: list[tuple[str, int, list[Path], list[datasets.Sample]]] = []
    for category in categories:
        name = None if args.dataset == "folder" else category
        for seed in seeds:
            shots, test = datasets.few_shot_split(args.dataset, root, name, args.shots, seed)
            if args.max_test_images is not None:
                test = test[: args.max_test_images]
            plan.append((category, seed, shots, test))

    from tqdm import tqdm

    total = len(methods) * sum(len(test) for *_, test in plan)
    results: dict[str, Any] = {
        "config": {
            "command": "python -m detector evaluate " + " ".join(argv),
            "dataset": args.dataset,
            "root": str(root),
            "categories": categories,
            "methods": methods,
            "shots": args.shots,
            "seeds": seeds,
            "shot_sampling": "numpy.random.default_rng(seed).choice(sorted(train_normals), k, replace=False)",
            "pixel_metrics": metrics.PixelMetrics(size=pixel_size, bins=args.bins).describe(),
            "aupro_fpr_limit": metrics.FPR_LIMIT,
            "max_test_images": args.max_test_images,
            "python": platform.python_version(),
        },
        "methods": {},
    }
    with tqdm(total=total, desc="evaluate", unit="img", disable=args.no_progress, file=sys.stderr) as bar:
        for method in methods:
            runs: list[Run] = []
            description: dict[str, Any] = {}
            for category, seed, shots, test in plan:
                kwargs = detector_kwargs(args)
                kwargs.update(checkpoint=checkpoints[method], seed=seed)
                if args.category_as_class_name:
                    kwargs["class_name"] = category
                kwargs.update(options[method])
                bar.set_postfix_str(f"{method} {category} seed {seed}")
                run, description = evaluate_run(
                    method, kwargs, shots, test, root=root, category=category, seed=seed, pixel_size=pixel_size, bins=args.bins, progress=bar
                )
                runs.append(run)
            display = get_method(method).display_name or method
            results["methods"][method] = {
                "display_name": display,
                "trained_offline": get_spec(method).trained_offline,
                "describe": _jsonable(description),
                "options": _jsonable(options[method]),
                "checkpoint": checkpoints[method],
                "runs": {c: [r.to_dict() for r in runs if r.category == c] for c in categories},
                "summary": summarise(runs, categories, seeds),
            }
    return results


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    try:
        results = run_evaluation(args, argv)
    except (ValueError, TypeError, FileNotFoundError) as error:
        sys.stderr.write(f"error: {error}\n")
        return 2
    sys.stdout.write(markdown_tables(results) + "\n")
    if args.out:
        json_path, csv_path = output_paths(args.out)
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(results, indent=2, allow_nan=False) + "\n", encoding="utf-8")
        write_csv(csv_path, results)
        sys.stdout.write(f"wrote {json_path} and {csv_path}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
