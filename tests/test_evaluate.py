"""The evaluation command end to end on small synthetic datasets with the tiny backbone."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from detector import datasets, evaluate, list_methods, metrics
from detector.__main__ import main as package_main
from detector.registry import get_method, method_options
from detector.synthetic import write_folder_dataset, write_mvtec_dataset

TINY = ["--backbone", "tiny-test", "--backbone-weights", "random", "--no-progress"]


def _small_options(methods):
    """Keep learned-at-fit methods short (e.g. AnoPLe's ``steps``) where the option exists."""
    return [arg for m in methods if "steps" in method_options(m) for arg in ("--option", f"{m}.steps=1")]


@pytest.fixture
def recorder(monkeypatch):
    """Wraps ``create_detector`` inside the evaluation module and records every prediction."""
    records: list[dict] = []
    real = evaluate.create_detector

    def create(name, **kwargs):
        detector = real(name, **kwargs)
        predict = detector.predict

        def recording_predict(image):
            result = predict(image)
            records.append({"method": name, "image": Path(image), "score": result.score, "map": result.anomaly_map})
            return result

        detector.predict = recording_predict
        return detector

    monkeypatch.setattr(evaluate, "create_detector", create)
    return records


def _mask_at(sample, size):
    """Independent mask reading for the check: PIL, > 0, nearest-neighbour resize."""
    from PIL import Image

    if sample.mask is None:
        return np.zeros(size, bool)
    mask = np.asarray(Image.open(sample.mask).convert("L")) > 0
    return cv2.resize(mask.astype(np.uint8), size[::-1], interpolation=cv2.INTER_NEAREST).astype(bool)


def test_every_registered_method_end_to_end_matches_the_metric_functions(tmp_path, recorder, capsys):
    root = write_mvtec_dataset(tmp_path / "mvtec", categories=("grating",), n_train=4, n_test_good=2, n_test_defect=2, size=64, seed=0)
    methods = list_methods()
    assert methods, "no method is registered"
    out = tmp_path / "out" / "results.json"
    argv = ["--method", *methods, "--dataset", "mvtec", "--root", str(root), "--category", "grating", "--shots", "2", "--seed", "3"]
    argv += TINY + _small_options(methods) + ["--out", str(out)]
    assert evaluate.main(argv) == 0
    table = capsys.readouterr().out
    results = json.loads(out.read_text())
    assert out.with_suffix(".csv").is_file()

    assert list(results["methods"]) == methods and len(results["methods"]) >= 1
    expected_shots = datasets.sample_shots(datasets.train_normals("mvtec", root, "grating"), 2, 3)
    test = datasets.test_samples("mvtec", root, "grating")
    by_image = {s.image.resolve(): s for s in test}
    config = results["config"]
    assert config["shots"] == 2 and config["seeds"] == [3] and config["dataset"] == "mvtec"

    ran = 0
    for method, entry in results["methods"].items():
        mine = [r for r in recorder if r["method"] == method]
        assert len(mine) == len(test)
        run = entry["runs"]["grating"][0]
        assert run["shots"] == [p.relative_to(root).as_posix() for p in expected_shots]
        assert entry["describe"]["backbone"] == "tiny-test"
        assert "backbone_weights" in entry["describe"]
        # recompute from the very predictions the command made
        samples = [by_image[r["image"].resolve()] for r in mine]
        labels = [s.label for s in samples]
        scores = [r["score"] for r in mine]
        maps = [cv2.resize(r["map"].astype(np.float32), (256, 256), interpolation=cv2.INTER_LINEAR) for r in mine]
        masks = [_mask_at(s, (256, 256)) for s in samples]
        assert sum(m.any() for m in masks) == 2
        expected = metrics.image_metrics(labels, scores)
        expected.update(metrics.pixel_metrics(maps, masks))
        for key, value in expected.items():
            assert run["metrics"][key] == pytest.approx(value, abs=1e-9), (method, key)
        assert [p["score"] for p in run["predictions"]] == pytest.approx(scores)
        # the printed table shows the same numbers
        row_values = [evaluate.format_value(expected[k], 0.0, False) for k, _ in evaluate.TABLE_METRICS]
        assert f"| grating | {' | '.join(row_values)} |" in table
        assert f"| **mean** | {' | '.join(row_values)} |" in table
        ran += 1
    assert ran >= 1

    with out.with_suffix(".csv").open() as handle:
        rows = list(csv.DictReader(handle))
    run_rows = [r for r in rows if r["row"] == "run"]
    assert {r["method"] for r in run_rows} == set(methods)
    first = run_rows[0]
    assert float(first["image_auroc"]) == pytest.approx(results["methods"][first["method"]]["runs"]["grating"][0]["metrics"]["image_auroc"])


def test_folder_layout_several_seeds_full_resolution_through_the_package_entry(tmp_path, recorder, capsys):
    methods = list_methods()
    assert methods
    method = "inctrl" if "inctrl" in methods else methods[0]
    root = write_folder_dataset(tmp_path / "parts", kind="blobs", n_good=5, n_defect=2, size=48, seed=1)
    out = tmp_path / "res"
    argv = ["evaluate", "--method", method, "--dataset", "folder", "--root", str(root), "--shots", "2", "--seeds", "0", "1"]
    argv += TINY + _small_options([method]) + ["--pixel-size", "full", "--out", str(out)]
    assert package_main(argv) == 0
    table = capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    assert (out / "results.csv").is_file()
    assert results["config"]["categories"] == ["parts"]
    assert "streamed" in results["config"]["pixel_metrics"]
    runs = results["methods"][method]["runs"]["parts"]
    assert [r["seed"] for r in runs] == [0, 1]
    for run in runs:
        split = datasets.split_folder(root, 2, run["seed"])
        assert run["shots"] == [p.relative_to(root).as_posix() for p in split.shots]
        tested = {p["image"] for p in run["predictions"]}
        assert not tested & set(run["shots"])  # shots never tested
        assert len(tested) == 5 - 2 + 2
    summary = results["methods"][method]["summary"]["categories"]["parts"]
    auroc = [r["metrics"]["image_auroc"] for r in runs]
    assert summary["mean"]["image_auroc"] == pytest.approx(np.mean(auroc))
    assert summary["std"]["image_auroc"] == pytest.approx(np.std(auroc))
    assert f"{100 * np.mean(auroc):.2f} ± {100 * np.std(auroc):.2f}" in table
    # full resolution: the binned streamed metrics agree with the exact ones on the same maps
    for seed_index, run in enumerate(runs):
        mine = [r for r in recorder if r["method"] == method][seed_index * 5 : (seed_index + 1) * 5]
        samples = {s.image.resolve(): s for s in datasets.split_folder(root, 2, run["seed"]).test}
        maps = [r["map"] for r in mine]
        masks = [datasets.read_mask(samples[r["image"].resolve()]) for r in mine]
        exact = metrics.pixel_metrics(maps, masks)
        assert run["metrics"]["pixel_auroc"] == pytest.approx(exact["pixel_auroc"], abs=1e-3)
        assert run["metrics"]["aupro"] == pytest.approx(exact["aupro"], abs=5e-3)


def test_zero_shot_methods_run_without_shots(tmp_path, capsys):
    zero_shot = [m for m in list_methods() if not get_method(m).requires_fit]
    if not zero_shot:
        pytest.skip("no zero-shot method registered")
    root = write_mvtec_dataset(tmp_path / "mvtec", categories=("weave",), n_train=1, n_test_good=1, n_test_defect=1, size=48, seed=2)
    out = tmp_path / "zero.json"
    argv = ["--method", zero_shot[0], "--dataset", "mvtec", "--root", str(root), "--all-categories", "--shots", "0"]
    assert evaluate.main(argv + TINY + ["--out", str(out)]) == 0
    run = json.loads(out.read_text())["methods"][zero_shot[0]]["runs"]["weave"][0]
    assert run["shots"] == [] and run["num_test"] == 2


def test_argument_errors_are_clear(tmp_path, capsys):
    root = write_mvtec_dataset(tmp_path / "mvtec", categories=("grain",), n_train=2, n_test_good=1, n_test_defect=1, size=32, seed=0)
    few_shot = [m for m in list_methods() if get_method(m).requires_fit]
    base = ["--dataset", "mvtec", "--root", str(root)] + TINY
    assert evaluate.main(["--method", "nosuch", "--category", "grain"] + base) == 2
    assert "unknown method 'nosuch'" in capsys.readouterr().err
    assert evaluate.main(["--method", "all"] + base) == 2
    assert "--all-categories; categories under" in capsys.readouterr().err
    assert evaluate.main(["--method", "all", "--category", "tile"] + base) == 2
    assert "unknown category tile" in capsys.readouterr().err
    assert evaluate.main(["--method", "all", "--dataset", "mvtec", "--root", str(tmp_path / "none"), "--category", "x"]) == 2
    assert "does not exist" in capsys.readouterr().err
    if few_shot:
        assert evaluate.main(["--method", few_shot[0], "--category", "grain", "--shots", "0"] + base) == 2
        assert "zero-shot" in capsys.readouterr().err
        assert evaluate.main(["--method", few_shot[0], "--category", "grain", "--shots", "5"] + base) == 2
        assert "only 2 normal image(s)" in capsys.readouterr().err


def test_option_and_checkpoint_resolution():
    methods = list_methods()
    assert methods
    first = methods[0]
    resolved = evaluate.resolve_options([f"{first}.sigma=2.5", "seed=7"], methods)
    assert resolved[first]["sigma"] == 2.5
    assert all(resolved[m]["seed"] == 7 for m in methods)  # a common option reaches every method
    with pytest.raises(ValueError, match="no evaluated method has an option"):
        evaluate.resolve_options(["nosuchoption=1"], methods)
    assert evaluate.resolve_checkpoints("a.safetensors", [first]) == {first: "a.safetensors"}
    assert evaluate.resolve_checkpoints(f"{first}=x.pt", methods)[first] == "x.pt"
    if len(methods) > 1:
        with pytest.raises(ValueError, match="METHOD=PATH"):
            evaluate.resolve_checkpoints("a.pt", methods)
    assert evaluate.resolve_pixel_size("full") is None and evaluate.resolve_pixel_size("128") == (128, 128)
    assert evaluate.format_value(None, None, True) == "n/a"
    assert evaluate.format_value(0.98765, 0.0123, True) == "98.77 ± 1.23"


def test_visa_split_file_through_the_command(tmp_path, capsys):
    """A VisA-style root: the split CSV points at images and label-map masks."""
    methods = list_methods()
    assert methods
    method = "inctrl" if "inctrl" in methods else methods[0]
    source = write_mvtec_dataset(tmp_path / "src", categories=("grain",), n_train=3, n_test_good=2, n_test_defect=2, size=48, seed=4)
    root = tmp_path / "visa"
    rows = [["object", "split", "label", "image", "mask"]]
    for split, folder in (("train", "train/good"), ("test", "test/good")):
        for image in sorted((source / "grain" / folder).glob("*.png")):
            rows.append(["pcb9", split, "normal", str(image.relative_to(source.parent)), ""])
    for mask in sorted((source / "grain" / "ground_truth").rglob("*_mask.png")):
        image = source / "grain" / "test" / mask.parent.name / mask.name.replace("_mask", "")
        label_map = tmp_path / "src" / "labels" / f"{mask.parent.name}.png"
        label_map.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(label_map), (cv2.imread(str(mask), cv2.IMREAD_GRAYSCALE) > 0).astype(np.uint8) * 3)  # instance id 3
        rows.append(["pcb9", "test", "anomaly", str(image.relative_to(source.parent)), str(label_map.relative_to(source.parent))])
    (root / "split_csv").mkdir(parents=True)
    with (root / "split_csv" / "1cls.csv").open("w", newline="") as handle:
        csv.writer(handle).writerows(rows)
    (root / "src").symlink_to(source.parent / "src", target_is_directory=True)
    out = tmp_path / "visa.json"
    argv = ["--method", method, "--dataset", "visa", "--root", str(root), "--all-categories", "--shots", "1"]
    assert evaluate.main(argv + TINY + _small_options([method]) + ["--out", str(out)]) == 0
    run = json.loads(out.read_text())["methods"][method]["runs"]["pcb9"][0]
    assert run["num_test"] == 4 and run["num_anomalous"] == 2
    assert run["shots"][0].startswith("src/grain/train/good/")
    assert run["metrics"]["aupro"] is not None and run["metrics"]["pixel_auroc"] is not None
