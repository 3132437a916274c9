"""AnoPLe (reconstruction): bidirectionally coupled multi-modal prompts learned from a few
normal images, a multi-view decoder and a visual memory bank (``docs/anople.md``).

Importing this package registers the ``"anople"`` method.
"""

from .detector import AnoPLeDetector

__all__ = ["AnoPLeDetector"]
