"""The first-answer measurement through the served app in Chromium (``benchmarks.first_answer``'s default).

``python app.py`` runs in a subprocess (``served_app``: the official architectures at random
initialisation, the given thread count, the app's default runtime, a fresh disk cache) and a
headless Chromium page drives it as a person would: file uploads through the page, the Run
button, results read from the page. So Gradio's image encoding, the websocket, the queue and
the page's rendering are inside every number. F, B and P are measured first in a process of
their own (``reference_times``), whose OpenVINO conversions the app's warm start then reads
from the shared cache.

A method counts as shown when its verdict (``#verdict-<method>``) has a score and its overlay
(``#overlay-<method> img``) is a new image, i.e. not the one shown before this Run. The final
redraw has come when no verdict says ``provisional`` any more. Times are taken in this process
around Playwright waits that poll the page every ``POLL_MS``. Each method's own predict
seconds are read from its verdict (``ui.views``: "... · 7.36 s").
"""

from __future__ import annotations

import functools
import re
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

from .first_answer import DEFAULT_REPEATS, PREFETCHED_SEED, benchmark_images, bracketed, median_run, reference_times, summary
from .measure import benchmarked_checkpoints, in_subprocess
from .served_app import app_page, cpu_seconds, served_app

POLL_MS = 50
#: Longest wait for one Run's results (official architectures on 2 cores: minutes at most).
RUN_TIMEOUT_MS = 900_000
#: Longest wait for the server's warm start (OpenVINO models read from the cache, text features).
WARM_TIMEOUT_MS = 900_000
#: What a verdict says while its calibration finishes in the background (``ui.views``).
PROVISIONAL_MARK = "provisional"

#: ``shown(methods, before, need)``: at least ``need`` of ``methods`` show a verdict with a
#: score and an overlay that is not ``before[method]``.
_SHOWN = """([methods, before, need]) => methods.filter((m) => {
    const verdict = document.querySelector(`#verdict-${m}`);
    const image = document.querySelector(`#overlay-${m} img`);
    return verdict !== null && verdict.innerText.includes("\u2192") && image !== null && image.src && image.src !== before[m];
}).length >= need"""
_FINAL = """([methods, mark]) => methods.every((m) => {
    const verdict = document.querySelector(`#verdict-${m}`);
    return verdict !== null && !verdict.innerText.includes(mark);
})"""
_NEW_QUERY = """(before) => {
    const image = document.querySelector("#query img");
    return image !== null && image.src && image.src !== before;
}"""
_VERDICTS = """(methods) => methods.map((m) => document.querySelector(`#verdict-${m}`).innerText)"""
#: The predict seconds in a verdict's last line ("calibration: ... · 7.36 s · normals reused").
_VERDICT_SECONDS = re.compile(r"· (\d+(?:\.\d+)?) s\b")
_OVERLAYS = """(methods) => Object.fromEntries(methods.map((m) => {
    const image = document.querySelector(`#overlay-${m} img`);
    return [m, image === null ? null : image.src];
}))"""


def _wait(page: Any, script: str, argument: Any, timeout_ms: int = RUN_TIMEOUT_MS) -> float:
    """Wait until ``script(argument)`` is true on the page; returns ``time.perf_counter()`` then."""
    page.wait_for_function(script, arg=argument, polling=POLL_MS, timeout=timeout_ms)
    return time.perf_counter()


def upload(page: Any, normals: Sequence[str] | None, query: str) -> float:
    """Give the page the normals (``None``: keep those shown) and the query through its file
    inputs; returns the seconds until both are on the page."""
    start = time.perf_counter()
    if normals is not None:
        page.locator("#normals input[type=file]").set_input_files(list(normals))
        page.locator("#shots").get_by_text(f"{len(normals)}-shot").wait_for(timeout=RUN_TIMEOUT_MS)
    before = page.locator("#query img").get_attribute("src") if page.locator("#query img").count() else None
    page.locator("#query input[type=file]").set_input_files(query)
    return _wait(page, _NEW_QUERY, before) - start


def timed_run(page: Any, methods: Sequence[str], server_pid: int) -> dict[str, Any]:
    """Click Run; seconds to the first method shown, to all of them, and to the final
    redraw (no provisional verdict left); the CPU seconds the server and Chromium used
    from the click to the final redraw (both share this machine's cores); the methods'
    predict seconds added as their verdicts report them (``own_predicts_s``)."""
    methods = list(methods)
    before = page.evaluate(_OVERLAYS, methods)
    cpu_before = cpu_seconds(server_pid)
    start = time.perf_counter()
    page.locator("#run").click()
    first = _wait(page, _SHOWN, [methods, before, 1])
    every = _wait(page, _SHOWN, [methods, before, len(methods)])
    final = _wait(page, _FINAL, [methods, PROVISIONAL_MARK])
    cpu_after = cpu_seconds(server_pid)
    cpu = {name: cpu_after[name] - cpu_before[name] for name in cpu_after}
    own_predicts_s = sum(float(_VERDICT_SECONDS.findall(text)[-1]) for text in page.evaluate(_VERDICTS, methods))
    return {"first_s": first - start, "all_s": every - start, "final_s": final - start, "cpu_s": cpu, "own_predicts_s": own_predicts_s}


_READY_OR_FAILED = """([selector, ready]) => {
    const element = document.querySelector(selector);
    const text = element === null ? "" : element.innerText;
    return text.includes(ready) || text.includes("failed") || text.includes("warm start off");
}"""


def wait_until_ready(page: Any, selector: str, ready_text: str, timeout_ms: int) -> float:
    """Wait until ``selector``'s text contains ``ready_text``; returns the seconds waited.
    Raises ``RuntimeError`` when it says "failed" or "warm start off" instead."""
    start = time.perf_counter()
    page.wait_for_function(_READY_OR_FAILED, arg=[selector, ready_text], polling=POLL_MS, timeout=timeout_ms)
    text = page.locator(selector).inner_text()
    if ready_text not in text:
        raise RuntimeError(f"{selector} says: {text}")
    return time.perf_counter() - start


def app_environment(quick: bool, threads: int, cache_dir: Path, checkpoints: dict[str, str]) -> dict[str, str]:
    """The served app's settings: random weights, ``threads`` threads, no examples, the
    benchmarked checkpoints, ``cache_dir`` as the disk cache."""
    environment = {
        "DETECTOR_BACKBONE_WEIGHTS": "random",
        "DETECTOR_THREADS": str(threads),
        "DETECTOR_NO_EXAMPLES": "1",
        "DETECTOR_CACHE_DIR": str(cache_dir),
        "DETECTOR_WARM_START": "1",  # the cold measurement starts once the warm start is done
    }
    if quick:
        environment["DETECTOR_BACKBONE"] = "tiny-test"
    for method, path in checkpoints.items():
        environment[f"{method.upper().replace('-', '_')}_CHECKPOINT"] = path
    return environment


def run(quick: bool, threads: int, repeats: int = DEFAULT_REPEATS) -> dict[str, Any]:
    """Measure F, B, P, then the cold Run, ``repeats`` second-query Runs and ``repeats``
    prefetched Runs (each in a new session with normals of its own) in the browser."""
    from detector.registry import list_methods

    methods = list_methods()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        normals, queries = benchmark_images(folder / "cold")
        normal_paths = [path for path, _ in normals]
        cache_dir = folder / "cache"  # the reference process converts, the app reads
        checkpoints = benchmarked_checkpoints(quick, folder)
        # F, B and P in a process of their own, before the Runs and again after them
        measure_reference = functools.partial(reference_times, quick, threads, normal_paths, queries[0], checkpoints, str(cache_dir), repeats)
        reference = in_subprocess(measure_reference)
        environment = app_environment(quick, threads, cache_dir, checkpoints)
        started = time.perf_counter()
        second, second_upload_s, prefetched, prefetch_s = [], [], [], []
        with served_app(environment, folder / "server.log") as app:
            with app_page(app.url) as page:
                page_s = time.perf_counter() - started
                warm_s = page_s + wait_until_ready(page, "#warm-status", "Server: ready", WARM_TIMEOUT_MS)
                cold_upload_s = upload(page, normal_paths, queries[0])
                cold = timed_run(page, methods, app.pid)
                for index in range(repeats):
                    second_upload_s.append(upload(page, None, queries[(index + 1) % 2]))
                    second.append(timed_run(page, methods, app.pid))
            for index in range(repeats):
                own_normals, own_queries = benchmark_images(folder / f"prefetched-{index}", seed=PREFETCHED_SEED + index)
                with app_page(app.url) as page:  # a new session, normals of another content hash
                    start = time.perf_counter()  # the background work starts with the normals' upload
                    upload(page, [path for path, _ in own_normals], own_queries[0])
                    wait_until_ready(page, "#prefetch-status", f"on {len(own_normals)} normals: ready", RUN_TIMEOUT_MS)
                    prefetch_s.append(time.perf_counter() - start)
                    prefetched.append(timed_run(page, methods, app.pid))
        after = in_subprocess(measure_reference)
    return summary(
        bracketed(reference, after),
        cold,
        second,
        prefetched,
        prefetch_s,
        threads=threads,
        quick=quick,
        driver="browser",
        server_start_s=page_s,
        warm_ready_s=warm_s,
        upload_s={"cold": cold_upload_s, "second": statistics.median(second_upload_s)},
        cpu_s={"cold": cold["cpu_s"], "second": median_run(second)["cpu_s"], "prefetched": median_run(prefetched)["cpu_s"]},
    )
