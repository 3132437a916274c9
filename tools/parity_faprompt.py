"""Numerical parity of ``detector.methods.faprompt`` with the official FAPrompt code.

Usage::

    python tools/parity_faprompt.py --official /path/to/FAPrompt [--images 3] [--workdir DIR] \
        [--runtime torch openvino]

``--official`` is a checkout of github.com/mala-lab/FAPrompt (commit 7e9d9d2 or later), kept
outside this repository; nothing of it is copied here. The script

1. writes a randomly initialised ViT-L-14-336 CLIP state dict (open_clip keys = OpenAI keys)
   and a few synthetic test images of different sizes and aspect ratios (one greyscale);
2. runs the official ``test.py`` (its own ``test()`` function, unmodified) in a subprocess on
   those images, with the CLIP loader pointed at the random weights and a prompt learner built
   by the official ``FAPrompt`` class (seeded) and saved in the official checkpoint format
   ``{"prompt_learner": state_dict}``; the image scores and the two per-pass similarity
   tensors are captured by wrapping the official functions that receive them;
3. builds ``create_detector("faprompt", backbone="ViT-L-14-336", backbone_weights=<file>,
   checkpoint=<file>, runtime=R)`` and compares ``score`` and ``raw_map`` (37 x 37, docs/api.md
   §5) with the official values, plus the official 518 x 518 smoothed map with ours before the
   final resize; once per runtime ``R`` given with ``--runtime`` (one or more of ``torch``,
   ``openvino``, ``auto``; default ``DETECTOR_RUNTIME`` when set, else ``auto``, docs/api.md
   §20), one detector at a time, against the same official run. Converted OpenVINO models go
   to ``DETECTOR_CACHE_DIR`` (default here: ``<workdir>/cache``);
4. prints the maximum absolute differences with the runtime each detector actually used and
   exits non-zero when one exceeds the tolerance, or when a runtime asked for explicitly
   (``torch`` / ``openvino``) is not the one in use (a failed OpenVINO conversion falls back to
   PyTorch, and that run would not test OpenVINO).

The official code needs ``thop``, ``iopath``, ``tabulate``, ``scikit-image`` and
``pkg_resources``, which play no part in inference; when they are not installed, the worker
process registers empty stand-ins for them. ViT-L at 518 px costs about 15-30 s per image per
implementation on two CPU cores; the whole run takes a few minutes and ~8 GB of memory, and the
OpenVINO conversion of the ViT-L path peaks at about 10.5 GiB.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import types
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
#: (height, width, greyscale) of the test images: non-square in both directions, one square.
IMAGE_SHAPES = ((450, 600, False), (500, 300, True), (518, 518, False), (240, 320, False))
CLIP_SEED = 7
LEARNER_SEED = 123
DESIGN = {"Prompt_length": 12, "learnabel_text_embedding_depth": 9, "learnabel_text_embedding_length": 4}
#: Values of ``--runtime`` (``detector.runtime.RUNTIMES``; not imported here, so the official
#: worker never imports ``detector``).
RUNTIMES = ("torch", "openvino", "auto")


# -- files ------------------------------------------------------------------------------------


def write_inputs(workdir: Path, count: int) -> list[Path]:
    """Random CLIP weights (``clip_random.pt``) and ``count`` test images."""
    import open_clip
    import torch
    from PIL import Image

    sys.path.insert(0, str(REPO))
    from detector import synthetic

    clip_file = workdir / "clip_random.pt"
    if not clip_file.exists():
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(CLIP_SEED)
            model = open_clip.create_model("ViT-L-14-336", pretrained=None, force_quick_gelu=True)
        torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, clip_file)
        del model
    images = []
    data = workdir / "data"
    data.mkdir(exist_ok=True)
    for index, (height, width, grey) in enumerate(IMAGE_SHAPES[:count]):
        kind = synthetic.TEXTURE_KINDS[index % len(synthetic.TEXTURE_KINDS)]
        pixels = synthetic.texture(kind, 11 + index, (height, width))
        pixels, _ = synthetic.add_defect(pixels, 5 + index)
        image = Image.fromarray(pixels)
        if grey:
            image = image.convert("L")
        path = data / f"query_{index}.png"
        image.save(path)
        images.append(path)
    meta = {
        "test": {
            "SDD": [
                {"img_path": p.name, "mask_path": "", "cls_name": "SDD", "specie_name": "good", "anomaly": 0}
                for p in images
            ]
        }
    }
    (data / "meta.json").write_text(json.dumps(meta))
    return images


# -- official side (subprocess) -----------------------------------------------------------------


def _stand_in_modules() -> None:
    """Empty stand-ins for packages the official code imports but inference never uses."""
    import importlib.machinery

    import torchvision  # noqa: F401  (imported first: it inspects installed modules)

    def missing(name: str) -> bool:
        try:
            importlib.import_module(name)
            return False
        except ImportError:
            return True

    def stand_in(name: str, **attributes) -> types.ModuleType:
        module = types.ModuleType(name)
        module.__spec__ = importlib.machinery.ModuleSpec(name, None)
        for key, value in attributes.items():
            setattr(module, key, value)
        sys.modules[name] = module
        return module

    if missing("thop"):
        stand_in("thop", profile=None)
    if missing("tabulate"):
        stand_in("tabulate", tabulate=lambda *a, **k: "")
    if missing("pkg_resources"):
        import packaging.version

        stand_in("pkg_resources", packaging=types.SimpleNamespace(version=packaging.version))
    if missing("iopath"):
        factory = types.SimpleNamespace(get=lambda key=None: types.SimpleNamespace(open=open))
        file_io = stand_in("iopath.common.file_io", PathManagerFactory=factory)
        common = stand_in("iopath.common", file_io=file_io)
        stand_in("iopath", common=common)
    if missing("skimage"):
        measure = stand_in("skimage.measure")
        stand_in("skimage", measure=measure)


def official_worker(official: Path, workdir: Path) -> None:
    """Run the official ``test.test`` on ``workdir/data`` and save what it computed."""
    import torch

    _stand_in_modules()
    sys.path.insert(0, str(official))
    os.chdir(official)
    import AnomalyCLIP_lib
    from AnomalyCLIP_lib.model_load import build_model

    spec = importlib.util.spec_from_file_location("faprompt_official_test", official / "test.py")
    official_test = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(official_test)
    faprompt_module = importlib.import_module("FAPrompt")

    def load_random_clip(name, device="cpu", design_details=None, **_):
        state = torch.load(workdir / "clip_random.pt", map_location="cpu", weights_only=True)
        model = build_model(name, state, design_details).to(device)
        return model.float(), None

    checkpoint = workdir / "official_prompt_learner.pth"
    if not checkpoint.exists():
        model, _ = load_random_clip("ViT-L/14@336px", design_details=DESIGN)
        torch.manual_seed(LEARNER_SEED)
        learner = faprompt_module.FAPrompt(model, DESIGN)
        torch.save({"prompt_learner": learner.state_dict()}, checkpoint)
        del model, learner

    captured: dict[str, list] = {"similarity": [], "smoothed": [], "scores": []}
    original_map = AnomalyCLIP_lib.get_similarity_map
    original_filter = official_test.gaussian_filter

    def record_similarity(sm, shape):
        captured["similarity"].append(sm.detach().cpu().numpy().copy())
        return original_map(sm, shape)

    def record_filter(values, sigma):
        out = original_filter(values, sigma=sigma)
        captured["smoothed"].append(np.asarray(out, dtype=np.float32)[0, 0].copy())
        return out

    def record_scores(results, obj, metric):
        captured["scores"] = [float(s) for s in results[obj]["pr_sp"]]
        return 0.0

    AnomalyCLIP_lib.load = load_random_clip
    AnomalyCLIP_lib.get_similarity_map = record_similarity
    official_test.gaussian_filter = record_filter
    official_test.image_level_metrics = record_scores
    args = argparse.Namespace(
        data_path=str(workdir / "data"),
        save_path=str(workdir / "official_log"),
        checkpoint_path=str(checkpoint),
        dataset="SDD",
        features_list=[6, 12, 18, 24],
        image_size=518,
        depth=9,
        n_ctx=12,
        t_n_ctx=4,
        feature_map_layer=[0, 1, 2, 3],
        metrics="image-level",
        seed=111,
        sigma=10,
    )
    official_test.setup_seed(args.seed)
    official_test.test(args)
    sims = captured["similarity"]
    pass1 = np.stack([s[:, 0, :] for s in sims[0::2]])  # (n, 1369, 2)
    pass2 = np.stack([s[:, 0, :] for s in sims[1::2]])
    np.savez(
        workdir / "official.npz",
        scores=np.asarray(captured["scores"], dtype=np.float64),
        pass1=pass1,
        pass2=pass2,
        smoothed=np.stack(captured["smoothed"]),
    )


# -- our side -----------------------------------------------------------------------------------


def ours(workdir: Path, images: list[Path], runtime: str) -> dict[str, np.ndarray]:
    sys.path.insert(0, str(REPO))
    from detector import create_detector, maps
    from detector.methods.faprompt import FAPromptDetector

    detector = create_detector(
        FAPromptDetector.name,
        backbone="ViT-L-14-336",
        backbone_weights=str(workdir / "clip_random.pt"),
        checkpoint=str(workdir / "official_prompt_learner.pth"),
        runtime=runtime,
    )
    scores, raw_maps, smoothed, seconds = [], [], [], []
    for path in images:
        result = detector.predict(str(path))
        scores.append(result.score)
        raw_maps.append(result.raw_map)
        smoothed.append(maps.smooth(maps.to_input_frame(result.raw_map, detector.image_size), detector.map_sigma))
        seconds.append(sum(result.timings.values()))
    return {
        "scores": np.asarray(scores),
        "raw_maps": np.stack(raw_maps),
        "smoothed": np.stack(smoothed),
        "seconds": np.asarray(seconds),
        "describe": detector.describe(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--official", required=True, type=Path, help="checkout of github.com/mala-lab/FAPrompt")
    parser.add_argument("--images", type=int, default=3, help=f"number of test images (1..{len(IMAGE_SHAPES)})")
    parser.add_argument(
        "--workdir", type=Path, default=None,
        help="where to write the files and keep them (default: a temporary folder, removed at the end)",
    )
    parser.add_argument("--tolerance", type=float, default=1e-4)
    parser.add_argument(
        "--runtime", nargs="+", choices=RUNTIMES, default=None,
        help="runtime(s) of our side, each compared with the same official run (default: DETECTOR_RUNTIME, else auto)",
    )
    parser.add_argument("--official-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    workdir = (args.workdir or Path(tempfile.mkdtemp(prefix="faprompt_parity_"))).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    official = args.official.resolve()
    if args.official_worker:
        official_worker(official, workdir)
        return 0
    if not (official / "test.py").is_file() or not (official / "FAPrompt.py").is_file():
        parser.error(f"{official} is not a FAPrompt checkout (test.py / FAPrompt.py missing)")

    os.environ.setdefault("DETECTOR_CACHE_DIR", str(workdir / "cache"))
    sys.path.insert(0, str(REPO))
    from detector.runtime import default_runtime

    runtimes = list(dict.fromkeys(args.runtime or [default_runtime()]))
    print(f"runtime(s) of our side: {', '.join(runtimes)} (OpenVINO cache {os.environ['DETECTOR_CACHE_DIR']})")
    try:
        return compare(official, workdir, args.images, args.tolerance, runtimes)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)


def compare(official: Path, workdir: Path, count: int, tolerance: float, runtimes: list[str]) -> int:
    """Run both implementations (ours once per runtime) and print the differences; 0 when
    every runtime is within ``tolerance`` and is the one that ran."""
    count = max(1, min(count, len(IMAGE_SHAPES)))
    images = write_inputs(workdir, count)
    print(f"work directory: {workdir}")
    print("running the official code ...", flush=True)
    subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--official", str(official), "--workdir", str(workdir), "--official-worker"],
        check=True,
    )
    reference = np.load(workdir / "official.npz")
    grid = int(round(reference["pass1"].shape[1] ** 0.5))
    p1, p2 = reference["pass1"], reference["pass2"]
    official_raw = ((p1[..., 1] + 1 - p1[..., 0] + p2[..., 1] + 1 - p2[..., 0]) / 4).reshape(-1, grid, grid)
    print(f"pass 1 vs pass 2 (effect of the prior) in the official output: max |diff| {np.abs(p1 - p2).max():.3e}")
    failed: list[str] = []
    summary: list[str] = []
    for runtime in runtimes:
        print(f"running detector.methods.faprompt, runtime {runtime} ...", flush=True)
        mine = ours(workdir, images, runtime)
        gc.collect()  # one detector at a time (ViT-L, and the OpenVINO conversion's peak)
        facts = {k: v for k, v in mine["describe"].items() if k.startswith("runtime")}
        in_use = facts["runtime"]
        score_diff = np.abs(reference["scores"] - mine["scores"])
        raw_diff = np.abs(official_raw - mine["raw_maps"]).reshape(len(images), -1).max(axis=1)
        smooth_diff = np.abs(reference["smoothed"] - mine["smoothed"]).reshape(len(images), -1).max(axis=1)
        details = ", ".join(f"{k} {v}" for k, v in facts.items() if k != "runtime")
        print(f"backbone: {mine['describe']['backbone']} ({mine['describe']['backbone_weights']}), grid {grid}x{grid}")
        print(f"runtime requested {runtime}, in use {in_use} ({details})")
        for i, path in enumerate(images):
            print(
                f"{path.name}: score official {reference['scores'][i]:.6f} ours {mine['scores'][i]:.6f} "
                f"|diff| {score_diff[i]:.2e}; raw_map max |diff| {raw_diff[i]:.2e} "
                f"(official range {official_raw[i].min():.4f}..{official_raw[i].max():.4f}); "
                f"518px smoothed map max |diff| {smooth_diff[i]:.2e}; ours {mine['seconds'][i]:.1f} s"
            )
        line = (
            f"{runtime} -> {in_use}: max |score diff| = {score_diff.max():.3e}, max |raw_map diff| = "
            f"{raw_diff.max():.3e}, max |518px map diff| = {smooth_diff.max():.3e}"
        )
        summary.append(line)
        if max(score_diff.max(), raw_diff.max(), smooth_diff.max()) > tolerance:
            failed.append(f"{runtime}: difference over {tolerance:g}")
        if facts.get("runtime_warning") or (runtime != "auto" and in_use != runtime):
            problem = facts.get("runtime_warning") or f"asked for {runtime}, ran {in_use}"
            print(f"runtime {runtime} NOT TESTED: {problem}")
            failed.append(f"runtime {runtime} ({problem})")
    print(f"\nmax abs differences over {len(images)} images (tolerance {tolerance:g}), requested -> in use:")
    for line in summary:
        print(f"  {line}")
    if failed:
        print(f"PARITY FAILED: {'; '.join(failed)}")
        return 1
    print("PARITY OK")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
