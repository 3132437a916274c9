"""Calling the service from an event handler: its refusals become ``gr.Error`` with their
message, anything else is logged and reported without stopping the server, and its
``progress(fraction, message)`` goes to Gradio's progress bar."""

from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import gradio as gr

from detector.errors import DetectorError

LOG = logging.getLogger("app")


def progress_callback(progress: Any) -> Callable[[float, str], None] | None:
    if progress is None:
        return None

    def callback(fraction: float, message: str) -> None:
        progress(fraction, desc=message)

    return callback


@contextmanager
def service_errors() -> Iterator[None]:
    """The service's refusals become ``gr.Error`` with their message; anything else is
    logged and reported without stopping the server."""
    try:
        yield
    except gr.Error:
        raise
    except (DetectorError, ValueError) as error:
        LOG.warning("request refused: %s", error)
        raise gr.Error(str(error)) from None
    except Exception as error:  # keep serving; the log has the traceback
        LOG.exception("inspection failed")
        raise gr.Error(f"The inspection failed ({type(error).__name__}: {error}). See the server log.") from None


def call_service(function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Call the service under ``service_errors``."""
    with service_errors():
        return function(*args, **kwargs)
