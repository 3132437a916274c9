"""FAPrompt's published prompt-learner file as data, and ``convert`` (docs/faprompt.md §6).

The authors' README links a Google Drive folder for trained models whose link has moved
(empty at ``7e9d9d2``, updated per issue #4), so the user passes the current link or file
id (``weights fetch faprompt --url URL_OR_DRIVE_ID``). The file is
``torch.save({"prompt_learner": state_dict})`` (36 keys, about 41 MB); ``convert`` writes
the same keys as safetensors with a JSON header (method, backbone, training set, source
file and sha256, epoch).
"""

from __future__ import annotations

from pathlib import Path


from ...artefacts import Converted, ConvertRequest, KnownArtefact, MethodArtefacts, WeightsSource, converted_header, set_slug
from ...backbone import load_backbone
from ...checkpoints import check_keys, read_state_dict, save_safetensors
from ...errors import CheckpointError
from .config import METHOD_NAME
from .encoders import method_image_size, quick_gelu_for
from .learner import NESTING, FAPromptLearner, expected_shapes

SOURCE = WeightsSource(
    kind="url",
    location="",
    page="https://github.com/mala-lab/FAPrompt (README, 'Pre-train Models on Google Drive')",
    licence="MIT (the licence of mala-lab/FAPrompt)",
    licence_id="mit",
    note="the authors' link moves: pass the current link or Drive file id with --url",
)
PUBLISHED_BYTES = 41_000_000
#: The official test script's model (trained on VisA, used for every other target).
KNOWN = (KnownArtefact("prompt learner, trained on VisA (official epoch_7.pth)", "visa", None, "VisA", PUBLISHED_BYTES, PUBLISHED_BYTES),)


def artefacts() -> MethodArtefacts:
    return MethodArtefacts(source=SOURCE, known=KNOWN, default_set="visa", convert_needs=(), write_random=write_random_learner)


def write_random_learner(directory: Path, model_name: str) -> Path:
    """``directory/faprompt-random-prompts.safetensors``: a prompt learner for ``model_name``
    at random initialisation (seed 0) on random CLIP weights. With it the detector runs its
    learned configuration (deep prompts and the abnormality prior, two text passes per
    query, as the official code does); without a file it runs the cheaper training-free
    word mode, so benchmarks use this file."""
    backbone = load_backbone(model_name, "random", image_size=method_image_size(model_name), quick_gelu=quick_gelu_for(model_name))
    learner = FAPromptLearner.for_backbone(backbone).initialize(backbone, seed=0)
    header = {"method": METHOD_NAME, "backbone": model_name, "note": "random initialisation for benchmarking"}
    return save_safetensors(Path(directory) / "faprompt-random-prompts.safetensors", learner.state_dict(), header)


def convert(source: Path, out_dir: Path, request: ConvertRequest, *, default_backbone: str) -> Converted:
    """Write an official ``epoch_N.pth`` (or our output) as
    ``out_dir/<set>/faprompt_<set>.safetensors``; the learner's shapes are read from the file
    and checked strictly (``CheckpointError`` for anything else). Read with
    ``read_state_dict`` only (no pickled code runs)."""
    state = read_state_dict(source, nested=NESTING)
    if "ctx_pos" not in state or "patch_meta_net.linear1.weight" not in state or "tokenized_prompts_pos" not in state:
        raise CheckpointError(f"{source.name} holds no FAPrompt prompt learner (ctx_pos, patch_meta_net.*, ...)")
    width = int(state["ctx_pos"].shape[-1])
    embed_dim = int(state["patch_meta_net.linear1.weight"].shape[1]) // 10
    deep = sum(1 for key in state if key.startswith("compound_prompts_text."))
    learner = FAPromptLearner(width, embed_dim, deep, int(state["tokenized_prompts_pos"].shape[-1]))
    check_keys(state, expected_shapes(learner), what="FAPrompt's prompt learner")
    trained_on = request.trained_on or "unknown"
    key = set_slug(trained_on)
    header = converted_header(
        METHOD_NAME, request, source, default_backbone=default_backbone, trained_on=trained_on, trained_on_set=key,
        layout="prompt learner, converted from the published file", epoch_pattern=r"epoch_([0-9]+)",
    )
    out = save_safetensors(Path(out_dir) / key / f"{METHOD_NAME}_{key}.safetensors", state, header)
    return Converted(out, None, None, header)
