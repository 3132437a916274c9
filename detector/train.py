"""Training command: ``python -m detector.train <method> --dataset mvtec|visa|folder --root PATH ...``.

Each method whose ``spec.training_module`` is set has a training command there, a module
with ``configure_parser(parser)`` (its own flags) and ``run(args) -> Path`` (trains, writes
the checkpoint, returns its path). The output files load with
``create_detector(<method>, checkpoint=...)``.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

from .registry import get_spec, list_methods


def trainable_methods() -> list[str]:
    """Registered methods with a training command, in registration order."""
    return [name for name in list_methods() if get_spec(name).training_module]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m detector.train", description=__doc__.splitlines()[0])
    methods = parser.add_subparsers(dest="method", required=True, metavar="METHOD")
    for name in trainable_methods():
        module = importlib.import_module(get_spec(name).training_module)
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
