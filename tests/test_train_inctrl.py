"""The InCTRL training command (``python -m detector.train inctrl``) on a generated MVTec-layout dataset (tiny CLIP)."""

from __future__ import annotations

import argparse

import pytest
import torch

from detector import create_detector
from detector.checkpoints import read_header, read_state_dict
from detector.synthetic import write_mvtec_dataset
from detector.methods.inctrl import train as training


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_mvtec_dataset(
        tmp_path_factory.mktemp("mvtec"), categories=("grating", "blobs"), n_train=4, n_test_good=2, n_test_defect=4, size=64
    )


def train(dataset, out, *extra: str) -> object:
    parser = argparse.ArgumentParser()
    training.configure_parser(parser)
    args = parser.parse_args(
        [
            "--dataset", "mvtec",
            "--root", str(dataset),
            "--backbone", "tiny-test",
            "--backbone-weights", "random",
            "--shots", "2",
            "--steps-per-epoch", "6",
            "--batch-size", "8",
            "--lr", "1e-2",
            "--seed", "3",
            "--out", str(out),
            "--no-progress",
            *extra,
        ]
    )
    return training.run(args)


def test_training_lowers_the_loss_and_the_output_loads(dataset, tmp_path):
    out = train(dataset, tmp_path / "heads.safetensors", "--epochs", "4")
    header = read_header(out)
    assert header["method"] == "inctrl" and header["backbone"] == "tiny-test"
    assert header["shots"] == 2 and header["epoch"] == 4 and header["focal_on_probabilities"] is True
    assert header["categories"] == ["blobs", "grating"]
    losses = header["losses"]
    # Lower than at the start (not necessarily at the last epoch: 6 steps per epoch on random
    # features are noisy, and the summation order of 2-thread runs differs between machines).
    assert len(losses) == 4 and min(losses[1:]) < losses[0]
    assert sorted(read_state_dict(out)) == sorted(training_head_keys())
    for epoch in range(1, 5):
        assert training.epoch_file(out, epoch).is_file() and training.optimizer_file(out, epoch).is_file()

    detector = create_detector("inctrl", checkpoint=str(out), backbone_weights="random", class_name="grating")
    assert detector.describe()["trained"] is True and detector.describe()["backbone"] == "tiny-test"
    normals = sorted((dataset / "grating" / "train" / "good").glob("*.png"))[:2]
    result = detector.fit(normals).predict(next((dataset / "grating" / "test").glob("*/000.png")))
    assert 0.0 <= result.score <= 1.0 and not result.warnings
    assert {"holistic_score", "image_residual_score"} <= set(result.extras)


def test_resume_continues_from_the_last_epoch(dataset, tmp_path):
    short = ("--steps-per-epoch", "3")
    straight = train(dataset, tmp_path / "a" / "heads.safetensors", "--epochs", "2", *short)
    first = train(dataset, tmp_path / "b" / "heads.safetensors", "--epochs", "1", *short)
    resumed = train(dataset, first, "--epochs", "2", "--resume", *short)
    assert read_header(resumed)["epoch"] == 2
    expected, actual = read_state_dict(straight), read_state_dict(resumed)
    for key, value in expected.items():
        torch.testing.assert_close(actual[key], value, rtol=1e-5, atol=1e-6, msg=key)
    assert read_header(resumed)["losses"] == pytest.approx(read_header(straight)["losses"], rel=1e-5)


def test_focal_loss_forms():
    probabilities = torch.tensor([0.2, 0.9])
    labels = torch.tensor([0.0, 1.0])
    # Official form: the probabilities go through another sigmoid.
    p = torch.sigmoid(probabilities)
    p_t = torch.where(labels > 0, p, 1 - p)
    expected = ((1 - p_t) ** 2 * -torch.log(p_t)).mean()
    assert float(training.binary_focal_loss(probabilities, labels, logits=True)) == pytest.approx(float(expected), rel=1e-6)
    q_t = torch.where(labels > 0, probabilities, 1 - probabilities)
    expected = ((1 - q_t) ** 2 * -torch.log(q_t)).mean()
    assert float(training.binary_focal_loss(probabilities, labels, logits=False)) == pytest.approx(float(expected), rel=1e-5)


def test_training_data_follow_the_official_split(dataset):
    data = training.collect_training_data("mvtec", dataset)
    assert len(data.pools["grating"]) == 6  # 4 train/good + 2 test/good
    assert len(data.anomalies) == 8 and len(data.normals) == 12
    assert all(item.label == 1 and "good" not in item.image.parts for item in data.anomalies)


def training_head_keys() -> list[str]:
    from detector.methods.inctrl import InCTRLHeads

    return list(InCTRLHeads(64, 64).state_dict())


def test_cli_rejects_odd_batches(dataset, tmp_path):
    with pytest.raises(ValueError, match="batch-size"):
        train(dataset, tmp_path / "x.safetensors", "--batch-size", "7")


def test_training_scores_and_loss_come_from_the_inference_forward(dataset, tmp_path):
    """One code path: a training batch (each query with its own shots and category) scores
    exactly as ``predict`` scores each query after ``fit`` on its shots, and the training loss
    is the official loss of those scores."""
    import random

    from conftest import random_inctrl_heads
    from detector.checkpoints import save_safetensors

    state = random_inctrl_heads(5)
    file = save_safetensors(tmp_path / "heads.safetensors", state, {"method": "inctrl", "backbone": "tiny-test"})

    data = training.collect_training_data("mvtec", dataset)
    queries = data.normals[:1] + data.normals[-1:] + data.anomalies[:1] + data.anomalies[-1:]
    assert {q.category for q in queries} == {"blobs", "grating"}
    rng = random.Random(0)
    shots = [rng.sample(data.pools[q.category], 2) for q in queries]
    labels = torch.tensor([float(q.label) for q in queries])

    trained = create_detector("inctrl", checkpoint=str(file), backbone_weights="random")
    cache = training.FeatureCache(trained, 2**28)
    with torch.no_grad():
        scores = training.batch_scores(trained.model, trained.backbone, cache, queries, shots)
        loss = training.batch_loss(scores, labels)

    expected_score, expected_residual = [], []
    for item, group in zip(queries, shots):
        det = create_detector("inctrl", checkpoint=str(file), backbone_weights="random", class_name=item.category)
        result = det.fit(group).predict(item.image)
        expected_score.append(result.score)
        expected_residual.append(result.extras["image_residual_score"])
    torch.testing.assert_close(scores.score, torch.tensor(expected_score), rtol=0, atol=1e-6)
    torch.testing.assert_close(scores.image_residual_score, torch.tensor(expected_residual), rtol=0, atol=1e-6)
    expected_loss = training.binary_focal_loss(torch.tensor(expected_score), labels) + training.binary_focal_loss(
        torch.tensor(expected_residual), labels
    )
    assert float(loss) == pytest.approx(float(expected_loss), rel=1e-6)
