"""AnoPLe (reconstruction): bidirectionally coupled multi-modal prompts learned from a few
normal images, a multi-view decoder and a visual memory bank (``shared/specs/anople.md``).

Importing this package registers the ``"anople"`` method.
"""

from .adapter import AnoPLeDetector

__all__ = ["AnoPLeDetector"]
