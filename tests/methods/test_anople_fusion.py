"""AnoPLe's arithmetic fusion and degenerate-part report (anople.md "Decisions 2026-12-01",
issue 21): the bright-block case, T11 with the default scoring, the fit at the fast preset's
own step count, and the degenerate-part warning."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from detector import create_detector
from detector.methods.anople.config import preset_config
from detector.methods.anople.health import DEGENERATE_SPREAD, PART_NAMES, PartHealth, assess_parts

from test_anople import memory_localisation, sixty_step_fit_on, textures

#: The bright block of issue 21: 40 rows x 60 columns of bright green at (top, left).
BLOCK = (150, 70, 40, 60)
BLOCK_COLOUR = (40, 230, 40)


def grey_texture(rng: np.random.Generator, side: int) -> np.ndarray:
    """uint8 ``(side, side, 3)`` grey texture: low-pass Gaussian noise (FFT, numpy only)
    plus fine grain, around grey level 128, equal in the three channels."""
    noise = rng.normal(size=(side, side))
    fy = np.fft.fftfreq(side)[:, None]
    fx = np.fft.rfftfreq(side)[None, :]
    smooth = np.fft.irfft2(np.fft.rfft2(noise) * np.exp(-(fx**2 + fy**2) / (2 * 0.03**2)), s=(side, side))
    grey = 128 + 18 * smooth / smooth.std() + 6 * rng.normal(size=(side, side))
    return np.repeat(np.clip(grey, 0, 255).astype(np.uint8)[..., None], 3, axis=-1)


def bright_block_case(seed: int = 0) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    """Four clean 256 x 256 crops of one grey texture (the normals), a fifth crop with the
    bright block pasted in (the defect query) and a sixth clean crop (the clean query)."""
    big = grey_texture(np.random.default_rng(seed), 768)
    crops = [big[y : y + 256, x : x + 256].copy() for y in (0, 256) for x in (0, 256, 512)]
    top, left, height, width = BLOCK
    query = crops[4].copy()
    query[top : top + height, left : left + width] = BLOCK_COLOUR
    return crops[:4], query, crops[5]


def constant_decoder(det, value: float):
    """``module.decode`` replaced by a constant map (the decoder's evidence removed)."""
    num_patches = det.clip.num_patches

    def decode(features, view, text_features=None):
        return torch.full((features.image.shape[0], num_patches), value, dtype=features.image.dtype)

    return decode


def assert_block_found(det, query: np.ndarray, clean: np.ndarray, *, ratio: bool = True) -> None:
    """Argmax inside the block grown by one patch; mean inside >= 1.5x outside (``ratio``);
    the defect query above the clean one."""
    result, clean_result = det.predict(query), det.predict(clean)
    anomaly_map = result.anomaly_map
    top, left, height, width = BLOCK
    patch = query.shape[0] / det.grid[0]
    y, x = np.unravel_index(int(np.argmax(anomaly_map)), anomaly_map.shape)
    assert left - patch <= x < left + width + patch and top - patch <= y < top + height + patch, ((x, y), patch)
    inside = np.zeros(anomaly_map.shape, bool)
    inside[top : top + height, left : left + width] = True
    if ratio:
        assert anomaly_map[inside].mean() >= 1.5 * anomaly_map[~inside].mean(), (
            anomaly_map[inside].mean(),
            anomaly_map[~inside].mean(),
        )
    assert result.score > clean_result.score, (result.score, clean_result.score)


def bright_block(backbone: str, monkeypatch) -> None:
    normals, query, clean = bright_block_case()
    det = create_detector("anople", backbone=backbone, backbone_weights="random").fit(normals)
    assert det.scoring == "full" and det.config.steps == preset_config("fast").steps
    assert_block_found(det, query, clean)
    for value in (0.0, 0.5, 1.0):
        monkeypatch.setattr(det.module, "decode", constant_decoder(det, value))
        assert_block_found(det, query, clean, ratio=False)


def test_bright_block_is_found_with_the_default_scoring(monkeypatch):
    bright_block("tiny-test", monkeypatch)


@pytest.mark.slow
def test_bright_block_is_found_with_the_default_scoring_vit_b16(monkeypatch):
    bright_block("ViT-B-16", monkeypatch)


def test_bright_block_case_is_seeded_and_only_the_block_differs():
    normals, query, clean = bright_block_case()
    again = bright_block_case()
    assert all(np.array_equal(a, b) for a, b in zip(normals + [query, clean], again[0] + [again[1], again[2]]))
    assert len(normals) == 4 and all(n.shape == (256, 256, 3) for n in normals)
    assert all(np.array_equal(n[..., 0], n[..., 1]) for n in normals)  # grey
    top, left, height, width = BLOCK
    differs = np.zeros((256, 256), bool)
    differs[top : top + height, left : left + width] = True
    assert (query[differs] == BLOCK_COLOUR).all()
    assert not np.array_equal(normals[0], normals[1])


# ----------------------------------------------------------------------------- T11, default scoring
def test_t11_default_scoring_localises(monkeypatch):
    memory_localisation("tiny-test", 128, scoring="full", steps=None, monkeypatch=monkeypatch)


@pytest.mark.slow
def test_t11_default_scoring_localises_vit_b16(monkeypatch):
    memory_localisation("ViT-B-16", 224, scoring="full", steps=None, monkeypatch=monkeypatch)


# ----------------------------------------------------------------------------- T8 at the preset's steps
def assert_loss_falls(report, steps: int) -> None:
    log = np.array(report.log)
    assert log.shape == (steps, 5) and np.isfinite(log).all()
    window = max(1, min(10, steps // 3))
    first, last = log[:window, 1].mean(), log[-window:, 1].mean()
    assert last <= 0.8 * first, (first, last)


def test_t8_at_the_fast_presets_own_step_count():
    steps = preset_config("fast").steps
    module, untrained, report = sixty_step_fit_on("tiny-test", textures(2), steps=steps)
    assert_loss_falls(report, steps)


@pytest.mark.slow
def test_t8_at_the_fast_presets_own_step_count_vit_b16():
    steps = preset_config("fast").steps
    _, _, report = sixty_step_fit_on("ViT-B-16", textures(2, size=224), steps=steps)
    assert_loss_falls(report, steps)


# ----------------------------------------------------------------------------- degenerate parts
def test_assess_parts_flags_constant_parts_only():
    rng = np.random.default_rng(0)
    varied = torch.from_numpy(rng.uniform(size=(4, 16)))
    constant = torch.full((4, 16), 1e-13)
    health = assess_parts(constant, torch.tensor([0.3, 0.3 + 1e-9]), varied)
    assert health.degenerate == ("decoder_map", "text_score")
    assert "decoder_map" in health.warnings()[0] and "text_score" in health.warnings()[0]
    assert "memory_map" not in health.warnings()[0]
    healthy = assess_parts(varied, torch.tensor([0.2, 0.6]), varied)
    assert healthy.degenerate == () and healthy.warnings() == ()
    # just above / below the documented epsilon
    edge = torch.tensor([0.0, 2 * DEGENERATE_SPREAD])
    assert assess_parts(varied, edge, None).degenerate == ()
    assert assess_parts(varied, edge / 4, None).degenerate == ("text_score",)
    # k = 1: the memory map is not checked; one view: p_text is not checked
    single = assess_parts(constant[:1], torch.tensor([0.5]), None)
    assert math.isnan(single.memory_spread) and math.isnan(single.text_spread)
    assert single.degenerate == ("decoder_map",)
    assert PartHealth.from_tensor(health.to_tensor()) == health
    assert set(PART_NAMES) == {"decoder_map", "text_score", "memory_map"}


def test_degenerate_memory_bank_is_named_in_warnings_and_describe(tmp_path):
    """Two identical normals: leave-one-out, every patch finds itself, so M_mem has no spread."""
    image = textures(1)[0]
    det = create_detector("anople", backbone="tiny-test").fit([image, image.copy()])
    assert "memory_map" in det.describe()["degenerate_parts"]
    result = det.predict(textures(2)[1])
    warning = [w for w in result.warnings if w.startswith("AnoPLe: degenerate")]
    assert len(warning) == 1 and "memory_map" in warning[0]
    loaded = create_detector("anople", checkpoint=str(det.save(tmp_path / "state.safetensors")))
    assert loaded.describe()["degenerate_parts"] == det.describe()["degenerate_parts"]
    assert warning[0] in loaded.predict(textures(2)[1]).warnings
    # distinct normals, full schedule: nothing degenerate, no warning
    healthy = create_detector("anople", backbone="tiny-test").fit(textures(2))
    assert healthy.describe()["degenerate_parts"] == []
    assert not [w for w in healthy.predict(image).warnings if w.startswith("AnoPLe: degenerate")]
    # k = 1: the memory map is not checked
    single = create_detector("anople", backbone="tiny-test").fit([image])
    assert math.isnan(single.module.health.memory_spread)


def test_collapsed_decoder_is_named(monkeypatch):
    """A decoder that outputs one value everywhere during the fit's health check is named."""
    det = create_detector("anople", backbone="tiny-test", steps=2)
    from detector.methods.anople import model as anople_model

    original = anople_model.AnoPLe.decode

    def collapsed(self, features, view, text_features=None):
        return torch.zeros_like(original(self, features, view, text_features)) + 1e-13

    monkeypatch.setattr(anople_model.AnoPLe, "decode", collapsed)
    det.fit(textures(2))
    assert det.describe()["degenerate_parts"] == ["decoder_map"]
    assert any("decoder_map" in w for w in det.predict(textures(3)[2]).warnings)
