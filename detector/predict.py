"""``python -m detector predict``: score query images against normal images, without the UI.

For each query it writes, into ``--out``:

- ``<query>_<method>_overlay.png``: the calibrated anomaly map over the query (colour map,
  fixed 0..1 scale, 0.5 = the method's threshold), with the region at or above
  ``--threshold`` outlined in red; at the query's original size;
- ``<query>.json``: per method the score, calibrated score, threshold, verdict, seconds,
  weights, calibration source and warnings (the same summary as the app's API).

Normal images are encoded (and prompts learned, for methods that learn at ``fit``) once and
reused for every query, through ``detector.service``. Method options come as
``--<method>-<option>`` flags or ``--option [METHOD.]KEY=VALUE``. Example::

    python -m detector predict --method inctrl anople --normals good/ --query q1.png q2.png --out results/
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any, Sequence

from . import limits, maps
from .errors import DetectorError
from . import cli
from .cli import add_common_arguments
from .service import InspectionService, MethodOutcome, ServiceConfig

LOG = logging.getLogger(__name__)

#: File endings taken from a ``--normals`` folder.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m detector predict",
        description="Score query images against normal images; write overlay PNGs and a JSON result per query.",
    )
    add_common_arguments(parser, multiple_methods=True)
    parser.add_argument("--normals", nargs="*", default=[], help=f"normal images: a folder or files (0..{limits.MAX_NORMAL_IMAGES})")
    parser.add_argument("--query", nargs="+", required=True, help="query image file(s)")
    parser.add_argument("--threshold", type=float, default=0.5, help="decision threshold on the calibrated scale (default 0.5 = each method's own)")
    parser.add_argument("--alpha", type=float, default=0.5, help="overlay opacity of the colour map (default 0.5)")
    parser.add_argument("--colormap", default="jet", choices=list(maps.COLORMAPS), help="colour map (default jet)")
    parser.add_argument("--sigma", type=float, default=None, help="Gaussian smoothing in model pixels (default: each method's)")
    cli.add_option_arguments(parser)
    parser.add_argument("--no-fallback", action="store_true", help="fail when pretrained weights are unavailable instead of using random ones")
    return parser


def collect_normals(items: Sequence[str]) -> list[Path]:
    """Files given directly, plus the image files of given folders (sorted by name)."""
    paths: list[Path] = []
    for item in items:
        path = Path(item).expanduser()
        if path.is_dir():
            paths += sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        else:
            paths.append(path)
    return paths


def write_overlay(path: Path, outcome: MethodOutcome, query_rgb, threshold: float, alpha: float, colormap: str) -> None:
    from PIL import Image

    calibrated = outcome.calibrated_map()
    picture = maps.overlay(query_rgb, calibrated, alpha=alpha, colormap=colormap)
    width = max(2, int(round(min(query_rgb.shape[:2]) / 160)))
    picture = maps.draw_contours(picture, maps.threshold_mask(calibrated, threshold), (255, 0, 0), width)
    Image.fromarray(picture).save(path)


def run(args: argparse.Namespace) -> list[Path]:
    """Score every query; returns the written JSON files."""
    methods = cli.resolve_methods(args.method)
    if args.checkpoint and len(methods) != 1:
        raise ValueError("--checkpoint needs exactly one --method (each method has its own checkpoint format)")
    if not 0.0 <= args.threshold <= 1.0:
        raise ValueError(f"--threshold must be in [0, 1] (calibrated scale), got {args.threshold}")
    if not 0.0 <= args.alpha <= 1.0:
        raise ValueError(f"--alpha must be in [0, 1], got {args.alpha}")
    options: dict[str, dict[str, Any]] = cli.options_from_args(args, methods)
    for method in methods:
        options[method].setdefault("seed", args.seed)
        options[method].setdefault("runtime", args.runtime)
        if args.sigma is not None:
            options[method]["sigma"] = args.sigma
    config = ServiceConfig(
        backbone=args.backbone,
        backbone_weights=args.backbone_weights,
        checkpoints={methods[0]: args.checkpoint} if args.checkpoint else {},
        device=args.device,
        fallback_to_random=not args.no_fallback,
    )
    service = InspectionService(config, cache_size=max(len(methods), 1))
    normals = collect_normals(args.normals)
    out = Path(args.out or "predictions")
    out.mkdir(parents=True, exist_ok=True)
    written = []
    used_stems: set[str] = set()
    for query in args.query:
        report = service.inspect(methods, normals, query, class_name=args.class_name, options=options)
        stem = Path(query).stem
        if stem in used_stems:
            stem = f"{stem}_{len(used_stems)}"
        used_stems.add(stem)
        summary = report.summary(args.threshold)
        summary["query"]["path"] = str(query)
        summary["normals"] = [str(p) for p in normals]
        for outcome in report.outcomes:
            overlay_path = out / f"{stem}_{outcome.method}_overlay.png"
            write_overlay(overlay_path, outcome, report.query.rgb, args.threshold, args.alpha, args.colormap)
            summary["methods"][outcome.method]["overlay"] = overlay_path.name
            summary["methods"][outcome.method]["describe"] = _jsonable(outcome.description)
        json_path = out / f"{stem}.json"
        json_path.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
        written.append(json_path)
        verdicts = ", ".join(f"{o.display_name} {o.calibrated_score:.3f} {o.summary(args.threshold)['verdict']}" for o in report.outcomes)
        sys.stdout.write(f"{query}: {verdicts}\n")
    return written


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if hasattr(value, "item"):
        return value.item()
    return str(value)


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(list(argv) if argv is not None else None)
    try:
        written = run(args)
    except (DetectorError, ValueError) as error:
        sys.stderr.write(f"error: {error}\n")
        return 2
    sys.stdout.write(f"wrote {len(written)} result(s) to {Path(args.out or 'predictions')}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
