"""FAPrompt on the tiny random backbone (96 px, so the positional embedding is resized),
plus one slow check on the real ViT-L-14-336 architecture at random init."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from detector import create_detector
from detector.errors import CheckpointError
from detector.backbone import load_backbone
from detector import synthetic
from detector.methods import faprompt as fp

TINY = "tiny-test"




@pytest.fixture(scope="module")
def tiny96():
    return load_backbone(TINY, "random", image_size=96, quick_gelu=True)


@pytest.fixture(scope="module")
def learned_file(tmp_path_factory, tiny96):
    """A random prompt learner for tiny-test in the official file layout."""
    learner = fp.FAPromptLearner.for_backbone(tiny96).initialize(tiny96, seed=3)
    with torch.no_grad():
        # larger than the official N(0, 0.02) so that every part visibly matters on a random model
        learner.ctx_pos.mul_(50)
        learner.ctx_neg.mul_(50)
        for tokens in learner.compound_prompts_text:
            tokens.mul_(50)
        learner.patch_meta_net.linear2.weight.mul_(50)
    path = tmp_path_factory.mktemp("faprompt") / "epoch_1.pth"
    torch.save({"prompt_learner": learner.state_dict()}, path)
    return path


@pytest.fixture(scope="module")
def queries():
    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, size=(60, 90, 3), dtype=np.uint8)
    other = rng.integers(0, 255, size=(80, 50, 3), dtype=np.uint8)
    return base, other


def test_input_size_follows_backbone():
    assert fp.method_image_size("ViT-L-14-336") == 518
    assert fp.method_image_size(TINY) == 96  # round(64 * 518 / 336 / 8) * 8
    assert fp.vv_start_block(24) == 5 and fp.vv_start_block(6) == 1
    assert fp.num_deep_prompts(12) == 8 and fp.num_deep_prompts(6) == 4


def test_positional_embedding_resized_bilinear_not_bicubic(tiny96):
    stored = load_backbone(TINY, "random").visual.positional_embedding.detach()
    grid = stored[1:].reshape(1, 8, 8, -1).permute(0, 3, 1, 2)

    def resized(mode):
        out = F.interpolate(grid, size=(12, 12), mode=mode, align_corners=False)
        return out.permute(0, 2, 3, 1).reshape(144, -1)

    ours = tiny96.visual.positional_embedding.detach()
    assert ours.shape == (145, stored.shape[1])
    torch.testing.assert_close(ours[0], stored[0])
    torch.testing.assert_close(ours[1:], resized("bilinear"), rtol=0, atol=1e-6)
    assert (ours[1:] - resized("bicubic")).abs().max() > 1e-3
    det = create_detector("faprompt", backbone=TINY)
    assert det.backbone.visual.positional_embedding is tiny96.visual.positional_embedding


def _manual_attention(q, k, v):
    return ((q @ k.transpose(-1, -2)) / q.shape[-1] ** 0.5).softmax(-1) @ v


def _reference_vision(visual, images, vv_start):
    """Written out block by block with explicit q/k/v (official DPAM semantics)."""
    x = visual.conv1(images).flatten(2).transpose(1, 2)
    x = torch.cat([visual.class_embedding.expand(x.shape[0], 1, -1), x], 1) + visual.positional_embedding
    x = visual.ln_pre(x)
    blocks = visual.transformer.resblocks
    for block in blocks[:vv_start]:
        x = block(x)
    x_ori = x_vv = x
    for block in blocks[vv_start:]:
        heads = block.attn.num_heads
        h = block.ln_1(x_ori)
        b, n, c = h.shape
        q, k, v = [
            t.reshape(b, n, heads, c // heads).transpose(1, 2)
            for t in (h @ block.attn.in_proj_weight.T + block.attn.in_proj_bias).chunk(3, dim=-1)
        ]
        std = _manual_attention(q, k, v).transpose(1, 2).reshape(b, n, c)
        vv = _manual_attention(v, v, v).transpose(1, 2).reshape(b, n, c)
        x_vv = x_vv + block.attn.out_proj(vv)  # no MLP on the V-V path
        x_ori = x_ori + block.attn.out_proj(std)
        x_ori = x_ori + block.mlp(block.ln_2(x_ori))
    return x_ori, x_vv


def test_vv_path_matches_hand_written_reference(tiny96):
    torch.manual_seed(0)
    images = torch.randn(2, 3, 96, 96)
    encoder = fp.DualPathVisionEncoder(tiny96.visual, fp.vv_start_block(tiny96.num_vision_blocks))
    assert encoder.vv_start == 1
    with torch.no_grad():
        global_features, patches = encoder(images)
        x_ori, x_vv = _reference_vision(tiny96.visual, images, 1)
        # one block by hand: dual attention of the first V-V block
        block = tiny96.visual.transformer.resblocks[1]
        h = tiny96.visual.transformer.resblocks[0](encoder.embed(images))
        std, vv = fp.dual_attention(block, block.ln_1(h))
        heads = block.attn.num_heads
        _, _, v = (block.ln_1(h) @ block.attn.in_proj_weight.T + block.attn.in_proj_bias).chunk(3, dim=-1)
        v = v.reshape(2, 145, heads, -1).transpose(1, 2)
        vv_ref = block.attn.out_proj(_manual_attention(v, v, v).transpose(1, 2).reshape(2, 145, -1))
        std_ref = block.attn(block.ln_1(h), block.ln_1(h), block.ln_1(h), need_weights=False)[0]
    torch.testing.assert_close(vv, vv_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(std, std_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(patches, tiny96.visual.ln_post(x_vv) @ tiny96.visual.proj, rtol=1e-4, atol=1e-5)
    # the global feature is the CLIP path's CLS @ proj WITHOUT ln_post (official quirk)
    torch.testing.assert_close(global_features, x_ori[:, 0] @ tiny96.visual.proj, rtol=1e-4, atol=1e-5)
    with_ln_post = tiny96.visual.ln_post(x_ori[:, 0]) @ tiny96.visual.proj
    assert (F.normalize(global_features, dim=-1) - F.normalize(with_ln_post, dim=-1)).abs().max() > 1e-3
    # the V-V path differs from plain CLIP patch tokens
    plain = tiny96.visual.ln_post(x_ori) @ tiny96.visual.proj
    assert (patches - plain).abs().max() > 1e-3


def _reference_text(clip, embeddings, eot, deep, round_fp16):
    """Full 77-token text forward with deep prompts at positions 1..n of blocks 1..len(deep)."""
    x = embeddings + clip.positional_embedding
    for i, block in enumerate(clip.transformer.resblocks):
        if 1 <= i <= len(deep):
            tokens = deep[i - 1].half().float() if round_fp16 else deep[i - 1]
            x = torch.cat([x[:, :1], tokens.expand(x.shape[0], -1, -1), x[:, 1 + tokens.shape[0]:]], 1)
        x = block(x, attn_mask=clip.attn_mask)
    x = clip.ln_final(x)
    return x[torch.arange(x.shape[0]), eot] @ clip.text_projection


def test_text_encoder_deep_prompts_fp16_and_eot_cut(tiny96, learned_file):
    learner = fp.FAPromptLearner.for_backbone(tiny96)
    fp.load_learner_state(learner, learned_file, what="test")
    deep = [p.detach() + 1e-4 for p in learner.compound_prompts_text]  # values fp16 cannot hold
    assert any((d - d.half().float()).abs().max() > 0 for d in deep)
    encoder = fp.PromptTextEncoder(tiny96.model)
    embeddings = learner.abnormal_embeddings().detach()
    _, eot = learner.eot_positions()
    assert eot.tolist() == [11] * 10
    with torch.no_grad():
        ours = encoder(embeddings, eot, deep)
        rounded = _reference_text(tiny96.model, embeddings, eot, deep, round_fp16=True)
        unrounded = _reference_text(tiny96.model, embeddings, eot, deep, round_fp16=False)
    torch.testing.assert_close(ours, rounded, rtol=1e-4, atol=1e-5)  # cut at EOT = full length
    assert (ours - unrounded).abs().max() > 1e-6
    assert len(deep) == 4  # text blocks 1..4 of 6 (blocks 1..8 of 12 mapped by depth)


def test_official_key_layout_loads_strictly(tiny96, learned_file):
    state = torch.load(learned_file, weights_only=True)["prompt_learner"]
    width, embed = tiny96.text_width, tiny96.embed_dim
    expected = {
        "ctx_pos": (1, 1, 5, width),
        "ctx_neg": (1, 10, 2, width),
        "token_prefix_pos": (1, 1, 1, width),
        "token_suffix_pos": (1, 1, 71, width),
        "token_prefix_neg": (1, 10, 1, width),
        "token_suffix_neg": (1, 10, 69, width),
        "tokenized_prompts_pos": (1, 1, 77),
        "tokenized_prompts_neg": (1, 10, 77),
        "patch_meta_net.linear1.weight": (10 * embed // 16, 10 * embed),
        "patch_meta_net.linear1.bias": (10 * embed // 16,),
        "patch_meta_net.linear2.weight": (width, 10 * embed // 16),
        "patch_meta_net.linear2.bias": (width,),
    }
    for j in range(4):
        expected[f"compound_prompts_text.{j}"] = (4, width)
        expected[f"compound_prompt_projections.{j}.weight"] = (896, width)
        expected[f"compound_prompt_projections.{j}.bias"] = (896,)
    assert {k: tuple(v.shape) for k, v in state.items()} == expected  # 24 keys: 36 on ViT-L
    assert state["tokenized_prompts_neg"].dtype == torch.int32
    det = create_detector("faprompt", backbone=TINY, checkpoint=str(learned_file))
    info = det.describe()
    assert info["trained"] is True and info["mode"] == "learned" and info["deep_prompts"] == 4
    loaded = det.model.learner.state_dict()
    for key, value in state.items():
        assert torch.equal(loaded[key].cpu(), value), key


def test_wrong_checkpoints_raise(tmp_path, learned_file):
    state = torch.load(learned_file, weights_only=True)["prompt_learner"]
    missing = {k: v for k, v in state.items() if k != "ctx_neg"}
    torch.save({"prompt_learner": missing}, tmp_path / "missing.pth")
    with pytest.raises(CheckpointError, match="ctx_neg"):
        create_detector("faprompt", backbone=TINY, checkpoint=str(tmp_path / "missing.pth"))
    wrong = dict(state, ctx_pos=torch.zeros(1, 1, 5, 768))
    torch.save({"prompt_learner": wrong}, tmp_path / "shape.pth")
    with pytest.raises(CheckpointError, match="ctx_pos"):
        create_detector("faprompt", backbone=TINY, checkpoint=str(tmp_path / "shape.pth"))
    from detector.checkpoints import save_safetensors

    save_safetensors(tmp_path / "anople.safetensors", state, {"method": "anople"})
    with pytest.raises(CheckpointError, match="anople"):
        create_detector("faprompt", backbone=TINY, checkpoint=str(tmp_path / "anople.safetensors"))
    other_method = {"adapter.fc.0.weight": torch.zeros(4, 4), "diff_head.fc.weight": torch.zeros(1, 4)}
    torch.save(other_method, tmp_path / "inctrl.pth")
    with pytest.raises(CheckpointError, match="unexpected keys.*adapter.fc.0.weight"):
        create_detector("faprompt", backbone=TINY, checkpoint=str(tmp_path / "inctrl.pth"))


def test_training_free_words_mode(queries):
    det = create_detector("faprompt", backbone=TINY)
    info = det.describe()
    assert info["trained"] is False and info["mode"] == "training-free" and info["image_size"] == 96
    tokenizer = det.backbone.tokenizer
    comma = tokenizer([","])[0][1].item()
    assert det.word_ids["abnormal"][0] == [tokenizer(["scratch"])[0][1].item(), comma]  # padded
    assert det.word_ids["abnormal"][9] == tokenizer(["discoloration"])[0][1:3].tolist()  # cut
    assert det.word_ids["abnormal"][6] == tokenizer(["missing part"])[0][1:3].tolist()
    assert len(det.word_ids["normal"]) == 5
    for query in queries:
        result = det.predict(query)
        assert result.anomaly_map.shape == query.shape[:2]
        assert result.raw_map.shape == (12, 12)
        assert np.isfinite(result.anomaly_map).all() and np.isfinite(result.score)
        assert 0.0 <= result.score <= 1.0
        # no prior in word mode: pass 2 equals pass 1
        assert result.extras["max_patch_prob_pass1"] == result.extras["max_patch_prob_pass2"]
    with pytest.raises(ValueError, match="checkpoint"):
        create_detector("faprompt", backbone=TINY, prompts="learned")
    with pytest.raises(TypeError):
        create_detector("faprompt", backbone=TINY, bogus=1)


def test_prior_first_ten_patches_and_topk(learned_file, queries):
    torch.manual_seed(1)
    patches = F.normalize(torch.randn(2, 145, 64), dim=-1)
    probs = torch.rand(2, 145, 2)
    first = fp.select_prior_tokens(patches, probs, "first")
    assert torch.equal(first, patches[:, 1:11])  # tokens 0..9 of the grid, CLS excluded
    top = fp.select_prior_tokens(patches, probs, "topk")
    index = probs[:, 1:, 1].topk(10, dim=1).indices
    assert torch.equal(top[1], patches[1, 1:][index[1]])
    a = create_detector("faprompt", backbone=TINY, checkpoint=str(learned_file))
    b = create_detector("faprompt", backbone=TINY, checkpoint=str(learned_file), prior_patches="topk")
    ra, rb = a.predict(queries[0]), b.predict(queries[0])
    assert ra.extras["max_patch_prob_pass1"] == pytest.approx(rb.extras["max_patch_prob_pass1"], abs=1e-7)
    assert abs(ra.score - rb.score) > 1e-6 or np.abs(ra.raw_map - rb.raw_map).max() > 1e-6


def test_learned_scoring_formula(learned_file, queries):
    det = create_detector("faprompt", backbone=TINY, checkpoint=str(learned_file))
    result = det.predict(queries[0])
    ex = result.extras
    m = (2 * ex["max_patch_prob_pass1"] + ex["max_patch_prob_pass2"]) / 3
    assert result.score == pytest.approx(0.5 * (ex["text_prob"] + m), abs=1e-6)
    assert ex["max_patch_prob_pass1"] != ex["max_patch_prob_pass2"]  # the prior changes pass 2
    from detector import maps
    from detector.geometry import input_geometry

    geometry = input_geometry(60, 90, 96, "squash")
    np.testing.assert_allclose(result.anomaly_map, maps.upsample_map(result.raw_map, geometry, sigma=10.0), atol=1e-6)


def test_text_features_computed_once(learned_file, queries):
    det = create_detector("faprompt", backbone=TINY, checkpoint=str(learned_file))
    counter = det.model.text
    before = counter.calls
    det.predict(queries[0])
    state = det._text_state
    det.predict(queries[1])
    det.predict(queries[0])
    assert det._text_state is state
    # pass 1 (normal + abnormal prompts) once, then one abnormal-prompt pass per query
    assert counter.calls - before == 2 + 3
    words = create_detector("faprompt", backbone=TINY)
    words.predict(queries[0])
    words.predict(queries[1])
    assert words.model.text.calls == 2


def test_normals_do_not_change_results(learned_file, queries):
    normal, other = queries
    plain = create_detector("faprompt", backbone=TINY, checkpoint=str(learned_file))
    fitted = create_detector("faprompt", backbone=TINY, checkpoint=str(learned_file)).fit([normal, other])
    a, b = plain.predict(normal), fitted.predict(normal)
    assert a.score == b.score
    np.testing.assert_array_equal(a.anomaly_map, b.anomaly_map)
    loo = fitted.leave_one_out()
    assert len(loo) == 2 and loo[0][0] == a.score
    assert plain.leave_one_out() is None
    calibration = fitted.calibrate()
    assert "leave-one-out" in calibration.source



def test_detectors_of_one_file_share_its_prompt_learner(tmp_path, learned_file, queries):
    import os
    import shutil

    copy = tmp_path / "epoch_1.pth"
    shutil.copy(learned_file, copy)
    first = create_detector("faprompt", backbone=TINY, checkpoint=str(copy))
    second = create_detector("faprompt", backbone=TINY, checkpoint=str(copy))
    assert second.model.learner is first.model.learner  # one copy in memory, not one per fit
    assert not first.model.learner.training and not any(p.requires_grad for p in first.model.learner.parameters())
    assert first.predict(queries[0]).score == second.fit([queries[1]]).predict(queries[0]).score
    first.checkpoint_header["edited"] = True  # each detector's own copy of the header
    assert "edited" not in create_detector("faprompt", backbone=TINY, checkpoint=str(copy)).checkpoint_header

    # the file replaced by another learner: the next detector loads the new one
    state = torch.load(copy, weights_only=True)
    state["prompt_learner"]["ctx_pos"] = state["prompt_learner"]["ctx_pos"] * -1.0
    torch.save(state, copy)
    os.utime(copy, ns=(os.stat(copy).st_atime_ns, os.stat(copy).st_mtime_ns + 10**9))
    replaced = create_detector("faprompt", backbone=TINY, checkpoint=str(copy))
    assert replaced.model.learner is not first.model.learner
    assert torch.equal(replaced.model.learner.ctx_pos, state["prompt_learner"]["ctx_pos"])
    assert not torch.equal(first.model.learner.ctx_pos, replaced.model.learner.ctx_pos)

    # the word mode builds its own learner
    words = create_detector("faprompt", backbone=TINY, checkpoint=str(copy), prompts="words")
    assert words.model.learner is not replaced.model.learner


def test_the_shared_learner_keeps_no_backbone_alive(learned_file):
    import gc
    import weakref

    from detector.backbone import clear_backbone_cache

    backbone = load_backbone(TINY, "random", image_size=80, quick_gelu=True)
    learner, _ = fp.shared_learner(backbone, learned_file, what="the test learner")
    model = weakref.ref(backbone.model)
    del backbone
    clear_backbone_cache()
    gc.collect()
    assert model() is None  # freed although its learner stays cached
    assert fp.shared_learner(load_backbone(TINY, "random", image_size=80, quick_gelu=True), learned_file, what="the test learner")[0] is learner

def test_explain(learned_file, queries):
    det = create_detector("faprompt", backbone=TINY, checkpoint=str(learned_file))
    result = det.predict(queries[0])
    info = det.explain(result, x=89, y=0)  # top-right pixel of a 90x60 image
    assert info["patch"] == (0, 11)
    assert info["value"] == pytest.approx(float(result.raw_map[0, 11]))
    sims = info["prompt_similarities"]
    assert list(sims) == ["normal"] + [f"abnormal_{j}" for j in range(1, 11)]
    features = result.evidence.patch_features
    assert features.dtype == np.float32 and features.shape == (144, 64)
    prompts = torch.from_numpy(result.evidence.prompt_features)
    assert torch.allclose(prompts.norm(dim=-1), torch.ones(11), atol=1e-5)
    assert all(-1.0 <= v <= 1.0 for v in sims.values())
    # the stored features are the ones the map came from: the normal-prompt cosine of every
    # patch reproduces pass 1's normal logit (the normal prompt does not depend on the prior)
    state = det.text_state()
    patch = torch.from_numpy(features[11])
    assert sims["normal"] == pytest.approx(float(patch @ state.classes[0]), abs=1e-5)
    # the pass-2 abnormal prompts differ from pass 1 (the prior is applied per query)
    pass1_abnormal = torch.nn.functional.normalize(state.abnormal, dim=-1)
    assert (prompts[1:] - pass1_abnormal).abs().max() > 1e-6


@pytest.mark.slow
def test_real_architecture_random_init():
    det = create_detector("faprompt", backbone="ViT-L-14-336", backbone_weights="random")
    assert det.image_size == 518 and det.describe()["vv_start_block"] == 5
    image = np.random.default_rng(0).integers(0, 255, size=(300, 400, 3), dtype=np.uint8)
    result = det.predict(image)
    assert result.raw_map.shape == (37, 37)
    assert result.anomaly_map.shape == (300, 400)
    assert np.isfinite(result.raw_map).all() and 0.0 <= result.score <= 1.0
    learner = fp.FAPromptLearner.for_backbone(det.backbone)
    assert len(learner.state_dict()) == 36
    assert learner.patch_meta_net.linear1.weight.shape == (480, 7680)


def test_bf16_is_opt_in_and_close_to_fp32(learned_file):
    image = synthetic.texture("grating", 0, size=(90, 110), index=0)
    fp32 = create_detector("faprompt", backbone="tiny-test", checkpoint=str(learned_file))
    bf16 = create_detector("faprompt", backbone="tiny-test", checkpoint=str(learned_file), precision="bf16")
    assert fp32.describe()["precision"] == "fp32" and bf16.describe()["precision"] == "bf16"
    assert bf16.model.learner.ctx_pos.dtype == torch.bfloat16
    a, b = fp32.predict(image), bf16.predict(image)
    assert b.anomaly_map.dtype == np.float32 and b.anomaly_map.shape == a.anomaly_map.shape
    assert 0 < abs(a.score - b.score) < 0.05
    assert 0 < np.abs(a.raw_map - b.raw_map).max() < 0.1
    with pytest.raises(ValueError, match="precision"):
        create_detector("faprompt", backbone="tiny-test", precision="fp16")


def test_inspect_checkpoint_reads_the_official_layout(learned_file):
    info = fp.FAPromptDetector.inspect_checkpoint(learned_file)
    assert not info.carries_backbone and info.layout.startswith("official")
    assert info.key_groups["context tokens"] == 2 and info.key_groups["abnormality prior"] == 4
    assert info.key_groups["deep prompts"] == info.key_groups["unused projections"] // 2 == 4
