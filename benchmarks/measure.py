"""What every benchmark measures with: timers, peak memory, synthetic images, the
benchmarked detector configurations and a process of its own per measurement."""

from __future__ import annotations

import json
import multiprocessing
import sys
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


def random_learned_state(method: str, quick: bool, directory: Path) -> Path | None:
    """The method's learned parts at random initialisation, written under ``directory`` by
    its ``artefacts().write_random`` (``None`` when it declares none): with it a method runs
    the configuration its official code runs (FAPrompt's deep prompts and prior) rather than
    a cheaper mode without a file."""
    from detector.backbone import clear_backbone_cache
    from detector.registry import get_method

    cls = get_method(method)
    artefacts = cls.artefacts()
    if artefacts is None or artefacts.write_random is None:
        return None
    path = artefacts.write_random(directory, "tiny-test" if quick else cls.spec.default_backbone)
    clear_backbone_cache()
    return path


def benchmarked_checkpoints(quick: bool, directory: Path) -> dict[str, str]:
    """Checkpoint per method of the benchmarked configuration (``random_learned_state``),
    for the methods that declare one."""
    from detector.registry import list_methods

    files = {method: random_learned_state(method, quick, directory) for method in list_methods()}
    return {method: str(path) for method, path in files.items() if path is not None}


def method_options(method: str, quick: bool, directory: Path) -> dict[str, Any]:
    """Options of the benchmarked configuration: the spec's ``quick_options`` when ``quick``
    (e.g. few prompt-learning steps), the learned state at random initialisation where the
    method declares one."""
    from detector.registry import get_spec

    options: dict[str, Any] = dict(get_spec(method).quick_options) if quick else {}
    learned = random_learned_state(method, quick, directory)
    if learned is not None:
        options["checkpoint"] = str(learned)
    return options


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


def write_and_print(result: dict[str, Any], out: str | None, table: str) -> int:
    """Write ``result`` as JSON to ``out`` (its folder made; nothing when ``None``), print
    ``table``; the command's exit status (0)."""
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    sys.stdout.write(table if table.endswith("\n") else table + "\n")
    return 0
