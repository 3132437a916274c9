"""AnoPLe's parts on the tiny random CLIP: encoder loops, prompt mechanics, coupling,
pseudo anomalies (docs/anople.md §7, T2-T6, T9, T10)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from detector.backbone import load_backbone
from detector.methods.anople import anomalies
from detector.methods.anople.config import block_layout, preset_config, scale_block
from detector.methods.anople.encoders import PromptedCLIP
from detector.methods.anople.model import AnoPLe, prompt_texts




def build_module(backbone, preset: str = "fast", seed: int = 0, **overrides) -> AnoPLe:
    config = preset_config(preset, **overrides)
    clip = PromptedCLIP(backbone.model)
    token_ids = backbone.tokenize(prompt_texts("object", config.n_text))
    context_ids = backbone.tokenize(["a photo of a"])[0]
    return AnoPLe(clip, token_ids, context_ids, config, torch.Generator().manual_seed(seed))


def random_images(backbone, count: int = 2, seed: int = 0) -> torch.Tensor:
    size = backbone.image_size
    return torch.randn((count, 3, size, size), generator=torch.Generator().manual_seed(seed))


def perturbed(prompts: dict[int, torch.Tensor], seed: int = 1, scale: float = 0.5) -> dict[int, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {j: p.detach() + scale * torch.randn(p.shape, generator=gen) for j, p in prompts.items()}


# ----------------------------------------------------------------------------- layout
def test_layer_indices_are_fractions_of_depth(tiny_backbone):
    assert [scale_block(i, 6) for i in (6, 9, 10, 11, 12)] == [3, 5, 5, 6, 6]
    assert [scale_block(i, 12) for i in (6, 9, 12)] == [6, 9, 12]
    fast = block_layout(preset_config("fast"), 12, 12)
    assert fast.visual_blocks == (12,) and fast.text_blocks == tuple(range(1, 13)) and fast.coupled == ((12, 12),)
    assert fast.boundary == 11 and fast.latent_block == 11
    assert fast.decoder_levels == (6, 9, 12) and fast.memory_levels == (6, 9)
    # on a 6-block tower the latent anomalies stay on the cached tokens, before block 6
    tiny = block_layout(preset_config("fast"), 6, 6)
    assert tiny.visual_blocks == (6,) and tiny.latent_block == 5 and tiny.boundary == 5
    faithful = block_layout(preset_config("faithful"), 12, 12)
    assert faithful.visual_blocks == tuple(range(1, 10)) and faithful.boundary == 0 and faithful.latent_block == 10
    assert faithful.coupled == tuple((j, j) for j in range(1, 10))
    text_only = block_layout(preset_config("text_only"), 12, 12)
    assert text_only.visual_blocks == () and text_only.coupled == () and text_only.boundary == 11


# ----------------------------------------------------------------------------- T2
def _check_encoders_equal_open_clip(backbone, images, texts):
    clip = PromptedCLIP(backbone.model)
    with torch.no_grad():
        final, _ = clip.forward_vision(images)
        ours_image = clip.pool_image(final)
        ref_image = backbone.model.encode_image(images)
        ids = backbone.tokenize(texts)
        ours_text = clip.encode_text_prompted(ids, {})
        ref_text = backbone.model.encode_text(ids)
    assert torch.allclose(ours_image, ref_image, atol=1e-5, rtol=0)
    assert torch.allclose(ours_text, ref_text, atol=1e-5, rtol=0)


def test_t2_unprompted_loops_equal_open_clip(tiny_backbone):
    _check_encoders_equal_open_clip(
        tiny_backbone, random_images(tiny_backbone), ["a photo of a normal object.", "a scratched metal nut with a dent"]
    )


@pytest.mark.slow
def test_t2_unprompted_loops_equal_open_clip_vit_b16():
    backbone = load_backbone("ViT-B-16", "random")
    _check_encoders_equal_open_clip(backbone, random_images(backbone), ["a photo of a normal object.", "anomalous bottle"])


# ----------------------------------------------------------------------------- T3
def test_t3_truncated_text_equals_full_sequence(tiny_backbone):
    module = build_module(tiny_backbone, "fast")
    text_prompts, _ = module.effective_prompts()
    text_prompts = perturbed(text_prompts)
    with torch.no_grad():
        cut = module.encode_text(text_prompts, truncate=True)
        full = module.encode_text(text_prompts, truncate=False)
    assert len(text_prompts) == tiny_backbone.num_text_blocks  # deep prompts at every block
    assert torch.allclose(cut, full, atol=1e-5, rtol=0)
    # the cut is real: the EOT sits well before position 77
    assert int(module.token_ids.argmax(dim=-1).max()) + 1 < 20


# ----------------------------------------------------------------------------- T4
def test_t4_prefix_cache_plus_suffix_equals_full_forward(tiny_backbone):
    module = build_module(tiny_backbone, "fast")
    layout = module.layout
    images = random_images(tiny_backbone, 3)
    _, visual = module.effective_prompts()
    visual = perturbed(visual)
    with torch.no_grad():
        full = module.encode_views(images, visual_prompts=visual)
        wanted = set(layout.decoder_levels) | set(layout.memory_levels)
        tokens, kept = module.clip.encode_prefix(images, layout.boundary, keep=[l for l in wanted if l < layout.boundary])
        cached = module.encode_views(
            visual_prompts=visual, cached_tokens=tokens, cached_levels={l: t[:, 1:] for l, t in kept.items()}
        )
        # raw block outputs of the prompted suffix as well
        _, full_levels = module.clip.forward_vision(images, visual_prompts=visual, keep=range(1, 7))
        _, suffix_levels = module.clip.forward_vision(
            cached_tokens=tokens, start_block=layout.boundary + 1, visual_prompts=visual, keep=range(1, 7)
        )
    assert layout.boundary == 5 and layout.visual_blocks == (6,)
    assert torch.allclose(full.image, cached.image, atol=1e-5, rtol=0)
    for level in layout.decoder_levels:
        assert torch.allclose(full.patches[level], cached.patches[level], atol=1e-5, rtol=0)
    for level in layout.memory_levels:
        assert torch.allclose(full.memory[level], cached.memory[level], atol=1e-5, rtol=0)
    assert torch.allclose(full_levels[6], suffix_levels[6], atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- T5
class Recorder(torch.nn.Module):
    """Wraps one block and records the sequence length it receives."""

    def __init__(self, block, lengths):
        super().__init__()
        self.block, self.lengths = block, lengths

    def forward(self, x, attn_mask=None):
        self.lengths.append(x.shape[1])
        return self.block(x, attn_mask=attn_mask)


def test_t5_prompts_replace_and_each_block_prompt_matters(tiny_backbone):
    module = build_module(tiny_backbone, "faithful")
    layout = module.layout
    n_patches = module.clip.num_patches
    vision_lengths, text_lengths = [], []
    module.clip.vision_blocks = [Recorder(b, vision_lengths) for b in module.clip.vision_blocks]
    module.clip.text_blocks = [Recorder(b, text_lengths) for b in module.clip.text_blocks]
    images = random_images(tiny_backbone, 2)
    text, visual = module.effective_prompts()
    with torch.no_grad():
        base_image = module.encode_views(images, visual_prompts=visual).image
        base_text = module.encode_text(text)
    assert layout.visual_blocks == (1, 2, 3, 4, 5) and layout.text_blocks == (1, 2, 3, 4, 5)
    assert vision_lengths == [1 + n_patches + module.config.n_visual] * tiny_backbone.num_vision_blocks
    assert len(set(text_lengths)) == 1 and len(text_lengths) == tiny_backbone.num_text_blocks
    for j in layout.visual_blocks:
        changed = dict(visual)
        changed[j] = visual[j] + 0.5 * torch.randn(visual[j].shape, generator=torch.Generator().manual_seed(j))
        with torch.no_grad():
            image = module.encode_views(images, visual_prompts=changed).image
        assert (image - base_image).abs().max() > 1e-5, f"visual prompt of block {j} has no effect"
    for j in layout.text_blocks:
        changed = dict(text)
        changed[j] = text[j] + 0.5 * torch.randn(text[j].shape, generator=torch.Generator().manual_seed(j))
        with torch.no_grad():
            features = module.encode_text(changed)
        assert (features - base_text).abs().max() > 1e-5, f"text prompt of block {j} has no effect"


@pytest.mark.parametrize("preset", ["fast", "faithful"])
def test_t5_one_backward_pass_reaches_every_trainable_tensor(tiny_backbone, preset):
    from detector.methods.anople.losses import anople_loss

    module = build_module(tiny_backbone, preset)
    images = random_images(tiny_backbone, 4)
    text, visual = module.effective_prompts()
    text_features = module.encode_text(text)
    features = module.encode_views(images, visual_prompts=visual)
    patch_logits = module.decode_logits(features, torch.tensor([0, 1, 0, 1]), text_features)
    targets = torch.rand((4, module.clip.num_patches), generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 1, 1, 0])
    anople_loss(module.global_logits(features, text_features), labels, patch_logits, targets).total.backward()
    names = [name for name, _ in module.named_parameters()]
    assert any("text_to_visual" in n for n in names) and any("visual_to_text" in n for n in names)
    for name, param in module.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    assert not any(p.grad is not None for p in tiny_backbone.model.parameters())


# ----------------------------------------------------------------------------- T6
def _features_after(module, images, *, text_delta=None, visual_delta=None):
    with torch.no_grad():
        for name, param in module.learner.text_prompts.items():
            if text_delta is not None and int(name) == text_delta:
                param.add_(0.5 * torch.randn(param.shape, generator=torch.Generator().manual_seed(7)))
        for name, param in module.learner.visual_prompts.items():
            if visual_delta is not None and int(name) == visual_delta:
                param.add_(0.5 * torch.randn(param.shape, generator=torch.Generator().manual_seed(8)))
        text, visual = module.effective_prompts()
        return module.encode_text(text), module.encode_views(images, visual_prompts=visual).image


def test_t6_coupling_is_bidirectional(tiny_backbone):
    images = random_images(tiny_backbone, 2)
    module = build_module(tiny_backbone, "fast")
    (jt, jv), = module.layout.coupled
    base_text, base_image = _features_after(module, images)
    text_after_v, image_after_v = _features_after(module, images, visual_delta=jv)
    assert (text_after_v - base_text).abs().max() > 1e-5  # vision -> text
    module = build_module(tiny_backbone, "fast")
    text_after_t, image_after_t = _features_after(module, images, text_delta=jt)
    assert (image_after_t - base_image).abs().max() > 1e-5  # text -> vision

    uncoupled = build_module(tiny_backbone, "fast", coupling="none")
    assert uncoupled.layout.coupled == ()
    text0, image0 = _features_after(uncoupled, images)
    text1, image1 = _features_after(uncoupled, images, visual_delta=jv)
    assert torch.equal(text0, text1)
    assert (image1 - image0).abs().max() > 1e-5


# ----------------------------------------------------------------------------- T9
def test_t9_pixel_pseudo_anomalies():
    rng = np.random.default_rng(3)
    view = rng.integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
    normals = [rng.integers(0, 256, size=(90, 70, 3), dtype=np.uint8)]
    betas = []
    for seed in range(12):
        image, mask, targets, beta = anomalies.pixel_anomaly(view, normals, 8, np.random.default_rng(seed))
        betas.append(beta)
        assert mask.any() and set(np.unique(mask)) <= {0.0, 1.0}
        outside = mask == 0
        assert np.array_equal(image[outside], view[outside])
        assert (image[~outside] != view[~outside]).any()
        assert 0.0 <= beta <= 0.8
        expected = mask.reshape(8, 8, 8, 8).mean(axis=(1, 3))
        np.testing.assert_array_equal(targets, expected)
        again = anomalies.pixel_anomaly(view, normals, 8, np.random.default_rng(seed))
        assert np.array_equal(again[0], image) and np.array_equal(again[1], mask) and again[3] == beta
    assert len(set(betas)) > 1
    with pytest.raises(ValueError):
        anomalies.draem_blend(view, view, np.ones((64, 64), np.float32), 0.9)


def test_perlin_mask_is_never_empty_and_blend_formula():
    rng = np.random.default_rng(0)
    for _ in range(20):
        assert anomalies.perlin_mask(64, rng).any()
    x = np.full((4, 4, 3), 100, np.uint8)
    src = np.full((4, 4, 3), 200, np.uint8)
    m = np.zeros((4, 4), np.float32)
    m[1:3, 1:3] = 1
    out = anomalies.draem_blend(x, src, m, 0.25)
    assert out[0, 0, 0] == 100 and out[1, 1, 0] == round(0.75 * 200 + 0.25 * 100)


# ----------------------------------------------------------------------------- T10
def test_t10_latent_anomalies_change_only_masked_tokens():
    gen = torch.Generator().manual_seed(0)
    batch, n, width = 3, 64, 32
    tokens = torch.randn((batch, 1 + n, width), generator=gen)
    std = torch.linspace(0.5, 2.0, width)
    rng = np.random.default_rng(1)
    mask = torch.from_numpy(np.stack([anomalies.latent_patch_mask(8, 64, rng).reshape(-1) for _ in range(batch)]))
    assert mask.any(dim=1).all()
    out = anomalies.latent_noise(tokens, mask, std, 0.5, gen)
    assert torch.equal(out[:, 0], tokens[:, 0])
    patches_in, patches_out = tokens[:, 1:], out[:, 1:]
    assert torch.equal(patches_out[~mask], patches_in[~mask])
    assert (patches_out[mask] != patches_in[mask]).all(dim=-1).all()
    # noise std per channel ~ sigma * s over many draws
    many = torch.zeros((400, 1 + n, width))
    full = torch.ones((400, n), dtype=torch.bool)
    noise = anomalies.latent_noise(many, full, std, 0.5, gen)[:, 1:].reshape(-1, width)
    ratio = noise.std(dim=0) / (0.5 * std)
    assert ((ratio > 0.8) & (ratio < 1.2)).all()
