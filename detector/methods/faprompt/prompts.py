"""FAPrompt's prompt templates and the training-free word prompts (docs/faprompt.md §3).

The official templates hold placeholder words ("N", "A") that only reserve token positions for
the learned context. The word mode fills those positions with the token embeddings of real
words instead: the normal phrase is exactly five tokens; each abnormality phrase is tokenized
with the backbone's tokenizer and cut to its first two tokens, or padded with the token of
``WORD_PAD`` when it has only one.
"""

from __future__ import annotations

#: Prompt templates of the official code; "N" and "A" only reserve token positions.
NORMAL_TEMPLATE = "N N N N N object."
ABNORMAL_TEMPLATE = "N N N N N A A damaged object."
#: Training-free word prompts (docs/api.md §13). The normal phrase is exactly five
#: tokens; each abnormality phrase is tokenized with the backbone's tokenizer and cut to its
#: first two tokens, or padded with the token of ``WORD_PAD`` when it has only one.
WORD_NORMAL_PHRASE = "a cropped photo of the"
WORD_ABNORMALITY_PHRASES = (
    "scratch",
    "crack",
    "hole",
    "stain",
    "dent",
    "contamination",
    "missing part",
    "bent",
    "broken",
    "discoloration",
)
WORD_PAD = ","
