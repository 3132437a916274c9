"""Write the app's example sets into ``assets/examples/`` from ``detector.synthetic``.

Each set is one folder ``<object>-<texture>/`` with ``normal_*.png`` (defect-free samples
of one texture family) and ``query_*.png`` (a new sample of the same family, with a drawn
defect or without one). Everything is generated from seeds, so the files are reproducible
and free of third-party licences (see ``assets/README.md``)::

    python assets/make_examples.py            # writes assets/examples/
    python assets/make_examples.py --out DIR  # somewhere else
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))

from detector import synthetic  # noqa: E402

#: Side of every example image in pixels (small files; the app upsamples nothing).
SIZE = 128
NUM_NORMALS = 3


@dataclass(frozen=True)
class ExampleSet:
    folder: str  # "<object name>-<texture kind>"; the object name goes into the text prompts
    kind: str
    seed: int
    queries: tuple[tuple[str, int, str | None], ...]  # (name, defect seed, defect kind or None = normal)


SETS = (
    ExampleSet("fabric-weave", "weave", 11, (("scratch", 5, "scratch"), ("normal", 0, None))),
    ExampleSet("wood-grain", "grain", 23, (("crack", 7, "crack"),)),
    ExampleSet("stone-blobs", "blobs", 31, (("stain", 3, "spot"),)),
    ExampleSet("grid-grating", "grating", 47, (("hole", 9, "missing"),)),
)


def write_examples(out: Path) -> list[Path]:
    """Write every set under ``out``; returns the written files."""
    written = []
    for example in SETS:
        folder = out / example.folder
        folder.mkdir(parents=True, exist_ok=True)
        for index in range(NUM_NORMALS):
            path = folder / f"normal_{index + 1}.png"
            Image.fromarray(synthetic.texture(example.kind, example.seed, SIZE, index)).save(path, optimize=True)
            written.append(path)
        for offset, (name, defect_seed, defect_kind) in enumerate(example.queries):
            image = synthetic.texture(example.kind, example.seed, SIZE, 100 + offset)
            if defect_kind is not None:
                image, mask = synthetic.add_defect(image, defect_seed, defect_kind)
                Image.fromarray(np.where(mask, 255, 0).astype(np.uint8)).save(folder / f"mask_{name}.png", optimize=True)
            path = folder / f"query_{name}.png"
            Image.fromarray(image).save(path, optimize=True)
            written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "examples", help="output folder (default: assets/examples)")
    args = parser.parse_args(argv)
    files = write_examples(args.out)
    total = sum(p.stat().st_size for p in args.out.rglob("*.png"))
    print(f"wrote {len(files)} images to {args.out} ({total / 1024:.0f} KiB in all PNGs)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
