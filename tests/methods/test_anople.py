"""AnoPLe through the public interface on the tiny random CLIP (docs/anople.md §7: T1, T7, T8,
T11-T16; plus saving/loading, calibration hooks, explanations and describe)."""

from __future__ import annotations

import math
import re

import cv2
import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from detector import CheckpointError, create_detector, list_methods
from detector.checkpoints import read_state_dict, save_safetensors
from detector.images import load_image
from detector.preprocess import preprocess
from detector.methods.anople.fitting import NormalImage, fit_anople, pool_decoder_probabilities
from detector.synthetic import texture

EXTRAS = {"text_score", "memory_max", "decoder_max", "decoder_map", "memory_map"}


def textures(count: int, size: int = 96, kind: str = "grating", seed: int = 0, start: int = 0) -> list[np.ndarray]:
    return [texture(kind, seed, (size, size), start + i) for i in range(count)]




def make(**options):
    options.setdefault("backbone", "tiny-test")
    return create_detector("anople", **options)


@pytest.fixture(scope="module")
def normals() -> list[np.ndarray]:
    return textures(3)


@pytest.fixture(scope="module")
def fitted(normals):
    """A fast-preset detector fitted on two normals with a short schedule."""
    return make(steps=4).fit(normals[:2])


def with_defect(image: np.ndarray, center: tuple[int, int], radius: int) -> np.ndarray:
    out = image.copy()
    colour = tuple(int(255 - c) for c in out[center[1], center[0]])
    cv2.ellipse(out, center, (radius, radius), 0, 0, 360, colour, thickness=-1)
    return out


# ----------------------------------------------------------------------------- T1
def test_registered():
    assert "anople" in list_methods()
    with pytest.raises(TypeError):
        create_detector("anople", backbone="tiny-test", no_such_option=1)
    with pytest.raises(ValueError):
        make(preset="slow")
    with pytest.raises(ValueError):
        make(scoring="best")


@pytest.mark.parametrize("k", [1, 2, 4, 8])
def test_t1_contract(k):
    det = make(steps=2).fit(textures(k, size=80))
    rng = np.random.default_rng(k)
    query = np.concatenate(
        [rng.integers(0, 256, size=(200, 300, 3), dtype=np.uint8), np.full((200, 300, 1), 255, np.uint8)], axis=-1
    )
    result = det.predict(query)
    assert result.method == "anople"
    assert result.anomaly_map.shape == (200, 300) and result.anomaly_map.dtype == np.float32
    assert result.raw_map.shape == det.grid and result.raw_map.dtype == np.float32
    assert np.isfinite(result.anomaly_map).all() and np.isfinite(result.raw_map).all()
    assert math.isfinite(result.score) and 0.0 <= result.score <= 1.0
    assert EXTRAS <= set(result.extras)
    assert {"encode", "decode", "memory", "post"} <= set(result.timings)
    assert det.describe()["k"] == k


# ----------------------------------------------------------------------------- T7
def test_t7_clip_stays_frozen_and_only_learned_parts_change(normals):
    det = make(steps=3)
    before = {k: v.clone() for k, v in det.backbone.model.state_dict().items()}
    det.fit(normals[:2])
    after = det.backbone.model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not any(p.requires_grad for p in det.backbone.model.parameters())
    # every learned tensor moved away from its (seeded) initial value
    initial = det._new_module()
    trained = dict(det.module.named_parameters())
    for name, value in initial.named_parameters():
        assert not torch.equal(value, trained[name]), f"{name} did not change"
    assert not any(name.startswith("clip") for name in det.module.state_dict())


# ----------------------------------------------------------------------------- T8
def pixel_auroc(module, pool) -> float:
    probabilities = pool_decoder_probabilities(module, pool)
    pixel = pool.labels == 1
    targets = (pool.targets[pixel] > 0.5).reshape(-1).numpy()
    return roc_auc_score(targets, probabilities[pixel].reshape(-1).numpy())


def sixty_step_fit_on(backbone: str, images: list[np.ndarray], steps: int = 60):
    """A ``steps``-step (default 60) fast-preset fit of a random ``backbone`` on ``images``,
    with its encoded pool."""
    det = make(backbone=backbone, backbone_weights="random", steps=steps)
    loaded = [load_image(image) for image in images]
    items = [NormalImage(img.rgb, preprocess(img, det.preprocess_spec)[0]) for img in loaded]
    module = det._new_module()
    report = fit_anople(
        module,
        items,
        image_size=det.backbone.image_size,
        patch_size=det.backbone.patch_size,
        to_input=det._to_input,
        seed=0,
        keep_pool=True,
    )
    untrained = det._new_module()
    untrained.text_features = untrained.encode_text().detach()
    return module, untrained, report


def assert_loss_drops_by_a_fifth(report) -> None:
    log = np.array(report.log)
    assert log.shape == (60, 5) and np.isfinite(log).all()
    first, last = log[:10, 1].mean(), log[-10:, 1].mean()
    assert last <= 0.8 * first, (first, last)


@pytest.fixture(scope="module")
def sixty_step_fit(normals):
    """A 60-step fast-preset fit on two synthetic textures (tiny-test)."""
    return sixty_step_fit_on("tiny-test", normals[:2])


def test_t8_fit_learns_to_separate_pseudo_anomalies(sixty_step_fit):
    module, untrained, report = sixty_step_fit
    log = np.array(report.log)
    assert log.shape == (60, 5) and np.isfinite(log).all()
    # the decoder separates the pool's pseudo-anomalous patches better than at init
    before = pixel_auroc(untrained, report.pool)
    after = pixel_auroc(module, report.pool)
    assert after > before, (before, after)


def test_t8_loss_drops_by_a_fifth(sixty_step_fit):
    assert_loss_drops_by_a_fifth(sixty_step_fit[2])


@pytest.mark.slow
def test_t8_loss_drops_by_a_fifth_vit_b16():
    _, _, report = sixty_step_fit_on("ViT-B-16", textures(2, size=224))
    assert_loss_drops_by_a_fifth(report)


# ----------------------------------------------------------------------------- T11
def memory_localisation(backbone: str, size: int, scoring: str = "memory", steps: int | None = 1, monkeypatch=None) -> None:
    """T11 with ``scoring`` after a ``steps``-step fit (None: the preset's); with a
    ``monkeypatch``, the argmax and ranking are checked again with the decoder map
    replaced by constants."""
    images = textures(4, size=size, kind="grating", seed=0)
    det = make(backbone=backbone, backbone_weights="random", steps=steps, scoring=scoring).fit(images[:2])
    center, radius = (int(size * 0.62), int(size * 0.35)), size // 10
    query = with_defect(images[2], center, radius)
    defect_in(det, query, images[3], center, radius, size, ratio=True)
    if monkeypatch is not None:
        num_patches = det.clip.num_patches
        for value in (0.0, 0.5, 1.0):
            monkeypatch.setattr(
                det.module, "decode", lambda f, view, text=None, v=value: torch.full((f.image.shape[0], num_patches), v)
            )
            defect_in(det, query, images[3], center, radius, size, ratio=False)


def defect_in(det, query, clean_image, center, radius, size, *, ratio: bool) -> None:
    result = det.predict(query)
    clean = det.predict(clean_image)
    anomaly_map = result.anomaly_map
    patch = size // det.grid[0]
    y, x = np.unravel_index(int(np.argmax(anomaly_map)), anomaly_map.shape)
    x0, y0 = center[0] - radius - patch, center[1] - radius - patch
    x1, y1 = center[0] + radius + patch, center[1] + radius + patch
    assert x0 <= x <= x1 and y0 <= y <= y1, ((x, y), (x0, y0, x1, y1))
    inside = np.zeros(anomaly_map.shape, np.uint8)
    cv2.ellipse(inside, center, (radius, radius), 0, 0, 360, 1, thickness=-1)
    inside = inside.astype(bool)
    if ratio:
        assert anomaly_map[inside].mean() >= 1.5 * anomaly_map[~inside].mean()
    assert result.score > clean.score


def test_t11_memory_bank_localises():
    memory_localisation("tiny-test", 128)


@pytest.mark.slow
def test_t11_memory_bank_localises_vit_b16():
    memory_localisation("ViT-B-16", 224)


# ----------------------------------------------------------------------------- T12 / T13
def test_t12_fit_image_matches_itself_exactly(fitted, normals):
    result = fitted.predict(normals[0])
    assert np.abs(result.extras["memory_map"]).max() <= 1e-6
    # the fused map is then the decoder map alone, halved (arithmetic fusion)
    np.testing.assert_allclose(result.raw_map, result.extras["decoder_map"] / 2, rtol=0, atol=1e-6)
    other = fitted.predict(normals[2])
    assert result.extras["memory_max"] < other.extras["memory_max"]


def test_t13_fusion_algebra(fitted, normals):
    query = with_defect(normals[2], (40, 50), 10)
    result = fitted.predict(query)
    dec, mem = result.extras["decoder_map"].astype(np.float64), result.extras["memory_map"].astype(np.float64)
    np.testing.assert_allclose(result.raw_map, (dec + mem) / 2, rtol=1e-5, atol=1e-7)
    p_text, mem_max = result.extras["text_score"], result.extras["memory_max"]
    assert mem_max == pytest.approx(float(mem.max()), rel=1e-6)
    assert result.score == pytest.approx((p_text + mem_max) / 2, rel=1e-5)
    assert 0.0 <= result.score <= 1.0
    assert result.extras["decoder_max"] == pytest.approx(float(dec.max()), rel=1e-6)


def test_scoring_options(fitted, normals):
    query = with_defect(normals[2], (40, 50), 10)
    full = fitted.predict(query)
    for scoring in ("prompt", "memory"):
        det = make(scoring=scoring, steps=4).fit(normals[:2])
        result = det.predict(query)
        if scoring == "prompt":
            np.testing.assert_array_equal(result.raw_map, full.extras["decoder_map"])
            assert result.score == pytest.approx(full.extras["text_score"], rel=1e-6)
        else:
            np.testing.assert_array_equal(result.raw_map, full.extras["memory_map"])
            assert result.score == pytest.approx(full.extras["memory_max"], rel=1e-6)
    tta = make(steps=4, multiview_tta=True).fit(normals[:2]).predict(query)
    # the local views change the decoder map (compared relatively: the values can be tiny)
    assert not np.allclose(tta.extras["decoder_map"], full.extras["decoder_map"], rtol=1e-3, atol=0)
    np.testing.assert_array_equal(tta.extras["memory_map"], full.extras["memory_map"])


# ----------------------------------------------------------------------------- T14
def test_t14_determinism(normals):
    a = make(steps=3, seed=5).fit(normals[:2])
    b = make(steps=3, seed=5).fit(normals[:2])
    c = make(steps=3, seed=6).fit(normals[:2])
    state_a, state_b, state_c = a.module.state_dict(), b.module.state_dict(), c.module.state_dict()
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)
    ra, rb = a.predict(normals[2]), b.predict(normals[2])
    assert ra.score == rb.score and np.array_equal(ra.anomaly_map, rb.anomaly_map)
    deep = [k for k in state_a if k.startswith("learner.visual_prompts") or k.startswith("learner.text_prompts.2")]
    assert deep and all(not torch.equal(state_a[k], state_c[k]) for k in deep)


def test_fit_does_not_touch_the_global_rng(normals):
    torch.manual_seed(123)
    np.random.seed(123)
    expected_torch, expected_numpy = torch.rand(3), np.random.rand(3)
    torch.manual_seed(123)
    np.random.seed(123)
    make(steps=2).fit(normals[:1])
    assert torch.equal(torch.rand(3), expected_torch)
    assert np.array_equal(np.random.rand(3), expected_numpy)


# ----------------------------------------------------------------------------- T15
def test_t15_progress(normals):
    calls: list[tuple[float, str]] = []
    det = make(steps=5).fit(normals[:2], progress=lambda fraction, message: calls.append((fraction, message)))
    fractions = [f for f, _ in calls]
    assert all(0.0 <= f <= 1.0 for f in fractions)
    assert all(b >= a for a, b in zip(fractions, fractions[1:]))
    assert fractions[-1] == 1.0
    steps = [re.fullmatch(r"learning prompts, step (\d+)/(\d+), loss (\d+\.\d{3})", m) for _, m in calls]
    steps = [match for match in steps if match]
    assert [(int(m[1]), int(m[2])) for m in steps] == [(i, 5) for i in range(1, 6)]
    # the loss shown is the running mean of the last (up to) 5 total losses
    log = [entry[1] for entry in det.training_log]
    assert [float(m[3]) for m in steps] == [round(float(np.mean(log[max(0, i - 5) : i])), 3) for i in range(1, 6)]
    make(steps=2).fit(normals[:1])  # no callback


# ----------------------------------------------------------------------------- T16
def test_t16_errors(fitted, tmp_path, normals):
    with pytest.raises(ValueError):
        make().fit([])
    with pytest.raises(RuntimeError, match="fit"):
        make().predict(normals[0])
    path = fitted.save(tmp_path / "anople.safetensors")
    state = read_state_dict(path)
    from detector.checkpoints import read_header

    header = read_header(path)
    # a tensor of the wrong shape
    broken = dict(state)
    broken["decoder.head.weight"] = torch.zeros(3, 3)
    save_safetensors(tmp_path / "shape.safetensors", broken, header)
    with pytest.raises(CheckpointError, match="decoder.head.weight"):
        make(checkpoint=str(tmp_path / "shape.safetensors"))
    # a missing tensor
    missing = {k: v for k, v in state.items() if k != "learner.text_prompts.1"}
    save_safetensors(tmp_path / "missing.safetensors", missing, header)
    with pytest.raises(CheckpointError, match="learner.text_prompts.1"):
        make(checkpoint=str(tmp_path / "missing.safetensors"))
    # a memory bank that does not match k
    save_safetensors(tmp_path / "k.safetensors", state, {**header, "k": 3, "normal_sizes": [[96, 96]] * 3})
    with pytest.raises(CheckpointError, match="memory bank"):
        make(checkpoint=str(tmp_path / "k.safetensors"))
    # not an AnoPLe file, another backbone, an unreadable file
    save_safetensors(tmp_path / "other.safetensors", state, {"format": "something-else"})
    with pytest.raises(CheckpointError):
        make(checkpoint=str(tmp_path / "other.safetensors"))
    with pytest.raises(CheckpointError):
        create_detector("anople", backbone="ViT-B-16", backbone_weights="random", checkpoint=str(path))
    (tmp_path / "junk.bin").write_bytes(b"not a weights file")
    with pytest.raises(CheckpointError):
        make(checkpoint=str(tmp_path / "junk.bin"))


# ----------------------------------------------------------------------------- state files
def test_save_and_load_give_equal_predictions(fitted, tmp_path, normals):
    path = fitted.save(tmp_path / "state.safetensors")
    loaded = create_detector("anople", checkpoint=str(path))
    assert loaded.is_fitted and loaded.num_normals == 2
    info = loaded.describe()
    assert info["checkpoint"] == str(path) and info["trained"] is True and info["backbone"] == "tiny-test"
    assert info["final_loss"] == pytest.approx(fitted.describe()["final_loss"])
    query = with_defect(normals[2], (30, 60), 9)
    a, b = fitted.predict(query), loaded.predict(query)
    assert a.score == b.score
    np.testing.assert_array_equal(a.anomaly_map, b.anomaly_map)
    assert [s for s, _ in fitted.leave_one_out()] == [s for s, _ in loaded.leave_one_out()]


# ----------------------------------------------------------------------------- hooks
def test_default_calibration_and_leave_one_out(fitted, normals):
    calibration = fitted.default_calibration()
    assert (calibration.image_min, calibration.image_max, calibration.image_threshold) == (0.0, 1.0, 0.5)
    assert (calibration.pixel_min, calibration.pixel_max, calibration.pixel_threshold) == (0.0, 1.0, 0.5)
    assert calibration.source == "default"
    scores = fitted.leave_one_out()
    assert len(scores) == 2
    for (score, anomaly_map), image in zip(scores, normals[:2]):
        assert anomaly_map.shape == image.shape[:2] and anomaly_map.dtype == np.float32
        assert 0.0 < score <= 1.0  # its own patches are out of the bank, so not a zero distance
    single = make(steps=2).fit(normals[:1])
    assert single.leave_one_out() is None


def test_leave_one_out_equals_a_fit_without_that_normal(normals):
    """With the memory scoring, leaving a normal out equals fitting on the others."""
    three = make(steps=1, scoring="memory").fit(normals[:3])
    two = make(steps=1, scoring="memory").fit([normals[0], normals[2]])
    score, anomaly_map = three.leave_one_out()[1]
    result = two.predict(normals[1])
    assert score == pytest.approx(result.score, abs=1e-6)
    np.testing.assert_allclose(anomaly_map, result.anomaly_map, atol=1e-6)


def test_explain_points_at_the_nearest_normal_patch(fitted, normals):
    result = fitted.predict(normals[1])
    info = fitted.explain(result, x=10, y=20)  # 96 px on an 8x8 grid: 12 px per patch
    assert info["patch"] == (1, 0)
    assert info["value"] == pytest.approx(float(result.raw_map[1, 0]))
    assert info["normal_index"] == 1 and info["normal_patch"] == (1, 0)
    assert info["box"] == (0, 12, 12, 24)
    assert info["similarity"] == pytest.approx(1.0, abs=1e-5)


def test_explain_ties_go_to_the_lowest_index_and_boxes_use_original_pixels():
    image = texture("weave", 2, (80, 120), 0)  # H 80, W 120: 10 x 15 px per patch
    det = make(steps=1).fit([image, image.copy()])
    info = det.explain(det.predict(image), x=10, y=20)
    assert info["patch"] == (2, 0)
    assert info["normal_index"] == 0 and info["normal_patch"] == (2, 0)
    assert info["box"] == (0, 20, 15, 30)


def test_describe(fitted):
    info = fitted.describe()
    for key in ("method", "backbone", "backbone_weights", "image_size", "checkpoint", "trained", "mode"):
        assert key in info
    assert info["reconstruction"] is True and "reconstruction" in info["note"]
    assert info["preset"] == "fast" and info["steps"] == 4 and info["trained"] is True
    assert info["text_blocks"] == [1, 2, 3, 4, 5, 6] and info["visual_blocks"] == [6]
    assert math.isfinite(info["final_loss"])
    assert {"encode", "train", "total"} <= set(info["fit_seconds"])
    assert make().describe()["trained"] is False
    text_only = make(preset="text_only").describe()
    assert text_only["visual_blocks"] == [] and text_only["coupling"] == "none" and "off" in text_only["coupling_note"]
    faithful = make(preset="faithful").describe()
    assert faithful["steps"] == 500 and faithful["visual_blocks"] == [1, 2, 3, 4, 5]


@pytest.mark.parametrize("preset", ["text_only", "faithful"])
def test_other_presets_fit_and_predict(preset, normals):
    det = make(preset=preset, steps=2).fit(normals[:2])
    result = det.predict(normals[2])
    assert np.isfinite(result.anomaly_map).all() and 0.0 <= result.score <= 1.0
    self_match = det.predict(normals[0])
    assert np.abs(self_match.extras["memory_map"]).max() <= 1e-6
