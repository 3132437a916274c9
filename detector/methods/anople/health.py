"""Degenerate parts of a fitted AnoPLe (docs/anople.md §4.2-§4.3, §5).

The fused outputs are arithmetic means of three parts: the decoder map M_dec, the prompt
probability p_text and the memory map M_mem. A part that does not vary over clean inputs
carries no evidence, and the user should know: the fused map and score then rest on the
other parts alone. After ``fit`` each part's *spread* (max - min) is measured:

* M_dec: over every patch of every clean fit view (with the global view token, as a query
  gets it);
* p_text: over the clean fit views (not checked with fewer than two distinct views);
* M_mem: over every patch of each normal scored against the bank without its own patches
  (leave-one-out), checked only for k >= 2 (with k = 1 there is nothing to leave out).

A part whose spread is below ``DEGENERATE_SPREAD`` is degenerate. The threshold 1e-4 is
where a part can move the [0, 1] fused score or map by at most 5e-5, far below one step of
an 8-bit colour map (1/255); the collapse that prompted the check reached spreads near
1e-13 (values ~1e-13 everywhere).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

#: A part whose spread over the clean fit views is below this is degenerate.
DEGENERATE_SPREAD = 1e-4
#: Part names, as in ``DetectionResult.extras``: decoder map, prompt score, memory map.
PART_NAMES = ("decoder_map", "text_score", "memory_map")
_DESCRIPTIONS = {
    "decoder_map": "the decoder map M_dec",
    "text_score": "the prompt score p_text",
    "memory_map": "the leave-one-out memory map M_mem",
}


def spread(values: torch.Tensor) -> float:
    """``max - min`` of all entries of ``values`` (any shape); NaN when it has fewer than two."""
    if values.numel() < 2:
        return math.nan
    flat = values.detach().double().reshape(-1)
    return float(flat.max() - flat.min())


@dataclass(frozen=True)
class PartHealth:
    """Spreads of the three parts over the clean fit views; NaN = not checked.

    Attributes:
        decoder_spread: spread of M_dec over the clean views' patches.
        text_spread: spread of p_text over the clean views.
        memory_spread: spread of the leave-one-out M_mem over the normals' patches.
        epsilon: spreads below it are degenerate.
    """

    decoder_spread: float = math.nan
    text_spread: float = math.nan
    memory_spread: float = math.nan
    epsilon: float = DEGENERATE_SPREAD

    @property
    def spreads(self) -> dict[str, float]:
        return dict(zip(PART_NAMES, (self.decoder_spread, self.text_spread, self.memory_spread)))

    @property
    def degenerate(self) -> tuple[str, ...]:
        """Names (``PART_NAMES`` order) of the checked parts whose spread is below ``epsilon``."""
        return tuple(name for name, value in self.spreads.items() if not math.isnan(value) and value < self.epsilon)

    def warnings(self) -> tuple[str, ...]:
        """One sentence naming the degenerate parts, or nothing."""
        names = self.degenerate
        if not names:
            return ()
        spreads = self.spreads
        parts = ", ".join(f"{_DESCRIPTIONS[n]} ({n}, spread {spreads[n]:.2g})" for n in names)
        one = len(names) == 1
        return (
            f"AnoPLe: degenerate {'part' if one else 'parts'}: {parts} {'is' if one else 'are'} constant over the "
            f"clean fit views (spread below {self.epsilon:g}) and {'carries' if one else 'carry'} no evidence; "
            "the fused map and score rest on the other parts.",
        )

    def to_tensor(self) -> torch.Tensor:
        """``(3,)`` float64 spreads in ``PART_NAMES`` order (the module's ``part_spreads`` buffer)."""
        return torch.tensor([self.decoder_spread, self.text_spread, self.memory_spread], dtype=torch.float64)

    @classmethod
    def from_tensor(cls, values: torch.Tensor, epsilon: float = DEGENERATE_SPREAD) -> "PartHealth":
        decoder, text, memory = (float(v) for v in values.detach().cpu().double().reshape(3))
        return cls(decoder_spread=decoder, text_spread=text, memory_spread=memory, epsilon=epsilon)


def assess_parts(
    decoder_maps: torch.Tensor,
    text_scores: torch.Tensor,
    leave_one_out_maps: torch.Tensor | None,
    epsilon: float = DEGENERATE_SPREAD,
) -> PartHealth:
    """Spreads of the parts.

    Args:
        decoder_maps: ``(V, N)`` M_dec of the V clean fit views.
        text_scores: ``(V,)`` p_text of the same views (V < 2: not checked).
        leave_one_out_maps: ``(k, N)`` M_mem of each normal against the bank without it, or
            ``None`` when k < 2 (not checked).
    """
    return PartHealth(
        decoder_spread=spread(decoder_maps),
        text_spread=spread(text_scores),
        memory_spread=math.nan if leave_one_out_maps is None else spread(leave_one_out_maps),
        epsilon=epsilon,
    )
