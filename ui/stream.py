"""A Run's stream with progress in between.

Gradio sends a generator's outputs each time it yields, so a Run that only yielded when a
method finished would leave the page without news during a long fit. ``with_beats`` runs
the inspection's steps in a worker thread: the event handler yields each step as it
arrives and, every ``every`` seconds without one, receives ``BEAT``, its chance to send the
per-method progress (``#progress-<method>``). The page then needs no polling while a Run
streams; each message costs the browser one redraw of the loading states of the page
(benchmarks/RESULTS.md, "First answer in the browser").
"""

from __future__ import annotations

import contextvars
import queue
import threading
from typing import Iterator, TypeVar

T = TypeVar("T")


class Beat:
    """No new step for a while: time to show progress."""

    def __repr__(self) -> str:
        return "BEAT"


BEAT = Beat()

_STEP, _ERROR, _END = "step", "error", "end"


def with_beats(steps: Iterator[T], every: float) -> Iterator[T | Beat]:
    """Yield the items of ``steps`` as they come and ``BEAT`` after each ``every`` seconds
    without one. ``steps`` runs in a worker thread in a copy of the caller's context (Gradio's
    request context: warnings still reach the page); its exception is raised here.

    Closing this generator (the page left, Gradio closed the stream) lets the worker finish
    the step it is in, then closes ``steps`` and ends the thread: at most one step outlives
    the stream, and nothing is left running after it."""
    if every <= 0:
        raise ValueError("every must be positive")
    arrivals: queue.Queue = queue.Queue()
    stop = threading.Event()
    context = contextvars.copy_context()

    def work() -> None:
        try:
            while not stop.is_set():
                try:
                    item = context.run(next, steps)
                except StopIteration:
                    break
                arrivals.put((_STEP, item))
        except BaseException as error:  # handed to the stream, which raises it
            arrivals.put((_ERROR, error))
        finally:
            try:
                close = getattr(steps, "close", None)  # generators have one, plain iterators not
                if close is not None:
                    context.run(close)
            finally:
                arrivals.put((_END, None))

    worker = threading.Thread(target=work, name="run-stream", daemon=True)
    worker.start()
    try:
        while True:
            try:
                kind, value = arrivals.get(timeout=every)
            except queue.Empty:
                yield BEAT
                continue
            if kind == _END:
                return
            if kind == _ERROR:
                raise value
            yield value
    finally:
        stop.set()
