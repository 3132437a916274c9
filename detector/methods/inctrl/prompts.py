"""InCTRL's text prompts for the text prior (official ``state_level`` / ``template_level`` /
``get_texts``; docs/inctrl.md §2). Data only: the model encodes them."""

from __future__ import annotations

NORMAL_STATES = (
    "{}",
    "flawless {}",
    "perfect {}",
    "unblemished {}",
    "{} without flaw",
    "{} without defect",
    "{} without damage",
)
ABNORMAL_STATES = ("damaged {}", "{} with flaw", "{} with defect", "{} with damage")
#: The 22 templates in the official order (WinCLIP's compositional ensemble). Each pair is
#: "a ... photo of {a|the} {}." in the order the official list has them; the order only
#: affects the float rounding of the mean.
_TEMPLATE_PAIRS = (
    ("a cropped photo of {} {{}}.", ("the", "a")),
    ("a close-up photo of {} {{}}.", ("a", "the")),
    ("a bright photo of {} {{}}.", ("a", "the")),
    ("a dark photo of {} {{}}.", ("a", "the")),
    ("a jpeg corrupted photo of {} {{}}.", ("a", "the")),
    ("a blurry photo of {} {{}}.", ("the", "a")),
    ("a photo of {} {{}}.", ("the", "a")),
    ("a photo of {} {{}}.", ("a small", "the small")),
    ("a photo of {} {{}}.", ("a large", "the large")),
    ("a photo of {} {{}} for visual inspection.", ("a", "the")),
    ("a photo of {} {{}} for anomaly detection.", ("a", "the")),
)
TEMPLATES = tuple(pattern.format(article) for pattern, articles in _TEMPLATE_PAIRS for article in articles)
#: Class names that get the single-prompt branch (CIFAR-10 names and "animal").
SINGLE_PROMPT_CLASSES = frozenset(
    ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck", "animal")
)


def prompt_texts(class_name: str) -> tuple[list[str], list[str]]:
    """Normal and abnormal prompts for ``class_name`` (underscores become spaces).

    Default: 7 normal and 4 abnormal states x 22 templates, states outer, templates inner
    (154 + 88 prompts). CIFAR-10 class names and "animal": one prompt per side.
    """
    name = class_name.replace("_", " ")
    if name in SINGLE_PROMPT_CLASSES:
        return [f"a photo of {name} for anomaly detection."], [f"a photo without {name} for anomaly detection."]
    normal = [t.format(s.format(name)) for s in NORMAL_STATES for t in TEMPLATES]
    abnormal = [t.format(s.format(name)) for s in ABNORMAL_STATES for t in TEMPLATES]
    return normal, abnormal
