"""``python -m detector predict``: overlays and JSON per query, without the UI (tiny backbone)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from detector import synthetic
from detector.__main__ import main as detector_main
from detector.predict import collect_normals, main

TINY = ["--backbone", "tiny-test", "--backbone-weights", "random"]


@pytest.fixture
def data(tmp_path):
    normals = tmp_path / "normals"
    normals.mkdir()
    for i in range(3):
        Image.fromarray(synthetic.texture("grain", 4, 64, i)).save(normals / f"good_{i}.png")
    (normals / "notes.txt").write_text("not an image")
    queries = []
    for i, size in enumerate([(40, 72), (56, 56)]):
        image, _ = synthetic.add_defect(synthetic.texture("grain", 4, size, 20 + i), i)
        path = tmp_path / f"query_{i}.png"
        Image.fromarray(image).save(path)
        queries.append(path)
    return normals, queries, tmp_path / "out"


def test_writes_overlay_and_json_per_query(data, capsys):
    normals, queries, out = data
    code = main(["--method", "inctrl", "faprompt", *TINY, "--normals", str(normals),
                 "--query", *map(str, queries), "--out", str(out), "--class-name", "wood", "--threshold", "0.4"])
    assert code == 0, capsys.readouterr().err
    for index, query in enumerate(queries):
        result = json.loads((out / f"{query.stem}.json").read_text())
        assert result["num_normals"] == 3 and len(result["normals"]) == 3
        assert set(result["methods"]) == {"inctrl", "faprompt"}
        for method, entry in result["methods"].items():
            assert entry["verdict"] == ("anomalous" if entry["calibrated_score"] >= 0.4 else "normal")
            assert entry["calibration"] == "leave-one-out over 3 normals"
            assert entry["describe"]["backbone"] == "tiny-test"
            assert entry["reused_fit"] == (index > 0)  # normals encoded once for all queries
            overlay = np.array(Image.open(out / entry["overlay"]))
            assert overlay.shape == (*Image.open(query).size[::-1], 3)
        assert result["methods"]["inctrl"]["describe"]["class_name"] == "wood"
    assert "query_0.png: InCTRL" in capsys.readouterr().out


def test_collect_normals_from_folder_and_files(data):
    normals, queries, _ = data
    assert [p.name for p in collect_normals([str(normals)])] == ["good_0.png", "good_1.png", "good_2.png"]
    assert collect_normals([str(queries[0])]) == [queries[0]]


def test_errors_exit_2_with_a_message(data, tmp_path, capsys):
    normals, queries, out = data
    many = tmp_path / "many"
    many.mkdir()
    for i in range(9):
        Image.fromarray(synthetic.texture("grain", 4, 32, i)).save(many / f"{i}.png")
    assert main(["--method", "faprompt", *TINY, "--normals", str(many), "--query", str(queries[0]), "--out", str(out)]) == 2
    assert "at most 8" in capsys.readouterr().err
    assert main(["--method", "anople", *TINY, "--query", str(queries[0]), "--out", str(out)]) == 2
    assert "AnoPLe needs at least 1 normal" in capsys.readouterr().err
    assert main(["--method", "inctrl", "faprompt", *TINY, "--checkpoint", "x.pt", "--normals", str(normals),
                 "--query", str(queries[0]), "--out", str(out)]) == 2
    assert "exactly one --method" in capsys.readouterr().err
    missing = str(tmp_path / "missing.png")
    assert main(["--method", "faprompt", *TINY, "--query", missing, "--out", str(out)]) == 2
    assert "not found" in capsys.readouterr().err


def test_reachable_through_python_m_detector(capsys):
    with pytest.raises(SystemExit) as exit_info:
        detector_main(["predict", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--normals", "--query", "--out", "--method", "--backbone-weights", "--threshold"):
        assert flag in text
