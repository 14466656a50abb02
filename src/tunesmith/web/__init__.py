"""The local dashboard (``tunesmith ui``): runs, reports, live training curves, a chat playground
and the rating studies, on the same FastAPI stack as ``tunesmith serve``."""

from tunesmith.web.app import create_ui_app, serve_ui

__all__ = ["create_ui_app", "serve_ui"]
