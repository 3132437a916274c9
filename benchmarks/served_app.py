"""The app as a person meets it: ``python app.py`` in a subprocess, opened in Chromium.

Shared by the browser tests (``tests/test_browser.py``) and the browser-driven first-answer
benchmark (``benchmarks/first_answer_browser.py``). ``served_app`` starts the server on a
free local port with the given environment and stops it afterwards; ``app_page`` opens one
page of it in Debian's Chromium through Playwright (a page is one Gradio session).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = (
    "--no-sandbox",
    "--disable-dev-shm-usage",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)
#: Seconds the server may take to answer its first page request.
START_TIMEOUT_SECONDS = 180.0
PAGE_LOAD_TIMEOUT_MS = 90_000


@dataclass(frozen=True)
class ServedApp:
    """A running ``python app.py``: its page's ``url``, process id and log file."""

    url: str
    pid: int
    log_file: Path


class AppDidNotStart(RuntimeError):
    """The server exited or did not answer in time; the message ends with its log."""


def browser_available() -> bool:
    """Chromium at ``CHROMIUM`` and the ``playwright`` package are both there."""
    try:
        import playwright  # noqa: F401
    except ImportError:
        return False
    return CHROMIUM.exists()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def app_environment(port: int, extra: Mapping[str, str]) -> dict[str, str]:
    """This process's environment for ``python app.py`` on ``127.0.0.1:port``, offline, plus
    ``extra`` (which wins)."""
    return {
        **os.environ,
        "GRADIO_SERVER_NAME": "127.0.0.1",
        "GRADIO_SERVER_PORT": str(port),
        "GRADIO_ANALYTICS_ENABLED": "False",
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": str(ROOT),
        **extra,
    }


@contextmanager
def served_app(extra_environment: Mapping[str, str], log_file: Path, start_timeout: float = START_TIMEOUT_SECONDS) -> Iterator[ServedApp]:
    """Run ``python app.py`` with ``extra_environment`` until the block ends; yields it once
    its page answers (HTTP 200). Its output goes to ``log_file``. Raises ``AppDidNotStart``
    when the process exits first or ``start_timeout`` passes."""
    port = free_port()
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "w") as log:
        process = subprocess.Popen(
            [sys.executable, str(ROOT / "app.py")],
            cwd=str(ROOT),
            env=app_environment(port, extra_environment),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            url = f"http://127.0.0.1:{port}/"
            _wait_until_answering(url, process, log_file, start_timeout)
            yield ServedApp(url, process.pid, log_file)
        finally:
            process.terminate()
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _wait_until_answering(url: str, process: subprocess.Popen, log_file: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            reason = f"exited with {process.returncode}" if process.poll() is not None else f"no answer in {timeout:.0f} s"
            raise AppDidNotStart(f"the app did not start ({reason}):\n{log_file.read_text()[-3000:]}")
        time.sleep(0.5)


@contextmanager
def app_page(url: str, viewport: tuple[int, int] = (1400, 1500)) -> Iterator["object"]:
    """A Playwright page of headless Chromium with the app at ``url`` loaded (a new Gradio
    session); the browser is closed afterwards."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=list(CHROMIUM_ARGS))
        try:
            page = browser.new_page(viewport={"width": viewport[0], "height": viewport[1]})
            page.goto(url, wait_until="load", timeout=PAGE_LOAD_TIMEOUT_MS)
            yield page
        finally:
            browser.close()


def cpu_seconds(server_pid: int) -> dict[str, float]:
    """CPU seconds (user + system) used so far by the server process and by all Chromium
    processes of this machine, from ``/proc`` (Linux; zeros elsewhere)."""
    totals = {"server": 0.0, "chromium": 0.0}
    ticks = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:  # the process ended meanwhile
            continue
        name = text[text.index("(") + 1 : text.rindex(")")]
        fields = text[text.rindex(")") + 2 :].split()
        seconds = (int(fields[11]) + int(fields[12])) / ticks  # utime, stime
        if int(stat.parent.name) == server_pid:
            totals["server"] += seconds
        elif "chrom" in name.lower():
            totals["chromium"] += seconds
    return totals
