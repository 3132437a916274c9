"""Training command: ``python -m detector.train <method> --dataset mvtec|visa|folder --root PATH ...``.

Each trainable method has a module ``detector/training/<method>.py`` with
``configure_parser(parser)`` (its own flags) and ``run(args) -> Path`` (trains, writes the
checkpoint, returns its path). The methods' output files load with
``create_detector(<method>, checkpoint=...)``.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

#: Methods with a training command, in display order.
TRAINABLE = ("inctrl", "faprompt")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m detector.train", description=__doc__.splitlines()[0])
    methods = parser.add_subparsers(dest="method", required=True, metavar="METHOD")
    for name in TRAINABLE:
        module = importlib.import_module(f"detector.training.{name}")
        sub = methods.add_parser(name, help=(module.__doc__ or "").strip().splitlines()[0])
        module.configure_parser(sub)
        sub.set_defaults(run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    path = args.run(args)
    sys.stdout.write(f"saved {path}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
