"""The app in a real browser (Debian Chromium through Playwright), tiny random backbone.

Starts ``python app.py`` on 127.0.0.1 in a subprocess, uploads normals and a query, runs
all three methods, moves the threshold slider and saves screenshots under
``tests/_artifacts/`` (git-ignored) for a look by eye.
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest

from benchmarks.served_app import CHROMIUM, AppDidNotStart, app_page, served_app

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "tests" / "_artifacts"
EXAMPLE = ROOT / "assets" / "examples" / "fabric-weave"

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.exists(), reason=f"{CHROMIUM} is missing (apt-get install chromium fonts-liberation)"),
]

#: The tiny random CLIP for every method.
TINY_APP = {"DETECTOR_BACKBONE": "tiny-test", "DETECTOR_BACKBONE_WEIGHTS": "random"}


@contextmanager
def running_app(tmp_path_factory, extra: dict) -> Iterator[str]:
    """``python app.py`` with the tiny backbone and ``extra`` environment; yields its URL."""
    log = tmp_path_factory.mktemp("app_server") / "server.log"
    try:
        with served_app({**TINY_APP, **extra}, log) as app:
            yield app.url
    except AppDidNotStart as error:
        pytest.fail(str(error))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with running_app(
        tmp_path_factory, {"ANOPLE_STEPS": "2", "GRADIO_EXAMPLES_CACHE": str(tmp_path_factory.mktemp("examples_cache"))}
    ) as url:
        yield url


def test_upload_run_all_methods_and_screenshot(server):
    from playwright.sync_api import expect

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    normals = sorted(str(p) for p in EXAMPLE.glob("normal_*.png"))
    query = str(EXAMPLE / "query_scratch.png")
    with app_page(server) as page:
        run = page.get_by_role("button", name="Run", exact=True)
        expect(run).to_be_visible(timeout=60_000)
        expect(page.locator("#banner")).to_contain_text("meaningless")

        page.locator("#normals input[type=file]").set_input_files(normals)
        expect(page.locator("#shots")).to_contain_text("3-shot", timeout=30_000)
        page.locator("#query input[type=file]").set_input_files(query)
        expect(page.locator("#query img")).to_be_visible(timeout=30_000)
        run.click()

        for method in ("inctrl", "anople", "faprompt"):
            expect(page.locator(f"#overlay-{method} img")).to_be_visible(timeout=240_000)
            expect(page.locator(f"#verdict-{method}")).to_contain_text("→", timeout=30_000)
        scores = page.locator("#scores")
        expect(scores).to_contain_text("FAPrompt", timeout=30_000)
        text = scores.inner_text()
        for name in ("InCTRL", "AnoPLe", "FAPrompt", "leave-one-out"):
            assert name in text
        # FAPrompt is shown with its default calibration while its own runs in the
        # background; the page's timer redraws it final without another Run.
        page.get_by_text("JSON summary").click()
        summary = page.locator("#summary")
        expect(summary).to_contain_text("faprompt", timeout=30_000)
        expect(summary).not_to_contain_text(re.compile(r'"provisional"\s*:\s*true'), timeout=120_000)
        expect(page.locator("#progress-faprompt")).to_contain_text("FAPrompt: done", timeout=30_000)
        page.screenshot(path=str(ARTIFACTS / "app_results.png"), full_page=True)
        # Nothing runs any more: the page's timer stops, and an idle page sends no requests.
        requests = []
        page.on("request", lambda request: requests.append(request.url) if "/gradio_api/" in request.url else None)
        page.wait_for_timeout(3_000)  # the last ticks
        requests.clear()
        page.wait_for_timeout(3_000)
        assert requests == []

        # The methods' agreement, and a click on a heatmap explains the patch under it.
        expect(page.locator("#agreement-summary")).to_contain_text("3 methods", timeout=30_000)
        heatmap = page.locator("#overlay-inctrl img")
        heatmap.click()
        expect(page.locator("#explanation")).to_contain_text("nearest normal patch", timeout=60_000)
        expect(page.locator("#explain-normal img")).to_be_visible(timeout=30_000)
        page.locator("#overlay-faprompt img").click()
        expect(page.locator("#explanation")).to_contain_text("abnormality prompt", timeout=60_000)
        page.locator("#make-report").click()
        expect(page.locator("#report-file")).to_contain_text("report_", timeout=60_000)
        page.locator("#explanation").scroll_into_view_if_needed()
        page.screenshot(path=str(ARTIFACTS / "app_explain.png"), full_page=True)

        # Threshold to 0: every method says anomalous, redrawn from the cached results.
        slider = page.locator("#threshold input[type=number]")
        slider.fill("0")
        slider.press("Enter")
        for method in ("inctrl", "anople", "faprompt"):
            expect(page.locator(f"#verdict-{method}")).to_contain_text("ANOMALOUS", timeout=30_000)
        page.screenshot(path=str(ARTIFACTS / "app_threshold_0.png"), full_page=True)
    assert (ARTIFACTS / "app_results.png").stat().st_size > 10_000


def test_example_click_runs_and_is_cached(server):
    from playwright.sync_api import expect

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with app_page(server) as page:
        example = page.get_by_text("stone-blobs · stain", exact=True)
        expect(example).to_be_visible(timeout=60_000)
        example.click()
        for method in ("inctrl", "anople", "faprompt"):
            expect(page.locator(f"#overlay-{method} img")).to_be_visible(timeout=240_000)
        expect(page.locator("#scores")).to_contain_text("AnoPLe", timeout=30_000)
        page.screenshot(path=str(ARTIFACTS / "app_example_loaded.png"), full_page=True)
        expect(page.locator("#shots")).to_contain_text("3-shot", timeout=30_000)
        # The slider redraws the example's results too (they are kept in the session state).
        slider = page.locator("#threshold input[type=number]")
        slider.fill("1")
        slider.press("Enter")
        for method in ("inctrl", "anople", "faprompt"):
            expect(page.locator(f"#verdict-{method}")).to_contain_text("NORMAL", timeout=30_000)
        page.screenshot(path=str(ARTIFACTS / "app_example.png"), full_page=True)


def test_batch_upload_ranks_and_opens_a_row(server):
    from playwright.sync_api import expect

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    normals = sorted(str(p) for p in EXAMPLE.glob("normal_*.png"))
    queries = sorted(str(p) for p in EXAMPLE.glob("query_*.png"))
    assert len(queries) >= 2
    with app_page(server) as page:
        expect(page.get_by_role("button", name="Run", exact=True)).to_be_visible(timeout=60_000)
        page.locator("#normals input[type=file]").set_input_files(normals)
        expect(page.locator("#shots")).to_contain_text("3-shot", timeout=30_000)
        page.get_by_role("tab", name="Batch").click()
        page.locator("#batch-files input[type=file]").set_input_files(queries)
        run_batch = page.locator("#run-batch")
        expect(run_batch).to_be_visible(timeout=30_000)
        page.wait_for_timeout(1000)  # uploads finish
        run_batch.click()
        table = page.locator("#batch-table")
        expect(page.locator("#batch-flagged")).to_contain_text("flagged", timeout=240_000)
        for name in ("InCTRL", "AnoPLe", "FAPrompt", Path(queries[0]).name):
            expect(table).to_contain_text(name, timeout=30_000)
        expect(page.locator("#batch-csv")).to_contain_text(".csv", timeout=30_000)
        expect(page.locator("#batch-zip")).to_contain_text(".zip", timeout=30_000)
        page.locator("#batch-table").scroll_into_view_if_needed()
        page.screenshot(path=str(ARTIFACTS / "app_batch.png"), full_page=True)
        expect(table.locator("img:visible").first).to_be_visible(timeout=30_000)  # thumbnails

        # A click on a row opens that image in the single-query view.
        table.get_by_role("gridcell").filter(has_text=Path(queries[-1]).name).first.click()
        expect(page.get_by_role("tab", name="Single query")).to_have_attribute("aria-selected", "true", timeout=30_000)
        expect(page.locator("#query img")).to_be_visible(timeout=30_000)
        expect(page.locator("#overlay-inctrl img")).to_be_visible(timeout=240_000)
        expect(page.locator("#scores")).to_contain_text("FAPrompt", timeout=60_000)
        page.screenshot(path=str(ARTIFACTS / "app_batch_row_opened.png"), full_page=True)
    assert (ARTIFACTS / "app_batch.png").stat().st_size > 10_000


@pytest.fixture(scope="module")
def slow_server(tmp_path_factory):
    """The app with AnoPLe slowed deterministically (many prompt-learning steps)."""
    with running_app(tmp_path_factory, {"ANOPLE_STEPS": "400", "DETECTOR_NO_EXAMPLES": "1"}) as url:
        yield url


def test_columns_fill_as_methods_finish_and_prefetched_work_is_reused(slow_server):
    from playwright.sync_api import expect

    url = slow_server
    normals = sorted(str(p) for p in EXAMPLE.glob("normal_*.png"))
    with app_page(url) as page:
        run = page.get_by_role("button", name="Run", exact=True)
        expect(run).to_be_visible(timeout=60_000)
        page.locator("#methods").get_by_label("FAPrompt").uncheck()
        page.locator("#normals input[type=file]").set_input_files(normals)
        page.locator("#query input[type=file]").set_input_files(str(EXAMPLE / "query_scratch.png"))
        expect(page.locator("#query img")).to_be_visible(timeout=30_000)
        run.click()
        # InCTRL's column is filled while AnoPLe's still shows its own progress.
        expect(page.locator("#verdict-inctrl")).to_contain_text("→", timeout=120_000)
        expect(page.locator("#progress-anople")).to_contain_text("step", timeout=30_000)
        assert "→" not in page.locator("#verdict-anople").inner_text()
        page.screenshot(path=str(ARTIFACTS / "app_streaming.png"), full_page=True)
        expect(page.locator("#verdict-anople")).to_contain_text("→", timeout=300_000)

        # More normals (the gallery adds them to the 3 shown): the background work starts
        # on upload; Run after "ready" reuses it.
        page.locator("#normals input[type=file]").set_input_files(normals[:2])
        # The status names the normals it is ready for: the first upload's "ready" does not count.
        expect(page.locator("#prefetch-status")).to_contain_text("InCTRL, AnoPLe on 5 normals: ready", timeout=300_000)
        run.click()
        page.get_by_text("JSON summary").click()
        summary = page.locator("#summary")
        # Wait for this Run's summary (5 normals), not the first Run's (3, still on screen).
        expect(summary).to_contain_text(re.compile(r'"num_normals"\s*:\s*5\b'), timeout=300_000)
        expect(summary).to_contain_text("reused_fit", timeout=30_000)
        expect(summary).not_to_contain_text(re.compile(r'"reused_fit"\s*:\s*false'), timeout=30_000)
