"""The OpenVINO runtime of the frozen image paths (detector.runtime, issue 22).

For every method that declares an image path, ``runtime="openvino"`` equals
``runtime="torch"`` on ``score`` and ``raw_map`` to 1e-4 (square and non-square queries,
k = 1 and 4, ``predict`` and ``predict_batch``); a second process reuses the saved model; a
corrupted or stale entry is rebuilt; a failing conversion falls back to PyTorch with a
warning. Paths with fixed-shape inputs besides the images (AnoPLe's learned visual
prompts) take new input values without a new conversion. The rest of the suite runs ``DETECTOR_RUNTIME=torch`` (conftest.py); these tests
ask for their runtime explicitly and use their own cache directory.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

from detector import create_detector, list_methods, method_options, synthetic
from detector import runtime as rt
from detector.registry import get_method
from detector.runtime import cache, openvino_backend

pytest.importorskip("openvino")

TOLERANCE = 1e-4
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """One cache directory for the module (conversions are shared between its tests)."""
    directory = tmp_path_factory.mktemp("openvino-cache")
    previous = os.environ.get("DETECTOR_CACHE_DIR")
    os.environ["DETECTOR_CACHE_DIR"] = str(directory)
    rt.clear_runtime_cache()
    yield directory / "openvino"
    rt.clear_runtime_cache()
    if previous is None:
        os.environ.pop("DETECTOR_CACHE_DIR", None)
    else:
        os.environ["DETECTOR_CACHE_DIR"] = previous


def converted_methods() -> list[str]:
    """Methods that declare an image path."""
    names = []
    for name in list_methods():
        det = create_detector(name, backbone="tiny-test", backbone_weights="random", runtime="torch")
        if det._image_path() is not None:
            names.append(name)
    return names


CONVERTED = converted_methods()


def images():
    normals = [synthetic.texture("grating", 2, (64, 64), i) for i in range(4)]
    square = synthetic.add_defect(synthetic.texture("grating", 2, (72, 72), 9), 3)[0]
    wide = synthetic.add_defect(synthetic.texture("grating", 2, (60, 100), 7), 4)[0]
    tall = synthetic.texture("grating", 2, (110, 64), 5)
    return normals, [square, wide, tall]


def detector(method: str, runtime: str, k: int):
    det = create_detector(method, backbone="tiny-test", backbone_weights="random", runtime=runtime)
    normals, _ = images()
    return det.fit(normals[:k])


def differences(a, b) -> tuple[float, float]:
    score = max(abs(x.score - y.score) for x, y in zip(a, b))
    raw = max(float(np.abs(x.raw_map - y.raw_map).max()) for x, y in zip(a, b))
    return score, raw


def test_every_built_in_method_declares_an_image_path():
    assert {"inctrl", "faprompt", "anople"} <= set(CONVERTED)


@pytest.mark.parametrize("k", [1, 4])
@pytest.mark.parametrize("method", CONVERTED)
def test_openvino_equals_torch(method, k, cache_dir):
    _, queries = images()
    torch_det, ov_det = detector(method, "torch", k), detector(method, "openvino", k)
    assert torch_det.describe()["runtime"] == "torch"
    info = ov_det.describe()
    assert info["runtime"] == "openvino" and info["runtime_source"] in ("converted", "cache"), info
    expected = [torch_det.predict(q) for q in queries] + torch_det.predict_batch(queries)
    got = [ov_det.predict(q) for q in queries] + ov_det.predict_batch(queries)
    score, raw = differences(expected, got)
    print(f"{method} k={k}: max |score| diff {score:.2e}, max |raw_map| diff {raw:.2e}")
    assert score <= TOLERANCE and raw <= TOLERANCE
    assert all(not r.warnings for r in got)
    if k > 1:
        a, b = torch_det.leave_one_out(), ov_det.leave_one_out()
        if a is not None:
            assert max(abs(x[0] - y[0]) for x, y in zip(a, b)) <= TOLERANCE


def test_auto_chooses_openvino_on_cpu_and_detectors_share_it(cache_dir):
    method = CONVERTED[0]
    first = detector(method, "auto", 1)
    second = detector(method, "auto", 2)
    assert first.runtime == second.runtime == "openvino"
    assert first.prepare_runtime().run is second.prepare_runtime().run  # compiled once per process


def test_runtime_option_is_common_and_checked():
    for name in list_methods():
        assert "runtime" in method_options(name)
    with pytest.raises(ValueError, match="runtime must be one of"):
        create_detector(CONVERTED[0], backbone="tiny-test", backbone_weights="random", runtime="gpu")
    assert rt.default_runtime() == "torch"  # conftest.py


def test_choice_without_openvino_path_or_off_cpu():
    module = torch.nn.Identity()
    path = rt.ImagePath("x", "y", 8, object(), module)
    auto_gpu = rt.choose_runtime("auto", path, device="cuda")
    assert auto_gpu.runtime == "torch" and auto_gpu.warning is None and "CPU only" in auto_gpu.note
    asked_gpu = rt.choose_runtime("openvino", path, device="cuda")
    assert asked_gpu.runtime == "torch" and "CPU only" in asked_gpu.warning
    bf16 = rt.choose_runtime("auto", path, dtype=torch.bfloat16)
    assert bf16.runtime == "torch" and "fp32" in bf16.note
    none = rt.choose_runtime("openvino", None)
    assert none.runtime == "torch" and none.run is None and "no OpenVINO image path" in none.warning


def test_methods_without_a_path_run_torch_and_say_why():
    class WithoutPath(get_method(CONVERTED[0])):
        def _image_path(self):
            return None

    det = WithoutPath(backbone="tiny-test", backbone_weights="random", runtime="openvino")
    info = det.describe()
    assert info["runtime"] == "torch" and "no OpenVINO image path" in info["runtime_warning"]
    auto = WithoutPath(backbone="tiny-test", backbone_weights="random", runtime="auto").describe()
    assert auto["runtime"] == "torch" and "runtime_warning" not in auto


def test_forced_conversion_failure_falls_back_with_a_warning(cache_dir, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("conversion made to fail by the test")

    monkeypatch.setattr(openvino_backend, "export_and_convert", broken)
    monkeypatch.setattr(cache, "valid_entry", lambda key, root=None: None)  # no cached model to fall back on
    rt.clear_runtime_cache()
    try:
        _, queries = images()
        for method in CONVERTED:
            reference = detector(method, "torch", 2)
            for requested in ("openvino", "auto"):
                det = detector(method, requested, 2)
                info = det.describe()
                assert info["runtime"] == "torch" and info["runtime_requested"] == requested
                assert "conversion made to fail" in info["runtime_warning"]
                result = det.predict(queries[1])
                assert any("OpenVINO conversion failed" in w for w in result.warnings)
                assert result.score == reference.predict(queries[1]).score  # exactly the torch runtime
    finally:
        rt.clear_runtime_cache()


def test_corrupted_and_stale_entries_are_rebuilt(cache_dir):
    method = CONVERTED[0]
    _, queries = images()
    reference = detector(method, "torch", 2).predict(queries[0])
    det = detector(method, "openvino", 2)
    assert det.runtime == "openvino"
    key = rt.cache_key(det._image_path())
    entry = cache.entry_directory(key)
    assert (entry / cache.WEIGHTS_FILE).is_file() and (entry / cache.ENTRY_FILE).is_file()

    weights = entry / cache.WEIGHTS_FILE
    data = bytearray(weights.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 64] = bytes(64)  # corrupt the weights in place
    weights.write_bytes(bytes(data))
    assert cache.valid_entry(key) is None and not entry.exists()  # never trusted, removed

    rt.clear_runtime_cache()
    rebuilt = detector(method, "openvino", 2)
    info = rebuilt.describe()
    assert info["runtime"] == "openvino" and info["runtime_source"] == "converted"
    assert abs(rebuilt.predict(queries[0]).score - reference.score) <= TOLERANCE
    weights_file_digest = json.loads((entry / cache.ENTRY_FILE).read_text())["files"][cache.WEIGHTS_FILE]
    assert weights_file_digest == cache.file_digest(entry / cache.WEIGHTS_FILE)

    record = json.loads((entry / cache.ENTRY_FILE).read_text())
    record["key"]["runtime"] = "an older runtime"
    (entry / cache.ENTRY_FILE).write_text(json.dumps(record))
    assert cache.valid_entry(key) is None  # a stale record is not trusted either
    rt.clear_runtime_cache()
    assert detector(method, "openvino", 2).describe()["runtime_source"] == "converted"


SECOND_PROCESS = """
import json, sys
import torch
torch.set_num_threads(1)
from detector import create_detector, synthetic
from detector.runtime import openvino_backend
calls = []
original = openvino_backend.export_and_convert
def counted(*args, **kwargs):
    calls.append(1)
    return original(*args, **kwargs)
openvino_backend.export_and_convert = counted
det = create_detector(sys.argv[1], backbone="tiny-test", backbone_weights="random", runtime="openvino")
det.fit([synthetic.texture("grating", 2, (64, 64), i) for i in range(2)])
result = det.predict(synthetic.texture("grating", 2, (60, 90), 7))
print(json.dumps({"conversions": len(calls), "source": det.describe().get("runtime_source"),
                  "runtime": det.runtime, "score": result.score}))
"""


def test_a_second_process_reuses_the_saved_model(tmp_path):
    method = CONVERTED[-1]
    env = {**os.environ, "DETECTOR_CACHE_DIR": str(tmp_path), "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}

    def run() -> dict:
        out = subprocess.run(
            [sys.executable, "-c", SECOND_PROCESS, method], env=env, cwd=ROOT, capture_output=True, text=True, timeout=600
        )
        assert out.returncode == 0, out.stderr[-2000:]
        return json.loads(out.stdout.strip().splitlines()[-1])

    first, second = run(), run()
    assert first["runtime"] == second["runtime"] == "openvino"
    assert (first["conversions"], first["source"]) == (1, "converted")
    assert (second["conversions"], second["source"]) == (0, "cache")
    assert second["score"] == pytest.approx(first["score"], abs=1e-6)


def test_cache_root_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("DETECTOR_CACHE_DIR", str(tmp_path / "here"))
    assert rt.cache_root() == tmp_path / "here" / "openvino"
    monkeypatch.delenv("DETECTOR_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert rt.cache_root() == tmp_path / "xdg" / "clip-anomaly-detector" / "openvino"


def test_threads_follow_torch(cache_dir):
    method = CONVERTED[0]
    previous = torch.get_num_threads()
    rt.clear_runtime_cache()
    try:
        torch.set_num_threads(2)
        two = detector(method, "openvino", 1).prepare_runtime()
        torch.set_num_threads(3)
        three = detector(method, "openvino", 1).prepare_runtime()
        assert three.run is not two.run  # compiled again for the new count, from the disk cache
        assert three.runtime == "openvino" and three.source == "cache"
    finally:
        torch.set_num_threads(previous)
        rt.clear_runtime_cache()


# -- fixed-shape inputs besides the images (learned state that changes at every fit) ------------


class WithInputs(torch.nn.Module):
    """``forward(images (B, 3, S, S), offset (3,), mix (2, 3)) -> ((B, 3), (B, 2))``."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, images: torch.Tensor, offset: torch.Tensor, mix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pooled = self.conv(images).mean(dim=(2, 3)) + offset
        return pooled, pooled @ mix.t()


def test_extra_inputs_stay_inputs_of_the_converted_model(cache_dir):
    module = WithInputs().eval()
    inputs = (rt.TensorInput("offset", (3,)), rt.TensorInput("mix", (2, 3)))
    path = rt.ImagePath("test.extra-inputs", "toy", 16, module, module, ("pooled", "mixed"), inputs)
    choice = rt.choose_runtime("openvino", path)
    assert choice.runtime == "openvino", choice.warning
    assert choice.source == "converted"  # a fresh cache directory: exported and converted here
    for seed, batch in ((1, 3), (2, 1)):  # new input values and batch sizes, the same model
        generator = torch.Generator().manual_seed(seed)
        args = (torch.randn(batch, 3, 16, 16, generator=generator), torch.randn(3, generator=generator), torch.randn(2, 3, generator=generator))
        with torch.no_grad():
            expected = module(*args)
        got = choice.run(*args)
        assert [tuple(g.shape) for g in got] == [(batch, 3), (batch, 2)]
        assert max(float((g - e).abs().max()) for g, e in zip(got, expected)) <= 1e-5
    assert rt.choose_runtime("openvino", path).run is choice.run  # shared, not converted again
    with pytest.raises(ValueError, match="2 more inputs"):
        choice.run(torch.zeros(1, 3, 16, 16), torch.zeros(3))
    key = rt.cache_key(path)
    assert key.inputs == "offset:3,mix:2x3" and key.record()["inputs"] == key.inputs
    images_only = rt.cache_key(rt.ImagePath("test.images-only", "toy", 16, module, module))
    assert "inputs" not in images_only.record()  # keys of images-only paths are as before


def anople_pair(k: int, normals, **options):
    made = [create_detector("anople", backbone="tiny-test", backbone_weights="random", runtime=r, **options) for r in ("torch", "openvino")]
    return [det.fit(normals[:k]) for det in made]


def test_a_new_anople_fit_runs_on_the_model_already_converted(cache_dir):
    first_normals, queries = images()
    other_normals = [synthetic.texture("weave", 3, (64, 64), i) for i in range(3)]
    torch_det, ov_det = anople_pair(2, first_normals)
    assert ov_det.runtime == "openvino", ov_det.describe().get("runtime_warning")
    run = ov_det.prepare_runtime().run
    first_prompts = {j: p.clone() for j, p in ov_det.module.effective_prompts()[1].items()}
    assert first_prompts  # the fast preset learns visual prompts
    worst = 0.0
    for normals in (other_normals, first_normals[1:]):  # refit the same detector; a new detector too
        torch_det.fit(normals)
        ov_det.fit(normals)
        fresh_torch, fresh_ov = anople_pair(len(normals), normals)
        prompts = ov_det.module.effective_prompts()[1]
        assert any(not torch.equal(prompts[j], first_prompts[j]) for j in prompts)  # other prompts
        for t, o in ((torch_det, ov_det), (fresh_torch, fresh_ov)):
            score, raw = differences([t.predict(q) for q in queries], [o.predict(q) for q in queries])
            worst = max(worst, score, raw)
        assert ov_det.prepare_runtime().run is run and fresh_ov.prepare_runtime().run is run
    print(f"anople after refits: max difference {worst:.2e}")
    assert worst <= TOLERANCE


@pytest.mark.parametrize("options", [{"multiview_tta": True}, {"preset": "text_only"}])
def test_anople_variants_equal_torch(options, cache_dir):
    normals, queries = images()
    torch_det, ov_det = anople_pair(2, normals, **options)
    info = ov_det.describe()
    assert info["runtime"] == "openvino", info.get("runtime_warning")
    prompt_inputs = len(ov_det._image_path().inputs)
    assert prompt_inputs == 0 if options.get("preset") == "text_only" else prompt_inputs >= 1  # text_only: no visual prompts
    score, raw = differences([torch_det.predict(q) for q in queries], [ov_det.predict(q) for q in queries])
    print(f"anople {options}: max |score| diff {score:.2e}, max |raw_map| diff {raw:.2e}")
    assert score <= TOLERANCE and raw <= TOLERANCE


# -- the official architectures at random init (slow) ------------------------------------------

SLOW_BACKBONES = {"inctrl": None, "faprompt": None, "anople": None}  # None = the method's official backbone


@pytest.mark.slow
@pytest.mark.parametrize("method", [m for m in CONVERTED if m in SLOW_BACKBONES])
def test_openvino_equals_torch_on_the_official_architecture(method, tmp_path, monkeypatch):
    monkeypatch.setenv("DETECTOR_CACHE_DIR", str(tmp_path))
    rt.clear_runtime_cache()
    normals = [synthetic.texture("grating", 2, (240, 240), i) for i in range(4)]
    queries = [
        synthetic.add_defect(synthetic.texture("grating", 2, (256, 256), 9), 3)[0],
        synthetic.add_defect(synthetic.texture("grating", 2, (256, 320), 7), 4)[0],
    ]
    with tempfile.TemporaryDirectory() as directory:
        from benchmarks.measure import method_options as benchmarked_options  # the benchmarked configuration (FAPrompt: learned prompts)

        options = benchmarked_options(method, False, Path(directory))
        torch_det = create_detector(method, backbone=SLOW_BACKBONES[method], backbone_weights="random", runtime="torch", **options)
        ov_det = create_detector(method, backbone=SLOW_BACKBONES[method], backbone_weights="random", runtime="openvino", **options)
    assert ov_det.runtime == "openvino", ov_det.describe().get("runtime_warning")
    worst = (0.0, 0.0)
    for k in (1, 4):
        torch_det.fit(normals[:k])
        ov_det.fit(normals[:k])
        score, raw = differences([torch_det.predict(q) for q in queries], [ov_det.predict(q) for q in queries])
        print(f"{method} on {torch_det.backbone.spec.model_name}, k={k}: score {score:.2e}, raw_map {raw:.2e}")
        worst = (max(worst[0], score), max(worst[1], raw))
    assert worst[0] <= TOLERANCE and worst[1] <= TOLERANCE
    rt.clear_runtime_cache()
