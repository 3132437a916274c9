"""Dataset readers: MVTec AD, VisA (split CSV + label-map masks) and folder layouts."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from detector import datasets
from detector.datasets import DatasetError, Sample


def _write_image(path: Path, size=(20, 16), value: int = 128) -> Path:
    """A small RGB image of ``size = (height, width)``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    height, width = size
    Image.fromarray(np.full((height, width, 3), value, np.uint8)).save(path)
    return path


def _write_mask(path: Path, mask: np.ndarray, mode: str = "L") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(mask.astype(np.uint8), mode=None).convert(mode).save(path)
    return path


def _make_mvtec(root: Path) -> Path:
    for category in ("bottle", "grid"):
        for i in range(5):
            _write_image(root / category / "train" / "good" / f"{i:03d}.png")
        for i in range(2):
            _write_image(root / category / "test" / "good" / f"{i:03d}.png")
        for defect in ("crack", "scratch"):
            for i in range(2):
                _write_image(root / category / "test" / defect / f"{i:03d}.png")
                mask = np.zeros((20, 16), np.uint8)
                mask[2:6, 3:9] = 255
                _write_mask(root / category / "ground_truth" / defect / f"{i:03d}_mask.png", mask)
    (root / "readme.txt").write_text("not a category")
    return root


def test_mvtec_reader(tmp_path):
    root = _make_mvtec(tmp_path / "mvtec")
    assert datasets.list_categories("mvtec", root) == ["bottle", "grid"]
    normals = datasets.train_normals("mvtec", root, "bottle")
    assert [p.name for p in normals] == [f"{i:03d}.png" for i in range(5)]
    samples = datasets.test_samples("mvtec", root, "bottle")
    assert len(samples) == 6
    assert [s.image for s in samples] == sorted(s.image for s in samples)
    by_type = {s.defect_type: s for s in samples}
    assert set(by_type) == {"good", "crack", "scratch"}
    assert all((s.label == 0) == (s.defect_type == "good") for s in samples)
    assert all((s.mask is None) == (s.label == 0) for s in samples)
    crack = by_type["crack"]
    assert crack.mask == root / "bottle" / "ground_truth" / "crack" / f"{crack.image.stem}_mask.png"
    assert crack.category == "bottle"
    mask = datasets.read_mask(crack)
    assert mask.dtype == bool and mask.shape == (20, 16)
    assert mask.sum() == 4 * 6 and mask[2:6, 3:9].all()
    good_mask = datasets.read_mask(by_type["good"], size=(8, 8))
    assert good_mask.shape == (8, 8) and not good_mask.any()


def test_read_mask_resizes_with_nearest_neighbour_and_binarises_any_nonzero(tmp_path):
    mask = np.zeros((8, 8), np.uint8)
    mask[:4, :4] = 1  # a label-map value, not 255
    mask_path = _write_mask(tmp_path / "m.png", mask)
    image = _write_image(tmp_path / "i.png", size=(8, 8))
    sample = Sample(image, 1, mask_path, "c", "d")
    big = datasets.read_mask(sample, size=(16, 32))
    assert big.shape == (16, 32)
    assert set(np.unique(big)) == {False, True}
    assert big[:8, :16].all() and not big[8:, :].any() and not big[:, 16:].any()
    # missing mask on an anomalous sample: all False, with the image's size
    assert not datasets.read_mask(Sample(image, 1, None, "c", "d")).any()


def _make_visa(root: Path) -> Path:
    rows = []
    for category in ("candle", "pcb1"):
        for i in range(4):
            rel = f"{category}/Data/Images/Normal/{i:04d}.JPG"
            _write_image(root / rel, size=(12, 18))
            rows.append([category, "train", "normal", rel, ""])
        for i in range(4, 6):
            rel = f"{category}/Data/Images/Normal/{i:04d}.JPG"
            _write_image(root / rel, size=(12, 18))
            rows.append([category, "test", "normal", rel, ""])
        for i in range(2):
            rel = f"{category}/Data/Images/Anomaly/{i:03d}.JPG"
            mrel = f"{category}/Data/Masks/Anomaly/{i:03d}.png"
            _write_image(root / rel, size=(12, 18))
            label_map = np.zeros((12, 18), np.uint8)
            label_map[1:3, 1:3] = 1  # instance 1
            label_map[8:10, 10:14] = 2  # instance 2
            _write_mask(root / mrel, label_map)
            rows.append([category, "test", "anomaly", rel, mrel])
    (root / "split_csv").mkdir(parents=True)
    with (root / "split_csv" / "1cls.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["object", "split", "label", "image", "mask"])
        writer.writerows(rows)
    return root


def test_visa_reader(tmp_path):
    root = _make_visa(tmp_path / "visa")
    assert datasets.list_categories("visa", root) == ["candle", "pcb1"]
    normals = datasets.train_normals("visa", root, "pcb1")
    assert len(normals) == 4 and all("pcb1/Data/Images/Normal" in p.as_posix() for p in normals)
    samples = datasets.test_samples("visa", root, "pcb1")
    assert len(samples) == 4
    assert sorted(s.label for s in samples) == [0, 0, 1, 1]
    assert not set(normals) & {s.image for s in samples}
    anomalous = [s for s in samples if s.label == 1][0]
    assert anomalous.defect_type == "anomaly" and anomalous.mask is not None
    mask = datasets.read_mask(anomalous)
    assert mask.shape == (12, 18)
    assert mask.sum() == 4 + 8  # both label-map instances count as anomalous


def test_visa_errors(tmp_path):
    with pytest.raises(DatasetError, match="split_csv"):
        datasets.list_categories("visa", tmp_path)
    (tmp_path / "split_csv").mkdir()
    (tmp_path / "split_csv" / "1cls.csv").write_text("object,split,image\nx,train,a.png\n")
    with pytest.raises(DatasetError, match="label"):
        datasets.list_categories("visa", tmp_path)
    root = _make_visa(tmp_path / "v")
    with pytest.raises(DatasetError, match="categories: candle, pcb1"):
        datasets.test_samples("visa", root, "zipper")
    (root / "pcb1/Data/Images/Normal/0000.JPG").unlink()
    with pytest.raises(DatasetError, match="does not exist"):
        datasets.train_normals("visa", root, "pcb1")


def _make_folder(root: Path, n_good: int = 6) -> Path:
    for i in range(n_good):
        _write_image(root / "good" / f"g{i}.png")
    for defect in ("dent", "stain"):
        for i in range(2):
            _write_image(root / defect / f"{defect}{i}.png")
    mask = np.zeros((20, 16), np.uint8)
    mask[5:10, 5:10] = 200
    _write_mask(root / "masks" / "dent" / "dent0.png", mask)
    return root


def test_folder_reader(tmp_path):
    root = _make_folder(tmp_path / "widgets")
    assert datasets.list_categories("folder", root) == ["widgets"]
    samples = datasets.test_samples("folder", root)
    assert len(samples) == 6 + 4
    assert {s.defect_type for s in samples} == {"good", "dent", "stain"}  # masks/ is not a defect type
    assert all(s.category == "widgets" for s in samples)
    masks = {s.image.name: s.mask for s in samples}
    assert masks["dent0.png"] == root / "masks" / "dent" / "dent0.png"
    assert masks["dent1.png"] is None and masks["stain0.png"] is None
    dent0 = next(s for s in samples if s.image.name == "dent0.png")
    assert datasets.read_mask(dent0).sum() == 25
    assert datasets.train_normals("folder", root) == sorted((root / "good").glob("*.png"))


def test_folder_split_excludes_shots_from_test(tmp_path):
    root = _make_folder(tmp_path / "widgets")
    for seed in range(6):
        split = datasets.split_folder(root, 2, seed)
        test_images = {s.image for s in split.test}
        assert len(split.shots) == 2
        assert not test_images & set(split.shots)
        assert len([s for s in split.test if s.label == 0]) == 4
        assert len(split.test) == 8
    with pytest.raises(ValueError, match="keep any as test normals"):
        datasets.split_folder(root, 6, 0)
    shots, test = datasets.few_shot_split("folder", root, None, 3, 1)
    assert shots == datasets.split_folder(root, 3, 1).shots and not {s.image for s in test} & set(shots)


def test_sample_shots_is_deterministic_and_follows_the_protocol(tmp_path):
    paths = [tmp_path / f"{i:03d}.png" for i in range(20)]
    shuffled = list(reversed(paths))
    first = datasets.sample_shots(shuffled, 4, seed=3)
    assert first == datasets.sample_shots(paths, 4, seed=3)  # input order does not matter
    expected = list(np.random.default_rng(3).choice(np.array(sorted(paths), dtype=object), 4, replace=False))
    assert first == expected
    assert len(set(first)) == 4
    draws = {tuple(datasets.sample_shots(paths, 4, seed=s)) for s in range(5)}
    assert len(draws) > 1  # different seeds give different draws
    assert datasets.sample_shots(paths, 0, 0) == []
    with pytest.raises(ValueError, match="only 20"):
        datasets.sample_shots(paths, 21, 0)


def test_mvtec_shots_never_come_from_the_test_set(tmp_path):
    root = _make_mvtec(tmp_path / "mvtec")
    for seed in range(5):
        shots, test = datasets.few_shot_split("mvtec", root, "grid", 3, seed)
        assert all("train/good" in p.as_posix() for p in shots)
        assert not set(shots) & {s.image for s in test}


def test_malformed_roots_name_what_was_expected(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        datasets.list_categories("mvtec", tmp_path / "nope")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DatasetError, match="expected the MVTec AD layout"):
        datasets.list_categories("mvtec", empty)
    (empty / "bottle" / "test" / "good").mkdir(parents=True)
    with pytest.raises(DatasetError, match=r"no train/good folder under .*bottle; expected the MVTec AD layout"):
        datasets.train_normals("mvtec", empty, "bottle")
    with pytest.raises(DatasetError, match="no test images"):
        datasets.test_samples("mvtec", empty, "bottle")
    with pytest.raises(DatasetError, match="categories found: bottle"):
        datasets.test_samples("mvtec", empty, "cable")
    with pytest.raises(DatasetError, match="no good/ folder .*expected the folder layout"):
        datasets.test_samples("folder", empty)
    with pytest.raises(ValueError, match="unknown dataset kind"):
        datasets.list_categories("coco", empty)


def test_make_dataset_command_writes_layouts_the_readers_accept(tmp_path, capsys):
    from detector.__main__ import main as package_main

    mvtec = tmp_path / "m"
    argv = ["make-dataset", "--layout", "mvtec", "--out", str(mvtec), "--categories", "weave", "grain"]
    assert package_main(argv + ["--size", "32", "--n-train", "3", "--n-test-good", "2", "--n-defect", "2"]) == 0
    assert datasets.list_categories("mvtec", mvtec) == ["grain", "weave"]
    assert len(datasets.train_normals("mvtec", mvtec, "weave")) == 3
    samples = datasets.test_samples("mvtec", mvtec, "weave")
    assert sorted(s.label for s in samples) == [0, 0, 1, 1]
    assert all(datasets.read_mask(s).any() for s in samples if s.label == 1)
    first = (mvtec / "weave" / "train" / "good" / "000.png").read_bytes()

    folder = tmp_path / "f"
    assert package_main(["make-dataset", "--layout", "folder", "--out", str(folder), "--size", "32", "--n-good", "4", "--n-defect", "3"]) == 0
    split = datasets.split_folder(folder, 1, 0)
    assert len(split.test) == 3 + 3 and all(s.mask is not None for s in split.test if s.label == 1)
    assert "wrote a synthetic folder-layout dataset" in capsys.readouterr().out

    again = tmp_path / "again"
    assert package_main(argv[:4] + [str(again)] + argv[5:] + ["--size", "32", "--n-train", "3", "--n-test-good", "2", "--n-defect", "2"]) == 0
    assert (again / "weave" / "train" / "good" / "000.png").read_bytes() == first  # deterministic by seed
    assert package_main(["make-dataset", "--layout", "folder", "--out", str(tmp_path / "x"), "--size", "4"]) == 2
    assert "--size" in capsys.readouterr().err
