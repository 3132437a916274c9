"""What every benchmark measures with: timers, peak memory, synthetic images, the
benchmarked detector configurations and a process of its own per measurement."""

from __future__ import annotations

import multiprocessing
import resource
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Callable, Sequence

QUERY_SIZE = (256, 320)  # (H, W): non-square, like real photos


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    position = (len(ordered) - 1) * q
    low, high = int(position), min(int(position) + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def synthetic_images(count: int, seed: int, defect: bool) -> list:
    from detector import synthetic

    images = []
    for index in range(count):
        image = synthetic.texture("grating", seed, size=QUERY_SIZE, index=index + (100 if defect else 0))
        if defect:
            image, _ = synthetic.add_defect(image, seed=index)
        images.append(image)
    return images


def create(method: str, quick: bool, **options: Any):
    from detector import create_detector

    backbone = "tiny-test" if quick else None
    options.setdefault("runtime", "torch")
    return create_detector(method, backbone=backbone, backbone_weights="random", **options)


def random_prompt_learner(quick: bool, directory: Path) -> Path:
    """A FAPrompt prompt-learner file at the official random initialisation (seed 0).

    The benchmark runs FAPrompt in its learned configuration (deep prompts and the
    abnormality prior, two text passes per query), the one the official code runs; without a
    file the method would run its cheaper training-free word mode.
    """
    from detector.backbone import clear_backbone_cache, load_backbone
    from detector.checkpoints import save_safetensors
    from detector.methods import faprompt

    model_name = "tiny-test" if quick else faprompt.DEFAULT_BACKBONE
    backbone = load_backbone(
        model_name, "random", image_size=faprompt.method_image_size(model_name), quick_gelu=True
    )
    learner = faprompt.FAPromptLearner.for_backbone(backbone).initialize(backbone, seed=0)
    path = save_safetensors(
        directory / "faprompt-random-prompts.safetensors",
        learner.state_dict(),
        {"method": "faprompt", "backbone": model_name, "note": "random initialisation for benchmarking"},
    )
    clear_backbone_cache()
    return path


#: Methods benchmarked with a learned-state file at random initialisation
#: (``random_prompt_learner``): FAPrompt's learned configuration, as the official code runs.
LEARNED_STATE_METHODS = ("faprompt",)


def benchmarked_checkpoints(learner: str) -> dict[str, str]:
    """Checkpoint per method of the benchmarked configuration: the ``random_prompt_learner``
    file ``learner`` for each of ``LEARNED_STATE_METHODS``."""
    return {method: learner for method in LEARNED_STATE_METHODS}


def method_options(method: str, quick: bool, directory: Path) -> dict[str, Any]:
    """Options of the benchmarked configuration (AnoPLe: fast preset, quick: few steps;
    FAPrompt: learned prompts at random initialisation)."""
    if method == "anople" and quick:
        return {"steps": 3}
    if method in LEARNED_STATE_METHODS:
        return {"checkpoint": str(random_prompt_learner(quick, directory))}
    return {}


def in_subprocess(fn: Callable[..., dict[str, Any]], *args: Any) -> dict[str, Any]:
    """``fn(*args)`` in a fresh spawned process (its own backbone cache and peak memory). The
    worker exits on its own when the call returns (a terminated pool worker leaves its
    semaphores to the resource tracker)."""
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def format_value(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, dict):
        return " / ".join(format_value(v) for v in value.values())
    if isinstance(value, float):
        return f"{value:.3g}" if value < 100 else f"{value:.0f}"
    return str(value)
