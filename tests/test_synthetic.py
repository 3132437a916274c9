"""Tests of detector.synthetic: textures, defects with masks, dataset writers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from detector import synthetic


@pytest.mark.parametrize("kind", synthetic.TEXTURE_KINDS)
def test_texture_shape_and_determinism(kind):
    a = synthetic.texture(kind, 3, (48, 80), index=2)
    assert a.dtype == np.uint8 and a.shape == (48, 80, 3)
    np.testing.assert_array_equal(a, synthetic.texture(kind, 3, (48, 80), index=2))
    assert not np.array_equal(a, synthetic.texture(kind, 4, (48, 80), index=2))
    assert not np.array_equal(a, synthetic.texture(kind, 3, (48, 80), index=3))
    assert a.std() > 10  # a texture, not a flat colour
    assert synthetic.texture(kind, 3, 32).shape == (32, 32, 3)


@pytest.mark.parametrize("kind", synthetic.TEXTURE_KINDS)
def test_samples_of_a_family_look_alike(kind):
    samples = [synthetic.texture(kind, 11, 96, index=i).astype(np.float64) for i in range(4)]
    means = np.array([s.reshape(-1, 3).mean(axis=0) for s in samples])
    stds = np.array([s.reshape(-1, 3).std(axis=0) for s in samples])
    assert np.ptp(means, axis=0).max() < 15
    assert np.ptp(stds, axis=0).max() < 15
    # ... but they are not the same picture
    assert np.abs(samples[0] - samples[1]).mean() > 5


def test_texture_rejects_unknown_kind_and_bad_arguments():
    with pytest.raises(ValueError, match="grating"):
        synthetic.texture("marble", 0)
    with pytest.raises(ValueError):
        synthetic.texture("grating", 0, (4, 4))
    with pytest.raises(ValueError):
        synthetic.texture("grating", 0, 32, index=-1)


def test_texture_uses_no_global_random_state():
    np.random.seed(5)
    before = np.random.random()
    np.random.seed(5)
    synthetic.texture("blobs", 0, 32)
    synthetic.add_defect(synthetic.texture("weave", 0, 32), 1)
    assert np.random.random() == before


@pytest.mark.parametrize("defect", synthetic.DEFECT_KINDS)
@pytest.mark.parametrize("kind,seed", [("grating", 0), ("weave", 1), ("blobs", 2), ("grain", 3)])
def test_defect_mask_is_exactly_the_changed_pixels(kind, seed, defect):
    image = synthetic.texture(kind, seed, 96, index=1)
    original = image.copy()
    out, mask = synthetic.add_defect(image, seed + 10, defect)
    np.testing.assert_array_equal(image, original)  # input untouched
    assert out.dtype == np.uint8 and out.shape == image.shape
    assert mask.dtype == bool and mask.shape == (96, 96)
    changed = (out != image).any(axis=2)
    assert mask.sum() >= 4
    assert not (changed & ~mask).any()  # every changed pixel is in the mask
    assert changed[mask].mean() == 1.0  # every mask pixel changed
    assert mask.mean() < 0.25  # a local defect
    # the defect contrasts with the surface
    assert np.abs(out[mask].astype(int) - image[mask].astype(int)).max(axis=1).mean() > 40


def test_defect_determinism_and_kind_choice():
    image = synthetic.texture("blobs", 0, 64)
    a, ma = synthetic.add_defect(image, 7)
    b, mb = synthetic.add_defect(image, 7)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(ma, mb)
    c, mc = synthetic.add_defect(image, 8)
    assert not np.array_equal(ma, mc)
    assert not np.array_equal(
        synthetic.add_defect(image, 7, "scratch")[1], synthetic.add_defect(image, 7, "missing")[1]
    )
    with pytest.raises(ValueError, match="scratch"):
        synthetic.add_defect(image, 0, "dent")
    with pytest.raises(ValueError):
        synthetic.add_defect(image[..., 0], 0)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_write_mvtec_dataset_layout(tmp_path):
    root = synthetic.write_mvtec_dataset(tmp_path / "mvtec", size=64)
    assert root == tmp_path / "mvtec"
    files = _files(root)
    expected = set()
    for category in ("grating", "blobs"):
        expected |= {f"{category}/train/good/{i:03d}.png" for i in range(6)}
        expected |= {f"{category}/test/good/{i:03d}.png" for i in range(4)}
        for defect in synthetic.DEFECT_KINDS:
            expected.add(f"{category}/test/{defect}/000.png")
            expected.add(f"{category}/ground_truth/{defect}/000_mask.png")
    assert set(files) == expected
    for name in files:
        with Image.open(root / name) as img:
            assert img.size == (64, 64)
            if "ground_truth" in name:
                assert img.mode == "L"
                values = np.asarray(img)
                assert set(np.unique(values)) == {0, 255}
            else:
                assert img.mode == "RGB"
    # normals of one category are different images
    assert files["grating/train/good/000.png"] != files["grating/train/good/001.png"]


def test_write_mvtec_dataset_is_deterministic_and_counts(tmp_path):
    kwargs = dict(categories=("weave",), n_train=2, n_test_good=1, n_test_defect=6, size=48, seed=3)
    a = _files(synthetic.write_mvtec_dataset(tmp_path / "a", **kwargs))
    b = _files(synthetic.write_mvtec_dataset(tmp_path / "b", **kwargs))
    assert a == b
    c = _files(synthetic.write_mvtec_dataset(tmp_path / "c", **{**kwargs, "seed": 4}))
    assert set(c) == set(a) and c != a
    defects = sorted(name for name in a if name.startswith("weave/test/") and "/good/" not in name)
    assert len(defects) == 6
    assert "weave/test/scratch/001.png" in a and "weave/ground_truth/spot/001_mask.png" in a
    with pytest.raises(ValueError):
        synthetic.write_mvtec_dataset(tmp_path / "d", categories=("marble",))


def test_mvtec_masks_match_defect_images(tmp_path):
    root = synthetic.write_mvtec_dataset(
        tmp_path, categories=("grain",), n_train=1, n_test_good=0, n_test_defect=4, size=64, seed=1
    )
    for defect in synthetic.DEFECT_KINDS:
        mask = np.asarray(Image.open(root / "grain" / "ground_truth" / defect / "000_mask.png")) > 0
        image = np.asarray(Image.open(root / "grain" / "test" / defect / "000.png").convert("RGB"))
        assert mask.any() and mask.mean() < 0.25
        # the defect colour stands out from the surface around it
        assert np.abs(image[mask].mean(axis=0) - image[~mask].mean(axis=0)).max() > 30


def test_write_folder_dataset_layout(tmp_path):
    root = synthetic.write_folder_dataset(tmp_path / "folder", kind="blobs", n_good=3, n_defect=5, size=40, seed=2)
    files = _files(root)
    expected = {f"good/{i:03d}.png" for i in range(3)}
    expected |= {"scratch/000.png", "scratch/001.png", "spot/000.png", "crack/000.png", "missing/000.png"}
    expected |= {"masks/scratch/000.png", "masks/scratch/001.png", "masks/spot/000.png"}
    expected |= {"masks/crack/000.png", "masks/missing/000.png"}
    assert set(files) == expected
    for name in files:
        with Image.open(root / name) as img:
            assert img.size == (40, 40)
            if name.startswith("masks/"):
                assert np.asarray(img).max() == 255
    again = synthetic.write_folder_dataset(tmp_path / "again", kind="blobs", n_good=3, n_defect=5, size=40, seed=2)
    assert _files(again) == files


def test_writers_accept_chosen_defect_kinds(tmp_path):
    root = synthetic.write_folder_dataset(tmp_path, n_good=1, n_defect=2, size=32, defect_kinds=("crack",))
    assert sorted(p.name for p in (root / "crack").iterdir()) == ["000.png", "001.png"]
    assert not (root / "scratch").exists()
