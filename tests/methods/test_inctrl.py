"""InCTRL on the tiny random CLIP: residual maps, checkpoint formats, caching, explanations.

The parity with the official code on the real architecture is checked by
``tools/parity_inctrl.py`` (it needs the official checkout); here the same loading paths run
on synthetic official-format files built from our own modules.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import random_inctrl_heads
from detector import create_detector
from detector.errors import CheckpointError
from detector.backbone import load_backbone
from detector.checkpoints import save_safetensors
from detector.preprocess import preprocess
from detector.maps import patch_box
from detector.calibration import Calibration
from detector.methods import inctrl
from detector.methods.inctrl import model as inctrl_model
from detector.synthetic import add_defect, texture

TINY = {"backbone": "tiny-test", "backbone_weights": "random"}


def normals(count: int = 3, size=(80, 96)) -> list[np.ndarray]:
    return [texture("grating", 3, size, index=i) for i in range(count)]


def query(size=(72, 90), index: int = 50, defect: bool = True) -> np.ndarray:
    image = texture("grating", 3, size, index=index)
    return add_defect(image, seed=index)[0] if defect else image


random_heads = random_inctrl_heads


def tiny_clip_state(perturb: float = 0.0) -> dict[str, torch.Tensor]:
    """The tiny CLIP's weights in the official key layout (no ``logit_scale``)."""
    model = load_backbone("tiny-test", "random").model
    generator = torch.Generator().manual_seed(99)
    return {
        k: v.clone() + perturb * torch.randn(v.shape, generator=generator) if v.is_floating_point() else v.clone()
        for k, v in model.state_dict().items()
        if k != "logit_scale"
    }


@pytest.fixture(scope="module")
def fitted():
    return create_detector("inctrl", **TINY).fit(normals())


# -- residual maps ----------------------------------------------------------------------------


def test_identical_normal_and_query_give_zero_patch_residual():
    image = query(defect=False)
    result = create_detector("inctrl", **TINY).fit([image]).predict(image)
    assert result.raw_map.shape == (8, 8)
    np.testing.assert_allclose(result.raw_map, 0.0, atol=1e-6)
    assert abs(result.extras["max_patch_residual"]) < 1e-6


def test_patch_residual_is_the_minimum_over_all_normal_patches(fitted):
    image = query()
    result = fitted.predict(image)
    backbone = fitted.backbone
    spec = fitted.preprocess_spec
    with torch.no_grad():
        layers = [[t[0] for t in backbone.intermediate_tokens(preprocess(img, spec)[0][None], fitted.blocks)["patch_tokens"]]
                  for img in [image] + normals()]
    query_layers, normal_layers = layers[0], layers[1:]
    for row, col in [(0, 0), (3, 5), (7, 2)]:
        p = row * 8 + col
        per_layer = []
        for layer in range(3):
            q = query_layers[layer][p].double()
            best = min(
                0.5 * (1 - float(torch.dot(q, n.double()) / (q.norm() * n.double().norm())))
                for shot in normal_layers
                for n in shot[layer]
            )
            per_layer.append(best)
        assert result.raw_map[row, col] == pytest.approx(np.mean(per_layer), abs=1e-6)


def test_patch_residual_function_matches_a_loop():
    generator = torch.Generator().manual_seed(0)
    q = inctrl.l2_normalize(torch.randn(2, 3, 5, 4, generator=generator))
    n = inctrl.l2_normalize(torch.randn(3, 7, 4, generator=generator))
    out = inctrl.patch_residual(q, n)
    for b in range(2):
        for layer in range(3):
            for p in range(5):
                expected = min(0.5 * (1 - float(q[b, layer, p] @ n[layer, m])) for m in range(7))
                assert float(out[b, layer, p]) == pytest.approx(expected, abs=1e-6)


def test_training_free_score_and_describe(fitted):
    result = fitted.predict(query())
    extras = result.extras
    assert result.score == pytest.approx((extras["text_score"] + extras["max_patch_residual"]) / 2, abs=1e-7)
    assert extras["max_patch_residual"] == pytest.approx(float(result.raw_map.max()), abs=1e-7)
    assert "holistic_score" not in extras and "image_residual_score" not in extras
    assert result.anomaly_map.shape == (72, 90) and result.anomaly_map.dtype == np.float32
    assert set(result.timings) == {"encode", "score", "post"}
    info = fitted.describe()
    assert info["trained"] is False and info["mode"] == "training-free"
    assert info["method"] == "inctrl" and info["backbone"] == "tiny-test" and info["image_size"] == 64
    assert info["blocks"] == [3, 4, 5] and info["checkpoint"] is None


def test_batch_equals_one_by_one(fitted):
    queries = [query(index=60), query((64, 64), index=61, defect=False), query((100, 70), index=62)]
    batch = fitted.predict_batch(queries)
    for image, result in zip(queries, batch):
        single = fitted.predict(image)
        assert result.score == pytest.approx(single.score, abs=1e-6)
        np.testing.assert_allclose(result.raw_map, single.raw_map, atol=1e-6)
        np.testing.assert_allclose(result.anomaly_map, single.anomaly_map, atol=1e-6)


def test_text_features_are_encoded_once_per_class_name(monkeypatch):
    calls = []
    original = inctrl_model.encode_texts

    def counting(backbone, texts):
        calls.append(len(texts))
        return original(backbone, texts)

    monkeypatch.setattr(inctrl_model, "encode_texts", counting)
    detector = create_detector("inctrl", class_name="counted_widget", **TINY).fit(normals(2))
    for i in range(4):
        detector.predict(query(index=70 + i))
    detector.predict_batch([query(index=80), query(index=81)])
    create_detector("inctrl", class_name="counted_widget", **TINY).fit(normals(2)).predict(query())
    assert calls == [154, 88]


def test_single_prompt_branch():
    assert inctrl.prompt_texts("bird") == (
        ["a photo of bird for anomaly detection."],
        ["a photo without bird for anomaly detection."],
    )
    normal, abnormal = inctrl.prompt_texts("metal_nut")
    assert (len(normal), len(abnormal)) == (154, 88)
    assert "a photo of the metal nut with damage for anomaly detection." in abnormal


# -- checkpoints ------------------------------------------------------------------------------


def test_official_full_state_dict_loads_and_round_trips(tmp_path):
    heads = random_heads(1)
    clip = tiny_clip_state(perturb=0.01)
    full = {**clip, **heads}
    assert len(heads) == 44
    raw_file = tmp_path / "checkpoint_6.pyth"
    torch.save(full, raw_file)
    nested_file = tmp_path / "nested.pyth"
    torch.save({"model_state": full, "epoch": 6}, nested_file)
    clip_file = tmp_path / "clip.pt"
    torch.save(clip, clip_file)
    heads_file = tmp_path / "heads.pyth"
    torch.save(heads, heads_file)

    images, image = normals(2), query()
    from_raw = create_detector("inctrl", backbone="tiny-test", checkpoint=str(raw_file))
    for name, value in from_raw.heads.state_dict().items():
        assert torch.equal(value, heads[name].to(value.dtype)), name
    for name, value in from_raw.backbone.model.state_dict().items():
        if name != "logit_scale":
            assert torch.equal(value, clip[name]), name
    info = from_raw.describe()
    assert info["trained"] is True and info["mode"] == "trained" and "checkpoint" in info["backbone_weights"]

    results = [
        create_detector("inctrl", backbone="tiny-test", **kwargs).fit(images).predict(image)
        for kwargs in (
            {"checkpoint": str(raw_file)},
            {"checkpoint": str(nested_file)},
            {"checkpoint": str(heads_file), "backbone_weights": str(clip_file)},
        )
    ]
    first = results[0]
    assert set(first.extras) >= {"text_score", "image_residual_score", "holistic_score", "max_patch_residual", "holistic_map"}
    assert first.score == pytest.approx((first.extras["holistic_score"] + first.extras["max_patch_residual"]) / 2, abs=1e-7)
    for other in results[1:]:
        assert other.score == first.score
        np.testing.assert_array_equal(other.raw_map, first.raw_map)
        for key in ("text_score", "image_residual_score", "holistic_score"):
            assert other.extras[key] == first.extras[key]
    # The checkpoint's CLIP weights are used, not the default random ones.
    plain = create_detector("inctrl", checkpoint=str(heads_file), **TINY).fit(images).predict(image)
    assert not np.allclose(plain.raw_map, first.raw_map)
    # heads="training-free" ignores loaded heads.
    free = create_detector("inctrl", backbone="tiny-test", checkpoint=str(raw_file), heads="training-free")
    result = free.fit(images).predict(image)
    assert result.score == pytest.approx((result.extras["text_score"] + result.extras["max_patch_residual"]) / 2)
    assert free.describe()["mode"] == "training-free"


def test_heads_match_the_official_forward_formula(tmp_path):
    heads = random_heads(2)
    file = tmp_path / "heads.pyth"
    torch.save(heads, file)
    detector = create_detector("inctrl", checkpoint=str(file), **TINY).fit(normals(3))
    result = detector.predict(query())
    module = inctrl.InCTRLHeads(64, 64)
    module.load_state_dict(heads)
    module.eval()
    with torch.no_grad():
        bank = detector._bank
        _, embedding = inctrl.encode_images(detector.backbone, preprocess(query(), detector.preprocess_spec)[0][None], detector.blocks)
        adapted = torch.relu(torch.relu(bank.embeddings @ heads["adapter.fc.0.weight"].T) @ heads["adapter.fc.2.weight"].T)
        adapted_q = torch.relu(torch.relu(embedding @ heads["adapter.fc.0.weight"].T) @ heads["adapter.fc.2.weight"].T)
        image_residual = float(module.diff_head_ref(adapted.mean(0, keepdim=True) - adapted_q))
    assert result.extras["image_residual_score"] == pytest.approx(image_residual, abs=1e-6)
    holistic = torch.from_numpy(result.raw_map.reshape(1, -1)) + result.extras["text_score"] + image_residual
    with torch.no_grad():
        assert result.extras["holistic_score"] == pytest.approx(float(module.diff_head(holistic)), abs=1e-5)


def test_own_training_output_loads_with_header(tmp_path):
    file = save_safetensors(
        tmp_path / "inctrl.safetensors",
        random_heads(3),
        inctrl.checkpoint_header(
            backbone="tiny-test",
            shots=4,
            epoch=6,
            calibration=Calibration(0.0, 1.0, 0.4, 0.0, 1.0, 0.3, "validation"),
        ),
    )
    detector = create_detector("inctrl", checkpoint=str(file), backbone_weights="random")
    assert detector.describe()["backbone"] == "tiny-test" and detector.describe()["checkpoint_shots"] == 4
    result = detector.fit(normals(2)).predict(query())
    assert any("4 normal images" in w and "2 are fitted" in w for w in result.warnings)
    assert not detector.fit(normals(4)).predict(query()).warnings
    calibration = detector.calibrate()
    assert calibration.source == "stored" and calibration.image_threshold == 0.4


@pytest.mark.parametrize(
    "change, expected",
    [
        (lambda s: s.pop("diff_head.bn2.running_var"), "diff_head.bn2.running_var"),
        (lambda s: s.update({"adapter.fc.0.weight": torch.zeros(3, 64)}), "adapter.fc.0.weight"),
        (lambda s: s.update({"diff_head.extra.weight": torch.zeros(1)}), "diff_head.extra.weight"),
    ],
)
def test_mismatched_heads_raise_checkpoint_error(tmp_path, change, expected):
    state = random_heads(4)
    change(state)
    file = tmp_path / "bad.pyth"
    torch.save(state, file)
    with pytest.raises(CheckpointError, match=expected.replace(".", r"\.")):
        create_detector("inctrl", checkpoint=str(file), **TINY)


def test_unrelated_file_raises_checkpoint_error(tmp_path):
    file = tmp_path / "other.pth"
    torch.save({"encoder.weight": torch.zeros(2, 2), "decoder.bias": torch.zeros(2)}, file)
    with pytest.raises(CheckpointError, match="encoder.weight"):
        create_detector("inctrl", checkpoint=str(file), **TINY)
    # CLIP part that does not fit the backbone: named by the backbone check.
    broken = {**tiny_clip_state(), **random_heads(5)}
    broken.pop("visual.proj")
    torch.save(broken, file)
    with pytest.raises(CheckpointError, match="visual.proj"):
        create_detector("inctrl", backbone="tiny-test", checkpoint=str(file))


def test_options_are_validated():
    with pytest.raises(ValueError, match="heads"):
        create_detector("inctrl", heads="learned", **TINY)
    with pytest.raises(ValueError, match="checkpoint"):
        create_detector("inctrl", heads="trained", **TINY)
    with pytest.raises(RuntimeError, match="fit"):
        create_detector("inctrl", **TINY).predict(query())


# -- explanations and calibration ----------------------------------------------------------


def test_explain_on_a_copy_of_a_normal_points_at_that_normal(fitted):
    images = normals()
    copy = images[1].copy()
    result = fitted.predict(copy)
    geometry = result.geometry
    for x, y in [(5, 5), (40, 30), (90, 70)]:
        info = fitted.explain(result, x, y)
        row, col = info["patch"]
        assert info["normal_index"] == 1
        assert info["normal_patch"] == (row, col)
        assert info["box"] == patch_box(geometry, (8, 8), row, col)
        assert info["similarity"] == pytest.approx(1.0, abs=1e-5)
        assert info["value"] == pytest.approx(float(result.raw_map[row, col]))
        assert abs(info["value"]) < 1e-6


def test_explain_matches_a_brute_force_search(fitted):
    result = fitted.predict(query())
    info = fitted.explain(result, 30, 20)
    row, col = info["patch"]
    q = result.evidence.tokens[row * 8 + col].astype(np.float64)
    best, where = -2.0, None
    for k, tokens in enumerate(fitted._bank.tokens[:, -1].numpy().astype(np.float64)):
        for p, n in enumerate(tokens):
            s = q @ n / (np.linalg.norm(q) * np.linalg.norm(n))
            if s > best + 1e-12:
                best, where = s, (k, divmod(p, 8))
    assert (info["normal_index"], info["normal_patch"]) == where
    assert info["similarity"] == pytest.approx(best, abs=1e-5)


def test_leave_one_out_scores_each_normal_against_the_others(fitted):
    images = normals()
    entries = fitted.leave_one_out()
    assert len(entries) == 3
    for i, (score, anomaly_map) in enumerate(entries):
        assert anomaly_map.shape == images[i].shape[:2]
        others = [img for j, img in enumerate(images) if j != i]
        alone = create_detector("inctrl", **TINY).fit(others).predict(images[i])
        assert score == pytest.approx(alone.score, abs=1e-6)
        np.testing.assert_allclose(anomaly_map, alone.anomaly_map, atol=1e-6)
    assert create_detector("inctrl", **TINY).fit(normals(1)).leave_one_out() is None
    assert fitted.calibrate().source.startswith("leave-one-out")


# -- real architecture ------------------------------------------------------------------------


@pytest.mark.slow
def test_real_architecture_at_random_init_runs_end_to_end():
    detector = create_detector(
        "inctrl", backbone="ViT-B-16-plus-240", backbone_weights="random", class_name="bird"  # one prompt per side
    )
    assert detector.blocks == (6, 8, 10) and detector.image_size == 240
    assert detector.heads.diff_head.projection1.in_features == 225
    assert detector.heads.diff_head_ref.projection1.in_features == 640
    result = detector.fit(normals(2, (240, 320))).predict(query((300, 240)))
    assert result.raw_map.shape == (15, 15) and result.anomaly_map.shape == (300, 240)
    assert 0.0 <= result.score <= 1.0
    assert result.evidence.tokens.shape == (225, 896)
    assert detector.describe()["sigma"] == 4.0


def test_inspect_checkpoint_tells_the_layouts_apart(tmp_path):
    """The method's own artefact knowledge, read from keys alone: the official full file
    carries CLIP, heads alone do not, our output's header facts are reported."""
    from detector.methods.inctrl import InCTRLDetector
    from detector.service import InspectionService, ServiceConfig

    heads = random_heads(4)
    full = tmp_path / "checkpoint.pyth"
    torch.save({"model_state": {**tiny_clip_state(), **heads}}, full)
    alone = tmp_path / "heads.pyth"
    torch.save(heads, alone)
    ours = save_safetensors(tmp_path / "ours.safetensors", heads, inctrl.checkpoint_header(backbone="tiny-test", shots=8, epoch=2))

    info = InCTRLDetector.inspect_checkpoint(full)
    assert info.carries_backbone and info.key_groups["heads"] == 44 and sum(info.key_groups.values()) == 44 + len(tiny_clip_state())
    assert info.layout.startswith("official full")
    assert not InCTRLDetector.checkpoint_supplies_backbone(alone)
    assert InCTRLDetector.inspect_checkpoint(alone).key_groups == {"heads": 44}
    own = InCTRLDetector.inspect_checkpoint(ours)
    assert not own.carries_backbone and own.facts["shots"] == 8 and own.facts["epoch"] == 2

    # The start-up status trusts a checkpoint for the backbone only when it carries CLIP.
    offline = {"backbone": "ViT-B-16-plus-240"}
    assert InspectionService(ServiceConfig(checkpoints={"inctrl": str(full)}, **offline)).weights_status("inctrl")[1] is None
    problem = InspectionService(ServiceConfig(checkpoints={"inctrl": str(alone)}, **offline)).weights_status("inctrl")[1]
    assert problem and "not in the Hugging Face cache" in problem
