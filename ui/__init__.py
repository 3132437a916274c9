"""The Gradio app, one concern per module (README "The app"):

* ``config``: flags and environment variables (``AppConfig``, ``parse_config``);
* ``controls``: the method controls built from the registry, the endpoints' input order;
* ``views``: what is drawn, as pure functions of the service's results;
* ``handlers``: the event handlers (``InspectionApp``), which call the service; ``batch``
  (batch mode), ``sessions`` (per-session background calibrations), ``service_calls``
  (errors and progress of service calls) and ``files`` (upload paths, downloads) beside it;
* ``layout``: the components, their element ids and events (``build_demo``).

``app.py`` at the repository root is the entry point Spaces runs.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

import gradio as gr

from detector import limits
from detector.registry import list_methods

from .config import AppConfig, config_flags, parse_config
from .handlers import BatchSession, InspectionApp
from .layout import ASSETS_DIR, CSS, build_demo, example_rows
from .views import TABLE_HEADERS, banner_markdown, display_name


def ordered_methods() -> list[str]:
    """The methods in display order (registration order)."""
    return list_methods()


def launch_kwargs(config: AppConfig) -> dict[str, Any]:
    """Keyword arguments of ``demo.launch`` for ``config``."""
    return dict(
        server_name=config.server_name or None,
        server_port=config.server_port or None,
        max_file_size=limits.MAX_UPLOAD_BYTES,
        state_session_capacity=limits.MAX_STORED_SESSIONS,
        allowed_paths=[str(ASSETS_DIR)],
        theme=gr.themes.Soft(primary_hue="blue"),
        css=CSS,
        show_error=False,
    )


def main(argv: Sequence[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = parse_config(argv)
    if config.threads:
        import torch

        torch.set_num_threads(int(config.threads))
    demo = build_demo(config)
    demo.launch(**launch_kwargs(config))


__all__ = [
    "AppConfig",
    "BatchSession",
    "InspectionApp",
    "TABLE_HEADERS",
    "banner_markdown",
    "build_demo",
    "config_flags",
    "display_name",
    "example_rows",
    "launch_kwargs",
    "limits",
    "main",
    "ordered_methods",
    "parse_config",
]
