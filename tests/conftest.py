"""Shared test set-up: offline hub, quiet Gradio, small helpers."""

from __future__ import annotations

import os

# Before anything imports huggingface_hub or gradio: no network, no analytics.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import numpy as np  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_backbone():
    """The package's tiny random CLIP (64 px, 8x8 grid, 6 blocks)."""
    from detector.backbone import load_backbone

    return load_backbone("tiny-test", "random")


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)
