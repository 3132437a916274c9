"""A method added from this file alone: one class with a ``MethodSpec`` and two hooks.

It is the worked example of README "Adding a method": registered here, it runs through
``create_detector``, the service, ``python -m detector predict`` and ``python -m detector
evaluate`` without any other file knowing it exists.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import detector
from detector import registry, synthetic
from detector.base import Detector, MethodOutput
from detector.evaluate import main as evaluate_main
from detector.predict import main as predict_main
from detector.service import InspectionService, ServiceConfig
from detector.spec import MethodSpec, Option
from detector.synthetic import write_folder_dataset


class PatchDistance(Detector):
    """Distance of each query patch token to its nearest normal patch token (last block)."""

    spec = MethodSpec(
        display_name="Patch distance",
        default_backbone="tiny-test",
        default_weights="random",
        resize="squash",
        default_sigma=2.0,
        options={"power": Option(1.0, kind=float, help="exponent of the distance")},
    )

    def _encode(self, batch):
        """``(B, N, W)`` L2-normalised patch tokens of the last vision block."""
        last = self.backbone.num_vision_blocks - 1
        tokens = self.backbone.intermediate_tokens(batch.pixels, [last])["patch_tokens"][0]
        return torch.nn.functional.normalize(tokens.float(), dim=-1)

    def _score(self, encoded, batch):
        normals = self.normal_features.reshape(-1, encoded.shape[-1])  # cached by the default fit
        distance = (1.0 - encoded @ normals.T).min(dim=-1).values.clamp(min=0) ** self.options["power"]
        return [MethodOutput(float(d.max()), d.reshape(self.grid).numpy()) for d in distance]


@pytest.fixture
def toy(monkeypatch):
    detector.list_methods()  # the built-in methods first, then a registry copy to add to
    monkeypatch.setattr(registry, "_METHODS", dict(registry._METHODS))
    registry.register_method("toy")(PatchDistance)
    return "toy"


def _images():
    normals = [synthetic.texture("grating", 2, (64, 64), i) for i in range(3)]
    clean = synthetic.texture("grating", 2, (64, 64), 9)
    defect, mask = synthetic.add_defect(synthetic.texture("grating", 2, (64, 64), 9), 3)
    return normals, clean, defect, mask


def test_toy_method_through_create_detector(toy):
    assert "toy" in detector.list_methods()
    assert detector.method_options("toy")["power"] == 1.0
    normals, clean, defect, mask = _images()
    det = detector.create_detector("TOY", power=2.0, class_name="grid").fit(normals)
    exact = det.predict(normals[0])
    assert exact.score == pytest.approx(0.0, abs=1e-5)  # a fitted image is its own nearest neighbour
    result = det.predict(np.ascontiguousarray(defect[:, :48]))
    assert result.method == "toy" and result.raw_map.shape == det.grid == (8, 8)
    assert result.anomaly_map.shape == (64, 48) and result.anomaly_map.dtype == np.float32
    assert result.score > det.predict(clean).score
    described = det.describe()
    assert described["method"] == "toy" and described["display_name"] == "Patch distance"
    assert described["backbone"] == "tiny-test" and described["sigma"] == 2.0 and described["num_normals"] == 3
    assert det.calibrate().source == "default"  # no leave-one-out hook: the spec's fixed range
    with pytest.raises(ValueError, match="at least 1"):
        detector.create_detector("toy").fit([])
    with pytest.raises(TypeError, match="power"):
        detector.create_detector("toy", pwr=1)


def test_toy_method_through_the_service(toy):
    normals, clean, defect, _ = _images()
    service = InspectionService(ServiceConfig(backbone="tiny-test", backbone_weights="random"))
    report = service.inspect(["toy", "inctrl"], normals, defect, options={"toy": {"power": 1.0}})
    assert [o.method for o in report.outcomes] == ["toy", "inctrl"]
    outcome = report.outcome("toy")
    assert outcome.display_name == "Patch distance" and outcome.result.anomaly_map.shape == (64, 64)
    summary = report.summary(0.5)["methods"]["toy"]
    assert summary["weights"].startswith("tiny-test: random") and "no checkpoint" not in summary["weights"]
    assert not any("training-free" in w for w in outcome.warnings)  # nothing to train offline
    assert any("training-free" in w for w in report.outcome("inctrl").warnings)
    again = service.inspect(["toy"], normals, clean, options={"toy": {"power": 1.0}})
    assert again.outcomes[0].reused_fit
    assert service.weights_status("toy") == ("tiny-test", None)


def test_toy_method_through_predict_and_evaluate(toy, tmp_path, capsys):
    normals, _, defect, _ = _images()
    folder = tmp_path / "normals"
    folder.mkdir()
    for i, image in enumerate(normals):
        Image.fromarray(image).save(folder / f"good_{i}.png")
    query = tmp_path / "query.png"
    Image.fromarray(defect).save(query)
    out = tmp_path / "predictions"
    code = predict_main(["--method", "toy", "--normals", str(folder), "--query", str(query), "--out", str(out), "--toy-power", "2"])
    assert code == 0, capsys.readouterr().err
    written = json.loads((out / "query.json").read_text())
    assert written["methods"]["toy"]["describe"]["method"] == "toy"
    assert (out / "query_toy_overlay.png").is_file()

    root = write_folder_dataset(tmp_path / "folder", n_good=6, n_defect=3, size=64, seed=0)
    results = tmp_path / "results.json"
    code = evaluate_main(
        ["--method", "toy", "--dataset", "folder", "--root", str(root), "--shots", "2", "--option", "toy.power=1.5",
         "--out", str(results), "--no-progress"]
    )
    assert code == 0, capsys.readouterr().err
    entry = json.loads(results.read_text())["methods"]["toy"]
    assert entry["display_name"] == "Patch distance" and entry["options"] == {"power": 1.5}
    assert 0.0 <= entry["summary"]["mean"]["image_auroc"] <= 1.0
