"""The official implementations' per-query computation patterns, rebuilt from our modules.

Each function does, for one query, the work the official code does for one test image,
so the speed-up of the package's cached path is a ratio measured side by side in one run
(the numbers equal; only what is recomputed differs):

* InCTRL (``engine_IC.py`` at batch 1): the 242 text prompts and the k normal images are
  encoded again for every query, then the query itself.
* FAPrompt (``test.py``): the pass-1 text features are encoded again for every image, the
  pass-2 prompts run over all 77 token positions, and the map is upsampled to 518 px with
  ``F.interpolate`` and smoothed with ``scipy.ndimage.gaussian_filter`` on both classes.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F


def inctrl_official_pattern(det: Any, normals: list, query: Any) -> float:
    """One query the official way; returns the score."""
    from detector.methods import inctrl

    with torch.inference_mode():
        inctrl.text_prior_features.__wrapped__(det.backbone, det.class_name)
    det.fit(normals)
    return det.predict(query).score


def faprompt_official_pattern(det: Any, normals: list, query: Any) -> float:
    """One image the official way; returns the score."""
    from scipy.ndimage import gaussian_filter

    from detector.images import load_image, preprocess
    from detector.methods import faprompt

    model = det.model
    with torch.inference_mode():
        tensor, _ = preprocess(load_image(query), det.preprocess_spec)
        batch = tensor.unsqueeze(0)
        state = model.text_state()
        global_features, patches = model.encode_images(batch)
        pass1 = faprompt.class_probabilities(patches, state.classes)
        classes2, _, _ = model.second_pass(patches, pass1, state)
        pass2 = faprompt.class_probabilities(patches, classes2)
        logits = (global_features.unsqueeze(1) @ classes2.transpose(1, 2)).squeeze(1) / faprompt.TEMPERATURE
        score = faprompt.image_score(logits.softmax(dim=-1)[:, 1], pass1, pass2)
        rows, cols = det.grid
        size = det.image_size
        upsampled = []
        for probabilities in (pass1, pass2):
            grid = probabilities[:, 1:].reshape(1, rows, cols, 2).permute(0, 3, 1, 2)
            upsampled.append(F.interpolate(grid, size=(size, size), mode="bilinear", align_corners=False))
        combined = (upsampled[0][:, 1] + 1 - upsampled[0][:, 0] + upsampled[1][:, 1] + 1 - upsampled[1][:, 0]) / 4
        gaussian_filter(combined.numpy().astype(np.float64), sigma=10)
    return float(score[0])


#: method name -> official-pattern function, for the methods with official code.
OFFICIAL_PATTERNS: dict[str, Callable[[Any, list, Any], float]] = {
    "inctrl": inctrl_official_pattern,
    "faprompt": faprompt_official_pattern,
}
