"""Shared test set-up: offline hub, quiet Gradio, PyTorch runtime, small helpers."""

from __future__ import annotations

import os

# Before anything imports huggingface_hub or gradio: no network, no analytics.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
# Apps started by tests (in-process or as a subprocess) build nothing before they are asked.
os.environ.setdefault("DETECTOR_WARM_START", "0")
# Text features cached on disk go to a fresh folder per test run, never the user's cache.
if "DETECTOR_CACHE_DIR" not in os.environ:
    import atexit
    import shutil
    import tempfile

    os.environ["DETECTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="detector-test-cache-")
    atexit.register(shutil.rmtree, os.environ["DETECTOR_CACHE_DIR"], True)
# Every test runs the PyTorch runtime unless it asks for another one (tests/test_runtime.py).
os.environ["DETECTOR_RUNTIME"] = "torch"

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True, scope="session")
def default_torch_threads() -> int:
    """One torch thread for the whole run: the tiny model runs op by op, and thread hand-offs
    cost far more than they save on 2 cores. Returns the machine's default count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield threads
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _all_threads_for_slow_tests(request, default_torch_threads: int):
    """Tests marked ``slow`` run real architectures and get every thread back."""
    if request.node.get_closest_marker("slow") is None:
        yield
        return
    torch.set_num_threads(default_torch_threads)
    try:
        yield
    finally:
        torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_backbone():
    """The package's tiny random CLIP (64 px, 8x8 grid, 6 blocks)."""
    from detector.backbone import load_backbone

    return load_backbone("tiny-test", "random")


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


class CountingFactory:
    """``create_detector`` that counts builds, fits and predictions."""

    def __init__(self):
        self.built = 0
        self.fits = 0
        self.predicts = 0

    def __call__(self, name, **kwargs):
        from detector import create_detector

        detector = create_detector(name, **kwargs)
        self.built += 1
        fit, predict = detector.fit, detector.predict

        def counted_fit(*args, **kw):
            self.fits += 1
            return fit(*args, **kw)

        def counted_predict(*args, **kw):
            self.predicts += 1
            return predict(*args, **kw)

        detector.fit, detector.predict = counted_fit, counted_predict
        return detector


def random_inctrl_heads(seed: int, embed_dim: int = 64, num_patches: int = 64) -> dict:
    """InCTRL head state with every entry randomised (incl. batch-norm statistics)."""
    from detector.methods.inctrl import InCTRLHeads

    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, value in InCTRLHeads(embed_dim, num_patches).state_dict().items():
        if name.endswith("num_batches_tracked"):
            state[name] = torch.tensor(7)
        elif name.endswith("running_var"):
            state[name] = 0.5 + torch.rand(value.shape, generator=generator)
        else:
            state[name] = 0.3 * torch.randn(value.shape, generator=generator)
    return state
