"""Files for download: the batch table as CSV and the overlays as a ZIP archive."""

from __future__ import annotations

import csv
import io
import re
import zipfile
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np

from .batch import BatchRow

CSV_COLUMNS = ("image", "method", "score", "calibrated", "threshold", "verdict", "seconds")



def batch_csv(rows: Sequence[BatchRow]) -> str:
    """CSV text, one line per (image, method), columns ``CSV_COLUMNS``."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for row in rows:
        writer.writerow(
            [row.image, row.method, f"{row.score:.6g}", f"{row.calibrated:.6g}", f"{row.threshold:.6g}", row.verdict, f"{row.seconds:.4f}"]
        )
    return buffer.getvalue()


def safe_name(text: str, max_length: int = 80) -> str:
    """A file-name part made of letters, digits, ``.``, ``_`` and ``-`` (never empty, no leading dot)."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "_", str(text)).strip("._") or "image"
    return cleaned[:max_length]


def overlays_zip(items: Sequence[tuple[str, str, np.ndarray]]) -> bytes:
    """A ZIP archive with one PNG per ``(image name, method, overlay uint8 RGB)``, named
    ``<image stem>_<method>.png`` (made safe; a repeated name gets ``-2``, ``-3``, ...)."""
    buffer = io.BytesIO()
    used: set[str] = set()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for image_name, method, overlay in items:
            picture = np.asarray(overlay)
            if picture.dtype != np.uint8 or picture.ndim != 3 or picture.shape[2] != 3:
                raise ValueError(f"overlay of {image_name!r} / {method!r} must be uint8 (H, W, 3), got {picture.dtype} {picture.shape}")
            stem = safe_name(Path(str(image_name)).stem or str(image_name))
            base = f"{stem}_{safe_name(method)}"
            name, number = f"{base}.png", 1
            while name in used:
                number += 1
                name = f"{base}-{number}.png"
            used.add(name)
            ok, encoded = cv2.imencode(".png", np.ascontiguousarray(picture[..., ::-1]))
            if not ok:
                raise ValueError(f"could not encode the overlay of {image_name!r} / {method!r} as PNG")
            archive.writestr(name, encoded.tobytes())
    return buffer.getvalue()
