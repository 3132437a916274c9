"""Entry point of the Gradio app (Hugging Face Spaces runs this file): ``python app.py [--help]``.

The app itself lives in the ``ui`` package; this module re-exports its public names.
"""

from ui import *  # noqa: F401,F403 - the app's public names, for ``import app``
from ui import main

if __name__ == "__main__":
    main()
