"""The built-in methods; importing this package registers them (in this order)."""

from . import inctrl  # noqa: F401
from . import anople  # noqa: F401
from . import faprompt  # noqa: F401
