"""Flags shared by every command line (api.md, "Command line")."""

from __future__ import annotations

import argparse
from typing import Any


def add_common_arguments(parser: argparse.ArgumentParser, *, method: bool = True, multiple_methods: bool = False) -> None:
    """Add ``--method``, ``--backbone``, ``--backbone-weights``, ``--checkpoint``,
    ``--class-name``, ``--device``, ``--seed`` and ``--out``."""
    if method:
        if multiple_methods:
            parser.add_argument("--method", nargs="+", default=None, help="method name(s): inctrl, anople, faprompt")
        else:
            parser.add_argument("--method", default=None, help="method name: inctrl, anople or faprompt")
    parser.add_argument("--backbone", default=None, help="open_clip model name (default: the method's official one; 'tiny-test' for a small random model)")
    parser.add_argument("--backbone-weights", default=None, help="open_clip pretrained tag, local file, 'hf-hub:...' or 'random'")
    parser.add_argument("--checkpoint", default=None, help="method weights: local file or 'hf-hub:<org>/<repo>/<file>'")
    parser.add_argument("--class-name", default="object", help="object word used in text prompts (default: object)")
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument("--out", default=None, help="output file or folder")


def detector_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """Keyword arguments of ``create_detector`` taken from parsed common flags."""
    return {
        "backbone": args.backbone,
        "backbone_weights": args.backbone_weights,
        "checkpoint": args.checkpoint,
        "device": args.device,
        "class_name": args.class_name,
        "seed": args.seed,
    }
