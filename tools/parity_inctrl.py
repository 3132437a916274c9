"""Numeric parity of ``detector.methods.inctrl`` with the official InCTRL implementation.

Usage::

    git clone https://github.com/mala-lab/InCTRL /tmp/InCTRL      # outside this repository
    HF_HUB_OFFLINE=1 python tools/parity_inctrl.py /tmp/InCTRL [--work DIR] [--shots 2 4 8] \
        [--runtime torch openvino] [--reuse-official]

What it does:

1. builds a random full InCTRL checkpoint in the official format (a flat 345-key state dict:
   the CLIP ``ViT-B-16-plus-240`` weights at a random initialisation plus our randomly
   initialised heads with randomised batch-norm statistics) and saves it with ``torch.save``
   as ``checkpoint.pyth``;
2. writes synthetic normal and query images (PNG, square and non-square);
3. runs the official code in a separate process (its ``open_clip`` package shadows the pip
   one, so the two cannot share a process). The official model is built as its test script
   does, loads the checkpoint with ``load_state_dict(strict=True)`` and scores each query with
   batch size 1 on CPU. Only environment glue is added around it: ``.cuda()`` becomes a no-op,
   missing logging packages are stubbed, and ``encode_text`` is memoised per token tensor
   (same inputs, same outputs; the official forward re-encodes 242 prompts per query).
   The official forward returns ``(score, image_residual_score)``; a wrapper around
   ``diff_head.forward`` records its input (the holistic map) and output (holistic score), from which
   ``max_patch_residual = 2 * score - holistic_score``, ``M = holistic_map - max(holistic_map)
   + max_patch_residual`` and ``text_score = max(holistic_map) - image_residual_score -
   max_patch_residual`` follow exactly (up to float32 rounding);
4. runs ``create_detector("inctrl", checkpoint=checkpoint.pyth, runtime=R, ...)`` on the same
   files (``predict`` and ``predict_batch``) once per runtime ``R`` given with ``--runtime``
   (one or more of ``torch``, ``openvino``, ``auto``; default ``DETECTOR_RUNTIME`` when set,
   else ``auto``, docs/api.md §20) and prints the largest absolute differences, one column
   per runtime, with the runtime each detector actually used. The official side runs once
   for all of them. Converted OpenVINO models go to ``DETECTOR_CACHE_DIR`` (default here:
   ``<work>/cache``, so the random weights do not fill the user cache).

Exits with status 1 when any difference exceeds ``--tolerance`` (default 1e-4), or when a
runtime asked for explicitly (``torch`` / ``openvino``) is not the one in use (e.g. the
OpenVINO conversion failed and PyTorch ran instead: that run would not test OpenVINO).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

#: Query images: (height, width), class name used in the prompts.
QUERIES = (
    ((240, 240), "object"),
    ((300, 420), "metal_nut"),
    ((517, 333), "object"),
    ((256, 256), "bird"),  # the single-prompt (CIFAR-10) branch
)
NORMAL_SIZES = ((240, 240), (320, 256), (260, 390), (240, 240), (480, 360), (250, 250), (333, 517), (300, 300))
COMPONENTS = ("score", "text_score", "image_residual_score", "holistic_score", "max_patch_residual")
#: Values of ``--runtime`` (``detector.runtime.RUNTIMES``; not imported here, so the official
#: side never imports ``detector``).
RUNTIMES = ("torch", "openvino", "auto")


# -- official side (runs in its own process, never imports ``detector``) -----------------------


def _install_official_environment(official: Path) -> None:
    """Make the official package importable on CPU without its optional logging deps."""
    import importlib.abc
    import importlib.machinery
    import types

    import torch

    sys.path.insert(0, str(official))
    sys.modules.setdefault("simplejson", json)

    class _Anything:
        def __init__(self, *args, **kwargs) -> None:
            pass

        def __call__(self, *args, **kwargs):
            return _Anything()

        def __getattr__(self, name):
            return _Anything()

    class _StubModule(types.ModuleType):
        __path__: list[str] = []

        def __getattr__(self, name):
            if name.startswith("__"):
                raise AttributeError(name)
            return _Anything()

    class _StubFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
        stubbed = {"iopath", "fvcore"}

        def find_spec(self, name, path, target=None):
            if name.split(".")[0] in self.stubbed:
                return importlib.machinery.ModuleSpec(name, self, is_package=True)
            return None

        def create_module(self, spec):
            return _StubModule(spec.name)

        def exec_module(self, module) -> None:
            pass

    sys.meta_path.insert(0, _StubFinder())
    torch.Tensor.cuda = lambda self, *args, **kwargs: self  # type: ignore[method-assign]
    original_to = torch.Tensor.to

    def to_cpu(self, *args, **kwargs):
        if args and isinstance(args[0], str) and args[0].startswith("cuda"):
            args = ("cpu",) + args[1:]
        return original_to(self, *args, **kwargs)

    torch.Tensor.to = to_cpu  # type: ignore[method-assign]


def run_official(official: Path, job_file: Path, out_file: Path) -> None:
    """Score every (k, query) of the job with the official model; write an ``.npz``."""
    _install_official_environment(official)
    import torch
    from PIL import Image
    from torchvision import transforms

    import open_clip  # the official package (first on sys.path)
    from open_clip.model import InCTRL

    assert Path(open_clip.__file__).resolve().is_relative_to(official.resolve()), open_clip.__file__
    job = json.loads(job_file.read_text())
    config = json.loads((official / "open_clip/model_configs/ViT-B-16-plus-240.json").read_text())
    model = InCTRL(None, config["embed_dim"], config["vision_cfg"], config["text_cfg"], False, cast_dtype=None)
    state = torch.load(job["checkpoint"], map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    model.eval()
    tokenizer = open_clip.get_tokenizer("ViT-B-16-plus-240")

    memo: dict[bytes, torch.Tensor] = {}
    encode_text = model.encode_text

    def memoised_encode_text(text, normalize: bool = False):
        key = text.numpy().tobytes() + bytes([normalize])
        if key not in memo:
            memo[key] = encode_text(text, normalize=normalize)
        return memo[key]

    model.encode_text = memoised_encode_text  # type: ignore[method-assign]

    # The official forward calls ``self.diff_head.forward(...)`` directly, so hooks would not
    # fire: wrap the bound method instead (same computation, inputs and outputs recorded).
    captured: dict[str, torch.Tensor] = {}
    diff_head_forward = model.diff_head.forward

    def recording_forward(x):
        captured["holistic_map"] = x.detach().clone()
        output = diff_head_forward(x)
        captured["holistic"] = output.detach().clone()
        return output

    model.diff_head.forward = recording_forward  # type: ignore[method-assign]
    transform = transforms.Compose(
        [
            transforms.Resize(size=240, interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.CenterCrop(size=(240, 240)),
            lambda image: image.convert("RGB"),
            transforms.ToTensor(),
            transforms.Normalize(mean=(0.48145466, 0.4578275, 0.40821073), std=(0.26862954, 0.26130258, 0.27577711)),
        ]
    )
    results: dict[str, np.ndarray] = {}
    with torch.no_grad():
        for shots in job["shots"]:
            normal_list = [transform(Image.open(p)) for p in job["normals"][:shots]]
            for q, (path, class_name) in enumerate(job["queries"]):
                query = transform(Image.open(path)).unsqueeze(0)
                score, image_residual = model(tokenizer, [query], [class_name], normal_list)
                holistic_map = captured["holistic_map"][0].double()
                holistic = float(captured["holistic"][0, 0])
                max_patch = 2 * float(score[0]) - holistic
                key = f"k{shots}_q{q}"
                results[f"{key}_score"] = np.float64(score[0])
                results[f"{key}_image_residual_score"] = np.float64(image_residual[0])
                results[f"{key}_holistic_score"] = np.float64(holistic)
                results[f"{key}_max_patch_residual"] = np.float64(max_patch)
                results[f"{key}_text_score"] = np.float64(float(holistic_map.max()) - float(image_residual[0]) - max_patch)
                results[f"{key}_raw_map"] = (holistic_map - holistic_map.max() + max_patch).numpy().reshape(15, 15)
                print(f"official k={shots} query {q}: score {float(score[0]):.6f}", flush=True)
    np.savez(out_file, **results)


# -- our side ---------------------------------------------------------------------------------


def build_random_checkpoint(path: Path, seed: int = 0) -> int:
    """Save a random official-format full state dict (CLIP + heads); returns the key count."""
    import torch

    from detector.backbone import load_backbone
    from detector.methods.inctrl import InCTRLHeads

    backbone = load_backbone("ViT-B-16-plus-240", "random")
    state = {k: v.clone() for k, v in backbone.model.state_dict().items() if k != "logit_scale"}
    generator = torch.Generator().manual_seed(seed)
    heads = InCTRLHeads(backbone.embed_dim, backbone.grid_size[0] * backbone.grid_size[1])
    for name, value in heads.state_dict().items():
        if name.endswith("running_mean"):
            value.copy_(0.2 * torch.randn(value.shape, generator=generator))
        elif name.endswith("running_var"):
            value.copy_(0.5 + torch.rand(value.shape, generator=generator))
        elif name.endswith("num_batches_tracked"):
            value.fill_(1000)
        elif name.split(".")[-2].startswith("bn"):
            value.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * torch.randn(value.shape, generator=generator))
        else:
            value.copy_(torch.randn(value.shape, generator=generator) / np.sqrt(value.shape[-1]))
        state[name] = value.clone()
    torch.save(state, path)
    return len(state)


def write_images(work: Path) -> tuple[list[str], list[tuple[str, str]]]:
    """Synthetic normals and queries as PNG files."""
    from PIL import Image

    from detector.synthetic import add_defect, texture

    normals = []
    for i, size in enumerate(NORMAL_SIZES):
        path = work / f"normal_{i}.png"
        Image.fromarray(texture("grating", 7, size, index=i)).save(path)
        normals.append(str(path))
    queries = []
    for i, (size, class_name) in enumerate(QUERIES):
        image = texture("grating", 7, size, index=100 + i)
        if i % 2:
            image, _ = add_defect(image, seed=i)
        path = work / f"query_{i}.png"
        Image.fromarray(image).save(path)
        queries.append((str(path), class_name))
    return normals, queries


def run_ours(job: dict, out_file: Path, runtime: str) -> dict:
    """Our detector with ``runtime`` on every (k, query); writes an ``.npz`` and returns the
    runtime facts of ``describe()`` (``runtime``, ``runtime_requested``, ...)."""
    from detector import create_detector
    from detector.methods.inctrl import InCTRLDetector

    results: dict[str, np.ndarray] = {}
    detectors = {}
    for shots in job["shots"]:
        for q, (path, class_name) in enumerate(job["queries"]):
            if class_name not in detectors:
                detectors[class_name] = create_detector(
                    InCTRLDetector.name, checkpoint=job["checkpoint"], class_name=class_name, runtime=runtime
                )
            detector = detectors[class_name].fit(job["normals"][:shots])
            result = detector.predict(path)
            key = f"k{shots}_q{q}"
            results[f"{key}_score"] = np.float64(result.score)
            for name in COMPONENTS[1:]:
                results[f"{key}_{name}"] = np.float64(result.extras[name])
            results[f"{key}_raw_map"] = result.raw_map.astype(np.float64)
            print(f"ours ({runtime}) k={shots} query {q}: score {result.score:.6f}", flush=True)
        # predict_batch must equal predict
        for class_name, detector in detectors.items():
            detector.fit(job["normals"][:shots])
            indices = [q for q, (_, c) in enumerate(job["queries"]) if c == class_name]
            batch = detector.predict_batch([job["queries"][q][0] for q in indices])
            for q, result in zip(indices, batch):
                results[f"k{shots}_q{q}_batch_score"] = np.float64(result.score)
                results[f"k{shots}_q{q}_batch_raw_map"] = result.raw_map.astype(np.float64)
    np.savez(out_file, **results)
    facts = [{k: v for k, v in d.describe().items() if k.startswith("runtime")} for d in detectors.values()]
    in_use = sorted({f["runtime"] for f in facts})
    warnings = sorted({f["runtime_warning"] for f in facts if f.get("runtime_warning")})
    return {**facts[0], "runtime": "+".join(in_use), "warnings": warnings}


def runtime_problem(requested: str, facts: dict) -> str | None:
    """Why the run with ``requested`` does not test that runtime, or ``None``."""
    if facts["warnings"]:
        return "; ".join(facts["warnings"])
    if requested != "auto" and facts["runtime"] != requested:
        return f"asked for {requested}, ran {facts['runtime']}"
    return None


def compare(job: dict, official: dict, ours: dict) -> dict[str, float]:
    worst: dict[str, float] = {}
    for shots in job["shots"]:
        for q in range(len(job["queries"])):
            key = f"k{shots}_q{q}"
            for name in COMPONENTS + ("raw_map",):
                diff = float(np.max(np.abs(official[f"{key}_{name}"] - ours[f"{key}_{name}"])))
                worst[f"k={shots} {name}"] = max(worst.get(f"k={shots} {name}", 0.0), diff)
            for name in ("score", "raw_map"):
                diff = float(np.max(np.abs(official[f"{key}_{name}"] - ours[f"{key}_batch_{name}"])))
                worst[f"k={shots} batch {name}"] = max(worst.get(f"k={shots} batch {name}", 0.0), diff)
    return worst


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("official", type=Path, help="path of a checkout of github.com/mala-lab/InCTRL")
    parser.add_argument("--work", type=Path, default=Path("parity_inctrl_work"), help="folder for the checkpoint, images and outputs")
    parser.add_argument("--shots", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--tolerance", type=float, default=1e-4)
    parser.add_argument(
        "--runtime", nargs="+", choices=RUNTIMES, default=None,
        help="runtime(s) of our side, each compared with the same official run (default: DETECTOR_RUNTIME, else auto)",
    )
    parser.add_argument("--reuse-official", action="store_true", help="reuse official.npz of an earlier run with the same job")
    parser.add_argument("--official-side", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    work = args.work.resolve()
    job_file = work / "job.json"
    if args.official_side:
        run_official(args.official.resolve(), job_file, work / "official.npz")
        return 0

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("DETECTOR_CACHE_DIR", str(work / "cache"))
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from detector.runtime import default_runtime

    runtimes = list(dict.fromkeys(args.runtime or [default_runtime()]))
    print(f"runtime(s) of our side: {', '.join(runtimes)} (OpenVINO cache {os.environ['DETECTOR_CACHE_DIR']})")
    work.mkdir(parents=True, exist_ok=True)
    checkpoint = work / "checkpoint.pyth"
    count = build_random_checkpoint(checkpoint)
    print(f"random official-format checkpoint: {count} keys -> {checkpoint}")
    normals, queries = write_images(work)
    job = {"checkpoint": str(checkpoint), "normals": normals, "queries": queries, "shots": args.shots}
    job = json.loads(json.dumps(job))  # tuples -> lists, as read back from job.json
    reuse = args.reuse_official and job_file.is_file() and json.loads(job_file.read_text()) == job
    reuse = reuse and (work / "official.npz").is_file()
    job_file.write_text(json.dumps(job, indent=1))

    start = time.perf_counter()
    if not reuse:
        command = [sys.executable, str(Path(__file__).resolve()), str(args.official), "--work", str(work), "--official-side"]
        subprocess.run(command, check=True, cwd=str(work))
    print(f"official side: {time.perf_counter() - start:.1f} s" + (" (reused official.npz)" if reuse else ""))
    official = dict(np.load(work / "official.npz"))
    worst: dict[str, dict[str, float]] = {}
    failed: list[str] = []
    for runtime in runtimes:
        start = time.perf_counter()
        facts = run_ours(job, work / f"ours_{runtime}.npz", runtime)
        details = ", ".join(f"{k} {v}" for k, v in facts.items() if k not in ("runtime", "warnings"))
        print(f"our side, runtime {runtime}: {time.perf_counter() - start:.1f} s; in use: {facts['runtime']} ({details})")
        worst[runtime] = compare(job, official, dict(np.load(work / f"ours_{runtime}.npz")))
        problem = runtime_problem(runtime, facts)
        if problem:
            print(f"runtime {runtime} NOT TESTED: {problem}")
            failed.append(f"runtime {runtime} ({problem})")
        worst[f"{runtime} -> {facts['runtime']}"] = worst.pop(runtime)

    columns = list(worst)
    print(f"\nmax abs differences over {len(queries)} queries (tolerance {args.tolerance:g}), requested -> in use:")
    print(f"  {'':32s} " + " ".join(f"{c:>18s}" for c in columns))
    for name in worst[columns[0]]:
        print(f"  {name:32s} " + " ".join(f"{worst[c][name]:18.3e}" for c in columns))
    for column in columns:
        failed += [f"{column}: {name}" for name, value in worst[column].items() if not value <= args.tolerance]
        print(f"  largest over all outputs, {column}: {max(worst[column].values()):.3e}")
    if failed:
        print(f"FAILED: {', '.join(failed)}")
        return 1
    print("parity OK")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
