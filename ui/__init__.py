"""The app's page, in layers (docs/layout.md): `jobs` < `words` < `server` < `comparison` < `handlers` < `layout`;
each module imports only from `sr` and from the modules before it. `app.py` builds the page and launches it."""
import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before any module of the package imports gradio
