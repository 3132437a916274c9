"""Reliability and safety through the ``detector`` API and the service (tiny-test backbone).

Bad inputs of every kind give a correct result or a clear error; hostile checkpoints are
refused without running their code; concurrent requests stay isolated; memory and caches
stay bounded. Every file is generated here (no binary test data). The same matrix runs
through the app in ``test_reliability_app.py``.
"""

from __future__ import annotations

import io
import os
import pickle
import re
import struct
import threading
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from detector import create_detector, limits, synthetic
from detector.errors import CheckpointError, InvalidImageError
from detector.service import InspectionService, ServiceConfig

TINY = dict(backbone="tiny-test", backbone_weights="random")


# ---------------------------------------------------------------------------------------
# Generators of bad and unusual inputs (shared with test_reliability_app.py)
# ---------------------------------------------------------------------------------------
def texture(seed: int, size=(48, 64)) -> np.ndarray:
    """A deterministic uint8 RGB texture of ``size`` = (height, width)."""
    return synthetic.texture("weave", 7, size, seed)


def _save(image: Image.Image, path: Path, **kwargs) -> Path:
    image.save(path, **kwargs)
    return path


def _encoded(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def _chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload) & 0xFFFFFFFF)


def bomb_png(width: int = 30000, height: int = 30000) -> bytes:
    """A PNG of a few dozen bytes whose header claims ``width`` x ``height`` RGB pixels."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + _chunk(b"IEND", b"")


def composite_on_white(rgba: np.ndarray) -> np.ndarray:
    """Independent reference: ``round((c * a + 255 * (255 - a)) / 255)`` per channel."""
    color = rgba[..., :3].astype(np.float64)
    alpha = rgba[..., 3:4].astype(np.float64)
    return np.round((color * alpha + 255.0 * (255.0 - alpha)) / 255.0).astype(np.uint8)


@dataclass(frozen=True)
class Case:
    """One input file and what must come out of it.

    ``error``: regex of the refusal message (``None`` = a result is expected).
    ``expected``: the RGB pixels the result must be computed from (``None`` = no check).
    ``warning``: regex one of the result's warnings must match.
    ``shape``: ``(height, width)`` of the displayed image.
    """

    name: str
    path: Path
    error: str | None = None
    expected: np.ndarray | None = None
    warning: str | None = None
    shape: tuple[int, int] | None = None


def _rgba_case(folder: Path) -> Case:
    rgba = np.dstack([texture(1), np.full((48, 64), 255, np.uint8)])
    rgba[:, :20, 3] = 0  # fully transparent band
    rgba[:, 20:30, 3] = 100  # half transparent band
    return Case("rgba", _save(Image.fromarray(rgba, "RGBA"), folder / "rgba.png"), expected=composite_on_white(rgba))


def _la_case(folder: Path) -> Case:
    gray = texture(2)[..., 0]
    alpha = np.full_like(gray, 255)
    alpha[10:30] = 0
    la = np.dstack([gray, alpha])
    expected = composite_on_white(np.dstack([gray, gray, gray, alpha]))
    return Case("la", _save(Image.fromarray(la, "LA"), folder / "la.png"), expected=expected)


def _palette_case(folder: Path) -> Case:
    image = Image.fromarray(texture(3)).quantize(16)
    indices = np.array(image)
    transparent = int(indices[0, 0])
    path = _save(image, folder / "palette.png", transparency=transparent)
    reference = np.array(Image.open(path).convert("RGBA"))
    assert (reference[..., 3] == 0).any()
    return Case("palette_transparency", path, expected=composite_on_white(reference))


def _gray16_case(folder: Path) -> Case:
    ramp = (np.arange(48 * 64, dtype=np.uint32).reshape(48, 64) * 21 % 65536).astype(np.uint16)
    path = _save(Image.fromarray(ramp), folder / "gray16.png")
    assert Image.open(path).mode.startswith("I")
    gray8 = np.round(ramp.astype(np.float64) / 257.0).astype(np.uint8)
    return Case("gray16", path, expected=np.dstack([gray8] * 3))


def _float_tiff_case(folder: Path) -> Case:
    values = (texture(4)[..., 1].astype(np.float32) / 255.0) ** 2
    path = _save(Image.fromarray(values, "F"), folder / "float.tiff")
    gray8 = np.floor(values.astype(np.float64) * 255.0 + 0.5).astype(np.uint8)
    return Case("float_tiff", path, expected=np.dstack([gray8] * 3), warning=r"float.*scaled by 255")


def _cmyk_case(folder: Path) -> Case:
    path = _save(Image.fromarray(texture(5)).convert("CMYK"), folder / "cmyk.jpg", quality=95)
    assert Image.open(path).mode == "CMYK"
    return Case("cmyk_jpeg", path, expected=np.array(Image.open(path).convert("RGB")))


def _exif_case(folder: Path) -> Case:
    stored = texture(6, (40, 72))
    stored[:, :12] = 0
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: the viewer turns it 90 degrees clockwise
    path = _save(Image.fromarray(stored), folder / "rotated.jpg", exif=exif, quality=95)
    raw = np.array(Image.open(path))  # as stored, orientation not applied
    upright = np.ascontiguousarray(np.rot90(raw, k=-1))
    return Case("exif_rotated", path, expected=upright, shape=(72, 40))


def _gif_case(folder: Path) -> Case:
    frames = [Image.fromarray(texture(7 + i)).quantize(32) for i in range(3)]
    path = folder / "animated.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)
    with Image.open(path) as gif:
        assert gif.n_frames == 3
        first = np.array(gif.convert("RGB"))
    return Case("animated_gif", path, expected=first, warning=r"animated image \(GIF\): first frame used")


def bad_input_cases(folder: Path) -> list[Case]:
    """Every case of the matrix, written into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(5)
    good_png = _encoded(Image.fromarray(texture(9, (64, 64))), "PNG")
    noisy_jpeg = _encoded(Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)), "JPEG", quality=95)

    def write(name: str, data: bytes) -> Path:
        path = folder / name
        path.write_bytes(data)
        return path

    too_small = r"too small: {0}x{0} pixels; each side must be at least " + str(limits.MIN_IMAGE_SIDE)
    cases = [
        Case("unreadable_bytes", write("noise.png", rng.integers(0, 256, 4096, dtype=np.uint8).tobytes()),
             error=r"noise\.png' is not a recognised image"),
        Case("text_as_png", write("notes.png", b"Inspection notes: nothing to see here.\n" * 20),
             error=r"notes\.png' is not a recognised image"),
        Case("truncated_jpeg", write("cut.jpg", noisy_jpeg[: len(noisy_jpeg) // 2]), error=r"cut\.jpg' is truncated"),
        Case("truncated_png", write("cut.png", good_png[: len(good_png) // 2]), error=r"cut\.png' is (truncated|corrupt)"),
        Case("decompression_bomb", write("bomb.png", bomb_png()),
             error=r"bomb\.png' is too large: (30000x30000 = )?900,000,000 pixels; the limit is "
             + f"{limits.MAX_IMAGE_PIXELS:,}"),
        Case("one_pixel", _save(Image.new("RGB", (1, 1), (200, 10, 10)), folder / "one.png"), error=too_small.format(1)),
        Case("seven_pixels", _save(Image.fromarray(texture(8, (16, 16))[:7, :7].copy()), folder / "seven.png"), error=too_small.format(7)),
        _rgba_case(folder),
        _la_case(folder),
        _palette_case(folder),
        _gray16_case(folder),
        _float_tiff_case(folder),
        _cmyk_case(folder),
        _exif_case(folder),
        _gif_case(folder),
        Case("elongated_5000x50", _save(Image.fromarray(texture(10, (50, 5000))), folder / "strip.png"),
             expected=texture(10, (50, 5000))),
    ]
    return cases


CASE_NAMES = [
    "unreadable_bytes", "text_as_png", "truncated_jpeg", "truncated_png", "decompression_bomb", "one_pixel",
    "seven_pixels", "rgba", "la", "palette_transparency", "gray16", "float_tiff", "cmyk_jpeg", "exif_rotated",
    "animated_gif", "elongated_5000x50",
]


def displayed_shape(case: Case) -> tuple[int, int]:
    if case.shape is not None:
        return case.shape
    assert case.expected is not None
    return tuple(case.expected.shape[:2])


# ---------------------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cases(tmp_path_factory) -> dict[str, Case]:
    built = {case.name: case for case in bad_input_cases(tmp_path_factory.mktemp("bad_inputs"))}
    assert sorted(built) == sorted(CASE_NAMES)
    return built


@pytest.fixture(scope="module")
def normals() -> list[np.ndarray]:
    return [texture(20, (64, 64)), texture(21, (64, 64))]


@pytest.fixture(scope="module")
def inctrl(normals):
    detector = create_detector("inctrl", **TINY)
    detector.fit(normals)
    return detector


# ---------------------------------------------------------------------------------------
# 1. The bad-input matrix through the API
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", CASE_NAMES)
def test_bad_input_as_query(name, cases, inctrl, normals):
    case = cases[name]
    if case.error is not None:
        with pytest.raises(InvalidImageError, match=case.error):
            inctrl.predict(case.path)
    else:
        result = inctrl.predict(case.path)
        assert result.anomaly_map.shape == displayed_shape(case)
        assert np.isfinite(result.score) and np.all(np.isfinite(result.anomaly_map))
        if case.expected is not None:
            reference = inctrl.predict(case.expected)  # the pixels the file must decode to
            assert result.score == pytest.approx(reference.score, abs=1e-6)
            np.testing.assert_allclose(result.anomaly_map, reference.anomaly_map, atol=1e-6)
        if case.warning is not None:
            assert any(re.search(case.warning, w) for w in result.warnings), result.warnings
        else:
            assert not any("frame" in w for w in result.warnings)
    # The detector keeps working after every case.
    assert inctrl.predict(normals[0]).anomaly_map.shape == (64, 64)


@pytest.mark.parametrize("name", ["unreadable_bytes", "truncated_png", "decompression_bomb", "seven_pixels"])
def test_bad_input_as_normal_image(name, cases, normals):
    detector = create_detector("inctrl", **TINY)
    with pytest.raises(InvalidImageError, match=cases[name].error):
        detector.fit([normals[0], cases[name].path])
    with pytest.raises(RuntimeError, match="fit"):
        detector.predict(normals[0])  # a failed fit leaves nothing half-fitted behind
    detector.fit(normals)
    assert np.isfinite(detector.predict(normals[1]).score)


def test_unusual_images_as_normals_give_the_same_fit_as_their_pixels(cases, normals):
    """Transparent, 16-bit and rotated files as normals equal their decoded pixels."""
    names = ["rgba", "gray16", "exif_rotated", "animated_gif"]
    from_files = create_detector("inctrl", **TINY)
    from_files.fit([cases[n].path for n in names])
    from_pixels = create_detector("inctrl", **TINY)
    from_pixels.fit([cases[n].expected for n in names])
    for query in normals:
        assert from_files.predict(query).score == pytest.approx(from_pixels.predict(query).score, abs=1e-6)


def test_few_shot_methods_refuse_zero_normals():
    for method in ("inctrl", "anople"):
        detector = create_detector(method, **TINY)
        with pytest.raises(ValueError, match=r"needs at least 1 normal image"):
            detector.fit([])
        with pytest.raises(RuntimeError, match=r"call fit\(\)"):
            detector.predict(texture(1))


def too_many_normals_pattern(count: int) -> str:
    """The part of the "too many normal images" message shared by the API, service and app."""
    return rf"{count} normal images .*at most {limits.MAX_NORMAL_IMAGES} are accepted"


@pytest.mark.parametrize("method", ["inctrl", "faprompt"])
def test_more_normals_than_the_limit_are_refused(method):
    count = limits.MAX_NORMAL_IMAGES + 1
    detector = create_detector(method, **TINY)
    with pytest.raises(ValueError, match=too_many_normals_pattern(count)):
        detector.fit([texture(i) for i in range(count)])
    service = InspectionService(ServiceConfig(**TINY))
    with pytest.raises(ValueError, match=too_many_normals_pattern(count)):
        service.inspect([method], [texture(i) for i in range(count)], texture(0))
    assert service.cached_keys() == []


def test_same_file_as_normal_and_query(tmp_path):
    """The query equals the only normal image: InCTRL's patch residuals vanish."""
    path = _save(Image.fromarray(texture(11, (64, 64))), tmp_path / "same.png")
    detector = create_detector("inctrl", **TINY)
    detector.fit([path])
    result = detector.predict(path)
    assert result.raw_map.max() < 1e-4 and result.extras["max_patch_residual"] < 1e-4
    other = detector.predict(texture(12, (64, 64)))
    assert other.raw_map.max() > 100 * max(result.raw_map.max(), 1e-6)
    faprompt = create_detector("faprompt", **TINY)
    faprompt.fit([path])
    assert np.isfinite(faprompt.predict(path).score)


# ---------------------------------------------------------------------------------------
# 2. Checkpoints: wrong method, wrong shots, hostile pickles
# ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """Official-layout and own-format files for InCTRL and FAPrompt, built from our modules."""
    from detector.checkpoints import save_safetensors
    from detector.methods.faprompt import FAPromptLearner
    from detector.methods.inctrl import checkpoint_header

    folder = tmp_path_factory.mktemp("checkpoints")
    inctrl = create_detector("inctrl", **TINY)
    heads = {k: v.clone() for k, v in inctrl.heads.state_dict().items()}
    faprompt = create_detector("faprompt", **TINY)
    learner = FAPromptLearner.for_backbone(faprompt.backbone).state_dict()
    files = {
        "inctrl_official": folder / "inctrl_heads.pyth",
        "faprompt_official": folder / "faprompt_learner.pth",
        "inctrl_shots8": folder / "inctrl_shots8.safetensors",
        "faprompt_own": folder / "faprompt_own.safetensors",
    }
    torch.save({"model_state": heads}, files["inctrl_official"])
    torch.save({"prompt_learner": learner}, files["faprompt_official"])
    save_safetensors(files["inctrl_shots8"], heads, checkpoint_header(backbone="tiny-test", shots=8, epoch=1))
    save_safetensors(files["faprompt_own"], learner, {"method": "faprompt", "backbone": "tiny-test"})
    return files


@pytest.mark.parametrize(
    "method, file, message",
    [
        ("inctrl", "faprompt_official", r"faprompt_learner\.pth holds no tensors at its top level, only the group\(s\) .prompt_learner.*another method"),
        ("inctrl", "faprompt_own", r"written for method 'faprompt', not 'inctrl'"),
        ("faprompt", "inctrl_official", r"does not fit the FAPrompt prompt learner.*missing keys"),
        ("faprompt", "inctrl_shots8", r"written for the method 'inctrl', not faprompt"),
        ("anople", "inctrl_shots8", r"not an AnoPLe learned-state file"),
    ],
)
def test_checkpoint_for_the_wrong_method_is_refused(method, file, message, checkpoints):
    with pytest.raises(CheckpointError, match=message):
        create_detector(method, checkpoint=str(checkpoints[file]), **TINY)


def test_checkpoints_of_the_right_method_load(checkpoints, normals):
    """The files used above are valid for their own method (so the refusals mean something)."""
    inctrl = create_detector("inctrl", checkpoint=str(checkpoints["inctrl_official"]), **TINY)
    faprompt = create_detector("faprompt", checkpoint=str(checkpoints["faprompt_official"]), **TINY)
    assert inctrl.describe()["trained"] and faprompt.describe()["trained"]


def test_checkpoint_shot_count_mismatch_warns(checkpoints, normals):
    detector = create_detector("inctrl", checkpoint=str(checkpoints["inctrl_shots8"]), **TINY)
    detector.fit(normals)
    result = detector.predict(texture(3))
    assert any("trained with 8 normal images per query, 2 are fitted" in w for w in result.warnings)
    assert detector.describe()["checkpoint_shots"] == 8
    service = InspectionService(ServiceConfig(checkpoints={"inctrl": str(checkpoints["inctrl_shots8"])}, **TINY))
    outcome = service.inspect(["inctrl"], normals, texture(3)).outcomes[0]
    assert any("trained with 8 normal images" in w for w in outcome.summary(0.5)["warnings"])
    matched = create_detector("inctrl", checkpoint=str(checkpoints["inctrl_shots8"]), **TINY)
    matched.fit([texture(30 + i) for i in range(8)])
    assert not any("normal images per query" in w for w in matched.predict(texture(3)).warnings)


class _WritesMarker:
    """Unpickling this object runs code that creates a file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('code ran')",))


def hostile_checkpoints(folder: Path, marker: Path) -> dict[str, Path]:
    """Weight files whose unpickling would create ``marker``: raw pickle, torch zip, and a
    torch zip dressed up as a TorchScript archive."""
    payload = {"model_state": {"adapter.weight": torch.zeros(2, 2), "hook": _WritesMarker(marker)}}
    files = {"raw_pickle": folder / "evil.pth", "torch_zip": folder / "evil.pyth", "fake_torchscript": folder / "evil.pt"}
    files["raw_pickle"].write_bytes(pickle.dumps(payload, protocol=2))
    torch.save(payload, files["torch_zip"])
    import zipfile

    with zipfile.ZipFile(files["torch_zip"]) as source, zipfile.ZipFile(files["fake_torchscript"], "w") as target:
        for item in source.infolist():
            target.writestr(item, source.read(item.filename))
        prefix = source.namelist()[0].split("/")[0]
        target.writestr(f"{prefix}/code/__torch__.py", "")
    return files


def test_hostile_pickle_really_runs_code_when_unpickled_unsafely(tmp_path):
    """Sanity check of the generator: an unrestricted unpickler creates the marker."""
    marker = tmp_path / "marker_sanity"
    files = hostile_checkpoints(tmp_path, marker)
    pickle.loads(files["raw_pickle"].read_bytes())
    assert marker.exists()


@pytest.mark.parametrize("method", ["inctrl", "faprompt", "anople"])
@pytest.mark.parametrize("kind", ["raw_pickle", "torch_zip", "fake_torchscript"])
def test_hostile_checkpoint_is_refused_without_running_code(method, kind, tmp_path):
    marker = tmp_path / "marker"
    files = hostile_checkpoints(tmp_path, marker)
    with pytest.raises(CheckpointError):
        create_detector(method, checkpoint=str(files[kind]), **TINY)
    assert not marker.exists(), "loading a checkpoint executed code from it"


def test_read_state_dict_refuses_hostile_files(tmp_path):
    from detector.checkpoints import read_state_dict

    marker = tmp_path / "marker"
    for path in hostile_checkpoints(tmp_path, marker).values():
        with pytest.raises(CheckpointError):
            read_state_dict(path)
    assert not marker.exists()


# ---------------------------------------------------------------------------------------
# 3. Concurrency: shared models, isolated per-request state
# ---------------------------------------------------------------------------------------
def normal_set(index: int) -> list[np.ndarray]:
    """A distinct normal set per request (different textures and counts)."""
    kinds = ("weave", "grain", "blobs", "grating")
    return [synthetic.texture(kinds[index % len(kinds)], 100 + index, (64, 64), j) for j in range(1 + index % 3)]


def query_for(index: int) -> np.ndarray:
    image, _ = synthetic.add_defect(synthetic.texture("weave", 200 + index, (48, 64), 0), index)
    return image


def parameter_digest(module: torch.nn.Module) -> float:
    with torch.no_grad():
        return float(sum(p.double().sum() * (i + 1) for i, p in enumerate(module.parameters())))


def test_concurrent_service_requests_are_isolated():
    """20 threads, each with its own normal set, through one service (small cache so that
    entries are evicted while others run): every score equals the same request run alone."""
    requests = [(("inctrl", "faprompt", "anople")[i % 3], normal_set(i), query_for(i)) for i in range(20)]
    options = {"anople": {"steps": 1}}
    alone = {}
    for i, (method, normals_i, query) in enumerate(requests):
        solo = InspectionService(ServiceConfig(**TINY))
        alone[i] = solo.inspect([method], normals_i, query, options=options).outcomes[0].result
    from detector.backbone import load_backbone

    shared = InspectionService(ServiceConfig(**TINY), cache_size=3)
    backbone = load_backbone("tiny-test", "random")
    before = parameter_digest(backbone.model)
    results: dict[int, object] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(len(requests))

    def run(i: int) -> None:
        method, normals_i, query = requests[i]
        try:
            start.wait()
            results[i] = shared.inspect([method], normals_i, query, options=options).outcomes[0].result
        except BaseException as error:  # reported below
            errors.append(error)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(requests))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors, errors
    for i, result in results.items():
        assert result.score == pytest.approx(alone[i].score, abs=1e-5), f"request {i} ({requests[i][0]})"
        np.testing.assert_allclose(result.anomaly_map, alone[i].anomaly_map, atol=1e-5)
    assert len(results) == len(requests)
    assert len(shared.cached_keys()) <= 3
    # The shared backbone was read, never written (AnoPLe learns prompts beside it).
    assert parameter_digest(backbone.model) == before
    assert all(not p.requires_grad for p in backbone.model.parameters())


# ---------------------------------------------------------------------------------------
# 4. Bounded memory
# ---------------------------------------------------------------------------------------
#: Largest resident-memory growth accepted over 100 requests after warm-up (documented in
#: docs/api.md §12).
MEMORY_GROWTH_BOUND_MB = 150


def test_memory_stays_bounded_over_100_new_normal_sets():
    import gc

    import psutil

    process = psutil.Process(os.getpid())
    service = InspectionService(ServiceConfig(**TINY))
    query = query_for(0)

    def request(i: int) -> None:
        normals_i = [synthetic.texture("grain", 1000 + i, (64, 64), j) for j in range(2)]
        methods = ["inctrl", "faprompt"] if i % 10 == 0 else ["inctrl"]
        service.inspect(methods, normals_i, query)
        assert len(service.cached_keys()) <= limits.FITTED_DETECTOR_CACHE_SIZE

    for i in range(15):  # warm-up: fills the cache and the allocators
        request(i)
    gc.collect()
    baseline = process.memory_info().rss
    for i in range(15, 115):
        request(i)
    gc.collect()
    growth_mb = (process.memory_info().rss - baseline) / 2**20
    assert growth_mb < MEMORY_GROWTH_BOUND_MB, f"RSS grew by {growth_mb:.0f} MB over 100 requests"
    assert service.fit_count == 115 + 12  # every normal set is new: one fit per method run
    assert len(service.cached_keys()) == limits.FITTED_DETECTOR_CACHE_SIZE
    assert len(service._key_locks) <= limits.FITTED_DETECTOR_CACHE_SIZE


def test_backbone_cache_is_bounded():
    """Backbones at more distinct sizes than the cache holds: the oldest are dropped."""
    from detector import backbone as backbone_module

    first = backbone_module.load_backbone("tiny-test", "random", image_size=72)
    for size in (80, 88, 96, 104, 112):
        backbone_module.load_backbone("tiny-test", "random", image_size=size)
        info = backbone_module._build_cached.cache_info()
        assert info.maxsize == limits.BACKBONE_CACHE_SIZE and info.currsize <= limits.BACKBONE_CACHE_SIZE
    assert backbone_module.load_backbone("tiny-test", "random", image_size=72) is not first  # evicted, rebuilt


# ---------------------------------------------------------------------------------------
# 5. Limits in one place
# ---------------------------------------------------------------------------------------
def test_limits_are_sane_and_used_by_the_package():
    assert 1 <= limits.MIN_NORMAL_IMAGES <= limits.MAX_NORMAL_IMAGES
    assert limits.MIN_IMAGE_SIDE >= 1 and limits.MAX_ASPECT_RATIO >= 1
    assert limits.MAX_IMAGE_PIXELS < 30000 * 30000
    assert limits.MAX_CONCURRENT_JOBS >= 1 and limits.MAX_QUEUED_JOBS >= 1
    assert limits.REQUEST_TIMEOUT_SECONDS > 0
    assert InspectionService().cache_size == limits.FITTED_DETECTOR_CACHE_SIZE


def test_image_limits_follow_the_limits_module(monkeypatch):
    """The loader reads the limits at call time from detector.limits (one place)."""
    from detector.images import load_image

    image = texture(1, (40, 60))
    load_image(image)
    monkeypatch.setattr(limits, "MAX_IMAGE_PIXELS", 40 * 60 - 1)
    with pytest.raises(InvalidImageError, match="too large"):
        load_image(image)
    monkeypatch.setattr(limits, "MAX_IMAGE_PIXELS", 10**9)
    monkeypatch.setattr(limits, "MIN_IMAGE_SIDE", 41)
    with pytest.raises(InvalidImageError, match="too small"):
        load_image(image)
    monkeypatch.setattr(limits, "MIN_IMAGE_SIDE", 8)
    monkeypatch.setattr(limits, "MAX_ASPECT_RATIO", 1.4)
    with pytest.raises(InvalidImageError, match="too elongated"):
        load_image(image)
    monkeypatch.setattr(limits, "MAX_ASPECT_RATIO", 200.0)
    monkeypatch.setattr(limits, "MAX_NORMAL_IMAGES", 2)
    with pytest.raises(ValueError, match=too_many_normals_pattern(3)):
        create_detector("inctrl", **TINY).fit([image] * 3)


def test_request_timeout_stops_a_long_fit_and_caches_nothing():
    """``timeout`` stops AnoPLe's prompt learning at the next step; the service keeps serving."""
    import time

    from detector.service import RequestTimeoutError

    service = InspectionService(ServiceConfig(**TINY))
    normals_i = normal_set(1)
    started = time.perf_counter()
    with pytest.raises(RequestTimeoutError, match=r"time limit of 0\.5 s"):
        service.inspect(["anople"], normals_i, query_for(1), options={"anople": {"steps": 100000}}, timeout=0.5)
    assert time.perf_counter() - started < 10, "the fit was not stopped near its time limit"
    assert service.cached_keys() == [] and service.fit_count == 0
    assert service._key_locks == {}, "a failed fit left its lock behind"
    report = service.inspect(["inctrl"], normals_i, query_for(1), timeout=limits.REQUEST_TIMEOUT_SECONDS)
    assert np.isfinite(report.outcomes[0].result.score)
