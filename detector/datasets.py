"""Readers for the three dataset layouts the evaluation and training commands accept.

``mvtec``  (MVTec AD)::

    <root>/<category>/train/good/*.png
    <root>/<category>/test/good/*.png
    <root>/<category>/test/<defect_type>/<stem>.png
    <root>/<category>/ground_truth/<defect_type>/<stem>_mask.png

``visa``  (VisA, read through its own split file)::

    <root>/split_csv/1cls.csv          columns object,split,label,image,mask
                                       (split: train|test, label: normal|anomaly,
                                        image/mask: paths relative to <root>)

    VisA masks are label maps: every non-zero value is anomalous.

``folder``  (a user's own data, one category named after the folder)::

    <root>/good/*.png                          normal images
    <root>/<defect_type>/*.png                 anomalous images, one folder per defect type
    <root>/masks/<defect_type>/<stem>.png      optional masks (non-zero = anomalous)

    The k few-shot normals are drawn from ``good/`` by seed and left out of the test
    set (``split_folder``); for training commands ``good/`` is the training split.

Every list is sorted by path so that drawing shots with a seed gives the same files on
every machine (docs/evaluation.md §1-§2 and §6).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from .errors import DetectorError

#: Dataset kinds understood by every function of this module.
KINDS = ("mvtec", "visa", "folder")
#: File suffixes read as images (case-insensitive).
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"})
#: Name of the folder holding normal images (MVTec AD and folder layouts).
GOOD = "good"
#: Sub-folder of a folder-layout root that holds masks instead of images.
FOLDER_MASKS = "masks"
#: The VisA split file, relative to the VisA root.
VISA_SPLIT_CSV = Path("split_csv") / "1cls.csv"
VISA_COLUMNS = ("object", "split", "label", "image", "mask")

MVTEC_LAYOUT = (
    "expected the MVTec AD layout <root>/<category>/train/good/*.png, <root>/<category>/test/<defect>/*.png, "
    "<root>/<category>/ground_truth/<defect>/<stem>_mask.png"
)
VISA_LAYOUT = (
    "expected the VisA layout with <root>/split_csv/1cls.csv (columns object,split,label,image,mask; "
    "paths relative to <root>)"
)
FOLDER_LAYOUT = (
    "expected the folder layout <root>/good/*.png (normal images), <root>/<defect_type>/*.png (anomalous), "
    "optional <root>/masks/<defect_type>/<stem>.png"
)


class DatasetError(DetectorError, ValueError):
    """A dataset root that is missing or does not follow the expected layout."""


@dataclass(frozen=True)
class Sample:
    """One test image.

    Attributes:
        image: path of the image file.
        label: 0 = normal, 1 = anomalous.
        mask: path of the ground-truth mask, ``None`` for normal images or missing masks.
        category: the object / texture category (folder layout: the root folder's name).
        defect_type: ``"good"`` for normal images, else the defect folder's name
            (VisA has no defect types in its split file: ``"anomaly"``).
    """

    image: Path
    label: int
    mask: Path | None
    category: str
    defect_type: str


@dataclass(frozen=True)
class FolderSplit:
    """A folder-layout dataset split for one seed: the shots and the remaining test set."""

    shots: list[Path]
    test: list[Sample]


# -- small helpers ---------------------------------------------------------------------------------
def _check_kind(kind: str) -> str:
    key = str(kind).strip().lower()
    if key not in KINDS:
        raise ValueError(f"unknown dataset kind {kind!r}; expected one of {', '.join(KINDS)}")
    return key


def _check_root(root: str | Path, layout: str) -> Path:
    path = Path(root).expanduser()
    if not path.exists():
        raise DatasetError(f"dataset root {path} does not exist; {layout}")
    if not path.is_dir():
        raise DatasetError(f"dataset root {path} is not a folder; {layout}")
    return path


def _images_in(folder: Path) -> list[Path]:
    """Image files directly inside ``folder``, sorted (hidden files skipped)."""
    return sorted(
        p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES
    )


def _subfolders(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


# -- MVTec AD --------------------------------------------------------------------------------------
def _mvtec_category_dir(root: Path, category: str) -> Path:
    folder = root / category
    if not folder.is_dir():
        known = _mvtec_categories(root, strict=False)
        hint = f"categories found: {', '.join(known)}" if known else "no category folders found"
        raise DatasetError(f"no category folder {folder} ({hint}); {MVTEC_LAYOUT}")
    return folder


def _mvtec_categories(root: Path, *, strict: bool = True) -> list[str]:
    names = [p.name for p in _subfolders(root) if (p / "train" / GOOD).is_dir() or (p / "test").is_dir()]
    if strict and not names:
        raise DatasetError(f"no category folders with train/good or test under {root}; {MVTEC_LAYOUT}")
    return names


def _mvtec_train(root: Path, category: str) -> list[Path]:
    folder = _mvtec_category_dir(root, category) / "train" / GOOD
    if not folder.is_dir():
        raise DatasetError(f"no train/good folder under {root / category}; {MVTEC_LAYOUT}")
    images = _images_in(folder)
    if not images:
        raise DatasetError(f"no images in {folder}; {MVTEC_LAYOUT}")
    return images


def _mvtec_test(root: Path, category: str) -> list[Sample]:
    base = _mvtec_category_dir(root, category)
    test_dir = base / "test"
    if not test_dir.is_dir():
        raise DatasetError(f"no test folder under {base}; {MVTEC_LAYOUT}")
    samples: list[Sample] = []
    for defect_dir in _subfolders(test_dir):
        defect = defect_dir.name
        for image in _images_in(defect_dir):
            if defect == GOOD:
                samples.append(Sample(image, 0, None, category, GOOD))
                continue
            mask = base / "ground_truth" / defect / f"{image.stem}_mask.png"
            samples.append(Sample(image, 1, mask if mask.is_file() else None, category, defect))
    if not samples:
        raise DatasetError(f"no test images under {test_dir}; {MVTEC_LAYOUT}")
    return sorted(samples, key=lambda s: s.image)


# -- VisA ------------------------------------------------------------------------------------------
def _visa_rows(root: Path) -> list[dict[str, str]]:
    csv_path = root / VISA_SPLIT_CSV
    if not csv_path.is_file():
        raise DatasetError(f"no split file {csv_path}; {VISA_LAYOUT}")
    with csv_path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        header = [h.strip() for h in (reader.fieldnames or [])]
        missing = [c for c in VISA_COLUMNS if c not in header]
        if missing:
            raise DatasetError(f"{csv_path} lacks column(s) {', '.join(missing)} (header: {header}); {VISA_LAYOUT}")
        rows = [{(k or "").strip(): (v or "").strip() for k, v in row.items()} for row in reader]
    for number, row in enumerate(rows, start=2):
        if row["split"] not in {"train", "test"} or row["label"] not in {"normal", "anomaly"}:
            raise DatasetError(
                f"{csv_path} line {number}: split must be train|test and label normal|anomaly, "
                f"got split={row['split']!r} label={row['label']!r}; {VISA_LAYOUT}"
            )
    return rows


def _visa_categories(root: Path) -> list[str]:
    names = sorted({row["object"] for row in _visa_rows(root)})
    if not names:
        raise DatasetError(f"{root / VISA_SPLIT_CSV} has no rows; {VISA_LAYOUT}")
    return names


def _visa_category_rows(root: Path, category: str) -> list[dict[str, str]]:
    rows = _visa_rows(root)
    selected = [row for row in rows if row["object"] == category]
    if not selected:
        known = sorted({row["object"] for row in rows})
        raise DatasetError(f"category {category!r} not in {root / VISA_SPLIT_CSV}; categories: {', '.join(known)}")
    return selected


def _visa_file(root: Path, relative: str, csv_line: str) -> Path:
    path = root / relative
    if not path.is_file():
        raise DatasetError(f"{root / VISA_SPLIT_CSV} ({csv_line}) names {relative!r}, but {path} does not exist")
    return path


def _visa_train(root: Path, category: str) -> list[Path]:
    rows = _visa_category_rows(root, category)
    images = [_visa_file(root, r["image"], category) for r in rows if r["split"] == "train" and r["label"] == "normal"]
    if not images:
        raise DatasetError(f"no train/normal rows for {category!r} in {root / VISA_SPLIT_CSV}; {VISA_LAYOUT}")
    return sorted(images)


def _visa_test(root: Path, category: str) -> list[Sample]:
    samples = []
    for row in _visa_category_rows(root, category):
        if row["split"] != "test":
            continue
        image = _visa_file(root, row["image"], category)
        if row["label"] == "normal":
            samples.append(Sample(image, 0, None, category, GOOD))
        else:
            mask = _visa_file(root, row["mask"], category) if row["mask"] else None
            samples.append(Sample(image, 1, mask, category, "anomaly"))
    if not samples:
        raise DatasetError(f"no test rows for {category!r} in {root / VISA_SPLIT_CSV}; {VISA_LAYOUT}")
    return sorted(samples, key=lambda s: s.image)


# -- folder ----------------------------------------------------------------------------------------
def _folder_good(root: Path) -> list[Path]:
    folder = root / GOOD
    if not folder.is_dir():
        raise DatasetError(f"no good/ folder under {root}; {FOLDER_LAYOUT}")
    images = _images_in(folder)
    if not images:
        raise DatasetError(f"no images in {folder}; {FOLDER_LAYOUT}")
    return images


def _folder_mask(root: Path, defect: str, image: Path) -> Path | None:
    for name in (f"{image.stem}.png", f"{image.stem}_mask.png"):
        candidate = root / FOLDER_MASKS / defect / name
        if candidate.is_file():
            return candidate
    return None


def _folder_test(root: Path, category: str) -> list[Sample]:
    samples = [Sample(p, 0, None, category, GOOD) for p in _folder_good(root)]
    for defect_dir in _subfolders(root):
        if defect_dir.name in {GOOD, FOLDER_MASKS}:
            continue
        for image in _images_in(defect_dir):
            samples.append(Sample(image, 1, _folder_mask(root, defect_dir.name, image), category, defect_dir.name))
    return sorted(samples, key=lambda s: s.image)


# -- public interface ------------------------------------------------------------------------------
def list_categories(kind: str, root: str | Path) -> list[str]:
    """Sorted category names of the dataset at ``root``; the folder layout has one
    category, the root folder's name."""
    kind = _check_kind(kind)
    if kind == "mvtec":
        return _mvtec_categories(_check_root(root, MVTEC_LAYOUT))
    if kind == "visa":
        return _visa_categories(_check_root(root, VISA_LAYOUT))
    path = _check_root(root, FOLDER_LAYOUT)
    _folder_good(path)
    return [path.resolve().name]


def _folder_category(root: Path, category: str | None) -> str:
    return category if category else root.resolve().name


def test_samples(
    kind: str, root: str | Path, category: str | None = None, *, exclude: Iterable[str | Path] = ()
) -> list[Sample]:
    """Test images of ``category`` sorted by path (labels from the layout, masks where known).

    ``exclude``: image paths to leave out (the folder layout's shots, see ``split_folder``).
    ``category`` may be omitted for the folder layout (default: the folder's name).
    """
    kind = _check_kind(kind)
    if kind == "folder":
        path = _check_root(root, FOLDER_LAYOUT)
        samples = _folder_test(path, _folder_category(path, category))
    else:
        if not category:
            raise ValueError(f"a category is required for the {kind} layout")
        if kind == "mvtec":
            samples = _mvtec_test(_check_root(root, MVTEC_LAYOUT), category)
        else:
            samples = _visa_test(_check_root(root, VISA_LAYOUT), category)
    excluded = {Path(p).resolve() for p in exclude}
    if excluded:
        samples = [s for s in samples if s.image.resolve() not in excluded]
    return samples


def train_normals(kind: str, root: str | Path, category: str | None = None) -> list[Path]:
    """Normal training images of ``category`` (the few-shot pool), sorted by path.

    Folder layout: every image in ``<root>/good/`` (use ``split_folder`` to keep the
    shots apart from the test normals).
    """
    kind = _check_kind(kind)
    if kind == "folder":
        return _folder_good(_check_root(root, FOLDER_LAYOUT))
    if not category:
        raise ValueError(f"a category is required for the {kind} layout")
    if kind == "mvtec":
        return _mvtec_train(_check_root(root, MVTEC_LAYOUT), category)
    return _visa_train(_check_root(root, VISA_LAYOUT), category)


def sample_shots(paths: Sequence[str | Path], k: int, seed: int) -> list[Path]:
    """``k`` distinct paths drawn by seed: ``default_rng(seed).choice(sorted(paths), k, replace=False)``.

    The order of the result is the draw order. ``k = 0`` gives an empty list.
    """
    pool = sorted(Path(p) for p in paths)
    if k < 0:
        raise ValueError(f"the number of shots must be >= 0, got {k}")
    if k > len(pool):
        raise ValueError(f"cannot draw {k} shots: only {len(pool)} normal image(s) available")
    if k == 0:
        return []
    indices = np.random.default_rng(seed).choice(len(pool), k, replace=False)
    return [pool[int(i)] for i in indices]


def split_folder(root: str | Path, k: int, seed: int, category: str | None = None) -> FolderSplit:
    """Folder layout: draw ``k`` shots from ``good/`` by seed and return them with the
    test set that excludes them (the remaining ``good/`` images are the test normals)."""
    normals = train_normals("folder", root)
    if k >= len(normals) and k > 0:
        raise ValueError(
            f"cannot draw {k} shots from {len(normals)} image(s) in {Path(root) / GOOD} and keep any as test normals"
        )
    shots = sample_shots(normals, k, seed)
    return FolderSplit(shots=shots, test=test_samples("folder", root, category, exclude=shots))


def few_shot_split(
    kind: str, root: str | Path, category: str | None, k: int, seed: int
) -> tuple[list[Path], list[Sample]]:
    """Shots and test samples for one seed in any layout (MVTec/VisA: shots from the
    training normals; folder: ``split_folder``)."""
    if _check_kind(kind) == "folder":
        split = split_folder(root, k, seed, category)
        return split.shots, split.test
    shots = sample_shots(train_normals(kind, root, category), k, seed)
    return shots, test_samples(kind, root, category)


def _mask_array(path: Path) -> np.ndarray:
    """Boolean mask from any image mode: non-zero (in any channel) is anomalous."""
    from PIL import Image

    with Image.open(path) as handle:
        values = np.asarray(handle)  # "P" gives palette indices, "L"/"I;16" values, RGB(A) channels
        if values.ndim == 3:
            channels = values[..., :3] if values.shape[-1] >= 3 else values
            return np.any(channels != 0, axis=-1)
        return values != 0


def _image_size(path: Path) -> tuple[int, int]:
    from PIL import Image

    with Image.open(path) as handle:
        width, height = handle.size
    return height, width


def _resize_nearest(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    import cv2

    height, width = size
    if mask.shape == (height, width):
        return mask
    resized = cv2.resize(mask.astype(np.uint8), (int(width), int(height)), interpolation=cv2.INTER_NEAREST)
    return resized.astype(bool)


def read_mask(sample: Sample, size: tuple[int, int] | None = None) -> np.ndarray:
    """Ground-truth mask of ``sample`` as a bool array of shape ``size = (height, width)``
    (default: the image's own size), binarised with ``> 0`` and resized with nearest
    neighbour. All ``False`` for normal images and for missing masks."""
    target = tuple(int(v) for v in size) if size is not None else _image_size(sample.image)
    if len(target) != 2 or min(target) <= 0:
        raise ValueError(f"size must be (height, width) with positive values, got {size!r}")
    if sample.mask is None or sample.label == 0:
        return np.zeros(target, dtype=bool)
    return _resize_nearest(_mask_array(Path(sample.mask)), target)  # type: ignore[arg-type]


# ``from detector.datasets import test_samples`` inside a test module must not make pytest
# collect this function as a test.
test_samples.__test__ = False  # type: ignore[attr-defined]
