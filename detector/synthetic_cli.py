"""``python -m detector make-dataset``: write a small synthetic dataset (textures with drawn
defects and exact masks, deterministic by seed) in the MVTec AD or the folder layout.

Examples::

    python -m detector make-dataset --layout mvtec --out data/synthetic-mvtec --categories grating blobs
    python -m detector make-dataset --layout folder --out data/widgets --kind weave --n-good 10 --n-defect 6

The result is readable by ``python -m detector evaluate --dataset mvtec|folder --root DIR``
and by the training commands.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from .synthetic import DEFECT_KINDS, TEXTURE_KINDS, write_folder_dataset, write_mvtec_dataset


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m detector make-dataset",
        description="Write a synthetic anomaly detection dataset in the MVTec AD or folder layout.",
    )
    parser.add_argument("--layout", choices=("mvtec", "folder"), required=True, help="directory layout to write")
    parser.add_argument("--out", required=True, help="folder to write into (created if missing)")
    parser.add_argument(
        "--categories", nargs="+", default=["grating", "blobs"], choices=TEXTURE_KINDS, metavar="TEXTURE",
        help=f"mvtec layout: one category per texture kind ({', '.join(TEXTURE_KINDS)}; default: grating blobs)",
    )
    parser.add_argument("--kind", default="grating", choices=TEXTURE_KINDS, help="folder layout: the texture kind (default grating)")
    parser.add_argument("--n-train", type=int, default=6, help="mvtec layout: normal training images per category (default 6)")
    parser.add_argument("--n-test-good", type=int, default=4, help="mvtec layout: normal test images per category (default 4)")
    parser.add_argument("--n-good", type=int, default=8, help="folder layout: images in good/ (default 8)")
    parser.add_argument("--n-defect", type=int, default=4, help="anomalous images per category, defect kinds in turn (default 4)")
    parser.add_argument(
        "--defects", nargs="+", default=list(DEFECT_KINDS), choices=DEFECT_KINDS, metavar="DEFECT",
        help=f"defect kinds to draw ({', '.join(DEFECT_KINDS)}; default: all)",
    )
    parser.add_argument("--size", type=int, default=128, help="image side in pixels (default 128)")
    parser.add_argument("--seed", type=int, default=0, help="random seed; the same arguments write the same files (default 0)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = Path(args.out).expanduser()
    try:
        if args.size < 8:
            raise ValueError(f"--size must be at least 8 pixels, got {args.size}")
        if args.layout == "mvtec":
            write_mvtec_dataset(
                out,
                categories=tuple(dict.fromkeys(args.categories)),
                n_train=args.n_train,
                n_test_good=args.n_test_good,
                n_test_defect=args.n_defect,
                size=args.size,
                seed=args.seed,
                defect_kinds=tuple(args.defects),
            )
        else:
            write_folder_dataset(
                out,
                kind=args.kind,
                n_good=args.n_good,
                n_defect=args.n_defect,
                size=args.size,
                seed=args.seed,
                defect_kinds=tuple(args.defects),
            )
    except ValueError as error:
        sys.stderr.write(f"error: {error}\n")
        return 2
    images = sum(1 for p in out.rglob("*.png") if "ground_truth" not in p.parts and "masks" not in p.parts)
    sys.stdout.write(f"wrote a synthetic {args.layout}-layout dataset to {out} ({images} images)\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
