"""Evil MoE: make reward hacking removable by routing it into a hack expert.

The library holds every computation; the notebooks in ``notebooks/`` hold the
narrative and the plots. See ``README.md`` and the book for the science.
"""

import warnings

__version__ = "0.1.0"

# Our progress bars are plain-text tqdm. transformers imports tqdm.auto, which in a
# Jupyter kernel without ipywidgets warns that its widget bar is unavailable: a warning
# about a bar we never draw, printed on every notebook page. Only that message is hidden.
warnings.filterwarnings("ignore", message="IProgress not found")
