"""Text features on disk (``detector.feature_cache``) and the end-token cut of the text tower."""

from __future__ import annotations

import pytest
import torch

from detector import feature_cache
from detector.backbone import load_backbone
from detector.methods.inctrl import model as inctrl_model
from detector.methods.inctrl import prompt_texts


def _normalised(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True)


@pytest.mark.parametrize("model_name", ["tiny-test", pytest.param("ViT-B-16-plus-240", marks=pytest.mark.slow)])
def test_end_token_cut_equals_the_full_text_pass(model_name):
    backbone = load_backbone(model_name, "random")
    normal, abnormal = prompt_texts("metal_nut")
    ids = backbone.tokenize(normal[:40] + abnormal[:40])
    assert int(ids.argmax(dim=-1).max()) + 1 < ids.shape[1] // 2  # the cut skips most positions
    with torch.no_grad():
        full = _normalised(backbone.model.encode_text(ids, normalize=False).float())
        cut = _normalised(backbone.encode_text_to_end(ids).float())
    assert float((full - cut).abs().max()) <= 1e-6


def test_text_features_round_trip_through_the_disk_cache(tmp_path, monkeypatch, tiny_backbone):
    monkeypatch.setenv("DETECTOR_CACHE_DIR", str(tmp_path))
    inctrl_model.text_prior_features.cache_clear()
    first = inctrl_model.text_prior_features(tiny_backbone, "cached_widget")
    entries = list(tmp_path.glob("*.safetensors"))
    assert len(entries) == 1 and not list(tmp_path.glob("*.tmp"))

    # A new process (empty memory cache) reads the file and encodes nothing.
    inctrl_model.text_prior_features.cache_clear()
    monkeypatch.setattr(inctrl_model, "encode_texts", lambda *a: pytest.fail("encoded although cached"))
    again = inctrl_model.text_prior_features(tiny_backbone, "cached_widget")
    torch.testing.assert_close(again, first, rtol=0, atol=0)
    # Another class name is another entry (and needs the encoder).
    inctrl_model.text_prior_features.cache_clear()
    with pytest.raises(pytest.fail.Exception):
        inctrl_model.text_prior_features(tiny_backbone, "another_widget")
    inctrl_model.text_prior_features.cache_clear()


@pytest.mark.parametrize("damage", ["truncated", "garbage", "other key"])
def test_a_bad_entry_is_ignored_and_rewritten(tmp_path, damage, tiny_backbone):
    key = feature_cache.entry_key(tiny_backbone, "test", ["a", "b"])
    good = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    assert torch.equal(feature_cache.load_or_compute(tmp_path, key, lambda: good), good)
    path = tmp_path / f"{key}.safetensors"
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[:-1])
    elif damage == "garbage":
        path.write_bytes(b"not a safetensors file")
    else:
        feature_cache.load_or_compute(tmp_path, "other", lambda: torch.ones(1))
        (tmp_path / "other.safetensors").replace(path)
    fresh = torch.full((2, 3), 7.0)
    assert torch.equal(feature_cache.load_or_compute(tmp_path, key, lambda: fresh), fresh)  # not the bad file
    assert torch.equal(feature_cache.load_or_compute(tmp_path, key, lambda: pytest.fail("recomputed")), fresh)


def test_the_key_follows_the_text_tower_weights_and_the_prompts(tiny_backbone):
    key = feature_cache.entry_key(tiny_backbone, "m", ["x"])
    assert key == feature_cache.entry_key(tiny_backbone, "m", ["x"])
    assert key != feature_cache.entry_key(tiny_backbone, "m", ["y"]) != feature_cache.entry_key(tiny_backbone, "n", ["x"])
    other = load_backbone("tiny-test", "random", image_size=96)  # same text tower, other vision input
    assert feature_cache.text_tower_fingerprint(other) == feature_cache.text_tower_fingerprint(tiny_backbone)


def test_cache_can_be_switched_off(monkeypatch):
    monkeypatch.setenv("DETECTOR_CACHE_DIR", "off")
    assert feature_cache.cache_dir() is None
    monkeypatch.delenv("DETECTOR_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", "/some/where")
    assert str(feature_cache.cache_dir()) == "/some/where/clip-anomaly-detector"
