from __future__ import annotations

import os
import pickle
import time

import pytest
import torch
import torch.nn.functional as F

from detector.errors import CheckpointError, WeightsUnavailableError
from detector.backbone import (
    clear_backbone_cache,
    load_backbone,
    resize_vision_input,
)
from detector.weights import resolve_default_weights as resolve_weights
from detector.checkpoints import check_keys, read_state_dict, save_safetensors, read_header


def _features(backbone, image):
    with torch.no_grad():
        out = backbone.intermediate_tokens(image, [2, 5])
        text = backbone.model.encode_text(backbone.tokenize(["a photo of a damaged object."]))
    return out, text


def test_tiny_test_builds_offline_quickly():
    load_backbone("tiny-test")  # warm imports
    clear_backbone_cache()
    start = time.perf_counter()
    backbone = load_backbone("tiny-test", "random")
    assert time.perf_counter() - start < 1.0
    assert backbone.is_random and "random" in backbone.weights_description
    assert backbone.grid_size == (8, 8) and backbone.num_vision_blocks == 6
    assert backbone.vision_width == 64 and backbone.embed_dim == 64
    assert not any(p.requires_grad for p in backbone.model.parameters())


def test_backbones_are_cached_and_random_init_is_reproducible():
    a = load_backbone("tiny-test", "random")
    assert load_backbone("tiny-test", "random") is a
    state = {k: v.clone() for k, v in a.model.state_dict().items()}
    clear_backbone_cache()
    b = load_backbone("tiny-test", "random")
    assert b is not a
    assert all(torch.equal(state[k], v) for k, v in b.model.state_dict().items())


def test_temperature_starts_where_released_checkpoints_hold_it(tmp_path):
    """A random build and a weights file without ``logit_scale`` score at tau = 100; a file
    with its own ``logit_scale`` keeps it."""
    random = load_backbone("tiny-test", "random")
    assert random.model.logit_scale.exp().item() == pytest.approx(100.0)
    state = dict(random.model.state_dict())
    state.pop("logit_scale")
    without = load_backbone("tiny-test", str(save_safetensors(tmp_path / "no-scale.safetensors", state, {})))
    assert without.model.logit_scale.exp().item() == pytest.approx(100.0)
    state["logit_scale"] = torch.tensor(2.0)
    own = load_backbone("tiny-test", str(save_safetensors(tmp_path / "own-scale.safetensors", state, {})))
    assert own.model.logit_scale.item() == pytest.approx(2.0)


def test_intermediate_tokens_shapes(tiny_backbone):
    images = torch.randn(2, 3, 64, 64)
    out = tiny_backbone.intermediate_tokens(images, [3, 4, 5])
    assert [tuple(t.shape) for t in out["patch_tokens"]] == [(2, 64, 64)] * 3
    assert [tuple(t.shape) for t in out["cls_tokens"]] == [(2, 1, 64)] * 3
    assert tuple(out["image_features"].shape) == (2, 64)
    with torch.no_grad():
        reference = tiny_backbone.model.encode_image(images)
    torch.testing.assert_close(out["image_features"], reference, rtol=0, atol=1e-5)


def test_block_index_mapping(tiny_backbone):
    assert [tiny_backbone.map_block_index(i, 12) for i in (6, 8, 10)] == [3, 4, 5]
    assert tiny_backbone.map_block_index(23, 24) == 5


@pytest.mark.parametrize("layout", ["safetensors", "pt", "bin-nested-module", "openai-with-meta"])
def test_weights_file_round_trip_gives_identical_outputs(tmp_path, layout):
    source = load_backbone("tiny-test", "random")
    # Perturb so a file load is distinguishable from the random init.
    state = {k: v + 0.01 * torch.randn_like(v) if v.is_floating_point() else v for k, v in source.model.state_dict().items()}
    if layout == "safetensors":
        path = save_safetensors(tmp_path / "w.safetensors", state, {})
    elif layout == "pt":
        path = tmp_path / "w.pt"
        torch.save(state, path)
    elif layout == "bin-nested-module":
        path = tmp_path / "w.bin"
        torch.save({"state_dict": {"module." + k: v for k, v in state.items()}, "epoch": 3}, path)
    else:
        path = tmp_path / "w.pth"
        openai = dict(state)
        openai.update(input_resolution=torch.tensor(64), context_length=torch.tensor(77), vocab_size=torch.tensor(49408))
        torch.save(openai, path)
    loaded = load_backbone("tiny-test", str(path))
    assert not loaded.is_random and "file" in loaded.weights_description
    for key, value in loaded.model.state_dict().items():
        torch.testing.assert_close(value, state[key], rtol=0, atol=0)
    image = torch.randn(1, 3, 64, 64)
    reference = load_backbone("tiny-test", str(save_safetensors(tmp_path / "ref.safetensors", state, {})))
    (out_a, text_a), (out_b, text_b) = _features(loaded, image), _features(reference, image)
    torch.testing.assert_close(out_a["image_features"], out_b["image_features"], rtol=0, atol=0)
    torch.testing.assert_close(text_a, text_b, rtol=0, atol=0)


def test_weights_file_that_does_not_fit_names_the_keys(tmp_path):
    state = dict(load_backbone("tiny-test", "random").model.state_dict())
    state.pop("ln_final.weight")
    state["visual.proj"] = torch.zeros(3, 3)
    state["extra.thing"] = torch.zeros(1)
    path = tmp_path / "bad.pt"
    torch.save(state, path)
    with pytest.raises(CheckpointError) as info:
        load_backbone("tiny-test", str(path))
    message = str(info.value)
    assert "ln_final.weight" in message and "extra.thing" in message and "visual.proj" in message


def test_missing_weights_file_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_backbone("tiny-test", str(tmp_path / "nope.safetensors"))


def test_unknown_tag_lists_known_tags():
    with pytest.raises(ValueError, match="openai"):
        load_backbone("ViT-B-16", "no-such-tag")


def test_pretrained_tag_offline_fails_fast(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    start = time.perf_counter()
    with pytest.raises(WeightsUnavailableError) as info:
        load_backbone("ViT-B-16-plus-240", "laion400m_e32")
    assert time.perf_counter() - start < 5.0
    assert "backbone_weights" in str(info.value) and "cache" in str(info.value)


def test_pretrained_tag_is_read_from_the_hugging_face_cache(tmp_path, monkeypatch):
    """A file placed in the hub cache layout is found offline by the tag."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    source = load_backbone("tiny-test", "random")
    repo = cache / "models--timm--vit_base_patch16_plus_clip_240.laion400m_e31"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    snap = repo / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    save_safetensors(snap / "open_clip_model.safetensors", source.model.state_dict(), {})
    from detector import weights as weights_module

    found = weights_module.weights_file("ViT-B-16-plus-240", "laion400m_e32")
    assert found.resolve() == (snap / "open_clip_model.safetensors").resolve()


def test_resize_uses_bilinear_without_antialias(tiny_backbone):
    resized = load_backbone("tiny-test", "random", image_size=96)
    assert resized.grid_size == (12, 12) and resized.image_size == 96
    original = tiny_backbone.model.visual.positional_embedding
    grid = original[1:].reshape(1, 8, 8, -1).permute(0, 3, 1, 2)
    expected = F.interpolate(grid, size=(12, 12), mode="bilinear", align_corners=False)
    expected = expected.permute(0, 2, 3, 1).reshape(144, -1)
    new = resized.model.visual.positional_embedding
    torch.testing.assert_close(new[1:], expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(new[:1], original[:1], rtol=0, atol=0)
    bicubic = F.interpolate(grid, size=(12, 12), mode="bicubic", align_corners=False, antialias=True)
    assert (bicubic.permute(0, 2, 3, 1).reshape(144, -1) - expected).abs().max() > 1e-4
    out = resized.intermediate_tokens(torch.randn(1, 3, 96, 96), [5])
    assert tuple(out["patch_tokens"][0].shape) == (1, 144, 64)
    # The shared 64-px backbone is untouched.
    assert tiny_backbone.grid_size == (8, 8)


def test_resolve_weights_defaults():
    assert resolve_weights("tiny-test", None, default_model="ViT-B-16", default_weights="openai") == "random"
    assert resolve_weights("ViT-B-16", None, default_model="ViT-B-16", default_weights="openai") == "openai"
    assert resolve_weights("ViT-B-16", "x.pt", default_model="ViT-B-16", default_weights="openai") == "x.pt"
    with pytest.raises(ValueError, match="backbone_weights"):
        resolve_weights("ViT-B-16-plus-240", None, default_model="ViT-B-16", default_weights="openai")


class _Boom:
    def __reduce__(self):
        return (os.system, ("touch /tmp/detector-pwned-marker",))


def test_malicious_pickle_is_refused_without_running(tmp_path):
    marker = "/tmp/detector-pwned-marker"
    if os.path.exists(marker):
        os.remove(marker)
    path = tmp_path / "evil.pt"
    with open(path, "wb") as handle:
        pickle.dump({"weight": _Boom()}, handle)
    with pytest.raises(CheckpointError):
        read_state_dict(path)
    torch.save({"weight": _Boom()}, tmp_path / "evil2.pt")
    with pytest.raises(CheckpointError):
        read_state_dict(tmp_path / "evil2.pt")
    assert not os.path.exists(marker)


def test_check_keys_and_header(tmp_path):
    with pytest.raises(CheckpointError, match="missing keys"):
        check_keys({"a": torch.zeros(1)}, {"a": (1,), "b": (2,)}, what="x")
    check_keys({"a": torch.zeros(1)}, {"a": (1,), "b": (2,)}, what="x", optional=["b"])
    path = save_safetensors(tmp_path / "h.safetensors", {"a": torch.ones(2)}, {"method": "inctrl", "shots": 4})
    assert read_header(path) == {"method": "inctrl", "shots": 4}
    assert read_state_dict(path)["a"].tolist() == [1.0, 1.0]


def test_torchscript_archive_state_dict_is_read(tmp_path):
    module = torch.jit.script(torch.nn.Linear(3, 2))
    path = tmp_path / "scripted.pt"
    module.save(str(path))
    state = read_state_dict(path)
    assert set(state) == {"weight", "bias"}


def test_garbage_file_is_a_checkpoint_error(tmp_path):
    path = tmp_path / "garbage.pth"
    path.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError):
        read_state_dict(path)
