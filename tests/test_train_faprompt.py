"""End-to-end FAPrompt training on a generated MVTec-layout dataset with the tiny backbone."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from detector import create_detector
from detector.checkpoints import read_header
from detector.synthetic import write_mvtec_dataset
from detector.train import build_parser
from detector.methods.faprompt import train as training




@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("mvtec")
    return write_mvtec_dataset(root, categories=("grating",), n_train=1, n_test_good=4, n_test_defect=4, size=64)


def _train(dataset, out, epochs, *extra):
    argv = [
        "faprompt", "--dataset", "mvtec", "--root", str(dataset), "--out", str(out),
        "--backbone", "tiny-test", "--epochs", str(epochs), "--batch-size", "4", "--lr", "1e-2",
        "--no-progress", *extra,
    ]
    args = build_parser().parse_args(argv)
    assert args.seed == 111 and args.batch_size == 4
    return args.run(args)


def test_train_lowers_loss_saves_loads_and_resumes(dataset, tmp_path):
    out = _train(dataset, tmp_path / "faprompt.safetensors", 3)
    header = read_header(out)
    assert header["method"] == "faprompt" and header["epoch"] == 3 and header["image_size"] == 96
    losses = [epoch["loss"] for epoch in header["history"]]
    assert len(losses) == 3 and all(np.isfinite(losses))
    assert losses[-1] < losses[0]
    assert training.optimizer_file(out).is_file()

    det = create_detector("faprompt", backbone="tiny-test", checkpoint=str(out))
    assert det.describe()["trained"] is True and det.describe()["mode"] == "learned"
    image = np.random.default_rng(0).integers(0, 255, size=(50, 70, 3), dtype=np.uint8)
    result = det.predict(image)
    assert result.anomaly_map.shape == (50, 70) and np.isfinite(result.score)

    # resume: one more epoch continues from epoch 3 and keeps the history
    history = read_header(out)["history"]
    resumed = _train(dataset, out, 4, "--resume")
    header = read_header(resumed)
    assert header["epoch"] == 4 and len(header["history"]) == 4
    assert header["history"][:3] == history


def test_losses_follow_official_definitions():
    probs = torch.tensor([[[[0.9, 0.2]], [[0.1, 0.8]]]])  # (B=1, 2, H=1, W=2)
    gt = torch.tensor([[[0.0, 1.0]]])
    p_true = torch.tensor([0.9, 0.8])
    pt = (1 - 1e-5) * p_true + 1e-5 * (1 - p_true) + 1e-5
    expected = (-(1 - pt) ** 2 * pt.log()).mean()
    torch.testing.assert_close(training.focal_loss(probs, gt), expected)
    dice = 1 - (2 * 0.8 + 1) / (0.1 + 0.8 + 1 + 1)
    torch.testing.assert_close(training.dice_loss(probs[:, 1], gt), torch.tensor(dice))
    features = torch.eye(3)[:, :3]
    assert float(training.abnormal_diversity_loss(features)) == pytest.approx(0.0, abs=1e-6)
    same = torch.ones(3, 4)
    assert float(training.abnormal_diversity_loss(same)) == pytest.approx(3.0, abs=1e-5)
    # focal-on-probabilities quirk: a score of 1 for an anomaly still has a sizeable loss
    assert float(training.binary_focal_loss_logits(torch.tensor([1.0]), torch.tensor([1.0]))) > 0.005


def test_start_from_checkpoint_into_folder(dataset, tmp_path):
    first = _train(dataset, tmp_path / "first.safetensors", 1)
    folder = tmp_path / "runs"
    folder.mkdir()
    second = _train(dataset, folder, 1, "--checkpoint", str(first), "--lr", "0")
    assert second == folder / "faprompt_mvtec.safetensors"
    assert read_header(second)["initial_checkpoint"] == str(first)
    from detector.checkpoints import read_state_dict

    a, b = read_state_dict(first), read_state_dict(second)
    assert all(torch.equal(a[k], b[k]) for k in a)  # lr 0: the starting weights are kept


def test_training_loss_comes_from_the_inference_forward(dataset, tmp_path):
    """One code path: the training batch loss is computed from the same ``FAPromptModel``
    forward ``predict`` runs. Its image terms equal the official losses of ``predict``'s own
    outputs, and features from the training cache equal the detector's encoder hook's."""
    from detector.checkpoints import save_safetensors
    from detector.images import load_image
    from detector.methods.faprompt import FAPromptLearner
    from detector.backbone import load_backbone

    backbone = load_backbone("tiny-test", "random", image_size=96, quick_gelu=True)
    learner = FAPromptLearner.for_backbone(backbone).initialize(backbone, seed=4)
    file = save_safetensors(tmp_path / "learner.safetensors", learner.state_dict(), {"method": "faprompt"})
    det = create_detector("faprompt", backbone="tiny-test", checkpoint=str(file))
    items = training.collect_items("mvtec", dataset, None)[::2]
    assert {item.label for item in items} == {0, 1}
    paths = [item.image for item in items]
    labels = torch.tensor([item.label for item in items])
    gt = torch.stack([training.mask_tensor(item, det.image_size) for item in items])

    cache = training.FeatureCache(det.model, det.preprocess_spec, det.backbone.device, 64)
    with torch.no_grad():
        cached = cache.get(paths)
        encoded = det._encode(det.prepare([load_image(p) for p in paths]))
        for a, b in zip(cached, encoded):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
        total, parts = training.batch_loss(det.model, *cached, labels, gt, det.image_size, det.grid)
        again, _ = training.batch_loss(det.model, *encoded, labels, gt, det.image_size, det.grid)
    assert float(total) == pytest.approx(float(again), rel=1e-6)

    results = [det.predict(path) for path in paths]
    scores = torch.tensor([r.score for r in results])
    text_prob = torch.tensor([r.extras["text_prob"] for r in results])
    assert parts["img2"] == pytest.approx(float(training.binary_focal_loss_logits(scores, labels.float())), rel=1e-5)
    likelihood = torch.where(labels == 1, text_prob, 1 - text_prob)
    assert parts["img"] == pytest.approx(float(-likelihood.log().mean()), rel=1e-4)
