"""``python -m detector <command>``: predict, evaluate, train, make-dataset, weights.

Each command is a module with ``main(argv)``; ``python -m detector.evaluate`` and
``python -m detector.train`` work as well.
"""

from __future__ import annotations

import importlib
import sys
from typing import Sequence

COMMANDS = {
    "predict": ("detector.predict", "score query images against normal images, write overlays and JSON"),
    "evaluate": ("detector.evaluate", "metrics on MVTec AD, VisA or a folder dataset"),
    "train": ("detector.train", "train a method's learned parts on auxiliary data"),
    "make-dataset": ("detector.synthetic_cli", "write a small synthetic dataset in the MVTec AD or folder layout"),
    "weights": ("detector.weights_cli", "list, fetch, convert, verify and push official weights"),
}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in {"-h", "--help"} or argv[0] not in COMMANDS:
        lines = ["usage: python -m detector <command> [options]", "", "commands:"]
        lines += [f"  {name:<13} {help_}" for name, (_, help_) in COMMANDS.items()]
        sys.stdout.write("\n".join(lines) + "\n")
        return 0 if argv and argv[0] in {"-h", "--help"} else 2
    module = importlib.import_module(COMMANDS[argv[0]][0])
    return int(module.main(argv[1:]) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
