"""In which order a request's methods answer, and which answers travel together.

Both decisions read only the methods' declared costs (``MethodSpec.cost``, a
``detector.spec.RelativeCost`` in forwards of one ViT-B-16-plus-240 image encoder at 240 px):

* ``fastest_first``: the method with the cheapest way to its first answer goes first (a
  cached fit costs nothing), so a person sees something as early as possible;
* ``due_within``: whether the next method is expected to answer within a given cost, so
  that a stream can hold a finished answer back and send both in one message. In the app a
  message costs the server and the page a redraw on the same cores as the next predict
  (benchmarks/RESULTS.md, "First answer in the browser"): two answers a fraction of a
  second apart are cheaper as one.
"""

from __future__ import annotations

from typing import Mapping, Sequence

from .registry import get_method, list_methods


def answer_cost(method: str, normals_count: int, fitted: bool) -> float:
    """Expected cost of ``method``'s first answer (its fit when not ``fitted``, then one
    predict), in the B-forward units of ``RelativeCost``."""
    return get_method(method).spec.cost.first_answer(normals_count, fitted=fitted)


def fastest_first(methods: Sequence[str], normals_count: int, fitted: Mapping[str, bool]) -> list[str]:
    """``methods`` ordered by ``answer_cost`` (``fitted[m]``: its fit is cached),
    registration order on ties."""
    order = {name: i for i, name in enumerate(list_methods())}
    return sorted(methods, key=lambda m: (answer_cost(m, normals_count, fitted.get(m, False)), order.get(m, 0)))


def due_within(method: str, normals_count: int, fitted: bool, within: float) -> bool:
    """``method`` is expected to answer within ``within`` B forwards (``within <= 0``: never)."""
    return within > 0 and answer_cost(method, normals_count, fitted) <= within
