"""``ui.stream.with_beats``: a Run's steps in a worker thread, with beats for progress."""

from __future__ import annotations

import contextvars
import threading
import time

import pytest

from ui.stream import BEAT, with_beats

GUARD = 30.0


def test_items_come_in_order_with_beats_while_a_step_takes_long():
    def steps():
        yield 1
        time.sleep(0.35)  # longer than three beats
        yield 2

    out = list(with_beats(steps(), every=0.1))
    assert [item for item in out if item is not BEAT] == [1, 2]
    assert out[0] == 1 and out[-1] == 2
    assert out.count(BEAT) >= 2


def test_no_beat_when_the_steps_are_quick():
    assert list(with_beats(iter([1, 2, 3]), every=5.0)) == [1, 2, 3]


def test_the_steps_error_is_raised_in_the_stream():
    def steps():
        yield "first"
        raise KeyError("broken step")

    stream = with_beats(steps(), every=5.0)
    assert next(stream) == "first"
    with pytest.raises(KeyError, match="broken step"):
        next(stream)


def test_closing_the_stream_ends_the_worker_after_its_current_step():
    started, release, closed = threading.Event(), threading.Event(), threading.Event()
    produced = []

    def steps():
        try:
            for index in range(100):
                produced.append(index)
                if index == 1:
                    started.set()
                    release.wait(GUARD)
                yield index
        finally:
            closed.set()

    stream = with_beats(steps(), every=5.0)
    assert next(stream) == 0
    assert started.wait(GUARD)  # the worker is inside step 1
    stream.close()
    release.set()
    assert closed.wait(GUARD)  # the steps were closed, in the worker
    assert produced == [0, 1]  # nothing after the step it was in
    deadline = time.monotonic() + GUARD
    while any(t.name == "run-stream" for t in threading.enumerate()):
        assert time.monotonic() < deadline, "the worker thread did not end"
        time.sleep(0.01)


def test_the_steps_run_in_the_callers_context():
    request = contextvars.ContextVar("request", default=None)
    request.set("session-a")

    def steps():
        yield request.get()

    assert list(with_beats(steps(), every=5.0)) == ["session-a"]


def test_every_must_be_positive():
    with pytest.raises(ValueError, match="positive"):
        list(with_beats(iter([]), every=0))
